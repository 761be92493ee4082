"""The federation label schema and a site's label map: read, validated, and the objects the code uses.

* The **label schema** (one per federation, versioned) names the classes and their ids,
  groups organs with their lesions and says how each modality is normalised. The default
  one ships in ``preprocessing/schemas/abdominal-ct.yaml``.
* A **site label map** says what each local label value (or DICOM SEG segment name) of a
  site means in the schema, e.g. ``{0: background, 1: liver, 2: liver_tumor}``; a value
  can also be mapped to ``ignore`` (the schema's ignore label, masked by losses).

The file formats are the models of `fedimg_core.label_schema`; errors are ``SchemaError``
(a `ConfigError`) naming the file and the key at fault.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from fedimg_core.atomic import FileReadError, read_small_file
from fedimg_core.config import format_problems, validate_config
from fedimg_core.label_schema import (
    DEFAULT_SURFACE_TOLERANCE_MM,
    IGNORE,
    LABEL_MAP_FORMAT,
    SCHEMA_FORMAT,
    LabelSchemaFile,
    SchemaError,
    SiteLabelMapFile,
)

__all__ = [
    "DEFAULT_SCHEMA",
    "DEFAULT_SURFACE_TOLERANCE_MM",
    "IGNORE",
    "LABEL_MAP_FORMAT",
    "SCHEMA_FORMAT",
    "LabelSchema",
    "ModalityRule",
    "SchemaError",
    "SiteLabelMap",
    "builtin_schema_path",
    "label_map_for_classes",
    "load_label_map",
    "load_schema",
    "parse_label_map",
    "parse_schema",
]

DEFAULT_SCHEMA = Path(__file__).with_name("schemas") / "abdominal-ct.yaml"


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = read_small_file(path, what).decode("utf-8")
    except FileReadError as exc:
        raise SchemaError(str(exc), file=path) from None
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read ({exc.strerror or exc})", file=path) from None
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: not a UTF-8 text file", file=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SchemaError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', None) or exc})", file=path) from None
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected a mapping at the top level", file=path)
    return data


@dataclass(frozen=True)
class ModalityRule:
    """How images of one modality are normalised (``modalities.<name>`` of the schema)."""

    normalisation: str  # "ct_window" | "zscore" | "none"
    clip: tuple[float, float] | None = None
    centre: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class LabelSchema:
    """A federation's label schema: classes and ids, organ groups, ignore label, intensity rules."""

    name: str
    version: str
    classes: dict[str, int]  # name -> id, background 0
    groups: dict[str, tuple[str, ...]]  # organ -> lesion classes
    ignore_label: int
    target_spacing: tuple[float, float, float]
    modalities: dict[str, ModalityRule]
    source: str = "<memory>"
    class_notes: dict[str, str] = field(default_factory=dict)
    surface_tolerance_mm: dict[str, float] = field(default_factory=dict)  # as declared; see `surface_tolerance`
    empty_mask_one: frozenset[int] = frozenset()  # class ids whose empty reference scores Dice 1 with an empty prediction (``empty_mask_dice: one``)

    @property
    def major(self) -> int:
        """The major version (datasets and label maps of another one are refused)."""
        return int(self.version.split(".")[0])

    @property
    def num_classes(self) -> int:
        """Output channels of a network for this schema (largest class id + 1)."""
        return max(self.classes.values()) + 1

    def class_id(self, name: str) -> int:
        """The id of a class.

        Args:
            name: a class name of this schema.

        Returns:
            Its id.

        Raises:
            KeyError: ``name`` is not a class of this schema.
        """
        return self.classes[name]

    def surface_tolerance(self, class_name: str) -> float:
        """The tolerance of a class's normalised surface Dice (``surface_tolerance_mm`` of the schema).

        Args:
            class_name: a class name of this schema.

        Returns:
            The declared tolerance in mm, else `DEFAULT_SURFACE_TOLERANCE_MM` (2.0 mm).
        """
        return float(self.surface_tolerance_mm.get(class_name, DEFAULT_SURFACE_TOLERANCE_MM))

    def organ_of(self, class_name: str) -> str | None:
        """The organ group a class belongs to.

        Args:
            class_name: a class name of this schema.

        Returns:
            The organ (itself for an organ, its organ for a lesion class), None for background or
            a class in no group.
        """
        for organ, lesions in self.groups.items():
            if class_name == organ or class_name in lesions:
                return organ
        return None

    def lesion_merge_table(self) -> np.ndarray:
        """Lookup table id -> id that merges each lesion class into its organ.

        Returns:
            An int64 table indexed by class id (covering the ignore label), identity except for
            lesion ids, which map to their organ's id.
        """
        table = np.arange(max(self.num_classes, self.ignore_label + 1), dtype=np.int64)
        for organ, lesions in self.groups.items():
            for lesion in lesions:
                table[self.classes[lesion]] = self.classes[organ]
        return table

    def background_groups(self, labeled: set[int]) -> list[int | list[int]]:
        """ConDistFL's background groups for a site labelling the class ids `labeled`.

        Args:
            labeled: the class ids the site labels.

        Returns:
            0 first, then, for each organ group the site does not fully label, its unlabelled ids
            (one id, or a list of ids).
        """
        groups: list[int | list[int]] = [0]
        for organ, lesions in self.groups.items():
            ids = [self.classes[organ], *(self.classes[l] for l in lesions)]
            unlabeled = [i for i in ids if i not in labeled]
            if unlabeled:
                groups.append(unlabeled[0] if len(unlabeled) == 1 else unlabeled)
        return groups

    def summary(self) -> dict[str, Any]:
        """Name, version and classes, for reports and run records.

        Returns:
            ``{"name", "version", "classes"}``.
        """
        return {"name": self.name, "version": self.version, "classes": dict(self.classes)}


