"""Whole-volume inference with a 2D model: every axial slice through the training chain,
probabilities mapped back onto the input's own voxel grid.

nibabel and MONAI's ``Compose.inverse`` are unannotated: calls to them are marked
``type: ignore[no-untyped-call]``.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor

from pipelines import transforms as _transforms
from pipelines.adaptation.volumes.geometry import _CHAIN_OPTIONS, _IMAGE_KEYS, unsquare
from pipelines.adaptation.volumes.nifti import _load_reference, write_label_nifti
from pipelines.factory.slices import SliceSettings, intensity_to_unit, slice_bins, square_slices
from preprocessing.schema import LabelSchema

PredictFn = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | np.ndarray"]


@dataclass
class VolumePrediction:
    """A 2D model's segmentation of one volume, on the input's own voxel grid.

    Args:
        label: ``(X, Y, Z)`` uint8 (uint16 beyond 256 classes), the argmax of the probabilities.
        affine: the input's 4x4 affine.
        reference: the input image (header source for `write_label_nifti`).
        probabilities: ``(C, X, Y, Z)`` float32 when asked for.
        sources: for a DICOM series, its instance files in slice order (``label[:, :, k]``
            is ``sources[k]``; ``label[i, j, k]`` is column i, row j).
    """

    label: np.ndarray
    affine: np.ndarray
    reference: nib.spatialimages.SpatialImage
    probabilities: np.ndarray | None = None
    sources: list[Path] | None = None

    def save_nifti(self, path: str | os.PathLike[str]) -> str:
        """Write ``label`` as a NIfTI label map on the input's grid (`write_label_nifti`).

        Args:
            path: the output, ``*.nii.gz`` or ``*.nii``.

        Returns:
            The sha256 of the bytes written.
        """
        return write_label_nifti(self.label, self.reference, path)


def _as_probabilities(out: torch.Tensor | np.ndarray, n: int, size: int, where: str) -> torch.Tensor:
    p = torch.as_tensor(out).detach()
    if p.ndim != 4 or p.shape[0] != n or tuple(p.shape[2:]) != (size, size):
        raise ValueError(f"{where}: predict_fn returned shape {tuple(p.shape)}, expected ({n}, C, {size}, {size})")
    p = p.to("cpu", torch.float32)
    if not torch.isfinite(p).all():
        raise ValueError(f"{where}: predict_fn returned NaN or infinite probabilities")
    return p


def predict_volume_2d(
    image: str | os.PathLike[str] | nib.spatialimages.SpatialImage,
    modality: str,
    schema: LabelSchema,
    settings: SliceSettings,
    predict_fn: PredictFn,
    batch: int = 16,
    return_probabilities: bool = False,
    channel_chunk: int = 4,
) -> VolumePrediction:
    """Segment a 3D NIfTI (path or nibabel image, any orientation and spacing) with a 2D model.

    Steps: the chain of `labelled_slices` (RAS+, resampling to ``settings.spacing``, schema
    intensity, `intensity_to_unit`, pad/resize, float16 rounding) on *every* axial slice
    (``min_foreground`` is not applied), so a prepared case's slices are exactly its
    training slices; then per class channel (``channel_chunk`` at a time, to bound memory):
    resize back to the padded square (bilinear), crop the padding, stack the slices and
    apply MONAI's inverse of the chain (``Compose.inverse`` on a MetaTensor carrying the
    image's ``applied_operations``: Spacing's resampling back to the input grid with the
    image's bilinear interpolation, then Orientation's axis permutation/flips). The label
    is the argmax over classes on the input grid (ties: the lowest class id).

    Args:
        image: a NIfTI path or nibabel image.
        modality: the modality whose intensity rule of ``schema`` applies.
        schema: the label schema (classes, intensity rules).
        settings: the factory's slice settings.
        predict_fn: ``predict_fn(slices, bins)`` gets ``(n, 1, S, S)`` float32 slices in
            [-1, 1] (``n <= batch``) and their ``(n,)`` int64 slice-position bins and returns
            ``(n, C, S, S)`` probabilities (tensor or array; C = ``schema.num_classes``), e.g.
            a softmax. It is called under ``torch.no_grad()``; moving data to a device is its
            business.
        batch: slices per ``predict_fn`` call.
        return_probabilities: also return the probabilities on the input grid.
        channel_chunk: class channels mapped back at a time (bounds memory).

    Returns:
        A `VolumePrediction` whose ``label`` has the input's exact shape and whose ``affine``
        is the input's.

    Raises:
        ValueError: naming the input, for an unreadable or non-3D image, a modality the schema
            has no rule for, or a predict_fn output of the wrong shape / channel count.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if isinstance(channel_chunk, bool) or not isinstance(channel_chunk, int) or channel_chunk < 1:
        raise ValueError(f"channel_chunk must be a positive integer, got {channel_chunk!r}")
    reference = _load_reference(image)
    where = str(image) if isinstance(image, (str, os.PathLike)) else "image"
    rule = schema.modalities.get(modality)
    if rule is None:
        raise ValueError(
            f"{where}: modality {modality!r} has no intensity rule in schema {schema.name} {schema.version} "
            f"(it has {', '.join(sorted(schema.modalities)) or 'none'})"
        )
    chain = _transforms.deterministic_transforms(schema, modality, spacing=settings.spacing, keys=_IMAGE_KEYS, **_CHAIN_OPTIONS)
    loaded = load_through_chain(image, reference, chain, where)

    unit = intensity_to_unit(loaded.as_tensor()[0], rule)  # (X, Y, Z) RAS+, resampled
    width, height, depth = unit.shape
    stack = unit.permute(2, 0, 1).contiguous()
    bins = slice_bins(depth, settings.n_bins)
    size = settings.size
    # All slices at once, float16-rounded: bit for bit the training slices (`labelled_slices`,
    # `dataset_slices`; resizing in other batch sizes can differ in the last float bit).
    all_slices = square_slices(stack, size).to(torch.float16).float()
    outputs = []
    with torch.no_grad():
        for start in range(0, depth, batch):
            stop = min(start + batch, depth)
            outputs.append(_as_probabilities(predict_fn(all_slices[start:stop].clone(), bins[start:stop].clone()), stop - start, size, where))
    probs = torch.cat(outputs)  # (Z, C, S, S)
    n_classes = probs.shape[1]
    if n_classes != schema.num_classes:
        raise ValueError(f"{where}: predict_fn returned {n_classes} channels, schema {schema.name} {schema.version} has {schema.num_classes} classes")
    del outputs, stack, unit, all_slices

    def chunks() -> Iterator[tuple[int, torch.Tensor]]:
        for c0 in range(0, n_classes, channel_chunk):
            c1 = min(c0 + channel_chunk, n_classes)
            part = probs[:, c0:c1].reshape(depth * (c1 - c0), size, size)
            yield c0, unsquare(part, width, height).reshape(depth, c1 - c0, width, height).permute(1, 2, 3, 0)

    label, full = argmax_on_input_grid(chunks(), loaded, chain, reference, n_classes, where, return_probabilities)
    return VolumePrediction(label=label, affine=np.array(reference.affine, dtype=np.float64, copy=True), reference=reference, probabilities=full)


