"""The local adaptation jobs on a chosen device (issue 22): `train_source` / `train_target` / `run_infer`
and `site-agent adapt source|target --device`.

On the CPU: an explicit CPU device gives bit for bit what the default gives, what a job saves is
CPU tensors, and a CUDA device on a machine without one is one clear line before any work.
Tests marked ``gpu`` run the same tiny jobs on CUDA (skipped where torch sees no GPU).
"""

from __future__ import annotations

import io
import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import cli
from test_adaptation_cli import model_file  # noqa: F401 - a module-scoped fixture: an untrained target model.pt
from test_adaptation_training import datasets, factory, schema, settings, source_data, target_data  # noqa: F401 - fixtures

from fedimg_testing.phantom import make_phantom
from pipelines.adaptation.jobs import JobDir
from pipelines.adaptation.networks import branch_files
from pipelines.adaptation.training import AdaptedModel, train_source, train_target

HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def _state(module):
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tensors(obj):
    """Every tensor in a nested checkpoint / state."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _assert_saved_on_cpu(job: JobDir, model: AdaptedModel) -> None:
    """model.pt's state, the checkpoint and (source models) the branch files hold CPU tensors only.

    Loaded without ``map_location``: a tensor saved on a GPU would come back on the GPU (or fail on a CPU machine).
    """
    saved = [torch.load(io.BytesIO(_blob(model.state())), weights_only=True), torch.load(job.checkpoint_file, weights_only=True)]
    if model.kind == "source":
        saved.append(torch.load(io.BytesIO(branch_files(model.branch_source)["branch.pt"]), weights_only=True))
    for obj in saved:
        devices = {t.device.type for t in _tensors(obj)}
        assert devices == {"cpu"}, devices


def _blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _run_source(tmp_path, fac, data, name, steps=1, **kw):  # one step of two slices: the plumbing, not the learning
    job = JobDir(tmp_path / name, "source", {})
    model, summary = train_source(fac, data, settings(steps=steps, batch=2), job, 0, resume=job.open(), **kw)
    return job, model, summary


def _run_target(tmp_path, fac, branch, data, name, steps=1, **kw):
    job = JobDir(tmp_path / name, "target", {})
    model, summary = train_target(fac, branch, 0, 1, data, settings(steps=steps, batch=2), job, resume=job.open(), **kw)
    return job, model, summary


def _losses(job: JobDir) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "step_s"} for row in job.metrics()]  # step_s: wall time


@pytest.fixture(scope="module")
def source_model(tmp_path_factory, factory, source_data):  # noqa: F811 - the imported fixtures
    """A tiny source job's model (default device), whose branch the target jobs adapt."""
    return _run_source(tmp_path_factory.mktemp("source"), factory, source_data, "src")[1]


# -- the CPU: an explicit device changes nothing ---------------------------------------------


def test_a_source_job_on_an_explicit_cpu_device_is_bit_identical_to_the_default(tmp_path, factory, source_data):  # noqa: F811
    job_a, default, sum_a = _run_source(tmp_path, factory, source_data, "default")
    job_b, explicit, sum_b = _run_source(tmp_path, factory, source_data, "cpu", device=torch.device("cpu"))
    assert explicit.device == torch.device("cpu") and default.device == torch.device("cpu")
    assert _equal(_state(default.encoder), _state(explicit.encoder)) and _equal(_state(default.branch_source), _state(explicit.branch_source))
    assert _losses(job_a) == _losses(job_b) and json.dumps(sum_a, sort_keys=True) == json.dumps(sum_b, sort_keys=True)
    x = source_data.images[:3]
    assert torch.equal(default.predict(x), explicit.predict(x))
    assert explicit.generator is factory.generator  # on its own device the factory's generator is used, not copied
    _assert_saved_on_cpu(job_b, explicit)


