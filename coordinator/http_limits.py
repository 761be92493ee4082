"""Limits that keep the coordinator's HTTP servers up under bad or hostile clients.

The researcher API (``coordinator.service``) and the registry (``coordinator.registry_http``)
need a valid token, but a token holder (or a broken client) must still not be able to take
the process that hosts the federation down. Everything here bounds one resource:

- ``LimitedHTTPServer``: a listen backlog of ``queue_size`` (the standard library's 5 resets
  connections under a burst of submits) and at most ``max_threads`` handler threads; further
  connections wait in the backlog instead of each starting a thread;
- ``LimitedRequestMixin`` (for a ``BaseHTTPRequestHandler``): every socket operation times
  out after ``op_timeout`` seconds, the request line and headers must arrive within
  ``header_timeout`` seconds in total and a body within ``body_timeout`` plus its size at
  ``body_min_rate`` (a half-open or trickling connection frees its thread); every error reply
  is one JSON object whose message is cut to ``MAX_ERROR_CHARS`` (input is never echoed back
  whole); an unexpected exception answers 500 with a one-line error and is logged here, the
  server keeps serving;
- ``json_depth`` and ``yaml_depth_problem``: nesting bounds checked before anything recursive
  walks the input (deeply nested JSON or YAML otherwise ends in a RecursionError).
"""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import ThreadingHTTPServer

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000  # characters of an error message sent back
MAX_ERROR_BYTES = 4096  # bytes of the JSON error reply (escapes included)
MAX_JSON_DEPTH = 20
MAX_YAML_DEPTH = 64


@dataclass(frozen=True)
class HTTPLimits:
    """Bounds of one server (see the module docstring); tests shorten the timeouts.

    Args:
        op_timeout: seconds one socket read or write may stall.
        header_timeout: seconds for the request line and headers, in total.
        body_timeout: seconds for a request body, plus its size at ``body_min_rate``.
        body_min_rate: bytes per second a body upload must sustain.
        max_threads: handler threads at once; more connections wait in the backlog.
        queue_size: the listen backlog.
    """

    op_timeout: float = 30.0
    header_timeout: float = 30.0
    body_timeout: float = 60.0
    body_min_rate: float = 256 * 1024
    max_threads: int = 32
    queue_size: int = 128


DEFAULT_LIMITS = HTTPLimits()


