"""Site side of the coordinator's artifact registry: pull published weights, push our own.

HTTP through httpx (redirects are not followed, so the token goes to `url` only). A pull lands in ``<dest>/<kind>/<name>/<version>/`` (by default
``<work_dir>/models/registry``) with the artifact's record as ``artifact.json``::

    client = RegistryClient.from_site_config(site_agent.config.load())
    folder = client.pull("factory", "abdomen-gan")             # the latest version
    record = client.push("segmentation-branch", "hospital-a-liver", {"branch.pt": data, "branch.json": cfg})

Every file is checked against the record's SHA-256 and size, and against the server's
``X-Content-SHA256`` header, in a temporary folder that is renamed into place only when all
files match: a version folder that exists is complete. A cached version is re-verified
against the server's record and reused without downloading again. The token comes from
$FEDIMG_SITE_TOKEN or the config's ``registry.token_file``, and is never printed or logged.

Commands pull through `StagedPulls`: downloads land in ``<work_dir>/staging/`` (outside the
models folder a plan can name files in) and move into the registry folder only when the
command succeeds; a failed command leaves nothing there. Whatever is in the registry folder,
a file whose loading runs code (TorchScript, pickles) still loads only with the site's
approval of its sha256 (`pipelines.artifact_approval`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import ssl
import tempfile
import urllib.parse
from pathlib import Path
from typing import Iterator, Mapping

import httpx

from fedimg_core import atomic
from fedimg_core.errors import UserError
from fedimg_core.hashing import sha256_file
from fedimg_core.registry_wire import ALLOWED_SUFFIXES, KINDS, MAX_PUSH_BYTES, RECORD_FILE, SHA256_HEADER, TOKEN_ENV
from fedimg_core.registry_wire import FILENAME as _FILENAME
from fedimg_core.registry_wire import NAME as _NAME
from pipelines.terminal_text import escape_controls
from site_agent.processes import pid_alive

_VERSION = re.compile(r"^v\d{4,}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RegistryClientError(UserError):
    """A pull or push failed; the message names the artifact or file and what to do."""


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise RegistryClientError(f"unknown artifact kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("."):
        raise RegistryClientError(f"artifact name {name!r} is not allowed: 1-64 letters, digits, '_', '.' or '-', not starting with '.'")
    return name


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


def read_token(token_file: str | os.PathLike | None, env: Mapping[str, str] | None = None) -> str:
    """The site token: $FEDIMG_SITE_TOKEN, else the first line of `token_file`.

    Args:
        token_file: the config's ``registry.token_file``, if any.
        env: the environment to read (default: this process's).

    Returns:
        The token (never printed or logged).

    Raises:
        RegistryClientError: no token, a file that cannot be read, or one that does not hold the
            token alone on one line.
    """
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip()
    if token_file is None:
        raise RegistryClientError(
            f"no site token: set registry.token_file in the site config or ${TOKEN_ENV} "
            "(the coordinator's operator issues one with `coordinator site-token issue <site>`)"
        )
    path = Path(token_file)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RegistryClientError(f"{path}: cannot read the site token ({exc.strerror or exc})") from None
    if not token or len(token.split()) != 1:
        raise RegistryClientError(f"{path}: expected the site token alone on one line")
    return token


class RegistryClient:
    """Pull from and push to the registry at `url` with a site token.

    Args:
        url: the registry's ``http(s)://host:port``.
        token: this site's token.
        work_dir: the site's work folder (``pull`` then defaults to its registry folder).
        timeout: seconds for each request.

    Raises:
        RegistryClientError: a bad URL or no token.
    """

    def __init__(self, url: str, token: str, work_dir: str | os.PathLike | None = None, timeout: float = 60.0):
        parts = urllib.parse.urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryClientError(f"registry URL must be http:// or https:// with a host (got {url!r})")
        if not token:
            raise RegistryClientError("no site token given")
        self.url = url.rstrip("/")
        self._token = token  # never printed: not in repr, messages or logs
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None  # made on first use

    def __repr__(self) -> str:
        return f"RegistryClient({self.url!r})"

    @classmethod
    def from_site_config(cls, cfg, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> "RegistryClient":
        """From a loaded ``SiteConfig`` (its ``registry`` section; the token from
        $FEDIMG_SITE_TOKEN or ``registry.token_file``).

        Args:
            cfg: the site config.
            env: the environment to read the token from (default: this process's).
            timeout: seconds for each request.

        Returns:
            The client (pulls go to ``<work_dir>/models/registry``).

        Raises:
            RegistryClientError: no registry section, or no token.
        """
        reg = getattr(cfg, "registry", None)
        where = str(cfg.path) if getattr(cfg, "path", None) else "the site config"
        if reg is None:
            raise RegistryClientError(f"{where}: no registry section; add `registry: {{url: http://<coordinator>:8750, token_file: /abs/path}}`")
        return cls(reg.url, read_token(reg.token_file, env), work_dir=cfg.work_dir, timeout=timeout)

    # ------------------------------------------------------------------ HTTP

    @contextlib.contextmanager
    def _open(self, method: str, path: str, body: bytes | None = None, what: str = "", query: dict | None = None) -> Iterator[httpx.Response]:
        """One request, its response streamed (the body is read by the caller).

        Raises:
            RegistryClientError: the registry cannot be reached, or answers with anything but 2xx
                (a redirect included: it is not followed, so the token never goes elsewhere).
        """
        quoted = "/".join(urllib.parse.quote(p, safe="") for p in path.split("/"))
        if query:
            quoted += "?" + urllib.parse.urlencode(query)
        # identity: the bytes hashed are the file's bytes, never a decoded transfer encoding.
        headers = {"Authorization": f"Bearer {self._token}", "Accept-Encoding": "identity"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        what = what or path
        # The system's CA store (as urllib used), not certifi's: a site may trust its own CA.
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        client = httpx.Client(timeout=self.timeout, follow_redirects=False, verify=self._ssl)
        try:
            try:
                resp = client.send(client.build_request(method, self.url + quoted, content=body, headers=headers), stream=True)
            except (httpx.TransportError, OSError) as exc:
                raise RegistryClientError(
                    f"cannot reach the registry at {self.url} ({exc or type(exc).__name__}); is the coordinator running and registry.url right?"
                ) from None
            try:
                if not 200 <= resp.status_code < 300:
                    try:
                        detail = json.loads(resp.read() or b"{}").get("error") or resp.reason_phrase
                    except (ValueError, AttributeError, OSError, httpx.HTTPError):
                        detail = resp.reason_phrase
                    if resp.is_redirect:
                        target = escape_controls(resp.headers.get("location", "?")[:200])
                        raise RegistryClientError(
                            f"the registry at {self.url} refused {what} ({resp.status_code}): it answered with a redirect to {target}; "
                            "redirects are not followed, so the site token goes only to registry.url: set registry.url to the final address"
                        )
                    raise self._refusal(resp.status_code, str(detail), what)
                yield resp
            finally:
                resp.close()
        finally:
            client.close()

    def _refusal(self, code: int, detail: str, what: str) -> RegistryClientError:
        if code == 401:
            return RegistryClientError(
                f"the registry at {self.url} refused this site's token (401: {detail}); ask the coordinator's operator "
                f"for a new one (`coordinator site-token issue <site>`) and put it in registry.token_file or ${TOKEN_ENV}"
            )
        if code == 403:
            return RegistryClientError(f"the registry at {self.url} forbids this ({what}): {detail}")
        if code == 404:
            return RegistryClientError(f"not in the registry at {self.url}: {what}: {detail}")
        if code == 413:
            return RegistryClientError(f"the registry at {self.url} refused {what} as too large: {detail}")
        if code >= 500:
            return RegistryClientError(f"the registry at {self.url} failed on {what} ({code}): {detail}")
        return RegistryClientError(f"the registry at {self.url} refused {what} ({code}): {detail}")

    def _json(self, method: str, path: str, body: bytes | None = None, what: str = "", query: dict | None = None) -> dict:
        with self._open(method, path, body, what, query) as resp:
            try:
                raw = resp.read()
            except (OSError, httpx.HTTPError) as exc:
                raise RegistryClientError(f"the registry at {self.url}: answer to {what or path} cut short ({exc})") from None
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            raise RegistryClientError(f"the registry at {self.url} answered {path} with something that is not JSON") from None
        if not isinstance(doc, dict):
            raise RegistryClientError(f"the registry at {self.url} answered {path} with unexpected JSON")
        return doc

    # ------------------------------------------------------------------ reading

    def list(self, kind: str | None = None) -> list[dict]:
        """Records of every published version (of `kind`, when given).

        Args:
            kind: only this kind of artifact.

        Returns:
            The records.
        """
        query = None if kind is None else {"kind": _check_kind(kind)}
        return [*(self._json("GET", "/registry", query=query, what="the artifact list").get("artifacts") or [])]

    def versions(self, kind: str, name: str) -> dict:
        """The published versions of one artifact.

        Args:
            kind: the artifact's kind.
            name: its name.

        Returns:
            ``{"kind", "name", "versions": [...], "latest"}``.
        """
        return self._json("GET", f"/registry/{_check_kind(kind)}/{_check_name(name)}", what=f"{kind} {name}")

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
        record = self._json("GET", f"/registry/{_check_kind(kind)}/{_check_name(name)}/{version}", what=f"{kind} {name} {version}")
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
        _check_kind(kind)
        _check_name(name)
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

    # ------------------------------------------------------------------ pushing

    def push(self, kind: str, name: str, files: Mapping[str, bytes], meta: Mapping | None = None) -> dict:
        """Push a new version of ``<kind>/<name>`` (file name -> bytes); return its record.

        The coordinator validates everything and records this site as ``published_by``.

        Args:
            kind: the artifact's kind.
            name: its name.
            files: file name -> bytes.
            meta: the record's ``meta`` (JSON).

        Returns:
            The new version's record.
        """
        _check_kind(kind)
        _check_name(name)
        if not isinstance(files, Mapping) or not files:
            raise RegistryClientError(f"{kind} {name}: nothing to push (no files)")
        encoded = {}
        for filename, data in files.items():
            if not isinstance(filename, str) or not _FILENAME.match(filename) or filename.startswith(".") or filename == RECORD_FILE:
                raise RegistryClientError(f"{kind} {name}: file name {filename!r} is not allowed (a plain name)")
            if not filename.endswith(ALLOWED_SUFFIXES):
                raise RegistryClientError(
                    f"{filename}: only weights and configs can be pushed ({', '.join(ALLOWED_SUFFIXES)}); images, volumes and other data never leave a site"
                )
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise RegistryClientError(f"{filename}: content must be bytes, got {type(data).__name__}")
            encoded[filename] = base64.b64encode(bytes(data)).decode("ascii")
        try:
            body = json.dumps({"files": encoded, "meta": dict(meta or {})}, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise RegistryClientError(f"{kind} {name}: meta must be JSON-serialisable ({exc})") from None
        if len(body) > MAX_PUSH_BYTES:
            raise RegistryClientError(f"{kind} {name}: push of {len(body)} bytes (base64 included) is over the registry's limit of {MAX_PUSH_BYTES}")
        record = self._json("POST", f"/registry/{kind}/{name}", body, what=f"push of {kind} {name}")
        if record.get("kind") != kind or record.get("name") != name or not isinstance(record.get("files"), dict):
            raise RegistryClientError(f"{kind} {name}: the registry answered the push with something that is not its record")
        for filename, data in files.items():
            entry = record["files"].get(filename) or {}
            if entry.get("sha256") != hashlib.sha256(bytes(data)).hexdigest():
                raise RegistryClientError(f"{kind} {name} {record.get('version')}: {filename}: the registry recorded another checksum than was sent")
        return record


STAGING_PREFIX = "pull-"


def _pid_of(folder: Path) -> int | None:
    try:
        return int(folder.name[len(STAGING_PREFIX) :].split("-", 1)[0])
    except ValueError:
        return None


class StagedPulls:
    """The registry pulls of one command, kept out of the registry folder until it succeeds.

    Downloads go to a folder of their own under `staging_root` (which must lie outside the
    models folder plans can name files in); `commit` moves each verified version into
    ``<registry_dir>/<kind>/<name>/<version>/``, `discard` deletes them. Used as a context
    manager it commits when the block succeeds and discards when it raises::

        with StagedPulls(client, work_dir / "models" / "registry", work_dir / "staging") as pulls:
            folder = pulls.pull("factory", "abdomen-gan")
            ...  # everything the command does with it

    Args:
        client: the `RegistryClient`.
        registry_dir: the site's registry folder (a verified copy there is reused).
        staging_root: where this command's downloads wait.
    """

    def __init__(self, client: RegistryClient, registry_dir: str | os.PathLike, staging_root: str | os.PathLike):
        self.client = client
        self.registry_dir = Path(registry_dir)
        self.staging_root = Path(staging_root)
        self._dir: Path | None = None
        self._staged: list[tuple[Path, Path, dict]] = []

    def _staging(self) -> Path:
        if self._dir is None:
            self.staging_root.mkdir(parents=True, exist_ok=True)
            for old in self.staging_root.glob(f"{STAGING_PREFIX}*"):  # left by a command that was killed
                pid = _pid_of(old)
                if pid is not None and pid != os.getpid() and not pid_alive(pid):
                    shutil.rmtree(old, ignore_errors=True)
            self._dir = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=self.staging_root))
        return self._dir

    def pull(self, kind: str, name: str, version: str = "latest") -> Path:
        """A verified folder of the version: the registry folder's copy when it still
        verifies, else a staged download (moved into the registry folder by `commit`).

        Args:
            kind: the artifact's kind.
            name: its name.
            version: ``vNNNN``, or ``latest``.

        Returns:
            The version's folder (staged or in the registry folder).
        """
        _check_kind(kind)
        _check_name(name)
        record = self.client.record(kind, name, version)
        target = self.registry_dir / kind / name / record["version"]
        if self.client._cached(target, record):
            return target
        folder = self.client._fetch(record, self._staging())
        self._staged.append((folder, target, record))
        return folder

    def commit(self) -> list[Path]:
        """Move every staged version into the registry folder.

        Returns:
            Their folders there.
        """
        done = []
        for folder, target, record in self._staged:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                if self.client._cached(target, record):  # a concurrent command put the same version there
                    done.append(target)
                    continue
                trash = Path(tempfile.mkdtemp(prefix=f".{target.name}-", suffix=".stale", dir=target.parent))
                os.rename(target, trash / target.name)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(folder, target)
            done.append(target)
        self._staged.clear()
        self.discard()
        return done

    def discard(self) -> None:
        """Delete this command's downloads that were not committed."""
        self._staged.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> "StagedPulls":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
