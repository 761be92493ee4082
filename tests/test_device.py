"""Device plumbing on CPU (issue 22): settings, Fed-BioMed node arguments, the plan's device and precision,
the fp16 loss scale, the spec's device section, the site config, the container's GPU request and the
clear errors for a GPU this machine lacks. Tests marked ``gpu`` run the same paths on CUDA."""

from __future__ import annotations

import json
import types

import pytest
import torch

from fedimg_core.devices import DEVICE_ENV, node_args_for, parse_device
from pipelines.device import DeviceError, LossScale, Precision, autocast, plan_device, precision_for, resolve_device, smoke_test
from pipelines.wire import decode_params

HAS_CUDA = torch.cuda.is_available()
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
gpu = pytest.mark.gpu


# -- settings and Fed-BioMed's node arguments -------------------------------------------


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("CPU", "cpu"), (" cuda ", "cuda"), ("cuda:1", "cuda:1")])
def test_device_settings_are_checked(value, expected):
    assert parse_device(value) == expected


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cuda:", "mps", ""])
def test_bad_device_settings_say_what_is_allowed(value):
    with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
        parse_device(value)


def test_node_arguments_follow_the_site_device():
    assert node_args_for("cpu") == {"gpu": False, "gpu_num": None, "gpu_only": False, "debug": False}
    assert node_args_for("auto") == {"gpu": True, "gpu_num": None, "gpu_only": False, "debug": False}
    assert node_args_for("cuda:1") == {"gpu": True, "gpu_num": 1, "gpu_only": True, "debug": False}


# -- resolving devices and precisions -----------------------------------------------------


def test_cpu_and_auto_resolve_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")


@no_cuda
@pytest.mark.parametrize("setting", ["cuda", "cuda:0"])
def test_a_cuda_setting_without_cuda_is_one_clear_error(setting):
    with pytest.raises(DeviceError) as err:
        resolve_device(setting)
    message = str(err.value)
    assert f"device '{setting}' is set but torch sees no CUDA GPU" in message and "set device: auto or cpu" in message and "\n" not in message


def test_the_experiment_policy_decides_within_the_site_setting(monkeypatch):
    assert plan_device("cpu", "optional").type == "cpu"
    assert plan_device("auto", "forbidden").type == "cpu"
    assert plan_device("cuda:1", "forbidden").type == "cpu"  # forbidden wins over a site that insists on its GPU
    with pytest.raises(DeviceError, match="requires a GPU but this site trains on the CPU: its device setting is cpu"):
        plan_device("cpu", "required")
    if not HAS_CUDA:
        with pytest.raises(DeviceError, match="requires a GPU .* torch sees no CUDA GPU"):
            plan_device("auto", "required")


def test_precisions_on_the_cpu():
    cpu = torch.device("cpu")
    assert precision_for(cpu, "auto") == Precision(None)  # bf16 is slower than fp32 on most CPUs
    assert precision_for(cpu, "bf16") == Precision(torch.bfloat16)
    assert precision_for(cpu, "fp32").name == "fp32"
    with pytest.raises(DeviceError, match="fp16 needs a CUDA GPU"):
        precision_for(cpu, "fp16")
    with pytest.raises(DeviceError, match="precision must be"):
        precision_for(cpu, "fp8")


def test_bf16_autocast_on_the_cpu_computes_in_bf16_and_keeps_parameters_float32():
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    x = torch.randn(1, 1, 8, 8, 8)
    with autocast(torch.device("cpu"), Precision(torch.bfloat16)):
        out = net(x)
    assert out.dtype == torch.bfloat16 and net.weight.dtype == torch.float32
    with autocast(torch.device("cpu"), Precision(None)):
        assert net(x).dtype == torch.float32


def test_the_smoke_test_runs_a_convolution_and_compares_it():
    ok, detail = smoke_test(torch.device("cpu"))
    assert ok and "max difference from the CPU 0.0e+00" in detail


