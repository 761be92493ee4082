"""A deterministic abdominal-CT phantom that writes real DICOM series (for tests and demos).

The phantom stands in for a hospital's data: a contrast-enhanced abdominal CT with the
organs and lesions of the federation schema, written the way a PACS export looks
(one CT Image Storage file per slice, random file names, compressed transfer syntaxes,
identifying data in every usual header place) plus a site's labels (NIfTI like ITK or
3D Slicer writes them, or a DICOM SEG) and the site's label map. What it offers:

* :func:`make_phantom` -- HU volume + schema label volume. Anatomy (shapes, positions,
  lesions) depends only on the seed, intensities only on the contrast phase, so the
  same patient can be "scanned" in several phases (a real intensity domain shift).
* :func:`write_dicom_series` -- one series per volume, any orthonormal orientation,
  native or lossless-compressed pixel data, planted identifiers
  (:class:`PlantedIdentifiers`) that a byte scan of any derived output can look for.
* :func:`write_phantom_site` -- a whole site: ``dicom/<case>/``, ``labels/<case>``,
  ``site-labels.yaml``, labelling only the site's classes with site-local values.

Geometry conventions (the same as DICOM/ITK): the volume is indexed ``[x, y, z]`` =
``[column, row, slice]``; voxel ``(i, j, k)`` sits at ``origin + i*dx*r + j*dy*c +
k*dz*n`` in patient LPS, where ``r`` (first three values of ImageOrientationPatient)
is the direction of increasing column index, ``c`` that of increasing row index and
``n = r x c``. With the default orientation +x is the patient's left, +y posterior and
+z superior; the liver therefore lies at low x.
"""

from __future__ import annotations

import hashlib
import io
import os
import zlib
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    CTImageStorage,
    MRImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    UID,
    generate_uid,
)
from pydicom.valuerep import DSfloat
from scipy import ndimage

from fedimg_core import atomic
from preprocessing.nifti import clean_image, save_atomic
from preprocessing.schema import LABEL_MAP_FORMAT, LabelSchema, load_schema
from preprocessing.seg import segment_codes as _seg_codes, write_seg  # noqa: F401 (_seg_codes: former home)

__all__ = [
    "PHASES",
    "TISSUES",
    "SITES",
    "PhantomVolume",
    "PlantedIdentifiers",
    "PhantomSite",
    "make_phantom",
    "mr_like",
    "write_dicom_series",
    "volume_affine_lps",
    "volume_affine_ras",
    "write_phantom_site",
    "site_label_volume",
]

# --------------------------------------------------------------------------- intensities

TISSUES: tuple[str, ...] = (
    "air",
    "gas",
    "fat",
    "skin",
    "muscle",
    "bone_cortical",
    "bone_cancellous",
    "intervertebral_disc",
    "csf",
    "aorta",
    "vena_cava",
    "stomach_wall",
    "gastric_fluid",
    "liver",
    "liver_tumor",
    "spleen",
    "pancreas",
    "pancreas_tumor",
    "kidney_cortex",
    "kidney_medulla",
    "kidney_tumor",
)
_T = {name: i for i, name in enumerate(TISSUES)}

_PHASE_NAMES = ("non_contrast", "arterial", "portal_venous", "delayed")
# Mean HU per tissue in each phase (typical adult values, ~35 s late arterial, ~70 s portal
# venous, ~3-5 min delayed). What makes the phases a real domain shift: vessels, kidney
# cortex (corticomedullary phase), pancreas (pancreatic phase) and spleen peak in the
# arterial phase, the liver in the portal-venous phase, the renal medulla in the delayed
# (excretory) phase; lesions enhance less than their organ, so they are hypodense after
# contrast and only mildly hypodense without it.
_PHASE_TABLE: dict[str, tuple[float, float, float, float]] = {
    "air": (-1000, -1000, -1000, -1000),
    "gas": (-1000, -1000, -1000, -1000),
    "fat": (-100, -100, -100, -100),
    "skin": (30, 45, 50, 45),
    "muscle": (50, 55, 62, 58),
    "bone_cortical": (700, 700, 700, 700),
    "bone_cancellous": (300, 310, 320, 315),
    "intervertebral_disc": (80, 85, 90, 90),
    "csf": (8, 8, 8, 8),
    "aorta": (40, 320, 170, 110),
    "vena_cava": (38, 80, 150, 105),
    "stomach_wall": (40, 95, 85, 70),
    "gastric_fluid": (8, 8, 8, 8),
    "liver": (58, 72, 110, 85),
    "liver_tumor": (42, 52, 68, 62),
    "spleen": (48, 125, 118, 90),
    "pancreas": (42, 120, 100, 78),
    "pancreas_tumor": (36, 62, 66, 64),
    "kidney_cortex": (32, 190, 165, 125),
    "kidney_medulla": (30, 80, 150, 135),
    "kidney_tumor": (36, 110, 95, 72),
}
PHASES: dict[str, dict[str, float]] = {
    phase: {tissue: float(values[i]) for tissue, values in _PHASE_TABLE.items()} for i, phase in enumerate(_PHASE_NAMES)
}

# Which schema class each tissue belongs to (everything else is background).
_TISSUE_CLASS = {
    "liver": "liver",
    "liver_tumor": "liver_tumor",
    "spleen": "spleen",
    "pancreas": "pancreas",
    "pancreas_tumor": "pancreas_tumor",
    "kidney_cortex": "kidney",
    "kidney_medulla": "kidney",
    "kidney_tumor": "kidney_tumor",
}

# The default federation: one site per organ group, each labelling its organ (+ lesion).
SITES: dict[str, list[str]] = {
    "kidney": ["kidney", "kidney_tumor"],
    "liver": ["liver", "liver_tumor"],
    "pancreas": ["pancreas", "pancreas_tumor"],
    "spleen": ["spleen"],
}

HU_MIN, HU_MAX = -1024, 3071  # what a 12-bit CT with intercept -1024 can represent


@lru_cache(maxsize=1)
def _default_schema() -> LabelSchema:
    return load_schema()


# --------------------------------------------------------------------------- volume


