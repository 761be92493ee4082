"""The FedSR plan's arguments (``plan_args``): the `FedSRPlanArgs` model and `FedSRSettings`.

Checked by the coordinator before anything is sent and by the node on arrival, with messages
naming the key (`pipelines.plan_args_common`). Imports neither torch nor MONAI, so
`coordinator validate` stays fast.

A spec's ``plan_args`` for ``plan: fedsr``::

    schema: brain-mri                # the federation's label schema (the atlas's classes)
    atlas: {name: brain-atlas, version: v0001, sha256: <64 hex>}   # the registry's atlas
    method: fedsr                    # or fedsr_no_mi, fedsr_no_scie, fedrep, fedavg (baselines)
    network: {size: tiny}            # tiny (CPU), small, paper (128^3)
    volume_size: [32, 32, 32]        # each case and the atlas, padded or cropped (multiples of 8)
    finetune_rounds: 1               # the last N rounds: encoder frozen, decoders fine-tuned
    alpha: 0.5                       # eq. 7's smoothing of the SA representation
    losses: {smoothness: 7.5, similarity: 5, registration_dice: 1, mutual_information: 0.1}
    evaluate_every: 0                # also score the personalised model every N rounds (0: last round only)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from fedimg_core.config import ConfigModel, short
from fedimg_core.config_types import integer, integer_list, number, one_of
from pipelines.plan_args_common import DeviceArgs, InvalidPlanArgs, PlanArgsBase, TransferArgs, validate_plan_args

__all__ = ["FEDSR_ARG_KEYS", "FEDSR_METHOD_NAMES", "FEDSR_SIZES", "FedSRPlanArgs", "FedSRSettings", "parse_fedsr_args"]

FEDSR_METHOD_NAMES = ("fedsr", "fedsr_no_mi", "fedsr_no_scie", "fedrep", "fedavg")  # pipelines.fedsr.training.FEDSR_METHODS
FEDSR_SIZES = {"tiny": 32, "small": 64, "paper": 128}  # network preset -> default volume edge
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_VERSION = re.compile(r"^v\d{4,}$")
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")  # a registry name, never "." or ".."


def _matching(pattern: re.Pattern[str], wanted: str) -> Any:
    def check(value: Any) -> Any:
        if not isinstance(value, str) or not pattern.match(value):
            raise ValueError(f"must be {wanted} (got {short(value)})")
        return value

    return BeforeValidator(check)


class AtlasRef(ConfigModel):
    """``plan_args.atlas``: the registry's atlas every site registers (pulled to each site first)."""

    name: Annotated[str, _matching(_NAME, "the atlas's registry name: letters, digits, '-', '_', '.', not starting with '.'")]
    version: Annotated[str, _matching(_VERSION, "a registry version such as v0001 (a run names the exact one)")]
    sha256: Annotated[str, _matching(_SHA256, "the 64 lowercase hex digits of atlas.safetensors' sha256 (`coordinator atlas list` prints it)")]


class NetworkArgs(ConfigModel):
    """``plan_args.network``: the FedSR network's size."""

    size: Annotated[str, one_of(*FEDSR_SIZES, what="size")] = "tiny"
    integrate_velocity: bool = False


class LossArgs(ConfigModel):
    """``plan_args.losses``: the loss weights (defaults: the paper's l_smo 7.5, l_sim 5, l_ce 1)."""

    smoothness: Annotated[float, number(0.0)] = 7.5
    similarity: Annotated[float, number(0.0)] = 5.0
    registration_dice: Annotated[float, number(0.0)] = 1.0
    mutual_information: Annotated[float, number(0.0)] = 0.1
    lncc_kernel_size: Annotated[int, integer(3, 31)] = 9


