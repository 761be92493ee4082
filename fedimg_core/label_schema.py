"""The label schema and site label map file formats: their keys, types and rules.

A **label schema** (``format: fedimg-label-schema``, one per federation, versioned) names the
classes and their ids, groups organs with their lesions and says how each modality is
normalised. A **site label map** (``format: fedimg-site-labels``) says what each local label
value or DICOM SEG segment name of a site means in that schema. `preprocessing.schema` reads
the YAML files, validates them with these models and builds the objects the code works with.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from fedimg_core.config import ConfigModel, ConfigProblem, did_you_mean, short
from fedimg_core.config_types import integer, matches, number, one_of
from fedimg_core.errors import ConfigError

__all__ = [
    "DEFAULT_MODALITIES",
    "DEFAULT_SURFACE_TOLERANCE_MM",
    "IGNORE",
    "LABEL_MAP_FORMAT",
    "NORMALISATIONS",
    "SCHEMA_FORMAT",
    "VERSION_PATTERN",
    "LabelSchemaFile",
    "ModalityRuleFile",
    "SchemaError",
    "SiteLabelMapFile",
]

SCHEMA_FORMAT = "fedimg-label-schema"
LABEL_MAP_FORMAT = "fedimg-site-labels"
IGNORE = "ignore"  # a site label mapped here gets the schema's ignore label
NORMALISATIONS = ("ct_window", "zscore", "none")
VERSION_PATTERN = r"^(\d+)\.(\d+)\.(\d+)$"
CLASS_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,47}$"
SCHEMA_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_CLASS_ID = 254
MAX_LOCAL_VALUE = 65535
# normalised surface Dice tolerance of a class the schema's ``surface_tolerance_mm`` does not name
# (the lesion tolerance of the FLARE 2023 evaluation), and the largest one a schema may declare
DEFAULT_SURFACE_TOLERANCE_MM = 2.0
MAX_SURFACE_TOLERANCE_MM = 50.0
# the rule of a schema that names no modality: the ConDistFL abdominal CT window
DEFAULT_MODALITIES: dict[str, dict[str, Any]] = {"CT": {"normalisation": "ct_window", "clip": [-54, 258], "centre": 100, "scale": 50}}

Version = Annotated[str, matches(VERSION_PATTERN, "MAJOR.MINOR.PATCH, e.g. 1.0.0")]


class SchemaError(ConfigError):
    """A label schema or site label map file is invalid; the message names the file and the key.

    A `ConfigError` (so a `UserError`: the CLIs print it as one line); ``.file`` and ``.key``
    name the file and the first key at fault, ``.problems`` lists every problem found.
    """


class ModalityRuleFile(ConfigModel):
    """How images of one modality are normalised for training (``modalities.CT`` of a schema)."""

    normalisation: Annotated[str, one_of(*NORMALISATIONS)] = Field(
        description="ct_window: clip to [low, high] then (x - centre) / scale; zscore: per image; none: as stored."
    )
    clip: list[Annotated[float, number()]] | None = Field(None, description="[low, high] intensity window (ct_window only).")
    centre: Annotated[float, number()] = Field(0.0, description="Subtracted after clipping (ct_window).")
    scale: Annotated[float, number()] = Field(1.0, description="Divides after centring (ct_window); positive.")

    @model_validator(mode="after")
    def _window(self) -> ModalityRuleFile:
        if self.normalisation == "ct_window":
            clip = self.clip
            if clip is None or len(clip) != 2 or not clip[0] < clip[1]:
                raise ConfigProblem("clip", f"must be [low, high] with low < high for ct_window (got {short(clip)})")
            if self.scale <= 0:
                raise ConfigProblem("scale", f"must be a positive number (got {short(self.scale)})")
        return self


def _class_names(value: object) -> object:
    """Refuse a class name that is not a short lower-case identifier, naming it as the key."""
    if isinstance(value, dict):
        if not value:
            raise ValueError("must map class names to integer ids")
        for name in value:
            if not isinstance(name, str) or not re.match(CLASS_NAME_PATTERN, name):
                raise ConfigProblem(str(name), "class names are lower-case letters, digits and _ (at most 48, starting with a letter)")
    return value


class LabelSchemaFile(ConfigModel):
    """A federation's label schema file (``preprocessing/schemas/abdominal-ct.yaml``)."""

    format: Annotated[str, one_of(SCHEMA_FORMAT)] = Field(description=f"Always {SCHEMA_FORMAT!r}.")
    name: Annotated[str, matches(SCHEMA_NAME_PATTERN, "a short name (letters, digits, _ . -)")] = Field(description="The schema's name.")
    version: Version = Field(description="MAJOR.MINOR.PATCH; datasets and label maps of another major version are refused.")
    ignore_label: Annotated[int, integer(1, 255)] = Field(255, description="Label value of voxels a site maps to 'ignore'; not a class id.")
    classes: Annotated[dict[str, Annotated[int, integer(0, MAX_CLASS_ID)]], BeforeValidator(_class_names)] = Field(
        description="Class name -> id: 'background: 0' and ids contiguous from 0."
    )
    groups: dict[str, list[str] | None] | None = Field(None, description="Organ -> its lesion classes; an ungrouped class is an organ of its own.")
    target_spacing: list[Annotated[float, number(positive=True)]] = Field(
        default_factory=lambda: [1.5, 1.5, 1.5],
        description="Training voxel spacing in mm (three numbers, each below 50).",
        json_schema_extra={"minItems": 3, "maxItems": 3},
    )
    modalities: dict[str, ModalityRuleFile] | None = Field(None, description="Modality -> intensity rule (default: the CT window).")
    class_notes: dict[str, str] | None = Field(None, description="Free-text notes per class for annotators (not used by code).")
    empty_mask_dice: dict[str, Literal["skip", "one"]] | None = Field(
        None,
        description=(
            "Foreground class name -> what an image whose reference has none of the class scores for it: 'skip' (the default: "
            "not scored, a false positive scores 0) or 'one' (Dice 1 when the prediction is empty too, 0 otherwise: "
            "SIIM-ACR's pneumothorax rule, for a finding most images do not have; an empty mask is then a full label)."
        ),
    )
    surface_tolerance_mm: dict[str, Annotated[float, number(0, MAX_SURFACE_TOLERANCE_MM, exclusive_minimum=True)]] | None = Field(
        None,
        description=(
            "Foreground class name -> tolerance in mm of its normalised surface Dice (NSD) in out-of-federation "
            f"evaluation; a class not named here uses {DEFAULT_SURFACE_TOLERANCE_MM} mm."
        ),
    )

    @field_validator("target_spacing")
    @classmethod
    def _spacing(cls, value: list[float]) -> list[float]:
        if len(value) != 3 or any(s >= 50 for s in value):
            raise ValueError(f"must be three positive numbers in mm, each below 50 (got {short(value)})")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LabelSchemaFile:
        classes = self.classes
        if classes.get("background") != 0:
            raise ConfigProblem("classes", "must contain 'background: 0'")
        ids = sorted(classes.values())
        if ids != list(range(len(ids))):
            raise ConfigProblem("classes", f"ids must be unique and contiguous from 0 (got {ids})")
        if self.ignore_label in ids:
            raise ConfigProblem("ignore_label", f"must be an integer in [1, 255] that is not a class id (got {self.ignore_label})")
        seen: set[str] = set()
        for organ, lesions in (self.groups or {}).items():
            for member in [organ, *(lesions or [])]:
                if member not in classes or member == "background":
                    what = "not a foreground class" if member == organ else f"{member!r} is not a foreground class"
                    raise ConfigProblem(f"groups.{organ}", f"{what}{did_you_mean(member, [c for c in classes if c != 'background'])}")
                if member in seen:
                    raise ConfigProblem(f"groups.{organ}", f"{member!r} is in more than one group")
                seen.add(member)
        for name in self.empty_mask_dice or {}:
            if name not in classes or name == "background":
                raise ConfigProblem(f"empty_mask_dice.{name}", f"not a foreground class{did_you_mean(name, [c for c in classes if c != 'background'])}")
        for name in self.surface_tolerance_mm or {}:
            if name not in classes or name == "background":
                raise ConfigProblem(f"surface_tolerance_mm.{name}", f"not a foreground class{did_you_mean(name, [c for c in classes if c != 'background'])}")
        return self

    def organ_groups(self) -> dict[str, tuple[str, ...]]:
        """Each organ with its lesion classes; an ungrouped foreground class is an organ of its own.

        Returns:
            Organ name -> lesion class names, grouped organs first (in file order).
        """
        groups = {organ: tuple(lesions or ()) for organ, lesions in (self.groups or {}).items()}
        grouped = {c for organ, lesions in groups.items() for c in (organ, *lesions)}
        groups.update({name: () for name in self.classes if name != "background" and name not in grouped})
        return groups

    def modality_rules(self) -> dict[str, ModalityRuleFile]:
        """The modality rules, or the default CT window when the schema names none.

        Returns:
            Modality -> rule.
        """
        return dict(self.modalities) if self.modalities else {m: ModalityRuleFile.model_validate(r) for m, r in DEFAULT_MODALITIES.items()}


