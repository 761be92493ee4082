"""A deterministic T1-weighted brain-MRI phantom for atlas-registration federations (FedSR).

A FedSR federation has one labelled atlas and, at each site, many unlabelled T1 brain
scans; registering the atlas to a scan gives its pseudo-labels. This phantom gives that
setting something real to do:

* anatomy: :func:`make_brain_template` draws a head (scalp, skull, CSF) around a brain
  with the ``brain-mri`` schema's structures (cerebral white matter and a folded cortex
  ribbon with an interhemispheric fissure, two lateral ventricles, bilateral caudate,
  putamen, pallidum and thalamus, a cerebellum with white-matter cores, the brain stem);
  :func:`make_brain_subject` is that template pulled back through a smooth, invertible
  random deformation (small affine part plus low-frequency displacement modes), so
  subjects differ from the template and from each other the way registration can undo;
* scanners: :func:`t1_intensities` renders a tissue map with a site's
  :class:`BrainSiteProfile` (tissue contrast, multiplicative bias field, Rician noise,
  thick slices); :data:`BRAIN_SITES` holds four neutral-named profiles loosely modelled
  on ABIDE, PPMI, OASIS and HCP-Development differences;
* files: :func:`write_brain_site` writes a site as MR DICOM series (planted identifiers as
  in the CT phantom) with NIfTI labels for none, some or all cases, preparable by
  ``site-agent prepare`` with the ``brain-mri`` schema; :func:`write_brain_atlas` writes
  the federation's atlas (image + labels, two NIfTI files).

Anatomy is defined analytically in normalised coordinates: each axis of the field of view
runs from -1 to 1 (by default 192 mm, so 64 voxels are 3 mm and 32 are 6 mm); rasterising
at the voxel centres (after the deformation) gives the same subject at any grid size.
Volumes are indexed ``[x, y, z]`` as in the CT phantom and DICOM (column, row, slice);
with the default axial orientation +x is the patient's left, +y posterior, +z superior.
Everything is float32 and deterministic from the seeds.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pydicom
import yaml
from pydicom.uid import ExplicitVRLittleEndian
from scipy import ndimage

from fedimg_core import atomic
from fedimg_testing.phantom.dicom_series import volume_affine_ras, write_dicom_series
from fedimg_testing.phantom.identifiers import PlantedIdentifiers
from fedimg_testing.phantom.volume import PhantomVolume
from preprocessing.nifti import clean_image, save_atomic
from preprocessing.schema import LABEL_MAP_FORMAT, LabelSchema, load_schema

__all__ = [
    "ATLAS_CONTRAST",
    "BRAIN_FOV_MM",
    "BRAIN_SITES",
    "BRAIN_TISSUES",
    "FREESURFER_VALUES",
    "BrainAtlas",
    "BrainScan",
    "BrainSite",
    "BrainSiteProfile",
    "BrainVolume",
    "brain_schema",
    "make_brain_atlas",
    "make_brain_scan",
    "make_brain_subject",
    "make_brain_template",
    "t1_intensities",
    "warp_nearest",
    "write_brain_atlas",
    "write_brain_site",
]

BRAIN_FOV_MM = 192.0
"""Default field of view per axis (mm): the spacing is ``BRAIN_FOV_MM / n`` unless given."""

# Tissue names of the brain structures are the schema's class names (so labels are a
# lookup); the ventricles have their own tissue for the label, with CSF's signal.
BRAIN_TISSUES: tuple[str, ...] = (
    "air",
    "scalp",
    "skull",
    "csf",
    "lateral_ventricle",
    "cerebral_cortex",
    "cerebral_white_matter",
    "thalamus",
    "caudate",
    "putamen",
    "pallidum",
    "cerebellum_white_matter",
    "cerebellum_cortex",
    "brain_stem",
)
_T = {name: i for i, name in enumerate(BRAIN_TISSUES)}

# FreeSurfer aseg values (left, right) per class: what a site's FreeSurfer-made labels
# hold; the site label map sends both hemispheres to the one schema class.
FREESURFER_VALUES: dict[str, tuple[int, int]] = {
    "cerebral_white_matter": (2, 41),
    "cerebral_cortex": (3, 42),
    "lateral_ventricle": (4, 43),
    "cerebellum_white_matter": (7, 46),
    "cerebellum_cortex": (8, 47),
    "thalamus": (10, 49),
    "caudate": (11, 50),
    "putamen": (12, 51),
    "pallidum": (13, 52),
    "brain_stem": (16, 16),
}


@lru_cache(maxsize=1)
def brain_schema() -> LabelSchema:
    """The built-in ``brain-mri`` label schema (``preprocessing/schemas/brain-mri.yaml``).

    Returns:
        The schema (cached).
    """
    return load_schema("brain-mri")


@dataclass(frozen=True, eq=False)  # eq=False: a generated __eq__ would compare arrays ambiguously
class BrainVolume:
    """One phantom head on a voxel grid.

    ``labels`` (uint8 ``brain-mri`` schema ids), ``tissue`` (uint8 indices into
    :data:`BRAIN_TISSUES`) and ``left`` (bool: the voxel's anatomy lies in the patient's
    left half) are indexed ``[x, y, z]``; ``spacing`` is the voxel size in mm along x, y, z.
    ``displacement`` (float32, ``(3, nx, ny, nz)``, in voxels) is None for the template;
    for a subject, voxel ``p`` shows the template's anatomy at ``p + displacement[:, p]``
    (a pull-back: ``warp_nearest(template.labels, displacement)`` approximates
    ``labels``).
    """

    labels: np.ndarray
    tissue: np.ndarray
    left: np.ndarray
    spacing: tuple[float, float, float]
    displacement: np.ndarray | None = None
    seed: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The voxel grid ``(x, y, z)``."""
        return tuple(self.labels.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class _Ellipsoid:
    """An ellipsoid in normalised coordinates; ``level < 1`` inside.

    ``bend`` lowers the centre by ``bend * (y - cy)^2`` (a banana: ventricles), ``tilt``
    moves it by ``tilt * (z - cz)`` along y (the brain stem's axis), ``modes`` perturb the
    normalised radius by ``amp * cos(k . q + phase)`` (folding).
    """

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    bend: float = 0.0
    tilt: float = 0.0
    modes: tuple[tuple[float, float, float, float, float], ...] = ()

    def level(self, X: np.ndarray, Y: np.ndarray, Z: np.ndarray, grow: float = 0.0) -> np.ndarray:
        cx, cy, cz = self.centre
        dy = Y - cy - self.tilt * (Z - cz)
        dz = Z - cz + self.bend * (Y - cy) ** 2
        qx, qy, qz = (X - cx) / (self.semi[0] + grow), dy / (self.semi[1] + grow), dz / (self.semi[2] + grow)
        r = np.sqrt(qx * qx + qy * qy + qz * qz)
        for kx, ky, kz, phase, amp in self.modes:
            r = r + amp * np.cos(kx * qx + ky * qy + kz * qz + phase)
        return r

    def mirrored(self) -> _Ellipsoid:
        """The same shape in the other hemisphere (x -> -x)."""
        modes = tuple((-kx, ky, kz, ph, a) for kx, ky, kz, ph, a in self.modes)
        return _Ellipsoid((-self.centre[0], *self.centre[1:]), self.semi, self.bend, self.tilt, modes)


def _entropy(seed: int) -> int:
    """A seed as numpy's seed sequences take it (non-negative), so negative seeds work too."""
    return int(seed) % 2**64


def _fold_modes(seed: int, n: int, k: tuple[float, float], amp: float) -> tuple[tuple[float, float, float, float, float], ...]:
    """Fixed random cosine perturbations of a level (gyri, folia): frequencies in rad per unit of q."""
    rng = np.random.default_rng([0xB7A1, seed])
    out = []
    for _ in range(n):
        d = rng.normal(size=3)
        d *= rng.uniform(*k) / np.linalg.norm(d)
        out.append((float(d[0]), float(d[1]), float(d[2]), float(rng.uniform(0, 2 * np.pi)), float(amp * rng.uniform(0.6, 1.0))))
    return tuple(out)


# The template's anatomy (normalised coordinates, half field of view = 1). Sizes are
# those of an adult brain in a 192 mm field of view, except that the deep grey nuclei and
# ventricles are somewhat enlarged so each spans several voxels at 32^3 (6 mm voxels).
_CAVITY = (_Ellipsoid((0.0, 0.02, 0.04), (0.62, 0.76, 0.68)), _Ellipsoid((0.0, 0.36, -0.40), (0.50, 0.38, 0.30)))
_SKULL_OUT, _SCALP_OUT = 0.075, 0.14  # outward offsets of the skull and scalp surfaces
_CEREBRUM = _Ellipsoid((0.0, 0.0, 0.10), (0.58, 0.70, 0.58))
_CORTEX_DEPTH = 0.17  # level units; the white-matter surface is folded (gyri)
_GYRI = _fold_modes(1, 8, (8.0, 11.0), 0.05)
_CALLOSUM_TOP, _CALLOSUM_HALF_LENGTH = 0.32, 0.45
_FISSURE_GM, _FISSURE_CSF = 0.05, 0.015
_CAUDATE = _Ellipsoid((0.17, -0.17, 0.16), (0.07, 0.17, 0.09))
_PUTAMEN = _Ellipsoid((0.30, -0.04, 0.04), (0.07, 0.18, 0.11))
_PALLIDUM = _Ellipsoid((0.205, -0.01, 0.02), (0.055, 0.10, 0.075))
_THALAMUS = _Ellipsoid((0.095, 0.19, 0.05), (0.085, 0.15, 0.10))
_VENTRICLE = _Ellipsoid((0.085, -0.02, 0.21), (0.065, 0.34, 0.075), bend=0.6)
_CEREBELLUM = _Ellipsoid((0.0, 0.44, -0.44), (0.44, 0.28, 0.22), modes=_fold_modes(2, 6, (12.0, 16.0), 0.03))
_TENTORIUM = 0.04  # CSF gap between cerebellum and occipital lobes
_CEREBELLUM_WM = _Ellipsoid((0.18, 0.43, -0.43), (0.14, 0.13, 0.09), modes=_fold_modes(3, 6, (9.0, 13.0), 0.10))
_BRAIN_STEM = _Ellipsoid((0.0, 0.24, -0.36), (0.11, 0.12, 0.40), tilt=-0.2, modes=_fold_modes(4, 2, (3.0, 4.0), 0.04))
_BRAIN_STEM_BOTTOM, _BRAIN_STEM_TOP = -0.74, 0.0


def _coords(shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised coordinates of the voxel centres, broadcastable ``[x, y, z]``."""
    nx, ny, nz = shape
    return (
        ((np.arange(nx, dtype=np.float32) + 0.5) * (2.0 / nx) - 1.0)[:, None, None],
        ((np.arange(ny, dtype=np.float32) + 0.5) * (2.0 / ny) - 1.0)[None, :, None],
        ((np.arange(nz, dtype=np.float32) + 0.5) * (2.0 / nz) - 1.0)[None, None, :],
    )


def _rasterise(X: np.ndarray, Y: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Tissue indices at the points (X, Y, Z), painted in anatomical priority order."""
    full = np.broadcast_shapes(X.shape, Y.shape, Z.shape)
    X, Y, Z = (np.broadcast_to(a, full) for a in (X, Y, Z))
    t = np.full(full, _T["air"], dtype=np.uint8)

    def cavity(grow: float) -> np.ndarray:
        return np.minimum(_CAVITY[0].level(X, Y, Z, grow), _CAVITY[1].level(X, Y, Z, grow)) < 1.0

    t[cavity(_SCALP_OUT)] = _T["scalp"]
    t[cavity(_SKULL_OUT)] = _T["skull"]
    inside = cavity(0.0)
    t[inside] = _T["csf"]

    # Cerebrum: cortex ribbon around folded white matter; above the corpus callosum (and in
    # front of and behind it) the hemispheres are separated by the interhemispheric fissure
    # (medial cortex, CSF in the middle).
    r = _CEREBRUM.level(X, Y, Z)
    cerebrum = inside & (r < 1.0)
    t[cerebrum] = _T["cerebral_cortex"]
    wm_level = r + sum((a * np.cos(kx * X + ky * Y + kz * Z + ph) for kx, ky, kz, ph, a in _GYRI), np.zeros(full, np.float32))
    t[cerebrum & (wm_level < 1.0 - _CORTEX_DEPTH)] = _T["cerebral_white_matter"]
    callosum_top = np.where(np.abs(Y) < _CALLOSUM_HALF_LENGTH, _CALLOSUM_TOP * (1.0 - (Y / _CALLOSUM_HALF_LENGTH) ** 2), -np.inf)
    above = Z > callosum_top
    t[cerebrum & above & (np.abs(X) < _FISSURE_GM)] = _T["cerebral_cortex"]
    t[cerebrum & above & (np.abs(X) < _FISSURE_CSF)] = _T["csf"]

    # Deep grey nuclei and ventricles, both hemispheres; later ones carve earlier ones
    # (the pallidum the medial putamen, the frontal horn the caudate head).
    for shape, tissue in ((_CAUDATE, "caudate"), (_PUTAMEN, "putamen"), (_PALLIDUM, "pallidum"), (_THALAMUS, "thalamus"), (_VENTRICLE, "lateral_ventricle")):
        for e in (shape, shape.mirrored()):
            t[cerebrum & (e.level(X, Y, Z) < 1.0)] = _T[tissue]

    # Posterior fossa: cerebellum (CSF gap above it: the tentorium), its white-matter
    # cores, and the brain stem in front, leaving through the foramen magnum.
    t[inside & (_CEREBELLUM.level(X, Y, Z, _TENTORIUM) < 1.0)] = _T["csf"]
    cerebellum = inside & (_CEREBELLUM.level(X, Y, Z) < 1.0)
    t[cerebellum] = _T["cerebellum_cortex"]
    for e in (_CEREBELLUM_WM, _CEREBELLUM_WM.mirrored()):
        t[cerebellum & (e.level(X, Y, Z) < 1.0)] = _T["cerebellum_white_matter"]
    stem = (_BRAIN_STEM.level(X, Y, Z) < 1.0) & (Z > _BRAIN_STEM_BOTTOM) & (Z < _BRAIN_STEM_TOP)
    t[stem & (inside | (Z < -0.5))] = _T["brain_stem"]
    return t


@lru_cache(maxsize=1)
def _label_lut() -> np.ndarray:
    schema = brain_schema()
    lut = np.zeros(len(BRAIN_TISSUES), np.uint8)
    for name, i in _T.items():
        lut[i] = schema.classes.get(name, 0)  # scalp, skull, CSF outside the ventricles: background
    return lut


def _grid_spacing(shape: Sequence[int], spacing_mm: Sequence[float] | None) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    shp = tuple(int(s) for s in shape)
    if len(shp) != 3 or min(shp) < 1:
        raise ValueError(f"shape must be three positive sizes, got {tuple(shape)}")
    sp = tuple(BRAIN_FOV_MM / n for n in shp) if spacing_mm is None else tuple(float(s) for s in spacing_mm)
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing_mm must be three positive values, got {spacing_mm}")
    return shp, sp  # type: ignore[return-value]


def _volume(tissue: np.ndarray, X: np.ndarray, spacing, displacement=None, seed=None) -> BrainVolume:
    labels = _label_lut()[tissue]
    missing = [c for c, i in brain_schema().classes.items() if i and not (labels == i).any()]
    if missing:
        raise ValueError(f"grid {tissue.shape} is too small for the brain phantom: classes {missing} have no voxels")
    left = np.broadcast_to(X > 0, tissue.shape).copy()  # +x is the patient's left (LPS)
    return BrainVolume(labels=labels, tissue=tissue, left=left, spacing=spacing, displacement=displacement, seed=seed)


def make_brain_template(shape: Sequence[int] = (64, 64, 64), spacing_mm: Sequence[float] | None = None) -> BrainVolume:
    """The template head: the anatomy every subject is a deformation of (no randomness).

    Args:
        shape: voxel grid ``(x, y, z)``; the head fills the field of view at any size.
        spacing_mm: voxel size in mm (default ``BRAIN_FOV_MM / shape``); it only sets the
            physical size written to files, the anatomy is drawn in normalised coordinates.

    Returns:
        The template (``displacement`` None, ``seed`` None).

    Raises:
        ValueError: a bad shape or spacing, or a grid so small that a class has no voxel
            (every class is present from 24^3 up).
    """
    shp, sp = _grid_spacing(shape, spacing_mm)
    X, Y, Z = _coords(shp)
    return _volume(_rasterise(X, Y, Z), X, sp)


# Deformation parameters: a global affine part (size, small rotation, shift: head size and
# positioning) and a sum of low-frequency displacement modes (local shape). Amplitudes in
# normalised units (1 = 96 mm with the default field of view).
_SIZE_SD, _AXIS_SD, _ROT_SD, _SHIFT_SD = 0.025, 0.02, 0.02, 0.008
_N_MODES, _MODE_FREQ, _MODE_AMP = 10, (0.35, 1.0), 0.02
_MIN_JACOBIAN = 0.35  # the nonlinear part is scaled down until det J stays above this
_CHECK_GRID = 24  # where det J is checked: a fixed grid, so the subject does not depend on the shape


@dataclass(frozen=True)
class _Deformation:
    matrix: np.ndarray  # 3x3, applied about the centre
    shift: np.ndarray  # 3
    k: np.ndarray  # (K, 3) wave vectors, rad per normalised unit
    a: np.ndarray  # (K, 3) displacement amplitudes
    phase: np.ndarray  # (K,)

    def __call__(self, X, Y, Z):
        """Template coordinates of the points (X, Y, Z) (the pull-back map)."""
        m, s = self.matrix, self.shift
        out = [m[i, 0] * X + m[i, 1] * Y + m[i, 2] * Z + s[i] for i in range(3)]
        for k, a, ph in zip(self.k, self.a, self.phase):
            c = np.sin(k[0] * X + k[1] * Y + k[2] * Z + ph)
            out = [out[i] + a[i] * c for i in range(3)]
        return [o.astype(np.float32) for o in out]

    def min_jacobian(self, n: int) -> float:
        """Smallest det of the map's Jacobian (exact, analytic) on an n^3 grid."""
        X, Y, Z = _coords((n, n, n))
        X, Y, Z = np.broadcast_arrays(X, Y, Z)
        J = np.broadcast_to(self.matrix, (*X.shape, 3, 3)).astype(np.float64)
        for k, a, ph in zip(self.k, self.a, self.phase):
            c = np.cos(k[0] * X + k[1] * Y + k[2] * Z + ph)[..., None, None]
            J = J + c * np.outer(a, k)
        return float(np.linalg.det(J).min())


@lru_cache(maxsize=64)
def _deformation(seed: int, strength: float) -> _Deformation:
    rng = np.random.default_rng([_entropy(seed), 0xDEF0])
    size = np.exp(rng.normal(0.0, _SIZE_SD) + rng.normal(0.0, _AXIS_SD, 3))
    ax, ay, az = rng.normal(0.0, _ROT_SD, 3)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine_strength = min(1.0, strength)
    matrix = np.eye(3) + affine_strength * (rz @ ry @ rx @ np.diag(size) - np.eye(3))
    shift = affine_strength * rng.normal(0.0, _SHIFT_SD, 3)
    d = rng.normal(size=(_N_MODES, 3))
    k = d / np.linalg.norm(d, axis=1, keepdims=True) * (2 * np.pi * rng.uniform(*_MODE_FREQ, (_N_MODES, 1)))
    # Lower frequencies move further (a smooth field): amplitude ~ 1/|k|.
    a = rng.normal(size=(_N_MODES, 3)) * (_MODE_AMP * 2 * np.pi * _MODE_FREQ[0] / np.linalg.norm(k, axis=1, keepdims=True))
    phase = rng.uniform(0, 2 * np.pi, _N_MODES)
    deform = _Deformation(matrix, shift, k, a * strength, phase)
    # Keep it a diffeomorphism: shrink the nonlinear part where it would fold.
    for _ in range(20):
        if deform.min_jacobian(_CHECK_GRID) >= _MIN_JACOBIAN:
            break
        deform = dataclasses.replace(deform, a=deform.a * 0.8)
    return deform


def make_brain_subject(
    seed: int,
    shape: Sequence[int] = (64, 64, 64),
    spacing_mm: Sequence[float] | None = None,
    *,
    strength: float = 1.0,
) -> BrainVolume:
    """A subject: the template pulled back through a smooth random deformation of `seed`.

    The deformation is a residual misalignment as after an affine pre-alignment (head
    size sd 2.5 %, per-axis 2 %, rotation ~1 degree, shift ~1 mm) plus ten random sine
    displacement modes of 0.7-2 cycles per field of view, 1-2 mm each (lower frequencies
    larger): about 1.5-2 voxels of displacement in the brain at 64^3 (3 mm), a template-vs-
    subject Dice of about 0.55-0.8 per subject. It is defined in normalised coordinates,
    so a seed gives the same subject at any grid size. It is checked to stay invertible (Jacobian determinant >= 0.35 on a fixed
    grid; the nonlinear part is scaled down otherwise). Labels and tissues are rasterised
    from the analytic anatomy at the warped voxel centres, so they agree voxel for voxel.

    Args:
        seed: the subject's seed (any int; different seeds give different subjects).
        shape: voxel grid ``(x, y, z)``.
        spacing_mm: voxel size in mm (default ``BRAIN_FOV_MM / shape``).
        strength: scales the deformation (0: the template itself; >1 exaggerates the
            nonlinear part, still kept invertible).

    Returns:
        The subject, ``displacement`` set (voxels, see :class:`BrainVolume`).

    Raises:
        ValueError: a bad shape, spacing or strength, or a grid too small for every class.
    """
    shp, sp = _grid_spacing(shape, spacing_mm)
    if not 0.0 <= strength <= 3.0:
        raise ValueError(f"strength must be in [0, 3], got {strength}")
    deform = _deformation(int(seed), float(strength))
    X, Y, Z = _coords(shp)
    TX, TY, TZ = deform(*np.broadcast_arrays(X, Y, Z))
    tissue = _rasterise(TX, TY, TZ)
    n = np.array(shp, np.float32).reshape(3, 1, 1, 1)
    displacement = (np.stack([TX - X, TY - Y, TZ - Z]) * (n / 2.0)).astype(np.float32)
    return _volume(tissue, TX, sp, displacement, int(seed))


def warp_nearest(array: np.ndarray, displacement: np.ndarray) -> np.ndarray:
    """Pull an array back through a displacement field with nearest-neighbour sampling.

    Args:
        array: ``(nx, ny, nz)`` values (labels, tissues).
        displacement: ``(3, nx, ny, nz)`` in voxels: output voxel ``p`` takes
            ``array[round(p + displacement[:, p])]`` (edges clamped).

    Returns:
        The warped array, same dtype.

    Raises:
        ValueError: the shapes do not fit.
    """
    if displacement.shape != (3, *array.shape):
        raise ValueError(f"displacement {displacement.shape} does not fit an array of shape {array.shape}")
    idx = np.indices(array.shape, dtype=np.float32) + displacement
    return ndimage.map_coordinates(array, idx, order=0, mode="nearest").astype(array.dtype)


@dataclass(frozen=True)
class BrainSiteProfile:
    """How one site's scanner renders T1 anatomy.

    ``intensities`` is the mean signal per tissue of :data:`BRAIN_TISSUES` (stored
    units); ``bias`` the amplitude of the smooth multiplicative bias field (the field lies
    in ``1 +- bias``); ``noise_sd`` the standard deviation of the Gaussian noise in each of
    the real and imaginary channels (magnitude images: Rician); ``slice_factor`` how many
    nominal slices one acquired slice spans (thick slices: the site's grid has
    ``nz // slice_factor`` slices). ``field_strength`` (T) and ``description`` are
    informational.
    """

    name: str
    intensities: Mapping[str, float]
    bias: float
    noise_sd: float
    slice_factor: int = 1
    field_strength: float = 3.0
    description: str = ""


def _contrast(wm: float, gm: float, csf: float, scalp: float, skull: float, deep: float = 1.0) -> dict[str, float]:
    """A full T1 tissue table from five anchors. Deep grey nuclei lie between grey and
    white matter (the pallidum and thalamus, more myelinated, nearer white), `deep`
    scales how far."""
    mix = {"thalamus": 0.55, "caudate": 0.12, "putamen": 0.22, "pallidum": 0.7, "brain_stem": 0.8}
    table = {
        "air": 0.0,
        "scalp": scalp,
        "skull": skull,
        "csf": csf,
        "lateral_ventricle": csf,
        "cerebral_cortex": gm,
        "cerebral_white_matter": wm,
        "cerebellum_cortex": 0.95 * gm,
        "cerebellum_white_matter": 0.95 * wm,
    }
    table.update({name: gm + deep * f * (wm - gm) for name, f in mix.items()})
    return {name: float(round(table[name], 1)) for name in BRAIN_TISSUES}


BRAIN_SITES: dict[str, BrainSiteProfile] = {
    p.name: p
    for p in (
        BrainSiteProfile(
            "site-a",
            _contrast(wm=1000.0, gm=640.0, csf=200.0, scalp=900.0, skull=120.0),
            bias=0.20,
            noise_sd=22.0,
            field_strength=3.0,
            description="ABIDE-like: multi-vendor 3 T MPRAGE, strong grey/white contrast, moderate bias, 1 mm isotropic.",
        ),
        BrainSiteProfile(
            "site-b",
            _contrast(wm=900.0, gm=640.0, csf=290.0, scalp=820.0, skull=150.0, deep=0.8),
            bias=0.35,
            noise_sd=32.0,
            slice_factor=2,
            field_strength=1.5,
            description="PPMI-like: mixed 1.5/3 T, flatter contrast, strong bias, noisier, thick slices.",
        ),
        BrainSiteProfile(
            "site-c",
            _contrast(wm=780.0, gm=520.0, csf=170.0, scalp=760.0, skull=90.0),
            bias=0.10,
            noise_sd=10.0,
            field_strength=1.5,
            description="OASIS-like: 1.5 T MP-RAGE averaged over repeats: low noise, weak bias, dark CSF.",
        ),
        BrainSiteProfile(
            "site-d",
            _contrast(wm=1100.0, gm=900.0, csf=260.0, scalp=1000.0, skull=140.0, deep=0.9),
            bias=0.25,
            noise_sd=25.0,
            field_strength=3.0,
            description="HCP-Development-like (unseen site): 3 T, young brains, low grey/white contrast.",
        ),
    )
}
"""Default site profiles (neutral names), loosely modelled on the FedSR paper's data sets."""

ATLAS_CONTRAST = BrainSiteProfile(
    "atlas",
    _contrast(wm=800.0, gm=560.0, csf=220.0, scalp=700.0, skull=100.0),
    bias=0.0,
    noise_sd=4.0,
    description="The atlas: an averaged, bias-corrected T1 in a contrast no site has.",
)
"""The atlas's contrast: bias-free, nearly noise-free, not any site's table."""


def _site(site: BrainSiteProfile | str) -> BrainSiteProfile:
    if isinstance(site, BrainSiteProfile):
        return site
    if site not in BRAIN_SITES:
        raise ValueError(f"unknown site profile {site!r}; expected one of {sorted(BRAIN_SITES)}")
    return BRAIN_SITES[site]


def t1_intensities(tissue: np.ndarray, site: BrainSiteProfile | str, seed: int) -> np.ndarray:
    """A T1-weighted image of a tissue map as `site`'s scanner records it.

    Steps: the site's tissue means, a slight blur (partial volume), a smooth
    multiplicative bias field (pattern from `seed` and the site, amplitude ``site.bias``),
    thick slices (``site.slice_factor`` consecutive slices averaged into one), Rician
    noise of ``site.noise_sd``, clipped to [1, 4095] (12-bit); air is exactly 0, the
    masked background the schema's MR rule (z-score over non-zero voxels) expects.

    Args:
        tissue: ``(nx, ny, nz)`` indices into :data:`BRAIN_TISSUES` (a
            :class:`BrainVolume`'s ``tissue``); with thick slices drawn at the fine grid.
        site: a :class:`BrainSiteProfile` or a name in :data:`BRAIN_SITES`.
        seed: seeds the bias pattern and the noise.

    Returns:
        float32 image of shape ``(nx, ny, nz // site.slice_factor)``.

    Raises:
        ValueError: unknown site, a tissue index out of range, a profile lacking a tissue,
            or ``nz`` not a multiple of the slice factor.
    """
    prof = _site(site)
    missing = [t for t in BRAIN_TISSUES if t not in prof.intensities]
    if missing:
        raise ValueError(f"site profile {prof.name!r} has no intensity for tissues {missing}")
    tissue = np.asarray(tissue)
    if tissue.ndim != 3 or tissue.size == 0 or int(tissue.max()) >= len(BRAIN_TISSUES):
        raise ValueError("tissue must be a 3-D array of indices into BRAIN_TISSUES")
    f = int(prof.slice_factor)
    if f < 1 or tissue.shape[2] % f:
        raise ValueError(f"{tissue.shape[2]} slices are not a multiple of the slice factor {f} of {prof.name!r}")
    rng = np.random.default_rng([_entropy(seed), zlib.crc32(prof.name.encode())])
    lut = np.array([prof.intensities[t] for t in BRAIN_TISSUES], np.float32)
    img = ndimage.gaussian_filter(lut[tissue], sigma=0.5, mode="nearest")
    # Bias: three low-frequency cosines (receive-coil sensitivity), weights summing to 1.
    X, Y, Z = _coords(tissue.shape)
    w = rng.dirichlet(np.ones(3))
    field = np.zeros(tissue.shape, np.float32)
    for wi in w:
        k = rng.normal(size=3)
        k *= np.pi * rng.uniform(0.3, 0.8) / np.linalg.norm(k)
        field += np.float32(wi) * np.cos(k[0] * X + k[1] * Y + k[2] * Z + rng.uniform(0, 2 * np.pi))
    img *= 1.0 + np.float32(prof.bias) * field
    air = tissue == _T["air"]
    if f > 1:
        nx, ny, nz = tissue.shape
        img = img.reshape(nx, ny, nz // f, f).mean(axis=3)
        air = air.reshape(nx, ny, nz // f, f).all(axis=3)
    noise = rng.normal(0.0, prof.noise_sd, (2, *img.shape)).astype(np.float32)
    img = np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)
    img = np.clip(img, 1.0, 4095.0)
    img[air] = 0.0
    return img.astype(np.float32)


@dataclass(frozen=True, eq=False)
class BrainScan:
    """A subject as one site acquired it: ``image`` (float32) and ``subject`` (its labels,
    tissues, deformation) on the site's acquisition grid."""

    image: np.ndarray
    subject: BrainVolume
    site: str


def _acquisition_grid(site: BrainSiteProfile, shape, spacing_mm):
    shp, sp = _grid_spacing(shape, spacing_mm)
    f = int(site.slice_factor)
    nz = shp[2] // f
    if nz < 1:
        raise ValueError(f"{shp[2]} slices are fewer than the slice factor {f} of site {site.name!r}")
    return (shp[0], shp[1], nz), (sp[0], sp[1], sp[2] * shp[2] / nz), f


def make_brain_scan(
    seed: int,
    site: BrainSiteProfile | str,
    shape: Sequence[int] = (64, 64, 64),
    spacing_mm: Sequence[float] | None = None,
) -> BrainScan:
    """Subject `seed` scanned at `site`: the site's grid (thick slices: fewer, thicker ones) and contrast.

    Args:
        seed: the subject's seed (anatomy, bias pattern and noise).
        site: a :class:`BrainSiteProfile` or a name in :data:`BRAIN_SITES`.
        shape: the nominal grid; the acquired one has ``shape[2] // slice_factor`` slices.
        spacing_mm: nominal voxel size (default ``BRAIN_FOV_MM / shape``); the acquired
            slice spacing covers the same field of view.

    Returns:
        The scan; ``scan.subject`` is :func:`make_brain_subject` on the acquired grid.

    Raises:
        ValueError: unknown site, bad shape or spacing.
    """
    prof = _site(site)
    acq_shape, acq_spacing, f = _acquisition_grid(prof, shape, spacing_mm)
    subject = make_brain_subject(seed, acq_shape, acq_spacing)
    # Thick slices: draw at f times the slices and average (partial volume across the slice).
    fine = subject if f == 1 else make_brain_subject(seed, (acq_shape[0], acq_shape[1], acq_shape[2] * f))
    return BrainScan(image=t1_intensities(fine.tissue, prof, seed), subject=subject, site=prof.name)


@dataclass(frozen=True, eq=False)
class BrainAtlas:
    """The federation's labelled atlas: ``image`` (float32), ``labels`` (uint8 schema ids),
    ``affine`` (4x4 RAS+, voxel -> mm, the head centred at the origin), ``spacing`` (mm)."""

    image: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    seed: int | None = None


def _centred_origin(shape, spacing) -> tuple[float, float, float]:
    """LPS position of voxel 0 that puts the field of view's centre at the origin."""
    return tuple(float(-(n - 1) / 2.0 * s) for n, s in zip(shape, spacing))  # type: ignore[return-value]


def _phantom_volume(vol: BrainVolume) -> PhantomVolume:
    # The CT phantom's container, for write_dicom_series and its affines; `hu` only gives
    # the shape there (the MR pixel values are passed separately).
    return PhantomVolume(hu=np.zeros(vol.shape, np.int16), label=vol.labels, spacing=vol.spacing, phase="non_contrast", seed=vol.seed)


_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_brain_atlas(
    shape: Sequence[int] = (64, 64, 64),
    seed: int | None = None,
    *,
    spacing_mm: Sequence[float] | None = None,
    skull_strip: bool = False,
) -> BrainAtlas:
    """The one labelled atlas of a FedSR federation, in the neutral :data:`ATLAS_CONTRAST`.

    Args:
        shape: voxel grid.
        seed: None for the template itself (every subject is a deformation of it, so a
            perfect registration exists); an int for that subject instead (use one no site
            uses, e.g. negative).
        spacing_mm: voxel size (default ``BRAIN_FOV_MM / shape``).
        skull_strip: zero scalp, skull and air, as brain-extracted atlases are distributed.

    Returns:
        The atlas, its affine the axial RAS+ one with the field of view centred at 0.

    Raises:
        ValueError: bad shape or spacing.
    """
    vol = make_brain_template(shape, spacing_mm) if seed is None else make_brain_subject(seed, shape, spacing_mm)
    image = t1_intensities(vol.tissue, ATLAS_CONTRAST, seed=0 if seed is None else seed)
    if skull_strip:
        image[np.isin(vol.tissue, [_T["air"], _T["scalp"], _T["skull"]])] = 0.0
    affine = volume_affine_ras(_phantom_volume(vol), _centred_origin(vol.shape, vol.spacing), _AXIAL)
    return BrainAtlas(image=image, labels=vol.labels.copy(), affine=affine, spacing=vol.spacing, seed=seed)


def write_brain_atlas(
    out_dir: str | os.PathLike,
    shape: Sequence[int] = (64, 64, 64),
    seed: int | None = None,
    *,
    spacing_mm: Sequence[float] | None = None,
    skull_strip: bool = False,
) -> tuple[Path, Path]:
    """Write :func:`make_brain_atlas` as ``atlas-image.nii.gz`` (float32) and
    ``atlas-labels.nii.gz`` (uint8 ``brain-mri`` schema ids), same affine, in `out_dir`.

    Args:
        out_dir: folder (created).
        shape: voxel grid.
        seed: see :func:`make_brain_atlas`.
        spacing_mm: voxel size (default ``BRAIN_FOV_MM / shape``).
        skull_strip: see :func:`make_brain_atlas`.

    Returns:
        (image path, labels path).

    Raises:
        ValueError: bad shape or spacing.
    """
    atlas = make_brain_atlas(shape, seed, spacing_mm=spacing_mm, skull_strip=skull_strip)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_path, label_path = out / "atlas-image.nii.gz", out / "atlas-labels.nii.gz"
    save_atomic(clean_image(atlas.image, atlas.affine), image_path)
    save_atomic(clean_image(atlas.labels, atlas.affine), label_path)
    return image_path, label_path


@dataclass
class BrainSite:
    """What :func:`write_brain_site` wrote. ``cases[i]`` has its series in
    ``dicom_dir / cases[i]``, subject seed ``case_seeds[i]`` and identifiers
    ``identifiers[i]``; ``label_paths`` holds the labelled cases only (case -> file);
    ``labels_dir`` and ``label_map`` are None when no case is labelled."""

    root: Path
    dicom_dir: Path
    labels_dir: Path | None
    label_map: Path | None
    site: str
    cases: list[str]
    case_seeds: list[int]
    identifiers: list[PlantedIdentifiers]
    label_paths: dict[str, Path]
    series_uids: list[str]
    origins: list[tuple[float, float, float]]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def series_dir(self, i: int) -> Path:
        """The folder of case ``i``'s DICOM series."""
        return self.dicom_dir / self.cases[i]


def _brain_identifiers(seed: int, case: int) -> PlantedIdentifiers:
    """The CT phantom's planted identifiers, descriptions made a brain MR's (tokens kept)."""
    ids = PlantedIdentifiers.for_case(seed, case)
    tok = ids.patient_id[len("ZZPHIPID") :]
    return dataclasses.replace(
        ids,
        study_description=f"ZZPHISDS{tok} MR BRAIN",
        series_description=f"ZZPHISED{tok} T1 3D",
        requested_procedure_description=f"ZZPHIRPD{tok} MR brain without contrast",
    )


def write_brain_site(
    out_dir: str | os.PathLike,
    site: BrainSiteProfile | str,
    n_cases: int,
    seed: int,
    *,
    labelled: bool | Sequence[int] = False,
    identifiers: Sequence[PlantedIdentifiers] | None = None,
    shape: Sequence[int] = (64, 64, 64),
    spacing_mm: Sequence[float] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    file_names: str = "random",
) -> BrainSite:
    """Write a site's T1 brain scans, labelling none, some or all of them.

    Layout (as :func:`write_phantom_site`, so ``site-agent prepare`` reads it the same way)::

        out_dir/dicom/case_000/<files>    one MR Image Storage series per case
        out_dir/labels/case_003.nii.gz    labelled cases only: FreeSurfer aseg values
        out_dir/site-labels.yaml          when any case is labelled: aseg value -> class

    Case ``i`` is :func:`make_brain_scan` of seed ``seed * 1000 + i`` at `site` (thick
    slices: fewer slices in the series), written with :func:`write_dicom_series`
    (``modality="MR"``, the scan's own pixel values), its origin jittered per case. Labels
    hold FreeSurfer's per-hemisphere values (:data:`FREESURFER_VALUES`, uint8) in the
    series' voxel order with the affine :func:`volume_affine_ras`, as the CT phantom's.

    Args:
        out_dir: the site folder (created).
        site: a :class:`BrainSiteProfile` or a name in :data:`BRAIN_SITES`.
        n_cases: number of scans.
        seed: the site's seed (subjects, identifiers, origins, UIDs).
        labelled: False (no labels: FedSR's usual site), True (all cases) or the case
            indices to label (e.g. a few held-out evaluation cases).
        identifiers: per-case identifiers to plant (default: the CT phantom's
            ``PlantedIdentifiers.for_case(seed, i)`` with brain MR descriptions).
        shape: the nominal grid per scan (see :func:`make_brain_scan`).
        spacing_mm: nominal voxel size (default ``BRAIN_FOV_MM / shape``).
        transfer_syntax: see :func:`write_dicom_series`.
        file_names: see :func:`write_dicom_series`.

    Returns:
        What was written.

    Raises:
        ValueError: unknown site, n_cases < 1, labelled indices out of range, the wrong
            number of identifiers, or bad shape or spacing.
    """
    prof = _site(site)
    n = int(n_cases)
    if n < 1:
        raise ValueError(f"n_cases must be at least 1, got {n_cases}")
    if isinstance(labelled, bool):
        to_label = set(range(n)) if labelled else set()
    else:
        to_label = {int(i) for i in labelled}
        if any(not 0 <= i < n for i in to_label):
            raise ValueError(f"labelled case indices {sorted(to_label)} are not all in [0, {n})")
    if identifiers is not None and len(identifiers) != n:
        raise ValueError(f"{len(identifiers)} identifiers for {n} cases")
    acq_shape, acq_spacing, _ = _acquisition_grid(prof, shape, spacing_mm)

    root = Path(out_dir)
    dicom_dir = root / "dicom"
    labels_dir = root / "labels" if to_label else None
    result = BrainSite(
        root=root,
        dicom_dir=dicom_dir,
        labels_dir=labels_dir,
        label_map=root / "site-labels.yaml" if to_label else None,
        site=prof.name,
        cases=[],
        case_seeds=[],
        identifiers=[],
        label_paths={},
        series_uids=[],
        origins=[],
        shape=acq_shape,
        spacing=acq_spacing,
    )
    fov = np.array(acq_shape) * np.array(acq_spacing)
    for i in range(n):
        case_seed = int(seed) * 1000 + i
        case = f"case_{i:03d}"
        scan = make_brain_scan(case_seed, prof, shape, spacing_mm)
        ids = identifiers[i] if identifiers is not None else _brain_identifiers(seed, i)
        jrng = np.random.default_rng([_entropy(case_seed), 0xB121])
        # Centred on the head, where the technologist put the box differs from scan to scan.
        origin = tuple(float(v) for v in np.round(-fov / 2 + np.array(acq_spacing) / 2 + jrng.uniform(-10, 10, 3), 2))
        pv = _phantom_volume(scan.subject)
        paths = write_dicom_series(
            pv,
            dicom_dir / case,
            ids,
            origin=origin,
            orientation=_AXIAL,
            transfer_syntax=transfer_syntax,
            file_names=file_names,
            seed=case_seed,
            modality="MR",
            pixel_values=scan.image,
            body_part="HEAD",
        )
        if i in to_label:
            assert labels_dir is not None
            label_path = labels_dir / f"{case}.nii.gz"
            labels_dir.mkdir(parents=True, exist_ok=True)
            save_atomic(clean_image(_freesurfer_labels(scan.subject), volume_affine_ras(pv, origin, _AXIAL)), label_path)
            result.label_paths[case] = label_path
        result.cases.append(case)
        result.case_seeds.append(case_seed)
        result.identifiers.append(ids)
        result.series_uids.append(str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID))
        result.origins.append(origin)  # type: ignore[arg-type]

    if result.label_map is not None:
        schema = brain_schema()
        labels: dict[int, str] = {0: "background"}
        for cname, values in FREESURFER_VALUES.items():
            labels.update({v: cname for v in values})
        doc = {"format": LABEL_MAP_FORMAT, "schema": schema.name, "schema_version": schema.version, "labels": dict(sorted(labels.items()))}
        atomic.write_text(result.label_map, yaml.safe_dump(doc, sort_keys=False))
    return result


def _freesurfer_labels(vol: BrainVolume) -> np.ndarray:
    """Schema labels -> FreeSurfer aseg values (left or right by the anatomy's side)."""
    classes = brain_schema().classes
    n = max(classes.values()) + 1
    left_lut, right_lut = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    for cname, (lv, rv) in FREESURFER_VALUES.items():
        left_lut[classes[cname]], right_lut[classes[cname]] = lv, rv
    return np.where(vol.left, left_lut[vol.labels], right_lut[vol.labels])
