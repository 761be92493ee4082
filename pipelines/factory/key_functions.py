"""Key functions of the data factory's domain key: a frozen random CNN, a soft intensity histogram,
their concatenation, and an approved TorchScript encoder; each maps images to unit vectors.

`pipelines.factory.domain_key` centres them against a site-independent reference; design:
docs/design/data-factory.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.artifact_approval import ApprovalStore, ArtifactUnavailable, load_approved_bytes
from pipelines.factory.key_config import KeyConfigError

__all__ = ["EPS", "ConcatKey", "KeyFunction", "RandomCNNKey", "SoftHistogramKey", "TorchScriptKey", "canonical_json", "check_images"]

EPS = 1e-8  # keeps normalisations and square roots finite (and their gradients) on flat inputs


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON bytes of ``obj`` (sorted keys, no spaces), for checksums.

    Args:
        obj: a JSON-serialisable value.

    Returns:
        UTF-8 JSON bytes.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def check_images(images: Tensor) -> Tensor:
    """Check a batch of single-channel images, as float32.

    Args:
        images: (B, 1, H, W) images.

    Returns:
        ``images``, converted to float32 when needed.

    Raises:
        TypeError: not a tensor.
        ValueError: not (B, 1, H, W).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (B, 1, H, W), got shape {tuple(images.shape)}")
    return images if images.dtype == torch.float32 else images.float()


