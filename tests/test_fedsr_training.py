"""FedSR site training (pipelines.fedsr.training), the atlas artifact and the plan's arguments."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.fedsr.atlas import ATLAS_FILE, ATLAS_RECORD, AtlasError, atlas_files, load_atlas, prepared_atlas, validate_atlas_files
from pipelines.fedsr.networks import fedsr_config
from pipelines.fedsr.plan_args import parse_fedsr_args
from pipelines.fedsr.training import FEDSR_METHODS, FedSRModel, FedSRUpdater, is_shared_parameter, register_atlas, segment_volume
from preprocessing.schema import parse_schema

torch.set_num_threads(1)
SIZE = 16


def _sphere(shift: float, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """A two-shell sphere (labels 1, 2) shifted along x: the 'subject'."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(float(size))] * 3, indexing="ij"))
    centre = torch.tensor([size / 2 + shift, size / 2, size / 2]).view(3, 1, 1, 1)
    radius = ((grid - centre) ** 2).sum(0).sqrt()
    label = (radius < size * 0.3).long() + (radius < size * 0.15).long()
    image = label.float() * 0.7
    return image[None, None], label[None, None]


def _model(method: str = "fedsr") -> FedSRModel:
    torch.manual_seed(0)
    return FedSRModel(fedsr_config("tiny"), FEDSR_METHODS[method])


def test_what_is_shared_follows_the_method():
    """FedSR sends the encoder and the SA representation, never the decoders or critics; FedAvg sends the decoders too."""
    names = list(_model().state_dict())
    fedsr, fedrep, fedavg = FEDSR_METHODS["fedsr"], FEDSR_METHODS["fedrep"], FEDSR_METHODS["fedavg"]
    shared = {n for n in names if is_shared_parameter(n, fedsr)}
    assert "sa_representation" in shared and any(n.startswith("network.encoder.") for n in shared)
    assert not any(
        n.startswith(("network.registration_decoder.", "network.segmentation_decoder.", "segmentation_critic", "registration_critic")) for n in shared
    )
    assert "sa_representation" not in {n for n in names if is_shared_parameter(n, fedrep)}
    assert any(n.startswith("network.segmentation_decoder.") for n in names if is_shared_parameter(n, fedavg))


def test_sa_representation_starts_from_the_atlas_and_moves_by_eq7():
    model = _model()
    atlas_image, atlas_label = _sphere(0)
    updater = FedSRUpdater(model, atlas_image, atlas_label, alpha=0.25)
    assert updater.initialise_sa() is True
    start = model.sa_representation.clone()
    assert torch.any(start != 0)
    assert updater.initialise_sa() is False  # only an all-zero f is initialised
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # like the plan's: every parameter, f included (no gradient: never moved)
    for shift in (-2, 2):
        image, _ = _sphere(shift)
        optimizer.zero_grad()
        updater.loss(image).backward()
        optimizer.step()
    assert torch.equal(model.sa_representation, start)  # the optimizer never moves f; eq. 7 does, at the round's end
    local_mean = updater.running.summary_sum / updater.running.volumes
    means = updater.finish_round()
    assert torch.allclose(model.sa_representation, 0.75 * start + 0.25 * local_mean, atol=1e-6)
    assert not torch.allclose(model.sa_representation, 0.25 * start + 0.75 * local_mean, atol=1e-4)
    assert means["sa_shift"] > 0 and means["steps"] == 2


def test_fedrep_keeps_no_sa_representation():
    model = _model("fedrep")
    atlas_image, atlas_label = _sphere(0)
    updater = FedSRUpdater(model, atlas_image, atlas_label)
    assert updater.initialise_sa() is False
    updater.loss(_sphere(1)[0]).backward()
    updater.finish_round()
    assert torch.count_nonzero(model.sa_representation) == 0
    assert torch.count_nonzero(model.sa_for_decoders()) == 0


