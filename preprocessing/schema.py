"""The federation label schema and a site's label map, both files validated at load time.

* The **label schema** (one per federation, versioned) names the classes and their ids,
  groups organs with their lesions and says how each modality is normalised. The default
  one ships in ``preprocessing/schemas/abdominal-ct.yaml``.
* A **site label map** says what each local label value (or DICOM SEG segment name) of a
  site means in the schema, e.g. ``{0: background, 1: liver, 2: liver_tumor}``; a value
  can also be mapped to ``ignore`` (the schema's ignore label, masked by losses).

Errors are ``SchemaError`` with the file and the key at fault.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from fedimg_core.atomic import FileReadError, read_small_file
from fedimg_core.errors import FedimgError

SCHEMA_FORMAT = "fedimg-label-schema"
LABEL_MAP_FORMAT = "fedimg-site-labels"
DEFAULT_SCHEMA = Path(__file__).with_name("schemas") / "abdominal-ct.yaml"
IGNORE = "ignore"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


class SchemaError(FedimgError):
    """A schema or label-map file is invalid; the message names the file and the key."""


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_yaml(path: Path, what: str) -> dict:
    try:
        text = read_small_file(path, what).decode("utf-8")
    except FileReadError as exc:
        raise SchemaError(str(exc)) from None
    except OSError as exc:
        raise SchemaError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: not a UTF-8 text file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SchemaError(f"{path}:{where} not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected a mapping at the top level")
    return data


@dataclass(frozen=True)
class ModalityRule:
    normalisation: str  # "ct_window" | "zscore" | "none"
    clip: tuple[float, float] | None = None
    centre: float = 0.0
    scale: float = 1.0


@dataclass(frozen=True)
class LabelSchema:
    name: str
    version: str
    classes: dict[str, int]  # name -> id, background 0
    groups: dict[str, tuple[str, ...]]  # organ -> lesion classes
    ignore_label: int
    target_spacing: tuple[float, float, float]
    modalities: dict[str, ModalityRule]
    source: str = "<memory>"
    class_notes: dict[str, str] = field(default_factory=dict)

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def num_classes(self) -> int:
        return max(self.classes.values()) + 1

    def class_id(self, name: str) -> int:
        return self.classes[name]

    def organ_of(self, class_name: str) -> str | None:
        """The organ group a class belongs to (itself for an organ), None for background."""
        for organ, lesions in self.groups.items():
            if class_name == organ or class_name in lesions:
                return organ
        return None

    def lesion_merge_table(self) -> np.ndarray:
        """Lookup table id -> id that merges each lesion class into its organ."""
        table = np.arange(max(self.num_classes, self.ignore_label + 1), dtype=np.int64)
        for organ, lesions in self.groups.items():
            for lesion in lesions:
                table[self.classes[lesion]] = self.classes[organ]
        return table

    def background_groups(self, labeled: set[int]) -> list[int | list[int]]:
        """ConDistFL's background groups for a site labelling the class ids `labeled`:
        0 first, then each organ group the site does not label (organ + lesions)."""
        groups: list[int | list[int]] = [0]
        for organ, lesions in self.groups.items():
            ids = [self.classes[organ], *(self.classes[l] for l in lesions)]
            unlabeled = [i for i in ids if i not in labeled]
            if unlabeled:
                groups.append(unlabeled[0] if len(unlabeled) == 1 else unlabeled)
        return groups

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "classes": dict(self.classes)}


def builtin_schema_path(name: str) -> Path | None:
    """``preprocessing/schemas/<name>.yaml`` when ``name`` is a built-in schema name (as
    experiment specs name them, e.g. ``abdominal-ct``), else None."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", str(name)):
        return None
    path = DEFAULT_SCHEMA.parent / f"{name}.yaml"
    return path if path.is_file() else None


def load_schema(path: str | os.PathLike | None = None) -> LabelSchema:
    """Load and validate a label schema: a file, or a built-in name (``abdominal-ct``) when
    no file of that name exists; None gives the default schema."""
    path = Path(path) if path is not None else DEFAULT_SCHEMA
    if not path.exists() and (builtin := builtin_schema_path(str(path))) is not None:
        path = builtin
    elif not path.exists():
        names = sorted(p.stem for p in DEFAULT_SCHEMA.parent.glob("*.yaml"))
        raise SchemaError(f"{path}: no such schema file, and not a built-in schema name ({', '.join(names)})")
    raw = _read_yaml(path, "schema")
    return parse_schema(raw, str(path))


