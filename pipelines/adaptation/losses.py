"""Losses of the local domain adaptation: reconstruction (MSE + MS-SSIM), segmentation, cycle consistency (no FL code).

Images are single-channel in [-1, 1], ``(B, 1, H, W)``. Why each loss is built this way (finite MS-SSIM
gradients, marginal segmentation loss, perceptual term only from a file): docs/design/adaptation.md.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.metrics.regression import compute_ssim_and_cs

from pipelines.artifact_approval import load_approved_bytes
from pipelines.losses import IGNORE_INDEX, MarginalDiceCELoss

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as in MONAI
_WINDOW = 11
_SIGMA = 1.5


def ms_ssim_scales(size: int, window: int = _WINDOW) -> int:
    """How many MS-SSIM scales an image of ``size`` px supports: the window must fit the coarsest scale.

    Args:
        size: the image side in pixels.
        window: the SSIM window side.

    Returns:
        1..5: the most scales with ``size / 2**(scales-1) > window - 1``.
    """
    scales = 1
    while scales < len(MS_SSIM_WEIGHTS) and size / 2**scales > window - 1:
        scales += 1
    return scales


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, eps: float = 1e-4) -> torch.Tensor:
    """Per-sample multi-scale SSIM of 2D images (1 = identical).

    The scale weights are the first ``n`` of `MS_SSIM_WEIGHTS`, renormalised to sum to 1;
    each scale's contrast-structure term (and the last scale's SSIM) is clamped to
    ``[eps, 1]`` before its power.

    Args:
        x: images ``(B, C, H, W)``.
        y: images of the same shape.
        data_range: the value range of the images (2 for [-1, 1]).
        eps: the lower clamp of every term (keeps the gradients finite).

    Returns:
        ``(B,)`` MS-SSIM values.

    Raises:
        ValueError: the shapes differ or are not 4D.
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ms_ssim: expected two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    n = ms_ssim_scales(min(x.shape[-2:]))
    weights = torch.tensor(MS_SSIM_WEIGHTS[:n], dtype=torch.float32, device=x.device)
    weights = weights / weights.sum()
    terms = []
    a, b = x.float(), y.float()
    for i in range(n):
        ssim, cs = compute_ssim_and_cs(a, b, spatial_dims=2, kernel_size=[_WINDOW] * 2, kernel_sigma=[_SIGMA] * 2, data_range=data_range)
        value = ssim if i == n - 1 else cs
        terms.append(value.flatten(1).mean(1).clamp(eps, 1.0))
        if i < n - 1:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
    stacked = torch.stack(terms, dim=1)  # (B, n)
    return torch.exp((weights * stacked.log()).sum(1))


class PerceptualDistance(torch.nn.Module):
    """A perceptual distance loaded from a TorchScript file: ``module(x, y) -> (B,)`` or a scalar, inputs in [-1, 1] (LPIPS's convention).

    It loads only when the site approved the file's sha256; the sha256 is recorded so a run
    says exactly which network it used.

    Args:
        path: the TorchScript file.

    Raises:
        FileNotFoundError: no such file.
        pipelines.artifact_approval.ArtifactNotApproved: the site has not approved its sha256.
        ValueError: not a TorchScript module.
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: perceptual network not found")
        # TorchScript runs code on load: only content the site approved (site-agent artifacts)
        data, self.sha256 = load_approved_bytes(self.path, "torchscript", {"setting": "adaptation settings: perceptual"})
        try:
            self.net: torch.jit.ScriptModule = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()  # type: ignore[no-untyped-call]  # torch.jit.load is unannotated
        except Exception as exc:  # a broken or non-TorchScript file
            raise ValueError(f"{self.path}: not a TorchScript perceptual network ({exc})") from None
        for p in self.net.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean distance between two image batches.

        Args:
            x: images ``(B, 1, H, W)`` in [-1, 1].
            y: images of the same shape.

        Returns:
            A scalar.
        """
        out: torch.Tensor = self.net(x, y)
        return out.float().mean()


