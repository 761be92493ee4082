"""The coordinator's HTTP service and registry under bad clients (issue 17, case 2): a
deflate-bomb .pt, deeply nested JSON and YAML, a burst of submits, half-open and trickling
connections, oversized error replies. Real servers on 127.0.0.1 ephemeral ports."""

import base64
import http.client
import io
import json
import socket
import struct
import threading
import time
import zipfile

import pytest
import torch

from coordinator import registry as R
from coordinator import spec as spec_mod
from coordinator.http_limits import MAX_ERROR_BYTES, HTTPLimits
from coordinator.registry import Registry
from coordinator.registry_http import serve_registry
from coordinator.service import Coordinator, make_server
from coordinator.site_tokens import SiteTokens
from site_agent.errors import UserError

API = "researcher-api-token"
GOOD = "name: t\nplan: marginal\nsites: {tags: [nobody], min_sites: 1, wait_s: 1}\nrounds: 1\nplan_args: {schema: abdominal-ct}\n"
SHORT = HTTPLimits(op_timeout=0.5, header_timeout=1.0, body_timeout=1.0, body_min_rate=1e6, max_threads=2)


def weights(n: int = 4) -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(n)}, buf)
    return buf.getvalue()


def deflate_bomb(numel: int = 16 * 2**20) -> bytes:
    """A .pt whose zip entries are deflated: ~66 KB that torch.load inflates to numel float32
    (64 MiB by default). Built from torch.save's own archive, with the tensor's size patched."""
    n0 = 1234567  # a size that appears in data.pkl exactly as the storage numel and the shape
    src = zipfile.ZipFile(io.BytesIO(weights(n0)))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(struct.pack("<I", n0)) == 2
                dst.writestr(info.filename, data.replace(struct.pack("<I", n0), struct.pack("<I", numel)))
            elif "/data/" in info.filename:
                with dst.open(info.filename, "w") as fh:
                    for _ in range(numel * 4 >> 20):
                        fh.write(bytes(1 << 20))
            else:
                dst.writestr(info.filename, data)
    return out.getvalue()


