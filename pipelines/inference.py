"""Whole-volume inference with a segmentation network on any input grid, inverted exactly.

The input (a NIfTI image or a DICOM series converted as `site-agent prepare` converts it)
goes through the training chain (`pipelines.transforms.deterministic_transforms`: RAS+,
resampling to the training spacing, the schema's intensity rule); the network's class
probabilities (gaussian-blended sliding windows, untrained classes folded into background)
are mapped back with MONAI's inverse of that chain (resampling with the image's bilinear
interpolation, then the orientation's axis permutation and flips) and the label is their
argmax on the input's own grid: nnU-Net's order (probabilities first, argmax last), so a
thin structure is not lost to nearest-neighbour resampling of a label map.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import nibabel as nib
import numpy as np
import torch
from monai.inferers.utils import sliding_window_inference

from pipelines.adaptation.volumes.inference import VolumePrediction, argmax_on_input_grid, load_through_chain
from pipelines.adaptation.volumes.nifti import _load_reference
from pipelines.device import accumulation_device
from pipelines.evaluation import fold_untrained
from pipelines.networks import main_output
from pipelines.plan_args import SegmentationSettings
from pipelines.presence import PresenceWindows, absent_classes, has_presence_head
from pipelines.transforms import deterministic_transforms

__all__ = ["class_probabilities", "segment_image"]

Progress = Callable[[str], None]


def class_probabilities(network: torch.nn.Module, image: torch.Tensor, settings: SegmentationSettings, mode: str = "gaussian") -> torch.Tensor:
    """Softmax class probabilities of a preprocessed volume, classes the model never trained folded into background.

    Args:
        network: the network (its train/eval mode is restored afterwards).
        image: the preprocessed volume (C, X, Y, Z).
        settings: window, overlap, batch of windows, the classes the model predicts.
        mode: how overlapping windows are blended (MONAI's ``gaussian`` or ``constant``).

    Returns:
        (classes, X, Y, Z) float32 probabilities on the image's device; untrained classes are 0, and so are the
        classes a presence head's gate finds absent (`pipelines.presence.absent_classes`). The windows run on
        the network's device, the blending accumulates there when it fits.
    """
    spatial_dims = settings.spatial_dims
    windows = PresenceWindows(network) if settings.presence_classes and has_presence_head(network) else None
    run: torch.nn.Module = windows if windows is not None else network

    def forward(x: torch.Tensor) -> torch.Tensor:
        if spatial_dims == 2:  # a 2D network slides (X, Y, 1) windows, slice by slice
            return main_output(run(x[..., 0]), 2).unsqueeze(-1)
        return main_output(run(x), 3)

    was_training = network.training
    network.eval()
    first = next(network.parameters(), None)
    window_device = first.device if first is not None else image.device  # the windows run where the network is
    try:
        with torch.inference_mode():
            logits = sliding_window_inference(
                image.unsqueeze(0).float(), roi_size=list(settings.inference_roi), sw_batch_size=settings.sw_batch_size, predictor=forward,
                overlap=settings.overlap, mode=mode, padding_mode="constant", sw_device=window_device,
                device=accumulation_device(window_device, int(image[0].numel()), settings.num_classes),
            )  # fmt: skip
    finally:
        network.train(was_training)
    assert isinstance(logits, torch.Tensor)  # one tensor in, one tensor out
    probs = fold_untrained(torch.softmax(logits[0].float(), dim=0), settings.predict_classes)
    if windows is not None and (gone := absent_classes(windows.probabilities(settings.presence_classes), settings.presence_threshold)):
        kept = set(settings.predict_classes or range(probs.shape[0])) - set(gone)
        probs = fold_untrained(probs, sorted(kept))  # the presence head's gate: absent classes count as background
    return probs.to(image.device)


def segment_image(
    network: torch.nn.Module,
    settings: SegmentationSettings,
    image: str | os.PathLike[str] | nib.spatialimages.SpatialImage,
    modality: str,
    channel_chunk: int = 4,
    return_probabilities: bool = False,
    progress: Progress | None = None,
) -> VolumePrediction:
    """Segment a 3D image (any orientation and spacing) and return the label on its own grid.

    Args:
        network: the trained network.
        settings: its settings (schema, spacing, window; a package's `ModelPackage.settings`).
        image: a NIfTI path or nibabel image.
        modality: the schema modality whose intensity rule applies (CT, MR).
        channel_chunk: class channels mapped back at a time (bounds memory).
        return_probabilities: also return the probabilities on the input grid.
        progress: called with a short stage name (``preprocessing``, ``inference``, ``inverting``).

    Returns:
        The prediction: ``label`` has the input's exact shape and ``affine`` is the input's.

    Raises:
        ValueError: naming the input, for an unreadable or non-3D image, or a modality the
            schema has no rule for.
    """
    reference = _load_reference(image)
    where = str(image) if isinstance(image, (str, os.PathLike)) else "image"
    schema = settings.schema
    if modality not in schema.modalities:
        raise ValueError(f"{where}: modality {modality!r} has no intensity rule in schema {schema.name} ({', '.join(sorted(schema.modalities))})")
    chain = deterministic_transforms(schema, modality, spacing=settings.spacing, keys=("image",))
    if progress:
        progress("preprocessing")
    loaded = load_through_chain(image, reference, chain, where)
    if progress:
        progress("inference")
    probs = class_probabilities(network, loaded.as_tensor(), settings)
    if progress:
        progress("inverting")
    n_classes = probs.shape[0]
    chunks = ((c0, probs[c0 : c0 + channel_chunk]) for c0 in range(0, n_classes, channel_chunk))
    label, full = argmax_on_input_grid(chunks, loaded, chain, reference, n_classes, where, return_probabilities)
    return VolumePrediction(label=label, affine=np.array(reference.affine, dtype=np.float64, copy=True), reference=reference, probabilities=full)
