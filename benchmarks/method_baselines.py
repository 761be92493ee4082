"""The in-process baselines of the benchmarks: a centralised model and the standalone ensemble, scored like the federation's models.

- `split_volumes` / `training_volumes`: a site's cases through the plans' deterministic chain, split as the
  federation's sites split them (`pipelines.splits`), so a centralised model trains on exactly the cases the sites
  trained on and is tested on exactly their test cases.
- `train_centralised`: the plans' training step (patches, augmentation, the partial-label objective of each case's
  site, AdamW, the spec's schedule) on the pooled training cases, one volume per step.
- `PartialLabelEnsemble`: the ConDistFL paper's ensemble of standalone models: each class's probability from the
  model(s) of the site(s) labelling it, background from every model's merged background.
- `site_test_dice` / `oof_dice`: Dice as the sites' test rows and `coordinator evaluate` compute it.

Used by ``benchmarks/federation_methods.py`` and ``benchmarks/cross_modality_gin.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from pipelines.augment import patch_batch, sampler_for
from pipelines.ensemble import PartialLabelEnsemble  # noqa: F401 - the benchmarks use it as mb.PartialLabelEnsemble
from pipelines.networks import set_background_prior
from pipelines.plan_args import SegmentationSettings
from pipelines.presence import presence_logits, presence_loss
from pipelines.splits import SplitIndices, SplitSettings, split_indices
from pipelines.training import PartialLabelObjective, build_model, class_means, cosine_lr, evaluate_case
from pipelines.transforms import deterministic_transforms
from preprocessing.dataset import load_dataset

Volume = tuple[torch.Tensor, torch.Tensor]  # (image (C, X, Y, Z), label (1, X, Y, Z))
TrainingCase = tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]  # image, label, the classes its site labels


def labelled_volumes(dataset: Path, settings: SegmentationSettings) -> tuple[list[str], list[Volume]]:
    """The labelled cases' ids (manifest order, as the plans' dataset lists them) and volumes through the plans' deterministic chain.

    Args:
        dataset: a prepared dataset.
        settings: the plan's settings (schema, spacing).

    Returns:
        ``(case ids, [(image, label), ...])``.
    """
    prepared = load_dataset(dataset)
    chain = deterministic_transforms(settings.schema, prepared.modality, spacing=settings.spacing, label_dtype=torch.uint8)
    ids, out = [], []
    for c in prepared.cases:
        if c.label is not None:
            d = chain({"image": str(c.image), "label": str(c.label)})
            ids.append(c.case_id)
            out.append((torch.as_tensor(d["image"]).float(), torch.as_tensor(d["label"])))
    return ids, out


def split_volumes(dataset: Path, settings: SegmentationSettings, split: SplitSettings) -> dict[str, list[Volume]]:
    """A site's labelled cases per split, as the federation's sites split them (`pipelines.splits.split_indices`).

    Args:
        dataset: the site's prepared dataset.
        settings: the plan's settings.
        split: the spec's split.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``.
    """
    ids, volumes = labelled_volumes(dataset, settings)
    indices: SplitIndices = split_indices(ids, split)
    return {name: [volumes[i] for i in getattr(indices, name)] for name in ("training", "validation", "test")}


def training_volumes(dataset: Path, settings: SegmentationSettings, split: SplitSettings) -> list[Volume]:
    """A site's training cases as the federation's sites split them: its validation and test cases are held out
    of the centralised model's training too.

    Args:
        dataset: the site's prepared dataset.
        settings: the plan's settings.
        split: the spec's split.

    Returns:
        The training cases' ``(image, label)``.
    """
    return split_volumes(dataset, settings, split)["training"]


@dataclasses.dataclass
class SiteCases:
    """One site's cases for the in-process baselines.

    Attributes:
        name: the site's name as its checkpoints are named (`coordinator.runs.safe_name`).
        classes: the schema ids the site labels.
        training: its training cases.
        test: its test cases (never trained on, never used for selection).
    """

    name: str
    classes: tuple[int, ...]
    training: list[Volume]
    test: list[Volume]


def load_site(name: str, dataset: Path, settings: SegmentationSettings, split: SplitSettings) -> SiteCases:
    """A site's training and test cases and the classes it labels (its manifest's ``labeled_classes``).

    Args:
        name: the site's name.
        dataset: its prepared dataset.
        settings: the plan's settings.
        split: the spec's split.

    Returns:
        The site's cases.
    """
    prepared = load_dataset(dataset)
    labelled = prepared.labeled_classes
    if labelled is None:  # format v1: every label of dataset.json
        labelled = sorted(v for v in prepared.labels.values() if v != 0)
    parts = split_volumes(dataset, settings, split)
    return SiteCases(name, tuple(sorted(int(c) for c in labelled)), parts["training"], parts["test"])


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: unchanged), restoring the previous count after.

    Args:
        n: intra-op threads for the block.

    Yields:
        Nothing.
    """
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_centralised(
    train: Sequence[TrainingCase],
    settings: SegmentationSettings,
    steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
    console: Console | None = None,
    threads: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
    label: str = "centralised",
) -> torch.nn.Module:
    """The plans' training step on pooled volumes, one volume per step: patches and augmentation (`PatchSampler`),
    the partial-label objective of each case's site (marginal Dice + CE on every deep-supervision head), AdamW and
    the spec's schedule (cosine over ``steps`` unless ``settings.lr_schedule`` is ``constant``).

    Args:
        train: ``(image, label, classes its site labels)`` per training case.
        settings: the plan's settings (network, patches, augmentation, schema).
        steps: optimizer steps (the federation's total: sites x rounds x local steps).
        lr: the spec's learning rate.
        weight_decay: the spec's weight decay.
        seed: the training seed (weights, case order, patches, augmentation).
        console: where the progress bar goes (None: no bar).
        threads: torch threads while training (None: unchanged).
        on_step: called with (step, loss) after each step.
        label: the progress bar's label.

    Returns:
        The last model, in eval mode.

    Raises:
        ValueError: no training case, or ``steps`` < 1.
    """
    if not train:
        raise ValueError("no training case to train the centralised model on")
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    net = build_model(settings)
    if settings.background_prior is not None:  # the federation's initial model, as the plans build it
        set_background_prior(net, settings.num_classes, settings.background_prior)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    objectives: dict[tuple[int, ...], PartialLabelObjective] = {}
    sampler = sampler_for(settings)
    net.train()
    with torch_threads(threads), Progress(console=console, disable=console is None) as bar:
        task = bar.add_task(label, total=steps)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = cosine_lr(lr, step, steps) if settings.lr_schedule == "cosine" else lr
            volume, target, classes = train[rng.randrange(len(train))]
            if classes not in objectives:  # the case's site's objective: only its labelled classes are foreground
                objectives[classes] = PartialLabelObjective(settings.schema, classes, settings.temperature, settings.spatial_dims)
            images, labels = patch_batch(sampler, [volume], [target])  # one volume per step, as the plans' loader
            loss, _ = objectives[classes](net(images), labels, None, 0.0)
            if (presence := presence_logits(net)) is not None:  # a presence head learns as at the case's site
                loss = loss + settings.presence_weight * presence_loss(presence, labels, settings.presence_classes, classes)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            if on_step is not None:
                on_step(step, float(loss.detach()))
            bar.advance(task)
    return net.eval()


