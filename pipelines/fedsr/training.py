"""FedSR training at one site: the model with its SA representation, one JRS update, the round's end.

What is shared and what stays at a site depends on the method (`FEDSR_METHODS`):

* ``fedsr``: the encoder and the SA representation are federated (averaged by dataset size);
  the registration and segmentation decoders and the two MI critics stay at the site.
* ``fedsr_no_mi`` / ``fedsr_no_scie``: the ablations of the paper's Table IV.
* ``fedrep``: shared encoder, local decoders, no SA representation, no SCIE, no MI.
* ``fedavg``: the whole network averaged, no SA representation, SCIE or MI.

The SA representation (the paper's f, section II-C). The paper initialises f from the labelled
atlas, maximises the MI between the decoders' pooled 1/4-scale feature f_d1^p and f "to update
f", smooths it with the previous round's (eq. 7) and averages it on the server. An MI with a
vector that is constant at a site is zero, whatever the networks do, so a literal reading
cannot train anything. This module reads f as what the note says it is, a summary of a site's
features: f is the mean over the site's volumes of the pooled 1/4-scale encoder feature f_1^p.
It starts as the atlas's f_1^p (the same at every site, as the paper says), a site's round
replaces it by ``(1 - alpha) f_received + alpha mean_round(f_1^p)`` (eq. 7), and the server
averages the sites' f (FedAvg, like the encoder). The MI term is maximised per volume between
f_d1^p(x) and f_1^p(x) (Jensen-Shannon estimator; negatives pair a feature with other volumes'
f_1^p kept from the site's recent steps), which ties each decoder's SCIE-scale feature to the
representation the SA vector summarises; SCIE injects the federation's f into both decoders.

One update (`FedSRUpdater.loss`) is DeepAtlas-style joint training on one batch of unlabelled
volumes: L_reg (smoothness, LNCC, Dice of the warped atlas label against the detached
segmentation, -MI) + L_seg (Dice against the detached pseudo-label Y_a o psi, -MI). No label
of a site's image is ever read. In the fine-tuning stage the encoder is frozen and only the
personal parts train.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import nn

from pipelines.fedsr.networks import FedSRConfig, FedSRNetwork, encoder_summary, set_encoder_frozen, warp_image, warp_label, warp_label_soft
from pipelines.fedsr.objectives import (
    FedSRLossWeights,
    MutualInformationCritic,
    jensen_shannon_from_scores,
    registration_loss,
    segmentation_loss,
    smooth_sa_representation,
)

__all__ = [
    "FEDSR_METHODS",
    "FedSRMethod",
    "FedSRModel",
    "FedSRUpdater",
    "RegistrationResult",
    "is_shared_parameter",
    "register_atlas",
    "segment_volume",
]

logger = logging.getLogger(__name__)

MEMORY_SIZE = 8  # earlier volumes' encoder summaries kept as the MI term's negatives


@dataclass(frozen=True)
class FedSRMethod:
    """What a method shares and which FedSR parts it uses.

    Args:
        name: the method's name (`FEDSR_METHODS`).
        share_decoders: True averages the decoders too (FedAvg); False keeps them at the site.
        use_sa: whether an SA representation is kept, sent and aggregated.
        use_scie: whether the decoders inject the SA representation (needs use_sa).
        use_mi: whether the MI term is in the losses.
    """

    name: str
    share_decoders: bool = False
    use_sa: bool = True
    use_scie: bool = True
    use_mi: bool = True

    def __post_init__(self) -> None:
        if self.use_scie and not self.use_sa:
            raise ValueError(f"method {self.name}: SCIE injects the SA representation, so it needs use_sa")


FEDSR_METHODS: dict[str, FedSRMethod] = {
    "fedsr": FedSRMethod("fedsr"),
    "fedsr_no_mi": FedSRMethod("fedsr_no_mi", use_mi=False),
    "fedsr_no_scie": FedSRMethod("fedsr_no_scie", use_scie=False),
    "fedrep": FedSRMethod("fedrep", use_sa=False, use_scie=False, use_mi=False),
    "fedavg": FedSRMethod("fedavg", share_decoders=True, use_sa=False, use_scie=False, use_mi=False),
}


class FedSRModel(nn.Module):
    """The FedSR network, the site's SA representation (a parameter set by eq. 7) and the two MI critics.

    Parameter names: ``network.encoder.*`` (shared), ``network.registration_decoder.*`` and
    ``network.segmentation_decoder.*`` (personal unless the method shares them),
    ``sa_representation`` (shared when the method uses it), ``*_critic.*`` (personal).
    """

    network: FedSRNetwork
    segmentation_critic: MutualInformationCritic
    registration_critic: MutualInformationCritic

    def __init__(self, config: FedSRConfig, method: FedSRMethod) -> None:
        """
        Args:
            config: the network's sizes.
            method: the method (what is used and shared).
        """
        super().__init__()
        self.config = config
        self.method = method
        self.network = FedSRNetwork(config, use_scie=method.use_scie)
        # Zeros until a site initialises it from the atlas (`FedSRUpdater.initialise_sa`). A parameter
        # without gradient, not a buffer: eq. 7 sets it, never the optimizer, and Fed-BioMed sends,
        # averages and checkpoints parameters whatever its buffer settings.
        self.sa_representation = nn.Parameter(torch.zeros(config.sa_dim), requires_grad=False)
        feature_width = self.network.segmentation_decoder.feature_width
        self.segmentation_critic = MutualInformationCritic(feature_width, config.sa_dim, hidden_dim=32)
        self.registration_critic = MutualInformationCritic(feature_width, config.sa_dim, hidden_dim=32)

    def sa_for_decoders(self) -> torch.Tensor:
        """The representation SCIE injects (zeros when the method has no SA representation)."""
        sa: torch.Tensor = self.sa_representation
        return sa if self.method.use_sa else torch.zeros_like(sa)


def is_shared_parameter(name: str, method: FedSRMethod) -> bool:
    """Whether a parameter or buffer of `FedSRModel` is sent to the coordinator and averaged.

    Args:
        name: a name of `FedSRModel.state_dict()`.
        method: the method.

    Returns:
        True for what the coordinator aggregates; False for what stays at the site.
    """
    if name.startswith("network.encoder."):
        return True
    if name == "sa_representation":
        return method.use_sa
    if name.startswith(("network.registration_decoder.", "network.segmentation_decoder.")):
        return method.share_decoders
    return False  # the MI critics: they score this site's features


@dataclass
class _Running:
    """Running sums of a round's loss terms and encoder summaries."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    summary_sum: torch.Tensor | None = None
    volumes: int = 0

    def add(self, parts: dict[str, float]) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {key: value / max(self.steps, 1) for key, value in self.sums.items()}


