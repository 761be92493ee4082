"""Segmentation training on partially labelled sites: the science the FL plans call (no FL imports).

* `parse_plan_args`: the experiment spec's ``plan_args`` for the segmentation plans,
  validated with messages naming the key (the coordinator checks them before sending; the
  node checks them again on arrival).
* `PartialLabelObjective`: the ConDistFL loss, ``L = L_marginal + lambda * L_ConDist``;
  marginal Dice+CE on every deep-supervision head (weights halving per level), ConDist on
  the main head only, exactly as ../shared/notes/condistfl-method.md specifies. Without a
  teacher it is the marginal loss the FedAvg/FedProx/FedOpt baselines use.
* `frozen_teacher` / `teacher_logits`: the global model as received, frozen, evaluated
  without an autograd graph on the student's augmented batch.
* `cosine_lr`: the paper's cosine schedule over all steps of all rounds.
* `evaluate_case`: sliding-window prediction of one whole volume and per-class Dice.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pipelines.evaluation import dice_per_class, merge_lesions, predict_volume
from pipelines.losses import ConDistDiceLoss, MarginalDiceCELoss, deep_supervision_loss
from pipelines.gin import parse_gin_args
from pipelines.networks import all_heads, main_output, network_config_from_spec
from pipelines.site_state import SiteStateStore
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
    """Validate the segmentation plans' arguments against the federation `schema`."""
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
    if run_id is not None and (not isinstance(run_id, str) or not run_id or not all(c.isalnum() or c in "-_." for c in run_id)):
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


class PartialLabelObjective:
    """Loss of one training step for a site labelling ``foreground`` (schema ids).

    ``teacher`` logits present: ``marginal + weight * ConDist`` (ConDistFL); absent:
    ``marginal`` only (FedAvg / FedProx / FedOpt / standalone baselines). Returns the loss
    and its parts as floats for reporting.
    """

    def __init__(self, schema: LabelSchema, foreground: Sequence[int], temperature: float = 0.5, spatial_dims: int = 3):
        foreground = sorted(int(c) for c in foreground)
        if not foreground:
            raise ValueError("the site labels no class: nothing to train on")
        self.spatial_dims = spatial_dims
        self.foreground = foreground
        self.background = schema.background_groups(set(foreground))
        self.marginal = MarginalDiceCELoss(foreground, schema.num_classes, ignore_index=schema.ignore_label)
        self.condist = ConDistDiceLoss(
            schema.num_classes, foreground, self.background, temperature, ignore_index=schema.ignore_label
        )

    def __call__(self, outputs, label: torch.Tensor, teacher: torch.Tensor | None = None, weight: float = 0.0):
        heads = all_heads(outputs, self.spatial_dims)
        sup = deep_supervision_loss(heads, label, self.marginal) if len(heads) > 1 else self.marginal(heads[0], label)
        parts = {"sup_loss": float(sup.detach())}
        if teacher is None:
            return sup, parts
        dist = self.condist(heads[0], teacher, label)
        parts["condist_loss"] = float(dist.detach())
        return sup + weight * dist, parts


def frozen_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """An independent frozen copy (eval mode, no gradients) of the model as it is now."""
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    if getattr(teacher, "do_ds", False):
        teacher.do_ds = False  # MONAI's MedNeXt computes its deep-supervision heads even in eval mode
    return teacher


def teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Main-head logits of the teacher, computed in inference mode (no autograd graph, no
    version counters: the cheapest forward torch offers; `benchmarks/condistfl_step_cost.py`
    measured it ~6 % of a step cheaper than no_grad on CPU, while bf16 autocast and
    channels-last were slower there). The clone turns the inference tensor into an
    ordinary one the student's loss may use."""
    with torch.inference_mode():
        out = main_output(teacher(images), spatial_dims)
    return out.clone()


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine annealing from ``base_lr`` at step 0 to 0 at ``total_steps``."""
    if total_steps <= 0:
        return base_lr
    t = min(max(step, 0), total_steps) / total_steps
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def parameter_checksum(params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]) -> tuple[float, float]:
    """(sum, sum of squares) over parameters in float64, in name order: two numbers that
    identify a parameter set well enough to check two copies are the same weights."""
    items = sorted(params.items() if isinstance(params, Mapping) else params, key=lambda kv: kv[0])
    s = sq = 0.0
    for _, t in items:
        d = t.detach().to(torch.float64)
        s += float(d.sum())
        sq += float((d * d).sum())
    return s, sq


class _SliceWise(torch.nn.Module):
    """A 2D network applied to (B, C, X, Y, 1) windows, so 3D sliding-window inference
    segments a volume slice by slice."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return main_output(self.net(x[..., 0]), 2).unsqueeze(-1)


def predict(model: torch.nn.Module, image: torch.Tensor, settings: SegmentationSettings) -> torch.Tensor:
    """Argmax label map (X, Y, Z) of a preprocessed volume (C, X, Y, Z)."""
    if settings.spatial_dims == 2:
        wrapper = _SliceWise(model).train(model.training)  # predict_volume restores the wrapper's mode
        return predict_volume(wrapper, image, settings.inference_roi, settings.sw_batch_size, settings.overlap, allowed=settings.predict_classes)
    return predict_volume(
        model, image, settings.inference_roi, settings.sw_batch_size, settings.overlap, head=lambda o: main_output(o, 3),
        allowed=settings.predict_classes,
    )  # fmt: skip


def evaluate_case(
    model: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    settings: SegmentationSettings,
    classes: Sequence[int],
    merge_lesion_classes: bool = False,
) -> dict[int, float]:
    """Dice per class of one whole volume (empty-mask rule of `pipelines.evaluation`).

    ``merge_lesion_classes``: score organs with their lesions merged in (out-of-federation
    test sets that do not label lesions)."""
    pred = predict(model, image, settings).cpu().numpy()
    ref = label.reshape(pred.shape).cpu().numpy() if label.numel() == pred.size else label[0].cpu().numpy()
    if merge_lesion_classes:
        table = settings.schema.lesion_merge_table()
        pred, ref = merge_lesions(pred, table), merge_lesions(ref, table)
    return dice_per_class(pred, ref, classes, settings.schema.ignore_label)


def class_means(per_case: Sequence[Mapping[int, float]], classes: Sequence[int]) -> dict[int, float]:
    """NaN-excluded mean Dice per class over cases (classes never scored are left out)."""
    out = {}
    for c in classes:
        vals = [case[c] for case in per_case if c in case and not np.isnan(case[c])]
        if vals:
            out[c] = float(np.mean(vals))
    return out


class OptimizerStateStore(SiteStateStore):
    """A site's optimizer state kept between rounds of one run (`pipelines.site_state`): the
    ConDistFL reference implementation keeps its AdamW moments for the whole training, as
    a client process that lives across rounds does. A state that does not fit the
    optimizer (another network) is ignored and training starts with fresh moments."""

    def load_into(self, optimizer: torch.optim.Optimizer) -> bool:
        state = self.read()
        if state is None:
            return False
        try:
            optimizer.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError):
            return False
        return True

    def save(self, optimizer: torch.optim.Optimizer) -> None:
        self.write(optimizer.state_dict())
