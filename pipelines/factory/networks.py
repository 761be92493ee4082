"""The data factory's networks: conditional StyleGAN2-style generator and projection discriminator
(single channel, pure PyTorch), importable from one place.

They live in `layers` (building blocks), `conditioning` (client id, slice bin, domain key),
`synthesis`, `generator` and `discriminator`; this module re-exports what plans, the adaptation and tests
use. Architecture, conditioning, resampling and measured sizes: docs/design/data-factory.md.
"""

from __future__ import annotations

from pipelines.factory.conditioning import ConditionEmbedding, label_onehot
from pipelines.factory.config import PRESETS, FactoryConfig, preset_values
from pipelines.factory.discriminator import Discriminator, DiscriminatorBlock, minibatch_stddev
from pipelines.factory.generator import Generator, MappingNetwork
from pipelines.factory.layers import (
    LRELU_GAIN,
    LRELU_SLOPE,
    Blur,
    Downsample,
    EqualConv2d,
    EqualLinear,
    PixelNorm,
    Upsample,
    blur2d,
    blur_kernel,
    count_parameters,
    downsample2d,
    lrelu,
    pixel_norm,
    requires_grad,
    upsample2d,
)
from pipelines.factory.synthesis import NOISE_SEED, ModulatedConv2d, SynthesisBlock, SynthesisLayer, SynthesisNetwork, ToRGB

__all__ = [
    "FactoryConfig",
    "PRESETS",
    "preset_values",
    "Generator",
    "Discriminator",
    "DiscriminatorBlock",
    "MappingNetwork",
    "SynthesisNetwork",
    "SynthesisBlock",
    "SynthesisLayer",
    "ToRGB",
    "ConditionEmbedding",
    "EqualLinear",
    "EqualConv2d",
    "ModulatedConv2d",
    "Blur",
    "Upsample",
    "Downsample",
    "upsample2d",
    "downsample2d",
    "blur_kernel",
    "blur2d",
    "pixel_norm",
    "PixelNorm",
    "lrelu",
    "minibatch_stddev",
    "label_onehot",
    "requires_grad",
    "count_parameters",
    "NOISE_SEED",
    "LRELU_GAIN",
    "LRELU_SLOPE",
]
