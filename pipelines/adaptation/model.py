"""A finished adaptation job's model (`AdaptedModel`, saved as ``model.pt``): what `site-agent infer` loads and runs.

Inference (`AdaptedModel.predict`): 0.5 * softmax(S_t(features of E_t(x, target))) +
0.5 * softmax(S_s(features of E_t(x, source))), i.e. the target branch on the image's own
reconstruction and the source branch on its translation to the source domain
(`pipelines.adaptation.training` trains it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from pipelines.adaptation.branch import SegmentationBranch
from pipelines.adaptation.branch_file import load_branch
from pipelines.adaptation.config import AdaptConfig
from pipelines.adaptation.networks import InversionEncoder, invert
from pipelines.factory.networks import FactoryConfig, Generator, requires_grad

__all__ = ["MODEL_FORMAT", "SOURCE", "TARGET", "AdaptedModel", "cpu_state", "module_device"]

SOURCE, TARGET = 0, 1  # the encoder's domain indices
MODEL_FORMAT = "fedimg-adapted-model"


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters (else its buffers) live.

    Args:
        module: the module (its tensors all on one device).

    Returns:
        The device; the CPU for a module without tensors.
    """
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as CPU copies: what a saved file holds whatever device trained it,
    so a CPU-only machine loads it and later training does not change it.

    Args:
        module: the module.

    Returns:
        Name -> detached CPU tensor (a copy, also for a module already on the CPU).
    """
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _generator_from(cfg_dict: Mapping[str, Any], state: Mapping[str, Any]) -> Generator:
    g = Generator(FactoryConfig.from_dict(cfg_dict, "model.factory"))
    g.load_state_dict(state, strict=True)
    g.eval()
    requires_grad(g, False)
    return g


class AdaptedModel:
    """What a finished job leaves in ``model.pt``: the frozen generator, the encoder and the branch(es), with everything `predict` needs.

    Args:
        kind: ``"source"`` (E_s + S_s) or ``"target"`` (E_t + S_t + S_s).
        generator: the factory's frozen generator.
        encoder: the trained encoder.
        branch_source: S_s.
        branch_target: S_t (target models), else None.
        feature_scale: the injection strength the encoder was trained to.
        meta: factory identity, schema_definition, slices, class ids, domains.
    """

    def __init__(
        self,
        kind: str,
        generator: Generator,
        encoder: InversionEncoder,
        branch_source: SegmentationBranch,
        branch_target: SegmentationBranch | None,
        feature_scale: float,
        meta: dict[str, Any],
    ) -> None:
        self.kind = kind
        self.generator = generator
        self.encoder = encoder
        self.branch_source = branch_source
        self.branch_target = branch_target
        self.feature_scale = float(feature_scale)
        self.meta = meta  # factory identity, schema_definition, slices, class ids, domains

    @property
    def class_names(self) -> list[str]:
        """The branch classes, background first."""
        return list(self.branch_source.class_names)

    @property
    def class_ids(self) -> list[int]:
        """Schema id of each branch class (background 0 first)."""
        return [int(c) for c in self.meta["class_ids"]]

    def _networks(self) -> list[torch.nn.Module]:
        return [m for m in (self.generator, self.encoder, self.branch_source, self.branch_target) if m is not None]

    def eval(self) -> AdaptedModel:
        """Put every network in eval mode.

        Returns:
            ``self``.
        """
        for m in self._networks():
            m.eval()
        return self

    @property
    def device(self) -> torch.device:
        """Where the networks run (the encoder's device; `to` keeps them all on one)."""
        return module_device(self.encoder)

    def to(self, device: torch.device | str) -> AdaptedModel:
        """Move every network to a device (in place).

        Args:
            device: a torch device (``cpu``, ``cuda:0``).

        Returns:
            ``self``.
        """
        for m in self._networks():
            m.to(device)
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor, mode: str = "average") -> torch.Tensor:
        """Branch-class probabilities of slices.

        Args:
            x: slices ``(B, 1, R, R)`` in [-1, 1], on any device (moved to the model's).
            mode: ``"average"`` (target models: S_t on the reconstruction + S_s on the
                translation to the source domain; source models: S_s), ``"target"`` (S_t
                only) or ``"source"`` (S_s on the translation only).

        Returns:
            ``(B, n_classes, R, R)`` probabilities, on the model's device.

        Raises:
            ValueError: an unknown ``mode``, or a target mode for a model without a target branch.
        """
        g, e, s = self.generator, self.encoder, self.feature_scale
        x = x.to(self.device)
        if self.kind == "source":  # E_s + S_s on the image's own reconstruction
            _, feats, _ = invert(g, e, x, SOURCE, s)
            return torch.softmax(self.branch_source(feats), 1)
        out: list[torch.Tensor] = []
        if mode in ("average", "target"):
            if self.branch_target is None:
                raise ValueError(f"a {self.kind} model without a target branch cannot predict in mode {mode!r}")
            _, ft, _ = invert(g, e, x, TARGET, s)
            out.append(torch.softmax(self.branch_target(ft), 1))
        if mode in ("average", "source"):
            _, fs, _ = invert(g, e, x, SOURCE, s)
            out.append(torch.softmax(self.branch_source(fs), 1))
        if not out:
            raise ValueError(f"mode must be average, target or source (got {mode!r})")
        total = out[0]
        for p in out[1:]:
            total = total + p
        return total / len(out)

    def state(self) -> dict[str, Any]:
        """Everything ``model.pt`` holds (tensors and plain values; weights-only loadable).

        Returns:
            The state `from_state` rebuilds the model from; its tensors are CPU copies
            wherever the model runs (`cpu_state`).
        """
        return {
            "format": MODEL_FORMAT,
            "kind": self.kind,
            "factory_config": self.generator.cfg.to_dict(),
            "generator": cpu_state(self.generator),
            "adapt_config": self.encoder.cfg.to_dict(),
            "encoder": cpu_state(self.encoder),
            "branch_source": {"config": self.branch_source.config(), "state": cpu_state(self.branch_source)},
            "branch_target": None if self.branch_target is None else {"config": self.branch_target.config(), "state": cpu_state(self.branch_target)},
            "feature_scale": self.feature_scale,
            "meta": self.meta,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], where: str = "model") -> AdaptedModel:
        """Rebuild a model from its `state` (the branches through the checked `load_branch`).

        Args:
            state: what `state` returned (read back from ``model.pt``).
            where: what messages call it (the file).

        Returns:
            The model, in eval mode.

        Raises:
            ValueError: not an adapted model, or a part that does not match its configuration.
        """
        if not isinstance(state, Mapping) or state.get("format") != MODEL_FORMAT:
            raise ValueError(f"{where}: not an adapted model (format {state.get('format') if isinstance(state, Mapping) else None!r})")
        generator = _generator_from(state["factory_config"], state["generator"])
        encoder = InversionEncoder(generator.cfg, AdaptConfig.from_dict(state["adapt_config"], f"{where}: adapt_config"))
        encoder.load_state_dict(state["encoder"], strict=True)
        bs = load_branch(state["branch_source"]["config"], state["branch_source"]["state"])
        bt = None if state.get("branch_target") is None else load_branch(state["branch_target"]["config"], state["branch_target"]["state"])
        model = cls(state["kind"], generator, encoder, bs, bt, state["feature_scale"], dict(state["meta"]))
        return model.eval()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> AdaptedModel:
        """Load a ``model.pt`` (weights only: nothing is unpickled).

        Args:
            path: the file.

        Returns:
            The model, in eval mode.

        Raises:
            ValueError: naming the file, when it is missing or not an adapted model.
        """
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ValueError(f"{path}: no such model file") from None
        except Exception as exc:
            raise ValueError(f"{path}: not a model file ({exc})") from None
        return cls.from_state(state, str(path))
