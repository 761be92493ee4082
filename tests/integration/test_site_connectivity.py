"""`site-agent status` and `doctor` against a real coordinator (Fed-BioMed's gRPC server in
its own process): a node that connects is reported connected; a node whose coordinator
host does not match the coordinator's TLS certificate (its "Successfully connected" log
line notwithstanding) is reported not connected, with the certificate as the hint."""

import json
import subprocess
import sys
import time

import pytest
from conftest import ROOT, cli

from coordinator.testbed import enroll_site, free_port
from site_agent import config as site_config

pytestmark = pytest.mark.integration

SERVER = """
import sys, time
from coordinator.engine import Federation
Federation(sys.argv[1], host="127.0.0.1", public_host="localhost", port=int(sys.argv[2]), log=lambda m: None)
time.sleep(600)
"""


def _init(base, name: str, host: str, port: int):
    cfg = base / f"{name}.yaml"
    res = cli("site-agent", "--config", cfg, "init", "--site-name", name, "--coordinator-host", host, "--coordinator-port", port,
              "--data-dir", base / "data", "--work-dir", base / f"work-{name}", "--runtime", "process")  # fmt: skip
    assert res.returncode == 0, res.stderr
    enroll_site(base / "home", site_config.load(cfg))  # the coordinator of this test, pinned (test_site_trust covers the CLIs)
    return cfg


def _status(cfg) -> dict:
    res = cli("site-agent", "--config", cfg, "status", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_status_and_doctor_tell_connected_from_not_connected(tmp_path):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(tmp_path / "home"), str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    good = _init(tmp_path, "good", "localhost", port)  # the name in the coordinator's certificate
    wrong = _init(tmp_path, "wrong", "127.0.0.1", port)  # reaches the port, fails the TLS name check
    try:
        for cfg in (good, wrong):
            assert cli("site-agent", "--config", cfg, "start").returncode == 0
        deadline = time.monotonic() + 120
        while not (st := _status(good))["connected"] and time.monotonic() < deadline:
            time.sleep(2)
        assert st["connected"] is True, st
        assert st["connection"]["hint"] is None
        assert "connected (the node holds an open connection" in cli("site-agent", "--config", good, "status").stdout

        st = _status(wrong)
        assert st["connected"] is False and st["connection"]["reachable"] is True
        assert "is for localhost, not the host this site dials '127.0.0.1'" in st["connection"]["hint"]  # the node's own refusal
        assert "trust add" not in st["connection"]["hint"]  # pinned: nothing to rotate
        rows = {r["name"]: r for r in json.loads(cli("site-agent", "--config", wrong, "doctor", "--json", "--min-free-gb", "0").stdout)}
        assert rows["coordinator reachable"]["ok"] is True
        assert rows["coordinator certificate"]["ok"] is False and "--public-host 127.0.0.1" in rows["coordinator certificate"]["hint"]
        assert rows["node connected"]["ok"] is False and rows["node connected"]["hint"]
        rows = {r["name"]: r for r in json.loads(cli("site-agent", "--config", good, "doctor", "--json", "--min-free-gb", "0").stdout)}
        assert rows["coordinator certificate"]["ok"] is True and rows["node connected"]["ok"] is True
    finally:
        for cfg in (good, wrong):
            cli("site-agent", "--config", cfg, "stop")
        server.terminate()
        server.wait(timeout=30)
