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
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path

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


class Coordinator:
    """The service's run queue: accepts specs and resumes, runs queued runs one at a time.

    Args:
        home: the coordinator home (its ``runs/`` hold the queue).
        federation: the `coordinator.engine.Federation` that runs them.
    """

    def __init__(self, home: Path, federation):
        self.home = Path(home)
        self.federation = federation
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.current: str | None = None
        self.lock = threading.Lock()  # serialises queue changes (submit/resume vs. the runner)

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
            state = runs.read_state(run_dir)
            if state["status"] not in ("interrupted", "failed"):
                raise UserError(f"run {run_dir.name} is {state['status']}; only interrupted or failed runs resume")
            if runs.latest_breakpoint(run_dir) is None:
                raise UserError(f"run {run_dir.name} has no breakpoint (it never completed a round); submit it again")
            runs.update_state(run_dir, status="queued", resume=True)
        self.wake.set()
        return run_dir.name

    def _next_queued(self) -> Path | None:
        with self.lock:
            for info in runs.list_runs(self.home):
                if info["status"] == "queued":
                    return Path(info["run_dir"])
        return None

    def loop(self) -> None:
        """Run queued runs in order until ``stopping`` is set (stale 'running' runs are marked interrupted first)."""
        for run_id in runs.recover_stale(self.home):
            log.info("run %s was interrupted by a previous stop; `coordinator resume %s` continues it", run_id, run_id)
        log.info("coordinator ready: sites connect to %s", self.federation.address)
        while not self.stopping.is_set():
            run_dir = self._next_queued()
            if run_dir is None:
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
        try:
            parsed = spec_mod.load(runs.spec_file(run_dir))
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


def serve(home: Path, grpc_host: str, grpc_port: int, api_host: str, api_port: int, public_host=None) -> None:
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
    """
    from coordinator.engine import Federation  # deferred: start-up time (Fed-BioMed and torch)

    home = Path(home).resolve()
    token = api_token(home)
    federation = Federation(home, host=grpc_host, port=grpc_port, public_host=public_host, log=logging.getLogger("coordinator.engine").info)
    coord = Coordinator(home, federation)
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
