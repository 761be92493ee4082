"""A radiograph federation on loopback (issue 26): real Fed-BioMed nodes train the 2D plan on chest sites.

Two sites of the chest phantom, each with its own machine (site 1: CR, MONOCHROME1, 12 bits,
ImagerPixelSpacing; site 2: DX, MONOCHROME2, 14 bits, PixelSpacing, RLE) and its own label set
(left lung; right lung), written as DICOM, prepared by the real `site-agent prepare` with the
chest-xr schema, holding test-only reference masks of the other lung (the paper's layout). The
coordinator runs ConDistFL with a 2D network for 2 rounds.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli

from coordinator.testbed import Testbed, chest_spec_text
from site_agent.runtime import pid_alive

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bed(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("chest"), n_sites=2, cases=[4], device="cpu", body="chest")
    bed.setup_sites()
    bed.start_nodes()
    yield bed
    bed.teardown()
    assert not [p for p in bed.pids() if pid_alive(p)]


def test_two_radiograph_sites_with_different_labels_train_the_2d_plan(bed):
    manifests = [json.loads((bed.dataset_dir(i) / "manifest.json").read_text()) for i in range(2)]
    assert [m["modality"] for m in manifests] == ["CR", "DX"]
    assert [m["labeled_classes"] for m in manifests] == [[1], [2]]  # left lung; right lung (chest-xr ids)
    assert all(c["radiograph"]["photometric"] for m in manifests for c in m["cases"])
    raw = yaml.safe_load(chest_spec_text())
    raw.update({"rounds": 2, "local_steps": 2, "name": "chest-2d"})
    raw["plan_args"].update({"roi_size": [48, 48], "patches_per_volume": 2})
    raw["sites"] = {"tags": ["fedimg-demo"], "min_sites": 2, "wait_s": 90}
    spec = bed.workdir / "chest.yaml"
    spec.write_text(yaml.safe_dump(raw))
    home = bed.workdir / "coordinator"
    res = cli("coordinator", "run", spec, "--home", home, "--grpc-host", "127.0.0.1", "--grpc-port", bed.port, "--public-host", "localhost", timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = [p for p in (home / "runs").iterdir() if "-chest-2d-" in p.name]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        assert r["aggregated_from"] == 2
        for row in r["sites"].values():
            assert row["train"]["condist_loss"] > 0 and 0.0 <= row["val_global"]["dice_mean"] <= 1.0
    final = {row["name"]: row["test_final"] for row in metrics["rounds"][-1]["sites"].values()}
    # each site scores the class it labels, and (test-only) the paper's reference structures: the other lung
    assert "dice_left_lung" in final["site-1"] and "dice_right_lung" not in final["site-1"] and "ref_dice_right_lung" in final["site-1"]
    assert "dice_right_lung" in final["site-2"] and "ref_dice_left_lung" in final["site-2"] and "ref_dice_heart" not in final["site-2"]
    weights = torch.load(run_dir / "checkpoints" / "global_round_0002.pt")
    assert all(w.dim() in (1, 4) for k, w in weights.items() if not k.startswith("presence_head."))  # 2D convolutions: (out, in, kx, ky)
    # the example's pneumothorax presence head travelled with the model; neither site labels pneumothorax: zero gradients, no loss
    assert weights["presence_head.fc.weight"].shape[0] == 1
    assert all(row["train"]["presence_loss"] == 0.0 for r in metrics["rounds"] for row in r["sites"].values())
    report = cli("coordinator", "report", run_dir.name, "--home", home)
    assert report.returncode == 0 and Path(run_dir / "report" / "index.html").is_file(), report.stdout + report.stderr
