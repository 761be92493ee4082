"""The artifact registry over HTTP: sites pull published weights and push their own (bearer tokens).

``RegistryRoutes`` is a mixin for a ``BaseHTTPRequestHandler`` (the coordinator service uses it);
``make_registry_handler`` and ``serve_registry`` run the routes on their own. Routes and what a push may
hold, by construction: docs/design/http-service.md.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from coordinator import branches  # also registers the segmentation-branch validator
from coordinator import registry as R
from coordinator.http_limits import GATE_BODY_BYTES, MAX_JSON_DEPTH, HTTPLimits, LimitedRequestMixin, json_depth
from coordinator.http_server import LimitedHTTPServer
from coordinator.registry import ArtifactNotFound, Registry, RegistryError
from coordinator.site_tokens import SiteTokens
from fedimg_core.errors import UserError
from fedimg_core.registry_wire import MAX_PUSH_BYTES, SHA256_HEADER

MAX_PUSH_FILES = 32
PUSHABLE_KINDS = ("segmentation-branch",)
PUBLISHED_BY = "published_by"
# Read (and drop) at most this much of a refused body before answering: what the connection
# gate has already received, so a refusal never waits on a client that sends no body.
_DRAIN_BYTES = GATE_BODY_BYTES
_PUSH_KEYS = {"files", "meta"}
MAX_CONCURRENT_PUSHES = 2  # push bodies in memory at once (each up to MAX_PUSH_BYTES, plus decoding)
PUSH_WAIT_S = 60.0

_push_slots = threading.BoundedSemaphore(MAX_CONCURRENT_PUSHES)

_push_locks: dict[str, threading.Lock] = {}
_push_locks_guard = threading.Lock()


def _push_lock(root: Path) -> threading.Lock:
    """One lock per registry: the ownership check and the publish happen together."""
    key = str(Path(root).resolve())
    with _push_locks_guard:
        return _push_locks.setdefault(key, threading.Lock())


class _Refusal(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)
        self.message = message


def is_registry_path(path: str) -> bool:
    """Whether a request path belongs to the registry routes."""
    parts = [p for p in urllib.parse.urlsplit(path).path.split("/") if p]
    return parts[:1] == ["registry"]


def owner(reg: Registry, kind: str, name: str) -> str | None:
    """The site that owns ``<kind>/<name>`` (pushed its first version); "" when the
    coordinator published it; None when nothing is published under that name."""
    versions = reg.versions(kind, name)
    if not versions:
        return None
    meta = reg.get(kind, name, versions[0]).get("meta") or {}
    by = meta.get(PUBLISHED_BY) if isinstance(meta, dict) else None
    return by if isinstance(by, str) and by else ""


class RegistryRoutes(LimitedRequestMixin):
    """Mixin: the ``/registry`` routes for a ``BaseHTTPRequestHandler``.

    Set ``registry_home`` (the coordinator home), ``registry_api_token`` (the researcher
    token, or None) and optionally ``limits`` (``coordinator.http_limits.HTTPLimits``) on the
    handler class; call ``handle_registry("GET" | "POST")``."""

    registry_home: Path
    registry_api_token: str | None = None
    registry_max_push_bytes: int = MAX_PUSH_BYTES

    # ------------------------------------------------------------------ plumbing

    def _reg_json(self, status: int, body: dict) -> None:
        self.json_reply(status, body)  # error messages capped (coordinator.http_limits)

    def _reg_drain(self) -> None:
        """Read what is left of a refused request body (up to a bound) so the client reads
        our answer instead of a reset connection; a larger body just gets the connection closed."""
        if self.command != "POST" or getattr(self, "_reg_body_read", False):
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if 0 < length <= _DRAIN_BYTES:
            try:
                self.read_body(length)
            except OSError:
                self.close_connection = True
        elif length > _DRAIN_BYTES:
            self.close_connection = True

    def _reg_caller(self) -> tuple[str, str | None] | None:
        """("researcher", None), ("site", site) or None (no valid token)."""
        given = self.headers.get("Authorization", "")
        if not given.startswith("Bearer "):
            return None
        token = given[7:].strip()
        if not token:
            return None
        api = self.registry_api_token
        if api and hmac.compare_digest(token.encode("utf-8", "replace"), api.encode()):
            return ("researcher", None)
        site = SiteTokens(self.registry_home).verify(token)
        return ("site", site) if site else None

    def handle_registry(self, method: str) -> None:
        """Answer a ``/registry/...`` request: authenticate, then list, fetch or push an artifact.

        Refusals are answered as capped JSON errors (404, 400, 401, 413, ...), never raised.

        Args:
            method: ``GET`` or ``POST``.
        """
        self._reg_body_read = False
        try:
            split = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in split.path.split("/") if p]
            if parts[:1] != ["registry"]:
                raise _Refusal(HTTPStatus.NOT_FOUND, f"no such endpoint {split.path}")
            caller = self._reg_caller()
            if caller is None:
                raise _Refusal(HTTPStatus.UNAUTHORIZED, "missing or wrong token (a site token or the API token)")
            reg = Registry(self.registry_home)
            if method == "GET":
                self._reg_get(reg, parts[1:], urllib.parse.parse_qs(split.query, keep_blank_values=True), caller)
            elif method == "POST":
                self._reg_push(reg, parts[1:], caller)
            else:
                raise _Refusal(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} is not supported on {split.path}")
        except _Refusal as exc:
            self._reg_drain()
            self._reg_json(exc.status, {"error": exc.message})
        except (ConnectionError, TimeoutError):  # the client went away mid-answer, or stalled past its deadline
            self.close_connection = True
        except UserError as exc:  # a storage problem on the coordinator (unreadable record, tokens file)
            self._reg_drain()
            self._reg_json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": str(exc)})

    # ------------------------------------------------------------------ reading

    @staticmethod
    def _reg_target(kind: str, name: str | None = None, version: str | None = None) -> None:
        """404 for a path that cannot name a published artifact."""
        if kind not in R.KINDS:
            raise _Refusal(HTTPStatus.NOT_FOUND, f"unknown artifact kind {kind!r}; expected one of {', '.join(R.KINDS)}")
        if name is not None:
            try:
                R._check_name(name)
            except RegistryError as exc:
                raise _Refusal(HTTPStatus.NOT_FOUND, str(exc)) from None
        if version is not None and version != "latest" and R._version_number(version) is None:
            raise _Refusal(HTTPStatus.NOT_FOUND, f"version {version!r} is not a registry version (v0001, v0002, ... or latest)")

    def _reg_get(self, reg: Registry, parts: list[str], query: dict[str, list[str]], caller: tuple[str, str | None] = ("site", None)) -> None:
        if len(parts) == 4 and parts[0] == "model" and parts[3] == "evaluations":
            return self._reg_model_evaluation(reg, parts, caller, "GET")
        if not parts:
            unknown = set(query) - {"kind"}
            if unknown:
                raise _Refusal(HTTPStatus.BAD_REQUEST, f"unknown query parameter(s) {', '.join(sorted(unknown))}; allowed: kind")
            kind = query.get("kind", [None])[-1]
            if kind is not None and kind not in R.KINDS:
                raise _Refusal(HTTPStatus.BAD_REQUEST, f"unknown artifact kind {kind!r}; expected one of {', '.join(R.KINDS)}")
            return self._reg_json(HTTPStatus.OK, {"artifacts": reg.list(kind)})
        if len(parts) > 4:
            raise _Refusal(HTTPStatus.NOT_FOUND, "no such endpoint /registry/" + "/".join(parts))
        kind = parts[0]  # not empty: answered above
        name, version, filename = (parts[1:] + [None] * 3)[:3]
        self._reg_target(kind, name, version)
        if name is None:
            return self._reg_json(HTTPStatus.OK, {"artifacts": reg.list(kind)})
        try:
            versions = reg.versions(kind, name)
            if not versions:
                raise ArtifactNotFound(f"no {kind} artifact {name!r} in the registry")
            if version not in (None, "latest") and version not in versions:
                raise ArtifactNotFound(f"{kind} artifact {name!r} has no version {version}; published versions: {', '.join(versions)}")
            if version is None:
                return self._reg_json(HTTPStatus.OK, {"kind": kind, "name": name, "versions": versions, "latest": reg.latest(kind, name)})
            resolved = reg.latest(kind, name) if version == "latest" else version
            folder = reg.path(kind, name, resolved)
            if filename is None:
                return self._reg_json(HTTPStatus.OK, reg.get(kind, name, resolved))
            record = reg.get(kind, name, resolved)
            if filename not in record["files"]:
                raise ArtifactNotFound(f"{kind} {name} {resolved}: no file {filename!r}; it has {', '.join(sorted(record['files'])) or 'none'}")
        except ArtifactNotFound as exc:
            raise _Refusal(HTTPStatus.NOT_FOUND, str(exc)) from None
        try:
            path = reg._verify_file(folder, record, filename)
        except RegistryError as exc:
            raise _Refusal(HTTPStatus.INTERNAL_SERVER_ERROR, f"refusing to serve a corrupt artifact: {exc}") from None
        self._reg_send_file(path, record["files"][filename])

    def _reg_send_file(self, path: Path, entry: dict) -> None:
        with open(path, "rb") as fh:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(entry["bytes"]))
            self.send_header(SHA256_HEADER, entry["sha256"])
            self.end_headers()
            while block := fh.read(1 << 20):
                self.wfile.write(block)

    # ------------------------------------------------------------------ pushing

    def _reg_model_evaluation(self, reg: Registry, parts: list[str], caller: tuple[str, str | None], method: str) -> None:
        """``/registry/model/<name>/<version>/evaluations``: a site sends its aggregate (POST, site token);
        the researcher reads every site's (GET, API token). `coordinator.model_evaluations`."""
        from coordinator import model_evaluations

        _, name, version, _ = parts
        self._reg_target("model", name, version)
        role, site = caller
        try:
            resolved = reg.latest("model", name) if version == "latest" else version
            reg.get("model", name, resolved)
        except RegistryError as exc:
            raise _Refusal(HTTPStatus.NOT_FOUND, str(exc)) from None
        if method == "GET":
            if role != "researcher":
                raise _Refusal(HTTPStatus.FORBIDDEN, "only the researcher's API token reads the sites' evaluations")
            return self._reg_json(HTTPStatus.OK, {"evaluations": model_evaluations.read_evaluations(self.registry_home, name, resolved)})
        if role != "site" or not site:
            raise _Refusal(HTTPStatus.FORBIDDEN, "only a site token may send an evaluation")
        raw_length = self.headers.get("Content-Length")
        try:
            length = int(raw_length or "")
        except ValueError:
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED, "an evaluation needs a Content-Length") from None
        if not 0 < length <= GATE_BODY_BYTES:
            raise _Refusal(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"an evaluation is at most {GATE_BODY_BYTES} bytes of JSON (aggregates only)")
        self._reg_body_read = True
        body = self.read_body(length)
        try:
            doc = json.loads(body)
        except ValueError:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "the evaluation is not JSON") from None
        if json_depth(doc) > MAX_JSON_DEPTH:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "the evaluation nests too deep")
        try:
            stored = model_evaluations.store_evaluation(self.registry_home, name, resolved, site, doc)
        except RegistryError as exc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, str(exc)) from None
        self._reg_json(HTTPStatus.CREATED, stored)

    def _reg_push(self, reg: Registry, parts: list[str], caller: tuple[str, str | None]) -> None:
        if len(parts) == 4 and parts[0] == "model" and parts[3] == "evaluations":
            return self._reg_model_evaluation(reg, parts, caller, "POST")
        if len(parts) != 2:
            raise _Refusal(HTTPStatus.NOT_FOUND, "push to /registry/<kind>/<name>")
        kind, name = parts
        role, site = caller
        if role != "site" or not site:
            raise _Refusal(HTTPStatus.FORBIDDEN, "only a site token may push; the coordinator publishes its own artifacts directly")
        if kind not in R.KINDS:
            raise _Refusal(HTTPStatus.NOT_FOUND, f"unknown artifact kind {kind!r}; expected one of {', '.join(R.KINDS)}")
        if kind not in PUSHABLE_KINDS:
            raise _Refusal(
                HTTPStatus.FORBIDDEN,
                f"{kind} artifacts are published by the coordinator's own federation runs; sites may push only {', '.join(PUSHABLE_KINDS)}",
            )
        try:
            R._check_name(name)
        except RegistryError as exc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, str(exc)) from None
        if R.VALIDATORS.get(kind) is None:
            try:
                R.run_validator(kind, {}, required=True)
            except RegistryError as exc:
                raise _Refusal(HTTPStatus.BAD_REQUEST, str(exc)) from None
        self._reg_check_owner(reg, kind, name, site)
        if not _push_slots.acquire(timeout=PUSH_WAIT_S):
            raise _Refusal(HTTPStatus.SERVICE_UNAVAILABLE, "the registry is busy with other pushes; push again in a minute")
        try:
            record = self._reg_push_validated(reg, kind, name, site)
        finally:
            _push_slots.release()
        self._reg_json(HTTPStatus.CREATED, record)

    def _reg_push_validated(self, reg: Registry, kind: str, name: str, site: str) -> dict:
        """Read, validate and publish one push (a push slot is held); the new record."""
        files, meta = self._reg_read_push()
        meta[PUBLISHED_BY] = site  # set by the server: a client's own claim is overwritten
        try:
            for filename, data in files.items():
                if filename.endswith(".pt"):
                    R.check_flat_state_dict(filename, data)
            if kind == branches.KIND:  # store the rebuilt branch and a meta the server builds
                R.run_validator(kind, files, required=True)
                files = branches.canonical_files(files)
                factory_meta = branches.check_factory(reg, files)
                meta = branches.server_meta(meta, files, factory_meta, site)
            with _push_lock(reg.root):
                self._reg_check_owner(reg, kind, name, site)  # again, now that pushes are serialised
                return reg.publish(kind, name, files, meta, require_validator=True)
        except RegistryError as exc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, str(exc)) from None

    @staticmethod
    def _reg_check_owner(reg: Registry, kind: str, name: str, site: str) -> None:
        current = owner(reg, kind, name)
        if current is None or current == site:
            return
        who = f"site {current!r}" if current else "the coordinator"
        raise _Refusal(HTTPStatus.FORBIDDEN, f"{kind}/{name} belongs to {who}; only it may add versions (push under another name)")

    def _reg_read_push(self) -> tuple[dict[str, bytes], dict]:
        """The pushed files (decoded) and meta; _Refusal for anything malformed. Reads the body."""
        raw_length = self.headers.get("Content-Length")
        if raw_length is None:
            raise _Refusal(HTTPStatus.LENGTH_REQUIRED, "a push needs a Content-Length")
        try:
            length = int(raw_length)
        except ValueError:
            length = -1
        if length < 0:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        if length > self.registry_max_push_bytes:
            raise _Refusal(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"push body of {length} bytes is over the limit of {self.registry_max_push_bytes} bytes",
            )
        self._reg_body_read = True  # from here refusals need no draining (a timeout closes)
        body = self.read_body(length)
        if len(body) != length:
            raise _Refusal(HTTPStatus.BAD_REQUEST, f"push body cut short ({len(body)} of {length} bytes)")
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, f"push body is not JSON ({exc})") from None
        except RecursionError:
            raise _Refusal(HTTPStatus.BAD_REQUEST, f"push body nests too deeply; at most {MAX_JSON_DEPTH} levels") from None
        finally:
            del body
        if json_depth(doc) > MAX_JSON_DEPTH:
            raise _Refusal(HTTPStatus.BAD_REQUEST, f"push body nests more than {MAX_JSON_DEPTH} levels deep")
        if not isinstance(doc, dict) or set(doc) - _PUSH_KEYS or "files" not in doc:
            raise _Refusal(HTTPStatus.BAD_REQUEST, 'push body must be {"files": {name: base64, ...}, "meta": {...}}')
        raw_files, meta = doc["files"], doc.get("meta") or {}
        if not isinstance(raw_files, dict) or not raw_files:
            raise _Refusal(HTTPStatus.BAD_REQUEST, "push has no files")
        if len(raw_files) > MAX_PUSH_FILES:
            raise _Refusal(HTTPStatus.BAD_REQUEST, f"push has {len(raw_files)} files; at most {MAX_PUSH_FILES}")
        if not isinstance(meta, dict):
            raise _Refusal(HTTPStatus.BAD_REQUEST, f"push meta must be a JSON object, got {type(meta).__name__}")
        files = {}
        for filename, text in raw_files.items():
            try:
                R._check_filename(filename)
            except RegistryError as exc:
                raise _Refusal(HTTPStatus.BAD_REQUEST, str(exc)) from None
            if not isinstance(text, str):
                raise _Refusal(HTTPStatus.BAD_REQUEST, f"{filename}: content must be a base64 string")
            try:
                files[filename] = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise _Refusal(HTTPStatus.BAD_REQUEST, f"{filename}: content is not valid base64") from None
        return files, dict(meta)


