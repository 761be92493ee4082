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
    with pytest.raises(UserError, match=r"not 'other\.example\.org'.*coordinator certificate rotate") as err:
        pki.ensure("other.example.org")
    # the order an operator can follow (docs/guide/security.md): rotate, pin at every site, restart, remove the old pin
    text = str(err.value)
    assert text.index("certificate rotate") < text.index("trust add") < text.index("restart") < text.index("remove the old pin")
    assert pki.fingerprint() == first  # refused, not replaced


def test_rotation_changes_the_fingerprint_keeps_the_researcher_id_and_the_site_ca(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    pki.ensure("localhost")
    old, rid, ca = pki.fingerprint(), pki.researcher_id(), pki.ca_cert.read_bytes()
    new = pki.rotate("127.0.0.1")
    assert new != old and new == pki.fingerprint()
    assert pki.researcher_id() == rid and pki.ca_cert.read_bytes() == ca
    assert pki.server_names() == ["127.0.0.1", "localhost"]  # an address goes in as an IP subjectAltName; the old name is kept
    assert pki.certificate().subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "127.0.0.1"
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


# -- review fixes: re-enrolment, the site CA, validity, key types, permissions, the servicer --


NODE2 = "NODE_11111111-2222-3333-4444-555555555555"


def _at(monkeypatch, when):
    """Make the coordinator PKI sign as if it were ``when`` (certificates valid from then)."""
    from coordinator import pki as pki_module

    monkeypatch.setattr(pki_module, "_now", lambda: when)


def _utcnow():
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)