# -- the fp16 loss scale ------------------------------------------------------------------


def test_loss_scale_scales_only_the_gradient_and_unscales_it_exactly():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5))
    x = torch.randn(5)
    (w * x).sum().backward()
    plain = w.grad.clone()
    w.grad = None
    scale = LossScale(init=1024.0)
    loss = scale.scale_backward((w * x).sum())
    assert float(loss.detach()) == pytest.approx(float((w * x).sum().detach()))  # the value Fed-BioMed reports is the true loss
    loss.backward()
    assert torch.allclose(w.grad, plain * 1024.0)
    assert scale.unscale([w]) and torch.allclose(w.grad, plain)


def test_loss_scale_skips_overflowing_steps_and_grows_after_a_streak():
    w = torch.nn.Parameter(torch.ones(3))
    scale = LossScale(init=8.0, growth_interval=2)
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not scale.unscale([w]) and scale.scale == 4.0 and scale.skipped == 1 and not w.grad.any()
    for _ in range(2):
        w.grad = torch.ones(3)
        assert scale.unscale([w])
    assert scale.scale == 8.0


# -- the segmentation plan on its device ------------------------------------------------


@pytest.fixture
def plan_round(fedbiomed_round, tmp_path_factory, tmp_path, monkeypatch, site_process, one_thread):
    """A marginal plan with its data loaded by Fed-BioMed's own Round code, ready for `training_routine`."""
    from fedbiomed.common.training_args import TrainingArgs

    from coordinator.plans import model_args_for
    from fedimg_testing.synthetic import write_synthetic_dataset
    from pipelines.plans.marginal import MarginalSegmentationPlan
    from tests.test_split_data import _fedbiomed_round, _training_args

    root = tmp_path_factory.mktemp("device-site") / "prepared"
    write_synthetic_dataset(root, seed=4, n_cases=4, shape=(32, 32, 32))
    monkeypatch.setenv("FEDIMG_CACHE_DIR", str(tmp_path / "cache"))

    def make(device: dict, site_device: str = "cpu", plan_cls=MarginalSegmentationPlan, fedprox_mu: float | None = None, **plan_args):
        monkeypatch.setenv(DEVICE_ENV, site_device)
        args = model_args_for(
            "marginal", {"network": {"name": "basic_unet", "size": "tiny"}, "roi_size": 32, "spacing": "native", "augment": False, **plan_args}
        )
        args.update(run_id="run-device", rounds_total=2, local_steps=2, device=device, split={"validation": 0.25, "test": 0.0, "seed": 0})
        plan = plan_cls()
        training_args = _training_args(0.25)
        if fedprox_mu is not None:
            training_args = TrainingArgs({**training_args.dict(), "fedprox_mu": fedprox_mu}, only_required=False)
        plan.post_init(args, training_args, node_id="NODE_A", round=0)
        _fedbiomed_round(fedbiomed_round, plan, root, {}, test_ratio=0.25)
        return plan

    return make


def test_bf16_round_on_the_cpu_sends_cpu_float32_parameters(plan_round):
    plan = plan_round({"gpu": "optional", "precision": "bf16"})
    dtypes: list[torch.dtype] = []
    plan.model().register_forward_hook(lambda m, i, o: dtypes.append((o[0] if isinstance(o, (list, tuple)) else o).dtype))
    before = {k: v.detach().clone() for k, v in plan.model().state_dict().items()}
    plan.training_routine(history_monitor=None, node_args={"gpu": False})
    assert plan._precision is not None and plan._precision.name == "bf16"
    assert dtypes and set(dtypes) == {torch.bfloat16}  # the forward passes ran under bf16 autocast
    params = decode_params(plan.after_training_params())  # what the node sends, as the coordinator reads it
    assert all(v.device.type == "cpu" and v.dtype == before[k].dtype for k, v in params.items())
    assert all(v.dtype == torch.float32 for v in params.values() if v.is_floating_point())
    assert any(not torch.equal(params[k], before[k]) for k in params)  # it trained


