"""A real federation on loopback: 2 Fed-BioMed node processes, a coordinator process.

The sites are created and started once for the module; each test runs the coordinator
as its own process against them, the way researchers do. All coordinator processes share
one home: a node trusts the coordinator identity (certificate, researcher id) it first
connected to, as in a real federation with one coordinator.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli
from coordinator.testbed import Testbed, default_spec_text, free_port
from site_agent.runtime import pid_alive

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("fed"), n_sites=2, log=lambda m: None)
    bed.setup_sites()
    bed.start_nodes()
    yield bed
    bed.teardown()
    assert not [p for p in bed.pids() if pid_alive(p)]


def _spec(bed, rounds: int, **overrides) -> Path:
    raw = yaml.safe_load(default_spec_text())
    raw.update({"rounds": rounds, "local_steps": 2, **overrides})
    raw["sites"] = {"tags": ["fedimg-demo"], "min_sites": 2, "wait_s": 90}
    path = bed.workdir / f"spec-{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run_dirs(home: Path, name: str) -> list[Path]:
    return sorted(p for p in (home / "runs").iterdir() if f"-{name}-" in p.name) if (home / "runs").is_dir() else []


def test_two_rounds_every_site_trains_and_params_change(bed):
    home = bed.workdir / "coordinator"
    spec = _spec(bed, rounds=2, name="two-rounds")
    res = cli("coordinator", "run", spec, "--home", home, "--grpc-host", "127.0.0.1", "--grpc-port", bed.port,
              "--public-host", "localhost", timeout=400)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "round 1/2" in res.stdout and "round 2/2" in res.stdout
    (run_dir,) = _run_dirs(home, "two-rounds")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    node_names = {s.site_name for s in bed.sites}
    for r in metrics["rounds"]:
        assert {row["name"] for row in r["sites"].values()} == node_names  # every site, every round
        for row in r["sites"].values():
            assert row["samples"] > 0 and "Loss" in row["train"]
            assert 0.0 <= row["val_global"]["dice_mean"] <= 1.0
        assert r["update_norm"] > 0
    # after the last round every site also validated the final aggregated model
    assert all("val_final" in row for row in metrics["rounds"][-1]["sites"].values())
    assert "final global model:" in res.stdout
    # the aggregated parameters changed from round to round
    c1 = torch.load(run_dir / "checkpoints" / "global_round_0001.pt")
    c2 = torch.load(run_dir / "checkpoints" / "global_round_0002.pt")
    assert any(not torch.equal(c1[k], c2[k]) for k in c1)
    assert (run_dir / "spec.yaml").read_text() == spec.read_text()
    assert sorted(p.name for p in run_dir.glob("breakpoint_*")) == ["breakpoint_0000", "breakpoint_0001"]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "done"
    assert "[fedimg] round 2/2" in (run_dir / "run.log").read_text()
    res = cli("coordinator", "results", run_dir.name, "--home", home, "--json")
    assert json.loads(res.stdout)["rounds_done"] == 2


def test_interrupted_run_resumes_from_its_last_breakpoint(bed):
    home = bed.workdir / "coordinator"
    spec = _spec(bed, rounds=3, name="resumable")
    cmd = [str(Path(sys.executable).parent / "coordinator"), "run", str(spec), "--home", str(home),
           "--grpc-host", "127.0.0.1", "--grpc-port", str(bed.port), "--public-host", "localhost"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # kill the coordinator as soon as round 1 is done
            if "round 1/3" in line:
                proc.kill()
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = _run_dirs(home, "resumable")
    assert proc.returncode == -signal.SIGKILL, f"coordinator ended by itself ({proc.returncode}): {(run_dir / 'run.log').read_text()[-2000:]}"
    assert len(json.loads((run_dir / "metrics.json").read_text())["rounds"]) == 1
    assert json.loads((run_dir / "state.json").read_text())["status"] == "running"  # died mid-run
    round1 = torch.load(run_dir / "checkpoints" / "global_round_0001.pt")
    time.sleep(3)  # let the sites notice the coordinator is gone
    res = cli("coordinator", "resume", run_dir.name[:15], "--home", home, "--grpc-host", "127.0.0.1",
              "--grpc-port", bed.port, "--public-host", "localhost", timeout=400)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming" in res.stdout and "round 2/3" in res.stdout and "round 3/3" in res.stdout
    assert "] round 1/3 (" not in res.stdout  # round 1 was not trained again
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    after = torch.load(run_dir / "checkpoints" / "global_round_0001.pt")
    assert all(torch.equal(after[k], round1[k]) for k in round1)  # round 1's checkpoint is kept as it was
    final = torch.load(run_dir / "checkpoints" / "global_round_0003.pt")
    assert any(not torch.equal(final[k], round1[k]) for k in round1)  # and training went on from it
    assert json.loads((run_dir / "state.json").read_text())["status"] == "done"


def test_service_accepts_submissions_and_reports_status(bed):
    home = bed.workdir / "coordinator"
    api_port = free_port()
    cmd = [str(Path(sys.executable).parent / "coordinator"), "serve", "--home", str(home), "--grpc-host", "127.0.0.1",
           "--grpc-port", str(bed.port), "--public-host", "localhost", "--api-port", str(api_port)]  # fmt: skip
    log = open(bed.workdir / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{api_port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if cli("coordinator", "status", "--url", url, "--home", home).returncode == 0:
                break
            time.sleep(1)
        spec = _spec(bed, rounds=1, name="submitted")
        res = cli("coordinator", "submit", spec, "--url", url, "--home", home)
        assert res.returncode == 0, res.stderr
        run_id = res.stdout.split("run ")[-1].strip()
        # a bad spec is refused by the service with the validation message
        bad = bed.workdir / "bad.yaml"
        bad.write_text(spec.read_text().replace("rounds: 1", "rounds: -1"))
        res = cli("coordinator", "submit", bad, "--url", url, "--home", home)
        assert res.returncode == 2 and "rounds: must be an integer >= 1" in res.stderr
        # no token, no answer
        res = cli("coordinator", "status", "--url", url, "--token", "wrong")
        assert res.returncode != 0 and "missing or wrong API token" in res.stderr
        deadline = time.monotonic() + 300
        status = None
        while time.monotonic() < deadline:
            rows = json.loads(cli("coordinator", "status", "--url", url, "--home", home, "--json").stdout)
            status = next(r["status"] for r in rows if r["run_id"] == run_id)
            if status in ("done", "failed"):
                break
            time.sleep(2)
        assert status == "done", (bed.workdir / "serve.log").read_text()[-3000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_node_ids_narrow_the_tagged_sites(bed):
    """sites.ids restricts training to those nodes; the others sit the run out."""
    home = bed.workdir / "coordinator"
    from site_agent.node import node_settings

    only = node_settings(bed.sites[0])["node_id"]
    spec = _spec(bed, rounds=1, name="one-site")
    raw = yaml.safe_load(spec.read_text())
    raw["sites"] = {"tags": ["fedimg-demo"], "ids": [only], "min_sites": 1, "wait_s": 60}
    spec.write_text(yaml.safe_dump(raw))
    res = cli("coordinator", "run", spec, "--home", home, "--grpc-host", "127.0.0.1", "--grpc-port", bed.port,
              "--public-host", "localhost", timeout=400)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = _run_dirs(home, "one-site")
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert list(rounds[0]["sites"]) == [only]