def test_re_enrolling_a_site_from_another_node_needs_replace(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    _, first = pki.sign_csr(_csr(NODE, "site-a"))
    assert pki.replaced is None
    with pytest.raises(UserError, match=f"site 'site-a' is enrolled with node {NODE}, this request is from node {NODE2}.*--replace") as err:
        pki.sign_csr(_csr(NODE2, "site-a"))
    assert "\n" not in str(err.value)
    assert pki.sites.authorize(first.sha256, NODE) == (first, "")  # refused: nothing replaced
    _, same = pki.sign_csr(_csr(NODE, "site-a"))  # the same node again: a new certificate, no flag needed
    assert pki.replaced == first
    _, second = pki.sign_csr(_csr(NODE2, "site-a"), replace=True)
    assert pki.replaced == same and second.node_id == NODE2
    assert pki.sites.authorize(same.sha256, NODE)[1].startswith("certificate not enrolled")
    pki.sites.revoke("site-a")
    _, third = pki.sign_csr(_csr(NODE, "site-a"))  # a revoked site may come back from any node
    assert third.node_id == NODE and pki.sites.authorize(third.sha256, NODE)[1] == ""


def test_a_missing_site_ca_file_is_refused_not_regenerated(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    pki.ensure("localhost")
    ca_cert = pki.ca_cert.read_bytes()
    pki.ca_key.unlink()
    with pytest.raises(UserError, match=r"site-ca\.key is missing \(but site-ca\.crt is there\): every enrolled site's certificate depends"):
        pki.ensure()
    assert pki.ca_cert.read_bytes() == ca_cert and not pki.ca_key.exists()
    # both gone while a site is enrolled: refused, naming the site and the way on
    home = tmp_path / "b"
    pki = CoordinatorPKI(home)
    pki.sign_csr(_csr(NODE, "site-a"))
    pki.ca_key.unlink()
    pki.ca_cert.unlink()
    with pytest.raises(UserError, match=r"site-ca\.crt are missing: every enrolled site's certificate \(1 site\(s\): site-a\).*backup.*sites revoke") as err:
        pki.sign_csr(_csr(NODE2, "site-b"))
    assert "\n" not in str(err.value) and not pki.ca_key.exists()
    pki.sites.revoke("site-a")
    pki.ensure()  # every site revoked: a new site CA, for the sites enrolling again
    assert pki.ca_key.is_file() and pki.ca_cert.is_file()


def test_rotation_can_drop_the_old_names(tmp_path):
    pki = CoordinatorPKI(tmp_path)
    pki.ensure("old.example.org")
    pki.rotate("new.example.org")
    assert pki.server_names() == ["new.example.org", "old.example.org"]
    pki.rotate()  # no host: the newest one stays first
    assert pki.server_names() == ["new.example.org", "old.example.org"]
    pki.rotate("new.example.org", keep_names=False)
    assert pki.server_names() == ["new.example.org"]


def test_names_with_a_trailing_newline_are_refused(tmp_path):
    from coordinator.site_tokens import check_site_name

    with pytest.raises(UserError, match="site name must be"):
        check_site_name("site-a\n")
    with pytest.raises(UserError, match="CN must be the site's Fed-BioMed node id"):
        CoordinatorPKI(tmp_path).sign_csr(_csr(NODE + "\n", "site-a"))
    with pytest.raises(UserError, match="site name must be"):
        CoordinatorPKI(tmp_path).sign_csr(_csr(NODE, "site-a\n"))
    with pytest.raises(UserError, match="site_name"):
        site_config.validate({"site_name": "site-a\n", "coordinator": {"host": "localhost", "port": 50051}, "data_dir": "/d", "work_dir": "/w"}, "test")


def _csr_with(key) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NODE), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "site-a")])
    return x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_only_p256_or_rsa_2048_keys_are_signed_and_site_certificates_carry_key_usage(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import rsa

    pki = CoordinatorPKI(tmp_path)
    with pytest.raises(UserError, match=r"key is EC secp384r1; the coordinator accepts EC P-256 .* or RSA of 2048 bits or more"):
        pki.sign_csr(_csr_with(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(UserError, match="key is RSA of 1024 bits"):
        pki.sign_csr(_csr_with(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    assert not (tmp_path / "sites.json").exists()
    pem, _ = pki.sign_csr(_csr_with(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    usage = x509.load_pem_x509_certificate(pem).extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign


def test_certificate_validity_states():
    import datetime as dt

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key()).serial_number(1)
        .not_valid_before(start).not_valid_after(start + dt.timedelta(days=100)).sign(key, hashes.SHA256())
    )  # fmt: skip
    assert trust.certificate_validity(cert, start - dt.timedelta(days=1))[0] == "not yet valid"
    assert trust.certificate_validity(cert, start + dt.timedelta(days=10)) == ("valid", "valid from 2026-01-01T00:00:00+00:00 until 2026-04-11T00:00:00+00:00")
    state, line = trust.certificate_validity(cert, start + dt.timedelta(days=90))
    assert state == "expiring" and line.startswith("expires in 10 day(s), at 2026-04-11")
    state, line = trust.certificate_validity(cert, start + dt.timedelta(days=101))
    assert state == "expired" and line.startswith("expired at 2026-04-11T00:00:00+00:00 (valid from 2026-01-01")


def _enrolled_site(tmp_path, monkeypatch, signed_at=None):
    """A site enrolled with a certificate signed as if at ``signed_at`` (SITE_DAYS of validity from then)."""
    site = _site(tmp_path)
    csr = trust.request(site).read_bytes()
    pki = CoordinatorPKI(tmp_path / "home")
    pki.ensure("localhost")
    with pytest.MonkeyPatch.context() as mp:
        if signed_at is not None:
            _at(mp, signed_at)
        cert, _ = pki.sign_csr(csr)
    trust.install(site, cert, pki.fingerprint())
    return site, pki


@pytest.mark.parametrize(
    ("days_ago", "validity", "ok", "line"),
    [(900, "expired", False, "SITE CERTIFICATE EXPIRED: expired at"), (-10, "not yet valid", False, "SITE CERTIFICATE NOT YET VALID")],
)
def test_status_and_doctor_show_a_site_certificate_outside_its_validity(tmp_path, monkeypatch, days_ago, validity, ok, line):
    import datetime as dt

    from site_agent.commands.lifecycle import trust_line
    from site_agent.doctor import check_trust

    site, _ = _enrolled_site(tmp_path, monkeypatch, _utcnow() - dt.timedelta(days=days_ago))
    info = trust.summary(site)
    assert info["enrolled"] and info["certificate"]["validity"] == validity
    assert trust_line(info).startswith(line)
    rows = {c.name: c for c in check_trust(site, reachable=False)}
    assert rows["site certificate"].ok is ok and validity.split()[0] in rows["site certificate"].detail
    assert "valid from" in rows["site certificate"].detail  # the dates, not "valid until <past date>"


def test_doctor_warns_30_days_before_the_site_certificate_expires(tmp_path, monkeypatch):
    import datetime as dt

    from coordinator.pki import SITE_DAYS
    from site_agent.commands.lifecycle import trust_line
    from site_agent.doctor import check_trust

    site, _ = _enrolled_site(tmp_path, monkeypatch, _utcnow() - dt.timedelta(days=SITE_DAYS - 10))
    rows = {c.name: c for c in check_trust(site, reachable=False)}
    row = rows["site certificate"]
    assert row.ok is True and row.warning and row.detail.startswith("expires in ") and "enroll request" in row.hint
    assert "site certificate expires in" in trust_line(trust.summary(site))
    fresh, _ = _enrolled_site(tmp_path / "fresh", monkeypatch)
    row = {c.name: c for c in check_trust(fresh, reachable=False)}["site certificate"]
    assert row.ok is True and not row.warning


def test_the_node_records_its_own_expired_certificate_instead_of_trusted(tmp_path, monkeypatch):
    import datetime as dt

    from site_agent import node_entry

    site, pki = _enrolled_site(tmp_path, monkeypatch, _utcnow() - dt.timedelta(days=900))
    files = trust.TrustFiles.of(site)
    lines: list[tuple[str, str]] = []
    monkeypatch.setattr(node_entry, "_log", lambda level, line: lines.append((level, line)))
    cls = type("C", (node_entry.PinnedChannels,), {"files": files, "_root_never": b"NEVER", "_last": None})
    assert cls.judge("localhost", 50051, pki.server_cert.read_bytes()) == pki.server_cert.read_bytes()  # the coordinator decides
    status = trust.read_status(files)
    assert status["state"] == "refused" and "this site's certificate" in status["message"] and "expired at" in status["message"]
    assert [level for level, _ in lines] == ["error"]


def test_node_start_records_its_own_expired_certificate_and_refuses_unsafe_pins(tmp_path, monkeypatch):
    import datetime as dt

    from fedbiomed.transport import client, controller

    from site_agent import node_entry

    monkeypatch.setattr(client, "Channels", client.Channels)  # restored after the test: install replaces them
    monkeypatch.setattr(controller, "GrpcClient", controller.GrpcClient)
    site, pki = _enrolled_site(tmp_path, monkeypatch, _utcnow() - dt.timedelta(days=900))
    files = trust.TrustFiles.of(site)
    lines: list[tuple[str, str]] = []
    monkeypatch.setattr(node_entry, "_log", lambda level, line: lines.append((level, line)))
    channels = node_entry.install(files.dir)
    status = trust.read_status(files)
    assert status["state"] == "refused" and "expired at" in status["message"] and lines[0][0] == "error"
    channels.judge("localhost", 50051, pki.server_cert.read_bytes())  # then connecting: the same verdict, no second line
    assert len(lines) == 1 and trust.read_status(files)["state"] == "refused"
    files.pins.chmod(0o664)
    with pytest.raises(UserError, match=r"coordinator-pins is writable by group or others \(mode 664\).*chmod go-w"):
        node_entry.install(files.dir)


def _pinned(tmp_path, monkeypatch, pki):
    from site_agent import node_entry

    files = trust.TrustFiles(tmp_path / "trust")
    trust.add_pin(files, pki.fingerprint())
    lines: list[tuple[str, str]] = []
    monkeypatch.setattr(node_entry, "_log", lambda level, line: lines.append((level, line)))
    return type("C", (node_entry.PinnedChannels,), {"files": files, "_root_never": b"NEVER", "_last": None}), files, lines


def test_a_pinned_coordinator_certificate_for_another_host_is_refused_with_the_reason(tmp_path, monkeypatch):
    pki = CoordinatorPKI(tmp_path / "home")
    pki.ensure("coord.example.org")
    cls, files, lines = _pinned(tmp_path, monkeypatch, pki)
    assert cls.judge("localhost", 50051, pki.server_cert.read_bytes()) is None
    status = trust.read_status(files)
    assert status["state"] == "refused" and status["seen"] == pki.fingerprint()
    assert "is for coord.example.org, not the host this site dials 'localhost': update coordinator.host in site.yaml" in status["message"]
    assert cls.judge("coord.example.org", 50051, pki.server_cert.read_bytes()) == pki.server_cert.read_bytes()
    assert trust.read_status(files)["state"] == "trusted"


def test_a_pinned_coordinator_certificate_that_expired_is_refused(tmp_path, monkeypatch):
    import datetime as dt

    from coordinator.pki import SERVER_DAYS

    pki = CoordinatorPKI(tmp_path / "home")
    with pytest.MonkeyPatch.context() as mp:
        _at(mp, _utcnow() - dt.timedelta(days=SERVER_DAYS + 1))
        pki.ensure("localhost")
    cls, files, _ = _pinned(tmp_path, monkeypatch, pki)
    assert cls.judge("localhost", 50051, pki.server_cert.read_bytes()) is None
    message = trust.read_status(files)["message"]
    assert "(pinned) is expired at" in message and "coordinator certificate rotate" in message


def test_the_trust_folder_is_private_and_unsafe_pins_are_refused(tmp_path, monkeypatch):
    from site_agent.doctor import check_trust

    files = trust.TrustFiles(tmp_path / "x" / "trust")
    trust.add_pin(files, "SHA256:" + "a" * 64)
    assert _mode(files.dir) == 0o700 and _mode(files.pins) == 0o600
    site, _ = _enrolled_site(tmp_path, monkeypatch)
    files = trust.TrustFiles.of(site)
    assert _mode(files.dir) == 0o700 and _mode(files.pins) == 0o600
    trust.check_permissions(files)
    files.dir.chmod(0o777)
    with pytest.raises(UserError, match=r"trust is writable by group or others \(mode 777\)"):
        trust.check_permissions(files)
    files.dir.chmod(0o700)
    files.pins.chmod(0o606)
    with pytest.raises(UserError, match="coordinator-pins is writable by group or others"):
        trust.check_enrolled(site)
    assert "writable by group or others" in trust.summary(site)["unsafe"]
    rows = {c.name: c for c in check_trust(site, reachable=False)}
    assert rows["trust files"].ok is False and "coordinator-pins is writable" in rows["trust files"].detail


# -- the coordinator's servicer (no network: a fake call context) ---------------------------


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self, pem: bytes | None, peer: str = "ipv4:10.0.0.1:40000") -> None:
        self.pem, self._peer, self.aborted = pem, peer, None

    def auth_context(self):
        return {"x509_pem_cert": [self.pem]} if self.pem else {}

    def peer(self):
        return self._peer

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise _Aborted(details)


def _servicer(tmp_path, monkeypatch):
    monkeypatch.setenv("FBM_RESEARCHER_COMPONENT_ROOT", str(tmp_path / "researcher"))  # Fed-BioMed makes its config on import
    from coordinator import fedbiomed_transport

    pki = CoordinatorPKI(tmp_path / "home")
    pem, record = pki.sign_csr(_csr(NODE, "site-a"))
    servicer = fedbiomed_transport.EnrolledServicer(agent_store=None, on_message=None, registry=SiteRegistry(tmp_path / "home"))
    return fedbiomed_transport, servicer, pem, pki


def _chunks(data: bytes, size: int):
    parts = [data[i : i + size] for i in range(0, len(data), size)] or [b""]

    async def gen():
        for n, part in enumerate(parts, 1):
            yield SimpleNamespace(bytes_=part, size=len(parts), iteration=n)

    return gen()


def test_a_reply_over_the_size_cap_is_aborted_with_one_line_naming_the_peer(tmp_path, monkeypatch, caplog):
    import asyncio

    import grpc

    transport, servicer, pem, _ = _servicer(tmp_path, monkeypatch)
    assert transport.MAX_REPLY_BYTES == 1 << 30
    monkeypatch.setattr(transport, "MAX_REPLY_BYTES", 100)
    ctx = _Context(pem)
    with caplog.at_level("WARNING", logger="coordinator.trust"), pytest.raises(_Aborted):
        asyncio.run(servicer.ReplyTask(_chunks(b"x" * 250, 40), ctx))
    assert ctx.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert [r.getMessage() for r in caplog.records] == ["aborted a reply from ipv4:10.0.0.1:40000: over 100 bytes reassembled"]


def test_a_reply_without_a_node_id_is_refused(tmp_path, monkeypatch):
    import asyncio

    import grpc
    from fedbiomed.common.serializer import Serializer

    _, servicer, pem, _ = _servicer(tmp_path, monkeypatch)
    for body in ({"request_id": "r1"}, {"request_id": "r1", "node_id": 12}):
        ctx = _Context(pem)
        with pytest.raises(_Aborted):
            asyncio.run(servicer.ReplyTask(_chunks(Serializer.dumps(body), 1 << 20), ctx))
        assert ctx.aborted[0] == grpc.StatusCode.PERMISSION_DENIED and "claims no node id" in ctx.aborted[1]


def test_refusals_clip_the_claimed_node_id_and_hide_an_unreadable_sites_file(tmp_path, monkeypatch, caplog):
    import asyncio

    _, servicer, pem, pki = _servicer(tmp_path, monkeypatch)
    ctx = _Context(pem)
    with caplog.at_level("WARNING", logger="coordinator.trust"), pytest.raises(_Aborted):
        asyncio.run(servicer._check(ctx, "NODE_" + "x" * 5000, claim_required=True))
    assert "claims node id 'NODE_xxx" in ctx.aborted[1] and len(ctx.aborted[1]) < 200
    (tmp_path / "home" / "sites.json").write_text("{broken")
    ctx = _Context(pem, "ipv4:10.0.0.2:1")
    with caplog.at_level("WARNING", logger="coordinator.trust"), pytest.raises(_Aborted):
        asyncio.run(servicer._check(ctx, NODE))
    assert ctx.aborted[1] == "not an enrolled site: the coordinator cannot read its enrolled sites now"
    assert "not an enrolled-sites file" in caplog.records[-1].getMessage()  # the detail: in the coordinator's log only


def test_the_refusal_log_is_rate_limited_per_peer_and_certificate_and_bounded(tmp_path, monkeypatch, caplog):
    import asyncio

    transport, servicer, pem, pki = _servicer(tmp_path, monkeypatch)

    def refuse(peer: str) -> None:
        with pytest.raises(_Aborted):
            asyncio.run(servicer._check(_Context(pem, peer), f"NODE_{peer[-4:]}"))

    with caplog.at_level("WARNING", logger="coordinator.trust"):
        for port in range(40000, 40005):  # one peer reconnecting (a new port each time), varying claims
            refuse(f"ipv4:10.0.0.1:{port}")
        assert len(caplog.records) == 1 and "claims node id" in caplog.records[0].getMessage()
        pki.sites.revoke("site-a")
        for port in range(40005, 40010):  # another kind of refusal: one more line
            refuse(f"ipv4:10.0.0.1:{port}")
        assert len(caplog.records) == 2 and "was revoked" in caplog.records[1].getMessage()
        monkeypatch.setattr(transport, "_LOG_KEYS", 3)
        for n in range(10):
            refuse(f"ipv4:10.0.1.{n}:5000")
    assert len(caplog.records) == 12 and len(servicer._logged) == 3


def test_coordinator_enroll_replace_and_sites_list_expiry_commands(tmp_path):
    from conftest import cli

    home = tmp_path / "home"
    (tmp_path / "a.csr").write_bytes(_csr(NODE, "site-a"))
    (tmp_path / "b.csr").write_bytes(_csr(NODE2, "site-a"))
    assert cli("coordinator", "sites", "enroll", "--csr", tmp_path / "a.csr", "--home", home, "--out", tmp_path / "a.crt").returncode == 0
    _one_line_error(
        cli("coordinator", "sites", "enroll", "--csr", tmp_path / "b.csr", "--home", home, "--out", tmp_path / "b.crt"),
        f"site 'site-a' is enrolled with node {NODE}, this request is from node {NODE2}",
    )
    old = fingerprint((tmp_path / "a.crt").read_bytes())
    res = cli("coordinator", "sites", "enroll", "--csr", tmp_path / "b.csr", "--home", home, "--out", tmp_path / "b.crt", "--replace")
    assert res.returncode == 0, res.stderr
    new = fingerprint((tmp_path / "b.crt").read_bytes())
    assert f"replaced site site-a: node {NODE} -> {NODE2}, certificate {old} -> {new}" in res.stderr
    (row,) = json.loads(cli("coordinator", "sites", "list", "--home", home, "--json").stdout)
    expires = x509.load_pem_x509_certificate((tmp_path / "b.crt").read_bytes()).not_valid_after.isoformat()
    assert row["node_id"] == NODE2 and row["expires"].startswith(expires)
    assert "expires" in cli("coordinator", "sites", "list", "--home", home).stdout
