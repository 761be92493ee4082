"""The segmentation plans' arguments (``plan_args``): the `PlanArgs` model, defaults, `SegmentationSettings`.

`parse_plan_args` validates an experiment spec's ``plan_args`` for the segmentation plans
with messages naming the key (`pipelines.plan_args_common`); the coordinator checks them before sending, the node again on
arrival. Checking needs no network, so this module imports neither torch nor MONAI
(``coordinator validate`` answers in a second); `pipelines.training` re-exports its names. ``split`` (each site's
training / validation / test shares and split seed, `pipelines.splits`) is the spec's top-level ``split``, which the
coordinator copies into the plan arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from fedimg_core.config import ConfigModel, ConfigProblem, short
from fedimg_core.config_types import Flag, integer, number
from pipelines.config_fields import ConfigValueError, choice, is_int, is_number
from pipelines.gin_args import GinArgs
from pipelines.network_config import network_config_from_spec
from pipelines.plan_args_common import DeviceArgs, InvalidPlanArgs, PlanArgsBase, TransferArgs, validate_plan_args
from pipelines.splits import SplitSettings
from preprocessing.schema import LabelSchema

__all__ = ["DEFAULTS", "PLAN_ARG_KEYS", "InvalidPlanArgs", "PlanArgs", "SegmentationSettings", "parse_plan_args"]


PLAN_ARG_KEYS = (
    "schema", "schema_definition", "network", "roi_size", "patches_per_volume", "spacing", "temperature", "lambda",
    "lr_schedule", "augment", "gin", "predict_classes", "inference", "keep_optimizer_state", "split", "rounds_total", "local_steps", "run_id",
    "background_prior", "aggregator", "mirror_axes", "device", "presence_head", "transfer",
)  # fmt: skip
DEFAULTS: dict[str, Any] = {
    "roi_size": 32,
    "patches_per_volume": 2,
    "spacing": "schema",
    "temperature": 0.5,
    "lambda": [0.01, 1.0],
    "lr_schedule": "cosine",
    "augment": True,
    "keep_optimizer_state": True,
    "inference": {"overlap": 0.25, "sw_batch_size": 2},
}


@dataclass(frozen=True)
class SegmentationSettings:
    """The segmentation plans' settings, defaults filled in (what `parse_plan_args` returns)."""

    schema: LabelSchema
    network: dict[str, Any]
    roi_size: tuple[int, ...]
    patches_per_volume: int = 2
    spacing: str | tuple[float, ...] | None = "schema"  # "schema", None (native grid) or mm per axis
    temperature: float = 0.5
    lambda_range: tuple[float, float] = (0.01, 1.0)
    lr_schedule: str = "cosine"
    augment: bool = True
    mirror_axes: tuple[int, ...] | None = None  # axes the augmentation flips (RAS+: 0 left-right); None: every axis
    gin: dict[str, Any] | None = None  # GINAugmentation kwargs (pipelines.gin); None: off
    predict_classes: tuple[int, ...] | None = None  # classes inference may output (others fold into background); None: all
    overlap: float = 0.25
    sw_batch_size: int = 2
    keep_optimizer_state: bool = True
    # the initial model's background probability at every voxel (output bias of class 0); None: MONAI's initialisation
    background_prior: float | None = None
    # the site's training / validation / test shares and split seed; None: the coordinator sent none (one from before
    # the three-way split), and Fed-BioMed's test_ratio is the validation share as it was then (pipelines.plans.split_data)
    split: SplitSettings | None = None
    rounds_total: int | None = None  # filled in by the coordinator
    local_steps: int | None = None
    run_id: str | None = None
    aggregator: str = "fedavg"  # the spec's aggregator, filled in: "scaffold" steps SCAFFOLD's correction at the site
    gpu: str = "optional"  # the spec's device.gpu, filled in: optional | required | forbidden (fedimg_core.devices)
    precision: str = "auto"  # the spec's device.precision, filled in: auto | fp32 | bf16 | fp16
    # the image-level presence head (`pipelines.presence`): its classes (schema ids; () without a head), the weight of
    # its loss, and the probability below which inference removes a class from a label map (None: never)
    presence_classes: tuple[int, ...] = ()
    presence_weight: float = 0.5
    presence_threshold: float | None = 0.5

    @property
    def num_classes(self) -> int:
        """Number of classes of the label schema, background included."""
        return self.schema.num_classes

    @property
    def spatial_dims(self) -> int:
        """2 or 3: the network's spatial dimensions."""
        return int(self.network["spatial_dims"])

    @property
    def inference_roi(self) -> tuple[int, ...]:
        """Sliding-window size over the 3D volume (2D models slide (X, Y, 1) windows)."""
        return self.roi_size if self.spatial_dims == 3 else (*self.roi_size, 1)


