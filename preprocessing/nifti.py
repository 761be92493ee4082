"""NIfTI input and output: validated reads, canonical RAS+ orientation, PHI-free writes.

nibabel (and isal) leave most of their functions unannotated: calls to them are marked
``type: ignore[no-untyped-call]``.
"""

from __future__ import annotations

import hashlib
import io
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, cast

import nibabel as nib
import numpy as np
from isal import igzip, igzip_threaded
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener

from fedimg_core import atomic
from preprocessing.dicom import SeriesError, check_affine, check_size

# Deflate cannot shrink data more than 1032:1, so a .nii.gz declaring more voxel data than
# that many times its own size is truncated or forged: refused before inflating anything.
GZIP_MAX_RATIO = 1032
_INT32 = np.iinfo(np.int32)


def _check_declared(path: Path, img: nib.Nifti1Image) -> None:
    """Voxel type and data size from the header alone, against the limits and the file size."""
    hdr = img.header
    dtype = hdr.get_data_dtype()  # type: ignore[no-untyped-call]
    if dtype.kind not in "biuf":
        raise SeriesError(f"{path}: unsupported voxel type {dtype} (complex or RGB)", "bad_dtype")
    shape = hdr.get_data_shape()  # type: ignore[no-untyped-call]
    check_size(shape, dtype.itemsize, str(path))
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize if shape else 0
    size = os.stat(path).st_size
    if str(path).lower().endswith(".gz"):
        if nbytes > size * GZIP_MAX_RATIO:
            raise SeriesError(
                f"{path}: unreadable NIfTI (the header declares {nbytes:,} bytes of voxel data, more than a {size:,}-byte gzip file can hold: truncated or forged)",
                "corrupt_nifti",
            )
    elif nbytes > size - int(hdr.get_data_offset()):  # type: ignore[no-untyped-call]
        raise SeriesError(
            f"{path}: unreadable NIfTI (the header declares {nbytes:,} bytes of voxel data, the file is {size:,} bytes: truncated)", "corrupt_nifti"
        )


def _check_pixdim(path: Path, img: nib.Nifti1Image, kind: str) -> None:
    """Refuse a voxel size of 0, negative or non-finite where the affine is built from it.

    Without an sform the grid comes from the qform (or the header's fallback), whose voxel
    sizes are pixdim[1..3]. nibabel repairs them silently while loading (0 becomes 1 mm, -3
    becomes 3 mm), which would invent a spacing; the header is read again here unrepaired.
    DICOM's PixelSpacing 0 or negative is refused the same way.
    """
    hdr = img.header
    if int(hdr["sform_code"]) > 0:
        return  # the sform gives the grid (checked with the affine); pixdim is not used
    with ImageOpener(str(path)) as fh:
        raw = type(hdr).from_fileobj(fh, check=False)  # type: ignore[no-untyped-call]
    n = max(0, min(3, int(raw["dim"][0])))
    zooms = np.asarray(raw["pixdim"][1 : 1 + n], dtype=np.float64)
    if not np.all(np.isfinite(zooms) & (zooms > 0)):
        source = "qform" if int(hdr["qform_code"]) > 0 else "header (no qform or sform)"
        raise SeriesError(
            f"{path}: {kind} voxel size pixdim[1:{1 + n}] = {[float(f'{z:.6g}') for z in zooms]} mm must be positive and finite: "
            f"the grid comes from the {source}, which takes its spacing from it (a corrupt header; rewrite it with the real voxel size)",
            "bad_geometry",
        )