class KeyFunction(nn.Module):
    """Base of all key functions: frozen (no parameter requires grad) and always in eval mode.

    `embed` maps (B, 1, H, W) images in [-1, 1] to (B, dim) unit vectors and is
    differentiable with respect to the images.
    """

    dim: int

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> KeyFunction:  # noqa: ARG002 - frozen: always eval
        """Stay in eval mode whatever ``mode`` asks (a key function is frozen).

        Args:
            mode: ignored.

        Returns:
            This key function.
        """
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        """Same as `embed`."""
        return self.embed(images)

    def embed(self, images: Tensor) -> Tensor:
        """Embed images; differentiable with respect to them.

        Args:
            images: (B, 1, H, W) images in [-1, 1].

        Returns:
            (B, dim) unit vectors.

        Raises:
            TypeError: ``images`` is not a tensor.
            ValueError: ``images`` is not (B, 1, H, W).
        """
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The configuration (JSON-serialisable; part of the checksum), ``kind`` first."""
        raise NotImplementedError

    def checksum(self) -> str:
        """sha256 over the configuration and every weight (name, shape, float32 bytes, in order)."""
        h = hashlib.sha256()
        h.update(canonical_json(self.describe()))
        for name, t in self.state_dict().items():
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(name.encode() + b"\0")
            h.update(canonical_json(list(t.shape)))
            h.update(t.numpy().tobytes())
        return h.hexdigest()


class RandomCNNKey(KeyFunction):
    """A frozen, seeded, randomly initialised CNN shared by all sites.

    Each stage is a 3x3 stride-2 convolution followed by a leaky ReLU. The features are the
    per-channel spatial mean and std of every stage, concatenated, then mapped by a fixed
    seeded random projection to `proj_dim` and L2-normalised. All randomness comes from a
    local `torch.Generator(seed)`: building one never touches the global RNG.

    Args:
        seed: seed of the weights and the projection.
        widths: output channels of each stage.
        proj_dim: the embedding size.

    Raises:
        ValueError: empty or non-positive widths, or a non-positive ``proj_dim``.
    """

    _SLOPE = 0.2
    projection: Tensor

    def __init__(self, seed: int = 0, widths: Sequence[int] = (16, 32, 64), proj_dim: int = 64):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths}")
        if int(proj_dim) < 1:
            raise ValueError(f"proj_dim must be positive, got {proj_dim}")
        self.seed = int(seed)
        self.widths = widths
        self.proj_dim = self.dim = int(proj_dim)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        gain = math.sqrt(2.0 / (1.0 + self._SLOPE**2))
        convs = []
        c_in = 1
        for w in widths:
            # skip_init: nn.Conv2d's own initialisation would draw from the global RNG.
            conv: nn.Conv2d = nn.utils.skip_init(nn.Conv2d, c_in, w, 3, stride=2, padding=1)  # type: ignore[no-untyped-call]  # torch leaves skip_init unannotated
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (gain / math.sqrt(c_in * 9)))
                assert conv.bias is not None  # nn.Conv2d's default bias=True
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            convs.append(conv)
            c_in = w
        self.convs = nn.ModuleList(convs)
        feat_dim = 2 * sum(widths)
        self.register_buffer("projection", torch.randn(feat_dim, self.dim, generator=g) / math.sqrt(feat_dim))
        self._freeze()

    def features(self, images: Tensor) -> Tensor:
        """Per-stage channel means and stds, before the projection.

        Args:
            images: (B, 1, H, W) images in [-1, 1].

        Returns:
            (B, 2 * sum(widths)) features.
        """
        x = check_images(images)
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), self._SLOPE)
            mean = x.mean(dim=(2, 3))
            var = x.var(dim=(2, 3), unbiased=False) if x.shape[2] * x.shape[3] > 1 else torch.zeros_like(mean)
            feats += [mean, torch.sqrt(var + EPS)]  # eps: finite gradient where a channel is flat
        return torch.cat(feats, dim=1)

    def embed(self, images: Tensor) -> Tensor:
        """Project the `features` and L2-normalise them (see `KeyFunction.embed`)."""
        return F.normalize(self.features(images) @ self.projection, dim=1, eps=EPS)

    def describe(self) -> dict[str, Any]:
        """``{"kind": "random_cnn", "seed", "widths", "proj_dim"}``."""
        return {"kind": "random_cnn", "seed": self.seed, "widths": list(self.widths), "proj_dim": self.proj_dim}


class SoftHistogramKey(KeyFunction):
    """A differentiable intensity histogram.

    Each pixel is softly assigned to `bins` Gaussian bins centred evenly on [lo, hi]
    (bandwidth defaults to the bin spacing; the assignment sums to one per pixel, so values
    outside [lo, hi] go to the edge bins). The per-image histogram sums to one; the
    embedding is its square root (Hellinger), L2-normalised.

    Args:
        bins: number of bins (>= 2).
        lo: centre of the first bin.
        hi: centre of the last bin.
        bandwidth: the Gaussians' standard deviation (default: the bin spacing).

    Raises:
        ValueError: fewer than 2 bins, lo >= hi or a non-positive bandwidth.
    """

    centres: Tensor

    def __init__(self, bins: int = 32, lo: float = -1.0, hi: float = 1.0, bandwidth: float | None = None):
        super().__init__()
        bins = int(bins)
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        if not float(lo) < float(hi):
            raise ValueError(f"lo must be < hi, got lo={lo}, hi={hi}")
        if bandwidth is not None and not float(bandwidth) > 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        self.bins = self.dim = bins
        self.lo, self.hi = float(lo), float(hi)
        self.bandwidth = None if bandwidth is None else float(bandwidth)
        self._bw = self.bandwidth if self.bandwidth is not None else (self.hi - self.lo) / (bins - 1)
        self.register_buffer("centres", torch.linspace(self.lo, self.hi, bins))
        self._freeze()

    def histogram(self, images: Tensor) -> Tensor:
        """Soft intensity histograms.

        Args:
            images: (B, 1, H, W) images.

        Returns:
            (B, bins) histograms, each summing to one.
        """
        x = check_images(images).flatten(1)  # (B, N)
        n = x.shape[1]
        out = torch.zeros(x.shape[0], self.bins, dtype=x.dtype, device=x.device)
        step = max(1, (1 << 20) // (self.bins * max(1, x.shape[0])))  # bound the (B, n, bins) temporary
        for i in range(0, n, step):
            d = (x[:, i : i + step, None] - self.centres) / self._bw
            out = out + torch.softmax(-0.5 * d * d, dim=2).sum(dim=1)
        return out / n

    def embed(self, images: Tensor) -> Tensor:
        """The square root of the `histogram`, L2-normalised (see `KeyFunction.embed`)."""
        return F.normalize(torch.sqrt(self.histogram(images) + EPS), dim=1, eps=EPS)

    def describe(self) -> dict[str, Any]:
        """``{"kind": "histogram", "bins", "lo", "hi", "bandwidth"}``."""
        return {"kind": "histogram", "bins": self.bins, "lo": self.lo, "hi": self.hi, "bandwidth": self.bandwidth}


class ConcatKey(KeyFunction):
    """Several key functions side by side: each part L2-normalised and scaled by 1/sqrt(n).

    Args:
        fns: the parts (at least one).

    Raises:
        ValueError: no parts.
        TypeError: a part that is not a `KeyFunction`.
    """

    def __init__(self, fns: Sequence[KeyFunction]):
        super().__init__()
        fns = list(fns)
        if not fns:
            raise ValueError("ConcatKey needs at least one key function")
        for f in fns:
            if not isinstance(f, KeyFunction):
                raise TypeError(f"ConcatKey parts must be KeyFunction, got {type(f).__name__}")
        self.parts = nn.ModuleList(fns)
        self.dim = sum(f.dim for f in fns)
        self._freeze()

    def _fns(self) -> list[KeyFunction]:
        return cast("list[KeyFunction]", list(self.parts))

    def embed(self, images: Tensor) -> Tensor:
        """The parts' embeddings, each L2-normalised and scaled by 1/sqrt(n), concatenated."""
        scale = 1.0 / math.sqrt(len(self.parts))
        return torch.cat([F.normalize(f.embed(images), dim=1, eps=EPS) * scale for f in self._fns()], dim=1)

    def describe(self) -> dict[str, Any]:
        """``{"kind": "concat", "parts": [each part's description]}``."""
        return {"kind": "concat", "parts": [f.describe() for f in self._fns()]}

    def checksum(self) -> str:
        """sha256 over the parts' own checksums (a TorchScript part's is over its file, not its state dict)."""
        return hashlib.sha256(canonical_json({"kind": "concat", "parts": [f.checksum() for f in self._fns()]})).hexdigest()


