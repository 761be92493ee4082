"""Scoring segmentation models on a labelled prepared dataset: the one procedure behind
`coordinator evaluate` (a run's checkpoints, out of federation) and `site-agent evaluate`
(a published model package, on a site's own cases).

`scoring_plan` decides what is scored (the dataset's labelled classes; lesions merged into
their organ when it labels an organ but none of its lesions, ``merge_lesions="auto"``),
`preprocess_cases` puts every labelled case on the model's grid once (the training chain
with its label), and `score_model` scores one network on them: per case and class the
metrics of `pipelines.metrics` (Dice with the empty-mask rule of `pipelines.evaluation`,
HD95, ASSD, NSD at the schema's tolerance, RVD, volumes), and per class their NaN-excluded
mean, median and n. No FL imports.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.data.meta_tensor import MetaTensor
from monai.data.utils import affine_to_spacing

from pipelines import training  # module attribute calls: tests swap `training.case_label_maps`
from pipelines.metrics import nan_to_none, summarise_metrics
from pipelines.plan_args import SegmentationSettings
from pipelines.transforms import deterministic_transforms
from preprocessing.dataset import PreparedDataset
from preprocessing.schema import LabelSchema

log = logging.getLogger(__name__)

__all__ = ["PreparedCases", "ScoringPlan", "grid_spacing", "preprocess_cases", "score_model", "scoring_plan"]

Progress = Callable[[int, int], None]


@dataclass
class ScoringPlan:
    """What a dataset is scored on.

    Args:
        classes: the schema ids scored (labelled by the dataset; lesions left out when merged).
        merge: lesions are merged into their organ in prediction and reference.
        names: schema id -> class name.
    """

    classes: list[int]
    merge: bool
    names: dict[int, str]


@dataclass
class PreparedCases:
    """The labelled cases of a dataset on the model's grid.

    Args:
        case_ids: the cases' ids, in order.
        volumes: (image (C, X, Y, Z), label) per case.
        spacings: each volume's voxel size in mm per axis.
        failed: ``{"case", "error"}`` of each labelled case that could not be read (left out of the scores).
    """

    case_ids: list[str]
    volumes: list[tuple[torch.Tensor, torch.Tensor]]
    spacings: list[list[float]]
    failed: list[dict[str, str]] = field(default_factory=list)


def scoring_plan(prepared: PreparedDataset, schema: LabelSchema, merge_lesions: str = "auto", where: str = "dataset") -> ScoringPlan:
    """The classes a dataset is scored on, and whether lesions merge into their organ.

    Args:
        prepared: the prepared dataset.
        schema: the model's label schema (the dataset was checked against it).
        merge_lesions: ``auto`` (merge when the dataset labels an organ but none of its lesions), ``yes`` or ``no``.
        where: the dataset's name for messages.

    Returns:
        The plan.

    Raises:
        ValueError: labels outside the schema's foreground, a modality without a rule, or a bad `merge_lesions`.
    """
    labeled = prepared.labeled_classes
    if labeled is None:  # format v1: every label of dataset.json
        labeled = sorted(v for v in prepared.labels.values() if v != 0)
    bad = [c for c in labeled if not 0 < c < schema.num_classes]
    if bad or not labeled:
        raise ValueError(f"{where}: labels {bad or '(none)'} are not foreground classes of schema {schema.name}")
    if prepared.modality not in schema.modalities:
        raise ValueError(f"{where}: modality {prepared.modality!r} has no rule in schema {schema.name}")
    if merge_lesions not in ("auto", "yes", "no"):
        raise ValueError(f"merge_lesions must be auto, yes or no (got {merge_lesions!r})")
    names = {v: k for k, v in schema.classes.items()}
    organs_only = [
        o for o, lesions in schema.groups.items() if schema.classes[o] in labeled and lesions and not any(schema.classes[l] in labeled for l in lesions)
    ]
    merge = bool(organs_only) if merge_lesions == "auto" else merge_lesions == "yes"
    classes = [c for c in labeled if not (merge and schema.organ_of(names[c]) != names[c])]
    return ScoringPlan(classes=classes, merge=merge, names=names)


def grid_spacing(volume: Any, settings: SegmentationSettings) -> list[float]:
    """The voxel size in mm, per axis, of a preprocessed volume: what its distances are measured in.

    Args:
        volume: the deterministic chain's output (a MetaTensor: its affine says the grid).
        settings: the model's settings (their resolved spacing, for a volume without an affine).

    Returns:
        One spacing per spatial axis.

    Raises:
        ValueError: neither the volume nor the settings say the spacing (native grid, no affine).
    """
    if isinstance(volume, MetaTensor):
        return [float(s) for s in affine_to_spacing(volume.affine, r=volume.ndim - 1)]
    spacing = settings.schema.target_spacing if settings.spacing == "schema" else settings.spacing
    if spacing is None:
        raise ValueError("a preprocessed volume without an affine on the native grid: its voxel spacing is unknown")
    return [float(s) for s in spacing]


def preprocess_cases(prepared: PreparedDataset, settings: SegmentationSettings, progress: Progress | None = None) -> PreparedCases:
    """Every labelled case of `prepared` through the training chain, on the model's grid.

    Args:
        prepared: the prepared dataset.
        settings: the model's settings (schema, spacing).
        progress: called as ``progress(done, total)`` after each case.

    Returns:
        The cases.

    Raises:
        ValueError: no labelled case, or none that could be read (an unreadable case is left out, in ``failed``).
    """
    chain = deterministic_transforms(settings.schema, prepared.modality, spacing=settings.spacing, label_dtype=torch.uint8)
    cases = [c for c in prepared.cases if c.label is not None]
    if not cases:
        raise ValueError(f"{prepared.name}: no labelled cases to score")
    out = PreparedCases(case_ids=[], volumes=[], spacings=[])
    for i, c in enumerate(cases):
        try:
            item = chain({"image": str(c.image), "label": str(c.label)})
            spacing = grid_spacing(item["image"], settings)
        except Exception as exc:  # noqa: BLE001 - one unreadable case never stops the others (MONAI wraps reader errors)
            message = " ".join(str(exc).split())[:300] or type(exc).__name__
            log.warning("%s: case %s left out of the scores: %s", prepared.name, c.case_id, message)
            out.failed.append({"case": c.case_id, "error": message})
        else:
            out.case_ids.append(c.case_id)
            out.spacings.append(spacing)
            out.volumes.append((torch.as_tensor(item["image"]).float(), torch.as_tensor(item["label"])))
        if progress:
            progress(i + 1, len(cases))
    if not out.volumes:
        raise ValueError(f"{prepared.name}: none of its {len(cases)} labelled cases could be read (first: {out.failed[0]['error']})")
    return out


def score_model(
    network: torch.nn.Module, cases: PreparedCases, settings: SegmentationSettings, plan: ScoringPlan, progress: Progress | None = None
) -> dict[str, Any]:
    """Score one network on prepared cases.

    Args:
        network: the network (weights loaded).
        cases: `preprocess_cases` of the dataset.
        settings: the model's settings (window, overlap, predicted classes).
        plan: `scoring_plan` of the dataset.
        progress: called as ``progress(done, total)`` after each case.

    Returns:
        ``per_case`` (class name -> Dice, unscorable classes left out), ``mean`` (class name ->
        mean Dice), ``mean_all`` (their mean, None without any), ``metrics`` (per case: class
        name -> every metric, null where undefined) and ``metrics_mean`` (class name -> metric ->
        {mean, median, n}).
    """
    names, classes = plan.names, plan.classes
    per_metrics = []
    for i, (image, label) in enumerate(cases.volumes):
        per_metrics.append(training.evaluate_case_metrics(network, image, label, settings, classes, cases.spacings[i], merge_lesion_classes=plan.merge))
        if progress:
            progress(i + 1, len(cases.volumes))
    per_case = [{c: row[c]["dice"] for c in classes} for row in per_metrics]  # `dice_per_class`
    means = training.class_means(per_case, classes)
    summary = summarise_metrics(per_metrics, classes)
    return {
        "per_case": [{names[c]: v for c, v in case.items() if not math.isnan(v)} for case in per_case],
        "mean": {names[c]: v for c, v in means.items()},
        "mean_all": sum(means.values()) / len(means) if means else None,
        # a class not scorable on a case (absent from both maps) is left out, as in per_case; null: that metric is undefined there
        "metrics": [{names[c]: nan_to_none(row[c]) for c in classes if not math.isnan(row[c]["dice"])} for row in per_metrics],
        "metrics_mean": {names[c]: nan_to_none(summary[c]) for c in classes},
    }
