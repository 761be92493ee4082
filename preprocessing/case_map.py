"""The site-local case map: which source folder each case id of a prepared dataset came from.

Written by `site-agent prepare` next to the dataset folder (never inside it: nothing that reads
or sends a dataset sees it), owner-only, for staff (``site-agent dataset where``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedimg_core import atomic
from preprocessing.inputs import CaseSource, PrepareError, source_location

__all__ = ["CASE_MAP_FORMAT", "default_case_map", "read_case_map", "write_case_map"]

CASE_MAP_FORMAT = "fedimg-case-map"


def default_case_map(out: Path) -> Path:
    """Where prepare keeps the site-local case map: next to the dataset folder, outside it.

    Args:
        out: the dataset folder.

    Returns:
        ``<out>.case-map.json`` in the dataset folder's parent.
    """
    out = Path(out)
    return out.parent / f"{out.name}.case-map.json"


def write_case_map(path: Path, out: Path, by_hash: dict[str, CaseSource]) -> None:
    """Record, for staff only, which source each case id came from.

    Kept outside the dataset folder (see `default_case_map`): nothing that reads or sends a
    dataset sees it. Entries of cases an earlier run prepared from sources not given this
    time are kept until those cases are pruned; owner-only permissions (it names patients'
    folders).

    Args:
        path: the case map file.
        out: the dataset folder (its manifest.json lists the cases).
        by_hash: the sources of this run by their salted source hash.
    """
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    old = read_case_map(path) if path.exists() else {}
    cases: dict[str, dict[str, Any]] = {}
    for case in manifest["cases"]:
        src = by_hash.get(case["source_hash"])
        if src is None:
            if case["case_id"] in old:
                cases[case["case_id"]] = old[case["case_id"]]
            continue
        entry: dict[str, Any] = {"kind": src.kind, "source": os.path.abspath(source_location(src))}
        if src.series is not None:
            entry["files"] = len(src.series.slices)
            entry["series_uid"] = src.series.first.series_uid
        if src.label is not None:
            entry["label"] = os.path.abspath(src.label)
        if src.reference_label is not None:
            entry["reference_label"] = os.path.abspath(src.reference_label)
        cases[case["case_id"]] = entry
    atomic.write_bytes(
        path,
        (json.dumps({"format": CASE_MAP_FORMAT, "note": "site-local: names patients' source folders; never send this file",
                     "dataset": str(out.resolve()), "cases": cases}, indent=2, sort_keys=True) + "\n").encode(),
        mode=0o600,
    )  # fmt: skip


def read_case_map(path: Path) -> dict[str, dict[str, Any]]:
    """The case id -> source entries of a case map written by prepare.

    Args:
        path: the case map file.

    Returns:
        Case id -> its entry (kind, source, files, series UID, label), as `write_case_map` wrote it.

    Raises:
        PrepareError: the file is missing, unreadable or not a case map.
    """
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrepareError(f"{path}: no case map here (prepare writes <dataset folder>.case-map.json, or --case-map)") from None
    except OSError as exc:
        raise PrepareError(f"{path}: cannot read the case map ({exc.strerror or exc})") from None
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("format") != CASE_MAP_FORMAT or not isinstance(doc.get("cases"), dict):
        raise PrepareError(f"{path}: not a case map (no JSON with format {CASE_MAP_FORMAT!r}); refusing to use or overwrite it (pass --case-map)")
    cases: dict[str, dict[str, Any]] = doc["cases"]
    return cases
