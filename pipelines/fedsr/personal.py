"""A site's personalised FedSR model, as `site-agent infer` and `site-agent evaluate` run it.

After the rounds that score (always the last), a FedSR site saves its model in its work folder
(``cache/fedsr/<run>-model.pt``: plain tensors and the settings that rebuild it): the encoder as
it left that round (with ``finetune_rounds`` the federation's own, frozen while fine-tuning; else
the site's last local update of it), the site's own decoders and the SA representation. `load_personal_model` rebuilds it; `FedSRSegmenter` is its
segmentation path (encoder, segmentation decoder, SCIE with f) as a plain network from image
to logits, so the site's usual inference (`pipelines.inference.segment_image`: the schema's
preprocessing, a sliding window of the training volume size, labels on the input's own grid)
and scoring run it unchanged. The registration path needs the atlas and is not part of it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.fedsr.networks import FEDSR_PRESETS, FedSRConfig
from pipelines.fedsr.training import FEDSR_METHODS, FedSRModel
from pipelines.plan_args import SegmentationSettings
from preprocessing.schema import LabelSchema, parse_schema

__all__ = ["PERSONAL_FORMAT", "FedSRSegmenter", "PersonalModel", "load_personal_model", "personal_model_record"]

PERSONAL_FORMAT = "fedimg-fedsr-personal-model"
_KEYS = ("format", "run_id", "round", "method", "size", "integrate_velocity", "volume_size", "spacing", "schema_definition", "atlas", "weights")


class FedSRSegmenter(nn.Module):
    """The segmentation path of a FedSR model: image (B, 1, X, Y, Z) -> class logits."""

    def __init__(self, model: FedSRModel) -> None:
        """
        Args:
            model: the site's FedSR model (its SA representation is the one SCIE injects).
        """
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Segmentation logits.

        Args:
            image: (B, 1, X, Y, Z), each size a multiple of 8.

        Returns:
            (B, num_classes, X, Y, Z) logits.
        """
        return self.model.network.segment(image, self.model.sa_for_decoders())


@dataclass
class PersonalModel:
    """A loaded personalised model: the network, the settings inference needs, and what it is.

    Args:
        path: the file it was read from.
        segmenter: its segmentation path, in eval mode on the CPU.
        settings: schema, spacing and window (the training volume size) for `segment_image`.
        meta: run id, round, method, atlas, sha256 of the file.
    """

    path: Path
    segmenter: FedSRSegmenter
    settings: SegmentationSettings
    meta: dict[str, Any]

    @property
    def schema(self) -> LabelSchema:
        """The federation schema the model's classes follow."""
        return self.settings.schema


def personal_model_record(model: FedSRModel, *, run_id: str, round_index: int, method: str, size: str, integrate_velocity: bool,
                          volume_size: tuple[int, ...], spacing: Any, schema_definition: dict[str, Any], atlas: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """What a site saves as its personalised model (plain tensors and values only).

    Args:
        model: the site's model after the round.
        run_id: the run.
        round_index: the round (0-based).
        method: the FedSR method.
        size: the network preset.
        integrate_velocity: the registration decoder's setting.
        volume_size: the training volume size.
        spacing: the spacing cases were resampled to (``"schema"``, mm per axis, or None).
        schema_definition: the federation schema as the coordinator sent it.
        atlas: the atlas's name, version and sha256.

    Returns:
        The record `load_personal_model` reads.
    """
    return {
        "format": PERSONAL_FORMAT,
        "run_id": run_id,
        "round": round_index,
        "method": method,
        "size": size,
        "integrate_velocity": integrate_velocity,
        "volume_size": [int(v) for v in volume_size],
        "spacing": list(spacing) if isinstance(spacing, (tuple, list)) else spacing,
        "schema_definition": schema_definition,
        "atlas": dict(atlas),
        "weights": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def load_personal_model(path: str | os.PathLike[str]) -> PersonalModel:
    """Rebuild a site's personalised model from its file (tensors only: ``weights_only``).

    Args:
        path: ``<work_dir>/cache/fedsr/<run>-model.pt``.

    Returns:
        The model with its inference settings.

    Raises:
        ValueError: naming the file: unreadable, not a personalised model, or weights that do not fit.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # the bytes hashed are the bytes loaded
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        # the reason's first line only: torch's text for a refused pickle runs over many lines
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{path}: cannot read as a personalised FedSR model ({reason})") from None
    if not isinstance(saved, dict) or saved.get("format") != PERSONAL_FORMAT or set(saved) != set(_KEYS):
        raise ValueError(f"{path}: not a personalised FedSR model ({PERSONAL_FORMAT})")
    schema = parse_schema(saved["schema_definition"], f"{path}: schema_definition")
    if saved["method"] not in FEDSR_METHODS or saved["size"] not in FEDSR_PRESETS:
        raise ValueError(f"{path}: unknown method {saved['method']!r} or size {saved['size']!r}")
    preset = FEDSR_PRESETS[saved["size"]]
    config = FedSRConfig(in_channels=1, num_classes=schema.num_classes, channels=preset.channels, sa_dim=preset.sa_dim,
                         integrate_velocity=bool(saved["integrate_velocity"]), integration_steps=preset.integration_steps)  # fmt: skip
    model = FedSRModel(config, FEDSR_METHODS[saved["method"]])
    try:
        model.load_state_dict(saved["weights"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights that do not fit the model ({str(exc).splitlines()[0]})") from None
    model.eval()
    spacing = saved["spacing"]
    volume = tuple(int(v) for v in saved["volume_size"])
    settings = SegmentationSettings(
        schema=schema,
        network={"name": "fedsr", "spatial_dims": 3, "size": saved["size"]},
        roi_size=volume,
        spacing=tuple(float(v) for v in spacing) if isinstance(spacing, list) else spacing,
        sw_batch_size=1,
    )
    meta = {k: saved[k] for k in ("run_id", "round", "method", "size", "atlas", "volume_size")}
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return PersonalModel(path=path, segmenter=FedSRSegmenter(model).eval(), settings=settings, meta=meta)
