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
    # unequal sites: sample weights differ; device: cpu set explicitly, the federation runs as before it existed
    bed = Testbed(tmp_path_factory.mktemp("fed"), n_sites=2, cases=[4, 6], device="cpu")
    bed.setup_sites()
    bed.start_nodes()
    yield bed
    bed.teardown()
    assert not [p for p in bed.pids() if pid_alive(p)]


def _spec(bed, rounds: int, **overrides) -> Path:
    raw = yaml.safe_load(default_spec_text())  # ConDistFL, MedNeXt with deep supervision
    # the native 2 x 2 x 3 mm grid (48 x 48 x 24 voxels) keeps a round at a few seconds
    raw["plan_args"].update({"roi_size": [32, 32, 32], "spacing": "native", "patches_per_volume": 2})
    raw["plan_args"]["network"] = {"name": "mednext", "size": "tiny", "spatial_dims": 3, "deep_supervision": True}  # width 4: fast rounds
    # sites of 4 and 6 cases: 2/1/1 and 4/1/1 (the main job's 10-case split would leave the small site no validation case)
    raw["split"] = {"validation": 0.25, "test": 0.25, "seed": 0}
    raw.update({"rounds": rounds, "local_steps": 2, **overrides})
    raw["sites"] = {"tags": ["fedimg-demo"], "min_sites": 2, "wait_s": 90}
    path = bed.workdir / f"spec-{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(bed, spec: Path, home: Path):
    """`coordinator run SPEC` against the module's sites, as a researcher runs it."""
    return cli("coordinator", "run", spec, "--home", home, "--grpc-host", "127.0.0.1", "--grpc-port", bed.port,
               "--public-host", "localhost", timeout=400)  # fmt: skip


def _run_dirs(home: Path, name: str) -> list[Path]:
    return sorted(p for p in (home / "runs").iterdir() if f"-{name}-" in p.name) if (home / "runs").is_dir() else []


def _site_splits(bed, settings) -> dict[str, dict[str, list[str]]]:
    """site name -> split -> case ids, as `pipelines.splits` assigns the site's labelled cases."""
    from pipelines.splits import assign_splits

    out = {}
    for i, site in enumerate(bed.sites):
        manifest = json.loads((bed.dataset_dir(i) / "manifest.json").read_text())
        ids = [c["case_id"] for c in manifest["cases"] if c.get("label")]
        assigned = assign_splits(ids, settings)
        out[site.site_name] = {name: [c for c in ids if assigned[c] == name] for name in ("training", "validation", "test")}
    return out


def _local_mean(run_dir: Path, weights: dict[str, float]) -> dict[str, torch.Tensor]:
    """The weighted mean of the sites' last local models (weights normalised)."""
    total = sum(weights.values())
    local = {name: torch.load(run_dir / "checkpoints" / "local" / f"{name}_last.pt") for name in weights}
    keys = set.intersection(*(set(p) for p in local.values()))
    return {k: sum(local[n][k].double() * (w / total) for n, w in weights.items()) for k in keys}


