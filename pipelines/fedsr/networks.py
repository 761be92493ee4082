"""FedSR networks: shared 3D encoder, registration and segmentation decoders, SCIE, warping.

The encoder E is shared across sites (federated); the two decoders are personal (they stay at
a site). Both decoders have the same architecture: a U-Net-style upsampling path over the
encoder's multi-scale features, with the site-common information enhancer (SCIE) injecting the
site-aggregated (SA) representation at the 1/4-resolution scale, where the decoder's feature
f_d1 (3x3x3 conv) is also globally pooled for the mutual-information term. The registration
decoder reads [eps_u, eps_a] (unlabelled and atlas features concatenated per scale) and outputs
a dense displacement field (or a velocity field integrated by MONAI's `DVF2DDF`); the
segmentation decoder reads eps_u and outputs class logits. Method: shared/notes/fedsr-method.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks.warp import DVF2DDF, Warp
from torch import nn

__all__ = [
    "FEDSR_PRESETS",
    "FedSRConfig",
    "SharedEncoder",
    "SiteCommonInformationEnhancer",
    "FedSRDecoder",
    "DecoderOutput",
    "FedSRNetwork",
    "FedSROutput",
    "encoder_summary",
    "fedsr_config",
    "set_encoder_frozen",
    "warp_image",
    "warp_label",
    "warp_label_soft",
]

logger = logging.getLogger(__name__)

SPATIAL_DIMS = 3
N_SCALES = 4  # full, 1/2, 1/4, 1/8 resolution
SCIE_SCALE_INDEX = 2  # the 1/4-resolution scale (the paper's f1), where SCIE and the MI feature sit


@dataclass(frozen=True)
class FedSRConfig:
    """Sizes of the FedSR network.

    Args:
        in_channels: image channels (1 for T1 MRI).
        num_classes: segmentation classes, background included.
        channels: encoder channels at full, 1/2, 1/4 and 1/8 resolution.
        sa_dim: length of the site-aggregated (SA) representation vector.
        integrate_velocity: the registration decoder outputs a velocity field that
            `DVF2DDF` integrates (scaling and squaring) into the displacement field.
        integration_steps: scaling-and-squaring steps when `integrate_velocity`.
    """

    in_channels: int = 1
    num_classes: int = 14
    channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    sa_dim: int = 64
    integrate_velocity: bool = False
    integration_steps: int = 7

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_classes < 2 or self.sa_dim < 1:
            raise ValueError(f"FedSRConfig: in_channels >= 1, num_classes >= 2 and sa_dim >= 1 are needed, got {self}")
        if len(self.channels) != N_SCALES or any(c < 1 for c in self.channels):
            raise ValueError(f"FedSRConfig: channels must be {N_SCALES} positive widths, got {self.channels}")
        if self.integration_steps < 1:
            raise ValueError(f"FedSRConfig: integration_steps must be >= 1, got {self.integration_steps}")
        if self.sa_dim != self.channels[SCIE_SCALE_INDEX]:
            # the SA representation is a pooled 1/4-scale encoder feature (pipelines.fedsr.training)
            raise ValueError(
                f"FedSRConfig: sa_dim must equal the 1/4-scale width channels[{SCIE_SCALE_INDEX}] = {self.channels[SCIE_SCALE_INDEX]}, got {self.sa_dim}"
            )


# `tiny`: CPU tests on 32^3 volumes. `paper`: the paper gives no widths; these are the usual
# VoxelMorph/DeepAtlas-scale widths for 128^3 brain volumes with 13 structures + background.
FEDSR_PRESETS: dict[str, FedSRConfig] = {
    "tiny": FedSRConfig(in_channels=1, num_classes=3, channels=(4, 8, 8, 16), sa_dim=8),
    "small": FedSRConfig(in_channels=1, num_classes=14, channels=(8, 16, 32, 64), sa_dim=32),
    "paper": FedSRConfig(in_channels=1, num_classes=14, channels=(16, 32, 64, 128), sa_dim=64),
}


def fedsr_config(size: str) -> FedSRConfig:
    """The preset configuration named `size`.

    Args:
        size: one of the keys of `FEDSR_PRESETS` (`tiny`, `small`, `paper`).

    Returns:
        The preset configuration.

    Raises:
        ValueError: when `size` names no preset.
    """
    if size not in FEDSR_PRESETS:
        raise ValueError(f"unknown FedSR size {size!r}; known: {sorted(FEDSR_PRESETS)}")
    return FEDSR_PRESETS[size]


def _conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """Two 3x3x3 convolutions with instance norm and leaky ReLU; the first one may downsample."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1),
        nn.InstanceNorm3d(out_channels, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
    )


