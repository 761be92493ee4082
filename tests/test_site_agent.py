"""site-agent against a real Fed-BioMed node component (no coordinator needed)."""

import configparser
import json
import time

import psutil
import pytest
from conftest import cli

from fedimg_testing.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    base = tmp_path_factory.mktemp("site")
    cfg = base / "site.yaml"
    res = cli(
        "site-agent", "--config", cfg, "init", "--site-name", "site-t", "--coordinator-host", "127.0.0.1",
        "--coordinator-port", "1", "--data-dir", base / "data", "--work-dir", base / "work", "--runtime", "process",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    write_synthetic_dataset(base / "data" / "ds", seed=1, n_cases=2, shape=(12, 12, 12))
    return base, cfg


def test_init_turns_plan_approval_on_and_default_plans_off(site):
    base, cfg = site
    ini = configparser.ConfigParser()
    ini.read(base / "work" / "node" / "etc" / "config.ini")
    assert ini.getboolean("security", "training_plan_approval") is True
    assert ini.getboolean("security", "allow_default_training_plans") is False
    assert ini.getboolean("security", "allow_federated_analytics") is False
    assert ini.get("default", "name") == "site-t"
    assert ini.get("researcher", "ip") == "127.0.0.1"


def test_init_refuses_to_overwrite(site):
    base, cfg = site
    res = cli("site-agent", "--config", cfg, "init", "--site-name", "x", "--coordinator-host", "h",
              "--data-dir", base / "d", "--work-dir", base / "w")  # fmt: skip
    assert res.returncode == 2
    assert "already exists" in res.stderr and "Traceback" not in res.stderr


def test_dataset_add_list_remove(site):
    base, cfg = site
    res = cli("site-agent", "--config", cfg, "dataset", "add", base / "data" / "ds", "--tag", "t1")
    assert res.returncode == 0, res.stderr
    listed = json.loads(cli("site-agent", "--config", cfg, "dataset", "list", "--json").stdout)
    assert len(listed) == 1 and listed[0]["tags"] == ["t1"]
    assert listed[0]["data_type"] == "custom"
    # the description the node shows researchers is built from allowlisted fields only
    assert listed[0]["description"] == "synthetic: 2 CT cases, classes: organ_a, organ_b"
    again = cli("site-agent", "--config", cfg, "dataset", "add", base / "data" / "ds", "--tag", "t2")
    assert again.returncode == 2 and "already registered" in again.stderr
    res = cli("site-agent", "--config", cfg, "dataset", "remove", listed[0]["dataset_id"])
    assert res.returncode == 0
    assert json.loads(cli("site-agent", "--config", cfg, "dataset", "list", "--json").stdout) == []


def test_dataset_add_refuses_invalid_folders(site):
    base, cfg = site
    (base / "data" / "empty").mkdir(parents=True, exist_ok=True)
    res = cli("site-agent", "--config", cfg, "dataset", "add", base / "data" / "empty", "--tag", "x")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0  # one line
    assert "manifest.json: missing" in res.stderr and "Traceback" not in res.stderr
    res = cli("site-agent", "--config", cfg, "dataset", "add", base / "nowhere", "--tag", "x")
    assert res.returncode == 2 and "not a folder" in res.stderr


def test_plans_list_empty_and_unknown_id(site):
    base, cfg = site
    res = cli("site-agent", "--config", cfg, "plans", "list", "--json")
    assert res.returncode == 0 and json.loads(res.stdout) == []
    res = cli("site-agent", "--config", cfg, "plans", "approve", "training_plan_nope")
    assert res.returncode == 2 and "no training plan with id" in res.stderr


def test_doctor_reports_pass_and_fail(site):
    base, cfg = site
    res = cli("site-agent", "--config", cfg, "doctor", "--min-free-gb", "0")
    assert res.returncode == 1  # the coordinator (port 1) is unreachable
    assert "coordinator reachable" in res.stdout and "FAIL" in res.stdout
    assert "training-plan approval on" in res.stdout and "PASS" in res.stdout


def _enroll_with_the_clis(base, cfg) -> None:
    """The enrolment as the site's staff and the coordinator's operator run it (docs/guide/security.md)."""
    home = base / "coordinator-home"
    res = cli("site-agent", "--config", cfg, "enroll", "request")
    assert res.returncode == 0, res.stderr
    csr = res.stdout.strip()
    res = cli("coordinator", "sites", "enroll", "--csr", csr, "--home", home, "--out", base / "site-t.crt")
    assert res.returncode == 0, res.stderr
    pin = cli("coordinator", "fingerprint", "--home", home).stdout.strip()
    assert pin.startswith("SHA256:") and len(pin) == 7 + 64
    res = cli("site-agent", "--config", cfg, "enroll", "install", base / "site-t.crt", "--coordinator-fingerprint", pin)
    assert res.returncode == 0, res.stderr
    listed = json.loads(cli("coordinator", "sites", "list", "--home", home, "--json").stdout)
    assert [r["site"] for r in listed] == ["site-t"] and listed[0]["revoked"] is None


def test_process_runtime_start_status_stop_leaves_nothing(site):
    base, cfg = site
    res = cli("site-agent", "--config", cfg, "start", "--runtime", "process")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr  # one line: how to enrol
    assert "is not enrolled" in res.stderr and "site-agent enroll request" in res.stderr and not (base / "work" / "node.pid").exists()
    _enroll_with_the_clis(base, cfg)
    res = cli("site-agent", "--config", cfg, "start", "--runtime", "process", env={"FBM_DEFAULT_DB": "/tmp/other.json"})
    assert res.returncode == 0, res.stderr
    pid = json.loads((base / "work" / "node.pid").read_text())["pid"]
    proc = psutil.Process(pid)
    assert "site_agent.node_entry" in " ".join(proc.cmdline())  # Fed-BioMed's node_pm behind the pinned transport
    env = proc.environ()
    assert env["FBM_SECURITY_TRAINING_PLAN_APPROVAL"] == "True"
    assert "FBM_DEFAULT_DB" not in env  # inherited FBM_* overrides never reach the node
    st = cli("site-agent", "--config", cfg, "status", "--json")
    assert st.returncode == 0 and json.loads(st.stdout)["running"] is True
    again = cli("site-agent", "--config", cfg, "start", "--runtime", "process")  # idempotent
    assert json.loads((base / "work" / "node.pid").read_text())["pid"] == pid
    assert again.returncode == 0
    res = cli("site-agent", "--config", cfg, "stop")
    assert res.returncode == 0
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    st = cli("site-agent", "--config", cfg, "status")
    assert st.returncode == 3 and "stopped" in st.stdout
    assert cli("site-agent", "--config", cfg, "logs", "-n", "5").returncode == 0


def test_every_verb_has_help():
    for args in (["--help"], ["init", "--help"], ["dataset", "add", "--help"], ["dataset", "list", "--help"],
                 ["dataset", "remove", "--help"], ["plans", "list", "--help"], ["plans", "show", "--help"],
                 ["plans", "approve", "--help"], ["plans", "reject", "--help"], ["start", "--help"],
                 ["stop", "--help"], ["status", "--help"], ["logs", "--help"], ["doctor", "--help"]):  # fmt: skip
        res = cli("site-agent", *args)
        assert res.returncode == 0 and "Usage:" in res.stdout, args
