"""The coordinator's artifact registry: published weights and configs that sites pull later (no site image ever; a FedSR atlas is the one public or consented image).

``Registry`` stores immutable versions (``<home>/registry/<kind>/<name>/vNNNN/`` with an
``artifact.json``, a ``latest`` pointer), written in staging and renamed into place; per-kind
validators (``register_validator``) and ``.pt`` checks (``pt_archive_problem``) refuse anything
else before it is written. ``coordinator.registry_http`` serves it. Layout, record format and
why: docs/design/registry-storage.md.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Mapping

import yaml
from filelock import FileLock

from fedimg_core import atomic
from fedimg_core.errors import UserError
from fedimg_core.hashing import sha256_file
from fedimg_core.registry_wire import ALLOWED_SUFFIXES, KINDS, RECORD_FILE
from fedimg_core.registry_wire import FILENAME as _FILENAME
from fedimg_core.registry_wire import NAME as _NAME

LATEST_FILE = "latest"

_VERSION = re.compile(r"^v(\d{4,})$")
_STAGING = ".staging"
_STALE_STAGING_S = 24 * 3600
MAX_PT_ENTRIES = 16384  # records in one .pt archive (one per tensor storage, plus a few)


class RegistryError(UserError):
    """A registry operation failed; the message names the artifact or file and the problem."""


class ArtifactNotFound(RegistryError):
    """The artifact, version or file asked for is not published (not a storage problem)."""


Validator = Callable[[dict[str, bytes]], None]
VALIDATORS: dict[str, Validator] = {}


def register_validator(kind: str, fn: Validator) -> None:
    """Install the validator of `kind`: ``fn(files)`` (file name -> content) raises when the
    files are not an acceptable artifact of that kind. Replaces a previous one."""
    _check_kind(kind)
    if not callable(fn):
        raise TypeError(f"validator for {kind!r} must be callable, got {type(fn).__name__}")
    VALIDATORS[kind] = fn


def run_validator(kind: str, files: Mapping[str, bytes], required: bool = False) -> None:
    """Run the validator of `kind` on `files`; RegistryError carries its message.

    ``required``: a kind without a validator is refused (the HTTP push)."""
    fn = VALIDATORS.get(_check_kind(kind))
    if fn is None:
        if required:
            raise RegistryError(
                f"{kind} artifacts cannot be pushed: this coordinator has no validator for that kind, "
                "so it refuses them (nothing unvalidated enters the registry)"
            )
        return
    try:
        fn(dict(files))
    except RegistryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure refuses the artifact (fails closed)
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise RegistryError(f"{kind}: refused by the {kind} validator: {msg}") from None


def pt_archive_problem(source: bytes | os.PathLike, max_entries: int = MAX_PT_ENTRIES) -> str | None:
    """Why `source` is not a ``.pt`` archive as ``torch.save`` writes it, or None.

    ``torch.save`` writes a zip archive whose entries are stored, not compressed. Anything
    else is refused before ``torch.load`` sees it: a deflated entry can inflate a thousand
    times (a 0.7 MB file became 525 MB of memory), and the legacy format allocates the
    storage sizes its pickle declares. Only the zip's directory is read here.

    Args:
        source: the file's bytes, or its path.
        max_entries: most entries (records) the archive may hold.

    Returns:
        A one-line problem, or None when the declared sizes add up to at most the file's size.
    """
    opened: IO[bytes] | os.PathLike
    if isinstance(source, (bytes, bytearray, memoryview)):
        size, head, opened = len(source), bytes(source[:4]), io.BytesIO(source)
    else:
        size = os.path.getsize(source)
        with open(source, "rb") as fh:
            head = fh.read(4)
        opened = source
    if head != b"PK\x03\x04":
        return "not the zip archive torch.save writes (other formats are refused)"
    try:
        with zipfile.ZipFile(opened) as zf:
            entries = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        return f"not a readable zip archive ({exc})"
    if len(entries) > max_entries:
        return f"holds {len(entries)} entries; at most {max_entries}"
    declared = 0
    for info in entries:
        if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
            return f"entry {cap_name(info.filename)} is compressed; torch.save stores entries uncompressed (save it with torch.save)"
        declared += info.file_size
    if declared > size:
        return f"its entries declare {declared} bytes, more than the file's {size} bytes"
    return None


def cap_name(text: str, limit: int = 80) -> str:
    """`text` quoted, cut to `limit` characters (names from a file may be any length)."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