def test_a_round_requiring_a_gpu_is_refused_at_a_cpu_site(plan_round):
    from pipelines.site_errors import SiteError

    plan = plan_round({"gpu": "required", "precision": "auto"}, site_device="cpu")
    with pytest.raises(SiteError) as err:  # what the coordinator reads: the code, not the site's text
        plan.training_routine(history_monitor=None, node_args={"gpu": False})
    assert err.value.code == "device" and "device.gpu: required at a site without a GPU" in str(err.value)


def test_the_fp16_loss_scale_unscales_before_the_optimizer_steps(plan_round):
    """The fp16 path's scale and unscale around Fed-BioMed's own backward and step (on the CPU without
    autocast): the gradients reaching AdamW equal the plain run's."""

    def force_scale(self, device):
        if self._precision is None:
            self._precision = Precision(None, loss_scale=True)
            self._loss_scale = LossScale(init=2.0**10)
        return self._precision

    def run(scaled: bool) -> list[torch.Tensor]:
        torch.manual_seed(1)
        plan = plan_round({"gpu": "optional", "precision": "fp32"})
        if scaled:
            plan._step_precision = types.MethodType(force_scale, plan)
        grads: list[torch.Tensor] = []
        params = list(plan.model().parameters())
        plan._adamw.register_step_pre_hook(lambda opt, a, k: grads.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None])))
        plan.training_routine(history_monitor=None, node_args={"gpu": False})
        if scaled:
            assert plan._loss_scale is not None and plan._loss_scale.skipped == 0
        return grads

    plain, scaled = run(False), run(True)
    assert len(plain) == len(scaled) == 2
    for a, b in zip(plain, scaled):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


# -- the spec's device section ----------------------------------------------------------


def _spec(tmp_path, extra: str):
    from coordinator.spec import load

    path = tmp_path / "spec.yaml"
    path.write_text(f"name: dev\nplan: marginal\nsites: {{tags: [t]}}\nrounds: 2\nlocal_steps: 30\n{extra}")
    return load(path)


def test_the_spec_device_section_reaches_the_sites(tmp_path):
    spec = _spec(tmp_path, "device: {gpu: required, precision: bf16}\n")
    assert spec.experiment_model_args(run_id="r")["device"] == {"gpu": "required", "precision": "bf16"}
    assert spec.training_args()["use_gpu"] is True
    assert _spec(tmp_path, "device: {gpu: forbidden}\n").training_args()["use_gpu"] is False
    assert _spec(tmp_path, "").device == {"gpu": "optional", "precision": "auto"}


@pytest.mark.parametrize(
    "extra,words",
    [
        ("device: {gpu: sometimes}\n", "device.gpu: must be one of optional, required, forbidden"),
        ("device: {gpu: required, precision: fp16}\nfedprox_mu: 0.01\n", "device.precision: fp16 cannot be combined with fedprox_mu"),
        ("device: {precision: fp16}\n", "device.precision: fp16 runs on GPUs only: set device.gpu: required"),
    ],
)
def test_bad_spec_device_sections_name_the_key(tmp_path, extra, words):
    from fedimg_core.errors import ConfigError

    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        _spec(tmp_path, extra)


# -- the site: config, node, container, doctor, jobs ---------------------------------------


def _site(tmp_path, device: str = "auto"):
    from site_agent import config as site_config

    raw = {
        "site_name": "site-a",
        "coordinator": {"host": "coordinator.example.org", "port": 50051},
        "data_dir": str(tmp_path / "data"),
        "work_dir": str(tmp_path / "work"),
        "device": device,
    }
    return site_config.validate(raw, "site.yaml")