def test_a_target_job_on_an_explicit_cpu_device_is_bit_identical_to_the_default(tmp_path, factory, source_model, target_data):  # noqa: F811
    branch = source_model.branch_source
    before = _state(branch)
    job_a, default, sum_a = _run_target(tmp_path, factory, branch, target_data, "default")
    job_b, explicit, sum_b = _run_target(tmp_path, factory, branch, target_data, "cpu", device="cpu")
    assert _equal(_state(default.encoder), _state(explicit.encoder)) and _equal(_state(default.branch_target), _state(explicit.branch_target))
    assert _losses(job_a) == _losses(job_b) and json.dumps(sum_a, sort_keys=True) == json.dumps(sum_b, sort_keys=True)
    x = target_data.images[:3]
    for mode in ("average", "target", "source"):
        assert torch.equal(default.predict(x, mode), explicit.predict(x, mode))
    assert _equal(_state(branch), before)  # the published branch is copied, never trained or moved
    _assert_saved_on_cpu(job_b, explicit)


def test_infer_on_an_explicit_cpu_device_writes_the_same_labels(model_file, tmp_path):  # noqa: F811
    from site_agent.adapt import run_infer

    vol = make_phantom(6, "portal_venous", (32, 32, 8), (6.0, 6.0, 10.0))
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.hu.astype(np.float32), np.diag([6.0, 6.0, 10.0, 1.0])), nifti)
    (a,) = run_infer(model_file, [str(nifti)], tmp_path / "default", modality="CT")
    (b,) = run_infer(model_file, [str(nifti)], tmp_path / "cpu", modality="CT", device="cpu")
    assert np.array_equal(np.asarray(nib.load(a["label"]).dataobj), np.asarray(nib.load(b["label"]).dataobj)) and a["voxels"] == b["voxels"]


# -- a device this machine lacks: one line, before any work ---------------------------------


def _site_config(tmp_path, **over):
    raw = {"site_name": "site-a", "coordinator": {"host": "localhost", "port": 50051}, "data_dir": str(tmp_path / "data"),
           "work_dir": str(tmp_path / "work"), "runtime": "process", "registry": {"url": "http://127.0.0.1:9"}, **over}  # fmt: skip
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@no_cuda
def test_adapt_with_a_cuda_device_on_a_machine_without_cuda_is_one_line_before_any_work(tmp_path):
    config = _site_config(tmp_path)
    env = {"FEDIMG_SITE_TOKEN": "not-used"}  # the registry would be asked next (and is unreachable): it must not be
    done = cli("site-agent", "--config", config, "adapt", "source", "--dataset", "ds", "--factory", "f", "--branch", "b", "--device", "cuda",
               env=env)  # fmt: skip
    assert done.returncode != 0 and "--device: device 'cuda' is set but torch sees no CUDA GPU" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "work" / "adapt").exists() and not (tmp_path / "work" / "staging").exists()

    config = _site_config(tmp_path, device="cuda:0")  # the site's device, no --device: the error names the config file
    done = cli("site-agent", "--config", config, "adapt", "target", "--dataset", "ds", "--factory", "f", "--branch", "b", env=env)
    assert done.returncode != 0 and f"{config}: device 'cuda:0' is set but torch sees no CUDA GPU" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "work" / "adapt").exists() and not (tmp_path / "work" / "staging").exists()


@no_cuda
def test_infer_an_adapted_model_with_a_cuda_device_without_cuda_writes_nothing(model_file, tmp_path):  # noqa: F811
    from site_agent.adapt import run_infer
    from site_agent.errors import UserError

    with pytest.raises(UserError, match=r"^--device: device 'cuda' is set but torch sees no CUDA GPU") as err:
        run_infer(model_file, [str(tmp_path / "missing.nii.gz")], tmp_path / "out", modality="CT", device="cuda")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


# -- the same jobs on CUDA (skipped without a GPU) --------------------------------------------


