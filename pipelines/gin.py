"""Global Intensity Non-linear augmentation (GIN, Ouyang et al., IEEE TMI 2022) as MONAI transforms (no FL imports).

`GINAugmentation` (array) and `GINAugmentationd` (dictionary, image keys only) remap intensities through a
fresh random shallow conv network, keeping the anatomy. How and why: docs/design/augmentation.md.
"""

from __future__ import annotations

from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config.type_definitions import KeysCollection
from monai.data.meta_tensor import MetaTensor
from monai.transforms.transform import MapTransform, RandomizableTransform
from monai.utils.enums import TransformBackends
from monai.utils.type_conversion import convert_to_dst_type

# The argument checks import neither torch nor MONAI (spec checks); their names stay importable here.
from pipelines.gin_args import (
    DEFAULTS,
    _check_alpha,
    _check_channels,
    _check_kernel_sizes,
    _check_n_layers,
    _check_prob,
    _check_slope,
    parse_gin_args,
)

__all__ = [
    "DEFAULTS",
    "GINAugmentation",
    "GINAugmentationd",
    "_check_alpha",
    "_check_channels",
    "_check_kernel_sizes",
    "_check_n_layers",
    "_check_prob",
    "_check_slope",
    "parse_gin_args",
]

# --------------------------------------------------------------------------- transforms