def test_the_site_config_device_is_validated_and_kept(tmp_path):
    from fedimg_core.errors import ConfigError
    from site_agent import config as site_config

    site = _site(tmp_path, "cuda:1")
    assert site.device == "cuda:1" and site_config.validate(site.to_dict(), "again").device == "cuda:1"
    assert _site(tmp_path.parent / "other", "auto").device == "auto"
    with pytest.raises(ConfigError, match=r"site\.yaml: device: must be auto, cpu, cuda or cuda:N"):
        _site(tmp_path, "gpu0")


def test_the_node_gets_the_site_device(tmp_path):
    from site_agent.runtime import node_command, node_environment

    site = _site(tmp_path, "cuda:1")
    cmd = node_command(site)
    assert json.loads(cmd[cmd.index("--node-args") + 1]) == {"gpu": True, "gpu_num": 1, "gpu_only": True, "debug": False}
    assert node_environment(site, base={})[DEVICE_ENV] == "cuda:1"


def test_the_container_requests_gpus_for_gpu_devices(tmp_path):
    from site_agent.runtime import container_spec

    assert "device_requests" not in container_spec(_site(tmp_path, "cpu"), engine_has_gpus=True)
    assert "device_requests" not in container_spec(_site(tmp_path, "auto"), engine_has_gpus=False)
    (auto,) = container_spec(_site(tmp_path, "auto"), engine_has_gpus=True)["device_requests"]
    assert auto["Count"] == -1 and auto["Capabilities"] == [["gpu"]]
    spec = container_spec(_site(tmp_path, "cuda:1"))
    (one,) = spec["device_requests"]
    assert one["DeviceIDs"] == ["1"] and spec["command"][-2:] == ["--device", "cuda:0"]  # the one card it sees


@no_cuda
def test_start_with_a_cuda_device_on_a_machine_without_cuda_is_refused_before_the_node_starts(tmp_path):
    from site_agent.errors import UserError
    from site_agent.runtime import ProcessRuntime

    site = _site(tmp_path, "cuda")
    (site.node_dir / "etc").mkdir(parents=True)
    (site.node_dir / "etc" / "config.ini").write_text("[default]\n")
    with pytest.raises(UserError, match="device 'cuda' is set but torch sees no CUDA GPU"):
        ProcessRuntime(site).start()
    assert not site.pid_file.exists()


def test_doctor_reports_what_torch_sees_and_checks_the_device(tmp_path):
    from site_agent.doctor import check_device

    seen, device = check_device("cpu")
    assert seen.name == "torch devices" and f"torch {torch.__version__}" in seen.detail
    assert device.name == "device cpu" and device.ok
    if not HAS_CUDA:
        assert "no CUDA GPU visible" in seen.detail and seen.ok is None
        bad = check_device("cuda:0")[1]
        assert bad.ok is False and "set device: auto or cpu" in bad.hint


@no_cuda
def test_infer_with_a_cuda_device_is_one_clear_error(tmp_path):
    from test_model_package import _fake_run

    from coordinator.publish import publish_model
    from coordinator.registry import Registry
    from tests.conftest import cli

    home = tmp_path / "coord"
    publish_model(home, _fake_run(home).name)
    package = Registry(home).path("model", "abdomen")

    done = cli("site-agent", "infer", str(tmp_path / "missing.nii.gz"), "--model", str(package), "--out", str(tmp_path / "out"), "--device", "cuda")
    assert done.returncode != 0 and "--device: device 'cuda' is set but torch sees no CUDA GPU" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


