"""File hashing."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (`hashlib.file_digest`, which reads it in blocks).

    Args:
        path: the file.
        chunk: unused; kept for callers that passed a block size (``hashlib.file_digest``
            picks its own, or hashes the file without copying where the OS allows).

    Returns:
        The hex digest (64 lower-case hex characters).

    Raises:
        OSError: the file cannot be read.
    """
    del chunk
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
