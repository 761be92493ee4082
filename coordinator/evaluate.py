"""`coordinator evaluate RUN --data DATASET`: score a run's models on a prepared dataset
that never took part in training (out-of-federation test).

Models scored: the best global model (the paper's selection: best mean Dice over all
classes across sites on validation cases; `checkpoints/best_global.pt`, else the last round's),
and each site's best local model (selected on its validation cases, `checkpoints/local/<site>_best.pt`;
else its last one, `<site>_last.pt`): the models the run report shows. The dataset is preprocessed with the
run's own schema, spacing and intensity rules and scored on that grid, whole volumes by
sliding window. When it labels an organ but none of its lesion classes, lesions are merged
into their organ in prediction and reference (``merge_lesions="auto"``).

Writes ``<run>/evaluations/<dataset name>.json`` (per-case and mean Dice per class, per model) and,
for the first cases (``overlays``, default 3), the best global model's overlays (image, reference,
prediction per class: `coordinator.report.overlays`) as ``<run>/report/overlays/oof_case<j>.png``,
listed in the record's ``overlays``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from coordinator import runs
from coordinator import spec as spec_mod
from coordinator.checkpoints import load_tensors
from fedimg_core import atomic
from fedimg_core.errors import UserError
from pipelines import training  # module attribute calls: tests swap `training.evaluate_case`
from pipelines.evaluation import dice_per_class
from pipelines.evaluation import merge_lesions as merged_into_organs  # (the name `merge_lesions` is evaluate_run's option)
from pipelines.networks import build_network
from pipelines.transforms import deterministic_transforms
from preprocessing.dataset import DatasetError, DatasetSchemaError, check_schema, load_dataset
from preprocessing.schema import parse_schema

log = logging.getLogger(__name__)


def _settings(run_dir: Path):
    spec = spec_mod.load(runs.spec_file(run_dir))
    args = spec.experiment_model_args()
    raw = args.get("schema_definition")
    if not isinstance(raw, dict):
        raise UserError(f"{run_dir}: plan {spec.plan} is not a segmentation plan; nothing to evaluate")
    return training.parse_plan_args(args, parse_schema(raw, f"{run_dir}/spec"))


def _models(run_dir: Path, metrics: dict) -> dict[str, tuple[str, Path]]:
    ckpt = run_dir / "checkpoints"
    models: dict[str, tuple[str, Path]] = {}
    best = metrics.get("best_global") or {}
    if (ckpt / "best_global.pt").is_file():
        models["global"] = (f"global (best, round {best.get('model_round', '?')})", ckpt / "best_global.pt")
    else:
        rounds = sorted(ckpt.glob("global_round_*.pt"))
        if rounds:
            models["global"] = (f"global (round {int(rounds[-1].stem.rsplit('_', 1)[1])})", rounds[-1])
    best_local = {runs.safe_name(name, "site"): row for name, row in (metrics.get("best_local") or {}).items() if isinstance(row, dict)}
    for path in sorted((ckpt / "local").glob("*_last.pt")):
        site = path.name[: -len("_last.pt")]
        best_file = path.with_name(f"{site}_best.pt")
        if best_file.is_file():
            models[f"local:{site}"] = (f"local {site} (best on validation, round {best_local.get(site, {}).get('round', '?')})", best_file)
        else:
            models[f"local:{site}"] = (f"local {site} (last round)", path)
    return models


def _write_overlays(run_dir: Path, net: torch.nn.Module, volumes: list, settings, classes: list[int], merge: bool, title: str, dataset: str) -> list[dict]:
    """Draw the overlay of each of ``volumes`` (image, label) with ``net`` (`coordinator.report.overlays`),
    predicted and merged as `training.evaluate_case` scores it; returns the record's ``overlays`` entries."""
    from coordinator.report import REPORT_DIR
    from coordinator.report import overlays as figures  # deferred: matplotlib

    names = {v: k for k, v in settings.schema.classes.items()}
    table = settings.schema.lesion_merge_table() if merge else None
    entries = []
    for j, (image, label) in enumerate(volumes, 1):
        pred = training.predict(net, image, settings).cpu().numpy()
        ref = label.reshape(pred.shape).cpu().numpy()
        if table is not None:
            pred, ref = merged_into_organs(pred, table), merged_into_organs(ref, table)
        dice = dice_per_class(pred, ref, classes, settings.schema.ignore_label)
        rows = figures.overlay_rows(ref, pred, {c: names[c] for c in classes}, dice)
        path = run_dir / REPORT_DIR / figures.OVERLAYS_DIR / figures.overlay_name(j, dataset)
        figures.write_case(path, image[0].cpu().numpy(), ref, pred, rows, f"{title}, out-of-federation case {j}")
        entries.append({
            "case": j,
            "path": path.relative_to(run_dir).as_posix(),
            "dice": {r.name: r.dice for r in rows},
            "slices": {r.name: r.slice_index for r in rows},
        })  # fmt: skip
    return entries


def trained_classes(metrics: dict, schema) -> list[int]:
    """Schema ids of the classes some site scored during the run, on its validation or test cases (= labels somewhere)."""
    found = set()
    for r in metrics.get("rounds", []):
        for row in r.get("sites", {}).values():
            for key in ("val_global", "val_local", "val_final", "test_global", "test_local", "test_final"):
                for k in row.get(key) or {}:
                    name = k[len("dice_") :] if k.startswith("dice_") else None
                    if name in schema.classes and name != "background":
                        found.add(schema.classes[name])
    return sorted(found)


