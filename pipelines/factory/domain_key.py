"""The domain key: a site's mean image embedding, the condition of the data factory (computed at the site, never sent).

Key functions (random CNN, soft histogram, their concatenation, an approved TorchScript encoder), the
centring against a site-independent reference, and checksums: docs/design/data-factory.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.artifact_approval import ArtifactUnavailable, load_approved_bytes

# The configuration check imports no torch (spec checks); its names stay importable from here.
from pipelines.factory.key_config import REGISTRY_FOLDER, KeyConfigError, validate_key_config  # noqa: F401

__all__ = [
    "ConcatKey",
    "DomainKey",
    "KeyConfigError",
    "KeyFunction",
    "RandomCNNKey",
    "SoftHistogramKey",
    "TorchScriptKey",
    "build_domain_key",
    "validate_key_config",
]

_EPS = 1e-8


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _check_images(images: Tensor) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (B, 1, H, W), got shape {tuple(images.shape)}")
    return images if images.dtype == torch.float32 else images.float()


# --------------------------------------------------------------------------- key functions


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
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        return self.embed(images)

    def embed(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError

    def checksum(self) -> str:
        """sha256 over the configuration and every weight (name, shape, float32 bytes, in order)."""
        h = hashlib.sha256()
        h.update(_canonical_json(self.describe()))
        for name, t in self.state_dict().items():
            t = t.detach().to("cpu", torch.float32).contiguous()
            h.update(name.encode() + b"\0")
            h.update(_canonical_json(list(t.shape)))
            h.update(t.numpy().tobytes())
        return h.hexdigest()


class RandomCNNKey(KeyFunction):
    """A frozen, seeded, randomly initialised CNN shared by all sites.

    Each stage is a 3x3 stride-2 convolution followed by a leaky ReLU. The features are the
    per-channel spatial mean and std of every stage, concatenated, then mapped by a fixed
    seeded random projection to `proj_dim` and L2-normalised. All randomness comes from a
    local `torch.Generator(seed)`: building one never touches the global RNG.
    """

    _SLOPE = 0.2

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
            conv = nn.utils.skip_init(nn.Conv2d, c_in, w, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (gain / math.sqrt(c_in * 9)))
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)
            convs.append(conv)
            c_in = w
        self.convs = nn.ModuleList(convs)
        feat_dim = 2 * sum(widths)
        self.register_buffer("projection", torch.randn(feat_dim, self.dim, generator=g) / math.sqrt(feat_dim))
        self._freeze()

    def features(self, images: Tensor) -> Tensor:
        """(B, 2 * sum(widths)) per-stage channel means and stds, before the projection."""
        x = _check_images(images)
        feats = []
        for conv in self.convs:
            x = F.leaky_relu(conv(x), self._SLOPE)
            mean = x.mean(dim=(2, 3))
            var = x.var(dim=(2, 3), unbiased=False) if x.shape[2] * x.shape[3] > 1 else torch.zeros_like(mean)
            feats += [mean, torch.sqrt(var + _EPS)]  # eps: finite gradient where a channel is flat
        return torch.cat(feats, dim=1)

    def embed(self, images: Tensor) -> Tensor:
        return F.normalize(self.features(images) @ self.projection, dim=1, eps=_EPS)

    def describe(self) -> dict:
        return {"kind": "random_cnn", "seed": self.seed, "widths": list(self.widths), "proj_dim": self.proj_dim}


class SoftHistogramKey(KeyFunction):
    """A differentiable intensity histogram.

    Each pixel is softly assigned to `bins` Gaussian bins centred evenly on [lo, hi]
    (bandwidth defaults to the bin spacing; the assignment sums to one per pixel, so values
    outside [lo, hi] go to the edge bins). The per-image histogram sums to one; the
    embedding is its square root (Hellinger), L2-normalised.
    """

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
        """(B, bins) soft histograms, each summing to one."""
        x = _check_images(images).flatten(1)  # (B, N)
        n = x.shape[1]
        out = torch.zeros(x.shape[0], self.bins, dtype=x.dtype, device=x.device)
        step = max(1, (1 << 20) // (self.bins * max(1, x.shape[0])))  # bound the (B, n, bins) temporary
        for i in range(0, n, step):
            d = (x[:, i : i + step, None] - self.centres) / self._bw
            out = out + torch.softmax(-0.5 * d * d, dim=2).sum(dim=1)
        return out / n

    def embed(self, images: Tensor) -> Tensor:
        return F.normalize(torch.sqrt(self.histogram(images) + _EPS), dim=1, eps=_EPS)

    def describe(self) -> dict:
        return {"kind": "histogram", "bins": self.bins, "lo": self.lo, "hi": self.hi, "bandwidth": self.bandwidth}


class ConcatKey(KeyFunction):
    """Several key functions side by side: each part L2-normalised and scaled by 1/sqrt(n)."""

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

    def embed(self, images: Tensor) -> Tensor:
        scale = 1.0 / math.sqrt(len(self.parts))
        return torch.cat([F.normalize(f.embed(images), dim=1, eps=_EPS) * scale for f in self.parts], dim=1)

    def describe(self) -> dict:
        return {"kind": "concat", "parts": [f.describe() for f in self.parts]}

    def checksum(self) -> str:
        # The parts' own checksums (a TorchScript part's is over its file, not its state dict).
        return hashlib.sha256(_canonical_json({"kind": "concat", "parts": [f.checksum() for f in self.parts]})).hexdigest()


class TorchScriptKey(KeyFunction):
    """A real pretrained encoder saved as TorchScript, where its weights exist on disk.

    The file is read once; its sha256 must be approved by the site (`load_approved_bytes`:
    otherwise `ArtifactNotApproved` is raised and a pending request recorded with `origin`,
    before any of it is deserialised) and must equal `sha256` when given. `embed` resizes
    (bilinear) to `input_size` when given, repeats the single channel to 3 when
    `channels == 3`, flattens the output to (B, dim) and L2-normalises it. The checksum
    covers the file's sha256 and the configuration (not the path, which differs between
    sites).

    Raises:
        KeyConfigError: missing or unloadable file, sha256 or dim mismatch.
        ArtifactNotApproved: the site has not approved the file's content.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        sha256: str | None = None,
        input_size: int | None = None,
        dim: int | None = None,
        channels: int = 1,
        probe_size: int = 64,
        origin: dict | None = None,
        store=None,
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
            module = torch.jit.load(io.BytesIO(data), map_location="cpu")
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
        x = _check_images(images)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        out = self.module(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.flatten(1).float()

    def embed(self, images: Tensor) -> Tensor:
        return F.normalize(self._raw(images), dim=1, eps=_EPS)

    def describe(self) -> dict:
        return {
            "kind": "encoder",
            "file": self.path.name,
            "sha256": self.file_sha256,
            "input_size": self.input_size,
            "channels": self.channels,
            "dim": self.dim,
        }

    def checksum(self) -> str:
        return hashlib.sha256(_canonical_json(self.describe())).hexdigest()


# --------------------------------------------------------------------------- reference and domain key


def smooth_random_fields(count: int, size: int, seed: int) -> Tensor:
    """(count, 1, size, size) site-independent smooth random images in [-1, 1].

    Gaussian-blurred white noise at three scales, summed and min-max rescaled per image.
    Deterministic for a given seed (a local generator; the global RNG is not touched).
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    total = torch.zeros(count, 1, size, size)
    for sigma, weight in ((size / 32, 0.25), (size / 16, 0.5), (size / 8, 1.0)):
        noise = torch.randn(count, 1, size, size, generator=g)
        total += weight * _gaussian_blur(noise, max(sigma, 0.5))
    lo = total.amin(dim=(2, 3), keepdim=True)
    hi = total.amax(dim=(2, 3), keepdim=True)
    return (total - lo) / (hi - lo).clamp_min(_EPS) * 2.0 - 1.0


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    # Circular padding: the fields have no border artefacts and any radius works at any size.
    pad_h, pad_w = min(radius, x.shape[2] - 1), min(radius, x.shape[3] - 1)
    kh, kw = k[radius - pad_h : radius + pad_h + 1], k[radius - pad_w : radius + pad_w + 1]
    x = F.conv2d(F.pad(x, (0, 0, pad_h, pad_h), mode="circular"), (kh / kh.sum()).view(1, 1, -1, 1))
    return F.conv2d(F.pad(x, (pad_w, pad_w, 0, 0), mode="circular"), (kw / kw.sum()).view(1, 1, 1, -1))


class DomainKey:
    """A key function plus its site-independent reference key; what a site uses.

    `reference` is the mean embedding of `reference_count` seeded synthetic smooth random
    fields of size `reference_size`; it is identical at every site. Images given to
    `site_key` and `centred` must be (B, 1, reference_size, reference_size).
    """

    def __init__(self, fn: KeyFunction, reference_seed: int = 0, reference_size: int = 64, reference_count: int = 64):
        if not isinstance(fn, KeyFunction):
            raise TypeError(f"fn must be a KeyFunction, got {type(fn).__name__}")
        if int(reference_size) < 2 or int(reference_count) < 1:
            raise ValueError(f"reference_size must be >= 2 and reference_count >= 1, got {reference_size}, {reference_count}")
        self.fn = fn
        self.reference_seed = int(reference_seed)
        self.reference_size = int(reference_size)
        self.reference_count = int(reference_count)
        self.dim = fn.dim
        fields = smooth_random_fields(self.reference_count, self.reference_size, self.reference_seed)
        device = next((t.device for t in fn.state_dict().values()), torch.device("cpu"))
        with torch.no_grad():
            total = torch.zeros(fn.dim, device=device)
            for i in range(0, self.reference_count, 16):
                total += fn.embed(fields[i : i + 16].to(device)).sum(dim=0)
        self.reference = total / self.reference_count

    def to(self, device: str | torch.device) -> DomainKey:
        """Move the key function and the reference (e.g. to the generator's device)."""
        self.fn.to(device)
        self.reference = self.reference.to(device)
        return self

    def _check(self, images: Tensor) -> Tensor:
        images = _check_images(images)
        if tuple(images.shape[-2:]) != (self.reference_size, self.reference_size):
            raise ValueError(f"images must be {self.reference_size}x{self.reference_size} (the reference size), got {tuple(images.shape[-2:])}")
        return images

    def site_key(self, batches: Iterable[Tensor]) -> Tensor:
        """(dim,) the mean embedding over ALL images of all batches, minus the reference, L2-normalised.

        Streamed (one batch in memory at a time), without gradients; any batch sizes.
        """
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.reference.device)
        count = 0
        with torch.no_grad():
            for batch in batches:
                batch = self._check(batch)
                if batch.shape[0] == 0:
                    continue
                total += self.fn.embed(batch.to(self.reference.device)).sum(dim=0).double()
                count += batch.shape[0]
        if count == 0:
            raise ValueError("site_key needs at least one image")
        mean = (total / count).float()
        return F.normalize(mean - self.reference, dim=0, eps=_EPS)

    def centred(self, images: Tensor) -> Tensor:
        """(B, dim) per-image normalize(embed(images) - reference); differentiable (key-alignment loss)."""
        images = self._check(images)
        return F.normalize(self.fn.embed(images) - self.reference, dim=1, eps=_EPS)

    def describe(self) -> dict:
        return {
            "fn": self.fn.describe(),
            "reference_seed": self.reference_seed,
            "reference_size": self.reference_size,
            "reference_count": self.reference_count,
        }

    def checksum(self) -> str:
        """sha256 over the key function's checksum and the reference settings."""
        payload = {
            "fn": self.fn.checksum(),
            "reference_seed": self.reference_seed,
            "reference_size": self.reference_size,
            "reference_count": self.reference_count,
        }
        return hashlib.sha256(_canonical_json(payload)).hexdigest()


def build_domain_key(
    raw: Mapping | None,
    image_size: int,
    models_dir: str | os.PathLike | None = None,
    where: str = "key",
    origin: dict | None = None,
    store=None,
) -> DomainKey | None:
    """Build the domain key a configuration describes; `None` for the no-key ablation.

    The reference is computed at `image_size`. An encoder's file is looked up in
    `models_dir` (default: the FEDIMG_MODELS_DIR environment variable) and loads only when
    the site approved its sha256 in `store` (default: $FEDIMG_ARTIFACT_STORE); `origin`
    (plan, run, setting) is recorded with the request otherwise.

    Raises:
        KeyConfigError: an invalid configuration or encoder file.
        ArtifactNotApproved: the encoder file's content is not approved by the site.
    """
    cfg = validate_key_config(raw, where)
    kind = cfg["kind"]
    if kind == "none":
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
        raise KeyConfigError(f"{where}: image_size must be an integer >= 2, got {image_size!r}")
    fn: KeyFunction
    if kind == "encoder":
        mdir = models_dir if models_dir is not None else os.environ.get("FEDIMG_MODELS_DIR")
        if not mdir:
            raise KeyConfigError(f"{where}.file: no models directory (pass models_dir or set FEDIMG_MODELS_DIR): a real encoder needs its weights on disk")
        mdir = Path(mdir)
        path = mdir / cfg["file"]
        missing = None
        if not mdir.is_dir():
            missing = f"models directory {mdir} does not exist"
        elif not path.is_file():
            missing = f"encoder file {path} does not exist"
        elif not path.resolve().is_relative_to((mdir / REGISTRY_FOLDER).resolve()):
            missing = f"encoder file {path} leads out of {mdir / REGISTRY_FOLDER} (a link)"
        if missing:  # reported like an unapproved file: a plan cannot probe the site's files
            raise KeyConfigError(f"{where}.file: {missing}: a real encoder needs its weights on disk") from (
                ArtifactUnavailable(path, "torchscript", missing))  # fmt: skip
        try:
            fn = TorchScriptKey(
                path,
                sha256=cfg["sha256"],
                input_size=cfg["input_size"],
                dim=cfg["dim"],
                channels=cfg["channels"],
                probe_size=image_size,
                origin={"setting": f"{where}.file", **(origin or {})},
                store=store,
            )
        except KeyConfigError as e:
            raise KeyConfigError(f"{where}: {e}") from e
    else:
        parts: list[KeyFunction] = []
        if kind in ("random_cnn", "random_cnn+histogram"):
            parts.append(RandomCNNKey(seed=cfg["seed"], widths=cfg["widths"], proj_dim=cfg["proj_dim"]))
        if kind in ("histogram", "random_cnn+histogram"):
            parts.append(SoftHistogramKey(bins=cfg["bins"], lo=cfg["lo"], hi=cfg["hi"], bandwidth=cfg["bandwidth"]))
        fn = parts[0] if len(parts) == 1 else ConcatKey(parts)
    return DomainKey(fn, reference_seed=cfg["reference_seed"], reference_size=image_size, reference_count=cfg["reference_count"])