def parse_schema(raw: Mapping[str, Any], source: str) -> LabelSchema:
    def err(key: str, msg: str) -> SchemaError:
        return SchemaError(f"{source}: {key}: {msg}")

    known = {"format", "name", "version", "ignore_label", "classes", "groups", "target_spacing", "modalities", "class_notes"}
    for key in raw:
        if key not in known:
            raise err(str(key), f"unknown key{_did_you_mean(key, known)}")
    if raw.get("format") != SCHEMA_FORMAT:
        raise err("format", f"must be {SCHEMA_FORMAT!r}, got {raw.get('format')!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", name):
        raise err("name", f"must be a short name (letters, digits, _ . -), got {name!r}")
    version = str(raw.get("version", ""))
    if not _VERSION.match(version):
        raise err("version", f"must look like MAJOR.MINOR.PATCH, got {raw.get('version')!r}")
    classes = raw.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise err("classes", "must map class names to integer ids")
    for cname, cid in classes.items():
        if not isinstance(cname, str) or not _NAME.match(cname):
            raise err(f"classes.{cname}", "class names are lower-case letters, digits and _")
        if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid <= 254:
            raise err(f"classes.{cname}", f"id must be an integer in [0, 254], got {cid!r}")
    if classes.get("background") != 0:
        raise err("classes", "must contain 'background: 0'")
    ids = sorted(classes.values())
    if ids != list(range(len(ids))):
        raise err("classes", f"ids must be unique and contiguous from 0, got {ids}")
    ignore = raw.get("ignore_label", 255)
    if isinstance(ignore, bool) or not isinstance(ignore, int) or not 0 < ignore <= 255 or ignore in ids:
        raise err("ignore_label", f"must be an integer in [1, 255] that is not a class id, got {ignore!r}")
    groups_raw = raw.get("groups") or {}
    if not isinstance(groups_raw, dict):
        raise err("groups", "must map organ names to lists of lesion class names")
    groups: dict[str, tuple[str, ...]] = {}
    seen: set[str] = set()
    for organ, lesions in groups_raw.items():
        if organ not in classes or organ == "background":
            raise err(f"groups.{organ}", f"not a foreground class{_did_you_mean(organ, classes)}")
        lesions = lesions or []
        if not isinstance(lesions, list):
            raise err(f"groups.{organ}", "must be a list of lesion class names")
        for lesion in [organ, *lesions]:
            if lesion not in classes or lesion == "background":
                raise err(f"groups.{organ}", f"{lesion!r} is not a foreground class{_did_you_mean(lesion, classes)}")
            if lesion in seen:
                raise err(f"groups.{organ}", f"{lesion!r} is in more than one group")
            seen.add(lesion)
        groups[organ] = tuple(lesions)
    for cname in classes:
        if cname != "background" and cname not in seen:
            groups[cname] = ()  # an ungrouped class is an organ of its own
    spacing = raw.get("target_spacing", [1.5, 1.5, 1.5])
    if (
        not isinstance(spacing, list)
        or len(spacing) != 3
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < 50 for s in spacing)
    ):
        raise err("target_spacing", f"must be three positive numbers in mm, got {spacing!r}")
    modalities: dict[str, ModalityRule] = {}
    for mod, rule in (raw.get("modalities") or {"CT": {"normalisation": "ct_window", "clip": [-54, 258], "centre": 100, "scale": 50}}).items():
        key = f"modalities.{mod}"
        if not isinstance(rule, dict):
            raise err(key, "must be a mapping")
        norm = rule.get("normalisation")
        if norm not in ("ct_window", "zscore", "none"):
            raise err(f"{key}.normalisation", f"must be ct_window, zscore or none, got {norm!r}")
        clip = rule.get("clip")
        if norm == "ct_window":
            if not (isinstance(clip, list) and len(clip) == 2 and all(isinstance(c, (int, float)) for c in clip) and clip[0] < clip[1]):
                raise err(f"{key}.clip", f"must be [low, high] with low < high, got {clip!r}")
            scale = rule.get("scale", 1.0)
            if not isinstance(scale, (int, float)) or scale <= 0:
                raise err(f"{key}.scale", f"must be a positive number, got {scale!r}")
        modalities[str(mod)] = ModalityRule(
            normalisation=norm,
            clip=(float(clip[0]), float(clip[1])) if norm == "ct_window" else None,
            centre=float(rule.get("centre", 0.0)),
            scale=float(rule.get("scale", 1.0)),
        )
    notes = raw.get("class_notes") or {}
    return LabelSchema(
        name=name,
        version=version,
        classes=dict(classes),
        groups=groups,
        ignore_label=ignore,
        target_spacing=tuple(float(s) for s in spacing),
        modalities=modalities,
        source=source,
        class_notes={str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {},
    )


@dataclass(frozen=True)
class SiteLabelMap:
    """Local label value (int) or segment name (str) -> schema class name or 'ignore'."""

    schema_name: str
    schema_version: str
    mapping: dict[int | str, str]
    source: str = "<memory>"

    def labeled_class_ids(self, schema: LabelSchema) -> list[int]:
        return sorted({schema.classes[c] for c in self.mapping.values() if c not in (IGNORE, "background")})

    def lookup_table(self, schema: LabelSchema, values: np.ndarray, source: str, unknown_to_ignore: bool = False) -> dict[int, int]:
        """Local value -> schema id for every value present; raise naming unknown values."""
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


def load_label_map(path: str | os.PathLike, schema: LabelSchema) -> SiteLabelMap:
    path = Path(path)
    raw = _read_yaml(path, "label map")
    return parse_label_map(raw, schema, str(path))


def parse_label_map(raw: Mapping[str, Any], schema: LabelSchema, source: str) -> SiteLabelMap:
    def err(key: str, msg: str) -> SchemaError:
        return SchemaError(f"{source}: {key}: {msg}")

    known = {"format", "schema", "schema_version", "labels"}
    for key in raw:
        if key not in known:
            raise err(str(key), f"unknown key{_did_you_mean(key, known)}")
    if raw.get("format") != LABEL_MAP_FORMAT:
        raise err("format", f"must be {LABEL_MAP_FORMAT!r}, got {raw.get('format')!r}")
    if raw.get("schema") != schema.name:
        raise err("schema", f"is {raw.get('schema')!r} but the federation schema is {schema.name!r} ({schema.source})")
    version = str(raw.get("schema_version", ""))
    m = _VERSION.match(version)
    if not m:
        raise err("schema_version", f"must look like MAJOR.MINOR.PATCH, got {raw.get('schema_version')!r}")
    if int(m.group(1)) != schema.major:
        raise err("schema_version", f"{version} was written for another major version than the schema's {schema.version}")
    labels = raw.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise err("labels", "must map local label values (or segment names) to schema class names")
    mapping: dict[int | str, str] = {}
    for local, target in labels.items():
        if isinstance(local, bool) or not isinstance(local, (int, str)):
            raise err(f"labels.{local}", "keys are integer label values or segment names")
        if isinstance(local, int) and not 0 <= local <= 65535:
            raise err(f"labels.{local}", "label values must be in [0, 65535]")
        if target != IGNORE and target not in schema.classes:
            raise err(f"labels.{local}", f"{target!r} is not a class of schema {schema.name}{_did_you_mean(target, [*schema.classes, IGNORE])}")
        mapping[local] = target
    if not any(t not in ("background", IGNORE) for t in mapping.values()):
        raise err("labels", "maps nothing to a foreground class")
    return SiteLabelMap(schema_name=schema.name, schema_version=version, mapping=mapping, source=source)


def label_map_for_classes(schema: LabelSchema, class_names: list[str]) -> dict[str, Any]:
    """The label-map document of a site whose local values already are schema ids."""
    return {
        "format": LABEL_MAP_FORMAT,
        "schema": schema.name,
        "schema_version": schema.version,
        "labels": {0: "background", **{schema.classes[c]: c for c in class_names}},
    }
