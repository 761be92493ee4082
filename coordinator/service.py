"""`coordinator serve`: the long-running coordinator.

Details: docs/design/http-service.md, "`coordinator serve` and its routes".
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import signal
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Callable

from coordinator import runs
from coordinator import spec as spec_mod
from coordinator.http_limits import MAX_YAML_DEPTH, HTTPLimits, yaml_depth_problem
from coordinator.http_server import LimitedHTTPServer
from coordinator.registry_http import RegistryRoutes, is_registry_path
from fedimg_core import atomic
from fedimg_core.errors import UserError

log = logging.getLogger(__name__)
TOKEN_FILE = "api-token"
MAX_SPEC_BYTES = 256 * 1024
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")  # an id or prefix from the URL, never a path or glob


def _run_dir(home: Path, run_id: str) -> Path:
    """The run a URL names (full id or unique prefix); UserError when there is none."""
    if not _RUN_ID.match(run_id):
        raise UserError(f"no run {run_id[:80]!r}: run ids are letters, digits, '-', '_' and '.'")
    return runs.find_run(home, run_id)


def api_token(home: Path) -> str:
    """The API token: $FEDIMG_API_TOKEN, else <home>/api-token (created 0600 on first use)."""
    env = os.environ.get("FEDIMG_API_TOKEN")
    if env:
        return env
    path = Path(home) / TOKEN_FILE
    if not path.is_file():
        Path(home).mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, (secrets.token_urlsafe(32) + "\n").encode(), mode=0o600)
    return path.read_text().strip()


@dataclass(frozen=True)
class Recovery:
    """How `coordinator serve` recovers its runs by itself (docs/design/http-service.md, "Recovery").

    Args:
        max_auto_resumes: automatic resumes allowed per run (state.json ``auto_resumes``); 0 disables recovery.
        retry_wait_s: after an automatic resume, the least time before the next one of the same run.
        sites_poll_s: how often the sites are checked for a run that failed for lack of sites (queue idle only).
    """

    max_auto_resumes: int = 3
    retry_wait_s: float = 60.0
    sites_poll_s: float = 15.0


def recovery_action(state: dict, max_auto_resumes: int) -> tuple[str, str]:
    """What `coordinator serve` does by itself with a run, from its state alone.

    Only runs this service ran (``runner: serve``) recover: an interrupted run is re-queued
    at once; a run failed with ``error_kind: sites`` waits until enough sites are back; after
    ``max_auto_resumes`` automatic resumes a run is left for an operator. Any other run (done,
    queued, running, failed for another reason: a plan not approved, a site's error) is left alone.

    Args:
        state: the run's state record.
        max_auto_resumes: the service's limit (0: no automatic recovery).

    Returns:
        ``(action, reason)``: action ``"requeue"`` (go on now), ``"wait_sites"`` (go on once
        enough sites are connected), ``"exhausted"`` (would recover, but the limit is reached)
        or ``"none"``; reason is a few words for the log.
    """
    status = state.get("status")
    if status == "interrupted":
        why = "interrupted"
    elif status == "failed" and state.get("error_kind") == "sites":
        why = "failed for lack of sites"
    else:
        return "none", f"{status}" + (" (not for lack of sites)" if status == "failed" else "")
    if max_auto_resumes <= 0:
        return "none", "automatic recovery is off (--max-auto-resumes 0)"
    if state.get("runner") != "serve":
        return "none", f"{why}, but not run by `coordinator serve`"
    used = int(state.get("auto_resumes") or 0)
    if used >= max_auto_resumes:
        return "exhausted", f"{why}; {used} of {max_auto_resumes} automatic resumes used"
    return ("requeue" if status == "interrupted" else "wait_sites"), why


class Coordinator:
    """The service's run queue: accepts specs and resumes, runs queued runs one at a time,
    and recovers its interrupted runs and those that failed for lack of sites (`Recovery`).

    Args:
        home: the coordinator home (its ``runs/`` hold the queue).
        federation: the `coordinator.engine.Federation` that runs them (``matching_sites``
            is all recovery asks of it).
        recovery: the automatic recovery settings (default `Recovery()`).
        clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(self, home: Path, federation, recovery: Recovery | None = None, clock: Callable[[], float] = time.monotonic):
        self.home = Path(home)
        self.federation = federation
        self.recovery = recovery or Recovery()
        self.clock = clock
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.current: str | None = None
        self.lock = threading.Lock()  # serialises queue changes (submit/resume vs. the runner)
        self._not_before: dict[str, float] = {}  # run id -> no recovery step before this time
        self._told: dict[str, str] = {}  # run id -> the last decision logged (each is logged once)
        self._ran: set[str] = set()  # runs this process ran

    # -- queue ---------------------------------------------------------------------------

    def submit(self, text: str) -> str:
        """Queue a submitted spec as a new run.

        Args:
            text: the spec's YAML text.

        Returns:
            The new run's id.

        Raises:
            UserError: the spec does not validate (every problem listed).
        """
        parsed = spec_mod.parse(text, "submitted spec")
        with self.lock:
            run_dir = runs.new_run(self.home, text, parsed.name, resolved=parsed.resolved_raw())
        self.wake.set()
        return run_dir.name

    def resume(self, run_id: str) -> str:
        """Re-queue an interrupted or failed run to continue from its last breakpoint.

        Args:
            run_id: the run's id or id prefix.

        Returns:
            The run's id.

        Raises:
            UserError: no such run, a run that is not interrupted or failed, or one without a breakpoint.
        """
        with self.lock:
            run_dir = _run_dir(self.home, run_id)
            state = runs.shown_state(runs.read_state(run_dir))  # a 'running' run whose process died is interrupted
            if state["status"] not in ("interrupted", "failed"):
                raise UserError(f"run {run_dir.name} is {state['status']}; only interrupted or failed runs resume")
            if runs.latest_breakpoint(run_dir) is None:
                raise UserError(f"run {run_dir.name} has no breakpoint (it never completed a round); submit it again")
            # an operator's resume starts a new series of automatic ones
            runs.update_state(run_dir, status="queued", resume=True, auto_resumes=0, auto_recovery=None, error_kind=None)
        self.wake.set()
        return run_dir.name

    # -- automatic recovery ----------------------------------------------------------------

    def _tell(self, run_id: str, message: str, level: int = logging.INFO) -> None:
        """Log one recovery decision about a run, once (the loop re-checks every few seconds)."""
        if self._told.get(run_id) != message:
            self._told[run_id] = message
            log.log(level, "run %s: %s", run_id, message)

    def recover(self) -> list[str]:
        """One pass of automatic recovery over the runs (`recovery_action` decides each one).

        An interrupted run is re-queued; a run that failed for lack of sites is re-queued
        once ``federation.matching_sites(spec)`` finds the spec's ``min_sites`` (checked every
        ``sites_poll_s`` at most). A re-queued run resumes from its last complete breakpoint,
        or starts again in the same run directory when it has none (it never completed a round:
        nothing was aggregated, metrics.json has no round). Each re-queue counts in the run's
        ``auto_resumes``, and the run is not re-queued again before ``retry_wait_s``. A run
        whose automatic resumes are used up keeps its status, with ``auto_recovery`` saying so.

        Returns:
            The ids of the runs re-queued.
        """
        limit = self.recovery.max_auto_resumes
        requeued: list[str] = []
        base = runs.runs_dir(self.home)
        for run_dir in sorted(base.iterdir()) if base.is_dir() else []:
            if self.stopping.is_set():
                break
            if not (run_dir / "state.json").is_file():
                continue
            run_id = run_dir.name
            try:
                state = runs.read_state(run_dir)
            except UserError:
                continue
            action, why = recovery_action(state, limit)
            if action == "none":
                if run_id in self._ran and state.get("status") in ("interrupted", "failed"):
                    self._tell(run_id, f"not resumed automatically: {why}")  # runs of earlier processes: said then
                continue
            if action == "exhausted":
                note = f"not resumed automatically: {why} (`coordinator resume {run_id}` continues it)"
                if state.get("auto_recovery") != note:  # said once, in the log and in its state
                    log.warning("run %s: %s", run_id, note)
                    with self.lock:
                        runs.update_state(run_dir, auto_recovery=note)
                continue
            now = self.clock()
            if now < self._not_before.get(run_id, 0.0):
                continue
            if action == "wait_sites":
                try:
                    spec = spec_mod.load(runs.spec_file(run_dir))
                    found = len(self.federation.matching_sites(spec))
                except UserError as exc:
                    self._tell(run_id, f"not resumed automatically: its spec no longer loads ({exc})", logging.WARNING)
                    self._not_before[run_id] = now + self.recovery.retry_wait_s
                    continue
                except Exception as exc:  # noqa: BLE001 - a failed search is retried at the next poll
                    log.debug("run %s: site search failed: %s", run_id, exc)
                    found = 0
                    spec = None
                if spec is None or found < spec.min_sites:
                    need = spec.min_sites if spec is not None else "?"
                    self._tell(run_id, f"failed for lack of sites: waiting for {need} sites to resume it (checked every {self.recovery.sites_poll_s:g}s)")
                    self._not_before[run_id] = now + self.recovery.sites_poll_s
                    continue
                why = f"{found} of the {spec.min_sites} required sites are back"
            if self._requeue(run_dir, why):
                requeued.append(run_id)
        if requeued:
            self.wake.set()
        return requeued

    def _requeue(self, run_dir: Path, why: str) -> bool:
        """Re-queue a run for an automatic resume (or a new start without a breakpoint); False if it changed meanwhile."""
        with self.lock:
            state = runs.read_state(run_dir)
            action, _ = recovery_action(state, self.recovery.max_auto_resumes)
            if action not in ("requeue", "wait_sites"):
                return False  # an operator or another pass got there first
            used = int(state.get("auto_resumes") or 0) + 1
            bkpt = runs.latest_breakpoint(run_dir)
            runs.update_state(run_dir, status="queued", resume=bkpt is not None, auto_resumes=used, error_kind=None)
        self._not_before[run_dir.name] = self.clock() + self.recovery.retry_wait_s
        how = f"resumes from {bkpt.name}" if bkpt is not None else "starts again from round 1 (no complete round to resume from)"
        self._tell(run_dir.name, f"{why}: re-queued, {how} (automatic resume {used} of {self.recovery.max_auto_resumes})")
        return True

    def _next_queued(self) -> Path | None:
        with self.lock:
            for info in runs.list_runs(self.home):
                if info["status"] == "queued":
                    return Path(info["run_dir"])
        return None

    def loop(self) -> None:
        """Run queued runs in order until ``stopping`` is set.

        Runs left ``running`` by a process that died are marked interrupted first; while the
        queue is idle, `recover` re-queues what can go on by itself.
        """
        for run_id in runs.recover_stale(self.home):
            log.info("run %s: its coordinator process stopped during the run; marked interrupted", run_id)
        log.info("coordinator ready: sites connect to %s", self.federation.address)
        while not self.stopping.is_set():
            run_dir = self._next_queued()
            if run_dir is None:
                if self.recover():
                    continue
                self.wake.wait(timeout=2.0)
                self.wake.clear()
                continue
            self.run_one(run_dir)

    def run_one(self, run_dir: Path) -> None:
        """Run (or resume) one queued run; a user error marks it failed and the loop goes on.

        Args:
            run_dir: the run directory.
        """
        state = runs.read_state(run_dir)
        self.current = run_dir.name
        self._ran.add(run_dir.name)
        try:
            parsed = spec_mod.load(runs.spec_file(run_dir))
            runs.update_state(run_dir, runner="serve")  # this service recovers it if it stops (`recovery_action`)
            log.info("run %s: starting (%s)", run_dir.name, "resume" if state.get("resume") else "new")
            self.federation.run(run_dir, parsed, resume=bool(state.get("resume")))
            log.info("run %s: done", run_dir.name)
        except UserError as exc:
            if runs.read_state(run_dir)["status"] != "failed":  # e.g. a spec that no longer validates
                runs.mark(run_dir, "failed", error=str(exc))
            log.error("run %s: failed: %s", run_dir.name, exc)
        finally:
            with self.lock:  # a resume request may have re-queued the run meanwhile: keep its flag
                if runs.read_state(run_dir)["status"] != "queued":
                    runs.update_state(run_dir, resume=False)
            self._not_before[run_dir.name] = self.clock() + self.recovery.retry_wait_s  # no automatic resume right away
            self.current = None


def make_handler(coord: Coordinator, token: str, limits: HTTPLimits | None = None):
    """The request handler class of the API and registry routes (see the module docstring).

    Args:
        coord: the coordinator whose queue the API serves.
        token: the researcher API token.
        limits: timeouts and bounds (``coordinator.http_limits.DEFAULT_LIMITS`` when None).

    Returns:
        A ``BaseHTTPRequestHandler`` subclass.
    """

    class Handler(RegistryRoutes, BaseHTTPRequestHandler):
        server_version = "fedimg-coordinator"
        registry_home = coord.home
        registry_api_token = token

        def log_message(self, fmt, *args):  # keep request lines out of the run logs
            pass

        def _send(self, status: int, body: dict) -> None:
            self._reg_json(status, body)  # the registry mixin's JSON reply

        def _authorised(self) -> bool:
            given = self.headers.get("Authorization", "")
            if given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode("utf-8", "replace"), token.encode()):
                return True
            self._send(HTTPStatus.UNAUTHORIZED, {"error": "missing or wrong API token"})
            return False

        def do_GET(self):  # noqa: N802
            if is_registry_path(self.path):  # site tokens or the API token; checked there
                return self.handle_registry("GET")
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            if parts == ["health"]:
                queued = sum(1 for r in runs.list_runs(coord.home) if r["status"] == "queued")
                return self._send(200, {"status": "ok", "current_run": coord.current, "queued": queued})
            if not self._authorised():
                return
            try:
                if parts == ["runs"]:
                    return self._send(200, {"runs": runs.list_runs(coord.home)})
                if len(parts) == 2 and parts[0] == "runs":
                    run_dir = _run_dir(coord.home, parts[1])
                    return self._send(200, {**runs.summary(run_dir), "metrics": runs.read_metrics(run_dir)})
            except UserError as exc:
                return self._send(HTTPStatus.NOT_FOUND, {"error": str(exc)})
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path}"})

        def do_POST(self):  # noqa: N802
            if is_registry_path(self.path):
                return self.handle_registry("POST")
            if not self._authorised():
                return
            parts = [p for p in self.path.split("?")[0].split("/") if p]
            try:
                if parts == ["runs"]:
                    try:
                        length = int(self.headers.get("Content-Length") or 0)
                    except ValueError:
                        length = -1
                    if length < 0:
                        return self._send(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
                    if length > MAX_SPEC_BYTES:
                        self.close_connection = True  # the body is not read
                        return self._send(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"spec of {length} bytes is over the limit of {MAX_SPEC_BYTES} bytes"})
                    data = self.read_body(length)
                    if len(data) != length:
                        return self._send(HTTPStatus.BAD_REQUEST, {"error": f"spec cut short ({len(data)} of {length} bytes)"})
                    text = data.decode("utf-8", "replace")
                    problem = yaml_depth_problem(text, MAX_YAML_DEPTH)
                    if problem:
                        return self._send(HTTPStatus.BAD_REQUEST, {"error": f"submitted spec: {problem}"})
                    try:
                        run_id = coord.submit(text)
                    except RecursionError:  # nesting the scan above did not see (a parser's own recursion)
                        return self._send(HTTPStatus.BAD_REQUEST, {"error": "submitted spec: nests too deeply to read; flatten it"})
                    return self._send(HTTPStatus.CREATED, {"run_id": run_id})
                if len(parts) == 3 and parts[0] == "runs" and parts[2] == "resume":
                    return self._send(HTTPStatus.ACCEPTED, {"run_id": coord.resume(parts[1])})
            except UserError as exc:
                return self._send(HTTPStatus.BAD_REQUEST, {"error": str(exc)})
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint {self.path}"})

    if limits is not None:
        Handler.limits = limits
    return Handler


