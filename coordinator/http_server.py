"""The coordinator's HTTP server: connections wait in a gate, holding no thread, until their request has arrived.

``LimitedHTTPServer`` (gated accept, bounded threads) with the bounds of `coordinator.http_limits`.
What each bounds and why: docs/design/http-service.md.
"""

from __future__ import annotations

import collections
import json
import logging
import re
import selectors
import socket
import socketserver
import threading
import time
from http.server import ThreadingHTTPServer

from coordinator.http_limits import DEFAULT_LIMITS, GATE_BODY_BYTES, MAX_HEAD_BYTES, HTTPLimits

log = logging.getLogger(__name__)

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
        held: collections.deque[_Waiting] = collections.deque()
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
        """Hand an accepted connection to the gate (refused while closing) and go back to accepting.

        Args:
            request: the accepted socket.
            client_address: the client's address.
        """
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
        """Stop the accept loop and the gate (connections waiting in it are closed)."""
        self._closing.set()
        super().shutdown()
        self._stop_gate()

    def server_close(self) -> None:
        """Close the listening socket and stop the gate."""
        self._closing.set()
        self._stop_gate()
        super().server_close()

    def _stop_gate(self) -> None:
        gate = getattr(self, "_gate", None)  # absent when binding failed (server_close runs then)
        if gate is not None:
            gate.stop()
