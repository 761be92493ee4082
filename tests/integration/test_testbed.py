"""`coordinator testbed` as a user runs it: refusal of an unapproved plan, and teardown
that leaves no process behind (on failure, on Ctrl-C and on SIGKILL)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import cli

from coordinator.testbed import default_spec_text

pytestmark = pytest.mark.integration
COORDINATOR = str(Path(sys.executable).parent / "coordinator")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _wait_gone(procs: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _spec(tmp_path: Path, **overrides) -> Path:
    raw = yaml.safe_load(default_spec_text())
    raw["split"] = {"validation": 0.25, "test": 0.25, "seed": 0}  # 4 cases per site here (fast): 2/1/1
    raw.update(overrides)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_unapproved_plan_is_refused_and_the_researcher_is_told(tmp_path):
    spec = _spec(tmp_path, rounds=1, approval={"request": True, "wait_s": 3})
    res = cli("coordinator", "testbed", "--sites", "2", "--no-approve", "--spec", spec, "--workdir", tmp_path / "bed",
              "--oof-phase", "none", "--cases", "4", timeout=400)  # fmt: skip
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "is not approved by 2 site(s)" in out, out[-3000:]
    assert "site-1" in out and "site-2" in out and "Pending" in out
    assert "site-agent plans approve" in out
    assert "Traceback" not in out
    # the sites hold the plan as pending, with its hash, for their staff to review
    cfg = tmp_path / "bed" / "sites" / "site-1" / "site.yaml"
    plans = json.loads(cli("site-agent", "--config", cfg, "plans", "list", "--json").stdout)
    assert len(plans) == 1 and plans[0]["status"] == "Pending" and len(plans[0]["hash"]) == 64
    assert f"sha256 {plans[0]['hash'][:16]}..." in out  # the researcher sees the hash the site shows
    shown = cli("site-agent", "--config", cfg, "plans", "show", plans[0]["id"]).stdout
    assert "class ConDistFLPlan(PartialLabelSegmentationPlan)" in shown
    (run_dir,) = (tmp_path / "bed" / "coordinator" / "runs").iterdir()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "failed" and "not approved" in state["error"]
    assert "testbed stopped: all processes ended" in res.stderr  # a log line (stderr); the run's transcript and results are on stdout


def _start_testbed(tmp_path: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """Start a long testbed; return it once its nodes and coordinator are all up."""
    spec = _spec(tmp_path, rounds=200, local_steps=1)
    proc = subprocess.Popen(
        [COORDINATOR, "testbed", "--sites", "2", "--spec", str(spec), "--workdir", str(tmp_path / "bed"), "--oof-phase", "none", "--cases", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        # as from a terminal: a suite started in the background (`cmd &`, nohup) inherits an
        # ignored SIGINT, and Python keeps it ignored, so Ctrl-C could not be simulated
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "round 1/200" in line:
            break
    else:
        pytest.fail("testbed ended before training: " + "".join(seen)[-3000:])
    kids = _descendants(proc.pid)
    cmdlines = [" ".join(k.cmdline()) for k in kids]
    assert sum("site_agent.node_entry" in c for c in cmdlines) == 2, cmdlines  # Fed-BioMed's node behind the pinned transport
    assert any("coordinator.cli run" in c for c in cmdlines), cmdlines
    return proc, kids


def test_sigkill_of_the_testbed_leaves_no_process(tmp_path):
    proc, kids = _start_testbed(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # no chance to clean up: the kernel's parent-death signal does it
    proc.wait(timeout=10)
    assert _wait_gone(kids) == []


def test_ctrl_c_of_the_testbed_tears_everything_down(tmp_path):
    proc, kids = _start_testbed(tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 130, rest[-3000:]
    assert "testbed interrupted" in rest and "all processes ended" in rest
    assert _wait_gone(kids, timeout=10) == []
