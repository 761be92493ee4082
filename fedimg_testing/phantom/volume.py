"""The phantom's anatomy (seeded smooth shapes), its CT volume and an MR-like rendering of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from fedimg_testing.phantom.tissues import _T, _TISSUE_CLASS, HU_MAX, HU_MIN, PHASES, TISSUES, _default_schema
from preprocessing.schema import LabelSchema


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
        """The voxel grid ``(x, y, z)``."""
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