@dataclass(frozen=True, eq=False)  # eq=False: the generated __eq__ would compare arrays ambiguously
class PhantomVolume:
    """One phantom CT.

    ``hu`` (int16) and ``label`` (uint8 schema ids) are indexed ``[x, y, z]`` = [DICOM
    column, DICOM row, slice]; ``spacing`` is (column spacing, row spacing, slice spacing)
    in mm, i.e. the size of a voxel along x, y, z. ``tissue`` holds indices into
    :data:`TISSUES` (the noiseless tissue map the intensities were drawn from).
    """

    hu: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    phase: str
    tissue: np.ndarray | None = None
    seed: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class _Blob:
    """A smooth random shape: an ellipsoid (rotated about z, sheared along z) whose
    normalised radius is perturbed by a few low-frequency cosines. ``level < 1`` inside.

    Coordinates are "anatomy units": x, y in units of half the smaller in-plane field of
    view, z in units of half the slab, so the same seed gives the same anatomy at any
    resolution and every organ falls inside the slab.
    """

    centre: tuple[float, float, float]
    semi: tuple[float, float, float]
    angle: float = 0.0
    shear: tuple[float, float] = (0.0, 0.0)
    modes: tuple[tuple[float, float, float, float, float], ...] = ()

    def level(self, X, Y, Z):
        cx, cy, cz = self.centre
        dz = Z - cz
        dx = X - cx - self.shear[0] * dz
        dy = Y - cy - self.shear[1] * dz
        c, s = np.cos(self.angle), np.sin(self.angle)
        qx = (c * dx + s * dy) / self.semi[0]
        qy = (-s * dx + c * dy) / self.semi[1]
        qz = dz / self.semi[2]
        r = np.sqrt(qx * qx + qy * qy + qz * qz)
        for kx, ky, kz, phase, amp in self.modes:
            r = r + amp * np.cos(kx * qx + ky * qy + kz * qz + phase)
        return r

    def scaled(self, sx: float, sy: float, body_y: float) -> "_Blob":
        """The blob with x, y scaled about the body centre (patient habitus)."""
        cx, cy, cz = self.centre
        s = 0.5 * (sx + sy)
        return _Blob(
            (cx * sx, body_y + (cy - body_y) * sy, cz),
            (self.semi[0] * s, self.semi[1] * s, self.semi[2]),
            self.angle,
            self.shear,
            self.modes,
        )


def _modes(rng: np.random.Generator, n: int = 4, amp: float = 0.06, freq=(1.5, 3.5), planar: bool = False):
    out = []
    for _ in range(n):
        d = rng.normal(size=3)
        if planar:
            d[2] = 0.0
        d /= np.linalg.norm(d) + 1e-12
        k = d * rng.uniform(*freq)
        out.append((float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * np.pi)), float(amp * rng.uniform(0.5, 1.0))))
    return tuple(out)


def _blob(rng, centre, semi, angle=0.0, jitter=0.03, size_jitter=0.1, amp=0.06, shear=0.0, planar=False) -> _Blob:
    c = np.asarray(centre, float) + rng.normal(0.0, jitter, 3) * np.array([1.0, 1.0, 1.5])
    s = np.asarray(semi, float) * rng.uniform(1 - size_jitter, 1 + size_jitter, 3)
    a = angle + rng.normal(0.0, 0.08)
    sh = tuple(float(v) for v in rng.normal(0.0, shear, 2)) if shear else (0.0, 0.0)
    return _Blob(tuple(float(v) for v in c), tuple(float(v) for v in s), float(a), sh, _modes(rng, amp=amp, planar=planar))


@dataclass(frozen=True)
class _Anatomy:
    body: _Blob
    skin: float
    fat: float
    muscle: float
    organs: dict[str, _Blob]
    disc_phase: float
    rib_phase: float
    lesions: tuple[tuple[str, tuple[float, float, float], float, tuple], ...]  # organ, centre, radius, modes


_BODY_Y = 0.05  # body centre, slightly posterior of the field-of-view centre
_NOMINAL_CAVITY = (0.9 * 0.8, 0.7 * 0.8)  # cavity semi-axes the organ layout was drawn for


def _anatomy(seed: int) -> _Anatomy:
    """Every random anatomical choice, drawn in a fixed order from the seed alone."""
    rng = np.random.default_rng([int(seed), 0xA7A])
    bx, by = 0.9 * rng.uniform(0.96, 1.04), 0.7 * rng.uniform(0.94, 1.06)
    body = _Blob((0.0, _BODY_Y, 0.0), (bx, by, 1e6), 0.0, (0.0, 0.0), _modes(rng, n=3, amp=0.012, planar=True))
    skin, fat, muscle = 0.025, float(rng.uniform(0.07, 0.15)), float(rng.uniform(0.05, 0.075))
    cav = 1.0 - skin - fat - muscle
    sx, sy = bx * cav / _NOMINAL_CAVITY[0], by * cav / _NOMINAL_CAVITY[1]

    organs = {
        "stomach": _blob(rng, (0.30, -0.30, 0.40), (0.22, 0.15, 0.5), 0.3),
        "liver_right": _blob(rng, (-0.40, 0.00, 0.25), (0.36, 0.42, 0.85), 0.2),
        "liver_left": _blob(rng, (-0.02, -0.30, 0.45), (0.30, 0.15, 0.5), -0.25),
        "spleen": _blob(rng, (0.56, 0.14, 0.30), (0.12, 0.24, 0.55), 0.5),
        "pancreas": _blob(rng, (0.12, 0.10, 0.00), (0.32, 0.085, 0.35), 0.25, jitter=0.02, amp=0.05),
        "kidney_right": _blob(rng, (-0.36, 0.36, -0.30), (0.10, 0.14, 0.50), -0.5, jitter=0.02),
        "kidney_left": _blob(rng, (0.36, 0.36, -0.15), (0.10, 0.14, 0.50), 0.5, jitter=0.02),
        "aorta": _blob(rng, (0.06, 0.30, 0.0), (0.045, 0.045, 1e3), jitter=0.008, size_jitter=0.08, amp=0.0, shear=0.02),
        "vena_cava": _blob(rng, (-0.12, 0.26, 0.0), (0.06, 0.04, 1e3), jitter=0.008, size_jitter=0.1, amp=0.0, shear=0.02),
        "psoas_right": _blob(rng, (-0.15, 0.38, -0.9), (0.06, 0.07, 0.9), jitter=0.01, amp=0.03),
        "psoas_left": _blob(rng, (0.15, 0.38, -0.9), (0.06, 0.07, 0.9), jitter=0.01, amp=0.03),
        "paraspinal_right": _blob(rng, (-0.14, 0.64, 0.0), (0.10, 0.08, 1e3), jitter=0.01, amp=0.03, planar=True),
        "paraspinal_left": _blob(rng, (0.14, 0.64, 0.0), (0.10, 0.08, 1e3), jitter=0.01, amp=0.03, planar=True),
        "vertebra": _blob(rng, (0.0, 0.48, 0.0), (0.11, 0.09, 1e3), jitter=0.005, size_jitter=0.05, amp=0.0),
        "canal": _blob(rng, (0.0, 0.615, 0.0), (0.04, 0.035, 1e3), jitter=0.003, size_jitter=0.05, amp=0.0),
        "arch": _blob(rng, (0.0, 0.615, 0.0), (0.075, 0.07, 1e3), jitter=0.003, size_jitter=0.05, amp=0.0),
        "spinous": _blob(rng, (0.0, 0.70, 0.0), (0.025, 0.07, 1e3), jitter=0.003, size_jitter=0.05, amp=0.0),
    }
    # Organs follow the abdominal cavity (a thin patient has a smaller cavity).
    organs = {k: v.scaled(sx, sy, _BODY_Y) for k, v in organs.items()}
    disc_phase, rib_phase = float(rng.uniform(0, 1)), float(rng.uniform(0, 1))

    # Lesion centres are drawn in continuous coordinates (deep inside their organ), so
    # they do not depend on the voxel grid either.
    lesions = []
    plan = [("liver", rng.integers(1, 3), (0.06, 0.14)), ("kidney", rng.integers(1, 3), (0.05, 0.09)), ("pancreas", rng.integers(1, 3), (0.055, 0.08))]
    for organ, count, (rmin, rmax) in plan:
        for _ in range(int(count)):
            if organ == "liver":
                host = organs["liver_right"]
            elif organ == "kidney":
                host = organs["kidney_right" if rng.integers(2) == 0 else "kidney_left"]
            else:
                host = organs["pancreas"]
            centre = _deep_point(rng, host, organs, body, 1.0 - skin - fat - muscle)
            lesions.append((organ, centre, float(rng.uniform(rmin, rmax)), _modes(rng, n=3, amp=0.05)))
    return _Anatomy(body, skin, fat, muscle, organs, disc_phase, rib_phase, tuple(lesions))


