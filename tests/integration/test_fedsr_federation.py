"""FedSR on a real federation: 3 Fed-BioMed node processes with brain-MRI phantom sites (unlabelled
but for 2 evaluation cases each), the registry's atlas, a coordinator process, the tiny
configuration, 3 rounds (the last one fine-tuning with the encoder frozen)."""

import json

import pytest
import torch
import yaml
from conftest import cli

from coordinator.testbed import Testbed
from site_agent.runtime import pid_alive

pytestmark = pytest.mark.integration

ROUNDS = 3
PERSONAL = ("network.registration_decoder.", "network.segmentation_decoder.", "segmentation_critic.", "registration_critic.")


@pytest.fixture(scope="module")
def fedsr_run(tmp_path_factory):
    bed = Testbed(tmp_path_factory.mktemp("fedsr"), n_sites=3, brain=["site-a", "site-b", "site-c"], labelled=2, cases=[6])
    bed.setup_sites()
    atlas = bed.install_atlas()
    bed.start_nodes()
    try:
        home = bed.home
        raw = {
            "name": "fedsr-it",
            "plan": "fedsr",
            "sites": {"tags": ["fedimg-demo"], "min_sites": 3, "wait_s": 90},
            "rounds": ROUNDS,
            "local_steps": 3,
            "optimizer": {"lr": 0.001},
            "seed": 1,
            "plan_args": {
                "schema": "brain-mri",
                "atlas": atlas,
                "network": {"size": "tiny"},
                "volume_size": [32, 32, 32],
                "spacing": [6.0, 6.0, 6.0],
                "finetune_rounds": 1,
                "evaluate_every": 1,
            },
            "approval": {"request": True, "wait_s": 60},
        }
        spec = bed.workdir / "fedsr.yaml"
        spec.write_text(yaml.safe_dump(raw))
        res = cli("coordinator", "run", spec, "--home", home, "--grpc-host", "127.0.0.1", "--grpc-port", bed.port,
                  "--public-host", "localhost", timeout=500)  # fmt: skip
        (run_dir,) = sorted((home / "runs").iterdir())
        yield bed, home, run_dir, res
    finally:
        bed.teardown()
        assert not [p for p in bed.pids() if pid_alive(p)]


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def _replies(run_dir):
    """The parameters each site sent, as Fed-BioMed received them over gRPC (kept with the breakpoints), checked and decoded
    from their wire form (`pipelines.wire`)."""
    from fedbiomed.common.serializer import Serializer

    from pipelines.wire import decode_params

    return [decode_params(r) for r in map(Serializer.load, sorted((run_dir / "fedbiomed").glob("params_NODE_*.mpk"))) if r is not None]