def load_nifti(path: Path, kind: str = "image", planar: bool = False) -> nib.Nifti1Image:
    """Read a NIfTI file and check it is a usable 3D volume on a plausible grid.

    The declared size is checked against `preprocessing.dicom.MAX_VOXELS` /
    `MAX_DATA_BYTES` and the file's size before any voxel is read (a gzip bomb inflates
    nothing). 64-bit integer volumes are converted to int32 when their values fit.

    Args:
        path: a .nii or .nii.gz file.
        kind: "image" or "label", for messages; labels keep 64-bit integers (their values
            are checked against the label map).
        planar: also accept a 2D image (a radiograph's mask), returned with a singleton third axis.

    Returns:
        The volume (3D) with its affine.

    Raises:
        SeriesError: naming the file and the problem, with a reason code.
    """
    try:
        with nib.imageglobals.LoggingOutputSuppressor():  # its repairs of the header are checked below, not printed
            img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise SeriesError(f"{path}: not a NIfTI-1/2 image ({type(img).__name__})", "not_nifti")
        _check_declared(path, img)
        _check_pixdim(path, img, kind)
        data = np.asanyarray(img.dataobj)
    except SeriesError:
        raise
    except PermissionError:
        raise SeriesError(f"{path}: permission denied", "unreadable") from None
    except (ImageFileError, EOFError, zlib.error, OSError, ValueError, MemoryError) as exc:
        msg = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise SeriesError(f"{path}: unreadable NIfTI ({msg})", "corrupt_nifti") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if planar and data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise SeriesError(f"{path}: {kind} must be a 3D volume, got shape {tuple(data.shape)}", "wrong_dimensions")
    if min(data.shape) < 1:
        raise SeriesError(f"{path}: empty volume, shape {tuple(data.shape)}", "wrong_dimensions")
    if data.dtype.kind not in "biuf":
        raise SeriesError(f"{path}: unsupported voxel type {data.dtype} (complex or RGB)", "bad_dtype")
    affine = img.affine
    if affine is None or not np.all(np.isfinite(affine)):
        raise SeriesError(f"{path}: the affine (sform/qform) is missing or has non-finite values", "bad_affine")
    norms = np.prod(np.linalg.norm(affine[:3, :3], axis=0))
    if norms == 0 or abs(np.linalg.det(affine[:3, :3])) < 1e-6 * norms:  # relative: tiny voxels are checked below
        raise SeriesError(f"{path}: the affine (sform/qform) is singular", "bad_affine")
    check_affine(affine, data.shape, str(path))
    if data.dtype.kind in "iu" and data.dtype.itemsize == 8:
        # nibabel refuses to build an int64 image (other tools cannot read one); a legal
        # type all the same: images become int32 when their values fit
        lo, hi = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if _INT32.min <= lo and hi <= _INT32.max:
            data = data.astype(np.int32)
        elif kind == "image":
            raise SeriesError(f"{path}: {data.dtype} voxel values from {lo} to {hi} do not fit 32 bits; not an image's intensities", "values_out_of_range")
    slope, inter = img.header.get_slope_inter()  # type: ignore[no-untyped-call]
    if data.dtype.kind == "f" or (slope not in (None, 1.0)) or (inter not in (None, 0.0)):
        with np.errstate(over="ignore", invalid="ignore"):  # reported below, not as a warning line
            data = np.asarray(img.get_fdata(dtype=np.float32))
        if data.ndim == 4:
            data = data[..., 0]
        if not np.all(np.isfinite(data)):
            raise SeriesError(f"{path}: {kind} contains NaN or infinite values (or values beyond float32's range)", "non_finite")
    data = np.asarray(data)
    # a label whose values do not fit 32 bits stays int64 (an explicit type: nibabel
    # refuses it otherwise); its values are checked against the label map
    return nib.Nifti1Image(data, affine, dtype=data.dtype if data.dtype.itemsize == 8 and data.dtype.kind in "iu" else None)  # type: ignore[no-untyped-call]


def qform_sform_disagree(path: Path, tol_mm: float = 1e-3) -> bool:
    """Whether a NIfTI file's qform and sform (both set) place the grid differently.

    Args:
        path: a NIfTI file that `load_nifti` accepted.
        tol_mm: the largest difference of an affine entry that counts as the same.

    Returns:
        True when both forms are coded and differ by more than ``tol_mm``.
    """
    img = cast(nib.Nifti1Image, nib.load(str(path)))  # a NIfTI-1/2 file: load_nifti has read it
    hdr = img.header
    q, qc = hdr.get_qform(coded=True)  # type: ignore[no-untyped-call]
    s, sc = hdr.get_sform(coded=True)  # type: ignore[no-untyped-call]
    if q is None or s is None or not qc or not sc:
        return False
    return bool(np.max(np.abs(q - s)) > tol_mm)


