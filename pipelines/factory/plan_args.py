"""The data-factory plan's arguments (``plan_args``): the `FactoryPlanArgs` model, `FactorySettings`.

`parse_factory_args` validates an experiment spec's ``plan_args`` for the data-factory plan
with messages naming the key (`pipelines.plan_args_common`, shared with the segmentation plans); the coordinator checks them before sending, the node again on
arrival. Checking needs no network, so this module imports neither torch nor MONAI;
`pipelines.factory.training` re-exports its names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from fedimg_core.config import ConfigModel, ConfigProblem, short
from fedimg_core.config_types import integer, number
from pipelines.config_fields import ConfigValueError, is_int, worded_number
from pipelines.factory.config import FactoryConfig
from pipelines.factory.key_config import validate_key_config
from pipelines.plan_args_common import DeviceArgs, InvalidPlanArgs, PlanArgsBase, TransferArgs, validate_plan_args

__all__ = ["FACTORY_ARG_KEYS", "DiffAugment", "FactoryPlanArgs", "FactorySettings", "InvalidPlanArgs", "key_dim_of", "parse_factory_args"]


@dataclass(frozen=True)
class FactorySettings:
    """The data-factory plan's settings, defaults filled in (what `parse_factory_args` returns)."""

    config: FactoryConfig
    key: dict[str, Any] | None = field(default_factory=dict)  # key-function config; None: no key (ablation)
    r1_gamma: float = 10.0
    r1_interval: int = 16
    pl_weight: float = 2.0
    pl_interval: int = 4
    pl_decay: float = 0.01
    pl_batch_shrink: int = 2
    ema_decay: float = 0.9978
    key_drop: float = 0.5
    mismatch_weight: float = 0.0  # D also scores real slices under another client id as fake
    diff_augment: dict[str, float] | None = None  # {translation, cutout}: DiffAugment for D's inputs
    key_align_weight: float = 50.0
    refine_rounds: int = 0  # the last N rounds of the run add the key-alignment loss
    prox_mu: float = 0.0  # FedProx-style term on G's and D's shared weights, none on the client-id embeddings (0: off)
    local_discriminator: Literal["none", "projection", "all"] = "none"  # none | projection | all: the D parts that stay at the site (only the rest is averaged)
    spacing: Any = "schema"
    min_foreground: float = 0.05
    sample_every: int = 5  # sample grids and kept checkpoints every N rounds (coordinator side)
    keep_optimizer_state: bool = True
    rounds_total: int | None = None  # filled in by the coordinator
    local_steps: int | None = None
    run_id: str | None = None
    client_ids: dict[str, int] = field(default_factory=dict)  # node id -> client id (coordinator)
    gpu: str = "optional"  # the spec's device.gpu, filled in (the factory trains in fp32: StyleGAN2's regularisers are not autocast-safe)

    def refining(self, round_index: int) -> bool:
        """Whether a round is one of the last ``refine_rounds``, which add the key-alignment loss.

        Args:
            round_index: the round (0-based).

        Returns:
            True in the refinement stage.
        """
        total = self.rounds_total or 1
        return self.refine_rounds > 0 and round_index >= total - self.refine_rounds


FACTORY_ARG_KEYS = (
    "schema", "schema_definition", "factory", "key", "r1_gamma", "r1_interval", "pl_weight", "pl_interval",
    "pl_decay", "pl_batch_shrink", "ema_decay", "key_drop", "mismatch_weight", "diff_augment", "key_align_weight", "refine_rounds", "prox_mu", "local_discriminator", "spacing",
    "min_foreground", "sample_every", "keep_optimizer_state", "rounds_total", "local_steps", "run_id", "client_ids", "device", "transfer",
)  # fmt: skip


def key_dim_of(key: dict[str, Any] | None, where: str = "plan_args.key") -> int:
    """Width of the key a key-function config produces (known without building it).

    Args:
        key: the key config (None: no key).
        where: key path of ``key``, starting messages.

    Returns:
        The key width (0 for no key).

    Raises:
        KeyConfigError: the config is invalid, or an encoder key has no ``dim``.
    """
    if key is None:
        return 0
    cfg = validate_key_config(key, where=where)
    kind = cfg["kind"]
    if kind == "encoder":
        if cfg.get("dim") is None:
            raise ConfigValueError.of(f"{where}.dim", "required for an encoder key: the width of the encoder's output")
        return int(cfg["dim"])
    return (int(cfg["proj_dim"]) if "random_cnn" in kind else 0) + (int(cfg["bins"]) if "histogram" in kind else 0)


_FRACTION = "must be a fraction of the image size in [0, 1] (got {got})"


class DiffAugment(ConfigModel):
    """``plan_args.diff_augment``: DiffAugment of the discriminator's inputs."""

    translation: Annotated[float, worded_number(0.0, 1.0, message=_FRACTION)] = 0.125
    cutout: Annotated[float, worded_number(0.0, 1.0, message=_FRACTION)] = 0.5


def _diff_augment(value: Any) -> Any:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping {{translation, cutout}}, true or null (got {short(value)})")
    return value