def _deep_point(rng, host: _Blob, organs: dict[str, _Blob], body: _Blob, cavity: float):
    """A random point well inside `host`, inside the cavity and away from the structures
    painted over organs (vessels, kidneys, spine); falls back to the deepest candidate."""
    blockers = [organs[k] for k in ("aorta", "vena_cava", "kidney_right", "kidney_left", "vertebra", "psoas_right", "psoas_left")]
    best, best_level = None, np.inf
    c, s = np.cos(host.angle), np.sin(host.angle)
    for _ in range(200):
        q = rng.normal(size=3)
        q *= rng.uniform(0.0, 0.7) ** (1 / 3) / (np.linalg.norm(q) + 1e-12)
        lx, ly, lz = q[0] * host.semi[0], q[1] * host.semi[1], q[2] * host.semi[2]
        z = host.centre[2] + lz
        x = host.centre[0] + host.shear[0] * lz + c * lx - s * ly
        y = host.centre[1] + host.shear[1] * lz + s * lx + c * ly
        lvl = float(host.level(x, y, z))
        if host is not organs.get("kidney_right") and host is not organs.get("kidney_left"):
            if any(b.level(x, y, z) < 1.3 for b in blockers):
                continue
        if body.level(x, y, z) > cavity - 0.03:
            continue
        if lvl < 0.65:
            return (float(x), float(y), float(z))
        if lvl < best_level:
            best, best_level = (float(x), float(y), float(z)), lvl
    return best if best is not None else host.centre


def _grid(shape, spacing):
    nx, ny, nz = shape
    sx, sy, sz = spacing
    half = 0.5 * min(nx * sx, ny * sy)  # anatomy unit in-plane (mm)
    halfz = 0.5 * nz * sz
    X = (((np.arange(nx) + 0.5) * sx - 0.5 * nx * sx) / half).astype(np.float32)[:, None, None]
    Y = (((np.arange(ny) + 0.5) * sy - 0.5 * ny * sy) / half).astype(np.float32)[None, :, None]
    Z = (((np.arange(nz) + 0.5) * sz - halfz) / halfz).astype(np.float32)[None, None, :]
    return X, Y, Z, half, halfz