def make_server(coord: Coordinator, token: str, host: str, port: int, limits: HTTPLimits | None = None) -> LimitedHTTPServer:
    """The API's HTTP server, bound and listening but not yet serving.

    Args:
        coord: the coordinator whose queue the API serves.
        token: the researcher API token.
        host: address to bind.
        port: port to bind (0 picks a free one; see ``server_address``).
        limits: timeouts and bounds (``coordinator.http_limits.DEFAULT_LIMITS`` when None).

    Returns:
        The server; run ``serve_forever()`` in a thread, stop with ``shutdown()`` then
        ``server_close()``.
    """
    return LimitedHTTPServer((host, port), make_handler(coord, token, limits), limits)


def serve(home: Path, grpc_host: str, grpc_port: int, api_host: str, api_port: int, public_host=None,
          recovery: Recovery | None = None) -> None:  # fmt: skip
    """Run the long-lived coordinator: the Fed-BioMed server, the API and registry, the run queue.

    Progress lines go to this module's logger (and the engine's); returns after SIGTERM or
    Ctrl-C, once the API is shut down.

    Args:
        home: the coordinator home (created).
        grpc_host: address the Fed-BioMed server binds.
        grpc_port: port sites connect to.
        api_host: address of the researcher API.
        api_port: port of the researcher API.
        public_host: name sites dial (in the TLS certificate); None: derived from ``grpc_host``.
        recovery: automatic recovery settings (`Recovery`; default ``Recovery()``).
    """
    from coordinator.engine import Federation  # deferred: start-up time (Fed-BioMed and torch)

    home = Path(home).resolve()
    token = api_token(home)
    federation = Federation(home, host=grpc_host, port=grpc_port, public_host=public_host, log=logging.getLogger("coordinator.engine").info)
    coord = Coordinator(home, federation, recovery)
    if coord.recovery.max_auto_resumes > 0:
        log.info("automatic recovery: up to %d resumes per run, %gs apart", coord.recovery.max_auto_resumes, coord.recovery.retry_wait_s)
    else:
        log.info("automatic recovery is off (--max-auto-resumes 0): `coordinator resume ID` continues a run")
    httpd = make_server(coord, token, api_host, api_port)
    threading.Thread(target=httpd.serve_forever, name="api", daemon=True).start()
    log.info("API on http://%s:%s (token in %s or $FEDIMG_API_TOKEN)", api_host, api_port, home / TOKEN_FILE)
    log.info("registry on http://%s:%s/registry (sites use a token from `coordinator site-token issue SITE`)", api_host, api_port)

    def _stop(signum, frame):
        coord.stopping.set()
        coord.wake.set()
        raise KeyboardInterrupt  # interrupts a running experiment; its run becomes 'interrupted'

    signal.signal(signal.SIGTERM, _stop)
    try:
        coord.loop()
    except KeyboardInterrupt:
        log.info("coordinator stopping")
    finally:
        httpd.shutdown()
        httpd.server_close()
