"""NIfTI in and out for 2D inference: the reference image read and checked, the output's name,
and a label map written on the reference grid.

nibabel leaves most of its functions unannotated: calls to them are marked
``type: ignore[no-untyped-call]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from preprocessing.nifti import save_atomic


def _load_reference(image: str | os.PathLike[str] | Any) -> nib.spatialimages.SpatialImage:
    """The reference image (a path, or a nibabel image already loaded), checked to be a 3D NIfTI with a usable affine."""
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise ValueError(f"{p}: no such file (expected a NIfTI image)")
        try:
            img = nib.load(str(p))
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types
            raise ValueError(f"{p}: not a readable NIfTI image ({' '.join(str(exc).split())[:160]})") from None
        where = str(p)
    else:
        img, where = image, "image"
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"{where}: expected a NIfTI image, got {type(img).__name__}")
    shape = img.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape) < 1:
        raise ValueError(f"{where}: expected a 3D volume, got shape {tuple(shape)}")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise ValueError(f"{where}: the affine (sform/qform) is missing or singular")
    return img


def output_stem(source: str | os.PathLike[str]) -> str:
    """The name an inference output of `source` takes (``<out>/<name>.nii.gz``): the last part
    of its absolute, normalised path, less ``.nii`` / ``.nii.gz``. Normalising first makes
    ``.`` inside a series folder name that folder (``Path('.').name`` is empty, which wrote the
    hidden file ``<out>/.nii.gz``); links are not followed, so the name is the one given.

    Args:
        source: a NIfTI file or DICOM series folder, as the user gave it.

    Returns:
        The output name, never empty.

    Raises:
        ValueError: nothing is left to name the output after (``/``, a file named ``.nii.gz``).
    """
    name = Path(os.path.normpath(os.path.abspath(source))).name
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")] if name.endswith(".nii") else name
    if not stem:
        raise ValueError(f"{source}: no name to give its output (rename the file or folder, or give its parent folder)")
    return stem


def write_label_nifti(label: np.ndarray, reference: nib.spatialimages.SpatialImage | str | os.PathLike[str], path: str | os.PathLike[str]) -> str:
    """Write an integer label map on the grid of ``reference`` as a NIfTI-1 file, atomically.

    uint8 when the values fit, else uint16. The reference's affine and its qform/sform
    (matrices and codes) are copied; every free-text header field (descrip, aux_file,
    intent_name, db_name) is blank and no header extension is written, so nothing about the
    patient rides along. A reference with neither form coded (both codes 0) gets its affine
    written as qform and sform with code 1 (scanner), so every reader places the label where
    nibabel places the reference.

    Args:
        label: ``(X, Y, Z)`` integer values in [0, 65535].
        reference: the image whose grid the label is on (a nibabel image or a NIfTI path).
        path: the output, ``*.nii.gz`` or ``*.nii``.

    Returns:
        The sha256 of the bytes written.

    Raises:
        ValueError: a bad output name, an unreadable reference, a shape different from the
            reference's, or negative, non-integer or too large values.
    """
    out = Path(path)
    if not out.name.endswith((".nii.gz", ".nii")):
        raise ValueError(f"{out}: a NIfTI label map must be named *.nii.gz or *.nii")
    if isinstance(reference, (str, os.PathLike)):
        reference = _load_reference(reference)
    label = np.asarray(label)
    shape = tuple(int(s) for s in reference.shape[:3])
    if label.shape != shape:
        raise ValueError(f"{out}: label shape {label.shape} differs from the reference grid {shape}")
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or not np.all(label == np.round(label)):
            raise ValueError(f"{out}: label values must be integers (got a non-integer float array)")
    elif label.dtype.kind not in "iub":
        raise ValueError(f"{out}: label values must be integers, got dtype {label.dtype}")
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise ValueError(f"{out}: label values must be in [0, 65535], got [{lo}, {hi}]")
    dtype = np.uint8 if hi <= 255 else np.uint16
    img = nib.Nifti1Image(label.astype(dtype), np.asarray(reference.affine, dtype=np.float64))  # type: ignore[no-untyped-call]
    header: Any = getattr(reference, "header", None)  # a NIfTI header has the coded forms; others may not
    qform, qcode = header.get_qform(coded=True) if hasattr(header, "get_qform") else (None, 0)
    sform, scode = header.get_sform(coded=True) if hasattr(header, "get_sform") else (None, 0)
    if qform is None and sform is None:  # a reference without coded forms: the affine, code 1 (scanner)
        qform, qcode, sform, scode = reference.affine, 1, reference.affine, 1
    img.set_qform(qform if qform is not None else reference.affine, code=int(qcode))  # type: ignore[no-untyped-call]
    img.set_sform(sform if sform is not None else reference.affine, code=int(scode))  # type: ignore[no-untyped-call]
    hdr = img.header
    for key in ("descrip", "aux_file", "intent_name", "db_name"):
        hdr[key] = b""
    hdr.set_xyzt_units("mm", "sec")  # type: ignore[no-untyped-call]
    hdr.set_data_dtype(dtype)  # type: ignore[no-untyped-call]
    return save_atomic(img, out)