class TorchScriptKey(KeyFunction):
    """A real pretrained encoder saved as TorchScript, where its weights exist on disk.

    The file is read once; its sha256 must be approved by the site (`load_approved_bytes`:
    otherwise `ArtifactNotApproved` is raised and a pending request recorded with `origin`,
    before any of it is deserialised) and must equal `sha256` when given. `embed` resizes
    (bilinear) to `input_size` when given, repeats the single channel to 3 when
    `channels == 3`, flattens the output to (B, dim) and L2-normalises it. The checksum
    covers the file's sha256 and the configuration (not the path, which differs between
    sites).

    Args:
        path: the TorchScript file.
        sha256: the file's expected sha256, or None.
        input_size: resize images to this square size first, or None.
        dim: the expected output size, or None (probed).
        channels: 1, or 3 to repeat the single channel.
        probe_size: image size of the probe that measures ``dim`` when ``input_size`` is None.
        origin: who asks (recorded with an approval request).
        store: the approval store (default ``$FEDIMG_ARTIFACT_STORE``).

    Raises:
        KeyConfigError: missing or unloadable file, sha256 or dim mismatch.
        ArtifactNotApproved: the site has not approved the file's content.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        sha256: str | None = None,
        input_size: int | None = None,
        dim: int | None = None,
        channels: int = 1,
        probe_size: int = 64,
        origin: Mapping[str, Any] | None = None,
        store: ApprovalStore | None = None,
    ):
        super().__init__()
        self.path = Path(path)
        if channels not in (1, 3):
            raise KeyConfigError(f"channels must be 1 or 3, got {channels!r}")
        if not self.path.is_file():
            # the refusal is the cause: the site reports it like an unapproved file
            raise KeyConfigError(f"encoder file {self.path} does not exist: a real encoder needs its weights on disk") from (
                ArtifactUnavailable(self.path, "torchscript", "no such file"))  # fmt: skip
        try:  # a declared sha256 is checked before anything is recorded
            data, self.file_sha256 = load_approved_bytes(self.path, "torchscript", origin, store,
                                                         expected_sha256=None if sha256 is None else sha256.lower())  # fmt: skip
        except ArtifactUnavailable as e:
            raise KeyConfigError(f"encoder file {self.path}: {e}") from e
        try:  # from the approved bytes in memory, never the path again
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")  # type: ignore[no-untyped-call]  # torch leaves jit.load unannotated
        except Exception as e:  # noqa: BLE001 - any load failure is a config problem
            raise KeyConfigError(f"encoder file {self.path} is not a loadable TorchScript module: {e}") from e
        self.module = module
        self.input_size = None if input_size is None else int(input_size)
        self.channels = int(channels)
        self._freeze()
        self.module.eval()
        s = self.input_size or int(probe_size)
        with torch.no_grad():
            probed = self._raw(torch.zeros(1, 1, s, s)).shape[1]
        if dim is not None and int(dim) != probed:
            raise KeyConfigError(f"encoder file {self.path}: configured dim {dim} but the module outputs {probed}")
        self.dim = int(probed)

    def _raw(self, images: Tensor) -> Tensor:
        x = check_images(images)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        flat: Tensor = out.flatten(1).float()
        return flat

    def embed(self, images: Tensor) -> Tensor:
        """The encoder's output, flattened and L2-normalised (see `KeyFunction.embed`)."""
        return F.normalize(self._raw(images), dim=1, eps=EPS)

    def describe(self) -> dict[str, Any]:
        """``{"kind": "encoder", "file", "sha256", "input_size", "channels", "dim"}`` (the file's name, not its path)."""
        return {
            "kind": "encoder",
            "file": self.path.name,
            "sha256": self.file_sha256,
            "input_size": self.input_size,
            "channels": self.channels,
            "dim": self.dim,
        }

    def checksum(self) -> str:
        """sha256 over `describe` (which holds the file's sha256)."""
        return hashlib.sha256(canonical_json(self.describe())).hexdigest()
