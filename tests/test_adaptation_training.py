"""Local domain adaptation (pipelines/adaptation: losses, jobs, training loops, factory loading)."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
import yaml

from fedimg_testing.phantom import make_phantom, mr_like
from pipelines.adaptation.factory import Factory, FactoryError, load_factory
from pipelines.adaptation.jobs import JobDir, JobError
from pipelines.adaptation.losses import PerceptualDistance, ReconstructionLoss, cycle_consistency, ms_ssim, ms_ssim_scales, segmentation_loss
from pipelines.adaptation.training import (
    AdaptedModel,
    AdaptSettings,
    branch_classes,
    label_table,
    schema_class_ids,
    synthetic_source,
    train_source,
    train_target,
)  # fmt: skip
from pipelines.adaptation.volumes import labelled_slices
from pipelines.factory.networks import FactoryConfig, Generator, requires_grad
from pipelines.factory.slices import SliceSettings
from preprocessing.dataset import write_dataset
from preprocessing.schema import load_schema

ORGANS = {"background": 0, "kidney": 1, "liver": 3}
SCHEMA_FILE = "preprocessing/schemas/abdominal-ct.yaml"


def _organs(label):
    out = np.zeros_like(label)
    out[label == 1] = 1
    out[label == 3] = 3
    return out


@pytest.fixture(scope="module")
def schema():
    return load_schema()


@pytest.fixture(scope="module")
def factory(schema):
    torch.manual_seed(0)
    cfg = FactoryConfig.preset("tiny", n_clients=2, key_dim=0, n_bins=0)
    g = Generator(cfg).eval()
    requires_grad(g, False)
    raw = yaml.safe_load(open(SCHEMA_FILE))
    settings = SliceSettings(size=64, n_bins=0, spacing=(6.0, 6.0, 10.0), min_foreground=0.0)
    return Factory(g, cfg, {"src": 0, "tgt": 1}, settings, schema, {"name": "f", "version": "v0001", "sha256": "0" * 64}, {"schema_definition": raw})


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapt")
    ct = [make_phantom(s, "portal_venous", (32, 32, 8), (6.0, 6.0, 10.0)) for s in range(3)]
    write_dataset(root / "src", "src", "CT", ORGANS, [(v.hu.astype(np.float32), _organs(v.label), np.diag([*v.spacing, 1.0])) for v in ct])
    mr = [make_phantom(100 + s, "portal_venous", (32, 32, 8), (6.0, 6.0, 10.0)) for s in range(4)]
    write_dataset(root / "tgt", "tgt", "MR", ORGANS, [(mr_like(v, s), _organs(v.label), np.diag([*v.spacing, 1.0])) for s, v in enumerate(mr)])
    return root


@pytest.fixture(scope="module")
def source_data(datasets, schema, factory):
    return labelled_slices(datasets / "src", schema, factory.slices)


@pytest.fixture(scope="module")
def target_data(datasets, schema, factory):
    return labelled_slices(datasets / "tgt", schema, factory.slices, only_labelled=False)


def settings(**over):
    base = dict(steps=4, batch=4, log_every=1, checkpoint_every=2, n_synthetic=8, latent_samples=64, few_shot_volumes=2, val_fraction=0.34)
    return AdaptSettings(**{**base, **over})


# -- losses ---------------------------------------------------------------------------------


def test_reconstruction_loss_is_zero_for_identity_and_has_finite_gradients():
    x = torch.rand(3, 1, 64, 64) * 2 - 1
    loss = ReconstructionLoss()
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert ms_ssim_scales(64) == 3 and ms_ssim_scales(512) == 5 and ms_ssim_scales(16) == 1
    assert torch.allclose(ms_ssim(x, x), torch.ones(3))
    for y in (x + 0.2 * torch.randn_like(x), torch.full_like(x, -1.0), -x):
        y = y.clamp(-1, 1).requires_grad_()
        value = loss(y, x)
        value.backward()
        assert float(value) > 0 and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_cycle_consistency_is_zero_for_an_identity_translation_only():
    x, y = torch.rand(2, 1, 64, 64) * 2 - 1, torch.rand(2, 1, 64, 64) * 2 - 1
    loss = ReconstructionLoss()

    def identity(img):
        return img

    def invert_contrast(img):
        return -img

    assert float(cycle_consistency(loss, [(x, identity(identity(x))), (y, identity(identity(y)))])) == pytest.approx(0.0, abs=1e-6)
    assert float(cycle_consistency(loss, [(x, invert_contrast(invert_contrast(x)))])) == pytest.approx(0.0, abs=1e-6)  # a true inverse pair
    assert float(cycle_consistency(loss, [(x, invert_contrast(x))])) > 0.5  # a translation that does not come back
    with pytest.raises(ValueError, match="no pairs"):
        cycle_consistency(loss, [])


def test_perceptual_term_only_from_a_file_on_disk(tmp_path, monkeypatch):
    from pipelines.artifact_approval import STORE_ENV, ApprovalStore

    class L1(torch.nn.Module):
        def forward(self, x, y):
            return (x - y).abs().flatten(1).mean(1)

    path = tmp_path / "lpips.pt"
    torch.jit.script(L1()).save(str(path))
    (tmp_path / "bad.pt").write_bytes(b"nope")
    monkeypatch.setenv(STORE_ENV, str(tmp_path / "approvals"))  # TorchScript loads only with the site's approval
    for f in (path, tmp_path / "bad.pt"):
        ApprovalStore.from_env().decide(hashlib.sha256(f.read_bytes()).hexdigest(), True, kind="torchscript")
    x, y = torch.zeros(2, 1, 64, 64), torch.full((2, 1, 64, 64), 0.5)
    plain, with_p = ReconstructionLoss(), ReconstructionLoss(perceptual=path, perceptual_weight=2.0)
    assert float(with_p(x, y)) == pytest.approx(float(plain(x, y)) + 2.0 * 0.5, rel=1e-5)
    assert with_p.describe()["perceptual"]["sha256"] == PerceptualDistance(path).sha256
    with pytest.raises(FileNotFoundError, match="perceptual network not found"):
        ReconstructionLoss(perceptual=tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a TorchScript"):
        ReconstructionLoss(perceptual=tmp_path / "bad.pt")


def test_segmentation_loss_merges_classes_the_labels_do_not_mark():
    logits = torch.randn(2, 3, 8, 8)
    label = torch.zeros(2, 8, 8, dtype=torch.long)
    label[:, 2:4, 2:4] = 2
    full, partial = segmentation_loss(3), segmentation_loss(3, [2])
    assert full.foreground == (1, 2) and partial.foreground == (2,)
    assert not math.isclose(float(full(logits, label)), float(partial(logits, label)))
    with pytest.raises(ValueError):
        segmentation_loss(3, [])


# -- settings, tables, jobs -----------------------------------------------------------------


def test_settings_are_validated_with_the_key_named():
    assert AdaptSettings().steps == 1000
    for bad, key in [({"steps": 0}, "steps"), ({"batch": 1}, "batch"), ({"lr_encoder": -1}, "lr_encoder"), ({"few_shot_slice": "top"}, "few_shot_slice"),
                     ({"network": {"preset": "huge"}}, "preset"), ({"stepz": 3}, "unknown key")]:  # fmt: skip
        with pytest.raises(ValueError, match=key):
            AdaptSettings.from_dict(bad)
    s = AdaptSettings(steps=10, feature_ramp=0.5)
    assert [s.feature_scale(i) for i in (0, 4, 9)] == [0.2, 1.0, 1.0]


def test_settings_list_every_problem_with_its_key_and_keep_what_the_job_digest_covers():
    from pipelines.adaptation.settings import AdaptSettingsError

    with pytest.raises(AdaptSettingsError) as info:
        AdaptSettings.from_dict({"stepz": 3, "batch": 1, "network": {"preset": "huge"}}, "s.yaml")
    err = info.value
    assert isinstance(err, ValueError) and err.file == "s.yaml" and err.key == "batch"
    assert err.problems == [
        ("batch", "must be an integer >= 2 (got 1)"),
        ("network.preset", "must be one of tiny, paper (got 'huge')"),
        ("stepz", "unknown key; did you mean 'steps'?"),
    ]
    assert str(err).splitlines()[0] == "s.yaml: 3 problems:"
    with pytest.raises(ValueError, match=r"^adaptation settings: few_shot_seed: must be an integer >= 0 \(got -1\)$"):
        AdaptSettings(few_shot_seed=-1)  # direct construction words it the same way
    # a job's configuration digest covers to_dict(): values stay as written (an int weight stays an int)
    s = AdaptSettings.from_dict({"mse": 1, "lr_encoder": 0.001, "network": {"preset": "paper"}, "few_shot_slice": 2})
    assert s.to_dict()["mse"] == 1 and type(s.to_dict()["mse"]) is int and s.to_dict()["network"] == {"preset": "paper"}
    assert AdaptSettings.from_dict(s.to_dict()) == s and s.adapt_config().stem_stride == 2
    assert AdaptSettings.from_dict(None) == AdaptSettings() and AdaptSettings().to_dict()["network"] == {}


def test_label_table_maps_schema_ids_to_branch_indices(schema):
    names = branch_classes(schema, [7, 3])
    assert names == ["background", "liver", "spleen"]
    table = label_table(schema_class_ids(schema), names, 255, schema.num_classes)
    assert table[torch.tensor([0, 1, 3, 7, 255])].tolist() == [0, 0, 1, 2, 255]


def test_job_folder_resume_refusals_and_restart(tmp_path):
    job = JobDir(tmp_path / "j", "source", {"a": 1})
    assert job.open() is False
    job.save_checkpoint({"x": torch.ones(1)}, 3)
    assert JobDir(tmp_path / "j", "source", {"a": 1}).open() is True
    with pytest.raises(JobError, match=r"another configuration \(differs in: a\)"):
        JobDir(tmp_path / "j", "source", {"a": 2}).open()
    job.finish()
    with pytest.raises(JobError, match="already done"):
        JobDir(tmp_path / "j", "source", {"a": 1}).open()
    assert JobDir(tmp_path / "j", "source", {"a": 2}).open(restart=True) is False
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("j.replaced-")]
    assert len(kept) == 1 and (kept[0] / "checkpoint.pt").is_file()  # the old job is moved aside, not deleted
    with pytest.raises(JobError, match="job name"):
        JobDir(tmp_path / "bad name!", "source", {})


def test_load_factory_checks_its_files(tmp_path, factory):
    folder = tmp_path / "f"
    folder.mkdir()
    with pytest.raises(FactoryError, match="factory.json: missing"):
        load_factory(folder)
    meta = {"format": "fedimg-factory", "factory": factory.config.to_dict(), "clients": {"a": 0}, "slices": {"spacing": [6, 6, 10]},
            "schema_definition": factory.meta["schema_definition"]}  # fmt: skip
    (folder / "factory.json").write_text(json.dumps(meta))
    torch.save(factory.generator.state_dict(), folder / "generator.pt")
    loaded = load_factory(folder, "f", "v0001")
    assert loaded.slices.spacing == (6.0, 6.0, 10.0) and loaded.client_id("a") == 0 and loaded.client_id("zz") is None
    assert not any(p.requires_grad for p in loaded.generator.parameters())
    state = factory.generator.state_dict()
    state.pop(next(iter(state)))
    torch.save(state, folder / "generator.pt")
    with pytest.raises(FactoryError, match="does not match the configuration"):
        load_factory(folder)
    (folder / "factory.json").write_text(json.dumps({**meta, "clients": {"a": 5}}))
    with pytest.raises(FactoryError, match=r"client ids of a outside \[0, 2\)"):
        load_factory(folder)
    # a bad factory section is a FactoryError too (site-agent adapt turns it into one clear line)
    (folder / "factory.json").write_text(json.dumps({**meta, "factory": {**meta["factory"], "resolution": 48}}))
    with pytest.raises(FactoryError, match="factory.resolution: must be a power of two"):
        load_factory(folder)


# -- training -------------------------------------------------------------------------------


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_source_training_learns_and_resumes_exactly(tmp_path, factory, source_data):
    gen_before = _state(factory.generator)
    s = settings()
    job = JobDir(tmp_path / "full", "source", {"s": 1})
    full, summary = train_source(factory, source_data, s, job, 0, resume=job.open())
    assert summary["classes"] == ["background", "kidney", "liver"] and summary["val_cases"] == 1
    assert set(summary["validation"]["mean"]) == {1, 2}
    rows = job.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert _equal(_state(factory.generator), gen_before)  # the factory stays frozen

    class Stop(Exception):
        pass

    def interrupt(done, total, row):
        if done == 3:
            raise Stop

    job = JobDir(tmp_path / "cut", "source", {"s": 1})
    with pytest.raises(Stop):
        train_source(factory, source_data, s, job, 0, resume=job.open(), progress=interrupt)
    job = JobDir(tmp_path / "cut", "source", {"s": 1})
    assert job.open() is True  # the step-2 checkpoint
    resumed, _ = train_source(factory, source_data, s, job, 0, resume=True)
    assert [r["step"] for r in job.metrics()] == [1, 2, 3, 4]
    assert _equal(_state(resumed.encoder), _state(full.encoder)) and _equal(_state(resumed.branch_source), _state(full.branch_source))


def test_target_training_keeps_the_source_branch_and_generator_frozen(tmp_path, factory, source_data, target_data):
    job = JobDir(tmp_path / "src", "source", {})
    source, _ = train_source(factory, source_data, settings(steps=2), job, 0, resume=job.open())
    branch = source.branch_source
    before, gen_before = _state(branch), _state(factory.generator)
    job = JobDir(tmp_path / "tgt", "target", {})
    model, summary = train_target(factory, branch, 0, 1, target_data, settings(steps=3), job, resume=job.open())
    assert _equal(_state(branch), before) and _equal(_state(model.branch_source), before)  # S_s: frozen, no update
    assert all(p.grad is None for p in model.branch_source.parameters()) and not any(p.requires_grad for p in model.branch_source.parameters())
    assert _equal(_state(factory.generator), gen_before)
    assert not _equal(_state(model.branch_target), before)  # S_t started from S_s and trained
    assert summary["few_shot_slices"] == 2 and summary["eval_cases"] == 2 and summary["synthetic"] == 8
    assert set(summary["evaluation"]) == {"average", "target", "source"}
    rows = job.metrics()
    assert {"loss_rec", "loss_cycle", "loss_seg", "loss_translate_seg", "loss_cycle_seg"} <= set(rows[-1])

    x = target_data.images[:4]
    p = model.predict(x)
    assert p.shape == (4, 3, 64, 64) and torch.allclose(p.sum(1), torch.ones(4, 64, 64), atol=1e-5)
    assert torch.allclose(p, 0.5 * (model.predict(x, "target") + model.predict(x, "source")), atol=1e-6)
    path = tmp_path / "model.pt"
    torch.save(model.state(), path)
    again = AdaptedModel.load(path)
    assert torch.allclose(again.predict(x), p, atol=1e-6) and again.class_ids == [0, 1, 3]
    torch.save({"format": "something else"}, path)
    with pytest.raises(ValueError, match="not an adapted model"):
        AdaptedModel.load(path)


def test_synthetic_source_samples_are_labelled_by_the_source_branch(factory):
    from pipelines.adaptation.networks import SegmentationBranch

    branch = SegmentationBranch.for_factory(factory.config, ["background", "liver"])
    x, y = synthetic_source(factory.generator, branch, 0, 5, seed=3, chunk=2)
    assert x.shape == (5, 1, 64, 64) and y.shape == (5, 64, 64) and x.min() >= -1 and x.max() <= 1
    x2, y2 = synthetic_source(factory.generator, branch, 0, 5, seed=3)
    assert torch.allclose(x, x2, atol=1e-5) and (y == y2).float().mean() > 0.99  # seeded; chunking changes only float rounding
    assert not torch.equal(synthetic_source(factory.generator, branch, 1, 5, seed=3)[0], x)  # the client id matters


def test_target_training_resumes_exactly(tmp_path, factory, source_data, target_data):
    job = JobDir(tmp_path / "src", "source", {})
    source, _ = train_source(factory, source_data, settings(steps=2), job, 0, resume=job.open())
    s = settings(steps=4)
    job = JobDir(tmp_path / "full", "target", {})
    full, _ = train_target(factory, source.branch_source, 0, 1, target_data, s, job, resume=job.open())

    class Stop(Exception):
        pass

    def interrupt(done, total, row):
        if done == 3:
            raise Stop

    job = JobDir(tmp_path / "cut", "target", {})
    with pytest.raises(Stop):
        train_target(factory, source.branch_source, 0, 1, target_data, s, job, resume=job.open(), progress=interrupt)
    job = JobDir(tmp_path / "cut", "target", {})
    assert job.open() is True
    resumed, _ = train_target(factory, source.branch_source, 0, 1, target_data, s, job, resume=True)
    assert _equal(_state(resumed.encoder), _state(full.encoder)) and _equal(_state(resumed.branch_target), _state(full.branch_target))