def test_finetuning_leaves_the_encoder_untouched_and_trains_the_decoders():
    model = _model()
    atlas_image, atlas_label = _sphere(0)
    updater = FedSRUpdater(model, atlas_image, atlas_label, finetune=True)
    updater.initialise_sa()
    encoder_before = {k: v.clone() for k, v in model.network.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.network.segmentation_decoder.state_dict().items()}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # the plan's: every parameter, with moments from earlier rounds
    for p in model.network.encoder.parameters():  # moments as an earlier, unfrozen round leaves them
        optimizer.state[p] = {"step": torch.tensor(3.0), "exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p)}
    for shift in (-2, 2, 1):
        optimizer.zero_grad()
        updater.loss(_sphere(shift)[0]).backward()
        assert all(p.grad is None for p in model.network.encoder.parameters())
        optimizer.step()
    updater.finish_round()
    assert all(torch.equal(encoder_before[k], v) for k, v in model.network.encoder.state_dict().items())
    assert any(not torch.equal(decoder_before[k], v) for k, v in model.network.segmentation_decoder.state_dict().items())
    assert all(p.requires_grad for p in model.network.encoder.parameters())  # unfrozen again after the round


def test_the_mutual_information_term_needs_and_uses_negatives():
    model = _model()
    atlas_image, atlas_label = _sphere(0)
    updater = FedSRUpdater(model, atlas_image, atlas_label)
    updater.loss(_sphere(1)[0])
    first = updater.running.sums["mi_segmentation"]
    assert first == 0.0  # the first single-volume step has no negative yet
    updater.loss(_sphere(-1)[0])
    assert updater.running.sums["mi_segmentation"] != 0.0
    no_mi = FedSRUpdater(_model("fedsr_no_mi"), atlas_image, atlas_label)
    for shift in (1, -1):
        no_mi.loss(_sphere(shift)[0])
    assert no_mi.running.sums["mi_segmentation"] == 0.0


def test_training_registers_the_atlas_better_than_no_registration():
    """A few dozen JRS updates on shifted spheres: the warped atlas label beats the unwarped one."""
    model = _model()
    atlas_image, atlas_label = _sphere(0)
    updater = FedSRUpdater(model, atlas_image, atlas_label)
    updater.initialise_sa()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    shifts = [-3, 3, -2, 2]
    for step in range(40):
        optimizer.zero_grad()
        updater.loss(_sphere(shifts[step % 4])[0]).backward()
        optimizer.step()
    updater.finish_round()

    def dice(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a > 0, b > 0
        return float(2 * (a & b).sum() / (a.sum() + b.sum()))

    image, label = _sphere(3)
    warped = register_atlas(model, image, atlas_image, atlas_label).warped_label
    assert dice(warped, label) > dice(atlas_label, label) + 0.03
    predicted = segment_volume(model, image)
    assert predicted.shape == label.shape and predicted.dtype == torch.long


def test_updater_refuses_an_atlas_that_does_not_fit():
    model = _model()
    image, label = _sphere(0)
    with pytest.raises(ValueError, match="classes"):
        FedSRUpdater(model, image, label * 5)
    with pytest.raises(ValueError, match="differ in shape"):
        FedSRUpdater(model, image, label).loss(torch.zeros(1, 1, 8, 8, 8))


# -- the atlas artifact ---------------------------------------------------------------------------

BRAIN = parse_schema(
    {
        "format": "fedimg-label-schema", "name": "toy-brain", "version": "1.0.0", "ignore_label": 255,
        "classes": {"background": 0, "white_matter": 1, "ventricle": 2}, "groups": {},
        "target_spacing": [2.0, 2.0, 2.0], "modalities": {"MR": {"normalisation": "zscore"}},
    },
    "test",
)  # fmt: skip


def _atlas_files() -> dict[str, bytes]:
    image, label = _sphere(0, size=12)
    return atlas_files(image[0, 0].numpy() + 1.0, label[0, 0].numpy(), np.diag([2.0, 2.0, 2.0, 1.0]), BRAIN, "MR", "a test sphere", "synthetic, no person")


def test_atlas_round_trip_and_prepared_like_a_case(tmp_path):
    files = _atlas_files()
    validate_atlas_files(files)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    atlas = load_atlas(tmp_path)
    assert atlas.meta["classes"] == {"background": 0, "white_matter": 1, "ventricle": 2}
    assert load_atlas(tmp_path, sha256=atlas.meta["sha256"]).image.shape == (12, 12, 12)
    with pytest.raises(AtlasError, match="the spec names"):
        load_atlas(tmp_path, sha256="0" * 64)
    image, label = prepared_atlas(atlas, BRAIN, "schema", (16, 16, 16))
    assert image.shape == (1, 1, 16, 16, 16) and label.shape == (1, 1, 16, 16, 16)
    assert set(torch.unique(label).tolist()) == {0, 1, 2}
    inside = image[0, 0][image[0, 0] != 0]
    assert abs(float(inside.mean())) < 0.2  # z-scored like the site's MR cases


def test_a_changed_atlas_is_refused(tmp_path):
    files = _atlas_files()
    tampered = bytearray(files[ATLAS_FILE])
    tampered[-1] ^= 1
    with pytest.raises(AtlasError, match="sha256"):
        validate_atlas_files({**files, ATLAS_FILE: bytes(tampered)})
    with pytest.raises(AtlasError, match="exactly"):
        validate_atlas_files({ATLAS_RECORD: files[ATLAS_RECORD]})
    with pytest.raises(AtlasError, match="not found"):
        load_atlas(tmp_path)


def test_atlas_files_refuse_labels_outside_the_schema():
    image, label = _sphere(0, size=12)
    with pytest.raises(AtlasError, match="not classes"):
        atlas_files(image[0, 0].numpy(), label[0, 0].numpy() * 3, np.eye(4), BRAIN, "MR", "x", "y")
    with pytest.raises(AtlasError, match="sharing"):
        atlas_files(image[0, 0].numpy(), label[0, 0].numpy(), np.eye(4), BRAIN, "MR", "x", " ")


# -- plan arguments -------------------------------------------------------------------------------

ATLAS = {"name": "brain", "version": "v0001", "sha256": "a" * 64}


def test_plan_args_defaults_and_stages():
    s = parse_fedsr_args({"atlas": ATLAS, "rounds_total": 4, "finetune_rounds": 1, "network": {"size": "small"}})
    assert s.volume_size == (64, 64, 64) and s.method == "fedsr"
    assert [s.finetuning(r) for r in range(4)] == [False, False, False, True]
    assert [s.evaluates(r) for r in range(4)] == [False, False, False, True]
    assert [parse_fedsr_args({"atlas": ATLAS, "rounds_total": 4, "evaluate_every": 2}).evaluates(r) for r in range(4)] == [False, True, False, True]


@pytest.mark.parametrize(
    ("args", "key"),
    [
        ({}, "plan_args.atlas"),
        ({"atlas": {**ATLAS, "sha256": "xyz"}}, "plan_args.atlas.sha256"),
        ({"atlas": {**ATLAS, "name": ".."}}, "plan_args.atlas.name"),  # never a path out of the site's atlas folder
        ({"atlas": ATLAS, "volume_size": [30, 32, 32]}, "plan_args.volume_size"),
        ({"atlas": ATLAS, "method": "fedprox"}, "plan_args.method"),
        ({"atlas": ATLAS, "rounds_total": 2, "finetune_rounds": 2}, "plan_args.finetune_rounds"),
    ],
)
def test_plan_args_problems_name_the_key(args, key):
    with pytest.raises(ValueError) as err:
        parse_fedsr_args(args)
    assert key in str(err.value)


# -- the plan's own bookkeeping (pipelines.plans.fedsr_base) ----------------------------------------


def _plan(round_index: int):
    from fedbiomed.common.training_args import TrainingArgs

    from coordinator.plans import model_args_for
    from pipelines.plans.fedsr import FedSRPlan

    args = model_args_for("fedsr", {"schema": "brain-mri", "atlas": ATLAS})
    args.update(run_id="run-a", rounds_total=3, local_steps=1)
    ta = TrainingArgs({"optimizer_args": {"lr": 1e-3}, "num_updates": 1, "random_seed": 3}, only_required=False)
    plan = FedSRPlan()
    plan.post_init(args, ta, node_id="NODE_A", round=round_index)
    return plan


def _head(plan) -> torch.Tensor:
    return plan.model().network.segmentation_decoder.head.weight


def test_plan_keeps_decoders_at_the_site_and_a_replayed_round_starts_from_the_round_before(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDIMG_CACHE_DIR", str(tmp_path))
    plans = {}
    for r, value in ((0, 1.0), (1, 2.0)):
        plans[r] = plan = _plan(r)
        assert plan._restore_personal() is (r > 0)
        if r == 1:
            assert torch.all(_head(plan) == 1.0)  # round 0's decoder, from the site's folder
        with torch.no_grad():
            _head(plan).fill_(value)
        plan._save_personal(r)
    replay = _plan(1)  # round 2 failed its quorum: the coordinator replays it
    assert replay._restore_personal() and torch.all(_head(replay) == 1.0)  # not round 1's own result
    later = _plan(2)
    assert later._restore_personal() and torch.all(_head(later) == 2.0)
    later._save_personal(2)
    kept = sorted(p.name for p in (tmp_path / "fedsr").glob("run-a-personal-r*.pt"))
    assert kept == ["run-a-personal-r0001.pt", "run-a-personal-r0002.pt"]
    # what Fed-BioMed never sends: the decoders and critics; the encoder and f go
    plan = plans[0]
    names = list(plan.model().state_dict())
    local = {n for n in names if plan.tag_parameters(n) == {"local"}}
    assert local and all(n.startswith(("network.registration_decoder.", "network.segmentation_decoder.", "segmentation_critic.", "registration_critic."))
                         for n in local)  # fmt: skip
    assert plan.tag_parameters("sa_representation") == set() and plan.tag_parameters("network.encoder.stages.0.0.weight") == set()


def test_plan_refuses_to_train_without_a_site_work_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("FEDIMG_CACHE_DIR", raising=False)
    plan = _plan(0)
    with pytest.raises(FileNotFoundError, match="FEDIMG_CACHE_DIR"):
        plan._save_personal(0)
