"""The segmentation plans' site optimizer under SCAFFOLD: declearn's client module before Adam.

With ``aggregator: scaffold`` the coordinator pairs declearn's `ScaffoldServerModule` with plain
averaging, and each site steps a Fed-BioMed (declearn) optimizer whose modules are: SCAFFOLD's
client correction (each raw gradient minus ``c_i - c``, where ``c_i`` is this site's mean raw
gradient of its previous round and ``c`` the sites' mean; Karimireddy et al. 2020, option II as
declearn computes it), then Adam with torch's AdamW constants, then the run's cosine schedule.
The correction acts on gradients, before Adam, so it has the scale of a gradient whatever the
local optimizer: Fed-BioMed's own `Scaffold` aggregator estimates it from the weight change
divided by the learning rate, which under Adam is a normalised step and not a gradient.

Fed-BioMed keeps this optimizer's state (Adam's moments, ``c_i`` and ``c``, the schedule's step)
between a site's rounds, and exchanges the SCAFFOLD states as the optimizer's auxiliary variables
next to the model weights: each round a site also sends the change of ``c_i``, a mean gradient
with one value per model parameter (an aggregate over the round's steps, like the model update),
in the run's transfer precision and checked like the model (`WireScaffoldClientModule`).
"""

from __future__ import annotations

from typing import Any

from declearn.model.api import Vector
from declearn.optimizer.modules import AdamModule, OptiModule, ScaffoldAuxVar, ScaffoldClientModule
from fedbiomed.common.optimizers import Optimizer

from pipelines.site_errors import site_logger
from pipelines.training import cosine_lr
from pipelines.wire_aux import decode_aux_var, encode_aux_var

__all__ = ["ADAM_BETAS", "ADAM_EPS", "CosineScheduleModule", "WireScaffoldClientModule", "scaffold_adam", "scaffold_state", "scaffold_state_kept"]