def _roi_size(value: Any) -> int | tuple[int, ...]:
    if is_int(value) and value >= 8:
        return int(value)
    if isinstance(value, (list, tuple)) and all(is_int(v) and v >= 8 for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"must be an integer or a list of integers >= 8 (got {short(value)})")


def _lambda(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(is_number(v) and 0 <= v <= 100 for v in value):
        raise ValueError(f"must be [start, end], two numbers >= 0 (got {short(value)})")
    return float(value[0]), float(value[1])


def _gin(value: Any) -> Any:
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping ({', '.join(GinArgs.model_fields)}), true or false (got {short(value)})")
    return value


def _mirror_axes(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(is_int(v) and 0 <= v <= 2 for v in value) or len(set(value)) != len(value):
        raise ValueError(
            f"must be a list of distinct axes 0-2 (RAS+: 0 left-right, 1 posterior-anterior, 2 inferior-superior), [] for none (got {short(value)})"
        )
    return tuple(int(v) for v in value)


def _split(value: Any) -> SplitSettings | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping with validation, test and/or seed (got {short(value)})")
    if not all(isinstance(k, str) for k in value):
        raise ValueError(f"must be a mapping with validation, test and/or seed (got {short(value)})")
    try:
        return SplitSettings.from_mapping(value)
    except ValueError as exc:  # "split.<key>: <problem>" -> that key, under plan_args.split
        key, _, problem = str(exc).partition(": ")
        raise ConfigProblem(key.removeprefix("split").lstrip("."), problem or str(exc)) from None


class Inference(ConfigModel):
    """``plan_args.inference``: the sliding-window settings of evaluation."""

    overlap: Annotated[float, number(0.0, 0.9)] = DEFAULTS["inference"]["overlap"]
    sw_batch_size: Annotated[int, integer(1)] = DEFAULTS["inference"]["sw_batch_size"]


def _inference(value: Any) -> Any:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or set(value) - set(Inference.model_fields):
        raise ValueError(f"must be a mapping with overlap and/or sw_batch_size (got {short(value)})")
    return value


class PresenceHeadArgs(ConfigModel):
    """``plan_args.presence_head``: an image-level head on the encoder that says whether a patch shows each of its classes."""

    classes: list[str]  # class names of the schema
    weight: Annotated[float, number(0.0, 100.0)] = 0.5  # its binary cross-entropy's weight beside the segmentation loss
    gate: Flag = True  # inference removes a class from an image whose largest window probability is below threshold
    threshold: Annotated[float, number(0.0, 1.0)] = 0.5


class PlanArgs(PlanArgsBase):
    """A spec's ``plan_args`` for the segmentation plans (condistfl, marginal).

    Validate with `parse_plan_args` (it passes the label schema ``predict_classes`` is checked against).
    """

    REFUSED: ClassVar[dict[str, str]] = {"num_classes": "comes from the schema"}

    network: Any = None  # checked with roi_size (pipelines.network_config); None: tiny MedNeXt
    roi_size: Annotated[int | tuple[int, ...], BeforeValidator(_roi_size)] = DEFAULTS["roi_size"]
    patches_per_volume: Annotated[int, integer(1, 64)] = DEFAULTS["patches_per_volume"]
    temperature: Annotated[float, number(1e-3, 100.0)] = DEFAULTS["temperature"]
    lambda_: Annotated[tuple[float, float], BeforeValidator(_lambda)] = Field(default=(0.01, 1.0), alias="lambda")
    lr_schedule: Annotated[str, choice(("cosine", "constant"))] = DEFAULTS["lr_schedule"]
    augment: Flag = DEFAULTS["augment"]
    # None: every axis (nnU-Net's mirroring); [] or a subset where the classes are lateral (liver right, spleen left)
    mirror_axes: Annotated[tuple[int, ...] | None, BeforeValidator(_mirror_axes)] = None
    gin: Annotated[GinArgs | None, BeforeValidator(_gin)] = None  # None: GIN off
    predict_classes: tuple[int, ...] | None = None  # class names in a spec, ids once validated
    inference: Annotated[Inference, BeforeValidator(_inference)] = Field(default_factory=Inference)
    split: Annotated[Any, BeforeValidator(_split)] = None  # a SplitSettings once validated; None: none sent
    background_prior: Annotated[float, number(0.01, 0.999)] | None = None  # initial background probability (None: MONAI's init)
    aggregator: Annotated[str, choice(("fedavg", "scaffold"))] = "fedavg"  # filled in from the spec's aggregator
    device: DeviceArgs = Field(default_factory=DeviceArgs)  # filled in from the spec's device section
    transfer: TransferArgs = Field(default_factory=TransferArgs)  # filled in from the spec's transfer section (pipelines.plans.transfer)
    presence_head: PresenceHeadArgs | None = None  # None: no presence head

    @field_validator("presence_head", mode="after")
    @classmethod
    def _presence_classes(cls, value: PresenceHeadArgs | None, info: ValidationInfo) -> PresenceHeadArgs | None:
        schema: LabelSchema | None = (info.context or {}).get("schema")
        if value is None or schema is None:
            return value
        names = [c for c in schema.classes if c != "background"]
        if not value.classes or len(set(value.classes)) != len(value.classes):
            raise ConfigProblem("classes", f"must be a non-empty list of distinct class names of schema {schema.name} ({', '.join(names)})")
        if unknown := [c for c in value.classes if c not in names]:
            raise ConfigProblem("classes", f"{', '.join(map(repr, unknown))} not foreground classes of schema {schema.name} ({', '.join(names)})")
        if value.gate and value.weight == 0:
            raise ConfigProblem("weight", "0 leaves the head untrained, and its gate would remove classes at random: give a weight > 0 or gate: false")
        return value

    @field_validator("predict_classes", mode="before")
    @classmethod
    def _class_ids(cls, value: Any, info: ValidationInfo) -> tuple[int, ...] | None:
        if value is None:
            return None
        context = info.context or {}
        if "schema" not in context:
            raise ValueError("needs the federation label schema to check class names (validate with parse_plan_args)")
        schema: LabelSchema | None = context["schema"]
        if schema is None:  # the schema itself has a problem, reported by the caller
            return ()
        names = [c for c in schema.classes if c != "background"]
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) for c in value):
            raise ValueError(f"must be a non-empty list of class names of schema {schema.name} (got {short(value)})")
        unknown = [c for c in value if c not in names]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} not foreground classes of schema {schema.name} ({', '.join(names)})")
        return tuple(sorted(schema.classes[c] for c in set(value)))

    @model_validator(mode="after")
    def _network_fits(self) -> PlanArgs:
        network = self.network or {}
        if isinstance(network, Mapping):
            network = {"name": "mednext", "size": "tiny", **network}  # the paper's backbone unless named
        dims = network.get("spatial_dims", 3) if isinstance(network, Mapping) else 3
        roi = self.roi_size
        if isinstance(roi, int):
            roi = (roi,) * (dims if dims in (2, 3) else 3)
        if dims in (2, 3) and len(roi) != dims:
            raise ConfigProblem("roi_size", f"must have {dims} entries for a {dims}D network (got {list(roi)!r})")
        try:
            self.network = network_config_from_spec(network, roi_size=list(roi))
        except ConfigValueError as exc:  # its key path, under plan_args
            key, problem = exc.problems[0]
            raise ConfigProblem(key, problem) from None
        self.roi_size = tuple(roi)
        if self.mirror_axes is not None and dims in (2, 3) and any(a >= dims for a in self.mirror_axes):
            raise ConfigProblem("mirror_axes", f"a {dims}D network's patches have axes 0-{dims - 1} (got {list(self.mirror_axes)!r})")
        return self


