"""Atomic file writes, and bounded reads of small files an operator names.

Writes go to a temporary file in the same folder, fsync, rename: a reader never sees a
half-written file, and an interrupted write leaves the previous version in place.
`read_small_file` reads a configuration or secret file (label map, schema, salt) without
blocking on a FIFO or reading /dev/zero without end.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from fedimg_core.errors import FedimgError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode a plain open()/mkdir() would give: mkstemp/mkdtemp use 0600/0700, which
    would hide outputs from a node or container running under another user."""
    return (0o777 if directory else 0o666) & ~_umask()


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` atomically in pieces: a temporary sibling, fsync, then rename on success.

    For outputs too large to build in memory first (`write_bytes` writes one bytes object). An
    exception inside the block removes the temporary file and leaves the old ``path`` as it was.

    Args:
        path: the file to write (its folder is created).
        mode: the file's permissions (default: what a plain open() would give).

    Yields:
        The open temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, default_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically: a temporary sibling, fsync, then rename.

    A reader sees the old file or the new one, never part of one; a failure leaves the old.

    Args:
        path: the file to write (its folder is created).
        data: the bytes.
        mode: the file's permissions (default: what a plain open() would give).
    """
    with open_atomic(path, mode) as fh:
        fh.write(data)


def publish_dir(target: str | os.PathLike[str], build: Callable[[Path], object]) -> None:
    """Build a folder in a temporary sibling, then put it in place of ``target``.

    Args:
        target: the folder to create or replace.
        build: writes the folder's content into the folder it is given.

    Raises:
        BaseException: whatever ``build`` raises; the temporary folder is removed and
            ``target`` stays as it was.
    """
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        build(tmp)
        _swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    old = new.with_name(new.name + ".old")  # unique: new comes from mkdtemp
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` atomically (`write_bytes`).

    Args:
        path: the file to write.
        text: the text.
    """
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically (`write_bytes`).

    Args:
        path: the file to write.
        obj: a JSON-serialisable value.
    """
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# What a label map, a schema or a salt file can reasonably hold.
SMALL_FILE_LIMIT = 1 << 20


class FileReadError(FedimgError, ValueError):
    """An operator-given file that is not a regular file, too large or unreadable; the
    message names the file and the problem."""


def read_small_file(path: str | os.PathLike[str], what: str = "file", limit: int = SMALL_FILE_LIMIT) -> bytes:
    """The bytes of a small regular file, read without blocking or reading without bound.

    A FIFO would block `open()` until a writer comes and a device such as /dev/zero never
    ends: only regular files (or links to one) are read, at most `limit` bytes.

    Args:
        path: the file.
        what: what the file is, for the message ("label map", "salt file", ...).
        limit: the largest size accepted, in bytes.

    Returns:
        The file's content.

    Raises:
        FileNotFoundError: no such file (the caller words it).
        FileReadError: not a regular file, larger than `limit`, or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO with no writer opens at once
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FileReadError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = (
            "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        )  # fmt: skip
        raise FileReadError(f"{path}: the {what} must be a regular file, this is {kind}")
    with os.fdopen(fd, "rb") as fh:
        try:
            data = fh.read(limit + 1)
        except OSError as exc:
            raise FileReadError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise FileReadError(f"{path}: the {what} is larger than {limit:,} bytes; is it the right file?")
    return data
