"""Bounds that keep the coordinator's HTTP servers (API and registry) up under bad or hostile clients.

``HTTPLimits`` (the numbers), ``LimitedRequestMixin`` (timeouts, capped JSON error replies),
``json_depth`` / ``yaml_depth_problem`` (nesting bounds), ``cap_error``. The server that gates
connections is `coordinator.http_server`. What each bounds and why: docs/design/http-service.md.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING

import yaml

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000  # characters of an error message sent back
MAX_ERROR_BYTES = 4096  # bytes of the JSON error reply (escapes included)
MAX_JSON_DEPTH = 20
MAX_YAML_DEPTH = 64
MAX_HEAD_BYTES = 128 * 1024  # request line and headers the gate waits for (http.server allows 64 KiB a line)
GATE_BODY_BYTES = 64 * 1024  # bodies up to this size arrive in the gate too, before a thread is used


@dataclass(frozen=True)
class HTTPLimits:
    """Bounds of one server (see the module docstring); tests shorten the timeouts.

    Args:
        op_timeout: seconds one socket read or write may stall.
        header_timeout: seconds from accepting a connection until its request line and headers
            (and a body of up to ``GATE_BODY_BYTES``) have arrived; idle ones are then closed.
        body_timeout: seconds for a larger request body, plus its size at ``body_min_rate``.
        body_min_rate: bytes per second a body upload must sustain.
        max_threads: handler threads at once; more complete requests queue in the gate.
        queue_size: the listen backlog.
        max_waiting: connections the gate holds while their requests arrive.
        per_client_waiting: of those, from one client address (the oldest is closed first).
        per_client_threads: handler threads one client address may hold at once.
    """

    op_timeout: float = 30.0
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    body_min_rate: float = 256 * 1024
    max_threads: int = 32
    queue_size: int = 128
    max_waiting: int = 256
    per_client_waiting: int = 32
    per_client_threads: int = 8


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
    cannot hold the thread past the deadline. Bytes the gate already received come first."""

    def __init__(self, sock: socket.socket, handler: LimitedRequestMixin, received: bytes = b""):
        super().__init__()
        self._sock = sock
        self._handler = handler
        self._received = memoryview(received)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._received:
            n = min(len(buffer), len(self._received))
            buffer[:n] = self._received[:n]
            self._received = self._received[n:]
            return n
        left = self._handler._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(min(self._handler.limits.op_timeout, left))
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._handler.limits.op_timeout)  # writes keep the per-operation timeout


if TYPE_CHECKING:  # the mixin is always combined with a BaseHTTPRequestHandler: type-check it as one
    _HandlerBase = BaseHTTPRequestHandler
else:
    _HandlerBase = object


class LimitedRequestMixin(_HandlerBase):
    """Mixin for a ``BaseHTTPRequestHandler``: deadlines, capped JSON error replies and a
    safety net for unexpected exceptions (see the module docstring). Set ``limits`` on the
    handler class; read request bodies with ``read_body``; answer with ``json_reply``."""

    limits: HTTPLimits = DEFAULT_LIMITS

    def setup(self) -> None:
        """Set up the connection: per-operation timeout, the header deadline, and a body reader that honours the deadlines."""
        self.timeout = self.limits.op_timeout  # type: ignore[misc]  # per connection, from this handler class's limits (read by setup)
        super().setup()
        self._deadline = time.monotonic() + self.limits.header_timeout
        self._reply_started = False
        self.rfile.close()  # replaced by a reader that honours the deadline
        take = getattr(self.server, "take_received", None)
        received = take(self.connection) if take else b""
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self, received))

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
        """Start a reply (and note that one started: the safety net then sends no second one).

        Args:
            code: the HTTP status.
            message: the reason phrase (default: the status's own).
        """
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
        """Answer an error as one capped JSON line (not the standard HTML page), then close.

        The standard HTML error page quotes the request line back; every other error is
        answered this way too.

        Args:
            code: the HTTP status.
            message: the error message (default: the status's phrase).
            explain: unused (the standard page's long text).
        """
        self.close_connection = True
        try:
            self.json_reply(code, {"error": message or HTTPStatus(code).phrase})
        except OSError:
            pass

    def handle_one_request(self) -> None:
        """Handle one request; a stalled or vanished client closes the connection, any other exception is logged and answered 500."""
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
