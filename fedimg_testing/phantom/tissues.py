"""The phantom's tissues, their mean HU per contrast phase, and the default federation's sites."""

from __future__ import annotations

from functools import lru_cache

from preprocessing.schema import LabelSchema, load_schema

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
PHASES: dict[str, dict[str, float]] = {phase: {tissue: float(values[i]) for tissue, values in _PHASE_TABLE.items()} for i, phase in enumerate(_PHASE_NAMES)}

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