class SharedEncoder(nn.Module):
    """The shared encoder E: multi-scale features of one image at full, 1/2, 1/4, 1/8 resolution."""

    def __init__(self, config: FedSRConfig) -> None:
        super().__init__()
        widths = config.channels
        self.stages = nn.ModuleList(
            [_conv_block(config.in_channels, widths[0])] + [_conv_block(widths[i - 1], widths[i], stride=2) for i in range(1, N_SCALES)]
        )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Encode an image.

        Args:
            image: (B, in_channels, D, H, W); each spatial size divisible by 8.

        Returns:
            The features, finest first: (B, channels[i], D / 2^i, H / 2^i, W / 2^i) for i = 0..3.

        Raises:
            ValueError: when a spatial size is not divisible by 8.
        """
        factor = 2 ** (N_SCALES - 1)
        if image.ndim != 5 or any(size % factor for size in image.shape[2:]):
            raise ValueError(f"SharedEncoder: a (B, C, D, H, W) image with sizes divisible by {factor} is needed, got {tuple(image.shape)}")
        features: list[torch.Tensor] = []
        hidden = image
        for stage in self.stages:
            hidden = stage(hidden)
            features.append(hidden)
        return features


class SiteCommonInformationEnhancer(nn.Module):
    """SCIE: FiLM-style modulation of a decoder feature by the SA representation.

    The paper gives no architecture; this follows the note's faithful reading: a linear map of
    the SA representation f gives a channel-wise scale gamma and shift beta, and the feature
    becomes x * (1 + gamma) + beta. The map starts at zero, so SCIE starts as the identity and
    the SA representation's influence is learnt.
    """

    def __init__(self, sa_dim: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.to_scale_and_shift = nn.Linear(sa_dim, 2 * channels)
        nn.init.zeros_(self.to_scale_and_shift.weight)
        nn.init.zeros_(self.to_scale_and_shift.bias)

    def forward(self, feature: torch.Tensor, sa_representation: torch.Tensor) -> torch.Tensor:
        """Modulate `feature` channel-wise.

        Args:
            feature: (B, channels, D, H, W).
            sa_representation: (B, sa_dim), or (sa_dim,) shared by the batch.

        Returns:
            The modulated feature, same shape as `feature`.
        """
        representation = _batched_representation(sa_representation, feature.shape[0])
        scale, shift = self.to_scale_and_shift(representation).chunk(2, dim=1)
        view = (feature.shape[0], self.channels, 1, 1, 1)
        modulated: torch.Tensor = feature * (1.0 + scale.reshape(view)) + shift.reshape(view)
        return modulated


def _batched_representation(sa_representation: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The SA representation as (B, sa_dim): a single vector is shared by the whole batch."""
    if sa_representation.ndim == 1:
        return sa_representation.unsqueeze(0).expand(batch_size, -1)
    if sa_representation.ndim != 2 or sa_representation.shape[0] != batch_size:
        raise ValueError(f"SA representation must be (sa_dim,) or ({batch_size}, sa_dim), got {tuple(sa_representation.shape)}")
    return sa_representation


class DecoderOutput(NamedTuple):
    """What a FedSR decoder returns: its output map and the pooled 1/4-scale feature f_d1^p."""

    output: torch.Tensor
    pooled_feature: torch.Tensor


