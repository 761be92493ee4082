"""Comparing outputs on disk: whether two folders hold the same files, byte for byte."""

from __future__ import annotations

import filecmp
from pathlib import Path

__all__ = ["same_tree"]


def same_tree(a: Path, b: Path) -> bool:
    """Whether two folders hold the same files with the same bytes (hidden files and folders included).

    Args:
        a: a folder.
        b: another.

    Returns:
        True when every file of each is in the other with the same content.
    """
    cmp = filecmp.dircmp(a, b, ignore=[])
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(Path(a) / d, Path(b) / d) for d in cmp.common_dirs)