def _rasterise(anat: _Anatomy, shape, spacing) -> np.ndarray:
    """Paint tissues in anatomical priority order (later structures overwrite earlier)."""
    X, Y, Z, half, halfz = _grid(shape, spacing)
    full = np.broadcast_shapes(X.shape, Y.shape, Z.shape)
    t = np.full(full, _T["air"], dtype=np.uint8)
    rb = np.broadcast_to(anat.body.level(X, Y, Z), full)
    fat_in = 1.0 - anat.skin
    muscle_in = fat_in - anat.fat
    cav_in = muscle_in - anat.muscle
    cavity = rb < cav_in
    inside_muscle = rb < muscle_in
    t[rb < 1.0] = _T["skin"]
    t[rb < fat_in] = _T["fat"]
    t[inside_muscle] = _T["muscle"]
    t[cavity] = _T["fat"]  # visceral fat fills the cavity around the organs
    o = anat.organs

    # Stomach: enhancing wall, fluid, and a gas cap anteriorly (supine: gas rises to low y).
    st = o["stomach"].level(X, Y, Z)
    stomach = (st < 1.0) & cavity
    t[stomach] = _T["stomach_wall"]
    lumen = stomach & (st < 0.78)
    t[lumen] = _T["gastric_fluid"]
    gas_level = o["stomach"].centre[1] - 0.35 * o["stomach"].semi[1]
    t[lumen & np.broadcast_to(Y < gas_level, full)] = _T["gas"]

    liver = ((o["liver_right"].level(X, Y, Z) < 1.0) | (o["liver_left"].level(X, Y, Z) < 1.0)) & cavity
    t[liver] = _T["liver"]
    t[(o["spleen"].level(X, Y, Z) < 1.0) & cavity] = _T["spleen"]
    t[(o["pancreas"].level(X, Y, Z) < 1.0) & cavity] = _T["pancreas"]
    for side in ("kidney_right", "kidney_left"):
        lvl = o[side].level(X, Y, Z)
        kid = (lvl < 1.0) & cavity
        t[kid] = _T["kidney_cortex"]
        t[kid & (lvl < 0.62)] = _T["kidney_medulla"]
    t[np.broadcast_to(o["aorta"].level(X, Y, Z) < 1.0, full) & cavity] = _T["aorta"]
    t[np.broadcast_to(o["vena_cava"].level(X, Y, Z) < 1.0, full) & cavity] = _T["vena_cava"]
    for m in ("psoas_right", "psoas_left"):
        t[(o[m].level(X, Y, Z) < 1.0) & cavity] = _T["muscle"]
    for m in ("paraspinal_right", "paraspinal_left"):
        t[np.broadcast_to(o[m].level(X, Y, Z) < 1.0, full) & inside_muscle] = _T["muscle"]

    # Spine: vertebral body (cortical shell, cancellous core, discs every ~0.5 slab units),
    # neural arch around the canal (CSF) and the spinous process.
    vb = np.broadcast_to(o["vertebra"].level(X, Y, Z), full)
    disc = np.broadcast_to(((Z * 1.9 + anat.disc_phase) % 1.0) < 0.17, full)
    t[(vb < 1.0) & inside_muscle] = _T["bone_cortical"]
    t[(vb < 0.8) & inside_muscle] = _T["bone_cancellous"]
    t[(vb < 1.0) & disc & inside_muscle] = _T["intervertebral_disc"]
    t[np.broadcast_to(o["arch"].level(X, Y, Z) < 1.0, full) & inside_muscle] = _T["bone_cortical"]
    t[np.broadcast_to(o["spinous"].level(X, Y, Z) < 1.0, full) & inside_muscle] = _T["bone_cortical"]
    t[np.broadcast_to(o["canal"].level(X, Y, Z) < 1.0, full)] = _T["csf"]

    # Ribs: short oblique arcs in the muscle wall of the upper abdomen, laterally and
    # posteriorly, descending anteriorly (so each axial slice cuts a few of them).
    theta = np.arctan2((Y - _BODY_Y) / anat.body.semi[1], X / anat.body.semi[0])
    in_band = (rb > cav_in + 0.01) & (rb < cav_in + 0.6 * anat.muscle + 0.02)
    lateral = np.broadcast_to((np.abs(np.cos(theta)) > 0.3) & (np.sin(theta) > -0.55), full)
    ribs = np.broadcast_to((((Z * 1.7 - 0.5 * theta + anat.rib_phase) % 1.0) < 0.22) & (Z > -0.35), full)
    t[in_band & lateral & ribs] = _T["bone_cortical"]

    # Lesions: isotropic in mm (radius in in-plane anatomy units), clipped to their organ,
    # at least ~1.6 voxels across so none vanishes on a coarse grid. Renal tumours may
    # bulge out of the kidney into the surrounding fat (exophytic), as they often do.
    hosts = {
        "liver": (_T["liver"],),
        "kidney": (_T["kidney_cortex"], _T["kidney_medulla"]),
        "pancreas": (_T["pancreas"],),
    }
    perirenal_fat = cavity & (t == _T["fat"])
    tumour = {"liver": _T["liver_tumor"], "kidney": _T["kidney_tumor"], "pancreas": _T["pancreas_tumor"]}
    for organ, centre, radius, modes in anat.lesions:
        semi = (
            max(radius, 0.8 * spacing[0] / half),
            max(radius, 0.8 * spacing[1] / half),
            max(radius * half / halfz, 0.8 * spacing[2] / halfz),
        )
        les = _Blob(centre, semi, 0.0, (0.0, 0.0), modes).level(X, Y, Z) < 1.0
        host = np.isin(t, hosts[organ])
        hit = les & (host | perirenal_fat) if organ == "kidney" else les & host
        if not hit.any() and host.any():
            # Too small for this grid: take the host voxel nearest the centre and its neighbours.
            d = (X - centre[0]) ** 2 * half**2 + (Y - centre[1]) ** 2 * half**2 + (Z - centre[2]) ** 2 * halfz**2
            d = np.where(host, np.broadcast_to(d, full), np.inf)
            seed_vox = np.zeros(full, bool)
            seed_vox[np.unravel_index(np.argmin(d), full)] = True
            hit = ndimage.binary_dilation(seed_vox) & host
        t[hit] = tumour[organ]
    return t


# T1-weighted-like MR signal as a function of the CT value, piecewise linear between knots:
# fat brightest, fluid dark, liver brighter than spleen, cortical bone a signal void,
# marrow bright. Not monotonic, so no window of the CT maps onto it: a real modality gap.
_MR_KNOTS_HU = (-1000.0, -500.0, -150.0, -100.0, -50.0, 0.0, 10.0, 60.0, 110.0, 120.0, 165.0, 320.0, 700.0)
_MR_KNOTS_SIGNAL = (0.0, 0.0, 700.0, 900.0, 600.0, 150.0, 120.0, 300.0, 520.0, 380.0, 250.0, 650.0, 40.0)


def mr_like(volume: PhantomVolume, seed: int = 0, noise_sd: float = 12.0, bias: float = 0.15) -> np.ndarray:
    """An MR-like image (float32, arbitrary units >= 0) of a phantom's anatomy: its CT values
    through the non-monotonic T1-like curve above, times a smooth multiplicative bias field
    (+-``bias``), plus Gaussian noise; air and gas (< -500 HU) stay exactly 0, the masked
    background that the schema's MR rule (z-score over non-zero voxels) expects. The
    labels of `volume` still apply voxel for voxel (same anatomy, same grid)."""
    rng = np.random.default_rng(seed)
    hu = volume.hu.astype(np.float32)
    signal = np.interp(hu, _MR_KNOTS_HU, _MR_KNOTS_SIGNAL).astype(np.float32)
    shape = hu.shape
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    gx, gy, gz = np.meshgrid(*axes, indexing="ij")
    c = rng.uniform(-1.0, 1.0, size=4).astype(np.float32)
    field = 1.0 + bias * np.tanh(c[0] * gx + c[1] * gy + 0.5 * c[2] * gz + c[3] * gx * gy)
    out = signal * field + rng.normal(0.0, noise_sd, size=shape).astype(np.float32)
    out = np.clip(out, 1.0, None)  # tissue never reads exactly 0 (0 marks background)
    out[hu < -500] = 0.0
    return out.astype(np.float32)


