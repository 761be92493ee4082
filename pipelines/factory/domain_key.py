"""The domain key: a site's mean image embedding, the condition of the data factory (computed at the site, never sent).

A key function (`pipelines.factory.key_functions`) centred against a site-independent reference,
its checksum, and `build_domain_key` from a configuration: docs/design/data-factory.md.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.artifact_approval import ApprovalStore, ArtifactUnavailable

# The configuration check imports no torch (spec checks); its names stay importable from here.
from pipelines.factory.key_config import REGISTRY_FOLDER, KeyConfigError, validate_key_config
from pipelines.factory.key_functions import EPS, ConcatKey, KeyFunction, RandomCNNKey, SoftHistogramKey, TorchScriptKey, canonical_json, check_images

__all__ = [
    "ConcatKey",
    "DomainKey",
    "KeyConfigError",
    "KeyFunction",
    "RandomCNNKey",
    "SoftHistogramKey",
    "TorchScriptKey",
    "build_domain_key",
    "smooth_random_fields",
    "validate_key_config",
]


def smooth_random_fields(count: int, size: int, seed: int) -> Tensor:
    """Site-independent smooth random images in [-1, 1] (the reference of `DomainKey`).

    Gaussian-blurred white noise at three scales, summed and min-max rescaled per image.
    Deterministic for a given seed (a local generator; the global RNG is not touched).

    Args:
        count: number of images.
        size: their side.
        seed: the seed.

    Returns:
        (count, 1, size, size) images.
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    total = torch.zeros(count, 1, size, size)
    for sigma, weight in ((size / 32, 0.25), (size / 16, 0.5), (size / 8, 1.0)):
        noise = torch.randn(count, 1, size, size, generator=g)
        total += weight * _gaussian_blur(noise, max(sigma, 0.5))
    lo = total.amin(dim=(2, 3), keepdim=True)
    hi = total.amax(dim=(2, 3), keepdim=True)
    return (total - lo) / (hi - lo).clamp_min(EPS) * 2.0 - 1.0


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

    Args:
        fn: the key function.
        reference_seed: seed of the reference fields.
        reference_size: their side (the factory's image size).
        reference_count: how many are averaged.

    Raises:
        TypeError: ``fn`` is not a `KeyFunction`.
        ValueError: ``reference_size`` < 2 or ``reference_count`` < 1.
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
        """Move the key function and the reference (e.g. to the generator's device).

        Args:
            device: the target device.

        Returns:
            This domain key.
        """
        self.fn.to(device)
        self.reference = self.reference.to(device)
        return self

    def _check(self, images: Tensor) -> Tensor:
        images = check_images(images)
        if tuple(images.shape[-2:]) != (self.reference_size, self.reference_size):
            raise ValueError(f"images must be {self.reference_size}x{self.reference_size} (the reference size), got {tuple(images.shape[-2:])}")
        return images

    def site_key(self, batches: Iterable[Tensor]) -> Tensor:
        """The site's key: the mean embedding over ALL images of all batches, minus the reference, L2-normalised.

        Streamed (one batch in memory at a time), without gradients; any batch sizes.

        Args:
            batches: (B, 1, reference_size, reference_size) image batches.

        Returns:
            The (dim,) key.

        Raises:
            ValueError: no images, or images of another size.
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
        return F.normalize(mean - self.reference, dim=0, eps=EPS)

    def centred(self, images: Tensor) -> Tensor:
        """Per-image normalize(embed(images) - reference); differentiable (key-alignment loss).

        Args:
            images: (B, 1, reference_size, reference_size) images.

        Returns:
            (B, dim) centred embeddings.

        Raises:
            ValueError: images of another size.
        """
        images = self._check(images)
        return F.normalize(self.fn.embed(images) - self.reference, dim=1, eps=EPS)

    def describe(self) -> dict[str, Any]:
        """``{"fn": the key function's description, "reference_seed", "reference_size", "reference_count"}``."""
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
        return hashlib.sha256(canonical_json(payload)).hexdigest()


def build_domain_key(
    raw: Mapping[str, Any] | None,
    image_size: int,
    models_dir: str | os.PathLike[str] | None = None,
    where: str = "key",
    origin: Mapping[str, Any] | None = None,
    store: ApprovalStore | None = None,
) -> DomainKey | None:
    """Build the domain key a configuration describes; `None` for the no-key ablation.

    The reference is computed at `image_size`. An encoder's file is looked up in
    `models_dir` (default: the FEDIMG_MODELS_DIR environment variable) and loads only when
    the site approved its sha256 in `store` (default: $FEDIMG_ARTIFACT_STORE); `origin`
    (plan, run, setting) is recorded with the request otherwise.

    Args:
        raw: the key configuration (see `validate_key_config`); None: no key.
        image_size: the factory's image size (>= 2).
        models_dir: where approved encoder files live.
        where: the configuration's key path, for messages.
        origin: who asks (recorded with an approval request).
        store: the approval store.

    Returns:
        The domain key, or None for ``kind: none``.

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