def _local_values(value: object) -> object:
    """Refuse a local label that is neither a label value in range nor a segment name, naming it as the key."""
    if isinstance(value, dict):
        if not value:
            raise ValueError("must map local label values (or segment names) to schema class names")
        for local in value:
            if isinstance(local, bool) or not isinstance(local, (int, str)):
                raise ConfigProblem(str(local), "keys are integer label values or segment names")
            if isinstance(local, int) and not 0 <= local <= MAX_LOCAL_VALUE:
                raise ConfigProblem(str(local), f"label values must be in [0, {MAX_LOCAL_VALUE}]")
    return value


class SiteLabelMapFile(ConfigModel):
    """A site's label map file (``site-labels.yaml``): local label value or segment name -> schema class.

    The rules that need the federation's schema (its name, major version and classes) are
    checked by `problems_against`.
    """

    format: Annotated[str, one_of(LABEL_MAP_FORMAT)] = Field(description=f"Always {LABEL_MAP_FORMAT!r}.")
    schema_name: str = Field(alias="schema", description="Name of the federation's label schema this map was written for.")
    schema_version: Version = Field(description="Version of that schema; its major version must be the schema's.")
    labels: Annotated[dict[int | str, str], BeforeValidator(_local_values)] = Field(
        description="Local label value (integer) or DICOM SEG segment name -> schema class name or 'ignore'."
    )

    def problems_against(self, name: str, version: str, classes: dict[str, int], source: str) -> list[tuple[str, str]]:
        """What in this map does not fit the federation's schema.

        Args:
            name: the schema's name.
            version: the schema's version (MAJOR.MINOR.PATCH).
            classes: the schema's class name -> id.
            source: where the schema was read from (named in the schema-name problem).

        Returns:
            (key path, problem) pairs; empty when the map fits.
        """
        problems: list[tuple[str, str]] = []
        if self.schema_name != name:
            problems.append(("schema", f"is {self.schema_name!r} but the federation schema is {name!r} ({source})"))
        if self.schema_version.split(".")[0] != version.split(".")[0]:
            problems.append(("schema_version", f"{self.schema_version} was written for another major version than the schema's {version}"))
        if problems:  # the classes of a schema the map was not written for say nothing more
            return problems
        for local, target in self.labels.items():
            if target != IGNORE and target not in classes:
                problems.append((f"labels.{local}", f"{target!r} is not a class of schema {name}{did_you_mean(target, [*classes, IGNORE])}"))
        if not problems and not any(t not in ("background", IGNORE) for t in self.labels.values()):
            problems.append(("labels", "maps nothing to a foreground class"))
        return problems
