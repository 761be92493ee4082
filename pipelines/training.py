"""Segmentation training on partially labelled sites: the science the FL plans call (no FL imports).

The ConDistFL objective (`PartialLabelObjective`), the frozen teacher, the cosine schedule and whole-volume
evaluation; what each part is: docs/design/segmentation-training.md.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping, Sequence

import numpy as np
import torch

from pipelines.evaluation import dice_per_class, merge_lesions, predict_volume
from pipelines.losses import ConDistDiceLoss, MarginalDiceCELoss, deep_supervision_loss
from pipelines.networks import all_heads, main_output
from pipelines.plan_args import DEFAULTS, PLAN_ARG_KEYS, SegmentationSettings, parse_plan_args  # noqa: F401
from pipelines.site_state import SiteStateStore, is_plain_name  # noqa: F401 - is_plain_name: importable here
from preprocessing.schema import LabelSchema


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
        self.condist = ConDistDiceLoss(schema.num_classes, foreground, self.background, temperature, ignore_index=schema.ignore_label)

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