def check_flat_state_dict(filename: str, data: bytes) -> None:
    """`data` must be what ``torch.save(state_dict)`` writes: ``torch.load(weights_only=True)``
    reads it as a flat ``dict[str, Tensor]`` (no numbers, strings or nested containers).
    The archive's declared sizes are checked first (``pt_archive_problem``), so nothing is
    inflated beyond the bytes received."""
    import torch  # deferred: start-up time (the CLI lists the registry without torch)

    problem = pt_archive_problem(data)
    if problem:
        raise RegistryError(f"{filename}: not a weights file that torch.load(weights_only=True) reads: {problem}")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load is a refusal
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RegistryError(f"{filename}: not a weights file that torch.load(weights_only=True) reads: {first}") from None
    if not isinstance(obj, dict) or not obj:
        raise RegistryError(f"{filename}: must hold a non-empty flat dict of tensor names to tensors, got {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise RegistryError(f"{filename}: key {key!r} is not a string; only a flat dict[str, Tensor] is accepted")
        if not isinstance(value, torch.Tensor):
            raise RegistryError(f"{filename}: entry {key!r} is a {type(value).__name__}, not a tensor; only a flat dict[str, Tensor] is accepted")


def _now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _version_number(version: str) -> int | None:
    m = _VERSION.match(version)
    return int(m.group(1)) if m else None


def _format_version(number: int) -> str:
    return f"v{number:04d}"


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise RegistryError(f"unknown artifact kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("."):
        raise RegistryError(f"artifact name {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', not starting with '.'")
    return name


def _check_filename(filename: str) -> str:
    if not isinstance(filename, str) or not _FILENAME.match(filename) or filename.startswith(".") or ".." in filename:
        raise RegistryError(
            f"file name {filename!r} is not allowed: use a plain name (letters, digits, '_', '.', '-'; no folders, no '..', not starting with '.')"
        )
    if filename == RECORD_FILE:
        raise RegistryError(f"file name {RECORD_FILE!r} is reserved for the registry's own record")
    if not filename.endswith(ALLOWED_SUFFIXES):
        raise RegistryError(
            f"{filename}: only weights and configs can be published ({', '.join(ALLOWED_SUFFIXES)}); images, volumes and other data never leave a site"
        )
    return filename


def _check_version(version: str) -> str:
    if not isinstance(version, str) or _version_number(version) is None:
        raise RegistryError(f"version {version!r} is not a registry version (v0001, v0002, ...)")
    return version


def _copy_into(source: bytes | os.PathLike, dest: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """Write `source` (bytes, or the file at a path) to the new file `dest`; return (sha256, bytes)."""
    h, size = hashlib.sha256(), 0
    with open(dest, "xb") as out:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
            out.write(data)
            h.update(data)
            size = len(data)
        else:
            with open(source, "rb") as src:
                while block := src.read(chunk):
                    out.write(block)
                    h.update(block)
                    size += len(block)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size


def _check_content(path: Path, filename: str) -> None:
    """Each published file must be what its suffix says: JSON, YAML, UTF-8 Markdown, safetensors, or
    tensors that ``torch.load(weights_only=True)`` reads (no pickled code reaches the sites)."""
    if filename.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{filename}: not valid JSON ({exc})") from None
    elif filename.endswith(".yaml"):
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{filename}: not valid YAML ({exc})") from None
    elif filename.endswith(".md"):
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RegistryError(f"{filename}: not UTF-8 text ({exc})") from None
    elif filename.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open  # deferred: start-up time

        try:  # reads the header and checks every tensor's bytes lie inside the file; no pickle
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key).get_shape()
        except (SafetensorError, OSError, ValueError) as exc:
            raise RegistryError(f"{filename}: not a safetensors weights file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    elif filename.endswith(".pt"):
        import torch

        problem = pt_archive_problem(path)
        if problem:
            raise RegistryError(f"{filename}: not a PyTorch weights file that torch.load(weights_only=True) reads: {problem}")
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise RegistryError(
                f"{filename}: not a PyTorch weights file that torch.load(weights_only=True) reads "
                f"(tensors, numbers, strings and containers only): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Registry:
    """Published artifacts under ``<home>/registry`` (see the module docstring)."""

    def __init__(self, home: str | os.PathLike):
        self.home = Path(home)
        self.root = self.home / "registry"

    # ------------------------------------------------------------------ paths

    def _name_dir(self, kind: str, name: str) -> Path:
        return self.root / _check_kind(kind) / _check_name(name)

    def _versions(self, kind: str, name: str) -> list[str]:
        """Complete versions on disk (a folder holding artifact.json), oldest first."""
        base = self._name_dir(kind, name)
        if not base.is_dir():
            return []
        found = [(n, d.name) for d in base.iterdir() if (n := _version_number(d.name)) is not None and d.is_dir() and (d / RECORD_FILE).is_file()]
        return [v for _, v in sorted(found)]

    def _resolve(self, kind: str, name: str, version: str | None) -> str:
        versions = self._versions(kind, name)
        where = f"{kind} artifact {name!r}"
        if not versions:
            raise ArtifactNotFound(f"no {where} in the registry ({self.root}); publish it first")
        if version is None:
            latest_file = self._name_dir(kind, name) / LATEST_FILE
            try:
                latest = latest_file.read_text(encoding="utf-8").strip()
            except OSError:
                latest = ""
            # `latest` is written right after a version; a publisher killed in between leaves
            # it behind (or absent for the first version): fall back to the newest version.
            return latest if latest in versions else versions[-1]
        _check_version(version)
        if version not in versions:
            raise ArtifactNotFound(f"{where} has no version {version}; published versions: {', '.join(versions)}")
        return version

    def versions(self, kind: str, name: str) -> builtins.list[str]:
        """Published versions of ``<kind>/<name>``, oldest first (empty when none)."""
        return self._versions(kind, name)

    def latest(self, kind: str, name: str) -> str:
        """The latest version of ``<kind>/<name>``; RegistryError when there is none."""
        return self._resolve(kind, name, None)

    def path(self, kind: str, name: str, version: str | None = None) -> Path:
        """The folder of a published version (the latest when `version` is None)."""
        return self._name_dir(kind, name) / self._resolve(kind, name, version)

    # ------------------------------------------------------------------ reading

    def _read_record(self, folder: Path) -> dict:
        path = folder / RECORD_FILE
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RegistryError(f"{path}: unreadable artifact record ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            raise RegistryError(f"{path}: not an artifact record (no 'files' mapping)")
        return record

    def get(self, kind: str, name: str, version: str | None = None) -> dict:
        """The artifact record of one version (the latest when `version` is None)."""
        return self._read_record(self.path(kind, name, version))

    def list(self, kind: str | None = None) -> builtins.list[dict]:
        """Artifact records of every published version, sorted by kind, name and version."""
        kinds = (_check_kind(kind),) if kind is not None else KINDS
        records = []
        for k in kinds:
            base = self.root / k
            if not base.is_dir():
                continue
            for d in sorted(base.iterdir()):
                if not d.is_dir() or not _NAME.match(d.name) or d.name.startswith("."):
                    continue
                for v in self._versions(k, d.name):
                    records.append(self._read_record(d / v))
        return sorted(records, key=lambda r: (str(r.get("kind")), str(r.get("name")), _version_number(str(r.get("version"))) or 0))

    def verify(self, kind: str, name: str, version: str | None = None) -> dict:
        """Re-hash every file of a version against its record; return the record.

        RegistryError names the file that is missing, changed, or not part of the record."""
        folder = self.path(kind, name, version)
        record = self._read_record(folder)
        for filename in record["files"]:
            self._verify_file(folder, record, filename)
        extra = sorted(p.name for p in folder.iterdir() if p.name != RECORD_FILE and p.name not in record["files"])
        if extra:
            raise RegistryError(f"{folder}: files not part of the published artifact: {', '.join(extra)}")
        return record

    def _verify_file(self, folder: Path, record: dict, filename: str) -> Path:
        where = f"{record.get('kind')} {record.get('name')} {record.get('version')}"
        expected = record["files"].get(filename)
        if not isinstance(expected, dict):
            raise ArtifactNotFound(f"{where}: no file {filename!r}; it has {', '.join(sorted(record['files'])) or 'none'}")
        path = folder / filename
        if not path.is_file():
            raise RegistryError(f"{path}: missing ({where} lists it)")
        digest, size = sha256_file(path), path.stat().st_size
        if digest != expected.get("sha256") or size != expected.get("bytes"):
            raise RegistryError(
                f"{path}: checksum does not match the published record of {where} "
                f"({size} bytes, sha256 {digest[:12]}..., expected {expected.get('bytes')} bytes, "
                f"{str(expected.get('sha256'))[:12]}...); the file was changed or is corrupt"
            )
        return path

    def load(self, kind: str, name: str, filename: str, version: str | None = None) -> Path:
        """The path of one file of a version, after checking its checksum."""
        folder = self.path(kind, name, version)
        return self._verify_file(folder, self._read_record(folder), filename)

    # ------------------------------------------------------------------ publishing

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialises publishers across processes (`filelock`: flock on ``<registry>/.lock``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / ".lock"):
            yield

    def _clean_stale_staging(self, staging_root: Path) -> None:
        cutoff = time.time() - _STALE_STAGING_S
        for entry in staging_root.iterdir():
            try:
                if entry.stat().st_mtime < cutoff:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass

    def publish(
        self,
        kind: str,
        name: str,
        files: Mapping[str, bytes | os.PathLike],
        meta: Mapping[str, Any] | None = None,
        require_validator: bool = False,
    ) -> dict:
        """Publish a new version of ``<kind>/<name>``; return its artifact record.

        ``files`` maps plain file names (``.pt``, ``.json`` or ``.yaml``) to their content
        (bytes) or to a file to copy. ``meta`` is any JSON-serialisable mapping, stored as is.
        The validator of `kind` (``register_validator``), when there is one, sees the files'
        content before anything is written (``require_validator``: a kind without one is
        refused, as for pushes from sites). Nothing is left behind when a step fails;
        ``latest`` moves to the new version."""
        _check_kind(kind)
        _check_name(name)
        if not isinstance(files, Mapping) or not files:
            raise RegistryError(f"{kind} {name}: nothing to publish (no files)")
        for filename, source in files.items():
            _check_filename(filename)
            if not isinstance(source, (bytes, bytearray, memoryview)):
                if not isinstance(source, (str, os.PathLike)):
                    raise RegistryError(f"{filename}: content must be bytes or a file path, got {type(source).__name__}")
                if not Path(source).is_file():
                    raise RegistryError(f"{filename}: {source} is not a file")
        meta = {} if meta is None else meta
        if not isinstance(meta, Mapping):
            raise RegistryError(f"{kind} {name}: meta must be a mapping, got {type(meta).__name__}")
        try:
            meta = json.loads(json.dumps(dict(meta), allow_nan=False))
        except (TypeError, ValueError, RecursionError) as exc:
            raise RegistryError(f"{kind} {name}: meta must be JSON-serialisable ({exc})") from None
        if require_validator or VALIDATORS.get(kind) is not None:
            # The validator and the writer see the same bytes (a file could change in between).
            content = {f: bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else Path(src).read_bytes() for f, src in files.items()}
            for f, data in content.items():  # validators torch.load: nothing inflates past its bytes
                if f.endswith(".pt") and (problem := pt_archive_problem(data)):
                    raise RegistryError(f"{f}: not a PyTorch weights file that torch.load(weights_only=True) reads: {problem}")
            run_validator(kind, content, required=require_validator)
            files = content

        staging_root = self.root / _STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        self._clean_stale_staging(staging_root)
        staging = Path(tempfile.mkdtemp(prefix=f"{kind}-{name}-", dir=staging_root))
        try:
            os.chmod(staging, atomic.default_mode(directory=True))
            entries = {}
            for filename, source in files.items():
                digest, size = _copy_into(source, staging / filename)
                _check_content(staging / filename, filename)
                entries[filename] = {"sha256": digest, "bytes": size}
            name_dir = self._name_dir(kind, name)
            with self._lock():
                name_dir.mkdir(parents=True, exist_ok=True)
                existing = [n for d in name_dir.iterdir() if (n := _version_number(d.name)) is not None]
                version = _format_version(max(existing, default=0) + 1)
                record = {
                    "kind": kind,
                    "name": name,
                    "version": version,
                    "created": _now_utc(),
                    "files": entries,
                    "meta": meta,
                }
                atomic.write_json(staging / RECORD_FILE, record)
                _fsync_dir(staging)
                target = name_dir / version
                os.rename(staging, target)  # one step: the version appears complete or not at all
                try:
                    _fsync_dir(name_dir)
                    atomic.write_text(name_dir / LATEST_FILE, version + "\n")
                except BaseException:  # `latest` not updated: withdraw the version (still locked)
                    shutil.rmtree(target, ignore_errors=True)
                    raise
            return record
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
