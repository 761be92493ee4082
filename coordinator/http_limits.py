"""Limits that keep the coordinator's HTTP servers (API and registry) up under bad or hostile clients.

``LimitedHTTPServer`` (gated accept, bounded threads), ``LimitedRequestMixin`` (timeouts, capped JSON error
replies), ``json_depth`` / ``yaml_depth_problem`` (nesting bounds). What each bounds and why: docs/design/http-service.md.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import re
import selectors
import socket
import socketserver
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


_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(\d{1,15})[ \t]*\r?$", re.IGNORECASE | re.MULTILINE)


def request_arrived(data: bytes | bytearray) -> bool | None:
    """Whether `data`, the start of a connection, holds a whole request head (and its body
    when that declares at most ``GATE_BODY_BYTES``).

    Args:
        data: the bytes received so far.

    Returns:
        True when a handler can take it, False while more is to come, None when the head
        is over ``MAX_HEAD_BYTES`` without ending.
    """
    ends = [i + len(sep) for sep in (b"\n\r\n", b"\n\n") if (i := data.find(sep, 0, MAX_HEAD_BYTES + 3)) >= 0]
    if not ends:
        return None if len(data) > MAX_HEAD_BYTES else False
    end = min(ends)
    match = _CONTENT_LENGTH.search(data, 0, end)
    length = int(match.group(1)) if match else 0
    return length > GATE_BODY_BYTES or len(data) - end >= length  # larger bodies are the handler's (body_timeout)


class _Waiting:
    """A connection in the gate: what it sent so far and when it must have sent its request."""

    __slots__ = ("sock", "address", "client", "data", "deadline")

    def __init__(self, sock: socket.socket, address, deadline: float):
        self.sock = sock
        self.address = address
        self.client = address[0] if isinstance(address, tuple) and address else str(address)
        self.data = bytearray()
        self.deadline = deadline


class _Gate:
    """The waiting room of a ``LimitedHTTPServer``: one thread and a selector hold accepted
    connections until their request has arrived, then hand them to handler threads. The
    accept thread and finishing handler threads only queue work and wake it; everything else
    runs on the gate's thread."""

    def __init__(self, server: LimitedHTTPServer):
        self._server = server
        self._limits = server.limits
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._incoming: collections.deque[_Waiting] = collections.deque()  # from the accept thread
        self._waiting: dict[socket.socket, _Waiting] = {}  # insertion order: oldest first
        self._ready: collections.deque[_Waiting] = collections.deque()
        self._threads_of: collections.Counter[str] = collections.Counter()  # guarded by _lock
        self._dropped = 0  # idle connections closed since the last warning
        self._warned = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http-gate", daemon=True)
        self._thread.start()

    # -- called from other threads -------------------------------------------------------
    def add(self, sock: socket.socket, address) -> None:
        with self._lock:
            self._incoming.append(_Waiting(sock, address, time.monotonic() + self._limits.header_timeout))
        self._wake()

    def handler_done(self, client: str) -> None:
        with self._lock:
            self._threads_of[client] -= 1
            if self._threads_of[client] <= 0:
                del self._threads_of[client]
        self._wake()

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the pipe is full (a wake-up is pending anyway) or closed
            pass

    # -- the gate's thread ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_incoming()
                self._expire()
                self._dispatch()
                timeout = 1.0
                if self._waiting:
                    timeout = min(timeout, max(0.0, next(iter(self._waiting.values())).deadline - time.monotonic()))
                for key, _ in self._selector.select(timeout):
                    if key.data is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        self._receive(key.data)
        except Exception:  # noqa: BLE001 - log it; the server's own accept loop keeps running
            log.exception("the HTTP server's connection gate stopped")
        finally:
            with self._lock:
                left = [*self._incoming, *self._waiting.values(), *self._ready]
                self._incoming.clear()
            self._waiting.clear()
            self._ready.clear()
            for entry in left:
                self._server.shutdown_request(entry.sock)
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _take_incoming(self) -> None:
        with self._lock:
            new = list(self._incoming)
            self._incoming.clear()
        for entry in new:
            same = [w for w in self._waiting.values() if w.client == entry.client]
            if len(same) >= self._limits.per_client_waiting:
                self._drop(same[0])  # this client's oldest idle connection makes room
            elif len(self._waiting) + len(self._ready) >= self._limits.max_waiting:
                if not self._waiting:  # all complete requests waiting for a thread: no room
                    self._server.shutdown_request(entry.sock)
                    self._note_dropped()
                    continue
                self._drop(next(iter(self._waiting.values())))
            try:
                entry.sock.setblocking(False)
                self._selector.register(entry.sock, selectors.EVENT_READ, entry)
            except (OSError, ValueError):
                self._server.shutdown_request(entry.sock)
                continue
            self._waiting[entry.sock] = entry

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting:
            entry = next(iter(self._waiting.values()))
            if entry.deadline > now:
                break
            self._drop(entry)

    def _receive(self, entry: _Waiting) -> None:
        try:
            chunk = entry.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client closed (or reset) before its request was complete
            self._drop(entry, idle=False)
            return
        entry.data += chunk
        arrived = request_arrived(entry.data)
        if arrived is None:
            self._refuse_large_head(entry)
        elif arrived:
            self._selector.unregister(entry.sock)
            del self._waiting[entry.sock]
            self._ready.append(entry)

    def _dispatch(self) -> None:
        held = collections.deque()
        while self._ready:
            entry = self._ready.popleft()
            with self._lock:
                busy = self._threads_of[entry.client] >= self._limits.per_client_threads
            if busy:
                held.append(entry)  # this client waits for one of its own requests to finish
                continue
            if not self._server.take_thread_slot():
                held.append(entry)
                held.extend(self._ready)
                self._ready.clear()
                break
            with self._lock:
                self._threads_of[entry.client] += 1
            self._server.start_handler(entry)
        self._ready = held

    def _drop(self, entry: _Waiting, idle: bool = True) -> None:
        self._selector.unregister(entry.sock)
        del self._waiting[entry.sock]
        self._server.shutdown_request(entry.sock)
        if idle:
            self._note_dropped()

    def _note_dropped(self) -> None:
        # One warning a minute at most: an attack must not also flood the log.
        self._dropped += 1
        now = time.monotonic()
        if now - self._warned >= 60:
            log.warning(
                "closed %d HTTP connection(s) that sent no complete request within %.0f s or exceeded the waiting limits",
                self._dropped,
                self._limits.header_timeout,
            )
            self._dropped, self._warned = 0, now

    def _refuse_large_head(self, entry: _Waiting) -> None:
        body = json.dumps({"error": f"request line and headers are over {MAX_HEAD_BYTES} bytes"}).encode()
        reply = (
            b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        try:
            entry.sock.send(reply)  # best effort: the socket's buffer takes a reply this small
        except OSError:
            pass
        self._drop(entry, idle=False)


class LimitedHTTPServer(ThreadingHTTPServer):
    """A ``ThreadingHTTPServer`` whose connections wait in a gate, holding no thread, until
    their request has arrived, with a listen backlog of ``limits.queue_size`` and at most
    ``limits.max_threads`` handler threads (see the module docstring).

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
        self._received: dict[socket.socket, bytes] = {}
        self._received_lock = threading.Lock()
        super().__init__(address, handler)
        self._gate = _Gate(self)

    def process_request(self, request, client_address) -> None:
        # Called by the accept loop: hand the connection to the gate and accept the next one.
        if self._closing.is_set():
            self.shutdown_request(request)
            return
        self._gate.add(request, client_address)

    def take_thread_slot(self) -> bool:
        """Reserve a handler thread if one is free (the gate calls this)."""
        return self._slots.acquire(blocking=False)

    def start_handler(self, entry: _Waiting) -> None:
        """Run the handler for a connection whose request has arrived (the gate calls this,
        holding a thread slot)."""
        with self._received_lock:
            self._received[entry.sock] = bytes(entry.data)
        try:
            entry.sock.setblocking(True)
            thread = threading.Thread(target=self._handle, args=(entry.sock, entry.address, entry.client), daemon=True)
            thread.start()
        except (OSError, RuntimeError):  # cannot start a thread: close this one, keep serving
            log.exception("could not start a thread for an HTTP request")
            with self._received_lock:
                self._received.pop(entry.sock, None)
            self.shutdown_request(entry.sock)
            self._slots.release()
            self._gate.handler_done(entry.client)

    def take_received(self, sock: socket.socket) -> bytes:
        """The bytes the gate read from `sock` (the handler reads them first)."""
        with self._received_lock:
            return self._received.pop(sock, b"")

    def _handle(self, request, client_address, client: str) -> None:
        try:
            socketserver.ThreadingMixIn.process_request_thread(self, request, client_address)
        finally:
            with self._received_lock:
                self._received.pop(request, None)
            self._slots.release()
            self._gate.handler_done(client)

    def shutdown(self) -> None:
        self._closing.set()
        super().shutdown()
        self._stop_gate()

    def server_close(self) -> None:
        self._closing.set()
        self._stop_gate()
        super().server_close()

    def _stop_gate(self) -> None:
        gate = getattr(self, "_gate", None)  # absent when binding failed (server_close runs then)
        if gate is not None:
            gate.stop()