@pytest.fixture
def no_tf32(monkeypatch):
    """Full float32 convolutions on the GPU (TF32 is cuDNN's default on Ampere and later), so the GPU's
    numbers can be held to the CPU's closely: what differs then is only the order of the sums."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@gpu
@needs_cuda
def test_gpu_source_job_trains_on_cuda_and_saves_cpu_tensors(no_tf32, tmp_path, factory, source_data):  # noqa: F811
    cuda = torch.device("cuda", torch.cuda.current_device())
    job_cpu, _cpu_model, _ = _run_source(tmp_path, factory, source_data, "cpu", steps=2)
    job, model, summary = _run_source(tmp_path, factory, source_data, "gpu", steps=2, device="cuda")
    assert model.device == cuda and model.generator is not factory.generator
    assert all(p.device.type == "cpu" for p in factory.generator.parameters())  # the caller's factory is not moved
    assert set(summary["validation"]["mean"]) == {1, 2}
    rows, rows_cpu = job.metrics(), job_cpu.metrics()
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    # the same initial weights and batches: the first loss differs only by the device's float rounding
    assert rows[0]["loss"] == pytest.approx(rows_cpu[0]["loss"], rel=1e-3)
    _assert_saved_on_cpu(job, model)
    p = model.predict(source_data.images[:3])
    assert p.device == cuda and torch.allclose(p.sum(1), torch.ones_like(p.sum(1)), atol=1e-4)


@gpu
@needs_cuda
def test_gpu_target_job_trains_on_cuda_and_resumes_on_the_cpu(no_tf32, tmp_path, factory, source_model, target_data):  # noqa: F811
    branch = source_model.branch_source
    before = _state(branch)
    job, model, summary = _run_target(tmp_path, factory, branch, target_data, "gpu", steps=3, device="cuda")
    assert model.device.type == "cuda" and set(summary["evaluation"]) == {"average", "target", "source"}
    assert all(t.device.type == "cpu" for t in branch.state_dict().values()) and _equal(_state(branch), before)
    _assert_saved_on_cpu(job, model)
    again = AdaptedModel.from_state(torch.load(io.BytesIO(_blob(model.state())), weights_only=True))  # as a CPU machine loads model.pt
    x = target_data.images[:3]
    assert again.device.type == "cpu" and torch.allclose(again.predict(x), model.predict(x).cpu(), atol=1e-3)

    class Stop(Exception):
        pass

    def interrupt(done, total, row):
        if done == 3:
            raise Stop

    cut = JobDir(tmp_path / "cut", "target", {})
    with pytest.raises(Stop):  # steps 1-2 on the GPU, checkpointed at 2
        train_target(factory, branch, 0, 1, target_data, settings(steps=4, batch=2), cut, resume=cut.open(), progress=interrupt, device="cuda")
    cut = JobDir(tmp_path / "cut", "target", {})
    assert cut.open() is True
    resumed, _ = train_target(factory, branch, 0, 1, target_data, settings(steps=4, batch=2), cut, resume=True)  # and the rest on the CPU
    assert resumed.device.type == "cpu" and [r["step"] for r in cut.metrics()] == [1, 2, 3, 4]


@gpu
@needs_cuda
def test_gpu_infer_runs_the_adapted_model_on_cuda(no_tf32, model_file, tmp_path):  # noqa: F811
    from site_agent.adapt import run_infer

    vol = make_phantom(6, "portal_venous", (32, 32, 8), (6.0, 6.0, 10.0))
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.hu.astype(np.float32), np.diag([6.0, 6.0, 10.0, 1.0])), nifti)
    (a,) = run_infer(model_file, [str(nifti)], tmp_path / "cpu", modality="CT", device="cpu")
    (b,) = run_infer(model_file, [str(nifti)], tmp_path / "cuda", modality="CT", device="cuda")
    la, lb = np.asarray(nib.load(a["label"]).dataobj), np.asarray(nib.load(b["label"]).dataobj)
    assert la.shape == lb.shape and (la == lb).mean() > 0.99  # the same labels up to float rounding at class borders
