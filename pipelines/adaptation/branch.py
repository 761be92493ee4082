"""The segmentation branch: a small per-pixel classifier over the frozen factory generator's feature maps.

What a source site publishes (with ``branch.json``, `pipelines.adaptation.config.BranchConfig`;
the file format is `pipelines.adaptation.branch_file`). Pure PyTorch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.adaptation.config import BRANCH_FORMAT, FACTORY_KEYS, AdaptConfig, BranchConfig
from pipelines.config_fields import check_model
from pipelines.factory.networks import FactoryConfig

__all__ = ["SegmentationBranch"]


class SegmentationBranch(nn.Module):
    """Per-pixel classifier over the generator's feature maps -> logits (B, n_classes, R, R).

    Args:
        feature_channels: one entry per generator resolution 4..R (``FactoryConfig.channels``).
        resolution: the generator's resolution R.
        class_names: background first.
        hidden: the per-map 1x1 projection width.
        mlp: the width of the middle 1x1 layer.
        factory: {name, version, sha256} of the factory whose features it reads (recorded,
            not checked here; missing fields are "").

    Raises:
        ConfigValueError: (a ValueError) naming ``branch.<key>`` for a bad size or name.
    """

    def __init__(
        self,
        feature_channels: Sequence[int],
        resolution: int,
        class_names: Sequence[str],
        hidden: int = 128,
        mlp: int = 64,
        factory: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        fac = dict(factory) if factory is not None else {}
        if set(fac) <= set(FACTORY_KEYS):  # missing identity fields default to ""
            fac = {k: fac.get(k, "") for k in FACTORY_KEYS}
        self._config = check_model(
            BranchConfig,
            {
                "format": BRANCH_FORMAT,
                "version": 1,
                "class_names": list(class_names),
                "feature_channels": list(feature_channels),
                "resolution": resolution,
                "hidden": hidden,
                "mlp": mlp,
                "factory": fac,
            },
            "branch",
        ).to_dict()
        cfg = self._config
        self.resolution = cfg["resolution"]
        self.class_names = list(cfg["class_names"])
        self.n_classes = len(self.class_names)
        self.map_resolutions = tuple(2**i for i in range(2, int(math.log2(self.resolution)) + 1))
        self.feature_channels = tuple(cfg["feature_channels"])
        self.proj = nn.ModuleList(nn.Conv2d(c, cfg["hidden"], 1) for c in self.feature_channels)
        self.bn1 = nn.BatchNorm2d(cfg["hidden"])
        self.fc1 = nn.Conv2d(cfg["hidden"], cfg["mlp"], 1)
        self.bn2 = nn.BatchNorm2d(cfg["mlp"])
        self.fc2 = nn.Conv2d(cfg["mlp"], self.n_classes, 1)

    @classmethod
    def for_factory(
        cls,
        factory_cfg: FactoryConfig,
        class_names: Sequence[str],
        cfg: AdaptConfig | None = None,
        factory: Mapping[str, str] | None = None,
    ) -> "SegmentationBranch":
        """A branch for a factory's generator.

        Args:
            factory_cfg: the factory's sizes.
            class_names: background first.
            cfg: the widths (default: the tiny preset).
            factory: the factory's identity (name, version, sha256).

        Returns:
            The branch (untrained).
        """
        cfg = cfg if cfg is not None else AdaptConfig()
        return cls(factory_cfg.channels, factory_cfg.resolution, class_names, cfg.branch_hidden, cfg.branch_mlp, factory)

    def config(self) -> dict[str, Any]:
        """JSON-able description; ``SegmentationBranch.from_config(b.config())`` rebuilds it.

        Returns:
            A fresh copy of the ``branch.json`` content.
        """
        copied: dict[str, Any] = json.loads(json.dumps(self._config))
        return copied

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SegmentationBranch":
        """Rebuild a branch from its `config` (checked as `BranchConfig`; the file format's own checks are in `branch_file`).

        Args:
            config: the ``branch.json`` content.

        Returns:
            The branch (untrained).

        Raises:
            ConfigValueError: naming ``branch.<key>``.
        """
        cfg = check_model(BranchConfig, config, "branch").to_dict()
        return cls(cfg["feature_channels"], cfg["resolution"], cfg["class_names"], cfg["hidden"], cfg["mlp"], cfg["factory"])

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Classify every pixel from the generator's feature maps.

        Args:
            features: one ``(B, C_r, r, r)`` map per resolution 4..R.

        Returns:
            Logits ``(B, n_classes, R, R)``.

        Raises:
            ValueError: a wrong number of maps or a wrong shape.
        """
        if len(features) != len(self.proj):
            raise ValueError(f"features: expected {len(self.proj)} maps (resolutions 4..{self.resolution}) (got {len(features)})")
        size = (self.resolution, self.resolution)
        acc: torch.Tensor | None = None
        for i, (f, proj) in enumerate(zip(features, self.proj)):
            r, c = self.map_resolutions[i], self.feature_channels[i]
            if f.ndim != 4 or tuple(f.shape[1:]) != (c, r, r):
                raise ValueError(f"features[{i}]: expected shape (B, {c}, {r}, {r}) (got {tuple(f.shape)})")
            y = proj(f)
            if r != self.resolution:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            acc = y if acc is None else acc + y
        if acc is None:  # pragma: no cover - a branch has at least one map (resolution >= 8)
            raise ValueError("features: no feature maps")
        x = self.bn1(F.relu(acc))
        x = self.bn2(F.relu(self.fc1(x)))
        logits: torch.Tensor = self.fc2(x)
        return logits