def make_phantom(
    seed: int,
    phase: str = "portal_venous",
    shape: Sequence[int] = (96, 96, 40),
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    *,
    noise_sd: float = 12.0,
    schema: LabelSchema | None = None,
) -> PhantomVolume:
    """A deterministic abdominal CT of `shape` voxels at `spacing` mm in contrast `phase`.

    Anatomy (body habitus, organ shapes and positions, 1-2 lesions each in liver, kidney
    and pancreas) depends only on `seed`; intensities only on `phase` (see
    :data:`PHASES`). The image is the tissue map's mean HU, blurred slightly (partial
    volume at edges) plus spatially correlated Gaussian noise of `noise_sd` HU whose
    pattern depends only on the seed, so two phases of one seed differ by contrast alone.
    The anatomy is scaled to the field of view (x, y) and to the slab (z), so every schema
    class is present from about 32 x 32 x 8 voxels up; a smaller grid raises ValueError.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {sorted(PHASES)}")
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"shape and spacing must be three positive values, got {shape}, {spacing}")
    schema = schema or _default_schema()

    tissue = _rasterise(_anatomy(seed), shape, spacing)

    # Labels from tissues via a lookup table (tissue index -> schema id).
    lut_label = np.zeros(len(TISSUES), np.uint8)
    for tname, cname in _TISSUE_CLASS.items():
        lut_label[_T[tname]] = schema.classes[cname]
    label = lut_label[tissue]
    missing = [c for c, i in schema.classes.items() if i != 0 and not (label == i).any()]
    if missing:
        raise ValueError(f"shape {shape} is too small for the phantom: classes {missing} have no voxels")

    lut_hu = np.array([PHASES[phase][n] for n in TISSUES], np.float32)
    clean = ndimage.gaussian_filter(lut_hu[tissue], sigma=(0.5, 0.5, 0.3), mode="nearest")
    nrng = np.random.default_rng([int(seed), 0x4015E])
    noise = ndimage.gaussian_filter(nrng.standard_normal(shape, dtype=np.float32), sigma=(0.7, 0.7, 0.0), mode="wrap")
    noise *= noise_sd / max(float(noise.std()), 1e-6)
    hu = np.clip(np.rint(clean + noise), HU_MIN, HU_MAX).astype(np.int16)
    return PhantomVolume(hu=hu, label=label, spacing=spacing, phase=phase, tissue=tissue, seed=int(seed))


# --------------------------------------------------------------------------- identifiers


@dataclass(frozen=True)
class PlantedIdentifiers:
    """Identifying values planted in every usual place of a written series.

    Each free-text value carries a ``ZZPHI`` prefix, a field tag and an 8-letter token
    derived from (seed, case), so values are unique, never substrings of one another and
    cannot occur by chance in other bytes (pixel data included: HU never encode ASCII
    letters). Dates and times are valid DA/TM values derived from the same hash.
    """

    patient_name: str
    patient_id: str
    other_patient_id: str
    birth_date: str
    patient_sex: str
    patient_age: str
    patient_address: str
    accession: str
    institution: str
    institution_address: str
    department: str
    station: str
    ae_title: str
    device_serial: str
    referring_physician: str
    performing_physician: str
    operator: str
    study_date: str
    study_time: str
    study_id: str
    study_description: str
    series_description: str
    requested_procedure_id: str
    requested_procedure_description: str
    image_comments: str
    private_text: str

    # Too short to be distinctive, and a de-identifier may legitimately keep them
    # (PS3.15 "Retain Patient Characteristics"): planted, but not in strings().
    _NOT_SCANNED = ("patient_sex", "patient_age")

    def strings(self) -> list[str]:
        """Every distinctive planted value, for byte scans of outputs."""
        return [getattr(self, f.name) for f in fields(self) if f.name not in self._NOT_SCANNED]

    @classmethod
    def for_case(cls, seed: int, case: int) -> "PlantedIdentifiers":
        digest = hashlib.sha256(f"fedimg-phantom-phi:{int(seed)}:{int(case)}".encode()).digest()
        tok = "".join(chr(ord("A") + b % 26) for b in digest[:8])
        n = int.from_bytes(digest[8:16], "little")
        birth_year, study_year = 1930 + n % 40, 2010 + (n >> 8) % 12
        birth = f"{birth_year:04d}{1 + (n >> 16) % 12:02d}{1 + (n >> 24) % 28:02d}"
        smonth, sday = 1 + (n >> 32) % 12, 1 + (n >> 40) % 28
        study = f"{study_year:04d}{smonth:02d}{sday:02d}"
        age = study_year - birth_year - (1 if (smonth, sday) < (int(birth[4:6]), int(birth[6:8])) else 0)
        m = int.from_bytes(digest[16:24], "little")
        time = f"{7 + m % 11:02d}{(m >> 8) % 60:02d}{(m >> 16) % 60:02d}.{(m >> 24) % 1_000_000:06d}"
        return cls(
            patient_name=f"ZZPHIFAM{tok}^ZZPHIGIV{tok}",
            patient_id=f"ZZPHIPID{tok}",
            other_patient_id=f"ZZPHIOID{tok}",
            birth_date=birth,
            patient_sex="FM"[n % 2],
            patient_age=f"{age:03d}Y",
            patient_address=f"ZZPHIADR{tok} 7 Phantom Lane",
            accession=f"ZZPHIACC{tok}",  # SH: 16 characters at most
            institution=f"ZZPHIINS{tok} General Hospital",
            institution_address=f"ZZPHIIAD{tok} 1 Hospital Road",
            department=f"ZZPHIDEP{tok} Radiology",
            station=f"ZZPHISTN{tok}",  # SH
            ae_title=f"ZZPHIAE{tok}",  # AE: 16 characters at most
            device_serial=f"ZZPHISER{tok}",
            referring_physician=f"ZZPHIREF{tok}^Anna",
            performing_physician=f"ZZPHIPRF{tok}^Jonas",
            operator=f"ZZPHIOPR{tok}^Lea",
            study_date=study,
            study_time=time,
            study_id=f"ZZPHISID{tok}",  # SH
            study_description=f"ZZPHISDS{tok} CT ABDOMEN",
            series_description=f"ZZPHISED{tok} ABD 1.5",
            requested_procedure_id=f"ZZPHIRPI{tok}",  # SH
            requested_procedure_description=f"ZZPHIRPD{tok} CT abdomen with contrast",
            image_comments=f"ZZPHICOM{tok} comment",
            private_text=f"ZZPHIPRV{tok} vendor note",
        )


# --------------------------------------------------------------------------- DICOM series

_NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
_COMPRESSED = (RLELossless, JPEGLSLossless, JPEG2000Lossless)
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0009, "FEDIMG PHANTOM"


def _directions(orientation) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row_dir, col_dir, normal) from ImageOrientationPatient-style 6 values: the first
    three are the direction of increasing column index, the next three of increasing row."""
    o = np.asarray(orientation, dtype=float).reshape(-1)
    if o.shape != (6,):
        raise ValueError(f"orientation must have 6 values, got {orientation!r}")
    r, c = o[:3], o[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise ValueError(f"orientation {tuple(o)} is not an orthonormal pair of directions")
    # Tolerate DICOM's limited precision, then work with an exactly orthonormal frame.
    r = r / np.linalg.norm(r)
    c = c - (c @ r) * r
    c = c / np.linalg.norm(c)
    return r, c, np.cross(r, c)


def volume_affine_lps(volume: PhantomVolume, origin, orientation) -> np.ndarray:
    """4x4 LPS affine of the voxel grid ``[x, y, z]`` as :func:`write_dicom_series` writes it."""
    r, c, n = _directions(orientation)
    sx, sy, sz = volume.spacing
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = r * sx, c * sy, n * sz
    aff[:3, 3] = np.asarray(origin, dtype=float)
    return aff


def volume_affine_ras(volume: PhantomVolume, origin, orientation) -> np.ndarray:
    """4x4 RAS+ (NIfTI) affine of the grid as written: the LPS affine, x and y rows negated."""
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume_affine_lps(volume, origin, orientation)


def _ds(values) -> list[DSfloat]:
    # DS holds 16 characters at most; auto_format rounds instead of raising.
    return [DSfloat(float(v) + 0.0, auto_format=True) for v in values]  # + 0.0: no "-0.0"


def _uid(*parts, avoid: Sequence[str] = ()) -> UID:
    """A deterministic UID (pydicom's prefix) that contains no planted digit string."""
    for attempt in range(100):
        uid = generate_uid(entropy_srcs=[*map(str, parts), str(attempt)])
        if not any(a in uid for a in avoid):
            return uid
    raise RuntimeError("could not generate a UID free of planted strings")  # pragma: no cover


def _stored_values(hu: np.ndarray, rescale) -> tuple[np.ndarray, int]:
    slope, intercept = float(rescale[0]), float(rescale[1])
    if slope == 0:
        raise ValueError("rescale slope must not be 0")
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    lo, hi = stored.min(), stored.max()
    if lo >= 0 and hi <= 65535:
        return stored.astype(np.uint16), 0
    if lo >= -32768 and hi <= 32767:
        return stored.astype(np.int16), 1
    raise ValueError(f"rescale {rescale} maps the HU range to [{lo}, {hi}], which does not fit 16 bits")


def write_dicom_series(
    volume: PhantomVolume,
    out_dir: str | os.PathLike,
    identifiers: PlantedIdentifiers,
    *,
    origin: Sequence[float] = (-150.0, -180.0, -300.0),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    file_names: str = "random",
    rescale: tuple[float, float] = (1.0, -1024.0),
    seed: int = 0,
    series_number: int = 2,
    instance_order: str = "shuffled",
    modality: str = "CT",
) -> list[Path]:
    """Write `volume` as a CT Image Storage series, one file per slice, into `out_dir`.

    ``modality="MR"`` writes an MR Image Storage series of the same anatomy instead: the
    pixel values are :func:`mr_like` of the volume (seeded by `seed`), stored as unsigned
    integers without a rescale (MR has no Hounsfield scale; `rescale` is not used), with MR
    acquisition attributes in place of the CT ones.

    Slice ``k`` (``volume.hu[:, :, k]``, transposed to DICOM's [row, column]) is at
    ``ImagePositionPatient = origin + k * slice_spacing * normal``. Stored values are
    ``(HU - intercept) / slope`` (uint16 when they fit, else int16), exact when that is an
    integer. `transfer_syntax` is a native one (Explicit/Implicit VR Little Endian,
    Deflated -- whose header bytes are compressed, so byte scans do not see them) or RLE
    Lossless, JPEG-LS Lossless, JPEG 2000 Lossless. UIDs not given are derived
    deterministically from the identifiers, the phase and `seed`; so are the file names
    (``"random"``: 16 hex digits, no extension; ``"instance"``: ``IM%04d`` of the
    InstanceNumber) and the InstanceNumbers (`instance_order` ``"shuffled"``,
    ``"ascending"`` or ``"descending"`` along the normal). Files are written atomically.

    Files already in `out_dir` are left alone (same name: replaced), so write each series
    into its own folder. Returns the file paths in slice order (ascending position along
    the normal).
    """
    ts = UID(str(transfer_syntax))
    if ts not in _NATIVE + _COMPRESSED:
        raise ValueError(f"unsupported transfer syntax {ts} ({ts.name}); use one of {[u.name for u in _NATIVE + _COMPRESSED]}")
    if file_names not in ("random", "instance"):
        raise ValueError(f"file_names must be 'random' or 'instance', got {file_names!r}")
    if instance_order not in ("shuffled", "ascending", "descending"):
        raise ValueError(f"instance_order must be shuffled, ascending or descending, got {instance_order!r}")
    r, c, n = _directions(orientation)
    origin = np.asarray(origin, dtype=float)
    nx, ny, nz = volume.hu.shape
    dx, dy, dz = volume.spacing
    ids = identifiers
    avoid = ids.strings()
    study_uid = study_uid or _uid("study", ids.patient_id, ids.accession, seed, avoid=avoid)
    series_uid = series_uid or _uid("series", study_uid, volume.phase, series_number, seed, avoid=avoid)
    frame_of_reference_uid = frame_of_reference_uid or _uid("for", series_uid, avoid=avoid)
    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be 'CT' or 'MR', got {modality!r}")
    mr = modality == "MR"
    if mr:
        stored, pixel_rep = np.rint(mr_like(volume, seed)).astype(np.uint16), 0
    else:
        stored, pixel_rep = _stored_values(volume.hu, rescale)
    sop_class = MRImageStorage if mr else CTImageStorage

    rng = np.random.default_rng([int(seed), zlib.crc32(series_uid.encode())])
    if instance_order == "shuffled":
        numbers = rng.permutation(nz) + 1
    elif instance_order == "ascending":
        numbers = np.arange(1, nz + 1)
    else:
        numbers = np.arange(nz, 0, -1)
    if file_names == "random":
        names: list[str] = []
        while len(names) < nz:
            name = rng.bytes(8).hex().upper()
            if name not in names:
                names.append(name)
    else:
        names = [f"IM{int(num):04d}" for num in numbers]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    contrast = volume.phase != "non_contrast"
    paths = []
    for k in range(nz):
        ipp = origin + k * dz * n
        sop_uid = _uid("sop", series_uid, k, avoid=avoid)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ts
        meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        meta.SourceApplicationEntityTitle = ids.ae_title
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ids.study_date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ids.study_time
        ds.AcquisitionDateTime = ids.study_date + ids.study_time
        ds.AccessionNumber = ids.accession
        ds.Modality = modality
        ds.Manufacturer = "FEDIMG"
        ds.InstitutionName = ids.institution
        ds.InstitutionAddress = ids.institution_address
        ds.ReferringPhysicianName = ids.referring_physician
        ds.StationName = ids.station
        ds.StudyDescription = ids.study_description
        ds.SeriesDescription = ids.series_description
        ds.InstitutionalDepartmentName = ids.department
        ds.PerformingPhysicianName = ids.performing_physician
        ds.OperatorsName = ids.operator
        ds.ManufacturerModelName = f"Phantom {modality}"
        ds.PatientName = ids.patient_name
        ds.PatientID = ids.patient_id
        ds.PatientBirthDate = ids.birth_date
        ds.PatientSex = ids.patient_sex
        ds.OtherPatientIDs = ids.other_patient_id  # retired, but still written by many scanners
        other = Dataset()
        other.PatientID = ids.other_patient_id
        other.TypeOfPatientID = "TEXT"
        ds.OtherPatientIDsSequence = DicomSequence([other])
        ds.PatientAge = ids.patient_age
        ds.PatientAddress = ids.patient_address
        ds.BodyPartExamined = "ABDOMEN"
        if contrast:
            ds.ContrastBolusAgent = "GADOTERATE" if mr else "IOHEXOL 350"
            ds.ContrastBolusRoute = "IV"
            ds.ContrastBolusVolume = 15 if mr else 100
        ds.SliceThickness = _ds([dz])[0]
        ds.DeviceSerialNumber = ids.device_serial
        ds.SoftwareVersions = "fedimg-phantom 1"
        if mr:  # a T1-weighted 3D gradient echo
            ds.ScanningSequence = "GR"
            ds.SequenceVariant = "SP"
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "3D"
            ds.RepetitionTime = 4.0
            ds.EchoTime = 1.9
            ds.EchoTrainLength = 1
            ds.FlipAngle = 10
            ds.MagneticFieldStrength = 1.5
            ds.ImagingFrequency = 63.87
            ds.ImagedNucleus = "1H"
        else:
            ds.ScanOptions = "HELICAL MODE"
            ds.KVP = 120
            ds.DataCollectionDiameter = 500
            ds.ReconstructionDiameter = _ds([max(nx * dx, ny * dy)])[0]
            ds.GantryDetectorTilt = 0
            ds.TableHeight = 150
            ds.RotationDirection = "CW"
            ds.ExposureTime = 500
            ds.XRayTubeCurrent = 250
            ds.Exposure = 125
            ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ids.study_id
        ds.SeriesNumber = int(series_number)
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = int(numbers[k])
        ds.ImagePositionPatient = _ds(ipp)
        ds.ImageOrientationPatient = _ds([*r, *c])
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds([ipp @ n])[0]
        ds.ImageComments = ids.image_comments
        request = Dataset()
        request.AccessionNumber = ids.accession
        request.RequestedProcedureID = ids.requested_procedure_id
        request.RequestedProcedureDescription = ids.requested_procedure_description
        request.ScheduledProcedureStepID = ids.requested_procedure_id
        ds.RequestAttributesSequence = DicomSequence([request])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = _ds([dy, dx])  # [between rows, between columns]
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        if mr:
            ds.WindowCenter, ds.WindowWidth = 400, 800
        else:
            ds.WindowCenter = 40
            ds.WindowWidth = 400
            ds.RescaleIntercept = _ds([rescale[1]])[0]
            ds.RescaleSlope = _ds([rescale[0]])[0]
            ds.RescaleType = "HU"
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x10, "LO", ids.private_text)
        block.add_new(0x11, "LO", ids.patient_id)  # vendors copy IDs into private tags
        block.add_new(0x12, "SH", ids.accession)

        frame = np.ascontiguousarray(stored[:, :, k].T)  # DICOM frames are [row, column]
        if ts in _COMPRESSED:
            # generate_instance_uid=False: pydicom 3 otherwise gives the (lossless!) result a new SOP Instance UID
            ds.compress(ts, frame, generate_instance_uid=False)
        else:
            ds.add_new(0x7FE00010, "OW", frame.tobytes())
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = out / names[k]
        atomic.write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- site