def load_through_chain(image: str | os.PathLike[str] | nib.spatialimages.SpatialImage, reference: nib.spatialimages.SpatialImage, chain: Any,
                       where: str) -> MetaTensor:  # fmt: skip
    """`image` (a path, or an image in memory) through the deterministic chain: the MetaTensor whose
    ``applied_operations`` `argmax_on_input_grid` inverts.

    Args:
        image: the input, as given.
        reference: the input read and checked (`_load_reference`).
        chain: `pipelines.transforms.deterministic_transforms` with the image key only.
        where: the input's name for messages.

    Returns:
        The (1, X, Y, Z) preprocessed image.

    Raises:
        ValueError: the chain did not give one single-channel 3D image.
    """
    with tempfile.TemporaryDirectory(prefix="fedimg-predict-") as tmp:
        if isinstance(image, (str, os.PathLike)) and len(reference.shape) == 3:
            source = str(image)
        else:  # an in-memory image, or a 4D file with one volume: what the loader reads
            data = np.asanyarray(reference.dataobj)
            data = data[..., 0] if data.ndim == 4 else data
            source = str(Path(tmp) / "input.nii")
            nib.save(nib.Nifti1Image(np.asarray(data), reference.affine), source)  # type: ignore[no-untyped-call]
        loaded = chain({"image": source})["image"]
    if not isinstance(loaded, MetaTensor) or loaded.ndim != 4 or loaded.shape[0] != 1:
        raise ValueError(f"{where}: expected a single-channel 3D image after loading, got shape {tuple(loaded.shape)}")
    return loaded


def argmax_on_input_grid(
    chunks: Iterable[tuple[int, torch.Tensor]],
    loaded: MetaTensor,
    chain: Any,
    reference: nib.spatialimages.SpatialImage,
    n_classes: int,
    where: str,
    return_probabilities: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities on the chain's grid mapped back onto the input's grid, and their argmax there.

    Each chunk of classes is inverted with MONAI's inverse of the chain (``Compose.inverse`` on a MetaTensor
    carrying the loaded image's ``applied_operations``: Spacing's resampling back with the image's interpolation,
    then Orientation's axis permutation and flips); the label is the argmax over classes (ties: the lowest id).

    Args:
        chunks: ``(first class, (k, X', Y', Z') probabilities of classes first..first+k-1)`` on the chain's grid.
        loaded: `load_through_chain`'s output (its metadata and operations).
        chain: the chain it went through.
        reference: the input image (its shape).
        n_classes: the number of classes.
        where: the input's name for messages.
        return_probabilities: also return the probabilities on the input grid.

    Returns:
        (label ``(X, Y, Z)`` uint8, uint16 beyond 256 classes; probabilities ``(C, X, Y, Z)`` float32 or None).
    """
    out_shape = tuple(int(s) for s in reference.shape[:3])
    best = torch.full(out_shape, -torch.inf)
    label = torch.zeros(out_shape, dtype=torch.long)
    full = np.empty((n_classes, *out_shape), dtype=np.float32) if return_probabilities else None
    for c0, part in chunks:
        meta_image = MetaTensor(part.contiguous(), meta=copy.deepcopy(dict(loaded.meta)), applied_operations=copy.deepcopy(loaded.applied_operations))
        back = chain.inverse({"image": meta_image})["image"]
        back = back.as_tensor() if hasattr(back, "as_tensor") else torch.as_tensor(back)
        if tuple(back.shape[1:]) != out_shape:  # pragma: no cover - MONAI's inverse restores the input shape
            raise RuntimeError(f"{where}: inverse resampling gave shape {tuple(back.shape[1:])}, expected {out_shape}")
        back = back.float()
        for offset in range(back.shape[0]):  # strictly better: ties go to the lowest class id, as argmax
            better = back[offset] > best
            best = torch.where(better, back[offset], best)
            label[better] = c0 + offset
        if full is not None:
            full[c0 : c0 + back.shape[0]] = back.numpy()
    return label.numpy().astype(np.uint8 if n_classes <= 256 else np.uint16), full
