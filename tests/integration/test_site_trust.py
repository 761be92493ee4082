"""Trust that survives restarts, and site authentication, with real processes on loopback
(issue 23, parts 3 and 4): a Fed-BioMed node process of an enrolled site, coordinators as
their own processes on the port it dials.

- A coordinator with another certificate (same site CA and enrolled sites, so only the pin
  can tell) never sees the node, also after the node restarts; the site's status says why.
  The real coordinator on the same port is then joined without touching the node.
- Rotation as documented: rotate, add the new pin, restart the coordinator, remove the old pin.
- Clients without a site certificate, or with one the site CA did not sign, get no task.
- A revoked site gets nothing from its next request on, without a coordinator restart.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import ROOT, cli
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coordinator.pki import CoordinatorPKI, key_pem
from coordinator.testbed import Testbed
from site_agent import trust
from site_agent.runtime import ProcessRuntime, parent_death_signal, pid_alive

pytestmark = pytest.mark.integration

SERVER = """
import json, logging, sys, time
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
from coordinator.engine import Federation
f = Federation(sys.argv[1], host="127.0.0.1", public_host="localhost", port=int(sys.argv[2]), log=lambda m: None)
while True:
    print(json.dumps(f.online_nodes()), flush=True)
    time.sleep(1)
"""


class Coordinator:
    """A Federation in its own process printing the nodes that answer its pings, once a second."""

    def __init__(self, home: Path, port: int, log: Path):
        self.online: list[str] | None = None
        self.seen_nodes: set[str] = set()
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(home), str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=open(log, "ab"), text=True, preexec_fn=parent_death_signal(os.getpid()))  # fmt: skip
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.online = json.loads(line)
            self.seen_nodes.update(self.online)

    def wait(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online is not None and predicate(self.online):
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("trust"), n_sites=1, cases=[2], device="cpu", auto_approve=False, reference_labels=False)
    bed.setup_sites()  # enrols the site with the testbed's coordinator home and pins it
    yield bed
    bed.teardown()
    assert not [p for p in bed.pids() if pid_alive(p)]


def _node_id(bed) -> str:
    return trust.node_id(bed.sites[0])


def _get_task(port: int, credentials, node_id: str) -> grpc.RpcError | list:
    """One GetTask long-poll as a node makes it; what came back (a list of chunks) or the error."""
    from fedbiomed.common.message import TaskRequest
    from fedbiomed.transport.protocols.researcher_pb2_grpc import ResearcherServiceStub

    with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
        try:
            return list(ResearcherServiceStub(channel).GetTaskUnary(TaskRequest(node=node_id).to_proto(), timeout=6))
        except grpc.RpcError as exc:
            return exc


def _self_made(cn: str) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "site-1")])
    now = time.time()
    import datetime as dt

    start = dt.datetime.fromtimestamp(now - 60, dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(start + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def test_another_coordinator_is_refused_rotation_works_unenrolled_and_revoked_clients_get_nothing(bed):
    """One node process through the four cases in order (each needs the state the previous left)."""
    site = bed.sites[0]
    files = trust.TrustFiles.of(site)
    # the impostor holds the real site CA and enrolment records: only the pinned certificate tells them apart
    impostor = bed.workdir / "impostor"
    (impostor / "pki").mkdir(parents=True)
    for name in ("site-ca.key", "site-ca.crt"):
        shutil.copy2(bed.home / "pki" / name, impostor / "pki" / name)
    shutil.copy2(bed.home / "sites.json", impostor / "sites.json")
    fake_pin = CoordinatorPKI(impostor).rotate("localhost")
    assert fake_pin != CoordinatorPKI(bed.home).fingerprint()

    other = Coordinator(impostor, bed.port, bed.workdir / "impostor.log")
    try:
        runtime = ProcessRuntime(site)
        runtime.start(die_with_parent=True)
        for attempt in ("first start", "after a restart"):
            deadline = time.monotonic() + 60
            while (trust.read_status(files) or {}).get("seen") != fake_pin and time.monotonic() < deadline:
                time.sleep(1)
            status = trust.read_status(files)
            assert status and status["state"] == "refused" and status["seen"] == fake_pin, (attempt, status)
            assert not other.wait(lambda online: bool(online), timeout=8), attempt  # the node never answers it
            if attempt == "first start":
                runtime.stop()
                files.status.unlink()
                runtime.start(die_with_parent=True)
        assert not other.seen_nodes
        log = site.log_file.read_text()
        assert f"coordinator certificate {fake_pin} at localhost:{bed.port} is not the pinned" in log
        out = cli("site-agent", "--config", site.path, "status").stdout
        assert "coordinator trust: REFUSED" in out and fake_pin in out
        rows = {r["name"]: r for r in json.loads(cli("site-agent", "--config", site.path, "doctor", "--json", "--min-free-gb", "0").stdout)}
        assert rows["site enrolled"]["ok"] is True
        assert rows["coordinator pinned"]["ok"] is False and fake_pin in rows["coordinator pinned"]["detail"]
    finally:
        other.stop()

    real = Coordinator(bed.home, bed.port, bed.workdir / "coordinator.log")  # the pinned one, same port: the node joins by itself
    try:
        assert real.wait(lambda online: online == [_node_id(bed)], timeout=90), real.online
        assert trust.read_status(files)["state"] == "trusted"
        real = _rotation(bed, real)  # (the second coordinator process logs to the same file)
        _unenrolled_clients_get_nothing(bed)
        _a_revoked_site_gets_nothing(bed, real)
    finally:
        real.stop()
    text = (bed.workdir / "coordinator.log").read_text()
    assert "refused" in text and "site site-1 was revoked" in text, text[-2000:]
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in text  # gRPC logs a handshake without a site certificate


def _rotation(bed, real: Coordinator) -> Coordinator:
    """docs/guide/security.md's rotation: rotate (the running coordinator keeps its certificate),
    add the new pin at the site, restart the coordinator, remove the old pin; the node follows
    without a restart."""
    site = bed.sites[0]
    old = cli("coordinator", "fingerprint", "--home", bed.home).stdout.strip()
    res = cli("coordinator", "certificate", "rotate", "--home", bed.home)
    assert res.returncode == 0, res.stderr
    new = res.stdout.strip()
    assert new.startswith("SHA256:") and new != old
    assert cli("site-agent", "--config", site.path, "trust", "add", new).returncode == 0
    real.stop()
    real = Coordinator(bed.home, bed.port, bed.workdir / "coordinator.log")
    assert real.wait(lambda online: online == [_node_id(bed)], timeout=90), real.online
    assert trust.read_status(trust.TrustFiles.of(site))["seen"] == new
    res = cli("site-agent", "--config", site.path, "trust", "remove", old)
    assert res.returncode == 0 and old not in res.stdout, res.stderr
    return real


def _unenrolled_clients_get_nothing(bed) -> None:
    server_cert = (bed.home / "pki" / "server.crt").read_bytes()
    node_id = _node_id(bed)
    anonymous = _get_task(bed.port, grpc.ssl_channel_credentials(root_certificates=server_cert), node_id)
    assert isinstance(anonymous, grpc.RpcError) and anonymous.code() == grpc.StatusCode.UNAVAILABLE, anonymous
    key, cert = _self_made(node_id)  # claims the enrolled node's id, not signed by the site CA
    self_made = _get_task(bed.port, grpc.ssl_channel_credentials(server_cert, key, cert), node_id)
    assert isinstance(self_made, grpc.RpcError) and self_made.code() == grpc.StatusCode.UNAVAILABLE, self_made


def _a_revoked_site_gets_nothing(bed, real: Coordinator) -> None:
    site = bed.sites[0]
    files = trust.TrustFiles.of(site)
    server_cert = (bed.home / "pki" / "server.crt").read_bytes()
    site_creds = grpc.ssl_channel_credentials(server_cert, files.key.read_bytes(), files.cert.read_bytes())
    wrong_id = _get_task(bed.port, site_creds, "NODE_00000000-0000-0000-0000-000000000000")  # enrolled, but not that node
    assert isinstance(wrong_id, grpc.RpcError) and wrong_id.code() == grpc.StatusCode.PERMISSION_DENIED, wrong_id

    res = cli("coordinator", "sites", "revoke", "site-1", "--home", bed.home)
    assert res.returncode == 0, res.stderr
    listed = json.loads(cli("coordinator", "sites", "list", "--home", bed.home, "--json").stdout)
    assert listed[0]["site"] == "site-1" and listed[0]["revoked"]
    # the node's poll in flight is answered with a refusal at its next task (the ping): it drops off
    assert real.wait(lambda online: online == [], timeout=30), real.online
    time.sleep(3)
    assert real.online == []
    revoked = _get_task(bed.port, site_creds, _node_id(bed))
    assert isinstance(revoked, grpc.RpcError) and revoked.code() == grpc.StatusCode.PERMISSION_DENIED, revoked
    assert "site site-1 was revoked" in revoked.details()
    deadline = time.monotonic() + 30  # the node logs the refusal at its next poll (every ~2 s)
    while not trust.summary(site)["refused_by_coordinator"] and time.monotonic() < deadline:
        time.sleep(1)
    out = cli("site-agent", "--config", site.path, "status").stdout
    assert "coordinator trust: REFUSED BY THE COORDINATOR" in out and "site site-1 was revoked" in out, out
