"""Differential privacy as a spec switch, with real node processes on loopback (issue 23, part 6).

Two sites train a tiny MedNeXt for 3 rounds of 2 steps with ``dp: {type: local, sigma: 1.0, clip: 1.0}``:
the run completes, ``metrics.json`` holds each site's epsilon at the stated delta after every round,
strictly growing, and the final model differs from the same run without ``dp``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from coordinator.testbed import Testbed, default_spec_text

pytestmark = pytest.mark.integration

ROUNDS = 3


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("dp"), n_sites=2, cases=[4], device="cpu", reference_labels=False)
    bed.setup_sites()
    bed.start_nodes()
    yield bed
    bed.teardown()


def _run(bed, name: str, dp: dict | None) -> tuple[Path, dict, str]:
    raw = yaml.safe_load(default_spec_text())
    raw["plan_args"].update({"roi_size": [32, 32, 32], "spacing": "native", "patches_per_volume": 2})
    raw["plan_args"]["network"] = {"name": "mednext", "size": "tiny", "spatial_dims": 3, "deep_supervision": False}
    raw.update({"name": name, "rounds": ROUNDS, "local_steps": 2, "validate_every": ROUNDS, "seed": 0, "aggregator": "fedavg"})
    raw.pop("weights", None)  # scaffold's equal weights: fedavg weighs by training cases
    raw["split"] = {"validation": 0.25, "test": 0.0, "seed": 0}
    raw["sites"] = {"tags": ["fedimg-demo"], "min_sites": 2, "wait_s": 90}
    if dp is not None:
        raw["dp"] = dp
    spec = bed.workdir / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(raw))
    home = bed.workdir / "coordinator"
    cmd = [str(Path(sys.executable).parent / "coordinator"), "run", str(spec), "--home", str(home),
           "--grpc-host", "127.0.0.1", "--grpc-port", str(bed.port), "--public-host", "localhost"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    (run_dir,) = [p for p in (home / "runs").iterdir() if f"-{name}-" in p.name]
    return run_dir, json.loads((run_dir / "metrics.json").read_text()), out


def test_local_dp_reports_a_growing_epsilon_per_site_and_adds_noise(bed):
    run_dir, metrics, out = _run(bed, "dp-local", {"type": "local", "sigma": 1.0, "clip": 1.0})
    assert metrics["privacy"] == {"type": "local", "sigma": 1.0, "clip": 1.0, "delta": 1e-5, "unit": "case"}
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    epsilons: dict[str, list[float]] = {}
    for record in metrics["rounds"]:
        for row in record["sites"].values():
            privacy = row["privacy"]
            assert privacy["delta"] == 1e-5 and privacy["rounds"] == record["round"] and privacy["steps"] == 2 * record["round"]
            assert row["train"]["dp_sample_rate"] == pytest.approx(1 / 3)  # 3 training cases, batches of one case on average
            assert row["train"]["dp_noise_multiplier"] == pytest.approx(0.5)  # sigma / patches_per_volume: a case is the unit
            epsilons.setdefault(row["name"], []).append(privacy["epsilon"])
    assert sorted(epsilons) == ["site-1", "site-2"]
    for name, eps in epsilons.items():
        assert len(eps) == ROUNDS and all(0 < a < b for a, b in zip(eps, eps[1:])), (name, eps)
    assert "privacy spent (epsilon at delta 1e-05" in out

    plain_dir, plain, _ = _run(bed, "dp-off", None)
    assert "privacy" not in plain and all("privacy" not in row for r in plain["rounds"] for row in r["sites"].values())
    last = f"global_round_{ROUNDS:04d}.pt"
    private, reference = torch.load(run_dir / "checkpoints" / last), torch.load(plain_dir / "checkpoints" / last)
    assert private.keys() == reference.keys()  # Opacus's renaming undone: the same model
    assert any(not torch.equal(private[k], reference[k]) for k in private)
