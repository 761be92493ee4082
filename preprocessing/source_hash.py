"""The salted source hashes and input fingerprints of `site-agent prepare`.

A prepared dataset names each source only by a salted hash (the salt is a site secret kept in
``<out>/.state/salt`` or a file of the site's choosing), and each case records a fingerprint
of its inputs, so a re-run redoes exactly the cases whose inputs or options changed.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from pathlib import Path
from typing import Any

from fedimg_core import atomic
from fedimg_core.hashing import sha256_file
from preprocessing.inputs import CaseSource, PrepareError

__all__ = ["MIN_SALT_BYTES", "input_fingerprint", "read_or_create_salt", "salted_hash"]

MIN_SALT_BYTES = 16


def read_or_create_salt(salt_path: Path, salt_file: Path | None) -> bytes:
    """The salt of the source hashes: read, or created on first use when the site gave none.

    Args:
        salt_path: where prepare keeps its own salt (``<out>/.state/salt``).
        salt_file: a salt file given by the site (never created), or None.

    Returns:
        The salt (surrounding whitespace stripped).

    Raises:
        PrepareError: the salt file given does not exist, or a salt file is unreadable,
            too large or shorter than 16 bytes.
    """
    path = salt_file or salt_path
    try:
        data = atomic.read_small_file(path, "salt file").strip()
    except atomic.FileReadError as exc:
        raise PrepareError(str(exc)) from None
    except FileNotFoundError:
        data = None
    if data is not None:
        if len(data) < MIN_SALT_BYTES:
            raise PrepareError(f"{path}: salt file is shorter than {MIN_SALT_BYTES} bytes")
        return data
    if salt_file is not None:
        raise PrepareError(f"{salt_file}: salt file not found")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, secrets.token_hex(32).encode(), mode=0o600)
    return path.read_bytes().strip()


def salted_hash(salt: bytes, parts: list[str]) -> str:
    """The salted hash that stands for a source in a prepared dataset.

    Args:
        salt: the site's salt.
        parts: what identifies the source (UIDs, or a file's checksum).

    Returns:
        16 hex digits of SHA-256(salt, parts).
    """
    return hashlib.sha256(salt + b"\0" + "\n".join(parts).encode()).hexdigest()[:16]


def input_fingerprint(src: CaseSource, context: dict[str, Any]) -> str:
    """The fingerprint of everything a converted case depends on.

    Args:
        src: the source (its files, label included, are hashed).
        context: what else changes the result (converter version, schema, label map,
            modality, options).

    Returns:
        The SHA-256 (hex) of the context and every file's checksum.

    Raises:
        OSError: a file cannot be read.
    """
    h = hashlib.sha256(json.dumps(context, sort_keys=True).encode())
    for f in sorted(src.files, key=str):
        h.update(sha256_file(f).encode())
    return h.hexdigest()