def request(port, method, path, token=None, body=None, timeout=30):
    """(status, body bytes) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def push_body(files, meta=None):
    return json.dumps({"files": {k: base64.b64encode(v).decode() for k, v in files.items()}, "meta": meta or {}}).encode()


@pytest.fixture
def registry_server(tmp_path):
    home = tmp_path / "coord"
    httpd = serve_registry(home, "127.0.0.1", 0, api_token=API, max_push_bytes=1 << 20)
    yield home, httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def start_service(home, limits=None):
    httpd = make_server(Coordinator(home, federation=None), API, "127.0.0.1", 0, limits)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd


@pytest.fixture
def service(tmp_path):
    home = tmp_path / "coord"
    httpd = start_service(home)
    yield home, httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def _peak_rss_mib() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) >> 10 for line in fh if line.startswith("VmHWM"))


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


def test_deflate_bomb_push_is_refused_before_torch_load(registry_server, monkeypatch):
    home, port = registry_server
    token = SiteTokens(home).issue("site-a")
    bomb = deflate_bomb()
    assert len(bomb) < 100_000
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    body = push_body({"branch.pt": bomb, "branch.json": b"{}"})
    measured = _reset_peak_rss()
    before = _peak_rss_mib()
    status, data = request(port, "POST", "/registry/segmentation-branch/liver", token, body)
    rise = _peak_rss_mib() - before
    assert status == 400, data
    error = json.loads(data)["error"]
    assert "branch.pt" in error and "compressed" in error and "torch.save" in error
    assert loads == []  # refused from the zip's directory: nothing was inflated
    if measured:
        assert rise < 32, f"peak memory rose {rise} MiB for a {len(bomb)}-byte push"
    assert Registry(home).list() == []


def test_pt_archive_checks_and_publish(tmp_path, monkeypatch):
    assert R.pt_archive_problem(weights()) is None  # what torch.save writes passes
    assert "compressed" in R.pt_archive_problem(deflate_bomb(2**18))
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, legacy, _use_new_zipfile_serialization=False)
    assert "not the zip archive torch.save writes" in R.pt_archive_problem(legacy.getvalue())
    # Stored entries whose declared sizes exceed the file (overlapping or lying entries).
    data = bytearray(weights(1024))
    entry = data.find(b"PK\x01\x02", data.find(b"archive/data/0") - 200)
    while not data[entry + 46 : entry + 46 + 14] == b"archive/data/0":
        entry = data.find(b"PK\x01\x02", entry + 4)
    data[entry + 20 : entry + 28] = struct.pack("<II", 1 << 30, 1 << 30)  # compressed, uncompressed size
    assert "declare" in R.pt_archive_problem(bytes(data))
    entries = io.BytesIO()
    with zipfile.ZipFile(entries, "w") as zf:
        for i in range(5):
            zf.writestr(f"archive/r{i}", b"")
    assert "holds 5 entries; at most 4" in R.pt_archive_problem(entries.getvalue(), max_entries=4)

    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))
    reg = Registry(tmp_path)
    with pytest.raises(R.RegistryError, match="g.pt: not a PyTorch weights file .*compressed"):
        reg.publish("factory", "gan", {"g.pt": deflate_bomb(2**18)}, {})
    path = tmp_path / "bomb.pt"
    path.write_bytes(deflate_bomb(2**18))
    with pytest.raises(R.RegistryError, match="g.pt: not a PyTorch weights file .*compressed"):
        reg.publish("factory", "gan", {"g.pt": path}, {})
    with pytest.raises(R.RegistryError, match="g.pt: not a weights file that torch.load.*compressed"):
        R.check_flat_state_dict("g.pt", deflate_bomb(2**18))
    assert loads == [] and reg.list() == []


def test_nested_json_and_yaml_get_400_and_the_server_keeps_serving(service):
    home, port = service
    site = SiteTokens(home).issue("site-a")
    for path, token, body, needle in [
        ("/registry/segmentation-branch/x", site, b"[" * 200_000, "nests too deeply"),
        ("/registry/segmentation-branch/x", site, b'{"files": {"branch.pt": "AA=="}, "meta": ' + b"[" * 50 + b"]" * 50 + b"}", "nests more than"),
        ("/runs", API, b"[" * 200_000, "nests more than 64 levels"),
        ("/runs", API, b"a: " + b"{x: " * 5000 + b"}" * 5000, "nests more than 64 levels"),
        ("/runs", API, "".join(" " * i + "k:\n" for i in range(200)).encode(), "nests more than 64 levels"),
    ]:
        status, data = request(port, "POST", path, token, body)
        assert status == 400, (path, data[:200])
        assert needle in json.loads(data)["error"] and len(data) < MAX_ERROR_BYTES and b"\n" not in data
        assert request(port, "GET", "/health")[0] == 200  # still serving
    assert Registry(home).list() == []


def test_unexpected_error_answers_500_and_the_server_keeps_serving(service, monkeypatch):
    home, port = service

    def broken(text, where, base_dir=None):
        raise KeyError("a bug in the validator")

    monkeypatch.setattr(spec_mod, "parse", broken)
    status, data = request(port, "POST", "/runs", API, GOOD.encode())
    assert status == 500 and "internal error" in json.loads(data)["error"] and b"a bug" not in data
    assert request(port, "GET", "/health")[0] == 200


def test_error_replies_are_capped(service, monkeypatch):
    home, port = service
    site = SiteTokens(home).issue("site-a")
    long_name = "n" * 60_000 + ".pt"
    status, data = request(port, "POST", "/registry/segmentation-branch/x", site, push_body({long_name: weights()}))
    assert status == 400 and len(data) <= MAX_ERROR_BYTES and "characters cut" in json.loads(data)["error"]
    status, data = request(port, "GET", "/runs/" + "r" * 60_000, API)
    assert status == 404 and len(data) <= MAX_ERROR_BYTES
    status, data = request(port, "GET", "/nope" * 10_000, API)
    assert status == 404 and len(data) <= MAX_ERROR_BYTES

    def echoing(text, where, base_dir=None):  # an error that quotes the whole input back
        raise UserError(f"{where}: bad spec: {text}")

    monkeypatch.setattr(spec_mod, "parse", echoing)
    status, data = request(port, "POST", "/runs", API, ("name: t\n" + "# é\u2028\n" * 20_000).encode())
    assert status == 400 and len(data) <= MAX_ERROR_BYTES and json.loads(data)["error"].startswith("submitted spec: bad spec")

    # A malformed request line is answered the same way (not quoted back in the status line or a page).
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /" + b"x" * 60_000 + b" extra HTTP/1.1\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400" and len(head) < 1000, head[:200]
    assert len(body) <= MAX_ERROR_BYTES and "Bad request syntax" in json.loads(body)["error"]
    assert request(port, "GET", "/health")[0] == 200


def test_sixteen_concurrent_submits_all_get_answers(tmp_path):
    spec_mod.parse(GOOD, "warm-up")  # the first parse imports the plans (seconds)
    home = tmp_path / "coord"
    httpd = make_server(Coordinator(home, federation=None), API, "127.0.0.1", 0)
    port = httpd.server_address[1]
    body = GOOD.encode()
    answers = []

    def submit():
        # All 16 connect while the server does not accept for longer than a client waits to
        # connect, as when its accept loop is starved by threads parsing specs: they must
        # wait in the listen backlog (5 in the standard library: 10 of 16 timed out).
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.5) as s:
                s.settimeout(60)
                s.sendall(
                    b"POST /runs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                    + API.encode()
                    + b"\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                reply = b""
                while chunk := s.recv(65536):
                    reply += chunk
            answers.append(reply.split(b" ", 2)[1])
        except OSError as exc:
            answers.append(repr(exc))

    threads = [threading.Thread(target=submit) for _ in range(16)]
    try:
        [t.start() for t in threads]
        time.sleep(4.0)
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        [t.join(120) for t in threads]
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert answers == [b"201"] * 16, answers
    assert len(list((home / "runs").iterdir())) == 16


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closed `sock` (None if still open after `seconds`)."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def test_half_open_and_trickling_connections_are_dropped(tmp_path):
    httpd = start_service(tmp_path / "coord", SHORT)  # 1 s deadlines, 2 handler threads
    port = httpd.server_address[1]
    try:
        # Two connections that stop mid-request (they wait in the connection gate, holding no handler thread) ...
        half = socket.create_connection(("127.0.0.1", port), timeout=5)
        half.sendall(b"POST /runs HTTP/1.1\r\nHost: x\r\n")
        body = socket.create_connection(("127.0.0.1", port), timeout=5)
        body.sendall(b"POST /runs HTTP/1.1\r\nAuthorization: Bearer " + API.encode() + b"\r\nContent-Length: 100\r\n\r\nname: ")
        time.sleep(0.2)
        # ... do not delay a third request, and are closed at their deadline.
        start = time.monotonic()
        assert request(port, "GET", "/health", timeout=10)[0] == 200
        assert time.monotonic() - start < 5
        assert _closed_within(half, 5) is not None
        assert _closed_within(body, 5) is not None
        half.close()
        body.close()

        # A client trickling a header byte at a time (each within op_timeout) is cut at the deadline.
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        start, cut = time.monotonic(), None
        for byte in b"GET /health HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                slow.sendall(bytes([byte]))
            except OSError:  # the server closed the connection
                cut = time.monotonic() - start
                break
            time.sleep(0.3)
        slow.close()
        assert cut is not None and cut < 4, cut
        assert request(port, "GET", "/health")[0] == 200
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_registry_alone_has_the_same_deadlines(tmp_path):
    httpd = serve_registry(tmp_path / "coord", "127.0.0.1", 0, api_token=API, limits=SHORT)
    port = httpd.server_address[1]
    try:
        half = socket.create_connection(("127.0.0.1", port), timeout=5)
        half.sendall(b"GET /registry HTTP/1.1\r\n")
        assert _closed_within(half, 5) is not None
        half.close()
        assert request(port, "GET", "/registry", API)[0] == 200
    finally:
        httpd.shutdown()
        httpd.server_close()


def _timed(port, method, path, token=None, body=None) -> tuple[int, float]:
    start = time.monotonic()
    status, _ = request(port, method, path, token, body, timeout=10)
    return status, time.monotonic() - start


def test_idle_connections_do_not_starve_the_api_or_the_registry(tmp_path):
    # 200 connections that send nothing, 30 that stop inside their headers and 20 that stop
    # inside a small body, all without a token (the default limits): every route must still
    # answer at once (before: 32 idle connections blocked everything for 30 s).
    spec_mod.parse(GOOD, "warm-up")  # the first parse imports the plans (seconds)
    home = tmp_path / "coord"
    httpd = start_service(home)
    port = httpd.server_address[1]
    registry = serve_registry(tmp_path / "reg", "127.0.0.1", 0, api_token=API)
    idle = []
    try:
        for target in (port, registry.server_address[1]):
            idle += [socket.create_connection(("127.0.0.1", target), timeout=5) for _ in range(200)]
            for _ in range(30):
                idle.append(socket.create_connection(("127.0.0.1", target), timeout=5))
                idle[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            for _ in range(20):
                idle.append(socket.create_connection(("127.0.0.1", target), timeout=5))
                idle[-1].sendall(b"POST /registry/segmentation-branch/x HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.5)
        for target, method, path, token, body, expected in [
            (port, "GET", "/health", None, None, 200),
            (port, "GET", "/runs", API, None, 200),
            (port, "POST", "/runs", API, GOOD.encode(), 201),
            (port, "GET", "/registry", API, None, 200),
            (registry.server_address[1], "GET", "/registry", API, None, 200),
        ]:
            status, took = _timed(target, method, path, token, body)
            assert status == expected and took < 3, (path, status, took)
    finally:
        for s in idle:
            s.close()
        for server in (httpd, registry):
            server.shutdown()
            server.server_close()


def test_idle_connections_are_closed_oldest_first_per_client(tmp_path):
    limits = HTTPLimits(header_timeout=30, per_client_waiting=8)
    httpd = start_service(tmp_path / "coord", limits)
    port = httpd.server_address[1]
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(12)]
    try:
        # The 4 oldest made room for the newest; the 8 newest wait (their deadline is 30 s away).
        assert all(_closed_within(s, 3) is not None for s in conns[:4])
        assert all(_closed_within(s, 0.2) is None for s in conns[4:])
        assert request(port, "GET", "/health", timeout=5)[0] == 200
    finally:
        for s in conns:
            s.close()
        httpd.shutdown()
        httpd.server_close()


def test_one_client_cannot_hold_every_handler_thread(tmp_path):
    # Uploads stalled inside bodies too large for the gate hold handler threads; one client
    # address gets at most per_client_threads of them, so another address is still served.
    limits = HTTPLimits(max_threads=4, per_client_threads=2, body_timeout=30)
    httpd = start_service(tmp_path / "coord", limits)
    port = httpd.server_address[1]
    stalled = []
    try:
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
            s.sendall(b"POST /runs HTTP/1.1\r\nAuthorization: Bearer " + API.encode() + b"\r\nContent-Length: 200000\r\n\r\nname: ")
            stalled.append(s)
        time.sleep(0.5)
        for _ in range(3):  # more than max_threads minus the stalled client's two
            status, took = _timed(port, "GET", "/runs", API)
            assert status == 200 and took < 3, took
    finally:
        for s in stalled:
            s.close()
        httpd.shutdown()
        httpd.server_close()


def test_oversized_request_head_is_refused_in_the_gate(service):
    home, port = service
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 60_000 + b"\r\n" + b"X-More: " + b"b" * 80_000 + b"\r\n")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.split(b" ", 2)[1] == b"431" and b"over" in reply
    assert request(port, "GET", "/health")[0] == 200