class GINAugmentation(RandomizableTransform):
    """GIN on one channel-first image ``(C, X, Y)`` or ``(C, X, Y, Z)``.

    Accepts a torch tensor, a MONAI MetaTensor (meta data and affine kept) or a numpy array
    of a floating dtype, and returns the same type, shape and dtype (computation in float32).

    Args:
        prob: probability of applying GIN on a call (MONAI-style default 0.5; the paper
            augments every image, i.e. ``prob=1``).
        alpha: ``(low, high)`` within [0, 1]: the blend weight of the network output is drawn
            uniformly from it per call (the augmentation strength; 0 = the input).
        n_layers: number of convolutions, an int or an inclusive ``(min, max)`` range drawn per
            call. 1 gives a single random local affine map (no non-linearity).
        channels: intermediate channels of the random network.
        kernel_sizes: odd kernel sizes, one drawn per layer and call.
        negative_slope: leaky ReLU slope between layers (0.2 here; the authors' code uses
            torch's default 0.01, which bends the mapping more sharply).

    ``randomize=False`` in ``__call__`` reuses the last drawn network and alpha.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        prob: float = DEFAULTS["prob"],
        alpha: Sequence[float] = DEFAULTS["alpha"],
        n_layers: int | Sequence[int] = DEFAULTS["n_layers"],
        channels: int = DEFAULTS["channels"],
        kernel_sizes: Sequence[int] = DEFAULTS["kernel_sizes"],
        negative_slope: float = DEFAULTS["negative_slope"],
    ):
        RandomizableTransform.__init__(self, _check_prob(prob, "prob"))
        self.alpha = _check_alpha(alpha, "alpha")
        layers = _check_n_layers(n_layers, "n_layers")
        self.n_layers = (layers, layers) if isinstance(layers, int) else layers
        self.channels = _check_channels(channels, "channels")
        self.kernel_sizes = _check_kernel_sizes(kernel_sizes, "kernel_sizes")
        self.negative_slope = _check_slope(negative_slope, "negative_slope")
        self._alpha: float | None = None
        self._kernels: tuple[int, ...] = ()
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply GIN and, if so, a new network (layers, kernel sizes, weights seed) and alpha.

        Args:
            data: not used (MONAI's signature).
        """
        super().randomize(None)
        if not self._do_transform:
            return
        n = int(self.R.randint(self.n_layers[0], self.n_layers[1] + 1))
        self._kernels = tuple(int(k) for k in self.R.choice(self.kernel_sizes, size=n))
        self._alpha = float(self.R.uniform(self.alpha[0], self.alpha[1]))
        self._seed = int(self.R.randint(0, 2**31 - 1))  # for the weights (torch.Generator)

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        """The random network on ``x`` (1, C, *spatial), float32."""
        conv = F.conv2d if x.dim() == 4 else F.conv3d
        spatial = x.dim() - 2
        gen = torch.Generator().manual_seed(self._seed)  # CPU draws: same weights on any device
        c_in = c_image = x.shape[1]
        for i, k in enumerate(self._kernels):
            last = i == len(self._kernels) - 1
            c_out = c_image if last else self.channels
            weight = torch.randn((c_out, c_in, *([k] * spatial)), generator=gen).to(x.device)
            bias = torch.randn((c_out,), generator=gen).to(x.device)
            if k > 1:
                # replicate, not zeros: a zero frame would paint a fake edge along the patch border
                x = F.pad(x, [k // 2] * (2 * spatial), mode="replicate")
            x = conv(x, weight, bias)
            if not last:
                x = F.leaky_relu(x, self.negative_slope)
            c_in = c_out
        return x

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        """Remap the intensities of `img` through the random network.

        Args:
            img: a channel-first floating-point image (tensor, MetaTensor or numpy array).
            randomize: draw a new network first (False: reuse the last one).

        Returns:
            The augmented image, of the input's type, shape and dtype (the input itself when not applied).

        Raises:
            ValueError: not a (C, X, Y) or (C, X, Y, Z) image, or not floating point.
            RuntimeError: ``randomize=False`` before any network was drawn.
        """
        if randomize:
            self.randomize(None)
        if not self._do_transform:
            return img
        if self._alpha is None:
            raise RuntimeError("GINAugmentation: randomize=False before any network was drawn")
        if img.ndim not in (3, 4):
            raise ValueError(f"GINAugmentation: expected a channel-first image (C, X, Y) or (C, X, Y, Z), got shape {tuple(img.shape)}")
        floating = img.dtype.is_floating_point if isinstance(img, torch.Tensor) else np.issubdtype(img.dtype, np.floating)
        if not floating:
            # remapped intensities are real numbers; rounding them back would be a silent loss
            raise ValueError(f"GINAugmentation: needs a floating-point image, got {img.dtype} (labels must not go through GIN)")
        x = torch.as_tensor(np.ascontiguousarray(img)) if isinstance(img, np.ndarray) else img
        x = (x.as_tensor() if isinstance(x, MetaTensor) else x).detach().to(torch.float32)
        in_norm = torch.linalg.vector_norm(x)
        if not in_norm > 0:  # zero (or empty) image: nothing to rescale to
            return img
        with torch.no_grad():
            out = self._network(x.unsqueeze(0))[0]
            mixed = self._alpha * out + (1.0 - self._alpha) * x
            mixed_norm = torch.linalg.vector_norm(mixed)
            if not mixed_norm > 0:  # degenerate draw (all zero): keep the image
                return img
            mixed = mixed * (in_norm / mixed_norm)
        return convert_to_dst_type(mixed, dst=img, dtype=img.dtype)[0]


class GINAugmentationd(MapTransform, RandomizableTransform):
    """Dictionary form of `GINAugmentation`: one network and alpha drawn per call, applied to
    every key in ``keys`` (several images of one case get the same intensity mapping, when
    they have the same number of channels). ``keys`` must name images only, never labels:
    GIN remaps values. Other keys pass through as the same objects.

    Args:
        keys: the image keys.
        prob: probability of applying GIN on a call.
        alpha, n_layers, channels, kernel_sizes, negative_slope: as for `GINAugmentation`.
        allow_missing_keys: skip keys absent from a case instead of failing.
    """

    backend = GINAugmentation.backend

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = DEFAULTS["prob"],
        alpha: Sequence[float] = DEFAULTS["alpha"],
        n_layers: int | Sequence[int] = DEFAULTS["n_layers"],
        channels: int = DEFAULTS["channels"],
        kernel_sizes: Sequence[int] = DEFAULTS["kernel_sizes"],
        negative_slope: float = DEFAULTS["negative_slope"],
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, _check_prob(prob, "prob"))
        # the prob draw happens here, so the inner transform always applies
        self.gin = GINAugmentation(1.0, alpha, n_layers, channels, kernel_sizes, negative_slope)
        self.gin.set_random_state(state=self.R)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> GINAugmentationd:
        """Seed the transform; the inner `GINAugmentation` shares its random stream.

        Args:
            seed: a seed for a new stream.
            state: a stream to use instead.

        Returns:
            This transform.
        """
        super().set_random_state(seed, state)
        # one shared stream: the prob draw and the network draws do not repeat each other
        self.gin.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any = None) -> None:
        """Draw whether to apply GIN on this call and, if so, the network and alpha.

        Args:
            data: not used (MONAI's signature).
        """
        super().randomize(None)
        if self._do_transform:
            self.gin.randomize(None)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Apply one drawn network to every image key.

        Args:
            data: a case; ``keys`` must name images.

        Returns:
            A new dict with the image keys augmented and the others unchanged.
        """
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.gin(d[key], randomize=False)
        return d
