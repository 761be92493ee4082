"""Where the science runs: device resolution, mixed precision, a loss scale for fp16, and what torch sees.

The settings are spelled in `fedimg_core.devices`; this module turns them into torch objects.
Plans and local jobs call `resolve_device` (a job's ``--device`` or the site's ``device``) or
`plan_device` (Fed-BioMed's rule, for work Fed-BioMed does not place itself, such as scoring),
then `precision_for` and `autocast`. Parameters that leave a site are CPU float32 whatever
ran where: Fed-BioMed moves the model back to the CPU after training, and autocast never
changes a parameter's dtype.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fedimg_core.devices import cuda_index, parse_device
from fedimg_core.errors import FedimgError

__all__ = [
    "DeviceError",
    "LossScale",
    "Precision",
    "accumulation_device",
    "autocast",
    "describe_devices",
    "move_optimizer_state",
    "on_device",
    "plan_device",
    "precision_for",
    "resolve_device",
    "smoke_test",
]

log = logging.getLogger(__name__)


class DeviceError(FedimgError):
    """A device or precision setting this machine cannot honour; the message says which and what to set instead."""


def _torch_build() -> str:
    return f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ", a CPU-only build")


def resolve_device(setting: str = "auto") -> torch.device:
    """The torch device of a device setting on this machine.

    Args:
        setting: ``auto`` (the current GPU when torch sees one, else the CPU), ``cpu``,
            ``cuda`` or ``cuda:N``.

    Returns:
        The device.

    Raises:
        DeviceError: a bad setting, ``cuda`` where torch sees no GPU, or a GPU index beyond
            the cards torch sees.
    """
    try:
        setting = parse_device(setting)
    except ValueError as exc:
        raise DeviceError(f"device {exc}") from None
    if setting == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if setting == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")
    if not available:
        raise DeviceError(
            f"device {setting!r} is set but torch sees no CUDA GPU ({_torch_build()}); "
            "set device: auto or cpu, or install the CUDA build (the site image's CUDA variant)"
        )
    index = cuda_index(setting)
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise DeviceError(f"device {setting!r} is set but torch sees {count} GPU(s) (cuda:0..cuda:{count - 1}); set one of those or auto")
    return torch.device("cuda", index if index is not None else torch.cuda.current_device())


def plan_device(site_setting: str, experiment_gpu: str = "optional") -> torch.device:
    """Where a plan's own work (scoring) runs: the device Fed-BioMed would train on.

    ``forbidden`` keeps every site on its CPU; otherwise the site's setting decides (``cpu``,
    ``auto``: a GPU when torch sees one, ``cuda[:N]``: that GPU or an error).

    Args:
        site_setting: the site's device setting (the node's ``FEDIMG_DEVICE``).
        experiment_gpu: the spec's ``device.gpu``: optional, required or forbidden.

    Returns:
        The device.

    Raises:
        DeviceError: the experiment requires a GPU and this site has none (or offers none),
            or the site forces a GPU torch does not see.
    """
    setting = parse_device(site_setting)
    if experiment_gpu == "forbidden" or setting == "cpu":
        device = torch.device("cpu")  # an experiment that forbids GPUs (bit-for-bit CPU runs) overrides a site's GPU
    else:
        device = resolve_device(setting)  # cuda[:N] insists on that GPU; auto takes one when torch sees it
    if experiment_gpu == "required" and device.type != "cuda":
        why = "its device setting is cpu" if setting == "cpu" else f"torch sees no CUDA GPU ({_torch_build()})"
        raise DeviceError(f"the experiment requires a GPU but this site trains on the CPU: {why}")
    return device


@dataclass(frozen=True)
class Precision:
    """How a step computes: ``dtype`` None is full float32; ``loss_scale`` for fp16 (gradients underflow without it)."""

    dtype: torch.dtype | None
    loss_scale: bool = False

    @property
    def name(self) -> str:
        """``fp32``, ``bf16`` or ``fp16``."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def _bf16_on(device: torch.device) -> bool:
    # native bf16 from Ampere (capability 8.0); torch.cuda.is_bf16_supported() also counts the slow
    # emulation of older GPUs, where fp16 with a loss scale is the fast choice
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_properties(device).major >= 8)


