"""Differential privacy of the segmentation plans: which networks Opacus can train, and the privacy budget spent.

Fed-BioMed 6.4.1 trains with Opacus when ``training_args["dp_args"]`` is set (``{type, sigma, clip}``):
``type: local`` makes the model, optimizer and training loader private at the start of each round
(per-sample gradients clipped to ``clip``, Gaussian noise of standard deviation ``sigma * clip`` added to
their sum at every step, batches drawn by Poisson sampling); ``type: central`` clips the same way without
noise and adds noise of standard deviation ``sigma * clip`` to the parameters a site sends, once per round.

The privacy unit here is a case (a volume): a step draws ``patches_per_volume`` patches from each of
its volumes and Opacus clips each patch's gradient, so one case moves a step's gradient sum by at most
``patches_per_volume * clip`` and the noise multiplier per case is ``sigma / patches_per_volume``
(`case_noise_multiplier`). `epsilon_spent` composes a site's steps over all its rounds with Opacus's
RDP accountant. Layers Opacus cannot give per-sample gradients are found by `network_dp_problem`.
Importing this module imports neither torch nor Opacus (the spec's checks use its names).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the spec's checks import the names above without it
    import torch

__all__ = [
    "DEFAULT_DELTA",
    "DP_TYPES",
    "TRAINING_LOSSES",
    "WithoutTrainingLoss",
    "case_noise_multiplier",
    "disable_inplace",
    "epsilon_spent",
    "is_empty_batch",
    "network_dp_problem",
    "probe_patch",
    "spec_network_dp_problem",
    "site_dp_history",
    "volume_list_collate",
]

DP_TYPES = ("local", "central")
DEFAULT_DELTA = 1e-5

# Measured with Opacus 1.6 (hooks mode, Fed-BioMed's `make_private`): DynUNet's transposed convolutions
# need Opacus's functorch fallback, which fails inside DynUNet's upsampling blocks.
_KNOWN_FIXES = {"dynunet": "use network name basic_unet or mednext"}
_BATCH_NORM_FIX = {
    "basic_unet": "set plan_args.network.norm: instance",
    "dynunet": "set plan_args.network.norm_name: instance",
    "mednext": "set plan_args.network.norm_type: group",
    "flexible_unet": "use network name basic_unet or mednext (flexible_unet's encoder always uses batch norm)",
}


def disable_inplace(model: torch.nn.Module) -> torch.nn.Module:
    """Turn in-place activations off (Opacus's backward hooks cannot follow an in-place change of a hooked layer's output).

    The parameters and ``state_dict`` are unchanged; only memory use grows a little.

    Args:
        model: the network (changed in place).

    Returns:
        The same network.
    """
    for module in model.modules():
        if getattr(module, "inplace", None) is True:
            setattr(module, "inplace", False)  # noqa: B010  # a torch.nn.Module attribute mypy reads as a submodule
    return model


def network_dp_problem(model: torch.nn.Module, name: str, in_channels: int, spatial_dims: int, patch: Sequence[int]) -> str | None:
    """Why Opacus cannot train ``model`` with per-sample gradients, or None when it can.

    Opacus's validator is asked first (BatchNorm and other layers that mix the samples of a batch); then a
    copy of the network (in-place activations off, as the plans train it) runs one forward and backward pass
    of two ``patch``-sized samples under Opacus's `GradSampleModule`, and every trainable parameter must get
    per-sample gradients.

    Args:
        model: the network (not changed).
        name: its ``plan_args.network.name`` (names the fix).
        in_channels: its input channels.
        spatial_dims: 2 or 3.
        patch: the probe's spatial size (small: the network's smallest valid patch).

    Returns:
        A one-line problem naming the layer type and the fix, or None.
    """
    import torch
    from opacus import GradSampleModule  # type: ignore[import-untyped]  # no type information shipped
    from opacus.validators import ModuleValidator  # type: ignore[import-untyped]

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        batch_norms = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
        if batch_norms:
            fix = _BATCH_NORM_FIX.get(name, "use instance or group normalisation")
            return f"{name} has layers differential privacy cannot train ({', '.join(batch_norms)}: it mixes the samples of a batch); {fix}"
        first = " ".join(str(errors[0]).split())[:120]
        return f"{name} has layers differential privacy cannot train ({type(errors[0]).__name__}: {first}); use another network"
    probe = disable_inplace(copy.deepcopy(model)).float().train()
    unsupported = sorted(
        {type(m).__name__ for m in probe.modules() if any(True for _ in m.parameters(recurse=False)) and type(m) not in GradSampleModule.GRAD_SAMPLERS}
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on full backward hooks of a network whose input needs no gradient
            wrapped = GradSampleModule(probe)
            out = wrapped(torch.randn(2, in_channels, *[int(s) for s in patch][:spatial_dims]))
            heads = out if isinstance(out, (tuple, list)) else (out,)  # deep supervision: every head trains
            torch.stack([h.float().mean() for h in heads]).sum().backward()  # type: ignore[no-untyped-call]
        missing = [n for n, p in wrapped.named_parameters() if p.requires_grad and getattr(p, "grad_sample", None) is None]
    except Exception as exc:  # noqa: BLE001  # any failure of Opacus on this network is the answer
        via = f" through its {', '.join(unsupported)} layers ({type(exc).__name__} in Opacus's functorch fallback)" if unsupported else ""
        detail = "" if via else f" ({type(exc).__name__}: {' '.join(str(exc).split())[:80]})"
        return f"Opacus cannot compute per-sample gradients of {name}{via}{detail}; {_KNOWN_FIXES.get(name, 'use another network')}"
    if missing:
        return f"Opacus gives no per-sample gradients for {len(missing)} parameter(s) of {name} (first: {missing[0]}); {_KNOWN_FIXES.get(name, 'use another network')}"
    return None


def probe_patch(network: Mapping[str, Any]) -> tuple[int, ...]:
    """The smallest patch a network takes (two voxels at its coarsest level): what `network_dp_problem` probes with.

    Args:
        network: ``build_network``'s keyword arguments (`pipelines.network_config.network_config_from_spec`).

    Returns:
        One side per spatial axis.
    """
    from pipelines.network_config import patch_divisors, resolve_config

    dims = int(network.get("spatial_dims", 3))
    options = {k: v for k, v in network.items() if k not in ("name", "size", "spatial_dims", "features", "in_channels", "deep_supervision")}
    config = resolve_config(str(network.get("name")), network.get("size"), dims, network.get("features"), **options)
    return tuple(2 * int(d) for d in patch_divisors(str(network.get("name")), config, dims))


def spec_network_dp_problem(network: Mapping[str, Any]) -> str | None:
    """`network_dp_problem` of a spec's network, checked at its ``tiny`` size (the same layer types, built in a second).

    Args:
        network: ``build_network``'s keyword arguments from the spec (`network_config_from_spec`).

    Returns:
        The problem, or None.
    """
    from pipelines.networks import build_network

    kwargs = dict(network)
    if isinstance(kwargs.get("size"), str):  # a named size: its tiny sibling has the same layers
        kwargs = {k: v for k, v in kwargs.items() if k not in ("features", "filters")} | {"size": "tiny"}
    model = build_network(out_channels=2, **kwargs)
    return network_dp_problem(model, str(kwargs.get("name")), int(kwargs.get("in_channels", 1)), int(kwargs.get("spatial_dims", 3)), probe_patch(kwargs))


def volume_list_collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A training batch as lists of volumes and labels: Poisson sampling draws any number of cases, each of its own shape.

    Args:
        batch: the (volume, label) pairs the sampler drew (possibly none).

    Returns:
        (volumes, labels).
    """
    return [item[0] for item in batch], [item[1] for item in batch]