def canonical(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """Reorder/flip voxel axes to the closest RAS+ orientation: exact, no resampling.

    Args:
        img: a NIfTI image.

    Returns:
        The same voxels on the same grid, axes in RAS+ order.
    """
    out: nib.Nifti1Image = nib.as_closest_canonical(img)  # type: ignore[no-untyped-call]
    return out


def grid_difference_mm(a_affine: np.ndarray, b_affine: np.ndarray, shape: Sequence[int]) -> float:
    """Largest distance between where two affines put the corners of a grid.

    Args:
        a_affine: a 4x4 voxel -> world (mm) affine.
        b_affine: another one.
        shape: the grid's dimensions (its 8 corner voxels are compared).

    Returns:
        The distance in mm.
    """
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return float(np.max(np.linalg.norm((corners @ a_affine.T - corners @ b_affine.T)[:, :3], axis=1)))


def clean_image(array: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image with qform = sform (scanner space) and no free-text header fields.

    Args:
        array: the voxels.
        affine: 4x4 voxel -> world (mm).

    Returns:
        The image, spatial units mm, every text field of the header empty.

    Raises:
        ValueError: the affine is not finite in float32, as NIfTI stores it (never write a
            grid that places voxels nowhere).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if not np.all(np.isfinite(np.asarray(affine, dtype=np.float64).astype(np.float32))):
            raise ValueError("the voxel-to-world affine is not finite in float32 (absurd spacing or position)")
    img = nib.Nifti1Image(array, affine)  # type: ignore[no-untyped-call]
    img.set_qform(affine, code=1)  # type: ignore[no-untyped-call]
    img.set_sform(affine, code=1)  # type: ignore[no-untyped-call]
    hdr = img.header
    # Allowlist: every text field of the NIfTI-1 header is emptied (nibabel writes its own
    # version into descrip otherwise; converters put patient or protocol names there).
    for key in ("descrip", "aux_file", "intent_name", "db_name"):
        hdr[key] = b""
    img.header.set_xyzt_units("mm", "sec")  # type: ignore[no-untyped-call]
    return img


_COMPRESS_THREADS = min(2, os.cpu_count() or 1)


def set_compress_threads(threads: int) -> None:
    """Threads `save_atomic` compresses a large volume with (a `--jobs` worker uses one: the workers share the cores).

    Args:
        threads: 1 or more; the files are the same whatever it is.
    """
    global _COMPRESS_THREADS
    _COMPRESS_THREADS = max(1, int(threads))


def save_atomic(img: nib.Nifti1Image, path: Path) -> str:
    """Write an image as (gzip'd) NIfTI atomically.

    Compressed with ISA-L (gzip level 1, as nibabel's default, several times faster than
    zlib), mtime 0 so identical volumes give identical files. A large volume is streamed:
    nibabel writes header and voxels into a compressor that runs on two threads where there
    are two cores (`set_compress_threads`), whose output is hashed as it goes to the temporary file; neither the
    uncompressed nor the compressed bytes are held in memory whole.

    Args:
        img: the image.
        path: the file; compressed when its name ends with ``.gz``.

    Returns:
        The sha256 (hex) of the bytes written.
    """
    nbytes = int(np.prod(img.shape)) * img.get_data_dtype().itemsize  # type: ignore[no-untyped-call]
    if not path.name.endswith(".gz") or nbytes < (8 << 20):
        data = img.to_bytes()
        if path.name.endswith(".gz"):
            data = igzip.compress(data, compresslevel=1, mtime=0)
        atomic.write_bytes(path, data)
        return hashlib.sha256(data).hexdigest()
    with atomic.open_atomic(path) as fh:
        hashed = _HashingWriter(fh)
        # the threaded writer's blocks do not depend on its thread count: the same bytes on one thread or two
        with igzip_threaded.open(hashed, "wb", compresslevel=1, threads=_COMPRESS_THREADS) as gz:  # type: ignore[no-untyped-call]
            stream = _ForwardOnly(gz)
            img.to_file_map(img.make_file_map({"image": stream, "header": stream}))  # type: ignore[no-untyped-call]
        return hashed.hexdigest()


class _ForwardOnly(io.RawIOBase):
    """A write stream nibabel can "seek" forward in: it seeks to where it is (the header's start) and to the
    voxel offset right after the header, which a stream reaches by writing zeros, as a file's gap would read."""

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self._fh = fh
        self._pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]  # typeshed's ReadableBuffer is 3.12's Buffer
        n = self._fh.write(data)
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self._pos + pos if whence == 1 else -1
        if target < self._pos:
            raise io.UnsupportedOperation(f"cannot seek back in a compressed stream (to {pos}, whence {whence})")
        if target > self._pos:
            self.write(bytes(target - self._pos))
        return self._pos

    def flush(self) -> None:
        self._fh.flush()


class _HashingWriter(io.RawIOBase):
    """A binary sink that hashes what it writes to ``fh`` (the compressor's writer thread calls it)."""

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self._fh = fh
        self._sha = hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]  # typeshed's ReadableBuffer is 3.12's Buffer
        view = memoryview(data)
        self._sha.update(view)
        self._fh.write(view)
        return view.nbytes

    def hexdigest(self) -> str:
        """The sha256 (hex) of everything written."""
        return self._sha.hexdigest()
