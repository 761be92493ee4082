"""Site approval of executable artifacts: nothing beyond plain tensors loads without it.

Details: docs/design/site-boundary.md, "Executable artifacts approved by sha256".
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from fedimg_core import atomic
from pipelines.terminal_text import escape_controls

STORE_ENV = "FEDIMG_ARTIFACT_STORE"
STORE_FILE = "artifacts.json"
KINDS = ("torchscript", "pickle")
STATUSES = ("pending", "approved", "rejected")
MAX_REQUESTS = 20  # per artifact: the newest requests are kept, the file stays small
MAX_ARTIFACT_BYTES = 2 * 1024**3  # read into memory once; a bigger file is refused
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ORIGIN_KEYS = ("setting", "plan_class", "plan_source_sha256", "run_id", "round", "job", "path", "registry")
# What a recorded origin value may look like (it is printed to staff); a value that does not
# fit is kept only as an escaped, cut "invalid: ..." so the record still shows something came.
_ORIGIN_PATTERNS = {
    "setting": re.compile(r"^[A-Za-z0-9_.:\- ]{1,120}$"),
    "plan_class": re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}$"),
    "plan_source_sha256": _HEX64,
    "run_id": re.compile(r"^[A-Za-z0-9_.\-]{1,200}$"),
    "round": re.compile(r"^[0-9]{1,9}$"),
    "job": re.compile(r"^[A-Za-z0-9_.:\- ]{1,120}$"),
}
_REGISTRY_KEYS = ("kind", "name", "version", "published_by", "published_at")
MAX_TEXT = 200  # characters kept of a free-text origin value (path, registry fields)

__all__ = [
    "ApprovalStore",
    "ArtifactNotApproved",
    "ArtifactStoreError",
    "ArtifactUnavailable",
    "KINDS",
    "STORE_ENV",
    "load_approved_bytes",
    "registry_source",
    "store_dir",
]


class ArtifactStoreError(RuntimeError):
    """The approval store is unreadable or an argument is invalid; the message names the file."""


class ArtifactNotApproved(PermissionError):
    """An artifact the site has not approved (or has rejected) was about to be loaded.

    Attributes: ``sha256``, ``kind``, ``status`` (``pending``, ``rejected`` or ``no_store``),
    ``path`` and ``disclose``: whether the sha256 and status may be reported to the
    coordinator (only when the requester declared that very sha256, so the report tells it
    nothing it did not know about the site's files); the message says how staff approve it.
    """

    code = "artifact_not_approved"

    def __init__(self, sha256: str, kind: str, status: str, path: str | os.PathLike[str], store: Path | None):
        self.sha256, self.kind, self.status, self.path = sha256, kind, status, str(path)
        self.disclose = False
        if status == "no_store":
            msg = (f"{path}: {kind} artifact sha256 {sha256} cannot be loaded: no artifact approval store "
                   f"(${STORE_ENV} is not set; the site agent sets it for the node and its jobs)")  # fmt: skip
        elif status == "rejected":
            msg = f"{path}: {kind} artifact sha256 {sha256} was rejected by this site ({store / STORE_FILE if store else STORE_FILE})"
        else:
            msg = (f"{path}: {kind} artifact sha256 {sha256} is not approved by this site; the request is recorded, "
                   f"review it with `site-agent artifacts show {sha256[:12]}` and approve it with "
                   f"`site-agent artifacts approve {sha256}`")  # fmt: skip
        super().__init__(msg)


class ArtifactUnavailable(ArtifactNotApproved):
    """The artifact cannot be considered at all: the file is missing, too big, or its content
    differs from the sha256 the requester declared. Reported to the coordinator exactly like
    an unapproved artifact (same code, no sha256), so a request cannot probe which files a
    site holds; the reason is in the message, which stays in the site's log."""

    def __init__(self, path: str | os.PathLike[str], kind: str, reason: str):
        PermissionError.__init__(self, f"{path}: {kind} artifact cannot be loaded: {reason}")
        self.sha256, self.kind, self.status, self.path, self.disclose = "", kind, "pending", str(path), False


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def store_dir(work_dir: str | os.PathLike[str]) -> Path:
    """Where a site keeps its approval store.

    Args:
        work_dir: the site's work folder.

    Returns:
        ``<work_dir>/artifacts``.
    """
    return Path(work_dir) / "artifacts"


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _HEX64.match(sha256.lower()):
        raise ArtifactStoreError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha256.lower()


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ArtifactStoreError(f"artifact kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def registry_source(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The registry entry a pulled file came from, read from the ``artifact.json`` next to it.

    Args:
        path: the artifact file.

    Returns:
        ``kind``, ``name``, ``version``, ``published_by``, ``published_at`` (those present, escaped
        for a terminal), or None for a file that did not come from the registry.
    """
    record_file = Path(path).parent / "artifact.json"
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    out = {k: record.get(k) for k in _REGISTRY_KEYS if record.get(k) is not None}
    return {k: escape_controls(v, limit=MAX_TEXT) for k, v in out.items()} or None


def _clean_origin(origin: Mapping[str, Any] | None) -> dict[str, Any]:
    """The origin keys a request records, each checked (identifiers) or escaped and cut (text):
    they come from plan arguments and registry records, and staff read them on a terminal."""
    clean: dict[str, Any] = {}
    for k in _ORIGIN_KEYS:
        v = origin.get(k) if origin else None
        if v is None:
            continue
        if k == "registry":
            if isinstance(v, Mapping):
                reg = {rk: escape_controls(v[rk], limit=MAX_TEXT) for rk in _REGISTRY_KEYS if v.get(rk) is not None}
                if reg:
                    clean[k] = reg
        elif k == "path":
            clean[k] = escape_controls(v, limit=MAX_TEXT * 2)
        elif isinstance(v, (str, int)) and not isinstance(v, bool) and _ORIGIN_PATTERNS[k].match(str(v)):
            clean[k] = v
        else:
            clean[k] = "invalid: " + escape_controls(v, limit=60)
    return clean


class ApprovalStore:
    """The site's approved-artifacts store (one JSON file, written atomically under a lock).

    Args:
        root: the store's folder (created on first write), e.g. `store_dir(work_dir)`.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self.path = self.root / STORE_FILE

    def __repr__(self) -> str:
        return f"ApprovalStore({str(self.root)!r})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApprovalStore | None:
        """The store named by ``$FEDIMG_ARTIFACT_STORE``.

        Args:
            env: the environment to read (default ``os.environ``).

        Returns:
            The store, or None when the variable is not set.
        """
        value = (os.environ if env is None else env).get(STORE_ENV, "").strip()
        return cls(value) if value else None

    # -- file ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock across processes (the node records requests while staff decide);
        `filelock` (flock on Unix) on ``<store>/.lock``."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / ".lock"):
            yield

    def _read(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"version": 1, "artifacts": {}}
        except (OSError, ValueError) as exc:
            raise ArtifactStoreError(f"{self.path}: unreadable approval store ({exc}); restore it from a backup or remove it "
                                     "(every artifact is then unapproved)") from None  # fmt: skip
        if not isinstance(doc, dict) or not isinstance(doc.get("artifacts"), dict):
            raise ArtifactStoreError(f"{self.path}: not an approval store (no 'artifacts' mapping)")
        return doc

    def _write(self, doc: dict[str, Any]) -> None:
        atomic.write_json(self.path, doc)

    # -- reading ---------------------------------------------------------------------------

    def records(self, status: str | None = None) -> list[dict[str, Any]]:
        """Every artifact record, newest request first.

        Args:
            status: only the records with this status (None: all).

        Returns:
            The records.

        Raises:
            ArtifactStoreError: an unknown status or an unreadable store.
        """
        if status is not None and status not in STATUSES:
            raise ArtifactStoreError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        rows = [r for r in self._read()["artifacts"].values() if isinstance(r, dict)]
        rows = [r for r in rows if status is None or r.get("status") == status]
        return sorted(rows, key=lambda r: str(r.get("last_requested") or r.get("decision", {}).get("at") or ""), reverse=True)

    def get(self, sha256: str) -> dict[str, Any] | None:
        """The record of `sha256`.

        Args:
            sha256: the artifact's full sha256.

        Returns:
            Its record, or None when the store has none.

        Raises:
            ArtifactStoreError: a malformed sha256 or an unreadable store.
        """
        record: dict[str, Any] | None = self._read()["artifacts"].get(_check_sha(sha256))
        return record

    def resolve(self, prefix: str) -> str:
        """The full sha256 a unique prefix (at least 6 hex digits) of a known artifact names.

        Args:
            prefix: a sha256 or a prefix of one.

        Returns:
            The full sha256.

        Raises:
            ArtifactStoreError: unknown, ambiguous or malformed prefix.
        """
        p = (prefix or "").strip().lower()
        if _HEX64.match(p):
            return p
        if not re.fullmatch(r"[0-9a-f]{6,63}", p):
            raise ArtifactStoreError(f"{prefix!r}: expected a sha256 or a prefix of at least 6 hex digits")
        hits: list[str] = [s for s in self._read()["artifacts"] if s.startswith(p)]
        if not hits:
            raise ArtifactStoreError(f"{prefix!r}: no artifact with this sha256 prefix in {self.path} (see `site-agent artifacts list`)")
        if len(hits) > 1:
            raise ArtifactStoreError(f"{prefix!r}: matches {len(hits)} artifacts ({', '.join(h[:12] for h in hits)}); give more digits")
        return hits[0]

    def status(self, sha256: str) -> str:
        """The decision on `sha256`.

        Args:
            sha256: the artifact's full sha256.

        Returns:
            ``approved``, ``rejected``, ``pending`` or ``unknown``.
        """
        record = self.get(sha256)
        status: str = record.get("status", "unknown") if record else "unknown"
        return status

    def for_plan(self, source_sha256: str) -> list[dict[str, Any]]:
        """The records a plan requested, each with only that plan's requests.

        Args:
            source_sha256: the sha256 of the plan's shipped source (`pipelines.plans.reporting.plan_source_sha256`).

        Returns:
            The records, newest request first.
        """
        out = []
        for r in self.records():
            reqs = [q for q in r.get("requests", []) if q.get("origin", {}).get("plan_source_sha256") == source_sha256]
            if reqs:
                out.append({**r, "requests": reqs})
        return out

    # -- writing ---------------------------------------------------------------------------

    def request(self, sha256: str, kind: str, origin: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Record that something asked to load `sha256`; a new artifact becomes ``pending``.

        A request equal to a recorded one (same origin) only updates its time and count.

        Args:
            sha256: the artifact's full sha256.
            kind: one of `KINDS`.
            origin: who asks and where the file came from (each value checked or escaped).

        Returns:
            The updated record.

        Raises:
            ArtifactStoreError: a malformed sha256, an unknown kind or an unreadable store.
        """
        sha256, kind = _check_sha(sha256), _check_kind(kind)
        clean = _clean_origin(origin)
        now = _now()
        with self._locked():
            doc = self._read()
            record: dict[str, Any] = doc["artifacts"].setdefault(
                sha256, {"sha256": sha256, "kinds": [], "status": "pending", "requests": [], "first_requested": now}
            )
            if kind not in record["kinds"]:
                record["kinds"].append(kind)
            same: dict[str, Any] | None = next((q for q in record["requests"] if q.get("origin") == clean and q.get("kind") == kind), None)
            if same is None:
                same = {"kind": kind, "origin": clean, "first": now, "count": 0}
                record["requests"].append(same)
            same["last"], same["count"] = now, int(same.get("count", 0)) + 1
            record["requests"] = sorted(record["requests"], key=lambda q: q["last"])[-MAX_REQUESTS:]
            record["last_requested"] = now
            self._write(doc)
            return record

    def decide(self, sha256: str, approve: bool, note: str | None = None, by: str | None = None, kind: str | None = None) -> dict[str, Any]:
        """Approve or reject `sha256` (an artifact not requested yet can be approved ahead).

        Args:
            sha256: the artifact's full sha256.
            approve: True approves, False rejects.
            note: why (kept in the record).
            by: who decided (default: the user running the command).
            kind: the artifact's kind when nothing has requested it yet.

        Returns:
            The updated record.
        """
        sha256 = _check_sha(sha256)
        if kind is not None:
            _check_kind(kind)
        with self._locked():
            doc = self._read()
            record: dict[str, Any] | None = doc["artifacts"].get(sha256)
            if record is None:
                record = {"sha256": sha256, "kinds": [], "requests": []}
                doc["artifacts"][sha256] = record
            if kind and kind not in record["kinds"]:
                record["kinds"].append(kind)
            record["status"] = "approved" if approve else "rejected"
            record["decision"] = {"status": record["status"], "by": by or _user(), "at": _now(), "note": note or ""}
            self._write(doc)
            return record

    def check(self, data: bytes, kind: str, path: str | os.PathLike[str], origin: Mapping[str, Any] | None = None,
              disclose: bool = False, digest: str | None = None) -> str:  # fmt: skip
        """The sha256 of `data` when the site approved it; otherwise raise.

        Every call is recorded as a request (who asked, where the file came from), so staff
        see what each plan loaded, approved or not; a new artifact becomes pending.

        Args:
            data: the artifact's bytes.
            kind: one of `KINDS`.
            path: where they were read (recorded).
            origin: who asks (recorded, see `request`).
            disclose: set on the refusal (see `ArtifactNotApproved`).
            digest: the sha256 of `data` when the caller has it already (artifacts reach 2 GiB).

        Raises:
            ArtifactNotApproved: pending or rejected.
        """
        digest = digest or hashlib.sha256(data).hexdigest()
        origin = {**(origin or {}), "path": str(path)}
        source = registry_source(path)
        if source:
            origin["registry"] = source
        try:
            status = self.request(digest, kind, origin).get("status", "pending")
        except OSError:  # a store the node cannot write to: the decision still counts
            status = self.status(digest)
        if status == "approved":
            return digest
        refusal = ArtifactNotApproved(digest, kind, "rejected" if status == "rejected" else "pending", path, self.root)
        refusal.disclose = disclose
        raise refusal


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def load_approved_bytes(path: str | os.PathLike[str], kind: str, origin: Mapping[str, Any] | None = None,
                        store: ApprovalStore | None = None, expected_sha256: str | None = None) -> tuple[bytes, str]:  # fmt: skip
    """Read `path` once and return ``(bytes, sha256)`` when the site approved that content.

    Deserialise the returned bytes (e.g. ``torch.jit.load(io.BytesIO(data))``), never the
    path again: the file checked is then the file loaded.

    Args:
        path: the artifact file.
        kind: one of `KINDS`.
        origin: who asks (plan class, run id, plan setting, job); recorded with a request.
        store: the approval store; default ``$FEDIMG_ARTIFACT_STORE``.
        expected_sha256: the sha256 the requester declared: content that differs is refused
            before anything is recorded; a refusal of matching content may report its sha256
            and status to the coordinator (``disclose``), no other refusal does.

    Raises:
        ArtifactUnavailable: missing or unreadable file, over `MAX_ARTIFACT_BYTES`, or content
            other than `expected_sha256` (nothing is recorded).
        ArtifactNotApproved: not approved (a pending request is recorded), rejected, or no store.
    """
    _check_kind(kind)
    expected = _check_sha(expected_sha256) if expected_sha256 is not None else None
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ArtifactUnavailable(path, kind, f"the file cannot be read ({exc.strerror or exc})") from None
    if size > MAX_ARTIFACT_BYTES:
        raise ArtifactUnavailable(path, kind, f"{size} bytes is over the {MAX_ARTIFACT_BYTES}-byte limit of an executable artifact")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactUnavailable(path, kind, f"the file cannot be read ({exc.strerror or exc})") from None
    digest = hashlib.sha256(data).hexdigest()
    if expected is not None and digest != expected:
        raise ArtifactUnavailable(path, kind, f"its sha256 {digest} differs from the declared {expected}")
    store = store if store is not None else ApprovalStore.from_env()
    if store is None:
        refusal = ArtifactNotApproved(digest, kind, "no_store", path, None)
        refusal.disclose = expected is not None
        raise refusal
    return data, store.check(data, kind, path, origin, disclose=expected is not None, digest=digest)