def precision_for(device: torch.device, setting: str = "auto") -> Precision:
    """The precision a setting means on a device.

    Args:
        device: where the step runs.
        setting: ``auto`` (bf16 on a GPU that has it, else fp16 with a loss scale; fp32 on the
            CPU, where bf16 is slower on most processors), ``fp32``, ``bf16`` or ``fp16``.

    Returns:
        The precision.

    Raises:
        DeviceError: an unknown setting, bf16 on a GPU without it, or fp16 on the CPU.
    """
    if setting == "fp32":
        return Precision(None)
    if setting == "auto":
        if device.type != "cuda":
            return Precision(None)
        return Precision(torch.bfloat16) if _bf16_on(device) else Precision(torch.float16, loss_scale=True)
    if setting == "bf16":
        if not _bf16_on(device):
            raise DeviceError(f"precision bf16 is set but {torch.cuda.get_device_name(device)} has no bf16; set precision: auto (fp16) or fp32")
        return Precision(torch.bfloat16)
    if setting == "fp16":
        if device.type != "cuda":
            raise DeviceError("precision fp16 needs a CUDA GPU (this step runs on the CPU); set precision: auto, bf16 or fp32")
        return Precision(torch.float16, loss_scale=True)
    raise DeviceError(f"precision must be auto, fp32, bf16 or fp16 (got {setting!r})")


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    """torch's autocast for a device and precision (a no-op context for fp32).

    Args:
        device: where the step runs.
        precision: from `precision_for`.

    Returns:
        The context manager to run the forward pass and the loss under.
    """
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by a scale."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class LossScale:
    """Dynamic loss scaling for fp16 training, for any optimizer.

    torch's ``GradScaler`` steps a torch optimizer itself; Fed-BioMed steps either a torch
    optimizer or a declearn one (SCAFFOLD) after its own backward pass, so the scale is kept
    here with GradScaler's policy: start at 2^16, halve and skip the step when a gradient is
    not finite, double after 2,000 finite steps in a row.

    Args:
        init: the first scale.
        growth_interval: finite steps in a row before the scale doubles.
    """

    def __init__(self, init: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = float(init)
        self.growth_interval = growth_interval
        self.finite_streak = 0
        self.skipped = 0

    def scale_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss, unchanged in value, whose backward pass starts from the scale instead of 1.

        Fed-BioMed reports the loss the plan returns; scaling only the gradient keeps that report true.

        Args:
            loss: the step's loss (a scalar).

        Returns:
            The same value, with its gradient scaled.
        """
        scaled: torch.Tensor = _ScaleGradient.apply(loss, self.scale)  # type: ignore[no-untyped-call]
        return scaled

    def unscale(self, parameters: Iterable[torch.nn.Parameter]) -> bool:
        """Divide the gradients by the scale, in place, and update the scale.

        Args:
            parameters: the model's parameters (those without a gradient are left alone).

        Returns:
            Whether every gradient is finite: step the optimizer only then (the gradients are
            zeroed otherwise, so a step taken anyway changes nothing but the optimizer's state).
        """
        grads = [p.grad for p in parameters if p.grad is not None]
        finite = True
        by_device: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for g in grads:
            by_device.setdefault((g.device, g.dtype), []).append(g)
        for (device, _dtype), group in by_device.items():
            # torch's fused kernel (GradScaler's): unscales in place and flags a non-finite value, one sync per device
            found = torch.zeros(1, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.full((1,), 1.0 / self.scale, device=device))
            finite = finite and not bool(found.item())
        if finite:
            self.finite_streak += 1
            if self.finite_streak >= self.growth_interval:
                self.scale *= 2.0
                self.finite_streak = 0
        else:
            for g in grads:
                g.zero_()
            self.scale /= 2.0
            self.finite_streak = 0
            self.skipped += 1
        return finite


def accumulation_device(device: torch.device, voxels: int, channels: int = 32) -> torch.device:
    """Where a sliding window's output accumulates: on the GPU when it fits comfortably, else on the CPU.

    MONAI keeps the blended logits and a count map of the whole volume; with the class
    probabilities that follow, about three float32 copies of (channels x voxels).

    Args:
        device: where the windows run.
        voxels: the volume's voxel count.
        channels: the output channels (an upper bound is fine).

    Returns:
        `device`, or the CPU when the GPU's free memory is less than twice that.
    """
    if device.type != "cuda":
        return device
    free, _total = torch.cuda.mem_get_info(device)
    return device if 3 * 4 * channels * voxels * 2 < free else torch.device("cpu")


def move_optimizer_state(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move a torch optimizer's state tensors to a device (where its parameters are about to go).

    ``step`` counters stay where torch keeps them (on the CPU, for the non-fused optimizers),
    as ``Optimizer.load_state_dict`` leaves them.

    Args:
        optimizer: the optimizer.
        device: the device.
    """
    for state in optimizer.state.values():
        for key, value in state.items():
            if key != "step" and isinstance(value, torch.Tensor):
                state[key] = value.to(device)


def _driver_version() -> str | None:
    """The NVIDIA driver version (nvidia-smi), None where there is none."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run([exe, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def describe_devices() -> dict[str, Any]:
    """What torch sees: its build, CUDA and cuDNN versions, the driver, and every GPU.

    Returns:
        ``{"torch", "cuda_build", "cudnn", "cuda_available", "driver", "gpus": [{index, name,
        memory_mb, capability, bf16}]}``.
    """
    available = torch.cuda.is_available()
    gpus = []
    if available:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(
                {
                    "index": i,
                    "name": props.name,
                    "memory_mb": int(props.total_memory // 2**20),
                    "capability": f"{props.major}.{props.minor}",
                    "bf16": _bf16_on(torch.device("cuda", i)),
                }
            )
    return {
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if available else None,  # type: ignore[no-untyped-call]
        "cuda_available": available,
        "driver": _driver_version() if available else None,
        "gpus": gpus,
    }


def smoke_test(device: torch.device) -> tuple[bool, str]:
    """Run a tiny 3D convolution on a device and compare it with the CPU's result.

    Args:
        device: the device to check.

    Returns:
        (whether it ran and agreed, a one-line account: time, or the error).
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 12, 12, 12, generator=gen)
    w = torch.randn(4, 2, 3, 3, 3, generator=gen)
    expected = torch.nn.functional.conv3d(x, w, padding=1)
    try:
        t0 = time.perf_counter()
        got = torch.nn.functional.conv3d(x.to(device), w.to(device), padding=1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        got = got.cpu()
    except Exception as exc:  # noqa: BLE001 - any failure of the device is the answer
        return False, f"{device}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    error = float((got - expected).abs().max())
    ok = error < 1e-2  # TF32 convolutions on Ampere differ from the CPU's by ~1e-3 here
    return ok, f"{device}: a 3D convolution ran in {seconds * 1000:.1f} ms, max difference from the CPU {error:.1e}" + ("" if ok else " (too large)")


@contextlib.contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[torch.nn.Module]:
    """Move a module to a device for a block and back to where it was.

    Args:
        module: the module (its parameters all on one device).
        device: where to run the block.

    Yields:
        The module, on `device`.
    """
    first = next(module.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)