class FedSRDecoder(nn.Module):
    """A FedSR decoder (registration and segmentation decoders share this architecture).

    Upsampling path from the coarsest encoder scale, with skip connections; at 1/4 resolution
    a 3x3x3 convolution gives f_d1, whose global average pool is returned for the MI term, and
    SCIE injects the SA representation into f_d1 before the path goes on to full resolution.
    """

    def __init__(
        self,
        skip_channels: Sequence[int],
        out_channels: int,
        sa_dim: int,
        widths: Sequence[int] | None = None,
        zero_init_head: bool = False,
        use_scie: bool = True,
    ) -> None:
        """
        Args:
            skip_channels: channels of the input features at full, 1/2, 1/4, 1/8 resolution
                (doubled for the registration decoder, which reads [eps_u, eps_a]).
            out_channels: output channels (3 for a field, num_classes for logits).
            sa_dim: length of the SA representation.
            widths: the decoder's own channels at full, 1/2 and 1/4 resolution (a fourth entry,
                the coarsest, is ignored); None uses `skip_channels`. Both FedSR decoders use the
                encoder's widths, so their pooled features have the same length.
            zero_init_head: start the output convolution at zero (a registration decoder then
                starts from the identity transform).
            use_scie: False leaves f_d1 unmodulated (the "without SCIE" ablation, FedRep, FedAvg).

        Raises:
            ValueError: when `skip_channels` or `widths` does not have one width per scale.
        """
        super().__init__()
        skips = list(skip_channels)
        decoder_widths = skips if widths is None else list(widths)
        if len(skips) != N_SCALES or len(decoder_widths) != N_SCALES:
            raise ValueError(f"FedSRDecoder: {N_SCALES} skip and decoder widths are needed, got {skips} and {decoder_widths}")
        self.up_blocks = nn.ModuleList()
        current = skips[-1]
        for level in range(N_SCALES - 2, -1, -1):
            self.up_blocks.append(_conv_block(current + skips[level], decoder_widths[level]))
            current = decoder_widths[level]
        self.feature_width = decoder_widths[SCIE_SCALE_INDEX]
        self.feature_conv = nn.Conv3d(self.feature_width, self.feature_width, kernel_size=3, padding=1)
        self.scie = SiteCommonInformationEnhancer(sa_dim, self.feature_width)
        self.use_scie = use_scie
        self.head = nn.Conv3d(decoder_widths[0], out_channels, kernel_size=3, padding=1)
        if zero_init_head:
            nn.init.zeros_(self.head.weight)
            if self.head.bias is not None:
                nn.init.zeros_(self.head.bias)

    def forward(self, features: Sequence[torch.Tensor], sa_representation: torch.Tensor) -> DecoderOutput:
        """Decode multi-scale features.

        Args:
            features: finest first, one per scale, channels as `skip_channels`.
            sa_representation: (B, sa_dim) or (sa_dim,).

        Returns:
            The full-resolution output (B, out_channels, D, H, W) and f_d1^p (B, feature_width).

        Raises:
            ValueError: when the number of feature maps is not one per scale.
        """
        if len(features) != N_SCALES:
            raise ValueError(f"FedSRDecoder: {N_SCALES} feature maps are needed, got {len(features)}")
        hidden = features[-1]
        pooled_feature: torch.Tensor | None = None
        for block, level in zip(self.up_blocks, range(N_SCALES - 2, -1, -1), strict=True):
            skip = features[level]
            hidden = F.interpolate(hidden, size=skip.shape[2:], mode="trilinear", align_corners=False)
            hidden = block(torch.cat([hidden, skip], dim=1))
            if level == SCIE_SCALE_INDEX:
                decoder_feature = self.feature_conv(hidden)
                pooled_feature = decoder_feature.mean(dim=(2, 3, 4))
                hidden = self.scie(decoder_feature, sa_representation) if self.use_scie else decoder_feature
        if pooled_feature is None:  # pragma: no cover - the loop always passes SCIE_SCALE_INDEX
            raise RuntimeError("FedSRDecoder: the SCIE scale was never reached")
        output: torch.Tensor = self.head(hidden)
        return DecoderOutput(output=output, pooled_feature=pooled_feature)


class FedSROutput(NamedTuple):
    """One joint registration-segmentation pass.

    ddf: displacement field (B, 3, D, H, W) taking the atlas onto the unlabelled image, in voxels.
    segmentation_logits: (B, num_classes, D, H, W) for the unlabelled image.
    registration_feature / segmentation_feature: the decoders' pooled f_d1^p, for the MI term.
    encoder_summary: the unlabelled image's globally pooled 1/4-scale encoder feature (B, sa_dim):
        what a site's SA representation summarises, and the MI term's other side.
    """

    ddf: torch.Tensor
    segmentation_logits: torch.Tensor
    registration_feature: torch.Tensor
    segmentation_feature: torch.Tensor
    encoder_summary: torch.Tensor