def site_test_dice(model: torch.nn.Module, sites: Sequence[SiteCases], settings: SegmentationSettings) -> tuple[dict[int, float], int]:
    """Dice per class on the sites' test cases, each site on the classes it labels (the sites' test rows).

    Args:
        model: the model (or ensemble).
        sites: the sites.
        settings: the plan's settings (as the sites score: ``predict_classes`` as the spec has it).

    Returns:
        ``(class id -> mean Dice over the test cases of the sites labelling it, test cases scored)``.
    """
    per_case = [evaluate_case(model, image, label, settings, site.classes) for site in sites for image, label in site.test]
    classes = sorted({c for site in sites for c in site.classes})
    return class_means(per_case, classes), len(per_case)


def oof_classes(dataset: Path, settings: SegmentationSettings) -> tuple[list[int], bool]:
    """The classes `coordinator evaluate` scores on an out-of-federation dataset, and whether lesions are merged
    (its ``merge_lesions="auto"``: a dataset labelling an organ but none of its lesions).

    Args:
        dataset: the prepared out-of-federation dataset.
        settings: the plan's settings (schema).

    Returns:
        ``(class ids, merge)``.
    """
    schema = settings.schema
    prepared = load_dataset(dataset)
    labelled = prepared.labeled_classes
    if labelled is None:
        labelled = sorted(v for v in prepared.labels.values() if v != 0)
    names = {v: k for k, v in schema.classes.items()}
    merge = any(schema.classes[o] in labelled and lesions and not any(schema.classes[x] in labelled for x in lesions) for o, lesions in schema.groups.items())
    return [int(c) for c in labelled if not (merge and schema.organ_of(names[c]) != names[c])], merge


