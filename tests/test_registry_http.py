"""The registry over HTTP (coordinator.registry_http) and the site's client
(site_agent.registry_client): real servers on loopback."""

import base64
import hashlib
import http.client
import io
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from coordinator import registry as R
from coordinator.registry import Registry
from coordinator.registry_http import SHA256_HEADER, serve_registry
from coordinator.site_tokens import SiteTokens
from site_agent.config import validate
from site_agent.errors import UserError
from site_agent.registry_client import RegistryClient

API = "researcher-api-token"
CAP = 64 * 1024  # push size limit of the test server


def weights(seed: int = 0, **extra) -> bytes:
    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    torch.save({"w": torch.randn(4, 4, generator=g), "b": torch.zeros(4), **extra}, buf)
    return buf.getvalue()


def accept_all(files):
    if "branch.pt" not in files:
        raise ValueError("a segmentation branch needs branch.pt")


@pytest.fixture
def validator(monkeypatch):
    """HTTP mechanics with stand-in branches: the real branch policy (rebuild the network,
    allowlisted meta, a factory this registry holds) is tested in test_branch_push.py."""
    from coordinator import branches

    monkeypatch.setitem(R.VALIDATORS, "segmentation-branch", accept_all)
    monkeypatch.setattr(branches, "canonical_files", dict)
    monkeypatch.setattr(branches, "check_factory", lambda reg, files: {})
    monkeypatch.setattr(branches, "server_meta", lambda meta, files, factory_meta, site: {**meta, "published_by": site})


@pytest.fixture
def server(tmp_path):
    home = tmp_path / "coord"
    httpd = serve_registry(home, "127.0.0.1", 0, api_token=API, max_push_bytes=CAP)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield home, url
    httpd.shutdown()
    httpd.server_close()