class FedSRUpdater:
    """One site's round of FedSR (or of a baseline): the loss of each update, then the round's end.

    Args:
        model: the site's model (the global shared parts already loaded).
        atlas_image: the atlas image (1, 1, D, H, W), intensities normalised like the site's volumes.
        atlas_label: the atlas labels (1, 1, D, H, W), schema class ids < num_classes.
        weights: the loss weights.
        alpha: eq. 7's smoothing coefficient of the SA representation (1: this round's only).
        finetune: the fine-tuning stage: the encoder is frozen (no gradient, nothing to send
            but the received encoder).

    Raises:
        ValueError: when the atlas does not match the model (shape or classes).
    """

    def __init__(
        self,
        model: FedSRModel,
        atlas_image: torch.Tensor,
        atlas_label: torch.Tensor,
        weights: FedSRLossWeights | None = None,
        alpha: float = 0.5,
        finetune: bool = False,
    ) -> None:
        if atlas_image.ndim != 5 or atlas_label.shape != atlas_image.shape or atlas_image.shape[:2] != (1, model.config.in_channels):
            raise ValueError(f"atlas image {tuple(atlas_image.shape)} and label {tuple(atlas_label.shape)} must both be (1, 1, D, H, W)")
        top = int(atlas_label.max())
        if top >= model.config.num_classes or int(atlas_label.min()) < 0:
            raise ValueError(f"atlas labels span 0..{top}; the model has {model.config.num_classes} classes")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.model = model
        self.atlas_image = atlas_image
        self.atlas_label = atlas_label.long()
        self.weights = weights or FedSRLossWeights()
        self.alpha = alpha
        self.finetune = finetune
        self.received_sa = model.sa_representation.detach().clone()
        self.memory: deque[torch.Tensor] = deque(maxlen=MEMORY_SIZE)
        self.running = _Running()
        set_encoder_frozen(model.network, finetune)

    def initialise_sa(self) -> bool:
        """f from the atlas (the paper's initialisation) when the model's f is still all zeros.

        Returns:
            Whether f was initialised now.
        """
        if not self.model.method.use_sa or bool(torch.any(self.model.sa_representation != 0)):
            return False
        with torch.no_grad():
            atlas_summary = encoder_summary(self.model.network.encoder(self.atlas_image.to(self.model.sa_representation.device)))[0]
        self.model.sa_representation.copy_(atlas_summary)
        self.received_sa = atlas_summary.detach().clone()
        return True

    def _mutual_information(self, critic: MutualInformationCritic, decoder_feature: torch.Tensor, summaries: torch.Tensor) -> torch.Tensor:
        """Jensen-Shannon MI estimate between decoder features and the same volumes' encoder
        summaries; negatives: other volumes of the batch and of the recent steps."""
        negatives = [summaries.roll(1, dims=0)] if summaries.shape[0] > 1 else []
        negatives += [m.to(summaries.device).expand(summaries.shape[0], -1) for m in self.memory]
        if not negatives:  # the round's first single-volume step: no negative yet
            return summaries.new_zeros(())
        joint = critic(decoder_feature, summaries)
        marginal = torch.cat([critic(decoder_feature, n) for n in negatives])
        return jensen_shannon_from_scores(joint, marginal)

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The loss of one joint registration-segmentation update on unlabelled volumes.

        Args:
            images: (B, 1, D, H, W) unlabelled volumes of the site, like the atlas.

        Returns:
            L_reg + L_seg, to back-propagate.

        Raises:
            ValueError: when the volumes and the atlas differ in shape.
        """
        model, method, weights = self.model, self.model.method, self.weights
        if images.shape[1:] != self.atlas_image.shape[1:]:
            raise ValueError(f"volumes {tuple(images.shape[1:])} and atlas {tuple(self.atlas_image.shape[1:])} differ in shape")
        batch = images.shape[0]
        atlas_image = self.atlas_image.to(images.device).expand(batch, -1, -1, -1, -1)
        atlas_label = self.atlas_label.to(images.device).expand(batch, -1, -1, -1, -1)
        out = model.network(images, atlas_image, model.sa_for_decoders())
        warped_image = warp_image(atlas_image, out.ddf)
        warped_probabilities = warp_label_soft(atlas_label, out.ddf, model.config.num_classes)
        pseudo_label = warped_probabilities.detach().argmax(dim=1, keepdim=True)
        zero = images.new_zeros(())
        mi_registration = mi_segmentation = zero
        if method.use_mi:
            mi_registration = self._mutual_information(model.registration_critic, out.registration_feature, out.encoder_summary)
            mi_segmentation = self._mutual_information(model.segmentation_critic, out.segmentation_feature, out.encoder_summary)
        loss_registration = registration_loss(out.ddf, warped_image, images, warped_probabilities, out.segmentation_logits.detach(), mi_registration, weights)
        loss_segmentation = segmentation_loss(out.segmentation_logits, pseudo_label, mi_segmentation, weights)
        summaries = out.encoder_summary.detach()
        for row in summaries:
            self.memory.append(row.unsqueeze(0))
        running = self.running
        running.summary_sum = summaries.sum(dim=0) if running.summary_sum is None else running.summary_sum + summaries.sum(dim=0)
        running.volumes += batch
        running.add(
            {
                "loss_registration": float(loss_registration.detach()),
                "loss_segmentation": float(loss_segmentation.detach()),
                "mi_registration": float(mi_registration.detach()),
                "mi_segmentation": float(mi_segmentation.detach()),
            }
        )
        total: torch.Tensor = loss_registration + loss_segmentation
        return total

    def finish_round(self) -> dict[str, float]:
        """The round's end: f <- (1 - alpha) f_received + alpha mean(f_1^p) (eq. 7); the encoder unfrozen.

        Returns:
            The round's mean loss terms, and ``sa_shift`` (how far f moved, L2).
        """
        model = self.model
        shift = 0.0
        if model.method.use_sa and self.running.summary_sum is not None and self.running.volumes:
            local = (self.running.summary_sum / self.running.volumes).to(self.received_sa.device)
            smoothed = smooth_sa_representation(self.received_sa, local, self.alpha)
            shift = float(torch.linalg.vector_norm(smoothed - self.received_sa))
            with torch.no_grad():
                model.sa_representation.copy_(smoothed)
        set_encoder_frozen(model.network, False)
        return {**self.running.means(), "sa_shift": shift, "steps": float(self.running.steps)}


@dataclass(frozen=True)
class RegistrationResult:
    """The atlas registered to one volume: field, warped atlas image and labels."""

    ddf: torch.Tensor
    warped_image: torch.Tensor
    warped_label: torch.Tensor


@torch.no_grad()
def segment_volume(model: FedSRModel, image: torch.Tensor) -> torch.Tensor:
    """The site's personalised segmentation of volumes (encoder + its segmentation decoder).

    Args:
        model: the site's model.
        image: (B, 1, D, H, W).

    Returns:
        Integer labels (B, 1, D, H, W).
    """
    model.eval()
    labels: torch.Tensor = model.network.segment(image, model.sa_for_decoders()).argmax(dim=1, keepdim=True)
    return labels


@torch.no_grad()
def register_atlas(model: FedSRModel, image: torch.Tensor, atlas_image: torch.Tensor, atlas_label: torch.Tensor) -> RegistrationResult:
    """Register the atlas to volumes with the site's registration decoder.

    Args:
        model: the site's model.
        image: (B, 1, D, H, W) target volumes.
        atlas_image: (1, 1, D, H, W).
        atlas_label: (1, 1, D, H, W) integer labels.

    Returns:
        The displacement field, the warped atlas image and the warped atlas labels (integer).
    """
    model.eval()
    batch = image.shape[0]
    atlas_image = atlas_image.to(image.device).expand(batch, -1, -1, -1, -1)
    atlas_label = atlas_label.to(image.device).long().expand(batch, -1, -1, -1, -1)
    out = model.network(image, atlas_image, model.sa_for_decoders())
    return RegistrationResult(
        ddf=out.ddf,
        warped_image=warp_image(atlas_image, out.ddf),
        warped_label=warp_label(atlas_label, out.ddf, model.config.num_classes),
    )
