"""Why a case is refused, and the limits every volume passes before memory is allocated.

`SeriesError` carries a short allowlisted reason ``code`` (written to manifest.json for a
refused source) and a message naming the file (console only). `check_size` and
`check_affine` refuse what no scanner produces, for DICOM series and NIfTI files alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedimg_core.errors import FedimgError

__all__ = ["MAX_ABS_POSITION_MM", "MAX_DATA_BYTES", "MAX_VOXELS", "SPACING_RANGE_MM", "SeriesError", "check_affine", "check_size", "short_error"]

# What one volume (image or label) may declare, checked before a voxel is read or memory is
# allocated: a header is cheap to forge (Rows 65535 over a few bytes, a gzip bomb), the
# memory it asks for is not. 2**28 voxels is 512 x 512 x 1024; 512 MiB is that volume as int16.
MAX_VOXELS = 2**28
MAX_DATA_BYTES = 2**29
# Geometry a scanner can produce: voxel spacing from 1 um to 1 m, every voxel within 100 m
# of the scanner origin (NIfTI stores the affine as float32, whose step there is 0.008 mm,
# still under the 0.01 mm tolerance). Anything else is a corrupt or forged header.
SPACING_RANGE_MM = (1e-3, 1e3)
MAX_ABS_POSITION_MM = 1e5


class SeriesError(FedimgError):
    """A series or file cannot be converted exactly.

    Args:
        message: what is wrong, naming the file (console only: it may carry paths).
        code: a short allowlisted reason, written to manifest.json for the refused source.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def short_error(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, at most ``limit`` characters.

    Args:
        exc: the exception.
        limit: the most characters kept.

    Returns:
        The message with its whitespace collapsed, or the exception's type name when it is empty.
    """
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def check_size(shape: Sequence[int], bytes_per_voxel: float, where: str) -> None:
    """Refuse a volume whose declared size is over the limits, before anything is read.

    Args:
        shape: the declared dimensions.
        bytes_per_voxel: bytes each voxel takes as stored (or decoded).
        where: the file or series, for the message.

    Raises:
        SeriesError: code ``too_large``, naming the declared size and the limits.
    """
    voxels = 1
    for d in shape:
        voxels *= int(d)
    nbytes = int(voxels * bytes_per_voxel)
    if voxels > MAX_VOXELS or nbytes > MAX_DATA_BYTES:
        dims = " x ".join(str(int(d)) for d in shape)
        raise SeriesError(
            f"{where}: declares {dims} voxels ({_mib(nbytes)} of voxel data); the limit per volume is {MAX_VOXELS:,} voxels "
            f"and {_mib(MAX_DATA_BYTES)} (a corrupt or forged header? otherwise crop the volume or store it as int16)",
            "too_large",
        )


def check_affine(affine: np.ndarray, shape: Sequence[int], where: str) -> None:
    """Refuse a voxel-to-world affine no scanner makes: non-finite values, a voxel spacing
    outside `SPACING_RANGE_MM`, or a voxel further than `MAX_ABS_POSITION_MM` from the origin.

    Args:
        affine: 4x4 voxel -> world (mm).
        shape: the grid's dimensions (its corners are checked).
        where: the file or series, for the message.

    Raises:
        SeriesError: code ``bad_geometry``.
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise SeriesError(f"{where}: the voxel-to-world affine has non-finite values (NaN or infinite spacing or position)", "bad_geometry")
    with np.errstate(over="ignore", invalid="ignore"):
        spacing = np.sqrt((a[:3, :3] ** 2).sum(0))
        lo, hi = SPACING_RANGE_MM
        if not np.all((spacing >= lo) & (spacing <= hi)):
            raise SeriesError(
                f"{where}: voxel spacing {[float(f'{x:.6g}') for x in spacing]} mm is outside the plausible range [{lo:g}, {hi:g}] mm",
                "bad_geometry",
            )
        ext = [max(int(d) - 1, 0) for d in tuple(shape)[:3]]
        corners = np.array([[i, j, k, 1.0] for i in (0, ext[0]) for j in (0, ext[1]) for k in (0, ext[2])]) @ a.T
        far = float(np.max(np.abs(corners[:, :3])))
    if not far <= MAX_ABS_POSITION_MM:
        raise SeriesError(
            f"{where}: voxels lie up to {far:.6g} mm from the scanner origin (plausible: within {MAX_ABS_POSITION_MM:g} mm)",
            "bad_geometry",
        )