def make_registry_handler(home: str | Path, api_token: str | None = None, max_push_bytes: int = MAX_PUSH_BYTES, limits: HTTPLimits | None = None):
    """A handler class serving only the registry routes of `home`."""

    class RegistryHandler(RegistryRoutes, BaseHTTPRequestHandler):
        server_version = "fedimg-registry"
        registry_home = Path(home)
        registry_api_token = api_token
        registry_max_push_bytes = max_push_bytes

        def log_message(self, fmt, *args):  # request lines stay out of logs
            pass

        def do_GET(self):  # noqa: N802
            self.handle_registry("GET")

        def do_POST(self):  # noqa: N802
            self.handle_registry("POST")

    if limits is not None:
        RegistryHandler.limits = limits
    return RegistryHandler


def serve_registry(
    home: str | Path,
    host: str = "127.0.0.1",
    port: int = 0,
    api_token: str | None = None,
    max_push_bytes: int = MAX_PUSH_BYTES,
    limits: HTTPLimits | None = None,
) -> LimitedHTTPServer:
    """Serve the registry routes of `home` in a background thread; return the server
    (``server.server_address`` has the port; stop with ``shutdown()`` then ``server_close()``).
    `limits`: timeouts, thread bound and backlog (``coordinator.http_limits``)."""
    httpd = LimitedHTTPServer((host, port), make_registry_handler(home, api_token, max_push_bytes, limits), limits)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="registry", daemon=True).start()
    return httpd
