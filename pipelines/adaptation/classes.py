"""Branch classes and schema ids: the lookup tables between them and the partial-label loss of the adaptation jobs.

A segmentation branch has its own class indices (background 0, then its classes in schema-id
order); the datasets carry schema ids, and each case may label only some classes.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pipelines.adaptation.losses import segmentation_loss
from pipelines.adaptation.volumes import LabelledSlices
from pipelines.losses import IGNORE_INDEX, MarginalDiceCELoss
from preprocessing.schema import LabelSchema

__all__ = ["PartialLabelLoss", "branch_classes", "case_branch_sets", "label_table", "schema_class_ids"]


def schema_class_ids(schema: LabelSchema) -> dict[str, int]:
    """The class ids of a label schema.

    Args:
        schema: the label schema.

    Returns:
        ``{class name: id}``, background included.
    """
    return {str(k): int(v) for k, v in schema.classes.items()}


def branch_classes(schema: LabelSchema, class_ids: list[int]) -> list[str]:
    """Branch class names for schema ids.

    Args:
        schema: the label schema.
        class_ids: schema ids (0 may be among them).

    Returns:
        ``"background"`` first, then the names of the ids in ascending order.

    Raises:
        ValueError: an id the schema does not have.
    """
    by_id = {v: k for k, v in schema_class_ids(schema).items()}
    unknown = [c for c in class_ids if c not in by_id]
    if unknown:
        raise ValueError(f"class id(s) {unknown} not in label schema {schema.name}")
    return ["background"] + [by_id[c] for c in sorted(class_ids) if c != 0]


def label_table(schema_ids: Mapping[str, int], class_names: list[str], ignore_label: int, size: int) -> torch.Tensor:
    """Lookup table schema id -> branch index.

    Args:
        schema_ids: ``{class name: schema id}``.
        class_names: the branch classes, background first.
        ignore_label: the schema's label of unknown voxels.
        size: the schema's number of classes.

    Returns:
        A long tensor: classes not in the branch -> 0, the ignore label -> IGNORE_INDEX.
    """
    table = torch.zeros(max(size, ignore_label + 1), dtype=torch.long)
    for i, name in enumerate(class_names[1:], start=1):
        table[schema_ids[name]] = i
    table[ignore_label] = IGNORE_INDEX
    return table


class PartialLabelLoss:
    """Dice + CE where each sample carries the branch classes its labels mark.

    Samples are grouped by that set and each group gets the marginal loss over its own
    classes (the others merged with the background, not taught as background); groups are
    weighted by size. A sample whose set is empty gives no supervision.

    Args:
        n_classes: the branch's classes, background included.
    """

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self._losses: dict[tuple[int, ...], MarginalDiceCELoss] = {}

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, sets: list[tuple[int, ...]]) -> torch.Tensor:
        """The loss of a batch.

        Args:
            logits: ``(B, n_classes, H, W)``.
            labels: ``(B, H, W)`` branch indices (or IGNORE_INDEX), on the logits' device.
            sets: per sample, the branch classes its labels mark.

        Returns:
            A scalar (0 when no sample has a class).
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, key in enumerate(sets):
            if key:
                groups.setdefault(key, []).append(i)
        total = logits.new_zeros((), dtype=torch.float32)
        for key, idx in groups.items():
            if key not in self._losses:
                self._losses[key] = segmentation_loss(self.n_classes, list(key))
            ix = torch.tensor(idx, dtype=torch.long, device=logits.device)
            part: torch.Tensor = self._losses[key](logits[ix], labels[ix])
            total = total + part * (len(idx) / len(sets))
        return total


def case_branch_sets(data: LabelledSlices, names: list[str], schema_ids: Mapping[str, int]) -> list[tuple[int, ...]]:
    """The branch classes each case's labels mark.

    Args:
        data: the dataset's slices.
        names: the branch classes, background first.
        schema_ids: ``{class name: schema id}``.

    Returns:
        Per case of ``data``, the branch class indices, ascending.
    """
    index = {schema_ids[n]: i for i, n in enumerate(names) if i}
    return [tuple(sorted(index[c] for c in classes if c in index)) for classes in data.labeled_classes]