def _client_ids(value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(is_int(v) and v >= 0 for v in value.values()):
        raise ValueError("must map node ids to client ids >= 0 (filled in by the coordinator)")
    return {str(k): int(v) for k, v in value.items()}


def _key(value: Any) -> Any:
    if value is not None and not isinstance(value, Mapping):
        raise ValueError("must be a mapping (e.g. {kind: random_cnn+histogram}) or null for no key")
    return value


def _factory(value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise ValueError("must be a mapping (e.g. {preset: tiny})")
    for filled in ("n_clients", "key_dim"):
        if filled in value:
            raise ConfigProblem(filled, "is filled in from the federation (sites) and the key function")
    return value


class FactoryPlanArgs(PlanArgsBase):
    """A spec's ``plan_args`` for the data-factory plan (plus ``client_ids``, filled in by the coordinator)."""

    factory: Annotated[dict[str, Any], BeforeValidator(_factory)] = Field(default_factory=lambda: {"preset": "tiny"})
    key: Annotated[dict[str, Any] | None, BeforeValidator(_key)] = Field(default_factory=dict)  # None: no key (ablation)
    r1_gamma: Annotated[float, number(0.0)] = 10.0
    r1_interval: Annotated[int, integer(1)] = 16
    pl_weight: Annotated[float, number(0.0)] = 2.0
    pl_interval: Annotated[int, integer(1)] = 4
    pl_decay: Annotated[float, number(0.0, 1.0)] = 0.01
    pl_batch_shrink: Annotated[int, integer(1)] = 2
    ema_decay: Annotated[float, number(0.0, 1.0)] = 0.9978
    key_drop: Annotated[float, number(0.0, 1.0)] = 0.5
    mismatch_weight: Annotated[float, number(0.0)] = 0.0
    diff_augment: Annotated[DiffAugment | None, BeforeValidator(_diff_augment)] = None
    key_align_weight: Annotated[float, number(0.0)] = 50.0
    refine_rounds: Annotated[int, integer(0)] = 0
    prox_mu: Annotated[float, number(0.0)] = Field(
        default=0.0,
        description="FedProx-style proximal weight on the shared weights of G and D (not the client-id embeddings); 0: off",
    )
    local_discriminator: Literal["none", "projection", "all"] = Field(
        default="none",
        description="the discriminator parts that stay at each site, never sent or averaged: none, projection (its client-id embedding) or all",
    )
    min_foreground: Annotated[float, number(0.0, 1.0)] = 0.05
    sample_every: Annotated[int, integer(1)] = 5
    client_ids: Annotated[dict[str, int], BeforeValidator(_client_ids)] = Field(default_factory=dict)
    device: DeviceArgs = Field(default_factory=DeviceArgs)  # filled in from the spec's device section
    transfer: TransferArgs = Field(default_factory=TransferArgs)  # filled in from the spec's transfer section (pipelines.plans.transfer)

    def factory_config(self) -> FactoryConfig:
        """The factory's sizes: ``factory`` plus the number of clients and the key width.

        Raises:
            ConfigValueError: naming ``plan_args.key...`` or ``plan_args.factory.<key>``.
        """
        key_dim = key_dim_of(self.key)
        n_clients = max(self.client_ids.values()) + 1 if self.client_ids else 1
        return FactoryConfig.from_dict({"preset": "tiny", **self.factory, "n_clients": n_clients, "key_dim": key_dim}, where="plan_args.factory")


def parse_factory_args(args: Mapping[str, Any]) -> FactorySettings:
    """``plan_args`` of the data-factory plan, validated (messages name the key).

    Args:
        args: the spec's ``plan_args`` plus what the coordinator fills in (``client_ids``, ...).

    Returns:
        The settings, defaults filled in.

    Raises:
        InvalidPlanArgs: (a ValueError) ``"plan_args.<key>: <problem>"``, one line per problem.
    """
    m = validate_plan_args(FactoryPlanArgs, args, FACTORY_ARG_KEYS)
    try:
        config = m.factory_config()
    except ConfigValueError as exc:
        raise InvalidPlanArgs(str(exc), key=exc.key).with_problems(exc.problems) from None
    return FactorySettings(
        config=config,
        key=m.key,
        r1_gamma=m.r1_gamma,
        r1_interval=m.r1_interval,
        pl_weight=m.pl_weight,
        pl_interval=m.pl_interval,
        pl_decay=m.pl_decay,
        pl_batch_shrink=m.pl_batch_shrink,
        ema_decay=m.ema_decay,
        key_drop=m.key_drop,
        mismatch_weight=m.mismatch_weight,
        diff_augment=m.diff_augment.model_dump() if m.diff_augment is not None else None,
        key_align_weight=m.key_align_weight,
        refine_rounds=m.refine_rounds,
        prox_mu=m.prox_mu,
        local_discriminator=m.local_discriminator,
        spacing=m.spacing,
        min_foreground=m.min_foreground,
        sample_every=m.sample_every,
        keep_optimizer_state=m.keep_optimizer_state,
        rounds_total=m.rounds_total,
        local_steps=m.local_steps,
        run_id=m.run_id,
        client_ids=m.client_ids,
        gpu=m.device.gpu,
    )