def test_two_rounds_every_site_trains_and_params_change(bed):
    """Also the evaluation protocol: each site's three-way split, validation and test rows, equal weights."""
    from pipelines.splits import SplitSettings

    home = bed.workdir / "coordinator"
    assert all(yaml.safe_load(bed.site_config_path(i).read_text())["device"] == "cpu" for i in range(2))  # set explicitly
    spec = _spec(bed, rounds=2, name="two-rounds", split={"validation": 0.25, "test": 0.25, "seed": 0}, weights="equal")
    res = _run(bed, spec, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr  # progress lines are log records (stderr), the summary is the output
    assert "round 1/2" in out and "round 2/2" in out
    (run_dir,) = _run_dirs(home, "two-rounds")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    node_names = {s.site_name for s in bed.sites}
    for r in metrics["rounds"]:
        assert {row["name"] for row in r["sites"].values()} == node_names  # every site, every round
        for row in r["sites"].values():
            assert row["samples"] > 0 and "Loss" in row["train"] and "condist_loss" in row["train"]
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
    # the run's own files at the top; Fed-BioMed's (breakpoints, replies, plan source) under fedbiomed/
    top = {p.name for p in run_dir.iterdir()}
    assert {"spec.yaml", "state.json", "metrics.json", "checkpoints", "run.log", "fedbiomed"} <= top, top
    assert not [n for n in top if n.startswith(("breakpoint_", "params_", "model_", "runs"))], top  # runs/: its tensorboard folder
    assert sorted(p.name for p in (run_dir / "fedbiomed").glob("breakpoint_*")) == ["breakpoint_0000", "breakpoint_0001"]
    assert list((run_dir / "fedbiomed").glob("params_*.mpk")) and list((run_dir / "fedbiomed").glob("model_*.py"))
    assert json.loads((run_dir / "state.json").read_text())["status"] == "done"
    assert "[fedimg] round 2/2" in (run_dir / "run.log").read_text()
    res = cli("coordinator", "results", run_dir.name, "--home", home, "--json")
    assert json.loads(res.stdout)["rounds_done"] == 2

    # every site split its cases as pipelines.splits says (4 cases: 2/1/1, 6 cases: 4/1/1) and reported the sizes
    splits = _site_splits(bed, SplitSettings(0.25, 0.25, 0))
    assert metrics["split"] == {"validation": 0.25, "test": 0.25, "seed": 0} and metrics["weights"] == "equal"
    assert metrics["splits"] == {name: {k: len(v) for k, v in s.items()} for name, s in splits.items()}
    assert {name: s["training"].__len__() for name, s in splits.items()} == {"site-1": 2, "site-2": 4}
    for r in metrics["rounds"]:
        for row in r["sites"].values():
            sizes = metrics["splits"][row["name"]]
            assert row["samples"] == sizes["training"]  # Fed-BioMed's sample count: the training cases only
            for kind in ("global", "local"):  # validation and test scored apart, each on its own cases
                assert row[f"val_{kind}"]["cases"] == sizes["validation"] and row[f"test_{kind}"]["cases"] == sizes["test"]
                assert 0.0 <= row[f"test_{kind}"]["dice_mean"] <= 1.0
    assert all("test_final" in row for row in metrics["rounds"][-1]["sites"].values())
    # the site's own record of its split (it stays at the site) names exactly those cases
    for i, site in enumerate(bed.sites):
        (record,) = [json.loads(p.read_text()) for p in site.work_dir.rglob(f"splits/{run_dir.name}.json")]
        assert record["cases"] == splits[site.site_name]
    # equal weights: the last aggregate is the plain mean of the sites' last local models (the main job's SCAFFOLD
    # changes the sites' steps, not the average; no server optimizer)
    want = _local_mean(run_dir, {"site-1": 1.0, "site-2": 1.0})
    got = torch.load(run_dir / "checkpoints" / "global_round_0002.pt")
    assert all(torch.allclose(got[k].double(), want[k], atol=1e-6) for k in want)
    by_samples = _local_mean(run_dir, {"site-1": 2.0, "site-2": 4.0})
    assert any(not torch.allclose(got[k].double(), by_samples[k], atol=1e-6) for k in want)  # the weights mattered
    # selection on validation; the selected model's test score recorded beside it
    assert metrics["best_global"]["test_score"] is not None


def test_scaffold_corrects_the_sites_gradients_from_round_two(bed):
    """aggregator: scaffold: declearn's client module at the sites, its server module at the coordinator,
    the states carried by Fed-BioMed (auxiliary variables, node optimizer state) between rounds."""
    home = bed.workdir / "coordinator"
    spec = _spec(bed, rounds=2, name="scaffold", aggregator="scaffold", weights="equal")
    res = _run(bed, spec, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = _run_dirs(home, "scaffold")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    first, second = ([row["train"] for row in r["sites"].values()] for r in metrics["rounds"])
    # round 1: no correction yet; Adam's steps and the schedule start at 0
    assert all(t["scaffold_correction_norm"] == 0.0 and t["adam_steps"] == t["schedule_steps"] == 2 and t["optimizer_state_restored"] == 0.0 for t in first)
    # round 2: Fed-BioMed restored each site's optimizer (moments, c_i), and the correction is c_i - c with
    # c the mean of the two sites' states: opposite at the two sites, so of the same size, and not zero
    assert all(t["adam_steps"] == t["schedule_steps"] == 4 and t["optimizer_state_restored"] == 1.0 for t in second)
    norms = [t["scaffold_correction_norm"] for t in second]
    assert norms[0] > 0 and norms[0] == pytest.approx(norms[1], rel=1e-3)
    # SCAFFOLD's server step with server lr 1 is the plain average of the sites' models
    want = _local_mean(run_dir, {"site-1": 1.0, "site-2": 1.0})
    got = torch.load(run_dir / "checkpoints" / "global_round_0002.pt")
    assert all(torch.allclose(got[k].double(), want[k], atol=1e-6) for k in want)


def _fp32_and_bf16_runs(bed, aggregator: str) -> tuple[dict[str, Path], dict[str, dict]]:
    """Two 2-round runs over equal weights, ``transfer.precision`` fp32 and bf16: run directories and metrics."""
    home = bed.workdir / "coordinator"
    runs = {}
    for precision in ("fp32", "bf16"):
        name = f"wire-{aggregator}-{precision}"
        spec = _spec(bed, rounds=2, name=name, aggregator=aggregator, weights="equal", transfer={"precision": precision})
        res = _run(bed, spec, home)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        (runs[precision],) = _run_dirs(home, name)
    return runs, {p: json.loads((d / "metrics.json").read_text()) for p, d in runs.items()}


def test_scaffold_states_travel_in_bf16_with_the_model(bed):
    """transfer.precision: bf16 under SCAFFOLD: the sites' state updates and the coordinator's c travel in 16 bits
    beside the model (half the bytes of the same run in fp32, the states included), and the correction still works:
    in round 2 it is c_i - c at each site, opposite at two sites."""
    _, metrics = _fp32_and_bf16_runs(bed, "scaffold")
    model_bytes = metrics["fp32"]["model"]["bytes"]
    # round 2: the model both ways, the sites' state updates up and c down (round 1 sends c = 0, a scalar), and the
    # final validation request (the model down)
    totals = {p: m["rounds"][1]["bytes"]["to_sites"] + m["rounds"][1]["bytes"]["from_sites"] for p, m in metrics.items()}
    assert totals["fp32"] > 1.9 * (2 * 2 * model_bytes)  # the states are about as large as the model
    assert totals["bf16"] / totals["fp32"] == pytest.approx(0.5, abs=0.015)
    assert all(r["site_status"][name]["status"] == "ok" for m in metrics.values() for r in m["rounds"] for name in r["site_status"])
    second = [row["train"] for row in metrics["bf16"]["rounds"][1]["sites"].values()]
    assert all(t["optimizer_state_restored"] == 1.0 for t in second)
    norms = [t["scaffold_correction_norm"] for t in second]
    assert norms[0] > 0 and norms[0] == pytest.approx(norms[1], rel=2e-2)  # c is rounded to bf16 on its way


def _killed_after_round_1(bed, spec: Path, home: Path, name: str) -> Path:
    """`coordinator run SPEC`, killed as soon as round 1 is done; returns the run directory."""
    cmd = [str(Path(sys.executable).parent / "coordinator"), "run", str(spec), "--home", str(home),
           "--grpc-host", "127.0.0.1", "--grpc-port", str(bed.port), "--public-host", "localhost"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # kill the coordinator as soon as round 1 is done
            if "round 1/" in line:
                proc.kill()
                break
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (run_dir,) = _run_dirs(home, name)
    assert proc.returncode == -signal.SIGKILL, f"coordinator ended by itself ({proc.returncode}): {(run_dir / 'run.log').read_text()[-2000:]}"
    assert len(json.loads((run_dir / "metrics.json").read_text())["rounds"]) == 1
    assert json.loads((run_dir / "state.json").read_text())["status"] == "running"  # died mid-run
    return run_dir


def _resume(bed, run_dir: Path, home: Path):
    time.sleep(3)  # let the sites notice the coordinator is gone
    return cli("coordinator", "resume", run_dir.name[:15], "--home", home, "--grpc-host", "127.0.0.1",
               "--grpc-port", bed.port, "--public-host", "localhost", timeout=400)  # fmt: skip


def test_interrupted_run_resumes_from_its_last_breakpoint(bed):
    home = bed.workdir / "coordinator"
    spec = _spec(bed, rounds=3, name="resumable", validate_every=2)
    run_dir = _killed_after_round_1(bed, spec, home, "resumable")
    round1 = torch.load(run_dir / "checkpoints" / "global_round_0001.pt")
    res = _resume(bed, run_dir, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout + res.stderr  # progress lines are log records (stderr), the summary is the output
    assert "resuming" in out and "round 2/3" in out and "round 3/3" in out
    assert "] round 1/3 (" not in out  # round 1 was not trained again
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    after = torch.load(run_dir / "checkpoints" / "global_round_0001.pt")
    assert all(torch.equal(after[k], round1[k]) for k in round1)  # round 1's checkpoint is kept as it was
    final = torch.load(run_dir / "checkpoints" / "global_round_0003.pt")
    assert any(not torch.equal(final[k], round1[k]) for k in round1)  # and training went on from it
    assert json.loads((run_dir / "state.json").read_text())["status"] == "done"
    assert sorted(p.name for p in (run_dir / "fedbiomed").glob("breakpoint_*")) == [f"breakpoint_{i:04d}" for i in range(3)]
    # validate_every: 2, kept across the resume: round 1 scores the initial model, round 2 the local models,
    # round 3 the global model after round 2 and the final model
    scored = [{key for row in rec["sites"].values() for key in ("val_global", "val_local", "val_final") if key in row} for rec in metrics["rounds"]]
    assert scored == [{"val_global"}, {"val_local"}, {"val_global", "val_final"}], scored
    assert metrics["validate_every"] == 2 and {best["round"] for best in metrics["best_local"].values()} == {2}


def _to_old_layout(run_dir: Path) -> None:
    """Lay a run directory out as runs made before the fedbiomed/ folder: Fed-BioMed's files
    at the top, in an experimentation folder named after the run (whose parent, the runs
    folder, was Fed-BioMed's experiments dir); its breakpoints name their files by absolute path."""
    run_dir = run_dir.resolve()
    fbm = run_dir / "fedbiomed"
    for p in list(fbm.iterdir()):
        p.rename(run_dir / p.name)
    fbm.rmdir()
    for state_file in run_dir.glob("breakpoint_*/breakpoint_*.json"):
        state = json.loads(state_file.read_text().replace(f"{fbm}/", f"{run_dir}/"))
        state["experimentation_folder"] = run_dir.name
        state_file.write_text(json.dumps(state))


def test_a_run_of_the_old_layout_still_opens_and_resumes_in_place(bed):
    home = bed.workdir / "coordinator"
    spec = _spec(bed, rounds=2, name="old-layout")
    run_dir = _killed_after_round_1(bed, spec, home, "old-layout")
    _to_old_layout(run_dir)
    assert (run_dir / "breakpoint_0000").is_dir() and list(run_dir.glob("params_*.mpk")) and not (run_dir / "fedbiomed").exists()
    res = cli("coordinator", "results", run_dir.name, "--home", home, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["rounds_done"] == 1, res.stderr[-2000:]
    res = cli("coordinator", "report", run_dir.name, "--home", home)
    assert res.returncode == 0 and (run_dir / "report" / "index.html").is_file(), res.stderr[-2000:]
    res = cli("coordinator", "evaluate", run_dir.name, "--home", home, "--data", bed.sites[1].data_dir / "ct", "--json")
    assert res.returncode == 0 and "global" in json.loads(res.stdout)["models"], res.stderr[-2000:]
    res = _resume(bed, run_dir, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "resuming" in res.stdout + res.stderr and "round 2/2" in res.stdout + res.stderr
    assert [r["round"] for r in json.loads((run_dir / "metrics.json").read_text())["rounds"]] == [1, 2]
    # resumed where its breakpoints are: the old layout stays one layout
    assert sorted(p.name for p in run_dir.glob("breakpoint_*")) == ["breakpoint_0000", "breakpoint_0001"]
    assert not (run_dir / "fedbiomed").exists()
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
    res = _run(bed, spec, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = _run_dirs(home, "one-site")
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert list(rounds[0]["sites"]) == [only]


def test_condistfl_teacher_is_the_received_global_model_and_lambda_follows_the_schedule(bed):
    """Two sites labelling different organs (kidney group / liver group), ConDistFL, 2 rounds."""
    from pipelines.losses import lambda_schedule
    from pipelines.training import parameter_checksum

    home = bed.workdir / "coordinator"
    # plain FedAvg (sample weights need it) and the torch AdamW the plans step without SCAFFOLD
    spec = _spec(bed, rounds=2, name="condist-teacher", weights="samples", aggregator="fedavg")
    raw = yaml.safe_load(spec.read_text())
    raw["plan_args"]["lambda"] = [0.01, 1.0]  # the paper's schedule, asserted below whatever the main job uses
    spec.write_text(yaml.safe_dump(raw))
    res = _run(bed, spec, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = _run_dirs(home, "condist-teacher")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scored = {}
    for r in metrics["rounds"]:
        # the global model the sites received this round: saved by the coordinator after round r-1
        received = torch.load(run_dir / "checkpoints" / f"global_round_{r['round'] - 1:04d}.pt")
        want_sum, want_sq = parameter_checksum(received)
        assert len(r["sites"]) == 2
        for row in r["sites"].values():
            t = row["train"]
            assert t["lambda"] == pytest.approx(lambda_schedule(r["round"] - 1, 2), rel=1e-6)  # 0.01 then 1.0
            assert t["teacher_max_abs_diff"] == 0.0  # still the received parameters after the last step
            assert t["teacher_vs_fedbiomed_initial"] == 0.0  # == Fed-BioMed's own snapshot of the round start
            assert t["teacher_params"] == len(received)
            assert t["teacher_sum"] == pytest.approx(want_sum, rel=1e-6, abs=1e-3)
            assert t["teacher_sumsq"] == pytest.approx(want_sq, rel=1e-6)
            assert t["condist_loss"] > 0 and t["teacher_s"] > 0
            # the site's AdamW moments carry over from its previous round of this run
            assert t["optimizer_state_restored"] == (1.0 if r["round"] > 1 else 0.0)
            scored[row["name"]] = {k for k in row["val_global"] if k.startswith("dice_") and k != "dice_mean"}
        assert r["bytes"]["to_sites"] > 2 * metrics["model"]["bytes"]  # the model went to both sites
        assert r["bytes"]["from_sites"] > 2 * metrics["model"]["bytes"]  # and came back from both
    # each site scores only the organs it labels
    assert scored == {"site-1": {"dice_kidney", "dice_kidney_tumor"}, "site-2": {"dice_liver", "dice_liver_tumor"}}
    assert (run_dir / "checkpoints" / "best_global.pt").is_file()
    assert {p.name for p in (run_dir / "checkpoints" / "local").iterdir()} == {
        "site-1_last.pt", "site-1_best.pt", "site-2_last.pt", "site-2_best.pt"}  # fmt: skip
    # weights: samples: the last aggregate weights each site by its training cases (2 and 4)
    assert metrics["weights"] == "samples"
    want = _local_mean(run_dir, {"site-1": 2.0, "site-2": 4.0})
    got = torch.load(run_dir / "checkpoints" / "global_round_0002.pt")
    assert all(torch.allclose(got[k].double(), want[k], atol=1e-6) for k in want)

    # out-of-federation scoring on a dataset labelled differently (site-2's liver cases,
    # scored with the lesion merged into the organ), and the run report
    res = cli("coordinator", "evaluate", run_dir.name, "--home", home, "--data", bed.sites[1].data_dir / "ct",
              "--merge-lesions", "yes", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    record = json.loads(res.stdout)
    assert record["classes"] == ["liver"] and record["merge_lesions"] is True
    assert set(record["models"]) == {"global", "local:site-1", "local:site-2"}
    assert all(0.0 <= m["mean"]["liver"] <= 1.0 for m in record["models"].values())
    res = cli("coordinator", "report", run_dir.name, "--home", home)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run_dir / "report" / "index.html").is_file() and (run_dir / "report" / "boxplots.png").is_file()


def test_standalone_sites_train_alone(bed):
    home = bed.workdir / "coordinator"
    spec = _spec(bed, rounds=2, name="standalone", plan="marginal", mode="standalone", aggregator="fedavg")
    res = _run(bed, spec, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = _run_dirs(home, "standalone")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mode"] == "standalone" and [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        assert {row["name"] for row in r["sites"].values()} == {"site-1", "site-2"}
        assert all("condist_loss" not in row["train"] and "val_local" in row for row in r["sites"].values())
    a = torch.load(run_dir / "checkpoints" / "local" / "site-1_last.pt")
    b = torch.load(run_dir / "checkpoints" / "local" / "site-2_last.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # never averaged: two different models


def test_condistfl_2d_network_trains_on_axial_slices(bed):
    """spatial_dims 2 from the spec: 2D patches from the prepared 3D volumes, slice-wise validation."""
    home = bed.workdir / "coordinator"
    spec = _spec(bed, rounds=1, name="condist-2d")
    raw = yaml.safe_load(spec.read_text())
    raw["plan_args"].update({"network": {"name": "mednext", "size": "tiny", "spatial_dims": 2, "deep_supervision": True},
                             "roi_size": [32, 32], "patches_per_volume": 4})  # fmt: skip
    spec.write_text(yaml.safe_dump(raw))
    res = _run(bed, spec, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = _run_dirs(home, "condist-2d")
    (r,) = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    for row in r["sites"].values():
        assert row["train"]["condist_loss"] > 0 and row["train"]["teacher_max_abs_diff"] == 0.0
        assert 0.0 <= row["val_global"]["dice_mean"] <= 1.0 and row["val_global"]["cases"] >= 1
    weights = torch.load(run_dir / "checkpoints" / "global_round_0001.pt")
    assert all(w.dim() in (1, 4) for w in weights.values())  # 2D convolutions: (out, in, kx, ky)


def test_the_trained_model_goes_home(bed, tmp_path):
    """A real run's global model: `coordinator publish` -> the registry over HTTP -> `site-agent models pull` at a site
    -> `site-agent infer` on one of its hospital's DICOM series: the label lands on the series' own grid, with a DICOM
    SEG that references the series and statistics whose volumes are the label's voxel counts times the voxel volume."""
    import highdicom as hd
    import nibabel as nib
    import numpy as np
    import pydicom
    from conftest import site_agent_in_process

    from coordinator.registry_http import serve_registry
    from coordinator.site_tokens import SiteTokens

    home = bed.workdir / "coordinator"
    spec = _spec(bed, rounds=1, name="goes-home")
    res = _run(bed, spec, home)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = _run_dirs(home, "goes-home")
    res = cli("coordinator", "publish", run_dir.name, "--home", home, "--name", "goes-home", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["version"] == "v0001"

    httpd = serve_registry(home, "127.0.0.1", 0)
    try:
        site = yaml.safe_load(bed.site_config_path(0).read_text())
        token = tmp_path / "token"
        token.write_text(SiteTokens(home).issue(site["site_name"]) + "\n")
        site["registry"] = {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "token_file": str(token)}
        cfg = tmp_path / "site.yaml"
        cfg.write_text(yaml.safe_dump(site))
        code, out, err = site_agent_in_process("--config", cfg, "models", "pull", "goes-home")
        assert code == 0, err
        series = sorted(p for p in bed.workdir.rglob("case_000") if p.is_dir() and p.parent.name == "dicom")[0]
        code, out, err = site_agent_in_process("--config", cfg, "infer", series, "--model", "goes-home", "--out", tmp_path / "labels",
                                               "--dicom-seg", "--statistics", "--json")  # fmt: skip
        assert code == 0, err
    finally:
        httpd.shutdown()
        httpd.server_close()
    (row,) = json.loads(out)
    files = sorted(p for p in series.iterdir() if p.is_file())
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    label = nib.load(row["label"])
    assert label.shape == (headers[0].Columns, headers[0].Rows, len(files))
    for ds in headers:  # each instance's first pixel is voxel (0, 0, k) of the label's grid
        world = np.diag([-1.0, -1.0, 1.0]) @ np.array([float(v) for v in ds.ImagePositionPatient])
        k = np.linalg.solve(label.affine[:3, :3], world - label.affine[:3, 3])
        assert np.allclose(k[:2], 0, atol=1e-3) and abs(k[2] - round(k[2])) < 1e-3
    seg = hd.seg.segread(row["dicom_seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == headers[0].SeriesInstanceUID
    stats = json.loads(Path(row["statistics"]).read_text())
    data = np.asarray(label.dataobj)
    voxel_ml = abs(np.linalg.det(label.affine[:3, :3])) / 1000
    package = json.loads((bed.sites[0].work_dir / "models" / "registry" / "model" / "goes-home" / "v0001" / "package.json").read_text())
    for name, value in package["classes"].items():
        if name != "background":
            assert stats["classes"][name]["volume_ml"] == pytest.approx(int((data == value).sum()) * voxel_ml, rel=1e-9)


def _bf16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, t.to(torch.bfloat16).float()))


def test_bf16_transfer_halves_the_bytes_and_the_coordinator_averages_in_float32(bed):
    """transfer.precision: bf16 through real nodes: the sites receive and send 16-bit models (half the bytes of the
    same run in fp32), the coordinator checks and widens them, and its average is float32."""
    runs, metrics = _fp32_and_bf16_runs(bed, "fedavg")
    model_bytes = metrics["fp32"]["model"]["bytes"]
    # round 1 carries training only (round 2 also the final validation request); 2 sites, to and from
    totals = {p: m["rounds"][0]["bytes"]["to_sites"] + m["rounds"][0]["bytes"]["from_sites"] for p, m in metrics.items()}
    assert totals["fp32"] / (2 * 2 * model_bytes) <= 1.02  # one buffer: ~3 kB of request fields per message beyond the model
    assert totals["bf16"] / totals["fp32"] == pytest.approx(0.5, abs=0.012)
    assert all(r["site_status"][name]["status"] == "ok" for m in metrics.values() for r in m["rounds"] for name in r["site_status"])
    local = {p: {s.site_name: torch.load(d / "checkpoints" / "local" / f"{s.site_name}_last.pt") for s in bed.sites} for p, d in runs.items()}
    floats = [k for k, v in local["bf16"]["site-1"].items() if v.is_floating_point()]
    assert all(v[k].dtype == torch.float32 and _bf16_exact(v[k]) for v in local["bf16"].values() for k in floats)  # sent in bf16
    assert not all(_bf16_exact(local["fp32"]["site-1"][k]) for k in floats)  # fp32 runs send every bit
    got = torch.load(runs["bf16"] / "checkpoints" / "global_round_0002.pt")
    want = _local_mean(runs["bf16"], {"site-1": 1.0, "site-2": 1.0})
    assert all(got[k].dtype == torch.float32 and torch.allclose(got[k].double(), want[k], atol=1e-6) for k in floats)
    assert not all(_bf16_exact(got[k]) for k in floats)  # the average of two bf16 values needs more bits: kept in float32
