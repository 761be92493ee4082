"""A cross-modality federation on loopback: a CT site and an MR-like site (real Fed-BioMed
nodes), the example spec with GIN on, one short round."""

import json
from pathlib import Path

import pytest
import yaml
from conftest import cli

from coordinator.testbed import Testbed
from site_agent.runtime import pid_alive

pytestmark = pytest.mark.integration

SPEC = Path(__file__).resolve().parents[2] / "coordinator" / "examples" / "phantom_cross_modality.yaml"


def test_ct_and_mr_sites_train_one_model_with_gin(tmp_path):
    bed = Testbed(tmp_path / "bed", n_sites=2, modalities=["CT", "MR"], classes=["liver", "spleen"])
    try:
        bed.setup_sites()
        manifests = [json.loads((bed.dataset_dir(i) / "manifest.json").read_text()) for i in range(2)]
        assert [m["modality"] for m in manifests] == ["CT", "MR"]
        bed.start_nodes()
        raw = yaml.safe_load(SPEC.read_text())
        raw.update({"rounds": 1, "local_steps": 2, "sites": {"tags": ["fedimg-demo"], "min_sites": 2, "wait_s": 90}})
        raw["plan_args"].update({"spacing": "native", "roi_size": [32, 32, 32]})
        spec = tmp_path / "xmod.yaml"
        spec.write_text(yaml.safe_dump(raw))
        home = bed.home  # the coordinator the sites were enrolled with (they pin its certificate)
        res = cli("coordinator", "run", spec, "--home", home, "--grpc-host", "127.0.0.1", "--grpc-port", bed.port,
                  "--public-host", "localhost", timeout=400)  # fmt: skip
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        (run_dir,) = list((home / "runs").iterdir())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows = list(metrics["rounds"][0]["sites"].values())
        assert sorted(r["name"] for r in rows) == ["site-1", "site-2"]
        for row in rows:  # both modalities trained, each with GIN on (the spec's probability)
            assert row["samples"] > 0 and row["train"]["gin_prob"] == pytest.approx(raw["plan_args"]["gin"]["prob"])
            assert 0.0 <= row["val_global"]["dice_mean"] <= 1.0
    finally:
        bed.teardown()
    assert not [p for p in bed.pids() if pid_alive(p)]
