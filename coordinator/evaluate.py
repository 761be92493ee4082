"""`coordinator evaluate RUN --data DATASET`: score a run's models on a prepared dataset
that never took part in training (out-of-federation test).

Models scored: the best global model (the paper's selection: best mean Dice over all
classes across sites on validation cases; `checkpoints/best_global.pt`, else the last round's),
for a standalone run the paper's standalone ensemble of the sites' local models instead
(``ensemble``: each class from the models of the sites labelling it,
`pipelines.ensemble.PartialLabelEnsemble`), and each site's best local model (selected on its validation cases, `checkpoints/local/<site>_best.pt`;
else its last one, `<site>_last.pt`): the models the run report shows. The dataset is preprocessed with the
run's own schema, spacing and intensity rules and scored on that grid, whole volumes by
sliding window. When it labels an organ but none of its lesion classes, lesions are merged
into their organ in prediction and reference (``merge_lesions="auto"``).

Writes ``<run>/evaluations/<dataset name>.json`` (per-case and mean Dice per class, per model; and the
clinical metrics of `pipelines.metrics` per case and class, ``metrics``, with their NaN-excluded
mean, median and count of cases per class, ``metrics_mean``: HD95, ASSD and NSD in mm on the
evaluation grid, whose spacing each case's preprocessed volume carries, NSD at the schema's
tolerance of each class, relative volume difference and volumes; null where not scorable) and,
for the first cases (``overlays``, default 3), the best global model's overlays (image, reference,
prediction per class: `coordinator.report.overlays`) as ``<run>/report/overlays/oof_case<j>.png``,
listed in the record's ``overlays``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from coordinator import runs
from coordinator import spec as spec_mod
from coordinator.checkpoints import load_tensors
from fedimg_core import atomic
from fedimg_core.errors import UserError
from fedimg_core.hashing import sha256_file
from pipelines import training  # module attribute calls: tests swap `training.case_label_maps`
from pipelines.ensemble import PartialLabelEnsemble
from pipelines.evaluation import dice_per_class
from pipelines.evaluation import merge_lesions as merged_into_organs  # (the name `merge_lesions` is evaluate_run's option)
from pipelines.scoring import preprocess_cases, score_model, scoring_plan
from preprocessing.dataset import DatasetError, DatasetSchemaError, check_schema, load_dataset
from preprocessing.schema import parse_schema

log = logging.getLogger(__name__)


def _settings(run_dir: Path):
    spec = spec_mod.load(runs.spec_file(run_dir))
    if spec.is_fedsr:  # the coordinator holds no decoder: each site scored its own model
        raise UserError(f"{run_dir}: a FedSR run has no global segmentation model: each site scored its personalised model "
                        "(coordinator results); at a site: site-agent evaluate --model personal:RUN")  # fmt: skip
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
        dice = dice_per_class(pred, ref, classes, settings.schema.ignore_label, settings.schema.empty_mask_one)
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


def site_classes(metrics: dict, schema) -> dict[str, list[int]]:
    """Per site (safe file name, as its checkpoints are named): the schema ids of the classes it scored on its own
    validation or test cases during the run, i.e. the classes it labels.

    Args:
        metrics: the run's metrics.
        schema: the run's label schema.

    Returns:
        Site -> class ids.
    """
    found: dict[str, set[int]] = {}
    for r in metrics.get("rounds", []):
        for node_id, row in r.get("sites", {}).items():
            site = runs.safe_name(str(row.get("name", node_id)), "site")
            for key in ("val_global", "val_local", "val_final", "test_global", "test_local", "test_final"):
                for k in row.get(key) or {}:
                    name = k[len("dice_") :] if k.startswith("dice_") else None
                    if name in schema.classes and name != "background":
                        found.setdefault(site, set()).add(schema.classes[name])
    return {site: sorted(ids) for site, ids in found.items()}


def _ensemble(models: dict[str, tuple[str, Path]], classes_of: dict[str, list[int]], settings) -> tuple[PartialLabelEnsemble | None, list[str]]:
    """The standalone ensemble (`pipelines.ensemble.PartialLabelEnsemble`) of the sites' local models, each with the
    classes its site labels (a site that scored no class is left out), and the keys of its members; None without any."""
    members, keys = [], []
    for key, (_, path) in models.items():
        site = key.split(":", 1)[1] if key.startswith("local:") else None
        if site is None or not classes_of.get(site):
            continue
        net = training.build_model(settings)
        net.load_state_dict(_load(path))
        members.append((net.eval(), classes_of[site]))
        keys.append(key)
    return (PartialLabelEnsemble(members, settings.schema.num_classes, settings.spatial_dims) if members else None), keys


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_tensors(path)
    except pickle.UnpicklingError as e:  # weights_only refused a pickled callable or class
        raise UserError(f"{path}: not a checkpoint of plain tensors (refused: {str(e).splitlines()[0]})") from None


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
    if overlays < 0:
        raise UserError(f"overlays must be 0 or more (got {overlays})")
    try:
        plan = scoring_plan(prepared, schema, merge_lesions, where=str(dataset))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    names, classes, merge = plan.names, plan.classes, plan.merge
    metrics = runs.read_metrics(run_dir)
    if settings.predict_classes is None:
        trained = trained_classes(metrics, schema)
        if trained and len(trained) < schema.num_classes - 1:
            # classes no site labels were never trained: fold them into background (as the loss did)
            settings = dataclasses.replace(settings, predict_classes=tuple(trained))
            log.info("predicting only the classes the sites label: %s", ", ".join(names[c] for c in trained))
    standalone = spec_mod.load(runs.spec_file(run_dir)).mode == "standalone"
    models = _models(run_dir, metrics)
    if not models:
        raise UserError(f"{run_dir}: no checkpoints to evaluate")

    n_cases = sum(c.label is not None for c in prepared.cases)
    if not n_cases:
        raise UserError(f"{dataset}: no labelled cases to score")
    log.info("%s: preprocessing %d labelled cases on the run's grid, then scoring %d model(s)", prepared.name, n_cases, len(models))
    try:
        cases = preprocess_cases(prepared, settings, progress=functools.partial(progress, "preprocessing") if progress else None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    volumes = cases.volumes

    record: dict[str, Any] = {
        "dataset": prepared.name,
        "cases": len(volumes),
        "merge_lesions": merge,
        "classes": [names[c] for c in classes],
        "spacing": "schema" if settings.spacing == "schema" else settings.spacing,
        "predicted_classes": [names[c] for c in settings.predict_classes] if settings.predict_classes else "all",
        "case_spacing_mm": cases.spacings,
        "failed_cases": cases.failed,  # unreadable: left out of the scores
        "surface_tolerance_mm": {names[c]: schema.surface_tolerance(names[c]) for c in classes},
        "models": {},
    }
    ensemble, members = _ensemble(models, site_classes(metrics, schema), settings) if standalone else (None, [])
    jobs: list[tuple[str, str, Path | None]] = [(key, label, path) for key, (label, path) in models.items()]
    if ensemble is not None:  # the paper's standalone baseline: each class from the sites that label it
        jobs.insert(0, ("ensemble", f"standalone ensemble ({len(ensemble.labelled)} local models)", None))
    net = training.build_model(settings)
    for n, (key, label, path) in enumerate(jobs, 1):
        log.info("model %d/%d: %s", n, len(jobs), label)
        if path is not None:
            net.load_state_dict(_load(path))
        model = ensemble if path is None and ensemble is not None else net
        scores = score_model(model, cases, settings, plan, progress=functools.partial(progress, key) if progress else None)
        entry: dict[str, Any] = {"label": label, "checkpoint": str(path.relative_to(run_dir)) if path is not None else None,
                                 "checkpoint_sha256": sha256_file(path) if path is not None else None, **scores}  # fmt: skip
        if path is None:
            entry["members"] = members
        record["models"][key] = entry
        if key in ("global", "ensemble") and overlays:
            log.info("drawing the %s on %d out-of-federation case(s)", label, min(overlays, len(volumes)))
            record["overlays"] = _write_overlays(run_dir, model, volumes[:overlays], settings, classes, merge, f"{prepared.name}: {label}",
                                                 runs.safe_name(prepared.name, "dataset"))  # fmt: skip
    out = run_dir / "evaluations" / f"{runs.safe_name(prepared.name, 'dataset')}.json"
    out.parent.mkdir(exist_ok=True)
    atomic.write_json(out, record)
    record["path"] = str(out)
    return record