class FedSRPlanArgs(PlanArgsBase):
    """A spec's ``plan_args`` for the FedSR plan."""

    atlas: AtlasRef
    method: Annotated[str, one_of(*FEDSR_METHOD_NAMES, what="method")] = "fedsr"
    network: NetworkArgs = Field(default_factory=NetworkArgs)
    volume_size: Annotated[tuple[int, ...] | None, integer_list(3, 8, 512)] = None
    finetune_rounds: Annotated[int, integer(0)] = 0
    alpha: Annotated[float, number(0.0, 1.0)] = 0.5
    losses: LossArgs = Field(default_factory=LossArgs)
    evaluate_every: Annotated[int, integer(0)] = 0
    device: DeviceArgs = Field(default_factory=DeviceArgs)  # filled in from the spec's device section
    transfer: TransferArgs = Field(default_factory=TransferArgs)  # filled in from the spec's transfer section (pipelines.plans.transfer)


FEDSR_ARG_KEYS = (
    "schema", "schema_definition", "atlas", "method", "network", "volume_size", "finetune_rounds", "alpha", "losses",
    "evaluate_every", "spacing", "keep_optimizer_state", "rounds_total", "local_steps", "run_id", "device", "transfer",
)  # fmt: skip


@dataclass(frozen=True)
class FedSRSettings:
    """The FedSR plan's settings, defaults filled in (what `parse_fedsr_args` returns)."""

    atlas: dict[str, str]
    method: str = "fedsr"
    size: str = "tiny"
    integrate_velocity: bool = False
    volume_size: tuple[int, int, int] = (32, 32, 32)
    finetune_rounds: int = 0
    alpha: float = 0.5
    losses: dict[str, float] | None = None
    evaluate_every: int = 0
    spacing: Any = "schema"
    keep_optimizer_state: bool = True
    rounds_total: int | None = None
    local_steps: int | None = None
    run_id: str | None = None
    gpu: str = "optional"
    precision: str = "auto"

    def finetuning(self, round_index: int) -> bool:
        """Whether a round (0-based) is one of the last ``finetune_rounds`` (encoder frozen).

        Args:
            round_index: the round, from 0.

        Returns:
            True in the fine-tuning stage.
        """
        total = self.rounds_total or 1
        return self.finetune_rounds > 0 and round_index >= total - self.finetune_rounds

    def evaluates(self, round_index: int) -> bool:
        """Whether the site scores its personalised model after this round (0-based).

        Args:
            round_index: the round, from 0.

        Returns:
            True after the last round, and every ``evaluate_every`` rounds.
        """
        last = self.rounds_total is not None and round_index == self.rounds_total - 1
        return last or (self.evaluate_every > 0 and (round_index + 1) % self.evaluate_every == 0)


def parse_fedsr_args(args: Mapping[str, Any]) -> FedSRSettings:
    """``plan_args`` of the FedSR plan, validated (messages name the key).

    Args:
        args: the spec's ``plan_args`` plus what the coordinator fills in.

    Returns:
        The settings, defaults filled in.

    Raises:
        InvalidPlanArgs: (a ValueError) ``"plan_args.<key>: <problem>"``, one line per problem.
    """
    m = validate_plan_args(FedSRPlanArgs, args, FEDSR_ARG_KEYS)
    edge = FEDSR_SIZES[m.network.size]
    volume = tuple(m.volume_size) if m.volume_size is not None else (edge, edge, edge)
    if any(v % 8 for v in volume):
        raise InvalidPlanArgs.of("plan_args.volume_size", f"each size must be a multiple of 8 (the encoder halves it three times), got {list(volume)}")
    if m.rounds_total is not None and m.finetune_rounds >= m.rounds_total:
        raise InvalidPlanArgs.of(
            "plan_args.finetune_rounds", f"{m.finetune_rounds} >= rounds ({m.rounds_total}): no round would train the shared encoder; use fewer"
        )
    return FedSRSettings(
        atlas=m.atlas.model_dump(),
        method=m.method,
        size=m.network.size,
        integrate_velocity=m.network.integrate_velocity,
        volume_size=(int(volume[0]), int(volume[1]), int(volume[2])),
        finetune_rounds=m.finetune_rounds,
        alpha=m.alpha,
        losses=m.losses.model_dump(),
        evaluate_every=m.evaluate_every,
        spacing=m.spacing,
        keep_optimizer_state=m.keep_optimizer_state,
        rounds_total=m.rounds_total,
        local_steps=m.local_steps,
        run_id=m.run_id,
        gpu=m.device.gpu,
        precision=m.device.precision,
    )
