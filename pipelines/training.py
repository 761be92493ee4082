"""Segmentation training on partially labelled sites: the science the FL plans call (no FL imports).

The ConDistFL objective (`PartialLabelObjective`), the frozen teacher, the cosine schedule and whole-volume
evaluation; what each part is: docs/design/segmentation-training.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from pipelines.deep_supervision import deep_supervision_loss
from pipelines.evaluation import dice_per_class, merge_lesions, predict_volume
from pipelines.losses import ConDistDiceLoss, MarginalDiceCELoss
from pipelines.metrics import case_metrics
from pipelines.networks import all_heads, build_network, main_output
from pipelines.plan_args import DEFAULTS, PLAN_ARG_KEYS, SegmentationSettings, parse_plan_args
from pipelines.presence import PresenceWindows, absent_classes, attach_presence_head, has_presence_head, presence_logits
from pipelines.site_state import SiteStateStore, is_plain_name
from preprocessing.schema import LabelSchema

__all__ = [
    "DEFAULTS",  # the plan-argument names are re-exported: plans and tests import them from here
    "PLAN_ARG_KEYS",
    "OptimizerStateStore",
    "PartialLabelObjective",
    "SegmentationSettings",
    "build_model",
    "case_label_maps",
    "class_means",
    "cosine_lr",
    "evaluate_case",
    "evaluate_case_metrics",
    "frozen_teacher",
    "is_plain_name",
    "parameter_checksum",
    "parse_plan_args",
    "predict",
    "predict_with_presence",
    "teacher_logits",
]


class PartialLabelObjective:
    """Loss of one training step for a site labelling ``foreground`` (schema ids).

    ``teacher`` logits present: ``marginal + weight * ConDist`` (ConDistFL); absent:
    ``marginal`` only (FedAvg / FedProx / FedOpt / standalone baselines). Returns the loss
    and its parts as floats for reporting.

    Args:
        schema: the federation label schema.
        foreground: the schema ids the site labels.
        temperature: ConDist's softmax temperature.
        spatial_dims: 2 or 3 (how the network's outputs are read).

    Raises:
        ValueError: the site labels no class.
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

    def __call__(
        self, outputs: torch.Tensor | Sequence[torch.Tensor], label: torch.Tensor, teacher: torch.Tensor | None = None, weight: float = 0.0
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one step.

        Args:
            outputs: what the network returned (one tensor, or its deep-supervision heads).
            label: the patches' labels, (B, 1, *spatial).
            teacher: the frozen global model's main-head logits (None: no distillation).
            weight: ConDist's weight (lambda) this round.

        Returns:
            ``(loss, parts)``: ``parts`` holds ``sup_loss`` and, with a teacher, ``condist_loss``.
        """
        heads = all_heads(outputs, self.spatial_dims)
        sup = deep_supervision_loss(heads, label, self.marginal) if len(heads) > 1 else self.marginal(heads[0], label)
        parts = {"sup_loss": float(sup.detach())}
        if teacher is None:
            return sup, parts
        dist = self.condist(heads[0], teacher, label)
        parts["condist_loss"] = float(dist.detach())
        return sup + weight * dist, parts


def frozen_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """An independent frozen copy of the model as it is now.

    Args:
        model: the received global model.

    Returns:
        A deep copy in eval mode, without gradients (and without MedNeXt's deep-supervision heads).
    """
    teacher = copy.deepcopy(model)
    teacher.eval()
    teacher.requires_grad_(False)
    if getattr(teacher, "do_ds", False):
        setattr(teacher, "do_ds", False)  # MedNeXt's attribute, not Module's: MONAI's MedNeXt computes its deep-supervision heads even in eval mode
    return teacher


def teacher_logits(teacher: torch.nn.Module, images: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Main-head logits of the teacher, computed in inference mode (no autograd graph, no
    version counters: the cheapest forward torch offers; `benchmarks/condistfl_step_cost.py`
    measured it ~6 % of a step cheaper than no_grad on CPU, while bf16 autocast and
    channels-last were slower there). The clone turns the inference tensor into an
    ordinary one the student's loss may use.

    Args:
        teacher: the frozen teacher (`frozen_teacher`).
        images: the step's patches.
        spatial_dims: 2 or 3.

    Returns:
        The main head's logits (B, C, *spatial).
    """
    with torch.inference_mode():
        out = main_output(teacher(images), spatial_dims)
    presence_logits(teacher)  # a teacher with a presence head: its logits are not needed (and not kept)
    return out.clone()


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """Cosine annealing from ``base_lr`` at step 0 to 0 at ``total_steps``.

    Args:
        base_lr: the learning rate at step 0.
        step: the step of the run (clamped to [0, total_steps]).
        total_steps: the run's steps (<= 0: constant ``base_lr``).

    Returns:
        The learning rate of this step.
    """
    if total_steps <= 0:
        return base_lr
    t = min(max(step, 0), total_steps) / total_steps
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))


def parameter_checksum(params: Mapping[str, torch.Tensor] | Sequence[tuple[str, torch.Tensor]]) -> tuple[float, float]:
    """Two numbers that identify a parameter set well enough to check two copies are the same weights.

    Args:
        params: name -> tensor, as a mapping or (name, tensor) pairs.

    Returns:
        ``(sum, sum of squares)`` over every value in float64, in name order.
    """
    items = sorted(params.items() if isinstance(params, Mapping) else params, key=lambda kv: kv[0])
    s = sq = 0.0
    for _, t in items:
        d = t.detach().to(torch.float64)
        s += float(d.sum())
        sq += float((d * d).sum())
    return s, sq


def build_model(settings: SegmentationSettings) -> torch.nn.Module:
    """The network the plan arguments describe: `pipelines.networks.build_network` with the schema's classes, and
    the presence head (`pipelines.presence`) when ``plan_args.presence_head`` asks for one.

    Args:
        settings: the validated plan arguments.

    Returns:
        The network, randomly initialised.
    """
    net = build_network(out_channels=settings.num_classes, **settings.network)
    if settings.presence_classes:
        from pipelines.privacy import probe_patch  # the smallest patch the network takes: a cheap dry forward

        attach_presence_head(net, str(settings.network["name"]), len(settings.presence_classes), settings.spatial_dims, probe_patch(settings.network))
    return net


class _SliceWise(torch.nn.Module):
    """A 2D network applied to (B, C, X, Y, 1) windows, so 3D sliding-window inference
    segments a volume slice by slice."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return main_output(self.net(x[..., 0]), 2).unsqueeze(-1)


def predict(model: torch.nn.Module, image: torch.Tensor, settings: SegmentationSettings) -> torch.Tensor:
    """Argmax label map of a preprocessed volume by sliding-window inference (2D models slice by slice); a model with
    a presence head has its absent classes removed (`predict_with_presence`).

    Args:
        model: the network.
        image: the volume (C, X, Y, Z).
        settings: window, overlap and the classes inference may output.

    Returns:
        The label map (X, Y, Z).
    """
    return predict_with_presence(model, image, settings)[0]


def predict_with_presence(model: torch.nn.Module, image: torch.Tensor, settings: SegmentationSettings) -> tuple[torch.Tensor, dict[int, float]]:
    """The label map of `predict` and, for a model with a presence head, each headed class's image probability.

    The image's probability of a class is the largest of its sliding windows' (a window that shows the class
    is enough); with ``presence_threshold`` set, a class below it is absent: its probability is folded into
    background before the argmax (`pipelines.presence.absent_classes`).

    Args:
        model: the network.
        image: the volume (C, X, Y, Z).
        settings: window, overlap, the classes inference may output, the presence head's classes and threshold.

    Returns:
        ``(label map (X, Y, Z), {headed class id: probability})``; the mapping is empty without a head.
    """
    headed = settings.presence_classes if has_presence_head(model) else ()
    windows = PresenceWindows(model).train(model.training) if headed else None
    net: torch.nn.Module = windows if windows is not None else model

    def probabilities() -> dict[int, float]:
        return windows.probabilities(headed) if windows is not None else {}

    def absent() -> list[int]:  # called once the windows ran
        return absent_classes(probabilities(), settings.presence_threshold)

    if settings.spatial_dims == 2:
        wrapper = _SliceWise(net).train(model.training)  # predict_volume restores the wrapper's mode
        label_map = predict_volume(wrapper, image, settings.inference_roi, settings.sw_batch_size, settings.overlap, allowed=settings.predict_classes,
                                   channels=settings.num_classes, absent=absent)  # fmt: skip
    else:
        label_map = predict_volume(
            net, image, settings.inference_roi, settings.sw_batch_size, settings.overlap, head=lambda o: main_output(o, 3),
            allowed=settings.predict_classes, channels=settings.num_classes, absent=absent,
        )  # fmt: skip
    return label_map, probabilities()


def evaluate_case(
    model: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    settings: SegmentationSettings,
    classes: Sequence[int],
    merge_lesion_classes: bool = False,
) -> dict[int, float]:
    """Dice per class of one whole volume (empty-mask rule of `pipelines.evaluation`).

    Args:
        model: the network.
        image: the preprocessed volume (C, X, Y, Z).
        label: its label map, (1, X, Y, Z) or (X, Y, Z).
        settings: the plan's settings (window, schema).
        classes: the classes to score.
        merge_lesion_classes: score organs with their lesions merged in (out-of-federation
            test sets that do not label lesions).

    Returns:
        Class id -> Dice.
    """
    pred, ref = case_label_maps(model, image, label, settings, merge_lesion_classes)
    return dice_per_class(pred, ref, classes, settings.schema.ignore_label, settings.schema.empty_mask_one)


def case_label_maps(
    model: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    settings: SegmentationSettings,
    merge_lesion_classes: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The predicted and reference label maps of one whole volume, as `evaluate_case` scores them.

    Args:
        model: the network.
        image: the preprocessed volume (C, X, Y, Z).
        label: its label map, (1, X, Y, Z) or (X, Y, Z).
        settings: the plan's settings (window, schema).
        merge_lesion_classes: merge every lesion into its organ in both maps.

    Returns:
        (prediction, reference), both (X, Y, Z).
    """
    pred = predict(model, image, settings).cpu().numpy()
    ref = label.reshape(pred.shape).cpu().numpy() if label.numel() == pred.size else label[0].cpu().numpy()
    if merge_lesion_classes:
        table = settings.schema.lesion_merge_table()
        pred, ref = merge_lesions(pred, table), merge_lesions(ref, table)
    return pred, ref


def evaluate_case_metrics(
    model: torch.nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    settings: SegmentationSettings,
    classes: Sequence[int],
    spacing: Sequence[float],
    merge_lesion_classes: bool = False,
) -> dict[int, dict[str, float]]:
    """Clinical metrics per class of one whole volume (`pipelines.metrics.case_metrics`): Dice
    (the value `evaluate_case` gives), HD95, ASSD, NSD at the schema's tolerance of each class
    (`LabelSchema.surface_tolerance`), relative volume difference and volumes.

    Args:
        model: the network.
        image: the preprocessed volume (C, X, Y, Z).
        label: its label map, (1, X, Y, Z) or (X, Y, Z).
        settings: the plan's settings (window, schema).
        classes: the classes to score.
        spacing: the voxel size in mm of the volume's grid, per axis.
        merge_lesion_classes: score organs with their lesions merged in (the organ's tolerance applies).

    Returns:
        Class id -> {metric: value}.
    """
    pred, ref = case_label_maps(model, image, label, settings, merge_lesion_classes)
    schema = settings.schema
    names = {v: k for k, v in schema.classes.items()}
    tolerances = {c: schema.surface_tolerance(names[c]) for c in classes}
    return case_metrics(pred, ref, classes, spacing, tolerances, schema.ignore_label, schema.empty_mask_one)


def class_means(per_case: Sequence[Mapping[int, float]], classes: Sequence[int]) -> dict[int, float]:
    """NaN-excluded mean Dice per class over cases.

    Args:
        per_case: Dice per class of each case.
        classes: the classes to average.

    Returns:
        Class id -> mean Dice (classes never scored are left out).
    """
    out: dict[int, float] = {}
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
        """Restore the stored state into `optimizer`.

        Args:
            optimizer: the plan's optimizer, freshly built.

        Returns:
            Whether a stored state was loaded (False: none, or it does not fit).
        """
        state = self.read()
        if state is None:
            return False
        try:
            optimizer.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError):
            return False
        return True

    def save(self, optimizer: torch.optim.Optimizer) -> None:
        """Store `optimizer`'s state for this site's next round of the run.

        Args:
            optimizer: the plan's optimizer after the round.
        """
        self.write(optimizer.state_dict())
