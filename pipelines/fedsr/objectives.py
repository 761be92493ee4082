"""FedSR objectives: registration and segmentation losses, the MI estimator, SA representation updates.

Losses (section II-D of the paper; shared/notes/fedsr-method.md): a first-order smoothness
penalty on the displacement field (MONAI `DiffusionLoss`, eq. 8), local normalised
cross-correlation between the warped atlas and the unlabelled image (MONAI
`LocalNormalizedCrossCorrelationLoss`), Dice between the warped atlas label and the
segmentation, and Dice of the segmentation against the pseudo-label. The mutual information
between a decoder's pooled feature f_d1^p and the SA representation f is estimated with a
Jensen-Shannon critic (`jensen_shannon_mutual_information`). The SA representation is smoothed
locally (eq. 7) and averaged across sites on the server (`aggregate_sa_representations`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses.deform import DiffusionLoss
from monai.losses.dice import DiceLoss
from monai.losses.image_dissimilarity import LocalNormalizedCrossCorrelationLoss
from torch import nn

__all__ = [
    "FedSRLossWeights",
    "MutualInformationCritic",
    "aggregate_sa_representations",
    "jensen_shannon_from_scores",
    "jensen_shannon_mutual_information",
    "pseudo_label_dice_loss",
    "registration_dice_loss",
    "registration_loss",
    "segmentation_loss",
    "similarity_loss",
    "smooth_sa_representation",
    "smoothness_loss",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FedSRLossWeights:
    """Weights of the FedSR loss terms (defaults: the paper's l_smo = 7.5, l_sim = 5, l_ce = 1).

    Args:
        smoothness: l1, on the field's first-order smoothness penalty.
        similarity: l2, on the LNCC loss between the warped atlas and the unlabelled image.
        registration_dice: l3, on Dice between the warped atlas label and the segmentation.
        registration_mutual_information: l4, on -MI for the registration decoder.
        segmentation_mutual_information: l, on -MI for the segmentation decoder.
        lncc_kernel_size: LNCC window (voxels).
    """

    smoothness: float = 7.5
    similarity: float = 5.0
    registration_dice: float = 1.0
    registration_mutual_information: float = 0.1
    segmentation_mutual_information: float = 0.1
    lncc_kernel_size: int = 9


def smoothness_loss(ddf: torch.Tensor) -> torch.Tensor:
    """First-order smoothness of a displacement field: mean squared spatial gradient (eq. 8).

    Args:
        ddf: (B, 3, D, H, W) displacement field.

    Returns:
        A scalar: 0 for a constant field, > 0 otherwise.
    """
    loss: torch.Tensor = DiffusionLoss()(ddf)
    return loss


def similarity_loss(warped_atlas_image: torch.Tensor, unlabelled_image: torch.Tensor, kernel_size: int = 9) -> torch.Tensor:
    """Local normalised cross-correlation loss between the warped atlas and the unlabelled image.

    Args:
        warped_atlas_image: X_a o psi, (B, C, D, H, W).
        unlabelled_image: X_u, same shape.
        kernel_size: LNCC window size (odd, voxels).

    Returns:
        A scalar, -LNCC: -1 for identical images.
    """
    loss: torch.Tensor = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size)(warped_atlas_image, unlabelled_image)
    return loss


def registration_dice_loss(warped_atlas_probabilities: torch.Tensor, segmentation_logits: torch.Tensor) -> torch.Tensor:
    """Soft Dice between the warped atlas label and the segmentation prediction (segmentation guides registration).

    Args:
        warped_atlas_probabilities: Y_a o psi as one-hot channels warped bilinearly,
            (B, num_classes, D, H, W) (`pipelines.fedsr.networks.warp_label_soft`); differentiable in psi.
        segmentation_logits: (B, num_classes, D, H, W).

    Returns:
        A scalar Dice loss in [0, 1].
    """
    loss: torch.Tensor = DiceLoss(softmax=False, include_background=False)(warped_atlas_probabilities, torch.softmax(segmentation_logits, dim=1))
    return loss


def pseudo_label_dice_loss(segmentation_logits: torch.Tensor, pseudo_label: torch.Tensor) -> torch.Tensor:
    """Dice of the segmentation against the pseudo-label Y_p = Y_a o psi (integer labels).

    Args:
        segmentation_logits: (B, num_classes, D, H, W).
        pseudo_label: (B, 1, D, H, W) integer labels (`pipelines.fedsr.networks.warp_label`).

    Returns:
        A scalar Dice loss in [0, 1].
    """
    loss: torch.Tensor = DiceLoss(softmax=True, to_onehot_y=True)(segmentation_logits, pseudo_label)
    return loss


class MutualInformationCritic(nn.Module):
    """Critic T(x, y) of the Jensen-Shannon MI estimator: a small MLP on the concatenated pair."""

    def __init__(self, feature_dim: int, representation_dim: int, hidden_dim: int = 64) -> None:
        """
        Args:
            feature_dim: length of the pooled decoder feature f_d1^p.
            representation_dim: length of the SA representation f.
            hidden_dim: width of the hidden layer.
        """
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(feature_dim + representation_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 1),
        )

    def forward(self, features: torch.Tensor, representations: torch.Tensor) -> torch.Tensor:
        """Score pairs.

        Args:
            features: (N, feature_dim).
            representations: (N, representation_dim).

        Returns:
            Scores (N,).
        """
        scores: torch.Tensor = self.network(torch.cat([features, representations], dim=1)).squeeze(1)
        return scores


def jensen_shannon_mutual_information(critic: MutualInformationCritic, features: torch.Tensor, representations: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon lower-bound estimate of I(f_d1^p; f) (Deep InfoMax, Hjelm et al. 2019).

    MI_JSD = E_joint[-softplus(-T(x, y))] - E_marginal[softplus(T(x, y'))], with the marginal
    pairs made by pairing each feature with another row's representation (a cyclic shift, so no
    row is paired with itself). Maximise it (minimise its negative) in both the critic and the
    networks. Why Jensen-Shannon rather than InfoNCE or MINE: in 3D, batches are one or two
    volumes per step, so negatives are few; InfoNCE's bound is capped at log(N) (log 2 for two
    rows) and MINE's Donsker-Varadhan bound has high-variance, biased gradients at small
    batches, while the JSD estimator is bounded, low-variance and its gradients are stable,
    which is what the MI term needs (a regulariser tying the feature to f, not an MI value).

    Args:
        critic: the critic T.
        features: pooled decoder features (N, feature_dim), N >= 2 (rows can come from several
            steps or, for negatives, several sites' SA representations).
        representations: the matching SA representations (N, representation_dim).

    Returns:
        A scalar estimate in nats: 2 JSD(joint || product of marginals) at the optimal critic
        (the constant 2 log 2 added so that independent inputs score about 0; at most 2 log 2).

    Raises:
        ValueError: when fewer than two pairs are given or the row counts differ.
    """
    if features.ndim != 2 or representations.ndim != 2 or features.shape[0] != representations.shape[0]:
        raise ValueError(f"features {tuple(features.shape)} and representations {tuple(representations.shape)} must be (N, .) with the same N")
    if features.shape[0] < 2:
        raise ValueError("the Jensen-Shannon MI estimate needs at least two pairs (one makes the negatives)")
    joint_scores = critic(features, representations)
    marginal_scores = critic(features, representations.roll(shifts=1, dims=0))
    return jensen_shannon_from_scores(joint_scores, marginal_scores)


def jensen_shannon_from_scores(joint_scores: torch.Tensor, marginal_scores: torch.Tensor) -> torch.Tensor:
    """The Jensen-Shannon MI estimate from critic scores of joint and of product-of-marginal pairs.

    Args:
        joint_scores: T(x, y) for pairs drawn together (N,).
        marginal_scores: T(x, y') for pairs drawn apart (M,), M >= 1.

    Returns:
        E_joint[-softplus(-T)] - E_marginal[softplus(T)] + 2 log 2 (about 0 for independent inputs).
    """
    estimate: torch.Tensor = (-F.softplus(-joint_scores)).mean() - F.softplus(marginal_scores).mean() + 2.0 * math.log(2.0)
    return estimate


def registration_loss(
    ddf: torch.Tensor,
    warped_atlas_image: torch.Tensor,
    unlabelled_image: torch.Tensor,
    warped_atlas_probabilities: torch.Tensor,
    segmentation_logits: torch.Tensor,
    mutual_information: torch.Tensor,
    weights: FedSRLossWeights,
) -> torch.Tensor:
    """L_reg = l1 L_smooth + l2 L_sim + l3 L_dice + l4 (-MI).

    Args:
        ddf: displacement field (B, 3, D, H, W).
        warped_atlas_image: X_a o psi.
        unlabelled_image: X_u.
        warped_atlas_probabilities: the atlas label warped as one-hot channels.
        segmentation_logits: the segmentation decoder's logits (detach them to keep this loss
            from training the segmentation decoder).
        mutual_information: the registration decoder's MI estimate (scalar).
        weights: the loss weights.

    Returns:
        The scalar registration loss.
    """
    return (
        weights.smoothness * smoothness_loss(ddf)
        + weights.similarity * similarity_loss(warped_atlas_image, unlabelled_image, weights.lncc_kernel_size)
        + weights.registration_dice * registration_dice_loss(warped_atlas_probabilities, segmentation_logits)
        - weights.registration_mutual_information * mutual_information
    )


def segmentation_loss(
    segmentation_logits: torch.Tensor, pseudo_label: torch.Tensor, mutual_information: torch.Tensor, weights: FedSRLossWeights
) -> torch.Tensor:
    """L_seg = Dice(Y_p, Y_hat) + l (-MI).

    Args:
        segmentation_logits: (B, num_classes, D, H, W).
        pseudo_label: Y_p = Y_a o psi, (B, 1, D, H, W) integer labels.
        mutual_information: the segmentation decoder's MI estimate (scalar).
        weights: the loss weights.

    Returns:
        The scalar segmentation loss.
    """
    return pseudo_label_dice_loss(segmentation_logits, pseudo_label) - weights.segmentation_mutual_information * mutual_information


def smooth_sa_representation(previous: torch.Tensor, current: torch.Tensor, alpha: float) -> torch.Tensor:
    """Local smoothing of the SA representation (eq. 7): f_hat = (1 - alpha) f_prev + alpha f.

    Args:
        previous: f^(i-1), the representation of the previous round.
        current: f^i, this round's representation (same shape).
        alpha: smoothing coefficient in [0, 1] (1 keeps only the current one).

    Returns:
        The smoothed representation.

    Raises:
        ValueError: when alpha is outside [0, 1] or the shapes differ.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if previous.shape != current.shape:
        raise ValueError(f"previous {tuple(previous.shape)} and current {tuple(current.shape)} SA representations differ in shape")
    return (1.0 - alpha) * previous + alpha * current


def aggregate_sa_representations(representations: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Server-side aggregation of the sites' SA representations: their weighted mean.

    Args:
        representations: one per site, all the same shape.
        weights: one non-negative weight per site (e.g. dataset sizes); None gives equal weights.

    Returns:
        The global SA representation sum_k w_k f_k / sum_k w_k.

    Raises:
        ValueError: when no representation is given, shapes differ, the weight count does not
            match, a weight is negative, or the weights sum to zero.
    """
    if not representations:
        raise ValueError("no SA representations to aggregate")
    shape = representations[0].shape
    if any(r.shape != shape for r in representations):
        raise ValueError(f"SA representations differ in shape: {[tuple(r.shape) for r in representations]}")
    site_weights = [1.0] * len(representations) if weights is None else [float(w) for w in weights]
    if len(site_weights) != len(representations):
        raise ValueError(f"{len(site_weights)} weights for {len(representations)} SA representations")
    if any(w < 0 for w in site_weights) or sum(site_weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {site_weights}")
    total = sum(site_weights)
    stacked = torch.stack(list(representations))
    weight_tensor = torch.tensor(site_weights, dtype=stacked.dtype, device=stacked.device).reshape((-1,) + (1,) * len(shape))
    aggregated: torch.Tensor = (stacked * weight_tensor).sum(dim=0) / total
    logger.debug("aggregated %d SA representations (weights %s)", len(representations), site_weights)
    return aggregated
