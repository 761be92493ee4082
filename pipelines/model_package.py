"""Versioned model packages: a trained segmentation model as files a site can check, load and run.

A package is a flat folder (what the registry stores as kind ``model``):

    package.json       what the model is (typed, `PackageConfig`): the label schema and the
                       classes it predicts, the plan arguments that rebuild the network and
                       its preprocessing (orientation, spacing, intensity rule per modality)
                       and inference (window, overlap), provenance, and the sha256 of every
                       other file
    model.safetensors  the weights: tensors only (no pickle, nothing runs when read)
    metadata.json      MONAI bundle metadata
    inference.json     MONAI bundle inference config (MONAI's runner executes it on a NIfTI
                       file: `pipelines.model_bundle`); 3D networks only
    model-card.md      the human-readable model card

fedimg itself never executes ``inference.json``: `load_package` reads ``package.json`` through
the same validation as a spec's ``plan_args``, rebuilds the network from it and loads the
weights strictly. Every file is checked against its sha256 first (``package.json``'s list,
and the registry record ``artifact.json`` when the folder has one): a changed byte anywhere
refuses the package.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedimg_core.registry_wire import NAME as _NAME
from pipelines.networks import count_parameters
from pipelines.plan_args import SegmentationSettings, parse_plan_args
from pipelines.training import build_model
from preprocessing.schema import LabelSchema, parse_schema

log = logging.getLogger(__name__)

FORMAT = "fedimg-model-package"
FORMAT_VERSION = 1
PRESENCE_FORMAT_VERSION = 2  # a package whose network has a presence head (`pipelines.presence`): an older fedimg cannot run it
PACKAGE_FILE = "package.json"
WEIGHTS_FILE = "model.safetensors"
BUNDLE_METADATA_FILE = "metadata.json"
BUNDLE_CONFIG_FILE = "inference.json"
CARD_FILE = "model-card.md"
RECORD_FILE = "artifact.json"  # the registry's record of a pulled version (fedimg_core.registry_wire.RECORD_FILE)

# plan_args keys a package keeps: what rebuilds the network and its pre/post-processing (no training settings)
PACKAGE_PLAN_ARGS = ("network", "roi_size", "spacing", "inference", "predict_classes", "presence_head")

__all__ = [
    "BUNDLE_CONFIG_FILE",
    "BUNDLE_METADATA_FILE",
    "CARD_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "PACKAGE_FILE",
    "WEIGHTS_FILE",
    "ModelPackage",
    "PackageError",
    "build_package_files",
    "load_package",
    "verify_package_files",
]


class PackageError(ValueError):
    """A model package that cannot be built, verified or loaded; the message names the file and the problem."""


@dataclass
class ModelPackage:
    """A loaded, verified model package.

    Args:
        folder: where it was read from.
        config: ``package.json``, as read.
        settings: the segmentation settings its plan arguments give (schema, network, window, spacing).
        network: the network with the package's weights, in eval mode, on the CPU.
        version: the registry version (``v0001``) of a pulled package; None for a folder never published.
    """

    folder: Path
    config: dict[str, Any]
    settings: SegmentationSettings
    network: torch.nn.Module
    version: str | None = None

    @property
    def schema(self) -> LabelSchema:
        """The label schema the model's output channels follow."""
        return self.settings.schema

    @property
    def class_ids(self) -> dict[str, int]:
        """The classes the model predicts (background first): name -> schema id."""
        return {str(k): int(v) for k, v in self.config["classes"].items()}

    @property
    def ref(self) -> str:
        """``name@version`` (``name`` alone for a package that was never published)."""
        return f"{self.config['name']}@{self.version}" if self.version else str(self.config["name"])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_bytes(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")


def _package_plan_args(settings: SegmentationSettings) -> dict[str, Any]:
    """The plan arguments a package keeps, in the spec's own vocabulary (so `parse_plan_args` reads them back)."""
    names = {v: k for k, v in settings.schema.classes.items()}
    spacing: Any
    if settings.spacing == "schema":
        spacing = [float(s) for s in settings.schema.target_spacing]
    elif settings.spacing is None:
        spacing = "native"
    else:
        spacing = [float(s) for s in settings.spacing]
    return {
        "network": dict(settings.network),
        "roi_size": list(settings.roi_size),
        "spacing": spacing,
        "inference": {"overlap": settings.overlap, "sw_batch_size": settings.sw_batch_size},
        "predict_classes": [names[c] for c in settings.predict_classes] if settings.predict_classes else None,
        **({"presence_head": {
            "classes": [names[c] for c in settings.presence_classes], "weight": settings.presence_weight,
            "gate": settings.presence_threshold is not None, "threshold": settings.presence_threshold if settings.presence_threshold is not None else 0.5,
        }} if settings.presence_classes else {}),  # only with a head: a package without one stays readable by an older fedimg
    }  # fmt: skip


def _preprocessing(settings: SegmentationSettings, plan_args: Mapping[str, Any]) -> dict[str, Any]:
    """The preprocessing the model was trained with, for people and other tools (fedimg reads plan_args)."""
    rules = {}
    for modality, rule in settings.schema.modalities.items():
        entry: dict[str, Any] = {"normalisation": rule.normalisation}
        if rule.normalisation == "ct_window":
            entry.update({"clip_hu": list(rule.clip or ()), "centre": rule.centre, "scale": rule.scale, "formula": "(clip(x) - centre) / scale"})
        elif rule.normalisation == "zscore":
            entry.update({"over": "non-zero voxels", "formula": "(x - mean) / std"})
        rules[modality] = entry
    return {
        "orientation": "RAS",
        "spacing_mm": plan_args["spacing"],
        "image_interpolation": "bilinear",
        "intensity": rules,
        "inverse": "class probabilities resampled back to the input grid (bilinear), then argmax",
    }


def build_package_files(
    *,
    name: str,
    plan_args: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    provenance: Mapping[str, Any],
    description: str = "",
    card: str | None = None,
) -> dict[str, bytes]:
    """The files of a model package, built and checked: the network is rebuilt from `plan_args`
    and `state_dict` loaded into it strictly before anything is returned.

    Args:
        name: the package's name (the registry name).
        plan_args: the run's segmentation plan arguments with ``schema_definition`` (as the
            coordinator sends them to the sites); training-only keys are dropped.
        state_dict: the weights (a flat dict of tensors).
        provenance: where the model comes from (run id, spec checksum, method, rounds, sites,
            metrics); JSON-serialisable.
        description: one line for the bundle metadata and the card.
        card: the model card (Markdown); None: a minimal one from the other arguments.

    Returns:
        File name -> content.

    Raises:
        PackageError: plan arguments that do not validate, or weights that do not fit the network.
    """
    from safetensors.torch import save as save_safetensors  # deferred: only publishing needs it

    from pipelines.model_bundle import bundle_files

    raw_schema = plan_args.get("schema_definition")
    if not isinstance(raw_schema, Mapping):
        raise PackageError(f"{name}: the plan arguments have no schema_definition (not a segmentation run)")
    schema = parse_schema(raw_schema, f"{name}: schema_definition")
    try:
        settings = parse_plan_args({k: v for k, v in plan_args.items() if k in (*PACKAGE_PLAN_ARGS, "schema_definition")}, schema)
    except ValueError as exc:
        raise PackageError(f"{name}: {exc}") from None
    kept = _package_plan_args(settings)
    network = build_model(settings)
    try:
        network.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        raise PackageError(f"{name}: the weights do not fit the network the plan arguments build ({str(exc).splitlines()[0]})") from None
    names = {v: k for k, v in schema.classes.items()}
    predicted = [0, *settings.predict_classes] if settings.predict_classes else sorted(schema.classes.values())
    # contiguous copies: safetensors refuses tensors that share storage or are views
    weights = save_safetensors({k: v.detach().cpu().contiguous().clone() for k, v in network.state_dict().items()}, metadata={"format": FORMAT})
    config: dict[str, Any] = {
        "format": FORMAT,
        "format_version": PRESENCE_FORMAT_VERSION if settings.presence_classes else FORMAT_VERSION,
        "name": name,
        "description": description,
        "task": "segmentation",
        "schema_definition": dict(raw_schema),
        "classes": {names[c]: c for c in predicted},
        "modalities": sorted(schema.modalities),
        "plan_args": kept,
        "preprocessing": _preprocessing(settings, kept),
        "inference": {
            "roi_size": list(settings.inference_roi),
            "overlap": settings.overlap,
            "sw_batch_size": settings.sw_batch_size,
            "blend": "gaussian",
            "untrained_classes": "folded into background before the argmax",
        },
        "network": {"name": settings.network["name"], "spatial_dims": settings.spatial_dims, "parameters": count_parameters(network)},
        "provenance": json.loads(json.dumps(dict(provenance), allow_nan=False, default=str)),
    }
    files: dict[str, bytes] = {WEIGHTS_FILE: weights}
    bundle = bundle_files(config, network_kwargs(settings))
    config["monai_bundle"] = bool(bundle)  # 2D networks have no bundle config
    files.update(bundle)
    files[CARD_FILE] = (card if card is not None else default_card(config)).encode("utf-8")
    config["files"] = {f: {"sha256": _sha256(b), "bytes": len(b)} for f, b in sorted(files.items())}
    files[PACKAGE_FILE] = _json_bytes(config)
    return files


def network_kwargs(settings: SegmentationSettings) -> tuple[str, dict[str, Any]]:
    """MONAI's class name and constructor arguments of the settings' network (a bundle's ``network_def``).

    Args:
        settings: the segmentation settings.

    Returns:
        (dotted MONAI class name, keyword arguments).
    """
    from pipelines.networks import MONAI_CLASSES, network_constructor

    net = dict(settings.network)
    _, kwargs = network_constructor(out_channels=settings.schema.num_classes, **net)
    kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    return MONAI_CLASSES[net["name"]], kwargs


def default_card(config: Mapping[str, Any]) -> str:
    """A model card from ``package.json``: what the model segments, from what, how it was trained, how it scored.

    Args:
        config: the package's ``package.json`` content (without ``files``).

    Returns:
        Markdown text.
    """
    prov = config.get("provenance") or {}
    pre = config["preprocessing"]
    lines = [
        f"# {config['name']}",
        "",
        config.get("description") or "A fedimg segmentation model.",
        "",
        "## What it segments",
        "",
        f"- Classes: {', '.join(k for k in config['classes'] if k != 'background')} (label schema "
        f"{config['schema_definition'].get('name')} {config['schema_definition'].get('version')}; values are schema ids).",
        f"- Modalities with an intensity rule: {', '.join(config['modalities'])}.",
        f"- Network: {config['network']['name']} ({config['network']['spatial_dims']}D, {config['network']['parameters']:,} parameters).",
        "",
        "## Preprocessing and inference",
        "",
        f"- Orientation {pre['orientation']}, spacing {pre['spacing_mm']} mm, image interpolation {pre['image_interpolation']}.",
        f"- Sliding window {config['inference']['roi_size']}, overlap {config['inference']['overlap']}, {config['inference']['blend']} blending.",
        f"- Output: {pre['inverse']}; the label is written on the input's own grid.",
        "",
        "## Where it comes from",
        "",
    ]
    for key in ("run_id", "method", "model", "rounds", "sites", "spec_sha256", "created"):
        if key in prov:
            value = prov[key]
            lines.append(f"- {key.replace('_', ' ')}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
    for title, key in (("Validation (sites' own validation cases)", "validation"), ("Test (sites' held-out test cases)", "test")):
        scores = prov.get(key) or {}
        if scores:
            lines += ["", f"## {title}", "", "| class | Dice | n |", "|---|---|---|"]
            lines += [f"| {c} | {v['mean']:.3f} | {v['n']} |" for c, v in scores.items() if isinstance(v, Mapping) and v.get("mean") is not None]
    for dataset, scores in (prov.get("out_of_federation") or {}).items():
        lines += ["", f"## Out of federation: {dataset}", "", "| class | Dice | n |", "|---|---|---|"]
        lines += [f"| {c} | {v['mean']:.3f} | {v['n']} |" for c, v in scores.items() if isinstance(v, Mapping) and v.get("mean") is not None]
    lines += [
        "",
        "## Limits",
        "",
        "- Scored on the federation's own data and the out-of-federation sets listed; check it on your own labelled cases "
        "(`site-agent evaluate`) before any use.",
        "- Not a medical device; research use only.",
        "",
    ]
    return "\n".join(lines)


def verify_package_files(folder: str | Path) -> dict[str, Any]:
    """Check every file of a package folder against its sha256; return ``package.json``'s content.

    The files ``package.json`` lists are checked against it; when the folder holds the
    registry's record (``artifact.json``, a pulled version), every file it lists, ``package.json``
    included, is checked against the record too. Any file that is missing, changed, or
    unlisted refuses the package.

    Args:
        folder: the package folder.

    Returns:
        The parsed ``package.json``.

    Raises:
        PackageError: naming the file and the problem.
    """
    folder = Path(folder)
    pkg = folder / PACKAGE_FILE
    if not pkg.is_file():
        raise PackageError(f"{folder}: not a model package (no {PACKAGE_FILE})")
    record_path = folder / RECORD_FILE
    listed: dict[str, Any] = {}
    record: dict[str, Any] = {}
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            listed = dict(record["files"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PackageError(f"{record_path}: unreadable registry record ({exc})") from None
        if record.get("kind") != "model":
            raise PackageError(f"{record_path}: a {record.get('kind')!r} artifact, not a model package")
        for filename, entry in listed.items():
            _check_file(folder, filename, entry, f"the registry record {record_path}")
    try:
        config = json.loads(pkg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PackageError(f"{pkg}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise PackageError(f"{pkg}: not a {FORMAT} file (format {config.get('format') if isinstance(config, dict) else None!r})")
    if config.get("format_version") not in (FORMAT_VERSION, PRESENCE_FORMAT_VERSION):
        raise PackageError(
            f"{pkg}: format_version {config.get('format_version')!r}; this fedimg reads versions {FORMAT_VERSION} and {PRESENCE_FORMAT_VERSION} (update fedimg)"
        )
    files = config.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files or CARD_FILE not in files:
        raise PackageError(f"{pkg}: no 'files' list naming {WEIGHTS_FILE} and {CARD_FILE}")
    name = config.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("."):
        raise PackageError(f"{pkg}: name {name!r} is not a package name (1-64 letters, digits, '_', '.' or '-', not starting with '.')")
    if listed and set(listed) != {PACKAGE_FILE, *files}:
        raise PackageError(f"{record_path}: lists other files than {PACKAGE_FILE} does ({', '.join(sorted(set(listed) ^ {PACKAGE_FILE, *files}))})")
    if listed and record.get("name") != name:
        raise PackageError(f"{record_path}: the registry record is of {record.get('name')!r}, the package is {name!r}")
    for filename, entry in files.items():
        _check_file(folder, filename, entry, str(pkg))
    known = {PACKAGE_FILE, RECORD_FILE, *files, *listed}
    extra = sorted(p.name for p in folder.iterdir() if p.name not in known)
    if extra:
        raise PackageError(f"{folder}: files that are not part of the package: {', '.join(extra)} (remove them, or pull the package again)")
    return config


def _check_file(folder: Path, filename: Any, entry: Any, where: str) -> None:
    if not isinstance(filename, str) or "/" in filename or "\\" in filename or filename.startswith(".") or not isinstance(entry, Mapping):
        raise PackageError(f"{where}: lists a file {filename!r} that is not a plain file name with a checksum")
    path = folder / filename
    if not path.is_file():
        raise PackageError(f"{path}: missing ({where} lists it)")
    data = path.read_bytes()
    if len(data) != entry.get("bytes") or _sha256(data) != entry.get("sha256"):
        raise PackageError(
            f"{path}: does not match its checksum in {where} ({len(data)} bytes, sha256 {_sha256(data)[:12]}..., expected "
            f"{entry.get('bytes')} bytes, {str(entry.get('sha256'))[:12]}...); the file was changed or is corrupt: pull the package again"
        )


def load_package(folder: str | Path) -> ModelPackage:
    """Verify a package folder (`verify_package_files`), rebuild its network and load its weights.

    Args:
        folder: the package folder (a pulled registry version, or one written by `coordinator publish --out`).

    Returns:
        The loaded package; its network is in eval mode on the CPU.

    Raises:
        PackageError: a changed or missing file, plan arguments that do not validate, or
            weights that do not fit the network.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    from pipelines.model_bundle import bundle_files

    folder = Path(folder)
    config = verify_package_files(folder)
    where = str(folder / PACKAGE_FILE)
    raw_schema = config.get("schema_definition")
    if not isinstance(raw_schema, dict):
        raise PackageError(f"{where}: no schema_definition")
    try:
        schema = parse_schema(raw_schema, f"{where}: schema_definition")
        plan_args = config.get("plan_args")
        if not isinstance(plan_args, dict) or set(plan_args) - set(PACKAGE_PLAN_ARGS):
            raise PackageError(f"{where}: plan_args must be a mapping of {', '.join(PACKAGE_PLAN_ARGS)}")
        if (plan_args.get("presence_head") is not None) != (config.get("format_version") == PRESENCE_FORMAT_VERSION):
            raise PackageError(f"{where}: format_version {PRESENCE_FORMAT_VERSION} is for, and only for, packages with plan_args.presence_head")
        settings = parse_plan_args({**plan_args, "schema_definition": raw_schema}, schema)
    except PackageError:
        raise
    except ValueError as exc:
        raise PackageError(f"{where}: {exc}") from None
    classes = config.get("classes")
    predicted = {0, *settings.predict_classes} if settings.predict_classes else set(schema.classes.values())
    if not isinstance(classes, dict) or any(schema.classes.get(k) != v for k, v in classes.items()) or set(classes.values()) != predicted:
        raise PackageError(f"{where}: classes must map the classes the model predicts (background and plan_args.predict_classes) to their schema ids")
    expected_bundle = bundle_files(config, network_kwargs(settings)).get(BUNDLE_CONFIG_FILE)
    present_bundle = (folder / BUNDLE_CONFIG_FILE).read_bytes() if BUNDLE_CONFIG_FILE in config["files"] else None
    if present_bundle != expected_bundle:
        # MONAI executes a bundle config's expressions: a site may run only the one fedimg builds from package.json
        raise PackageError(f"{folder / BUNDLE_CONFIG_FILE}: not the MONAI bundle config fedimg builds for this package (its code could run at the site)")
    network = build_model(settings)
    try:
        data = (folder / WEIGHTS_FILE).read_bytes()
        if _sha256(data) != config["files"][WEIGHTS_FILE]["sha256"]:  # the bytes loaded are the bytes checked
            raise PackageError(f"{folder / WEIGHTS_FILE}: changed while it was being loaded")
        network.load_state_dict(load_safetensors(data), strict=True)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise PackageError(f"{folder / WEIGHTS_FILE}: weights that do not load into the package's network ({str(exc).splitlines()[0]})") from None
    network.eval()
    version = None
    if (folder / RECORD_FILE).is_file():  # checked by verify_package_files
        version = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8")).get("version")
    return ModelPackage(folder=folder, config=config, settings=settings, network=network, version=version)


def provenance_scores(per_class: Mapping[str, Sequence[float]], order: Mapping[str, int] | None = None) -> dict[str, dict[str, float | int]]:
    """Mean and n per class of per-case scores (NaN left out), as a package's provenance lists them.

    Args:
        per_class: class name -> per-case values.
        order: class name -> schema id, to list the classes in id order (None: as given).

    Returns:
        class name -> ``{"mean", "n"}`` (classes without a value left out).
    """
    out: dict[str, dict[str, float | int]] = {}
    names = sorted(per_class, key=lambda n: (order.get(n, 1 << 30), n)) if order is not None else list(per_class)
    for name in names:
        values = per_class[name]
        vals = [float(v) for v in values if v is not None and v == v]
        if vals:
            out[name] = {"mean": round(sum(vals) / len(vals), 4), "n": len(vals)}
    return out