def evaluate_run(
    run_dir: Path,
    dataset: Path,
    merge_lesions: str = "auto",
    progress: Callable | None = None,
    overlays: int = 3,
) -> dict:
    """Score the run's models on `dataset`; write and return the evaluation record.

    Logs a line per stage (preprocessing, each model) at INFO.

    Args:
        run_dir: the run's directory.
        dataset: a prepared dataset (site-agent prepare) that took no part in training.
        merge_lesions: auto, yes or no (see the module docstring).
        progress: called as progress(step, done, total) per case; step is "preprocessing"
            or the model's key.
        overlays: how many cases (the first ones) get an overlay figure of the best global model (0: none).

    Returns:
        The evaluation record (also written to ``<run>/evaluations/<dataset>.json``).

    Raises:
        UserError: a dataset or run that cannot be scored.
    """
    run_dir = Path(run_dir)
    settings = _settings(run_dir)
    schema = settings.schema
    try:
        prepared = load_dataset(dataset)
        check_schema(json.loads((Path(dataset) / "manifest.json").read_text()), schema, str(dataset))
    except (DatasetError, DatasetSchemaError) as exc:
        raise UserError(str(exc)) from None
    labeled = prepared.labeled_classes
    if labeled is None:  # format v1: every label of dataset.json
        labeled = sorted(v for v in prepared.labels.values() if v != 0)
    bad = [c for c in labeled if not 0 < c < schema.num_classes]
    if bad or not labeled:
        raise UserError(f"{dataset}: labels {bad or '(none)'} are not foreground classes of schema {schema.name}")
    if prepared.modality not in schema.modalities:
        raise UserError(f"{dataset}: modality {prepared.modality!r} has no rule in schema {schema.name}")
    names = {v: k for k, v in schema.classes.items()}
    organs_only = [
        o for o, lesions in schema.groups.items() if schema.classes[o] in labeled and lesions and not any(schema.classes[l] in labeled for l in lesions)
    ]
    if merge_lesions not in ("auto", "yes", "no"):
        raise UserError(f"merge_lesions must be auto, yes or no (got {merge_lesions!r})")
    if overlays < 0:
        raise UserError(f"overlays must be 0 or more (got {overlays})")
    merge = bool(organs_only) if merge_lesions == "auto" else merge_lesions == "yes"
    classes = [c for c in labeled if not (merge and schema.organ_of(names[c]) != names[c])]
    metrics = runs.read_metrics(run_dir)
    if settings.predict_classes is None:
        trained = trained_classes(metrics, schema)
        if trained and len(trained) < schema.num_classes - 1:
            # classes no site labels were never trained: fold them into background (as the loss did)
            settings = dataclasses.replace(settings, predict_classes=tuple(trained))
            log.info("predicting only the classes the sites label: %s", ", ".join(names[c] for c in trained))
    models = _models(run_dir, metrics)
    if not models:
        raise UserError(f"{run_dir}: no checkpoints to evaluate")

    chain = deterministic_transforms(schema, prepared.modality, spacing=settings.spacing, label_dtype=torch.uint8)
    cases = [c for c in prepared.cases if c.label is not None]
    if not cases:
        raise UserError(f"{dataset}: no labelled cases to score")
    log.info("%s: preprocessing %d labelled cases on the run's grid, then scoring %d model(s)", prepared.name, len(cases), len(models))
    volumes = []
    for i, c in enumerate(cases):
        out = chain({"image": str(c.image), "label": str(c.label)})
        volumes.append((torch.as_tensor(out["image"]).float(), torch.as_tensor(out["label"])))
        if progress:
            progress("preprocessing", i + 1, len(cases))

    record: dict[str, Any] = {
        "dataset": prepared.name,
        "cases": len(volumes),
        "merge_lesions": merge,
        "classes": [names[c] for c in classes],
        "spacing": "schema" if settings.spacing == "schema" else settings.spacing,
        "predicted_classes": [names[c] for c in settings.predict_classes] if settings.predict_classes else "all",
        "models": {},
    }
    net = build_network(out_channels=schema.num_classes, **settings.network)
    for n, (key, (label, path)) in enumerate(models.items(), 1):
        log.info("model %d/%d: %s", n, len(models), label)
        try:
            state = load_tensors(path)
        except pickle.UnpicklingError as e:  # weights_only refused a pickled callable or class
            raise UserError(f"{path}: not a checkpoint of plain tensors (refused: {str(e).splitlines()[0]})") from None
        net.load_state_dict(state)
        per_case = []
        for i, (image, lab) in enumerate(volumes):
            per_case.append(training.evaluate_case(net, image, lab, settings, classes, merge_lesion_classes=merge))
            if progress:
                progress(key, i + 1, len(volumes))
        means = training.class_means(per_case, classes)
        record["models"][key] = {
            "label": label,
            "checkpoint": str(path.relative_to(run_dir)),
            "per_case": [{names[c]: v for c, v in case.items() if not math.isnan(v)} for case in per_case],
            "mean": {names[c]: v for c, v in means.items()},
            "mean_all": sum(means.values()) / len(means) if means else None,
        }
        if key == "global" and overlays:
            log.info("drawing the best global model on %d out-of-federation case(s)", min(overlays, len(volumes)))
            record["overlays"] = _write_overlays(run_dir, net, volumes[:overlays], settings, classes, merge, f"{prepared.name}: {label}",
                                                 runs.safe_name(prepared.name, "dataset"))  # fmt: skip
    out = run_dir / "evaluations" / f"{runs.safe_name(prepared.name, 'dataset')}.json"
    out.parent.mkdir(exist_ok=True)
    atomic.write_json(out, record)
    record["path"] = str(out)
    return record
