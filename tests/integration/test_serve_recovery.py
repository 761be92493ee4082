"""`coordinator serve` killed mid-run resumes the run by itself when it starts again.

Two Fed-BioMed node processes on loopback; the coordinator is `coordinator serve`, run as a
child process and SIGKILLed after round 1 (no chance to record anything).
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import cli

from coordinator.testbed import Testbed, default_spec_text, free_port
from site_agent.runtime import pid_alive

pytestmark = pytest.mark.integration

ROUNDS = 4


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("recovery"), n_sites=2, cases=[4, 6], device="cpu")
    bed.setup_sites()
    bed.start_nodes()
    yield bed
    bed.teardown()
    assert not [p for p in bed.pids() if pid_alive(p)]


def _spec(bed) -> Path:
    """The tiny MedNeXt ConDistFL spec of test_federation.py: rounds of a few seconds."""
    raw = yaml.safe_load(default_spec_text())
    raw["plan_args"].update({"roi_size": [32, 32, 32], "spacing": "native", "patches_per_volume": 2})
    raw["plan_args"]["network"] = {"name": "mednext", "size": "tiny", "spatial_dims": 3, "deep_supervision": True}
    raw["split"] = {"validation": 0.25, "test": 0.25, "seed": 0}
    raw.update({"name": "recovers", "rounds": ROUNDS, "local_steps": 2})
    raw["sites"] = {"tags": ["fedimg-demo"], "min_sites": 2, "wait_s": 90}
    path = bed.workdir / "spec-recovers.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _serve(bed, home: Path, api_port: int, log_path: Path) -> tuple[subprocess.Popen, object]:
    cmd = [str(Path(sys.executable).parent / "coordinator"), "serve", "--home", str(home), "--grpc-host", "127.0.0.1",
           "--grpc-port", str(bed.port), "--public-host", "localhost", "--api-port", str(api_port)]  # fmt: skip
    log = open(log_path, "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log


def _wait(predicate, timeout: float, what: str, log_path: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n" + log_path.read_text()[-4000:])


def _rounds(run_dir: Path) -> list[int]:
    try:
        return [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]]
    except (OSError, ValueError, KeyError):
        return []


def _status(home: Path) -> dict:
    res = cli("coordinator", "status", "--home", home, "--json")
    assert res.returncode == 0, res.stderr
    return {row["run_id"]: row for row in json.loads(res.stdout)}


def test_serve_killed_mid_run_resumes_by_itself_and_counts_each_round_once(bed):
    home = bed.workdir / "coordinator"
    api_port = free_port()
    url = f"http://127.0.0.1:{api_port}"
    first_log, second_log = bed.workdir / "serve-1.log", bed.workdir / "serve-2.log"
    proc, log = _serve(bed, home, api_port, first_log)
    try:
        _wait(lambda: cli("coordinator", "status", "--url", url, "--home", home).returncode == 0, 90, "the API", first_log)
        res = cli("coordinator", "submit", _spec(bed), "--url", url, "--home", home)
        assert res.returncode == 0, res.stderr
        run_id = res.stdout.split("run ")[-1].strip()
        run_dir = home / "runs" / run_id
        _wait(lambda: 1 in _rounds(run_dir), 150, "round 1", first_log)
        assert _rounds(run_dir)[-1] < ROUNDS, "the run finished before the kill: make its rounds longer"
        proc.send_signal(signal.SIGKILL)  # mid-run: nothing is recorded
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "running"  # what the dead process left
    row = _status(home)[run_id]
    assert row["status"] == "interrupted", row  # shown as it is, without writing
    assert json.loads((run_dir / "state.json").read_text()) == state

    proc, log = _serve(bed, home, api_port, second_log)
    try:
        _wait(lambda: _status(home)[run_id]["status"] in ("done", "failed"), 240, "the run to end", second_log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    out = second_log.read_text()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "done", out[-4000:]
    assert state["auto_resumes"] == 1
    assert f"run {run_id}: interrupted: re-queued, resumes from breakpoint_" in out
    assert _rounds(run_dir) == list(range(1, ROUNDS + 1))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("global_round_*.pt"))
    assert ckpts == [f"global_round_{r:04d}.pt" for r in range(ROUNDS + 1)]
    assert "AttributeError" not in out and "Traceback" not in out, out[-4000:]