def cap_error(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` as a string of at most about `limit` characters, saying how much was cut.

    Args:
        text: the error message (any object; ``str()`` is taken).
        limit: characters kept.

    Returns:
        The message, or its start followed by ``... [N more characters cut]``.
    """
    text = str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"


def json_depth(obj: object, stop: int = MAX_JSON_DEPTH + 1) -> int:
    """How deeply lists and dicts nest in `obj` (0 for a scalar), counted without recursion.

    Args:
        obj: a parsed JSON document.
        stop: stop counting once this depth is reached (the answer is then ``stop``).

    Returns:
        The nesting depth, at most ``stop``.
    """
    deepest, stack = 0, [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            depth += 1
            deepest = max(deepest, depth)
            if deepest >= stop:
                return stop
            stack.extend((v, depth) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def yaml_depth_problem(text: str, limit: int = MAX_YAML_DEPTH) -> str | None:
    """Why `text` nests too deeply to be parsed, or None. Counts block and flow collections
    from YAML's tokens (an iterative scan, libyaml's when available), so nothing recursive
    sees the input first; syntax errors are left to the real parser, which names them.

    Args:
        text: the YAML document.
        limit: deepest nesting allowed.

    Returns:
        A one-line problem naming the line, or None when the nesting is within `limit`.
    """
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    opening = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
    closing = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    depth = 0
    try:
        for token in yaml.scan(text, Loader=loader):
            if isinstance(token, opening):
                depth += 1
                if depth > limit:
                    line = token.start_mark.line + 1 if token.start_mark else "?"
                    return f"nests more than {limit} levels deep (line {line}); flatten it"
            elif isinstance(token, closing):
                depth -= 1
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        if "nesting depth" in str(getattr(exc, "problem", "")):  # libyaml's own bound, met while looking ahead
            return f"nests more than {limit} levels deep (line {mark.line + 1 if mark else '?'}); flatten it"
        return None  # the parser reports the syntax error with its position
    return None


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that gives up at the handler's deadline: each receive waits at
    most the time left (and at most ``op_timeout``), so a client trickling a byte at a time
    cannot hold the thread past the deadline."""

    def __init__(self, sock: socket.socket, handler: LimitedRequestMixin):
        super().__init__()
        self._sock = sock
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._handler._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(min(self._handler.limits.op_timeout, left))
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._handler.limits.op_timeout)  # writes keep the per-operation timeout


class LimitedRequestMixin:
    """Mixin for a ``BaseHTTPRequestHandler``: deadlines, capped JSON error replies and a
    safety net for unexpected exceptions (see the module docstring). Set ``limits`` on the
    handler class; read request bodies with ``read_body``; answer with ``json_reply``."""

    limits: HTTPLimits = DEFAULT_LIMITS

    def setup(self) -> None:
        self.timeout = self.limits.op_timeout
        super().setup()
        self._deadline = time.monotonic() + self.limits.header_timeout
        self._reply_started = False
        self.rfile.close()  # replaced by a reader that honours the deadline
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self))

    def read_body(self, length: int) -> bytes:
        """Read `length` bytes of request body within ``body_timeout`` plus the time the
        size takes at ``body_min_rate``; TimeoutError (the connection is then closed) if not.

        Args:
            length: the declared Content-Length (already checked against the route's limit).

        Returns:
            The bytes read (fewer when the client closed early).
        """
        self._deadline = time.monotonic() + self.limits.body_timeout + length / self.limits.body_min_rate
        return self.rfile.read(length)

    def send_response(self, code, message=None) -> None:
        self._reply_started = True
        super().send_response(code, message)

    def json_reply(self, status: int, body: dict) -> None:
        """Send `body` as JSON; an ``error`` message is cut to ``MAX_ERROR_CHARS``
        (and the reply to ``MAX_ERROR_BYTES``), so no error echoes its input whole."""
        if isinstance(body, dict) and "error" in body:
            message = cap_error(body["error"])
            data = json.dumps({**body, "error": message}, default=str).encode()
            while len(data) > MAX_ERROR_BYTES:  # escapes (non-ASCII, control characters) can grow it
                message = cap_error(message, len(message) // 2)
                data = json.dumps({**body, "error": message}, default=str).encode()
        else:
            data = json.dumps(body, default=str).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code, message=None, explain=None) -> None:
        # The standard HTML error page quotes the request line back; answer like every
        # other error instead: one capped JSON line, then close.
        self.close_connection = True
        try:
            self.json_reply(code, {"error": message or HTTPStatus(code).phrase})
        except OSError:
            pass

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):  # the client went away or stalled past a deadline
            self.close_connection = True
        except Exception:  # noqa: BLE001 - the server must keep serving; the traceback goes to our log
            log.exception("unexpected error answering %s %s", self.command, cap_error(getattr(self, "path", ""), 200))
            self.close_connection = True
            if not self._reply_started:
                try:
                    self.json_reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error answering this request (details in the coordinator's log)"})
                except OSError:
                    pass


class LimitedHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` with a listen backlog of ``limits.queue_size`` and at most
    ``limits.max_threads`` handler threads at once.

    Args:
        address: (host, port); port 0 picks a free one.
        handler: the request handler class.
        limits: the bounds (``DEFAULT_LIMITS`` when None).
    """

    daemon_threads = True

    def __init__(self, address, handler, limits: HTTPLimits | None = None):
        self.limits = limits or DEFAULT_LIMITS
        self.request_queue_size = self.limits.queue_size  # read by server_activate (listen)
        self._slots = threading.BoundedSemaphore(self.limits.max_threads)
        self._closing = threading.Event()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        # Wait for a free thread; meanwhile new connections queue in the listen backlog.
        while not self._slots.acquire(timeout=0.2):
            if self._closing.is_set():
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()
