"""Trust between sites and the coordinator without a network: fingerprints and pins, the
coordinator's PKI (server certificate, site CA, enrolment records, revocation), the site's key,
request and certificate, and the node's pinned channel (issue 23, parts 3 and 4)."""

import json
import ssl
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.pki import CoordinatorPKI, SiteRegistry
from fedimg_core.errors import UserError
from fedimg_core.tls_pins import fingerprint, parse_pin
from site_agent import config as site_config
from site_agent import trust

NODE = "NODE_0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def _site(tmp_path: Path, name: str = "site-a", node_id: str = NODE) -> site_config.SiteConfig:
    site = site_config.validate(
        {"site_name": name, "coordinator": {"host": "localhost", "port": 50051}, "data_dir": str(tmp_path / "data"), "work_dir": str(tmp_path / name)},
        "test",
    )
    etc = site.node_dir / "etc"
    etc.mkdir(parents=True)
    (etc / "config.ini").write_text(f"[default]\nid = {node_id}\nname = {name}\n")  # what Fed-BioMed writes, the part read here
    return site


def _csr(cn: str, o: str | None = "site-a") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] + ([x509.NameAttribute(NameOID.ORGANIZATION_NAME, o)] if o else [])
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- fingerprints ---------------------------------------------------------------------------


def test_fingerprint_is_the_same_from_pem_and_der_and_parse_pin_normalises(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    pki.ensure("localhost")
    pem = pki.server_cert.read_text()
    pin = fingerprint(pem)
    assert pin == fingerprint(ssl.PEM_cert_to_DER_cert(pem)) == pki.fingerprint()
    hexpart = pin.split(":", 1)[1]
    assert parse_pin(hexpart.upper()) == pin
    assert parse_pin("sha256:" + ":".join(hexpart[i : i + 2] for i in range(0, 64, 2)).upper()) == pin  # openssl's form
    for bad in ("", "SHA256:abc", "SHA1:" + hexpart, "SHA256:" + "g" * 64):
        with pytest.raises(UserError, match="is not a certificate fingerprint"):
            parse_pin(bad)


# -- coordinator PKI ------------------------------------------------------------------------


def test_pki_is_created_once_with_private_keys_0600_and_never_regenerated_silently(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    assert pki.ensure("coordinator.example.org") is True
    assert all(_mode(p) == 0o600 for p in (pki.server_key, pki.ca_key))
    first = pki.fingerprint()
    assert pki.server_names() == ["coordinator.example.org"] and pki.researcher_id().startswith("RESEARCHER_")
    assert pki.ensure("coordinator.example.org") is False and pki.ensure() is False
    assert pki.fingerprint() == first
    with pytest.raises(UserError, match=r"not 'other\.example\.org'.*coordinator certificate rotate"):
        pki.ensure("other.example.org")
    assert pki.fingerprint() == first  # refused, not replaced


def test_rotation_changes_the_fingerprint_keeps_the_researcher_id_and_the_site_ca(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    pki.ensure("localhost")
    old, rid, ca = pki.fingerprint(), pki.researcher_id(), pki.ca_cert.read_bytes()
    new = pki.rotate("127.0.0.1")
    assert new != old and new == pki.fingerprint()
    assert pki.researcher_id() == rid and pki.ca_cert.read_bytes() == ca
    assert pki.server_names() == ["127.0.0.1"]  # an address goes in as an IP subjectAltName
    pki.ensure("127.0.0.1")


def test_an_existing_researcher_component_keeps_its_id(tmp_path):
    etc = tmp_path / "researcher" / "etc"
    etc.mkdir(parents=True)
    (etc / "config.ini").write_text("[default]\nid = RESEARCHER_existing\n")
    pki = CoordinatorPKI(tmp_path)
    pki.ensure("localhost")
    assert pki.researcher_id() == "RESEARCHER_existing"


def test_sign_csr_records_the_site_and_the_certificate_chains_to_the_site_ca(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    pem, record = pki.sign_csr(_csr(NODE), "site-a")
    cert = x509.load_pem_x509_certificate(pem)
    ca = x509.load_pem_x509_certificate(pki.site_ca_pem())
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    assert record.node_id == NODE and record.site == "site-a" and record.sha256 == fingerprint(pem) and record.revoked is None
    assert _mode(tmp_path / "sites.json") == 0o600
    raw = json.loads((tmp_path / "sites.json").read_text())
    assert raw["sites"]["site-a"]["serial"] == f"{cert.serial_number:x}"
    assert pki.sites.authorize(record.sha256, NODE) == (record, "")


@pytest.mark.parametrize(
    ("csr", "site", "message"),
    [
        (b"not a csr", None, "not a PEM certificate request"),
        (_csr("hospital-a"), None, r"CN must be the site's Fed-BioMed node id \(NODE_...\), got 'hospital-a'"),
        (_csr("NODE_../../etc"), None, "CN must be the site's Fed-BioMed node id"),
        (_csr(NODE, "site-b"), "site-a", "is from site 'site-b', not 'site-a'"),
        (_csr(NODE, None), None, "site name must be"),
        (_csr(NODE, "Bad Name"), None, "site name must be"),
    ],
)
def test_sign_csr_refuses_bad_requests(tmp_path, csr, site, message):
    with pytest.raises(UserError, match=message):
        CoordinatorPKI(tmp_path).sign_csr(csr, site)
    assert not (tmp_path / "sites.json").exists()


def test_one_node_id_cannot_be_two_sites_and_a_new_enrolment_replaces_the_old_certificate(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    _, first = pki.sign_csr(_csr(NODE, "site-a"))
    with pytest.raises(UserError, match="already enrolled as site 'site-a'"):
        pki.sign_csr(_csr(NODE, "site-b"))
    _, second = pki.sign_csr(_csr(NODE, "site-a"))
    assert pki.sites.authorize(first.sha256, NODE)[1].startswith("certificate not enrolled")
    assert pki.sites.authorize(second.sha256, NODE)[1] == ""


def test_revocation_and_a_claimed_node_id_are_checked_and_seen_by_a_running_reader(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    _, record = pki.sign_csr(_csr(NODE, "site-a"))
    reader = SiteRegistry(tmp_path)  # as the gRPC server holds it: cached, re-read when the file changes
    assert reader.authorize(record.sha256, NODE)[1] == ""
    assert "claims node id 'NODE_other'" in reader.authorize(record.sha256, "NODE_other")[1]
    assert "not enrolled" in reader.authorize("SHA256:" + "0" * 64, None)[1]
    revoked = pki.sites.revoke("site-a")
    assert revoked.revoked is not None
    found, reason = reader.authorize(record.sha256, NODE)
    assert found is not None and reason.startswith("site site-a was revoked at ")
    assert [r.revoked for r in pki.sites.list()] == [revoked.revoked]
    with pytest.raises(UserError, match="site 'site-x' is not enrolled"):
        pki.sites.revoke("site-x")


def test_a_broken_sites_file_is_one_clear_error(tmp_path):
    (tmp_path / "sites.json").write_text("{not json")
    with pytest.raises(UserError, match="not an enrolled-sites file"):
        SiteRegistry(tmp_path).list()


# -- the site's side ------------------------------------------------------------------------


def test_site_enrolment_round_trip(tmp_path):
    site = _site(tmp_path)
    with pytest.raises(UserError, match=r"site site-a is not enrolled .*site-agent enroll request"):
        trust.check_enrolled(site)
    csr_path = trust.request(site)
    files = trust.TrustFiles.of(site)
    assert _mode(files.key) == 0o600
    key_before = files.key.read_bytes()
    assert trust.request(site) == csr_path and files.key.read_bytes() == key_before  # a second request keeps the key
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == NODE
    pki = CoordinatorPKI(tmp_path / "home")
    pki.ensure("localhost")
    cert, _ = pki.sign_csr(csr_path.read_bytes())
    with pytest.raises(UserError, match="no coordinator fingerprint pinned"):
        trust.install(site, cert)
    info = trust.install(site, cert, pki.fingerprint())
    assert info["pins"] == [pki.fingerprint()] and info["node_id"] == NODE
    assert trust.check_enrolled(site).cert == files.cert
    summary = trust.summary(site)
    assert summary["enrolled"] and summary["problem"] is None and f"CN={NODE}" in summary["certificate"]["subject"]


def test_install_refuses_a_certificate_for_another_key_or_node(tmp_path):
    site = _site(tmp_path)
    trust.request(site)
    pki = CoordinatorPKI(tmp_path / "home")
    other_key, _ = pki.sign_csr(_csr(NODE, "site-a"))  # right node id, another key
    with pytest.raises(UserError, match="not for this site's key"):
        trust.install(site, other_key, pki.fingerprint())
    with pytest.raises(UserError, match="not a PEM certificate"):
        trust.install(site, b"junk", pki.fingerprint())
    other = _site(tmp_path, "site-b", "NODE_11111111-2222-3333-4444-555555555555")
    trust.TrustFiles.of(other).dir.mkdir(parents=True)
    trust.TrustFiles.of(other).key.write_bytes(trust.TrustFiles.of(site).key.read_bytes())  # same key, other node
    cert, _ = pki.sign_csr(trust.request(site).read_bytes())
    with pytest.raises(UserError, match=f"names node '{NODE}', this site's node is NODE_1111"):
        trust.install(other, cert, pki.fingerprint())


def test_pins_add_remove_and_a_bad_line_names_the_file_and_line(tmp_path):
    files = trust.TrustFiles(tmp_path / "trust")
    a, b = "SHA256:" + "a" * 64, "SHA256:" + "b" * 64
    assert trust.add_pin(files, a) == [a]
    assert trust.add_pin(files, b.upper().replace("SHA256:", "")) == [a, b]
    assert trust.add_pin(files, a) == [a, b]
    assert trust.remove_pin(files, a) == [b]
    with pytest.raises(UserError, match="only pinned coordinator fingerprint"):
        trust.remove_pin(files, b)
    with pytest.raises(UserError, match="is not pinned"):
        trust.remove_pin(files, a)
    files.pins.write_text(f"# rotated 2026-12\n{b}\nnonsense\n")
    with pytest.raises(UserError, match=r"coordinator-pins:3: 'nonsense' is not a certificate fingerprint"):
        trust.pins(files)


# -- the node's pinned channel --------------------------------------------------------------


def _channels(tmp_path, monkeypatch, presented: bytes | None, pins: list[str]):
    from site_agent import node_entry

    files = trust.TrustFiles(tmp_path / "trust")
    for p in pins:
        trust.add_pin(files, p)
    lines: list[tuple[str, str]] = []
    monkeypatch.setattr(node_entry, "_log", lambda level, line: lines.append((level, line)))

    def fetch(*args, **kwargs):
        if presented is None:
            raise OSError("down")
        return presented

    monkeypatch.setattr(node_entry, "fetch_certificate", fetch)
    cls = type("C", (node_entry.PinnedChannels,), {"files": files, "_root_never": b"NEVER", "_last": None})
    obj = cls()
    obj._researcher = SimpleNamespace(host="localhost", port="50051", certificate=None)
    return obj, files, lines


def test_the_node_trusts_only_a_pinned_coordinator_certificate(tmp_path, monkeypatch):
    pki = CoordinatorPKI(tmp_path / "home")
    pki.ensure("localhost")
    pem = pki.server_cert.read_bytes()
    obj, files, lines = _channels(tmp_path, monkeypatch, pem, [pki.fingerprint()])
    assert obj._pinned_root() == pem
    assert trust.read_status(files)["state"] == "trusted"
    old = pki.fingerprint()
    pki.rotate()  # another certificate at the same address
    obj, files, lines = _channels(tmp_path / "x", monkeypatch, pki.server_cert.read_bytes(), [old])
    assert obj._pinned_root() == b"NEVER"
    assert obj._pinned_root() == b"NEVER"
    status = trust.read_status(files)
    assert status["state"] == "refused" and status["seen"] == pki.fingerprint()
    (level, line), *more = lines
    assert not more, "one line per change, not one per reconnection"
    assert level == "error" and f"coordinator certificate {pki.fingerprint()} at localhost:50051 is not the pinned {old}; refusing" in line


def test_the_node_refuses_when_no_certificate_can_be_read_and_none_was_fetched(tmp_path, monkeypatch):
    obj, files, lines = _channels(tmp_path, monkeypatch, None, ["SHA256:" + "a" * 64])
    assert obj._pinned_root() == b"NEVER"
    assert "coordinator certificate unavailable" in lines[0][1]


def test_the_mirrored_fedbiomed_code_is_what_these_modules_expect(tmp_path, monkeypatch):
    monkeypatch.setenv("FBM_RESEARCHER_COMPONENT_ROOT", str(tmp_path / "researcher"))  # Fed-BioMed makes its config on import
    from coordinator import fedbiomed_transport
    from site_agent import node_entry

    fedbiomed_transport.check_upstream()
    node_entry.check_upstream()


def test_the_node_takes_the_researcher_id_from_a_pinned_certificate_only(tmp_path, monkeypatch):
    """Fed-BioMed keeps the researcher id of the first certificate it fetched; an impostor
    answering first must not leave its id behind (the real coordinator would then be refused)."""
    import asyncio

    from fedbiomed.transport import client

    from site_agent import node_entry

    real, fake = CoordinatorPKI(tmp_path / "real"), CoordinatorPKI(tmp_path / "fake")
    real.ensure("localhost")
    fake.ensure("localhost")
    presented = [fake.server_cert.read_bytes(), fake.server_cert.read_bytes(), real.server_cert.read_bytes()]
    obj, files, lines = _channels(tmp_path, monkeypatch, None, [real.fingerprint()])
    monkeypatch.setattr(type(obj), "fetch", classmethod(lambda cls, host, port: presented.pop(0)))
    monkeypatch.setattr(client, "is_server_alive", lambda host, port: True)
    monkeypatch.setattr(client, "GRPC_CLIENT_CONN_RETRY_TIMEOUT", 0.01)
    connected = []

    class Channels:
        async def connect(self):
            connected.append(True)

    grpc_client = type("G", (node_entry.PinnedConnect,), {"channels_class": type(obj)})()
    grpc_client._researcher = SimpleNamespace(host="localhost", port="50051", certificate=None)
    grpc_client._channels = Channels()
    grpc_client._id = None
    asyncio.run(grpc_client._connect())
    assert connected == [True] and not presented
    assert grpc_client._id == real.researcher_id() != fake.researcher_id()
    assert grpc_client._researcher.certificate == real.server_cert.read_bytes()
    assert [level for level, _ in lines] == ["error", "info"]  # refused once, then trusted
    assert trust.read_status(files)["state"] == "trusted"


def test_a_refusal_by_the_coordinator_is_read_from_the_node_audit_log(tmp_path):
    site = _site(tmp_path)
    log = site.node_dir / "log" / "security_audit.log"
    log.parent.mkdir(parents=True)
    message = 'Unexpected error ...: <AioRpcError of RPC that terminated with:\n\tstatus = StatusCode.PERMISSION_DENIED\n\tdetails = "not an enrolled site: site site-a was revoked at 2026-12-06T01:35:31+00:00"\n>'
    log.write_text(json.dumps({"timestamp": "2026-12-06T01:35:44Z", "message": message}) + "\n")
    assert trust.coordinator_refusal(log) == {
        "time": "2026-12-06T01:35:44Z",
        "reason": "not an enrolled site: site site-a was revoked at 2026-12-06T01:35:31+00:00",
    }
    assert trust.summary(site)["refused_by_coordinator"]["reason"].endswith("revoked at 2026-12-06T01:35:31+00:00")
    trust.write_status(trust.TrustFiles.of(site), "trusted", "SHA256:" + "a" * 64, "connected")  # the node connected since
    assert trust.summary(site)["refused_by_coordinator"] is None


# -- the coordinator's commands -------------------------------------------------------------


def _one_line_error(res, needle: str) -> None:
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr, res.stderr
    assert needle in res.stderr, res.stderr


def test_coordinator_fingerprint_rotate_enroll_revoke_commands(tmp_path):
    from conftest import cli

    home = tmp_path / "home"
    res = cli("coordinator", "fingerprint", "--home", home, "--public-host", "coord.example.org")
    assert res.returncode == 0, res.stderr
    pin = res.stdout.strip()
    assert parse_pin(pin) == pin and "valid for coord.example.org" in res.stderr
    info = json.loads(cli("coordinator", "fingerprint", "--home", home, "--json").stdout)
    assert info["fingerprint"] == pin and info["names"] == ["coord.example.org"]
    _one_line_error(cli("coordinator", "fingerprint", "--home", home, "--public-host", "other.example.org"), "coordinator certificate rotate")
    res = cli("coordinator", "certificate", "rotate", "--home", home, "--public-host", "other.example.org")
    assert res.returncode == 0, res.stderr
    new = res.stdout.strip()
    assert new != pin and cli("coordinator", "fingerprint", "--home", home).stdout.strip() == new
    (tmp_path / "bad.csr").write_text("junk")
    _one_line_error(cli("coordinator", "sites", "enroll", "--csr", tmp_path / "bad.csr", "--home", home), "not a PEM certificate request")
    (tmp_path / "a.csr").write_bytes(_csr(NODE, "site-a"))
    res = cli("coordinator", "sites", "enroll", "--csr", tmp_path / "a.csr", "--home", home, "--out", tmp_path / "a.crt")
    assert res.returncode == 0 and res.stdout.strip() == str(tmp_path / "a.crt"), res.stderr
    assert f"--coordinator-fingerprint {new}" in res.stderr
    assert "site-a" in cli("coordinator", "sites", "list", "--home", home).stdout
    _one_line_error(cli("coordinator", "sites", "revoke", "site-b", "--home", home), "site 'site-b' is not enrolled")
    assert cli("coordinator", "sites", "revoke", "site-a", "--home", home).returncode == 0
    (row,) = json.loads(cli("coordinator", "sites", "list", "--home", home, "--json").stdout)
    assert row["revoked"] and row["node_id"] == NODE