# -- the same paths on CUDA (skipped without a GPU) ----------------------------------------


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_smoke_and_precision():
    device = resolve_device("cuda")
    ok, detail = smoke_test(device)
    assert ok, detail
    precision = precision_for(device, "auto")
    assert precision.name in ("bf16", "fp16")
    net = torch.nn.Conv3d(1, 2, 3, padding=1).to(device)
    with autocast(device, precision):
        assert net(torch.randn(1, 1, 8, 8, 8, device=device)).dtype == precision.dtype


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_condistfl_fedprox_round_scores_and_reports_on_the_cpu(plan_round):
    """ConDistFL's teacher and Fed-BioMed's FedProx snapshot follow the model to the GPU and back; scoring runs there."""
    from pipelines.plans.condistfl import ConDistFLPlan
    from tests.test_split_data import Monitor

    plan = plan_round({"gpu": "required", "precision": "auto"}, site_device="cuda", plan_cls=ConDistFLPlan, fedprox_mu=0.01)
    monitor = Monitor()
    plan.training_routine(history_monitor=monitor, node_args={"gpu": True})
    report = monitor.scalars[-1]["metric"]
    assert report["teacher_max_abs_diff"] == 0.0 and next(plan.model().parameters()).device.type == "cpu"
    plan.testing_routine(None, {}, monitor, before_train=False)
    assert "dice_mean" in monitor.scalars[-1]["metric"] and next(plan.model().parameters()).device.type == "cpu"


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_round_sends_cpu_float32_parameters(plan_round):
    # augmentation and GIN on: MONAI's crops and random transforms, and GIN, on CUDA tensors
    plan = plan_round({"gpu": "required", "precision": "auto"}, site_device="cuda", augment=True, gin={"prob": 0.5})
    plan.training_routine(history_monitor=None, node_args={"gpu": True})
    assert plan._device.startswith("cuda")
    params = decode_params(plan.after_training_params())  # what the node sends, as the coordinator reads it
    assert all(v.device.type == "cpu" for v in params.values()) and all(v.dtype == torch.float32 for v in params.values() if v.is_floating_point())


def test_optimizer_state_follows_the_model_and_step_counters_stay():
    from pipelines.device import move_optimizer_state

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    move_optimizer_state(opt, torch.device("meta"))  # a device other than the CPU, on any machine
    states = list(opt.state.values())
    assert states and all(s["exp_avg"].device.type == "meta" and s["exp_avg_sq"].device.type == "meta" for s in states)
    assert all(s["step"].device.type == "cpu" for s in states)  # where torch keeps them (load_state_dict does the same)


def test_the_factory_spec_trains_in_fp32(tmp_path):
    from fedimg_core.errors import ConfigError

    path = tmp_path / "factory.yaml"
    path.write_text("name: f\nplan: data_factory\nsites: {tags: [t]}\nrounds: 2\ndevice: {precision: bf16}\n")
    from coordinator.spec import load

    with pytest.raises(ConfigError, match=r"device\.precision: the data factory trains in fp32"):
        load(path)
    path.write_text("name: f\nplan: data_factory\nsites: {tags: [t]}\nrounds: 2\ndevice: {gpu: forbidden}\n")
    assert load(path).experiment_model_args(run_id="r", client_ids={"NODE_A": 0})["device"] == {"gpu": "forbidden"}


def test_the_device_suite_measures_through_the_plans_code(one_thread):
    from tests.conftest import load_benchmark

    suite = load_benchmark("device_suite")
    step = suite.measure_step("tiny", 16, "cpu", "auto", repeats=1)
    assert step["precision"] == "fp32" and step["fedavg_s"] > 0 and step["condistfl_s"] > 0
    assert step["ratio"] == pytest.approx(step["condistfl_s"] / step["fedavg_s"]) and step["condistfl_peak_mb"] >= step["fedavg_peak_mb"] > 0
    infer = suite.measure_infer("tiny", (24, 24, 20), 16, "cpu", repeats=1)
    assert infer["seconds"] > 0 and infer["peak_mb"] > 0
    text = suite._markdown([{"kind": "step", **step}, {"kind": "infer", **infer}, {"kind": "factory", "resolution": 512, "error": "out of memory"}], "header")
    assert "| tiny | 16^3 |" in text and f"**{step['ratio']:.3f}**" in text and "| 512 px | 16 | error: out of memory |" in text