def is_empty_batch(volumes: Any) -> bool:
    """Whether a training batch holds no case (Poisson sampling draws none now and then; Opacus then passes zero-sized tensors).

    Args:
        volumes: the loader's volumes (a list or a tensor).

    Returns:
        True when no volume is in it.
    """
    import torch

    if isinstance(volumes, torch.Tensor):
        return bool(volumes.shape[0] == 0)
    items = list(volumes)
    return not items or any(isinstance(v, torch.Tensor) and v.shape[0] == 0 for v in items)


TRAINING_LOSSES = ("loss_mean", "sup_loss", "condist_loss")  # the plans' training scalars computed on training cases


class WithoutTrainingLoss:
    """Fed-BioMed's history monitor minus its per-batch training ``Loss`` messages (computed on training cases outside the private mechanism).

    Args:
        monitor: Fed-BioMed's history monitor.
    """

    def __init__(self, monitor: Any) -> None:
        self._monitor = monitor

    def add_scalar(self, **kwargs: Any) -> Any:
        """Forward a scalar message unless it is a training message that carries only ``Loss``.

        Args:
            kwargs: the message, as Fed-BioMed's ``HistoryMonitor.add_scalar`` takes it.

        Returns:
            The monitor's answer (None for a message held back).
        """
        metric = kwargs.get("metric") or {}
        if kwargs.get("train") and set(metric) <= {"Loss"}:
            return None
        return self._monitor.add_scalar(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._monitor, name)


def case_noise_multiplier(sigma: float, patches_per_volume: int) -> float:
    """The Gaussian noise multiplier per case: the noise's standard deviation over what one case can move a step's gradient sum.

    Args:
        sigma: Opacus's noise multiplier (per patch, the unit it clips).
        patches_per_volume: patches a step draws from each volume.

    Returns:
        ``sigma / patches_per_volume``.
    """
    return float(sigma) / max(1, int(patches_per_volume))


def epsilon_spent(history: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of a site's steps so far: Opacus's RDP accountant over every (noise multiplier, sample rate, steps).

    Args:
        history: per round of the site, (noise multiplier per case, Poisson sample rate, steps).
        delta: the delta the epsilon is stated at.

    Returns:
        Epsilon (0 without steps; ``inf`` with a zero noise multiplier).
    """
    from opacus.accountants import RDPAccountant  # type: ignore[import-untyped]  # no type information shipped

    steps = [(float(s), float(q), int(n)) for s, q, n in history if int(n) > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return float("inf")
    accountant = RDPAccountant()
    accountant.history = steps
    return float(accountant.get_epsilon(delta=float(delta)))


def site_dp_history(train_rows: Iterable[Mapping[str, Any]]) -> list[tuple[float, float, int]]:
    """A site's DP steps over its rounds, from the training scalars it reported (``dp_noise_multiplier``, ``dp_sample_rate``, ``dp_steps``).

    Args:
        train_rows: the site's training scalars of each round it reported (a round it missed has none).

    Returns:
        (noise multiplier per case, sample rate, steps) per round that reported them.
    """
    out = []
    for train in train_rows:
        if all(k in train for k in ("dp_noise_multiplier", "dp_sample_rate", "dp_steps")):
            out.append((float(train["dp_noise_multiplier"]), float(train["dp_sample_rate"]), int(train["dp_steps"])))
    return out