class ReconstructionLoss(torch.nn.Module):
    """``mse * MSE + ms_ssim * (1 - MS-SSIM) [+ perceptual * P]`` for images in [-1, 1].

    The authors use MSE (weight 1) + LPIPS (weight 0.8); without LPIPS weights on disk the
    structural term is MS-SSIM with the same weight.

    Args:
        mse: weight of the mean squared error.
        ms_ssim_weight: weight of ``1 - MS-SSIM``.
        perceptual: path of a TorchScript distance (see `PerceptualDistance`); None leaves the term out.
        perceptual_weight: weight of the perceptual term.

    Raises:
        ValueError: a weight is not a finite number >= 0, or the perceptual file is refused
            (see `PerceptualDistance`).
    """

    def __init__(self, mse: float = 1.0, ms_ssim_weight: float = 0.8, perceptual: str | Path | None = None, perceptual_weight: float = 0.8) -> None:
        super().__init__()
        for name, value in (("mse", mse), ("ms_ssim_weight", ms_ssim_weight), ("perceptual_weight", perceptual_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.mse = float(mse)
        self.ms_ssim_weight = float(ms_ssim_weight)
        self.perceptual = PerceptualDistance(perceptual) if perceptual is not None else None
        self.perceptual_weight = float(perceptual_weight) if perceptual is not None else 0.0

    def describe(self) -> dict[str, Any]:
        """The weights and, with a perceptual term, its file name and sha256 (for job records).

        Returns:
            ``{"mse": w, "ms_ssim": w[, "perceptual": {"weight", "file", "sha256"}]}``.
        """
        out: dict[str, Any] = {"mse": self.mse, "ms_ssim": self.ms_ssim_weight}
        if self.perceptual is not None:
            out["perceptual"] = {"weight": self.perceptual_weight, "file": self.perceptual.path.name, "sha256": self.perceptual.sha256}
        return out

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The weighted reconstruction loss.

        Args:
            x: reconstructed images ``(B, 1, H, W)`` in [-1, 1].
            target: the originals, same shape.

        Returns:
            A scalar (float32).

        Raises:
            ValueError: the shapes differ.
        """
        if x.shape != target.shape:
            raise ValueError(f"reconstruction: shapes differ {tuple(x.shape)} vs {tuple(target.shape)}")
        loss = x.new_zeros((), dtype=torch.float32)
        if self.mse:
            loss = loss + self.mse * F.mse_loss(x.float(), target.float())
        if self.ms_ssim_weight:
            loss = loss + self.ms_ssim_weight * (1.0 - ms_ssim(x, target)).mean()
        if self.perceptual is not None and self.perceptual_weight:
            loss = loss + self.perceptual_weight * self.perceptual(x, target)
        return loss


def cycle_consistency(loss: ReconstructionLoss, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``sum Lr(x, x_cycled)`` over (original, cycled) pairs, e.g. source and target.

    Args:
        loss: the reconstruction loss Lr.
        pairs: (original, cycled back) image batches.

    Returns:
        The summed loss (a scalar).

    Raises:
        ValueError: no pairs.
    """
    total: torch.Tensor | None = None
    for original, cycled in pairs:
        term = loss(cycled, original)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("cycle_consistency: no pairs")
    return total


def segmentation_loss(n_classes: int, labelled: Sequence[int] | None = None, ignore_index: int = IGNORE_INDEX) -> MarginalDiceCELoss:
    """Dice + CE over a branch's ``n_classes`` (background 0 first), marginal over the classes the labels mark.

    Args:
        n_classes: the branch's classes, background included.
        labelled: the branch classes the labels actually mark (default every foreground class).
        ignore_index: the label value left out.

    Returns:
        The loss module ``loss(logits, labels)``.

    Raises:
        ValueError: no labelled foreground class.
    """
    foreground = list(range(1, n_classes)) if labelled is None else sorted(int(c) for c in labelled)
    if not foreground:
        raise ValueError("segmentation_loss: no labelled foreground class")
    return MarginalDiceCELoss(foreground, n_classes, ignore_index=ignore_index)


__all__ = [
    "MS_SSIM_WEIGHTS",
    "PerceptualDistance",
    "ReconstructionLoss",
    "cycle_consistency",
    "ms_ssim",
    "ms_ssim_scales",
    "segmentation_loss",
]