# torch.optim.AdamW's constants, so that a run with and without SCAFFOLD differ by the correction (and by the
# weight decay, constant at lr * weight_decay here, scheduled with the rate in AdamW: negligible at 1e-5)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class CosineScheduleModule(OptiModule[Any]):
    """Scales the updates by the run's cosine schedule (``pipelines.training.cosine_lr``, relative to 1).

    Fed-BioMed steps a declearn optimizer at its constant base rate, so the schedule is a last
    module counting the run's steps in its state, which Fed-BioMed keeps between rounds.

    Args:
        total_steps: the run's local steps at a site (rounds x local steps; <= 0: constant).
    """

    name = "fedimg-cosine"

    def __init__(self, total_steps: int = 0) -> None:
        self.total_steps = int(total_steps)
        self.step = 0

    def run(self, gradients: Vector[Any]) -> Vector[Any]:
        """Scale this step's update and count the step.

        Args:
            gradients: the update the previous modules computed.

        Returns:
            The update times the schedule's factor at this step.
        """
        factor = cosine_lr(1.0, self.step, self.total_steps)
        self.step += 1
        return gradients * factor

    def get_config(self) -> dict[str, Any]:
        """The module's arguments (declearn rebuilds the module from them)."""
        return {"total_steps": self.total_steps}

    def get_state(self) -> dict[str, Any]:
        """The steps taken so far in the run."""
        return {"step": self.step}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the steps taken so far (a missing count restarts the schedule).

        Args:
            state: what `get_state` returned.
        """
        self.step = int(state.get("step", 0))


class WireScaffoldClientModule(ScaffoldClientModule):
    """declearn's SCAFFOLD client whose states travel in the experiment's wire form (`pipelines.wire_aux`).

    The change of ``c_i`` it sends is encoded in the run's transfer precision; the ``c`` it
    receives is checked against its digest and widened to float32 before use (a mismatch fails
    the round at this site). The computation is declearn's, unchanged. It sends every
    parameter's state: the segmentation plans keep no parameter local.

    Args:
        precision: ``fp32``, ``bf16`` or ``fp16`` (the spec's ``transfer.precision``).
    """

    name = "fedimg-scaffold-client"  # declearn rebuilds the module by this name from the state Fed-BioMed keeps

    def __init__(self, precision: str = "fp32") -> None:
        super().__init__()
        self.precision = precision

    def get_config(self) -> dict[str, Any]:
        """The module's arguments (declearn rebuilds the module from them between rounds)."""
        return {"precision": self.precision}

    def collect_aux_var(self) -> ScaffoldAuxVar | None:
        """declearn's change of ``c_i``, in the wire form.

        Returns:
            The auxiliary variable to send, or None when no step ran.
        """
        before = self.state
        aux_var = super().collect_aux_var()  # moves this site's c_i on by the update it returns
        if aux_var is None:
            return None
        sent = encode_aux_var(aux_var, self.precision, site_logger().warning, "SCAFFOLD state update")
        # The coordinator adds up the rounded updates: keep c_i the sum of what was sent, so that the site's and the
        # coordinator's view of it do not drift apart over the rounds (fp32: the same values).
        self.state = before + decode_aux_var(sent).delta
        return sent  # type: ignore[no-any-return]

    def process_aux_var(self, aux_var: ScaffoldAuxVar) -> None:
        """Check and decode the received ``c``, then let declearn take it.

        Args:
            aux_var: the coordinator's SCAFFOLD state, in the wire form or plain.

        Raises:
            WireChecksumError: it changed on its way (the round fails at this site).
        """
        super().process_aux_var(decode_aux_var(aux_var))


def scaffold_adam(lr: float, weight_decay: float, total_steps: int, transfer: str | None = None) -> Optimizer:
    """The site optimizer of a SCAFFOLD run: correction, Adam, cosine schedule.

    Args:
        lr: the base learning rate.
        weight_decay: AdamW's decoupled weight decay (applied as ``lr * weight_decay`` per step at
            the base rate, as torch's AdamW does; the schedule does not scale it).
        total_steps: the run's local steps at the site (the schedule's length; <= 0: constant rate).
        transfer: the run's transfer precision; with one, the SCAFFOLD states travel in the wire
            form (`WireScaffoldClientModule`); None (a coordinator without wire forms): plain.

    Returns:
        A Fed-BioMed optimizer (declearn), which Fed-BioMed steps and keeps between rounds.
    """
    return Optimizer(
        lr=lr,
        decay=lr * weight_decay,
        modules=[
            WireScaffoldClientModule(transfer) if transfer else ScaffoldClientModule(),
            AdamModule(beta_1=ADAM_BETAS[0], beta_2=ADAM_BETAS[1], eps=ADAM_EPS),
            CosineScheduleModule(total_steps),
        ],
    )


def scaffold_state(optimizer: Any) -> dict[str, float]:
    """How far the SCAFFOLD correction moves this round's gradients (for the round's report).

    Args:
        optimizer: the plan's Fed-BioMed optimizer wrapper (``TrainingPlan.optimizer()``).

    Returns:
        ``scaffold_correction_norm`` (L2 norm of ``c_i - c`` over all parameters; 0 in a site's
        first round), ``adam_steps`` and ``schedule_steps`` (the run's steps so far, as Adam and
        the schedule count them), each where the optimizer has that module.
    """
    fbm_optimizer = getattr(optimizer, "optimizer", None)
    if not isinstance(fbm_optimizer, Optimizer):
        return {}
    out: dict[str, float] = {}
    for name, state in fbm_optimizer.get_state()["states"]["modules"]:
        if name in (ScaffoldClientModule.name, WireScaffoldClientModule.name):
            delta = state["state"] - state["sglob"]
            coefs = delta.coefs.values() if isinstance(delta, Vector) else [delta]
            out["scaffold_correction_norm"] = float(sum(float(_squares(v)) for v in coefs)) ** 0.5
        elif name == AdamModule.name:
            out["adam_steps"] = float(state.get("steps", 0))
        elif name == CosineScheduleModule.name:
            out["schedule_steps"] = float(state.get("step", 0))
    return out


def scaffold_state_kept(optimizer: Any) -> bool:
    """Whether the optimizer's SCAFFOLD module holds a state from an earlier round (its ``c_i`` is a vector).

    Fed-BioMed keeps a module's saved state only when the module rebuilt from the plan has the same
    name at the same place; otherwise the module starts afresh while Adam's moments are kept.

    Args:
        optimizer: the plan's Fed-BioMed optimizer wrapper (``TrainingPlan.optimizer()``).

    Returns:
        True when a SCAFFOLD module holds a vector state, or the optimizer has no SCAFFOLD module.
    """
    fbm_optimizer = getattr(optimizer, "optimizer", None)
    if not isinstance(fbm_optimizer, Optimizer):
        return True
    for name, state in fbm_optimizer.get_state()["states"]["modules"]:
        if name in (ScaffoldClientModule.name, WireScaffoldClientModule.name):
            return isinstance(state.get("state"), Vector)
    return True


def _squares(value: Any) -> float:
    if hasattr(value, "detach"):  # a torch tensor
        return float(value.detach().double().pow(2).sum())
    return float(value) ** 2