@dataclass
class PhantomSite:
    """What :func:`write_phantom_site` wrote. ``cases[i]`` has its series in
    ``dicom_dir / cases[i]``, its labels in ``label_paths[i]`` and the identifiers
    ``identifiers[i]`` planted in its headers."""

    root: Path
    dicom_dir: Path
    labels_dir: Path
    label_map: Path
    cases: list[str]
    identifiers: list[PlantedIdentifiers]
    classes: list[str]
    phase: str
    label_format: str = "nifti"
    local_values: dict[str, int] | None = None
    label_paths: list[Path] | None = None
    series_uids: list[str] | None = None
    origins: list[tuple[float, float, float]] | None = None
    orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0)

    def series_dir(self, i: int) -> Path:
        return self.dicom_dir / self.cases[i]


def site_label_volume(label: np.ndarray, classes: Sequence[str], local_values: dict[str, int], schema: LabelSchema) -> np.ndarray:
    """Schema-id labels -> a site's local labels: only `classes` are labelled; a lesion
    whose class the site does not label counts as its organ when the organ is labelled;
    everything else is background 0."""
    lut = np.zeros(max(schema.classes.values()) + 1, dtype=np.int64)
    for name, sid in schema.classes.items():
        if name in classes:
            lut[sid] = local_values[name]
        else:
            organ = schema.organ_of(name)
            if organ is not None and organ != name and organ in classes:
                lut[sid] = local_values[organ]
    out = lut[label]
    return out.astype(np.uint8 if out.max() <= 255 else np.uint16)


