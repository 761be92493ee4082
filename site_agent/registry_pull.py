"""Verified pulls from the registry: the record checked, every file checked, the version folder renamed into place.

Every file is checked against the record's SHA-256 and size, and against the server's
``X-Content-SHA256`` header, in a temporary folder that is renamed into place only when all
files match: a version folder that exists is complete. A cached version is re-verified
against the server's record and reused without downloading again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import httpx

from fedimg_core import atomic
from fedimg_core.hashing import sha256_file
from fedimg_core.registry_wire import ALLOWED_SUFFIXES, RECORD_FILE, SHA256_HEADER
from fedimg_core.registry_wire import FILENAME as _FILENAME
from site_agent.registry_transport import RegistryClientError, RegistryTransport, check_kind, check_name

__all__ = ["RegistryReader"]

_VERSION = re.compile(r"^v\d{4,}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _safe_filename(filename: object, where: str) -> str:
    """A file name from the server becomes a path here: plain names with allowed suffixes only."""
    if (
        not isinstance(filename, str)
        or not _FILENAME.match(filename)
        or filename.startswith(".")
        or ".." in filename
        or filename == RECORD_FILE
        or not filename.endswith(ALLOWED_SUFFIXES)
    ):
        raise RegistryClientError(f"{where}: the registry lists a file {filename!r} this site refuses to write")
    return filename


class RegistryReader(RegistryTransport):
    """What a site reads from the registry: lists, records, and verified pulls of versions.

    Args:
        url: the registry's ``http(s)://host:port``.
        token: this site's token.
        work_dir: the site's work folder (``pull`` then defaults to its registry folder).
        timeout: seconds for each request.
    """

    def list(self, kind: str | None = None) -> list[dict]:
        """Records of every published version (of `kind`, when given).

        Args:
            kind: only this kind of artifact.

        Returns:
            The records.
        """
        query = None if kind is None else {"kind": check_kind(kind)}
        return [*(self._json("GET", "/registry", query=query, what="the artifact list").get("artifacts") or [])]

    def versions(self, kind: str, name: str) -> dict:
        """The published versions of one artifact.

        Args:
            kind: the artifact's kind.
            name: its name.

        Returns:
            ``{"kind", "name", "versions": [...], "latest"}``.
        """
        return self._json("GET", f"/registry/{check_kind(kind)}/{check_name(name)}", what=f"{kind} {name}")

    def record(self, kind: str, name: str, version: str = "latest") -> dict:
        """The artifact record of one version, checked to be the one asked for.

        Args:
            kind: the artifact's kind.
            name: its name.
            version: ``vNNNN``, or ``latest`` (the newest).

        Returns:
            The record (files with their sha256 and size, meta, publisher).
        """
        self._check_version(version)
        record = self._json("GET", f"/registry/{check_kind(kind)}/{check_name(name)}/{version}", what=f"{kind} {name} {version}")
        self._check_record(record, kind, name, version)
        return record

    @staticmethod
    def _check_version(version: str) -> None:
        if version != "latest" and not (isinstance(version, str) and _VERSION.match(version)):
            raise RegistryClientError(f"version {version!r} is not a registry version (v0001, v0002, ... or latest)")

    def _check_record(self, record: dict, kind: str, name: str, version: str) -> None:
        where = f"{kind} {name} {version}"
        got_version = record.get("version")
        if (
            record.get("kind") != kind
            or record.get("name") != name
            or not isinstance(got_version, str)
            or not _VERSION.match(got_version)
            or (version != "latest" and got_version != version)
        ):
            raise RegistryClientError(f"{where}: the registry at {self.url} answered with the record of something else")
        files = record.get("files")
        if not isinstance(files, dict) or not files:
            raise RegistryClientError(f"{where}: the registry's record lists no files")
        for filename, entry in files.items():
            _safe_filename(filename, where)
            if (
                not isinstance(entry, dict)
                or not isinstance(entry.get("sha256"), str)
                or not _HEX64.match(entry["sha256"])
                or isinstance(entry.get("bytes"), bool)
                or not isinstance(entry.get("bytes"), int)
                or entry["bytes"] < 0
            ):
                raise RegistryClientError(f"{where}: the registry's record of {filename} has no valid sha256/bytes")

    def pull(self, kind: str, name: str, version: str = "latest", dest: str | os.PathLike | None = None) -> Path:
        """Download a version into ``<dest>/<kind>/<name>/<version>/`` and return that folder.

        Every file is verified (record and header SHA-256, size) before the folder appears;
        a complete cached copy that still verifies is reused without downloading.

        Args:
            kind: the artifact's kind.
            name: its name.
            version: ``vNNNN``, or ``latest``.
            dest: the registry folder (default: ``<work_dir>/models/registry``).

        Returns:
            The version's folder.
        """
        check_kind(kind)
        check_name(name)
        if dest is None:
            if self.work_dir is None:
                raise RegistryClientError("pull needs dest= (or a client made from the site config, which uses <work_dir>/models/registry)")
            dest = self.work_dir / "models" / "registry"
        return self._fetch(self.record(kind, name, version), Path(dest))

    def _fetch(self, record: dict, dest: Path) -> Path:
        """`record`'s files into ``<dest>/<kind>/<name>/<version>/`` (verified; reused when cached)."""
        kind, name, resolved = record["kind"], record["name"], record["version"]
        parent = dest / kind / name
        target = parent / resolved
        if self._cached(target, record):
            return target
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{resolved}-", suffix=".partial", dir=parent))
        try:
            os.chmod(tmp, atomic.default_mode(directory=True))
            for filename, entry in record["files"].items():
                self._download(kind, name, resolved, filename, entry, tmp / filename)
            atomic.write_json(tmp / RECORD_FILE, record)
            if target.exists():  # an older copy that no longer verifies (or a concurrent pull)
                if self._cached(target, record):
                    return target
                trash = Path(tempfile.mkdtemp(prefix=f".{resolved}-", suffix=".stale", dir=parent))
                os.rename(target, trash / resolved)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    @staticmethod
    def _cached(folder: Path, record: dict) -> bool:
        """Whether `folder` holds exactly the files of `record`, each with its checksum."""
        if not (folder / RECORD_FILE).is_file():
            return False
        try:
            present = {p.name for p in folder.iterdir()} - {RECORD_FILE}
            if present != set(record["files"]):
                return False
            for filename, entry in record["files"].items():
                path = folder / filename
                if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                    return False
        except OSError:
            return False
        return True

    def _download(self, kind: str, name: str, version: str, filename: str, entry: dict, out: Path) -> None:
        where = f"{kind} {name} {version}: {filename}"
        h, size = hashlib.sha256(), 0
        with self._open("GET", f"/registry/{kind}/{name}/{version}/{filename}", what=where) as resp:
            header = (resp.headers.get(SHA256_HEADER) or "").strip().lower()
            if header != entry["sha256"]:
                raise RegistryClientError(
                    f"{where}: checksum mismatch: the server's {SHA256_HEADER} header ({header[:12] or 'absent'}...) "
                    f"differs from the record ({entry['sha256'][:12]}...); nothing was kept"
                )
            try:
                fh = open(out, "xb")
            except OSError as exc:
                raise RegistryClientError(f"{out}: cannot write ({exc.strerror or exc})") from None
            with fh:
                blocks = resp.iter_raw(1 << 20)
                while True:
                    try:
                        block = next(blocks, b"")
                    except (OSError, httpx.HTTPError) as exc:
                        raise RegistryClientError(f"{where}: download interrupted ({exc or type(exc).__name__})") from None
                    if not block:
                        break
                    size += len(block)
                    if size > entry["bytes"]:  # more than the record says: stop reading, refused below
                        break
                    h.update(block)
                    fh.write(block)
                fh.flush()
                os.fsync(fh.fileno())
        digest = h.hexdigest()
        if size != entry["bytes"] or digest != entry["sha256"]:
            raise RegistryClientError(
                f"{where}: checksum mismatch: downloaded {size} bytes with sha256 {digest[:12]}..., the record says "
                f"{entry['bytes']} bytes, {entry['sha256'][:12]}...; the download is corrupt and was discarded"
            )