def request(url, method, path, token=None, body=None, headers=None):
    """(status, headers, body bytes) of one raw request."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.headers, data


def push_body(files, meta=None):
    return json.dumps({"files": {k: base64.b64encode(v).decode() for k, v in files.items()}, "meta": meta or {}}).encode()


def error(data: bytes) -> str:
    return json.loads(data)["error"]


def test_pull_verifies_and_reuses_the_cache(server, tmp_path, monkeypatch):
    home, url = server
    reg = Registry(home)
    v1 = reg.publish("factory", "gan", {"generator.pt": weights(1), "config.yaml": b"size: 64\n"}, {"rounds": 3})
    reg.publish("factory", "gan", {"generator.pt": weights(2)}, {"rounds": 6})
    token = SiteTokens(home).issue("site-a")
    client = RegistryClient(url, token)
    dest = tmp_path / "models"

    assert [r["version"] for r in client.list()] == ["v0001", "v0002"]
    assert client.list("segmentation-branch") == []
    assert client.versions("factory", "gan") == {"kind": "factory", "name": "gan", "versions": ["v0001", "v0002"], "latest": "v0002"}
    assert client.record("factory", "gan", "v0001") == v1

    folder = client.pull("factory", "gan", dest=dest)
    assert folder == dest / "factory" / "gan" / "v0002"
    assert (folder / "generator.pt").read_bytes() == weights(2)
    assert json.loads((folder / "artifact.json").read_text())["meta"] == {"rounds": 6}
    old = client.pull("factory", "gan", "v0001", dest=dest)
    assert sorted(p.name for p in old.iterdir()) == ["artifact.json", "config.yaml", "generator.pt"]
    assert (old / "config.yaml").read_bytes() == b"size: 64\n"
    assert sorted(p.name for p in (dest / "factory" / "gan").iterdir()) == ["v0001", "v0002"]  # no temporaries left

    # A complete cached version is verified and reused: no file is downloaded again.
    def no_download(*a, **k):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(RegistryClient, "_download", no_download)
    assert client.pull("factory", "gan", dest=dest) == folder
    # A cached copy that no longer verifies is replaced by a fresh download.
    monkeypatch.undo()
    (folder / "generator.pt").write_bytes(b"garbage")
    assert client.pull("factory", "gan", dest=dest) == folder
    assert (folder / "generator.pt").read_bytes() == weights(2)

    # The raw file route carries the checksum header.
    status, headers, data = request(url, "GET", "/registry/factory/gan/latest/generator.pt", token)
    assert status == 200 and headers[SHA256_HEADER] == hashlib.sha256(data).hexdigest() == hashlib.sha256(weights(2)).hexdigest()


def test_tokens_missing_wrong_revoked_and_the_researcher_token(server):
    home, url = server
    Registry(home).publish("factory", "gan", {"g.pt": weights()}, {})
    tokens = SiteTokens(home)
    token = tokens.issue("site-a")
    for bad in (None, "nope", token[:-1]):
        status, _, data = request(url, "GET", "/registry", bad)
        assert status == 401 and "missing or wrong token" in error(data)
    assert request(url, "GET", "/registry", token)[0] == 200
    assert request(url, "GET", "/registry/factory/gan/latest/g.pt", API)[0] == 200  # the researcher reads too
    tokens.revoke("site-a")
    assert request(url, "GET", "/registry", token)[0] == 401  # takes effect without a restart
    with pytest.raises(UserError, match="refused this site's token") as exc:
        RegistryClient(url, token).pull("factory", "gan", dest=home / "x")
    assert token not in str(exc.value)


def test_not_found_routes(server):
    home, url = server
    Registry(home).publish("factory", "gan", {"g.pt": weights()}, {})
    token = SiteTokens(home).issue("site-a")
    for path, needle in [
        ("/registry/factory/nope", "no factory artifact 'nope'"),
        ("/registry/factory/gan/v0009", "has no version v0009"),
        ("/registry/factory/gan/v0001/d.pt", "no file 'd.pt'"),
        ("/registry/images/gan", "unknown artifact kind"),
        ("/registry/factory/gan/..", "not a registry version"),
        ("/registry/factory/gan/v0001/..%2Fartifact.json", "no file"),
    ]:
        status, _, data = request(url, "GET", path, token)
        assert status == 404 and needle in error(data), (path, data)
    assert request(url, "GET", "/registry?kind=images", token)[0] == 400
    with pytest.raises(UserError, match="not in the registry .*no factory artifact 'nope'"):
        RegistryClient(url, token).pull("factory", "nope", dest=home / "x")


def test_tampered_stored_file_is_never_served(server, tmp_path):
    home, url = server
    reg = Registry(home)
    reg.publish("factory", "gan", {"g.pt": weights(), "c.json": b"{}"}, {})
    stored = reg.path("factory", "gan") / "g.pt"
    data = bytearray(stored.read_bytes())
    data[-10] ^= 0xFF
    stored.write_bytes(bytes(data))
    token = SiteTokens(home).issue("site-a")
    status, _, body = request(url, "GET", "/registry/factory/gan/v0001/g.pt", token)
    assert status == 500 and "corrupt" in error(body) and "g.pt" in error(body)
    assert request(url, "GET", "/registry/factory/gan/v0001/c.json", token)[0] == 200  # the others still serve
    with pytest.raises(UserError, match=r"failed on factory gan v0001: g\.pt \(500\).*checksum does not match"):
        RegistryClient(url, token).pull("factory", "gan", dest=tmp_path / "m")
    assert not (tmp_path / "m" / "factory" / "gan" / "v0001").exists()
    assert list((tmp_path / "m" / "factory" / "gan").iterdir()) == []  # the partial download is gone


def test_site_pushes_and_is_recorded_as_publisher(server, validator, tmp_path):
    home, url = server
    tokens = SiteTokens(home)
    a = RegistryClient(url, tokens.issue("site-a"))
    cfg = json.dumps({"out_channels": 3}).encode()
    record = a.push("segmentation-branch", "liver", {"branch.pt": weights(5), "branch.json": cfg}, {"published_by": "someone-else", "dice": 0.7})
    assert record["version"] == "v0001" and record["meta"] == {"published_by": "site-a", "dice": 0.7}
    assert Registry(home).verify("segmentation-branch", "liver")["meta"]["published_by"] == "site-a"
    assert a.push("segmentation-branch", "liver", {"branch.pt": weights(6)})["version"] == "v0002"

    b = RegistryClient(url, tokens.issue("site-b"))
    folder = b.pull("segmentation-branch", "liver", "v0001", dest=tmp_path / "b")
    assert (folder / "branch.pt").read_bytes() == weights(5) and (folder / "branch.json").read_bytes() == cfg

    # Name ownership: only site-a adds versions of "liver"; site-b picks its own name.
    with pytest.raises(UserError, match="forbids this .*belongs to site 'site-a'"):
        b.push("segmentation-branch", "liver", {"branch.pt": weights(7)})
    assert b.push("segmentation-branch", "spleen", {"branch.pt": weights(7)})["meta"]["published_by"] == "site-b"
    Registry(home).publish("segmentation-branch", "central", {"branch.pt": weights(8)}, {})  # the coordinator's own
    with pytest.raises(UserError, match="belongs to the coordinator"):
        a.push("segmentation-branch", "central", {"branch.pt": weights(9)})
    assert Registry(home).versions("segmentation-branch", "liver") == ["v0001", "v0002"]


def test_concurrent_first_pushes_of_one_name_have_one_owner(server, validator):
    home, url = server
    tokens = SiteTokens(home)
    clients = [RegistryClient(url, tokens.issue(f"site-{i}")) for i in range(4)]
    outcomes = []

    def push(c):
        try:
            outcomes.append(c.push("segmentation-branch", "race", {"branch.pt": weights(1)})["meta"]["published_by"])
        except UserError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=push, args=(c,)) for c in clients]
    [t.start() for t in threads]
    [t.join() for t in threads]
    records = Registry(home).list("segmentation-branch")
    assert len(records) == 1 and sum("belongs to" in o for o in outcomes) == 3


def test_push_refusals(server, validator):
    home, url = server
    token = SiteTokens(home).issue("site-a")

    def push(path, files, tok=token, meta=None):
        status, _, data = request(url, "POST", path, tok, push_body(files, meta))
        return status, error(data) if status >= 400 else json.loads(data)

    assert push("/registry/factory/gan", {"g.pt": weights()})[0] == 403  # factories come from federation runs
    assert "sites may push only segmentation-branch" in push("/registry/factory/gan", {"g.pt": weights()})[1]
    status, msg = push("/registry/segmentation-branch/x", {"branch.pt": weights()}, tok=API)
    assert status == 403 and "only a site token may push" in msg
    assert push("/registry/segmentation-branch/x", {"branch.pt": weights()}, tok="wrong")[0] == 401
    for files, needle in [
        ({"scan.nii.gz": b"\x00" * 10}, "images, volumes and other data never leave a site"),
        ({"../branch.pt": weights()}, "is not allowed"),
        ({"artifact.json": b"{}"}, "reserved"),
        ({"branch.pt": weights(step=3)}, "entry 'step' is a int, not a tensor"),
        ({"branch.pt": b"not a torch file"}, "torch.load(weights_only=True)"),
        ({"branch.json": b"{}"}, "refused by the segmentation-branch validator: a segmentation branch needs branch.pt"),
        ({"branch.pt": weights(), "c.json": b"{broken"}, "c.json: not valid JSON"),
    ]:
        status, msg = push("/registry/segmentation-branch/x", files)
        assert status == 400 and needle in msg, (files.keys(), msg)

    class Evil:  # pickled code must never load
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"w": Evil()}, buf)
    status, msg = push("/registry/segmentation-branch/x", {"branch.pt": buf.getvalue()})
    assert status == 400 and "weights_only" in msg

    for body, needle in [
        (b"{not json", "not JSON"),
        (b'{"files": {}}', "no files"),
        (b'{"files": {"branch.pt": "***"}}', "not valid base64"),
        (b'{"files": {"branch.pt": "AA=="}, "extra": 1}', 'must be {"files"'),
        (b'{"files": {"branch.pt": "AA=="}, "meta": [1]}', "meta must be a JSON object"),
    ]:
        status, _, data = request(url, "POST", "/registry/segmentation-branch/x", token, body)
        assert status == 400 and needle in error(data), (body, data)
    assert Registry(home).list() == []
    assert not (home / "registry" / "segmentation-branch" / "x").exists()  # nothing left behind
    assert list((home / "registry" / ".staging").iterdir()) == []


def test_push_without_a_registered_validator_is_refused(server, monkeypatch):
    home, url = server
    monkeypatch.delitem(R.VALIDATORS, "segmentation-branch", raising=False)
    token = SiteTokens(home).issue("site-a")
    status, _, data = request(url, "POST", "/registry/segmentation-branch/x", token, push_body({"branch.pt": weights()}))
    assert status == 400 and "no validator for that kind" in error(data)
    with pytest.raises(UserError, match="no validator"):
        RegistryClient(url, token).push("segmentation-branch", "x", {"branch.pt": weights()})
    assert Registry(home).list() == [] and not (home / "registry" / "segmentation-branch").exists()
    # The storage refuses it the same way when asked to require a validator.
    with pytest.raises(R.RegistryError, match="no validator"):
        Registry(home).publish("segmentation-branch", "x", {"branch.pt": weights()}, require_validator=True)


def test_validator_runs_before_anything_is_written_on_publish(tmp_path, monkeypatch):
    seen = []

    def refuse(files):
        seen.append(sorted(files))
        raise RuntimeError("state dict does not match the branch: missing key head.weight")

    monkeypatch.setitem(R.VALIDATORS, "segmentation-branch", refuse)
    reg = Registry(tmp_path)
    cfg = tmp_path / "branch.json"
    cfg.write_text("{}")
    with pytest.raises(R.RegistryError, match="refused by the segmentation-branch validator: state dict does not match"):
        reg.publish("segmentation-branch", "b", {"branch.pt": weights(), "branch.json": cfg})
    assert seen == [["branch.json", "branch.pt"]]  # paths are read: the validator sees bytes
    assert reg.list() == [] and not (tmp_path / "registry" / "segmentation-branch").exists()

    monkeypatch.setattr(R, "VALIDATORS", {})
    with pytest.raises(R.RegistryError, match="unknown artifact kind .images."):
        R.register_validator("images", refuse)
    with pytest.raises(TypeError, match="must be callable"):
        R.register_validator("segmentation-branch", "not a function")
    R.register_validator("segmentation-branch", lambda files: None)
    assert reg.publish("segmentation-branch", "b", {"branch.pt": weights()})["version"] == "v0001"


def test_oversized_push_is_413_and_writes_nothing(server, validator):
    home, url = server
    token = SiteTokens(home).issue("site-a")
    big = push_body({"branch.pt": weights(), "pad.json": json.dumps(["x" * CAP]).encode()})
    assert len(big) > CAP
    status, _, data = request(url, "POST", "/registry/segmentation-branch/x", token, big)
    assert status == 413 and "over the limit" in error(data)
    with pytest.raises(UserError, match="refused push of segmentation-branch x as too large"):
        RegistryClient(url, token).push("segmentation-branch", "x", {"branch.pt": weights(), "pad.json": json.dumps(["x" * CAP]).encode()})
    assert Registry(home).list() == []


class _Tamper(BaseHTTPRequestHandler):
    """Forwards GETs to the registry; corrupts one byte of file bodies, or their header."""

    upstream = ""
    mode = "body"

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        req = urllib.request.Request(self.upstream + self.path, headers={"Authorization": self.headers["Authorization"]})
        with urllib.request.urlopen(req) as resp:
            data, sha = bytearray(resp.read()), resp.headers.get(SHA256_HEADER)
        if sha and self.mode == "body":
            data[len(data) // 2] ^= 0x01
        if sha and self.mode == "header":
            sha = hashlib.sha256(bytes(data)).hexdigest()[::-1]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if sha:
            self.send_header(SHA256_HEADER, sha)
        self.end_headers()
        self.wfile.write(bytes(data))


@pytest.mark.parametrize("mode", ["body", "header"])
def test_client_detects_a_corrupted_download(server, tmp_path, mode):
    home, url = server
    Registry(home).publish("factory", "gan", {"a.json": b"{}", "g.pt": weights()}, {})
    token = SiteTokens(home).issue("site-a")
    handler = type("Tamper", (_Tamper,), {"upstream": url, "mode": mode})
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        client = RegistryClient(f"http://127.0.0.1:{proxy.server_address[1]}", token)
        with pytest.raises(UserError, match=r"factory gan v0001: (a\.json|g\.pt): checksum mismatch") as exc:
            client.pull("factory", "gan", dest=tmp_path / "m")
        assert ("header" in str(exc.value)) == (mode == "header")
    finally:
        proxy.shutdown()
        proxy.server_close()
    base = tmp_path / "m" / "factory" / "gan"
    assert not (base / "v0001").exists() and list(base.iterdir()) == []
    # Through the real server the same pull works.
    assert RegistryClient(url, token).pull("factory", "gan", dest=tmp_path / "m") == base / "v0001"


def test_unreachable_registry_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match=f"cannot reach the registry at http://127.0.0.1:{port}") as exc:
        RegistryClient(f"http://127.0.0.1:{port}", "secret-token").pull("factory", "gan", dest=tmp_path)
    assert "secret-token" not in str(exc.value)


def test_service_serves_the_registry_and_keeps_site_tokens_out_of_the_api(tmp_path):
    from coordinator.service import Coordinator, make_handler

    home = tmp_path / "coord"
    Registry(home).publish("factory", "gan", {"g.pt": weights()}, {})
    site = SiteTokens(home).issue("site-a")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(Coordinator(home, federation=None), API))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        assert request(url, "GET", "/health")[0] == 200
        assert request(url, "GET", "/runs", API)[0] == 200
        assert request(url, "GET", "/runs", site)[0] == 401  # a site token opens only /registry
        assert request(url, "POST", "/runs", site, b"name: x\n")[0] == 401
        assert request(url, "GET", "/registry/factory/gan", API)[0] == 200
        assert RegistryClient(url, site).pull("factory", "gan", dest=tmp_path / "m").name == "v0001"
        status, _, data = request(url, "POST", "/registry/factory/gan", site, push_body({"g.pt": weights()}))
        assert status == 403
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_site_config_registry_section(tmp_path, site_yaml, monkeypatch):
    assert validate(site_yaml, "site.yaml").registry is None  # optional: older configs still load
    token_file = tmp_path / "site-token"
    token_file.write_text("tok-from-file\n")
    cfg = validate({**site_yaml, "registry": {"url": "http://coord:8750/", "token_file": str(token_file)}}, "site.yaml")
    assert cfg.registry.url == "http://coord:8750" and cfg.registry.token_file == token_file
    assert validate(cfg.to_dict(), "again").registry == cfg.registry  # round trip
    assert "registry" not in validate(site_yaml, "s").to_dict()

    for reg, needle in [
        ({"url": "ftp://coord"}, "http:// or https://"),
        ({"url": "coord:8750"}, "http:// or https://"),
        ({"url": "http://user:pw@coord"}, "no credentials"),
        ({"url": "http://coord:99999"}, "not a valid URL"),
        ({"url": "http://coord", "token_file": "relative/token"}, "registry.token_file: must be an absolute path"),
        ({"url": "http://coord", "token": "x"}, "registry.token: unknown key; did you mean 'token_file'"),
        ("http://coord", "registry: must be a mapping with keys token_file, url"),
        ({"token_file": "/t"}, "registry.url: required"),
    ]:
        with pytest.raises(UserError, match=needle):
            validate({**site_yaml, "registry": reg}, "site.yaml")

    monkeypatch.delenv("FEDIMG_SITE_TOKEN", raising=False)
    client = RegistryClient.from_site_config(cfg)
    assert client._token == "tok-from-file" and "tok-from-file" not in repr(client)
    assert RegistryClient.from_site_config(cfg, env={"FEDIMG_SITE_TOKEN": "from-env"})._token == "from-env"
    no_file = validate({**site_yaml, "registry": {"url": "http://coord"}}, "site.yaml")
    with pytest.raises(UserError, match="no site token: set registry.token_file"):
        RegistryClient.from_site_config(no_file, env={})
    missing = validate({**site_yaml, "registry": {"url": "http://coord", "token_file": str(tmp_path / "nope")}}, "s")
    with pytest.raises(UserError, match="nope: cannot read the site token"):
        RegistryClient.from_site_config(missing, env={})
    with pytest.raises(UserError, match="no registry section"):
        RegistryClient.from_site_config(validate(site_yaml, "site.yaml"), env={"FEDIMG_SITE_TOKEN": "x"})


def test_pull_defaults_to_the_site_work_dir(server, site_yaml):
    home, url = server
    Registry(home).publish("factory", "gan", {"g.pt": weights()}, {})
    cfg = validate({**site_yaml, "registry": {"url": url}}, "site.yaml")
    client = RegistryClient.from_site_config(cfg, env={"FEDIMG_SITE_TOKEN": SiteTokens(home).issue("site-a")})
    assert client.pull("factory", "gan") == cfg.work_dir / "models" / "registry" / "factory" / "gan" / "v0001"
