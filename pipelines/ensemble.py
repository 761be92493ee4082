"""The ConDistFL paper's standalone baseline as one model: the ensemble of the sites' local models trained on partial labels.

Used by `coordinator evaluate` (a standalone run's ``ensemble`` model) and the benchmarks. No FL imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipelines.networks import main_output

__all__ = ["PartialLabelEnsemble"]


class PartialLabelEnsemble(torch.nn.Module):
    """The ConDistFL paper's ensemble of standalone models trained on partial labels.

    Each foreground class's probability is the mean softmax probability of the members whose site labels it;
    background is the smallest merged background of the members (the softmax mass of every class a member's site
    does not label, background included): a voxel is background only when no member claims it for one of its own
    classes, so an organ its owner finds with probability 0.6 wins although the other members, which never saw it
    labelled, call it background. Classes no member labels get probability 0. The output is
    the log of these probabilities, so an argmax over it (`pipelines.training.predict`) picks the class the rule
    picks.

    Args:
        members: ``(model, classes its site labels)`` per site.
        num_classes: classes of the schema, background included.
        spatial_dims: 2 or 3 (how the members' outputs are read).
        eps: floor of a probability before the log.

    Raises:
        ValueError: no member, or a class outside ``1..num_classes-1``.
    """

    def __init__(self, members: Sequence[tuple[torch.nn.Module, Sequence[int]]], num_classes: int, spatial_dims: int = 3, eps: float = 1e-6):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.models = torch.nn.ModuleList([m for m, _ in members])
        self.labelled = [sorted({int(c) for c in classes}) for _, classes in members]
        bad = sorted({c for cs in self.labelled for c in cs if not 0 < c < num_classes})
        if bad:
            raise ValueError(f"classes {bad} are not foreground classes (1..{num_classes - 1})")
        self.num_classes = num_classes
        self.spatial_dims = spatial_dims
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the ensemble.

        Args:
            x: a batch of windows (B, C, *spatial).

        Returns:
            (B, num_classes, *spatial).
        """
        total: torch.Tensor | None = None
        background: torch.Tensor | None = None
        count = [0] * self.num_classes
        for model, classes in zip(self.models, self.labelled):
            p = torch.softmax(main_output(model(x), self.spatial_dims).float(), dim=1)
            if total is None:
                total = torch.zeros_like(p)
            others = [c for c in range(self.num_classes) if c not in classes]  # background and the classes the site does not label
            merged = p[:, others].sum(dim=1)
            background = merged if background is None else torch.minimum(background, merged)
            total[:, classes] += p[:, classes]
            for c in classes:
                count[c] += 1
        assert total is not None and background is not None  # at least one member (checked in __init__)
        total[:, 0] = background
        scale = torch.tensor([1] + [max(n, 1) for n in count[1:]], dtype=total.dtype, device=total.device)
        probs = total / scale.view(1, -1, *([1] * (total.dim() - 2)))
        return torch.log(probs.clamp_min(self.eps))
