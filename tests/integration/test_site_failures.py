"""Rounds that survive failing sites, with real node processes on loopback (issue 23, part 1).

Three sites train a tiny ConDistFL model with ``sites.min_per_round: 1``. A killed node and a
hung one (stopped past Fed-BioMed's disconnection delay) are left out of the round as failed;
a node stopped past ``round_timeout_s`` only is left out as timeout, its late update dropped.
Each run finishes with every round recorded once and the sites back in the later rounds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from coordinator.testbed import Testbed, default_spec_text
from site_agent.runtime import ProcessRuntime, pid_alive

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("failures"), n_sites=3, cases=[4], device="cpu", reference_labels=False)
    bed.setup_sites()
    bed.start_nodes()
    yield bed
    for site in bed.sites:  # a stopped node would not stop
        pid = ProcessRuntime(site).status().pid
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGCONT)
    bed.teardown()
    assert not [p for p in bed.pids() if pid_alive(p)]


def _spec(bed, name: str, rounds: int, timeout_s: float, local_steps: int, extra: dict | None = None) -> Path:
    raw = yaml.safe_load(default_spec_text())
    raw["plan_args"].update({"roi_size": [32, 32, 32], "spacing": "native", "patches_per_volume": 2})
    raw["plan_args"]["network"] = {"name": "mednext", "size": "tiny", "spatial_dims": 3, "deep_supervision": False}
    raw.update({"name": name, "rounds": rounds, "local_steps": local_steps, "round_timeout_s": timeout_s, "validate_every": rounds})
    raw["split"] = {"validation": 0.25, "test": 0.0, "seed": 0}
    raw["sites"] = {"tags": ["fedimg-demo"], "min_sites": 3, "min_per_round": 1, "wait_s": 90}
    raw.update(extra or {})
    path = bed.workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _node_pid(site) -> int:
    pid = ProcessRuntime(site).status().pid
    assert pid and pid_alive(pid), f"{site.site_name}: node not running"
    return pid


def _run_with_faults(
    bed, name: str, rounds: int, timeout_s: float, faults: dict[int, Callable[[], None]], local_steps: int = 2, extra: dict | None = None
) -> tuple[Path, dict, str, dict[int, float]]:
    """`coordinator run` on the bed's sites; ``faults[r]`` runs when the run prints round r's line.

    Returns:
        The run directory, its metrics, the coordinator's output, and when each round's line came (monotonic s).
    """
    home = bed.workdir / "coordinator"
    cmd = [str(Path(sys.executable).parent / "coordinator"), "run", str(_spec(bed, name, rounds, timeout_s, local_steps, extra)), "--home", str(home),
           "--grpc-host", "127.0.0.1", "--grpc-port", str(bed.port), "--public-host", "localhost"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    seen: dict[int, float] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            for r, fault in faults.items():
                if f"round {r}/{rounds} (" in line:
                    seen[r] = time.monotonic()
                    fault()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    (run_dir,) = [p for p in (home / "runs").iterdir() if f"-{name}-" in p.name]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "done"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(1, rounds + 1))  # every round once
    assert all(r["aggregated_from"] == sum(s["status"] == "ok" for s in r["site_status"].values()) for r in metrics["rounds"])
    for r in range(rounds + 1):
        assert torch.load(run_dir / "checkpoints" / f"global_round_{r:04d}.pt")
    assert "Traceback" not in out
    return run_dir, metrics, out, seen


def test_a_killed_and_a_hung_site_are_left_out_and_come_back(bed):
    """Killed: its connection drops; hung (SIGSTOP past Fed-BioMed's 10 s without a poll): it is
    declared disconnected. Both are failed for round 2, which site-1 carries alone, and both
    train again once back (the killed one restarted)."""
    site1, site2, site3 = bed.sites
    threads = str(max(1, (os.cpu_count() or 1) // 3))

    def fail() -> None:
        os.kill(_node_pid(site2), signal.SIGSTOP)
        os.kill(_node_pid(site3), signal.SIGKILL)

    def recover() -> None:
        os.kill(_node_pid(site2), signal.SIGCONT)
        ProcessRuntime(site3).start(die_with_parent=True, extra_env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})

    rounds = 8
    # 6 steps: rounds of a few seconds, so the restarted node (~10 s to start) is back before the last ones
    _, metrics, out, _ = _run_with_faults(bed, "killed-site", rounds, 40, {1: fail, 2: recover}, local_steps=6)
    assert metrics["quorum"] == {"min_per_round": 1, "mandatory": [], "round_timeout_s": 40}
    first, second = metrics["rounds"][0], metrics["rounds"][1]
    assert first["aggregated_from"] == 3 and {row["status"] for row in first["site_status"].values()} == {"ok"}
    assert second["aggregated_from"] == 1 and second["site_status"] == {
        "site-1": {"status": "ok"},
        "site-2": {"status": "failed", "reason": "disconnected during the round"},
        "site-3": {"status": "failed", "reason": "disconnected during the round"},
    }
    assert second["wall_s"] < 40 - 5  # it ended when both were declared gone, not at the deadline
    later = metrics["rounds"][2:]
    assert any(r["site_status"]["site-2"]["status"] == "ok" for r in later), [r["site_status"] for r in later]
    back = [r for r in later if r["site_status"]["site-3"]["status"] == "ok"]
    assert back, [r["site_status"] for r in later]  # rejoined after restart
    for r in back:  # ConDistFL after missed rounds: the round's lambda, and the global model it received as its teacher
        rows = {row["name"]: row["train"] for row in r["sites"].values()}
        assert rows["site-3"]["lambda"] == pytest.approx(rows["site-1"]["lambda"]) and rows["site-3"]["round_index"] == r["round"] - 1
        assert rows["site-3"]["teacher_max_abs_diff"] == 0.0
    assert f"round 2/{rounds}: aggregated from 1 site(s); left out: site-2 (failed: disconnected during the round)" in out


def test_a_site_past_the_round_deadline_times_out_and_the_run_goes_on(bed):
    """A node stopped for less than Fed-BioMed's disconnection delay but past ``round_timeout_s``:
    the round ends at the deadline without it (timeout), anything it sends for that round later
    is dropped, and it trains again in the next rounds. Runs after the test above: the sites' caches are warm, so
    a round takes about a second."""
    _, site2, _ = bed.sites
    timeout_s = 6
    rounds = 4
    pid = _node_pid(site2)
    _, metrics, _, seen = _run_with_faults(
        bed, "slow-site", rounds, timeout_s, {1: lambda: os.kill(pid, signal.SIGSTOP), 2: lambda: os.kill(pid, signal.SIGCONT)}
    )
    second = metrics["rounds"][1]
    assert second["site_status"]["site-2"] == {"status": "timeout", "reason": f"no update within round_timeout_s ({timeout_s} s)"}
    assert second["aggregated_from"] == 2 and "site-2" not in {row["name"] for row in second["sites"].values() if row.get("train")}
    assert timeout_s - 1 <= seen[2] - seen[1] < timeout_s + 5  # the deadline ended the round, not Fed-BioMed's keepalive (~2 min)
    assert metrics["rounds"][-1]["site_status"]["site-2"] == {"status": "ok"}


def _stop_at_first_task(site, pid: int, timeout_s: float = 180.0) -> threading.Event:
    """SIGSTOP the node as soon as its log shows the next task (a training request) arriving."""
    start = site.log_file.stat().st_size
    stopped = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with open(site.log_file, "rb") as fh:
                fh.seek(start)
                if b"[TASKS QUEUE] Task received" in fh.read():
                    os.kill(pid, signal.SIGSTOP)
                    stopped.set()
                    return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return stopped


def test_a_scaffold_site_whose_first_round_timed_out_joins_fresh_and_the_run_goes_on(bed):
    """SCAFFOLD: a site whose round-1 update misses the deadline has no state at the coordinator, so
    Fed-BioMed sends it none in round 2: it joins as a new SCAFFOLD client (not a lost state: no
    warning), the run goes on, and from round 3 its state is restored like the others'."""
    _, site2, _ = bed.sites
    timeout_s = 6
    rounds = 3
    pid = _node_pid(site2)
    stopped = _stop_at_first_task(site2, pid)
    _, metrics, out, _ = _run_with_faults(
        bed, "scaffold-late-join", rounds, timeout_s, {1: lambda: os.kill(pid, signal.SIGCONT)},
        extra={"aggregator": "scaffold", "weights": "equal"},
    )  # fmt: skip
    assert stopped.is_set()
    first, second, third = metrics["rounds"]
    assert first["site_status"]["site-2"]["status"] == "timeout" and first["aggregated_from"] == 2
    assert second["site_status"]["site-2"] == {"status": "ok"} and third["site_status"]["site-2"] == {"status": "ok"}
    restored = {r["round"]: {row["name"]: row["train"]["optimizer_state_restored"] for row in r["sites"].values() if row.get("train")} for r in (second, third)}
    assert restored == {2: {"site-1": 1.0, "site-2": 0.0, "site-3": 1.0}, 3: {"site-1": 1.0, "site-2": 1.0, "site-3": 1.0}}
    assert "joined again as a new SCAFFOLD client" not in out