def builtin_schema_path(name: str) -> Path | None:
    """The file of a built-in schema, as experiment specs name them (e.g. ``abdominal-ct``).

    Args:
        name: a schema name.

    Returns:
        ``preprocessing/schemas/<name>.yaml`` when ``name`` is a safe token and that file
        exists, else None.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", str(name)):
        return None
    path = DEFAULT_SCHEMA.parent / f"{name}.yaml"
    return path if path.is_file() else None


def load_schema(path: str | os.PathLike[str] | None = None) -> LabelSchema:
    """Load and validate a label schema.

    Args:
        path: a schema file, or a built-in schema name (``abdominal-ct``) when no file of that
            name exists; None gives the default schema.

    Returns:
        The schema.

    Raises:
        SchemaError: no such file or built-in name, the file cannot be read, is not YAML, or
            does not fit the schema format (every problem listed with its key).
    """
    path = Path(path) if path is not None else DEFAULT_SCHEMA
    if not path.exists() and (builtin := builtin_schema_path(str(path))) is not None:
        path = builtin
    elif not path.exists():
        names = sorted(p.stem for p in DEFAULT_SCHEMA.parent.glob("*.yaml"))
        raise SchemaError(f"{path}: no such schema file, and not a built-in schema name ({', '.join(names)})", file=path)
    raw = _read_yaml(path, "schema")
    return parse_schema(raw, str(path))


def parse_schema(raw: Mapping[str, Any], source: str) -> LabelSchema:
    """Validate a label schema document and build its `LabelSchema`.

    Args:
        raw: the parsed schema (a mapping from YAML, or a spec's inlined ``schema_definition``).
        source: where it came from, named in messages and kept as ``LabelSchema.source``.

    Returns:
        The schema.

    Raises:
        SchemaError: listing every problem as ``<source>: <key>: <problem>``.
    """
    doc = validate_config(LabelSchemaFile, raw, where=source, error=SchemaError)
    modalities = {
        name: ModalityRule(
            normalisation=rule.normalisation,
            clip=(float(rule.clip[0]), float(rule.clip[1])) if rule.normalisation == "ct_window" and rule.clip is not None else None,
            centre=float(rule.centre),
            scale=float(rule.scale),
        )
        for name, rule in doc.modality_rules().items()
    }
    return LabelSchema(
        name=doc.name,
        version=doc.version,
        classes=dict(doc.classes),
        groups=doc.organ_groups(),
        ignore_label=doc.ignore_label,
        target_spacing=(float(doc.target_spacing[0]), float(doc.target_spacing[1]), float(doc.target_spacing[2])),
        modalities=modalities,
        source=source,
        class_notes=dict(doc.class_notes or {}),
        surface_tolerance_mm={k: float(v) for k, v in (doc.surface_tolerance_mm or {}).items()},
        empty_mask_one=frozenset(doc.classes[k] for k, v in (doc.empty_mask_dice or {}).items() if v == "one"),
    )


@dataclass(frozen=True)
class SiteLabelMap:
    """Local label value (int) or segment name (str) -> schema class name or 'ignore'."""

    schema_name: str
    schema_version: str
    mapping: dict[int | str, str]
    source: str = "<memory>"

    def labeled_class_ids(self, schema: LabelSchema) -> list[int]:
        """The foreground class ids this map labels.

        Args:
            schema: the federation's label schema.

        Returns:
            The sorted ids of the schema classes the map's values name (not background or ignore).
        """
        return sorted({schema.classes[c] for c in self.mapping.values() if c not in (IGNORE, "background")})

    def lookup_table(self, schema: LabelSchema, values: np.ndarray, source: str, unknown_to_ignore: bool = False) -> dict[int, int]:
        """Local value -> schema id for every value present.

        Args:
            schema: the federation's label schema.
            values: the distinct local values of a label volume.
            source: the label file, named in the message.
            unknown_to_ignore: map values the map does not list to the ignore label instead of refusing.

        Returns:
            Local value -> schema id (the ignore label for values mapped to ``ignore``).

        Raises:
            SchemaError: naming the values the map does not list (unless `unknown_to_ignore`).
        """
        table: dict[int, int] = {}
        unknown = []
        for v in (int(x) for x in values):
            target = self.mapping.get(v)
            if target is None:
                if unknown_to_ignore:
                    table[v] = schema.ignore_label
                    continue
                unknown.append(v)
                continue
            table[v] = schema.ignore_label if target == IGNORE else schema.classes[target]
        if unknown:
            raise SchemaError(
                f"{source}: label values {unknown} are not in the site label map {self.source} "
                f"(map them there, or pass --unknown-labels ignore to map them to the ignore label)"
            )
        return table


def load_label_map(path: str | os.PathLike[str], schema: LabelSchema) -> SiteLabelMap:
    """Read and validate a site label map file (see `parse_label_map`).

    Args:
        path: the label map file (YAML).
        schema: the federation's label schema it must fit.

    Returns:
        The label map.

    Raises:
        SchemaError: the file cannot be read, is not YAML, or does not fit the schema.
    """
    path = Path(path)
    raw = _read_yaml(path, "label map")
    return parse_label_map(raw, schema, str(path))


def parse_label_map(raw: Mapping[str, Any], schema: LabelSchema, source: str) -> SiteLabelMap:
    """Validate a site label map document against the federation's schema.

    Args:
        raw: the parsed label map.
        schema: the federation's label schema (name, major version and classes must fit).
        source: where the map came from, named in messages.

    Returns:
        The label map.

    Raises:
        SchemaError: listing every problem as ``<source>: <key>: <problem>``.
    """
    doc = validate_config(SiteLabelMapFile, raw, where=source, error=SchemaError)
    problems = doc.problems_against(schema.name, schema.version, schema.classes, schema.source)
    if problems:
        err = SchemaError(format_problems(source, problems), file=source, key=problems[0][0])
        err.problems = problems
        raise err
    return SiteLabelMap(schema_name=schema.name, schema_version=doc.schema_version, mapping=dict(doc.labels), source=source)


def label_map_for_classes(schema: LabelSchema, class_names: list[str]) -> dict[str, Any]:
    """The label-map document of a site whose local values already are schema ids.

    Args:
        schema: the federation's label schema.
        class_names: the classes the site labels.

    Returns:
        A document `parse_label_map` accepts: background 0 and each class at its schema id.
    """
    return {
        "format": LABEL_MAP_FORMAT,
        "schema": schema.name,
        "schema_version": schema.version,
        "labels": {0: "background", **{schema.classes[c]: c for c in class_names}},
    }