def _write_seg(series: list[Path], local: np.ndarray, segment_names: list[str], classes: list[str], out: Path,
               identifiers: PlantedIdentifiers, schema: LabelSchema, uid_seed: str) -> None:
    """A BINARY DICOM SEG of the series, one segment per labelled class (``local`` holds
    segment numbers 1..n on the image grid); UIDs deterministic and free of planted strings."""
    avoid = identifiers.strings()
    write_seg(
        series,  # slice order
        local,
        segment_names,
        classes,
        out,
        schema,
        series_instance_uid=_uid("seg-series", uid_seed, avoid=avoid),
        sop_instance_uid=_uid("seg-sop", uid_seed, avoid=avoid),
        series_number=300,
        instance_number=1,
        manufacturer="FEDIMG",
        manufacturer_model_name="Phantom SEG",
        software_versions="fedimg-phantom 1",
        device_serial_number=identifiers.device_serial,
    )


def write_phantom_site(
    root: str | os.PathLike,
    classes: Sequence[str],
    n_cases: int,
    seed: int,
    phase: str = "portal_venous",
    shape: Sequence[int] = (96, 96, 40),
    spacing: Sequence[float] = (1.5, 1.5, 2.5),
    local_values: dict[str, int] | None = None,
    label_format: str = "nifti",
    transfer_syntax: str = ExplicitVRLittleEndian,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    *,
    segment_labels: dict[str, str] | None = None,
    file_names: str = "random",
    schema: LabelSchema | None = None,
    modality: str = "CT",
) -> PhantomSite:
    """Write a phantom site under `root`, labelling only `classes`.

    ``modality="MR"``: an MR scanner's site, the same kind of anatomy written as MR series
    (:func:`mr_like` intensities; see :func:`write_dicom_series`).

    Layout::

        root/dicom/case_000/<files>      one CT series per case (names never carry PHI)
        root/labels/case_000.nii.gz      label_format="nifti": site-local values on the image grid
        root/labels/case_000.dcm         label_format="seg": DICOM SEG, one segment per class
        root/site-labels.yaml            the site label map (local value or segment -> class)

    Case ``i`` is :func:`make_phantom` of seed ``seed * 1000 + i`` with identifiers
    ``PlantedIdentifiers.for_case(seed, i)`` and an origin jittered per case. Local label
    values default to 1..n in the order of `classes` (deliberately not the schema ids);
    `local_values` overrides them. The NIfTI is uint8 (uint16 for values > 255) in the
    DICOM voxel order with the affine :func:`volume_affine_ras` (qform = sform, code 1),
    as ITK or 3D Slicer writes it. SEG segment labels are the class names unless
    `segment_labels` renames them; the label map then keys segments by label.
    """
    schema = schema or _default_schema()
    classes = list(classes)
    if not classes:
        raise ValueError("a site labels at least one class")
    for cname in classes:
        if cname not in schema.classes or cname == "background":
            raise ValueError(f"{cname!r} is not a foreground class of schema {schema.name}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes repeat: {classes}")
    if label_format not in ("nifti", "seg"):
        raise ValueError(f"label_format must be 'nifti' or 'seg', got {label_format!r}")
    values = {c: i for i, c in enumerate(classes, start=1)}
    if local_values:
        unknown = set(local_values) - set(classes)
        if unknown:
            raise ValueError(f"local_values names classes the site does not label: {sorted(unknown)}")
        values.update({k: int(v) for k, v in local_values.items()})
    if len(set(values.values())) != len(values) or not all(1 <= v <= 65535 for v in values.values()):
        raise ValueError(f"local label values must be distinct integers in [1, 65535], got {values}")
    seg_names = [(segment_labels or {}).get(c, c) for c in classes]
    if len(set(seg_names)) != len(seg_names):
        raise ValueError(f"segment labels repeat: {seg_names}")

    root = Path(root)
    dicom_dir, labels_dir = root / "dicom", root / "labels"
    labels_dir.mkdir(parents=True, exist_ok=True)
    site = PhantomSite(
        root=root,
        dicom_dir=dicom_dir,
        labels_dir=labels_dir,
        label_map=root / "site-labels.yaml",
        cases=[],
        identifiers=[],
        classes=classes,
        phase=phase,
        label_format=label_format,
        local_values=dict(values),
        label_paths=[],
        series_uids=[],
        origins=[],
        orientation=tuple(float(v) for v in orientation),
    )
    for i in range(int(n_cases)):
        case_seed = int(seed) * 1000 + i
        case = f"case_{i:03d}"
        vol = make_phantom(case_seed, phase, shape, spacing, schema=schema)
        ids = PlantedIdentifiers.for_case(seed, i)
        jrng = np.random.default_rng([case_seed, 0x0121])
        # Where the table put the patient differs from scan to scan.
        origin = tuple(float(v) for v in np.round(np.array([-150.0, -180.0, -300.0]) + jrng.uniform(-10, 10, 3), 2))
        paths = write_dicom_series(
            vol, dicom_dir / case, ids, origin=origin, orientation=orientation, transfer_syntax=transfer_syntax,
            file_names=file_names, seed=case_seed, modality=modality,
        )
        series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        if label_format == "nifti":
            local = site_label_volume(vol.label, classes, values, schema)
            label_path = labels_dir / f"{case}.nii.gz"
            save_atomic(clean_image(local, volume_affine_ras(vol, origin, orientation)), label_path)
        else:
            seg_numbers = {c: n for n, c in enumerate(classes, start=1)}
            local = site_label_volume(vol.label, classes, seg_numbers, schema)
            label_path = labels_dir / f"{case}.dcm"
            _write_seg(paths, local, seg_names, classes, label_path, ids, schema, uid_seed=f"{series_uid}:{case}")
        site.cases.append(case)
        site.identifiers.append(ids)
        site.label_paths.append(label_path)
        site.series_uids.append(series_uid)
        site.origins.append(origin)

    if label_format == "nifti":
        labels: dict = {0: "background", **{values[c]: c for c in classes}}
    else:
        labels = {name: c for name, c in zip(seg_names, classes)}
    doc = {"format": LABEL_MAP_FORMAT, "schema": schema.name, "schema_version": schema.version, "labels": labels}
    atomic.write_text(site.label_map, yaml.safe_dump(doc, sort_keys=False))
    return site