def test_every_site_trains_on_unlabelled_volumes_and_scores_its_personalised_model(fedsr_run):
    bed, home, run_dir, res = fedsr_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert metrics["plan"] == "fedsr" and [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    for r in metrics["rounds"]:
        assert r["aggregated_from"] == 3
        for row in r["sites"].values():
            t = row["train"]
            assert t["volumes_training"] == 4 and t["cases_evaluation"] == 2  # the labelled cases never train
            assert t["finetune"] == float(r["round"] == ROUNDS)
            assert t["personal_restored"] == float(r["round"] > 1)  # decoders carried over from the site's own folder
            assert t["sa_initialised"] == float(r["round"] == 1)  # f starts from the atlas, then follows the federation
            assert t["eval_cases"] == 2
            for key in ("eval_seg_dice", "eval_seg_hd95_mm", "eval_reg_dice_mean", "eval_reg_ncc"):
                assert t[key] == t[key], key  # finite
            assert 0.0 <= t["eval_reg_dice_mean"] <= 1.0 and -1.0 <= t["eval_reg_ncc"] <= 1.0


def test_decoders_never_reach_the_coordinator_and_the_sa_representation_does(fedsr_run):
    bed, home, run_dir, res = fedsr_run
    replies = _replies(run_dir)
    assert len(replies) == 3 * ROUNDS
    for reply in replies:
        names = set(reply)
        assert "sa_representation" in names and any(n.startswith("network.encoder.") for n in names)
        assert not any(n.startswith(PERSONAL) for n in names), sorted(n for n in names if n.startswith(PERSONAL))[:3]
    checkpoints = [torch.load(run_dir / "checkpoints" / f"global_round_{r:04d}.pt") for r in range(ROUNDS + 1)]
    c0, last = checkpoints[0], checkpoints[-1]
    # the coordinator's decoders are still the untrained round-0 ones: nothing was ever aggregated into them
    personal_names = [n for n in c0 if n.startswith(PERSONAL)]
    assert personal_names and all(torch.equal(c0[n], last[n]) for n in personal_names)
    # the SA representation was sent and averaged: it left its all-zero start
    assert torch.count_nonzero(c0["sa_representation"]) == 0 and torch.count_nonzero(last["sa_representation"]) > 0
    # each site's own decoders, trained, kept in its work folder, different from the other sites'
    stores = [torch.load(s.work_dir / "cache" / "fedsr" / f"{run_dir.name}-personal-r{ROUNDS - 1:04d}.pt") for s in bed.sites]
    assert all(st["round"] == ROUNDS - 1 for st in stores)
    for site in bed.sites:  # one file per round, the two a replayed round may need kept
        kept = sorted(p.name for p in (site.work_dir / "cache" / "fedsr").glob(f"{run_dir.name}-personal-r*.pt"))
        assert kept == [f"{run_dir.name}-personal-r{r:04d}.pt" for r in (ROUNDS - 2, ROUNDS - 1)]
    weight = "network.segmentation_decoder.head.weight"
    heads = [st["weights"][weight] for st in stores]
    assert all(not torch.equal(h, c0[weight]) for h in heads)
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    # no stored byte of the coordinator (breakpoints with the replies, logs, metrics, checkpoints) holds a site's decoder
    blobs = [p.read_bytes() for p in home.rglob("*") if p.is_file()]
    for head in heads:
        needle = head.flatten()[:16].numpy().tobytes()
        assert not any(needle in b for b in blobs)


def test_aggregation_weights_by_training_volumes_and_the_last_round_keeps_the_encoder(fedsr_run):
    bed, home, run_dir, res = fedsr_run
    checkpoints = [torch.load(run_dir / "checkpoints" / f"global_round_{r:04d}.pt") for r in range(ROUNDS + 1)]
    # each round's f is the mean of the three sites' f weighted by training volumes (4 each: the plain mean)
    from fedbiomed.common.serializer import Serializer

    from pipelines.wire import decode_params

    files = sorted((run_dir / "fedbiomed").glob("params_NODE_*.mpk"), key=lambda p: p.stat().st_mtime)  # written round by round
    replies = [decode_params(r) for r in map(Serializer.load, files) if r is not None]
    for r in range(1, ROUNDS + 1):
        sent = [reply["sa_representation"] for reply in replies[3 * (r - 1) : 3 * r]]
        assert len(sent) == 3 and not torch.allclose(sent[0], sent[1])  # each site's own volumes moved it differently
        assert torch.allclose(torch.stack(sent).mean(0), checkpoints[r]["sa_representation"], atol=1e-5)
    # the fine-tuning round froze the encoder at every site: the aggregate is the encoder of the round before
    encoder = [n for n in checkpoints[-1] if n.startswith("network.encoder.")]
    assert all(torch.allclose(checkpoints[-1][n], checkpoints[-2][n], atol=1e-6) for n in encoder)
    assert not all(torch.allclose(checkpoints[1][n], checkpoints[0][n], atol=1e-6) for n in encoder)  # earlier rounds trained it
    # the site's personalised model: global encoder (as received in the fine-tuning round) + its decoders + f
    for site in bed.sites:
        saved = torch.load(site.work_dir / "cache" / "fedsr" / f"{run_dir.name}-model.pt")
        assert saved["round"] == ROUNDS - 1 and saved["method"] == "fedsr"
        assert all(torch.allclose(saved["weights"][n], checkpoints[-2][n], atol=1e-6) for n in encoder)
