"""The segmentation plans' arguments (``plan_args``): keys, defaults, checks.

`parse_plan_args` validates an experiment spec's ``plan_args`` for the segmentation plans
with messages naming the key; the coordinator checks them before sending, the node again on
arrival. Checking needs no network, so this module imports neither torch nor MONAI
(``coordinator validate`` answers in a second); `pipelines.training` re-exports its names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from pipelines.gin_args import parse_gin_args
from pipelines.network_config import network_config_from_spec
from pipelines.site_state import is_plain_name
from preprocessing.schema import LabelSchema


PLAN_ARG_KEYS = (
    "schema", "schema_definition", "network", "roi_size", "patches_per_volume", "spacing", "temperature", "lambda",
    "lr_schedule", "augment", "gin", "predict_classes", "inference", "keep_optimizer_state", "rounds_total", "local_steps", "run_id",
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
    schema: LabelSchema
    network: dict[str, Any]
    roi_size: tuple[int, ...]
    patches_per_volume: int = 2
    spacing: str | tuple[float, ...] | None = "schema"  # "schema", None (native grid) or mm per axis
    temperature: float = 0.5
    lambda_range: tuple[float, float] = (0.01, 1.0)
    lr_schedule: str = "cosine"
    augment: bool = True
    gin: dict[str, Any] | None = None  # GINAugmentation kwargs (pipelines.gin); None: off
    predict_classes: tuple[int, ...] | None = None  # classes inference may output (others fold into background); None: all
    overlap: float = 0.25
    sw_batch_size: int = 2
    keep_optimizer_state: bool = True
    rounds_total: int | None = None  # filled in by the coordinator
    local_steps: int | None = None
    run_id: str | None = None

    @property
    def num_classes(self) -> int:
        return self.schema.num_classes

    @property
    def spatial_dims(self) -> int:
        return int(self.network["spatial_dims"])

    @property
    def inference_roi(self) -> tuple[int, ...]:
        """Sliding-window size over the 3D volume (2D models slide (X, Y, 1) windows)."""
        return self.roi_size if self.spatial_dims == 3 else (*self.roi_size, 1)


def _bad(key: str, problem: str) -> ValueError:
    return ValueError(f"plan_args.{key}: {problem}")


def _number(args, key, lo=None, hi=None, integer=False, default=None):
    value = args.get(key, default)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
        raise _bad(key, f"must be {'an integer' if integer else 'a number'} (got {value!r})")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _bad(key, f"must be in [{lo}, {hi}] (got {value!r})")
    return value


def parse_plan_args(args: Mapping[str, Any], schema: LabelSchema) -> SegmentationSettings:
    """Validate the segmentation plans' arguments against the federation `schema`.

    Args:
        args: the spec's ``plan_args`` (``schema`` already resolved by the coordinator).
        schema: the federation label schema (class names for ``predict_classes``).

    Returns:
        The settings, defaults filled in.

    Raises:
        ValueError: ``"plan_args.<key>: <problem>"`` for the first problem found.
    """
    if not isinstance(args, Mapping):
        raise ValueError("plan_args: must be a mapping")
    if "num_classes" in args:
        raise _bad("num_classes", "comes from the schema")
    unknown = [k for k in args if k not in PLAN_ARG_KEYS]
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), PLAN_ARG_KEYS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (allowed: {', '.join(k for k in PLAN_ARG_KEYS if k != 'schema_definition')})"
        raise _bad(str(unknown[0]), f"unknown key{hint}")
    network = args.get("network") or {}
    if isinstance(network, Mapping):
        network = {"name": "mednext", "size": "tiny", **network}  # the paper's backbone unless named
    dims = network.get("spatial_dims", 3) if isinstance(network, Mapping) else 3
    roi = args.get("roi_size", DEFAULTS["roi_size"])
    if isinstance(roi, int) and not isinstance(roi, bool):
        roi = [roi] * (dims if dims in (2, 3) else 3)
    if not isinstance(roi, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in roi):
        raise _bad("roi_size", f"must be an integer or a list of integers >= 8 (got {roi!r})")
    if dims in (2, 3) and len(roi) != dims:
        raise _bad("roi_size", f"must have {dims} entries for a {dims}D network (got {roi!r})")
    try:
        net = network_config_from_spec(network, roi_size=list(roi))
    except ValueError as exc:
        raise ValueError(f"plan_args.network: {exc}") from None

    spacing = args.get("spacing", DEFAULTS["spacing"])
    if spacing == "native":
        spacing = None
    elif spacing != "schema":
        if not isinstance(spacing, (list, tuple)) or len(spacing) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in spacing
        ):
            raise _bad("spacing", f"must be 'schema', 'native' or three positive numbers in mm (got {spacing!r})")
        spacing = tuple(float(v) for v in spacing)
    lam = args.get("lambda", DEFAULTS["lambda"])
    if not isinstance(lam, (list, tuple)) or len(lam) != 2 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 100 for v in lam
    ):
        raise _bad("lambda", f"must be [start, end], two numbers >= 0 (got {lam!r})")
    schedule = args.get("lr_schedule", DEFAULTS["lr_schedule"])
    if schedule not in ("cosine", "constant"):
        raise _bad("lr_schedule", f"must be 'cosine' or 'constant' (got {schedule!r})")
    augment = args.get("augment", DEFAULTS["augment"])
    if not isinstance(augment, bool):
        raise _bad("augment", f"must be true or false (got {augment!r})")
    gin = parse_gin_args(args.get("gin"), "plan_args.gin")
    predict_classes = args.get("predict_classes")
    if predict_classes is not None:
        names = [c for c in schema.classes if c != "background"]
        if not isinstance(predict_classes, (list, tuple)) or not predict_classes or not all(isinstance(c, str) for c in predict_classes):
            raise _bad("predict_classes", f"must be a non-empty list of class names of schema {schema.name} (got {predict_classes!r})")
        unknown = [c for c in predict_classes if c not in names]
        if unknown:
            raise _bad("predict_classes", f"{', '.join(map(repr, unknown))} not foreground classes of schema {schema.name} ({', '.join(names)})")
        predict_classes = tuple(sorted(schema.classes[c] for c in set(predict_classes)))
    keep_opt = args.get("keep_optimizer_state", DEFAULTS["keep_optimizer_state"])
    if not isinstance(keep_opt, bool):
        raise _bad("keep_optimizer_state", f"must be true or false (got {keep_opt!r})")
    run_id = args.get("run_id")
    if run_id is not None and not is_plain_name(run_id):
        raise _bad("run_id", f"must be a plain name (got {run_id!r})")
    given = args.get("inference") or {}
    if not isinstance(given, Mapping) or set(given) - {"overlap", "sw_batch_size"}:
        raise _bad("inference", f"must be a mapping with overlap and/or sw_batch_size (got {given!r})")
    inference = {**DEFAULTS["inference"], **given}
    try:
        overlap = _number(inference, "overlap", lo=0.0, hi=0.9)
        sw_batch = _number(inference, "sw_batch_size", lo=1, integer=True)
    except ValueError as exc:
        raise ValueError(str(exc).replace("plan_args.", "plan_args.inference.", 1)) from None
    rounds = args.get("rounds_total")
    steps = args.get("local_steps")
    for key, v in (("rounds_total", rounds), ("local_steps", steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _bad(key, f"must be a positive integer (got {v!r})")
    return SegmentationSettings(
        schema=schema,
        network=net,
        roi_size=tuple(roi),
        patches_per_volume=_number(args, "patches_per_volume", lo=1, hi=64, integer=True, default=DEFAULTS["patches_per_volume"]),
        spacing=spacing,
        temperature=float(_number(args, "temperature", lo=1e-3, hi=100.0, default=DEFAULTS["temperature"])),
        lambda_range=(float(lam[0]), float(lam[1])),
        lr_schedule=schedule,
        augment=augment,
        gin=gin,
        predict_classes=predict_classes,
        keep_optimizer_state=keep_opt,
        run_id=run_id,
        overlap=float(overlap),
        sw_batch_size=int(sw_batch),
        rounds_total=rounds,
        local_steps=steps,
    )