def parse_plan_args(args: Mapping[str, Any], schema: LabelSchema) -> SegmentationSettings:
    """Validate the segmentation plans' arguments against the federation `schema`.

    Args:
        args: the spec's ``plan_args`` (``schema`` already resolved by the coordinator).
        schema: the federation label schema (class names for ``predict_classes``).

    Returns:
        The settings, defaults filled in.

    Raises:
        InvalidPlanArgs: (a ValueError) ``"plan_args.<key>: <problem>"``, one line per problem.
    """
    m = validate_plan_args(PlanArgs, args, PLAN_ARG_KEYS, context={"schema": schema})
    return SegmentationSettings(
        schema=schema,
        network=m.network,
        roi_size=tuple(m.roi_size) if isinstance(m.roi_size, tuple) else (m.roi_size,),
        patches_per_volume=m.patches_per_volume,
        spacing=m.spacing,
        temperature=m.temperature,
        lambda_range=m.lambda_,
        lr_schedule=m.lr_schedule,
        augment=m.augment,
        mirror_axes=m.mirror_axes,
        gin=m.gin.model_dump() if m.gin is not None else None,
        predict_classes=m.predict_classes,
        keep_optimizer_state=m.keep_optimizer_state,
        background_prior=m.background_prior,
        split=m.split,
        run_id=m.run_id,
        overlap=m.inference.overlap,
        sw_batch_size=m.inference.sw_batch_size,
        rounds_total=m.rounds_total,
        local_steps=m.local_steps,
        aggregator=m.aggregator,
        gpu=m.device.gpu,
        precision=m.device.precision,
        **_presence_settings(m.presence_head, schema),
    )


def _presence_settings(head: PresenceHeadArgs | None, schema: LabelSchema) -> dict[str, Any]:
    """`SegmentationSettings`' presence fields of a validated ``presence_head`` (none: no head)."""
    if head is None:
        return {}
    return {
        "presence_classes": tuple(schema.classes[c] for c in head.classes),
        "presence_weight": head.weight,
        "presence_threshold": head.threshold if head.gate else None,
    }