def oof_settings(settings: SegmentationSettings, trained: Sequence[int]) -> SegmentationSettings:
    """The settings `coordinator evaluate` predicts with: classes no site labels fold into background.

    Args:
        settings: the plan's settings.
        trained: the classes some site labels.

    Returns:
        ``settings`` with ``predict_classes`` the trained classes when some class is untrained (unchanged otherwise).
    """
    if settings.predict_classes is None and trained and len(set(trained)) < settings.num_classes - 1:
        return dataclasses.replace(settings, predict_classes=tuple(sorted(set(trained))))
    return settings


def oof_dice(model: torch.nn.Module, volumes: Sequence[Volume], settings: SegmentationSettings, classes: Sequence[int], merge: bool) -> dict[int, float]:
    """Dice per class on an out-of-federation set, as `coordinator evaluate` scores it.

    Args:
        model: the model (or ensemble).
        volumes: the set's ``(image, label)``.
        settings: `oof_settings`.
        classes: `oof_classes`.
        merge: merge lesions into their organ (`oof_classes`).

    Returns:
        Class id -> mean Dice over the cases.
    """
    return class_means([evaluate_case(model, image, label, settings, classes, merge_lesion_classes=merge) for image, label in volumes], classes)


def named(dice: dict[int, float], settings: SegmentationSettings) -> dict[str, float]:
    """Class ids -> class names of the schema.

    Args:
        dice: class id -> Dice.
        settings: the plan's settings (schema).

    Returns:
        Class name -> Dice.
    """
    names = {v: k for k, v in settings.schema.classes.items()}
    return {names[c]: v for c, v in dice.items()}


def load_members(checkpoints: dict[str, Path], sites: Sequence[SiteCases], settings: SegmentationSettings) -> list[tuple[torch.nn.Module, tuple[int, ...]]]:
    """The ensemble's members: each site's local model with the classes its site labels.

    Args:
        checkpoints: site name -> its local checkpoint (plain tensors, `coordinator.checkpoints.load_tensors`).
        settings: the plan's settings (network).
        sites: the sites (names and labelled classes).

    Returns:
        ``(model in eval mode, classes)`` per site with a checkpoint.
    """
    from coordinator.checkpoints import load_tensors  # the run's files (plain tensors only)

    members: list[tuple[torch.nn.Module, tuple[int, ...]]] = []
    for site in sites:
        path = checkpoints.get(site.name)
        if path is None:
            continue
        net = build_model(settings)
        state: dict[str, Any] = load_tensors(path)
        net.load_state_dict(state)
        members.append((net.eval(), site.classes))
    return members