class FedSRNetwork(nn.Module):
    """Shared encoder plus the personal registration and segmentation decoders."""

    def __init__(self, config: FedSRConfig, use_scie: bool = True) -> None:
        """
        Args:
            config: the network's sizes.
            use_scie: whether the decoders inject the SA representation (False: the ablation).
        """
        super().__init__()
        self.config = config
        self.encoder = SharedEncoder(config)
        widths = list(config.channels)
        self.registration_decoder = FedSRDecoder([2 * w for w in widths], SPATIAL_DIMS, config.sa_dim, widths=widths, zero_init_head=True, use_scie=use_scie)
        self.segmentation_decoder = FedSRDecoder(widths, config.num_classes, config.sa_dim, use_scie=use_scie)
        self.velocity_integrator: DVF2DDF | None = DVF2DDF(num_steps=config.integration_steps) if config.integrate_velocity else None

    def forward(self, unlabelled_image: torch.Tensor, atlas_image: torch.Tensor, sa_representation: torch.Tensor) -> FedSROutput:
        """Register the atlas to the unlabelled image and segment the unlabelled image.

        Args:
            unlabelled_image: X_u, (B, in_channels, D, H, W).
            atlas_image: X_a, (B, in_channels, D, H, W) or (1, in_channels, D, H, W) shared by the batch.
            sa_representation: the site's SA representation, (sa_dim,) or (B, sa_dim).

        Returns:
            The displacement field, segmentation logits and both pooled decoder features.

        Raises:
            ValueError: when the two images' shapes do not match.
        """
        if atlas_image.shape[0] == 1 and unlabelled_image.shape[0] > 1:
            atlas_image = atlas_image.expand(unlabelled_image.shape[0], -1, -1, -1, -1)
        if atlas_image.shape != unlabelled_image.shape:
            raise ValueError(f"atlas {tuple(atlas_image.shape)} and unlabelled image {tuple(unlabelled_image.shape)} differ in shape")
        unlabelled_features = self.encoder(unlabelled_image)
        atlas_features = self.encoder(atlas_image)
        paired = [torch.cat([u, a], dim=1) for u, a in zip(unlabelled_features, atlas_features, strict=True)]
        registration = self.registration_decoder(paired, sa_representation)
        segmentation = self.segmentation_decoder(unlabelled_features, sa_representation)
        ddf = registration.output
        if self.velocity_integrator is not None:
            ddf = self.velocity_integrator(ddf)
        return FedSROutput(
            ddf=ddf,
            segmentation_logits=segmentation.output,
            registration_feature=registration.pooled_feature,
            segmentation_feature=segmentation.pooled_feature,
            encoder_summary=encoder_summary(unlabelled_features),
        )

    def segment(self, image: torch.Tensor, sa_representation: torch.Tensor) -> torch.Tensor:
        """Segmentation logits of an image, without the atlas (what a site deploys).

        Args:
            image: (B, in_channels, D, H, W).
            sa_representation: (sa_dim,) or (B, sa_dim).

        Returns:
            Logits (B, num_classes, D, H, W).
        """
        logits: torch.Tensor = self.segmentation_decoder(self.encoder(image), sa_representation).output
        return logits


def encoder_summary(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The globally pooled 1/4-scale encoder feature: (B, channels[2]) = (B, sa_dim).

    Args:
        features: the encoder's features, finest first.

    Returns:
        The pooled feature of each image of the batch.
    """
    return features[SCIE_SCALE_INDEX].mean(dim=(2, 3, 4))


def set_encoder_frozen(network: FedSRNetwork, frozen: bool) -> None:
    """Freeze or unfreeze the shared encoder (the decoder fine-tuning phase freezes it).

    Args:
        network: the FedSR network.
        frozen: True stops gradients reaching the encoder's parameters.
    """
    for parameter in network.encoder.parameters():
        parameter.requires_grad_(not frozen)
    logger.debug("FedSR encoder %s", "frozen" if frozen else "trainable")


def warp_image(image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Warp an image by a displacement field, bilinearly (border padding).

    Args:
        image: (B, C, D, H, W).
        ddf: (B, 3, D, H, W) displacement in voxels.

    Returns:
        The warped image, same shape as `image`.
    """
    warper = Warp(mode="bilinear", padding_mode="border")  # type: ignore[no-untyped-call]  # MONAI's Warp.__init__ has no annotations
    warped: torch.Tensor = warper(image, ddf)
    return warped


def warp_label_soft(label: torch.Tensor, ddf: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Warp an integer label map as one-hot channels, bilinearly: differentiable in the field.

    Args:
        label: (B, 1, D, H, W) integer labels in [0, num_classes).
        ddf: (B, 3, D, H, W) displacement in voxels.
        num_classes: number of classes, background included.

    Returns:
        Class probabilities (B, num_classes, D, H, W) that sum to 1 per voxel.

    Raises:
        ValueError: when `label` is not a single-channel map.
    """
    if label.ndim != 5 or label.shape[1] != 1:
        raise ValueError(f"a (B, 1, D, H, W) label map is needed, got {tuple(label.shape)}")
    one_hot = F.one_hot(label[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).to(ddf.dtype)
    return warp_image(one_hot, ddf)


def warp_label(label: torch.Tensor, ddf: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Warp an integer label map: one-hot, bilinear warping, then argmax, so labels stay integer.

    Args:
        label: (B, 1, D, H, W) integer labels in [0, num_classes).
        ddf: (B, 3, D, H, W) displacement in voxels.
        num_classes: number of classes, background included.

    Returns:
        The warped labels (B, 1, D, H, W), int64; a zero field returns `label` unchanged.
    """
    return warp_label_soft(label, ddf, num_classes).argmax(dim=1, keepdim=True)
