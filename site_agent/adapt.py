"""`site-agent adapt source|target` and `site-agent infer`: local domain adaptation on the
federation's data factory, run by a site whenever it chooses (no federation round).

What moves, and only this: the factory is pulled from the coordinator's registry; a source
site pushes its segmentation branch (weights + a JSON config, validated by the coordinator,
which rebuilds the branch and refuses anything else); a target site pulls a branch. Images,
labels, the encoders, the target branch, the reports and the models stay in the site's work
folder. Jobs live in ``<work_dir>/adapt/<job>/`` (see pipelines/adaptation/jobs.py) and
continue from their checkpoint when started again with the same settings.

Pulls are staged (`site_agent.registry_client.StagedPulls`): they reach
``<work_dir>/models/registry`` only when the command succeeds. A job loads executable
artifacts (a TorchScript perceptual network) only when the site approved their sha256
(``site-agent artifacts``; `pipelines.artifact_approval`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable

import torch

from fedimg_core import atomic
from pipelines.adaptation import report
from pipelines.adaptation import volumes as V
from pipelines.adaptation.factory import FactoryError, load_factory
from pipelines.adaptation.jobs import JobDir, JobError, tensor_blob
from pipelines.adaptation.networks import branch_files, invert, validate_branch_files
from pipelines.adaptation.training import (
    SOURCE,
    TARGET,
    AdaptedModel,
    AdaptSettings,
    label_table,
    schema_class_ids,
    synthetic_source,
    train_source,
    train_target,
)
from pipelines.adaptation.volumes import labelled_slices
from pipelines.artifact_approval import STORE_ENV, store_dir
from pipelines.factory.slices import SliceSettings
from preprocessing.dataset import DatasetError, DatasetSchemaError, check_schema, load_dataset
from preprocessing.schema import LabelSchema, parse_schema
from site_agent.config import SiteConfig
from site_agent.errors import UserError
from site_agent.registry_client import RegistryClient, StagedPulls

# This module is itself imported only when an adapt or infer command runs (site_agent.commands.adapt
# defers it), so it imports torch and the adaptation library at the top.
log = logging.getLogger(__name__)
_REF = re.compile(r"^([A-Za-z0-9_.-]{1,64})(?:@(v\d{4,}|latest))?$")
BRANCH_KIND = "segmentation-branch"


def parse_ref(ref: str, what: str) -> tuple[str, str]:
    """``name`` or ``name@v0003`` / ``name@latest`` -> (name, version).

    Args:
        ref: the reference the user gave.
        what: what it names (``factory``, ``branch``), for the message.

    Returns:
        (name, version), version ``latest`` when none is given.

    Raises:
        UserError: not a valid reference.
    """
    m = _REF.match(ref or "")
    if not m:
        raise UserError(f"{what} {ref!r}: expected NAME or NAME@vNNNN (letters, digits, _ . -)")
    return m.group(1), m.group(2) or "latest"


def _client(site: SiteConfig):
    if site.registry is None:
        raise UserError(
            f"{site.path or 'site config'}: no registry section; add `registry: {{url: http://COORDINATOR:8750, token_file: /path/to/site-token}}` "
            "(the coordinator's operator issues the token with `coordinator site-token issue SITE`)"
        )
    return RegistryClient.from_site_config(site)


def _checked_dataset(site, dataset: str, schema) -> Path:
    """The site's prepared dataset, refused unless it was prepared with the factory's schema."""
    path = _dataset_path(site, dataset)
    try:
        check_schema(json.loads((path / "manifest.json").read_text()), schema, str(path))
    except DatasetSchemaError as exc:
        raise UserError(str(exc)) from None
    return path


def _dataset_path(site: SiteConfig, dataset: str) -> Path:
    p = Path(dataset)
    if not p.is_absolute():
        p = site.data_dir / p
    if not (p / "manifest.json").is_file():
        raise UserError(f"{p}: not a prepared dataset (no manifest.json); prepare it with `site-agent prepare`")
    return p


def _job_dir(site: SiteConfig, job: str) -> Path:
    return site.work_dir / "adapt" / job


def staged_pulls(site: SiteConfig):
    """This command's registry pulls: staged under ``<work_dir>/staging`` (outside the models
    folder), moved into ``<work_dir>/models/registry`` only if the command succeeds.

    Args:
        site: the site (its config names the registry).

    Returns:
        A `StagedPulls` (a context manager: it commits on success).

    Raises:
        UserError: the site config has no registry section.
    """
    return StagedPulls(_client(site), site.work_dir / "models" / "registry", site.work_dir / "staging")


@contextlib.contextmanager
def _command(site: SiteConfig):
    """A job command: its pulls are staged, and what it loads is checked against the site's
    artifact approvals (the same store the node uses)."""
    previous = os.environ.get(STORE_ENV)
    os.environ[STORE_ENV] = str(store_dir(site.work_dir))
    try:
        with staged_pulls(site) as pulls:
            yield pulls
    finally:
        if previous is None:
            os.environ.pop(STORE_ENV, None)
        else:
            os.environ[STORE_ENV] = previous


def pull_factory(site: SiteConfig, ref: str, pulls=None):
    """Pull (or reuse the verified cached copy of) a factory.

    Args:
        site: the site.
        ref: ``NAME`` or ``NAME@vNNNN``.
        pulls: a `StagedPulls`: a download stays staged until the command succeeds
            (None: pull straight into the registry folder).

    Returns:
        (the loaded factory, its folder).

    Raises:
        UserError: a bad reference, a registry refusal, or a factory that does not load.
    """
    name, version = parse_ref(ref, "factory")
    folder = pulls.pull("factory", name, version) if pulls else _client(site).pull("factory", name, version)
    try:
        return load_factory(folder, name, folder.name), folder
    except FactoryError as exc:
        raise UserError(str(exc)) from None


def _settings(raw: dict):
    try:
        return AdaptSettings.from_dict(raw, "adaptation settings")
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _open_job(root: Path, kind: str, config: dict, restart: bool):
    try:
        job = JobDir(root, kind, config)
        return job, job.open(restart=restart)
    except JobError as exc:
        raise UserError(str(exc)) from None


def _finite(d: dict) -> dict:
    return {str(k): (round(v, 4) if isinstance(v, float) and math.isfinite(v) else None) for k, v in d.items()}


def run_source(site: SiteConfig, dataset: str, factory_ref: str, branch_name: str, settings_raw: dict, job: str | None = None,
               publish: bool = True, restart: bool = False, progress: Callable | None = None) -> dict:  # fmt: skip
    """Train E_s + S_s on a labelled prepared dataset and publish S_s as ``branch_name``.

    What it pulls reaches the site's registry folder only if it succeeds. Notes and the
    published version are logged at INFO.

    Args:
        site: the site.
        dataset: a labelled prepared dataset (path, or relative to ``data_dir``).
        factory_ref: the factory, ``NAME`` or ``NAME@vNNNN``.
        branch_name: the name to publish the branch under.
        settings_raw: adaptation settings (keys of `AdaptSettings`).
        job: the job's name under ``<work_dir>/adapt/`` (default ``source-<branch>``).
        publish: push the branch to the registry.
        restart: start the job again (its old folder is kept aside).
        progress: called as ``progress(done, total, row)`` while training.

    Returns:
        The job folder, model, report, classes, validation Dice and published version.

    Raises:
        UserError: bad settings, dataset, factory or job; a registry refusal.
    """
    parse_ref(branch_name, "branch")
    parse_ref(factory_ref, "factory")
    _settings(settings_raw)
    with _command(site) as pulls:
        return _run_source(pulls, site, dataset, factory_ref, branch_name, settings_raw, job, publish, restart, progress)


def _run_source(pulls, site: SiteConfig, dataset: str, factory_ref: str, branch_name: str, settings_raw: dict, job: str | None,
                publish: bool, restart: bool, progress: Callable | None) -> dict:  # fmt: skip
    parse_ref(branch_name, "branch")
    parse_ref(factory_ref, "factory")
    settings = _settings(settings_raw)
    factory, folder = pull_factory(site, factory_ref, pulls)
    path = _checked_dataset(site, dataset, factory.schema)
    client_id = factory.client_id(site.site_name)
    config = {"dataset": str(path), "factory": factory.identity, "branch": branch_name, "settings": settings.to_dict(), "site_client_id": client_id}
    jd, resume = _open_job(_job_dir(site, job or f"source-{branch_name}"), "source", config, restart)
    try:
        if client_id is None:
            log.info("note: site %s did not train factory %s; its domain is the mean over all client ids", site.site_name, factory.identity["name"])
        try:
            data = labelled_slices(path, factory.schema, factory.slices, cache_dir=site.work_dir / "cache", only_labelled=True)
        except (ValueError, DatasetError) as exc:
            raise UserError(f"{path}: {exc}") from None
        try:
            model, summary = train_source(factory, data, settings, jd, client_id, resume=resume, progress=progress)
        except ValueError as exc:
            raise UserError(f"source job {jd.root}: {exc}") from None
        atomic.write_bytes(jd.model_file, tensor_blob(model.state()))
        files = branch_files(model.branch_source)
        for name, blob in files.items():
            atomic.write_bytes(jd.root / "branch" / name, blob)
        _source_report(jd, model, data, summary, factory)
        validation = {model.class_names[int(k)]: v for k, v in summary.get("validation", {}).get("mean", {}).items()}
        record = None
        if publish:
            meta = {"source_site": site.site_name, "source_client_id": client_id, "factory": factory.identity,
                    "classes": model.class_names, "validation_dice": _finite(validation), "steps": settings.steps}  # fmt: skip
            record = _client(site).push(BRANCH_KIND, branch_name, files, meta)
            log.info("published %s %s %s", BRANCH_KIND, branch_name, record["version"])
        jd.finish(published=record["version"] if record else None, validation_dice=_finite(validation))
    except BaseException as exc:
        jd.fail(f"{type(exc).__name__}: {exc}")
        raise
    return {"job": str(jd.root), "model": str(jd.model_file), "report": str(jd.report_dir / "index.html"), "classes": model.class_names,
            "validation_dice": _finite(validation), "published": record["version"] if record else None}  # fmt: skip


def pull_branch(site: SiteConfig, ref: str, pulls=None):
    """Pull a published source branch and check its files (the security boundary).

    Args:
        site: the site.
        ref: ``NAME`` or ``NAME@vNNNN``.
        pulls: a `StagedPulls`: a download stays staged until the command succeeds
            (None: pull straight into the registry folder).

    Returns:
        (the branch, its record's ``meta``, its folder).

    Raises:
        UserError: a bad reference, a registry refusal, or branch files that do not validate.
    """
    name, version = parse_ref(ref, "branch")
    folder = pulls.pull(BRANCH_KIND, name, version) if pulls else _client(site).pull(BRANCH_KIND, name, version)
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name in ("branch.pt", "branch.json")}
    try:
        branch = validate_branch_files(files)
    except ValueError as exc:
        raise UserError(f"{folder}: {exc}") from None
    record = json.loads((folder / "artifact.json").read_text())
    return branch, record.get("meta", {}), folder


def run_target(site: SiteConfig, dataset: str, factory_ref: str, branch_ref: str, settings_raw: dict, job: str | None = None,
               restart: bool = False, progress: Callable | None = None) -> dict:  # fmt: skip
    """Adapt to this site's domain with its few labels; no coordinator round, pulls only.

    What it pulls reaches the site's registry folder only if it succeeds.

    Args:
        site: the site.
        dataset: this site's prepared dataset (a few labelled cases, the rest may be unlabelled).
        factory_ref: the factory, ``NAME`` or ``NAME@vNNNN``.
        branch_ref: the source branch, ``NAME`` or ``NAME@vNNNN``.
        settings_raw: adaptation settings (keys of `AdaptSettings`).
        job: the job's name under ``<work_dir>/adapt/`` (default ``target-<branch>``).
        restart: start the job again (its old folder is kept aside).
        progress: called as ``progress(done, total, row)`` while training.

    Returns:
        The job folder, model, report, classes, few-shot slices and evaluation Dice.

    Raises:
        UserError: bad settings, dataset, factory, branch or job; a branch that does not fit
            the factory; a registry refusal.
    """
    _settings(settings_raw)
    parse_ref(factory_ref, "factory")
    parse_ref(branch_ref, "branch")
    with _command(site) as pulls:
        return _run_target(pulls, site, dataset, factory_ref, branch_ref, settings_raw, job, restart, progress)


def _run_target(pulls, site: SiteConfig, dataset: str, factory_ref: str, branch_ref: str, settings_raw: dict, job: str | None,
                restart: bool, progress: Callable | None) -> dict:  # fmt: skip
    settings = _settings(settings_raw)
    parse_ref(factory_ref, "factory")
    parse_ref(branch_ref, "branch")
    factory, _ = pull_factory(site, factory_ref, pulls)
    branch, meta, folder = pull_branch(site, branch_ref, pulls)
    bf = branch.config()["factory"]
    if bf.get("sha256") and bf["sha256"] != factory.identity["sha256"]:
        raise UserError(
            f"branch {branch_ref} was trained on factory {bf.get('name')} {bf.get('version')} (generator sha256 {bf['sha256'][:12]}...), "
            f"not on {factory.identity['name']} {factory.identity['version']}; pull the factory it names"
        )
    cfg = branch.config()
    if tuple(cfg["feature_channels"]) != tuple(factory.config.channels) or cfg["resolution"] != factory.config.resolution:
        raise UserError(
            f"{folder}: the branch reads features {cfg['feature_channels']} at {cfg['resolution']} px, the factory has {list(factory.config.channels)} at {factory.config.resolution}"
        )
    unknown = [n for n in cfg["class_names"][1:] if n not in factory.schema.classes]
    if unknown:
        raise UserError(f"{folder}: the branch segments {', '.join(unknown)}, which the factory's label schema does not have")
    source_client = meta.get("source_client_id")
    if source_client is not None and not (isinstance(source_client, int) and 0 <= source_client < factory.config.n_clients):
        raise UserError(f"{folder}: artifact.json: source_client_id {source_client!r} is not a client id of the factory")
    path = _checked_dataset(site, dataset, factory.schema)
    target_client = factory.client_id(site.site_name)
    config = {"dataset": str(path), "factory": factory.identity, "branch": {"name": folder.parent.name, "version": folder.name},
              "settings": settings.to_dict(), "source_client_id": source_client, "target_client_id": target_client}  # fmt: skip
    jd, resume = _open_job(_job_dir(site, job or f"target-{folder.parent.name}"), "target", config, restart)
    try:
        try:
            data = labelled_slices(path, factory.schema, factory.slices, cache_dir=site.work_dir / "cache", only_labelled=False)
        except (ValueError, DatasetError) as exc:
            raise UserError(f"{path}: {exc}") from None
        try:  # messages of training name the job folder, the branch or the dataset themselves
            model, summary = train_target(factory, branch, source_client, target_client, data, settings, jd, resume=resume, progress=progress)
        except ValueError as exc:
            raise UserError(f"target job {jd.root}: {exc}") from None
        atomic.write_bytes(jd.model_file, tensor_blob(model.state()))
        _target_report(jd, model, data, summary, factory)
        ev = summary.get("evaluation", {})
        dice = {mode: _finite({model.class_names[int(k)]: v for k, v in r["mean"].items()}) for mode, r in ev.items()}
        jd.finish(evaluation_dice=dice)
    except BaseException as exc:
        jd.fail(f"{type(exc).__name__}: {exc}")
        raise
    return {"job": str(jd.root), "model": str(jd.model_file), "report": str(jd.report_dir / "index.html"), "classes": model.class_names,
            "few_shot_slices": summary["few_shot_slices"], "evaluation_dice": dice}  # fmt: skip


# -- reports ---------------------------------------------------------------------------------


def _rows(values: dict, names: list[str]) -> list[list]:
    return [[names[int(k)], "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"] for k, v in values.items()]


def _source_report(jd, model, data, summary: dict, factory) -> None:
    out = jd.report_dir
    report.loss_plot(out / "losses.png", jd.metrics())
    table = label_table(schema_class_ids(factory.schema), model.class_names, data.ignore_label, data.num_classes)
    labels = table[data.labels]
    fg = torch.nonzero(((labels > 0) & (labels < 255)).flatten(1).any(1)).flatten()
    pick = fg[torch.linspace(0, fg.numel() - 1, min(6, fg.numel())).long()] if fg.numel() else torch.arange(min(6, len(data)))
    x = data.images[pick]
    with torch.no_grad():
        rec, _, _ = invert(model.generator, model.encoder, x, SOURCE, model.feature_scale)
        pred = model.predict(x).argmax(1)
    report.image_grid(out / "translations.png", [[x[i, 0], rec[i, 0].clamp(-1, 1)] for i in range(x.shape[0])],
                      [f"slice {i}" for i in range(x.shape[0])], ["image", "reconstruction"], "source encoder: inversion into the factory")  # fmt: skip
    report.overlay_grid(out / "overlays.png", x, pred, labels[pick], model.class_names, "source branch on training-set slices")
    val = summary.get("validation")
    tables = [("Validation Dice (held-out cases, factory slice space)", ["class", "mean Dice"], _rows(val["mean"], model.class_names))] if val else []
    report.write_index(out, f"Source branch job {jd.root.name}", {"factory": f"{factory.identity['name']} {factory.identity['version']}",
                       "classes": ", ".join(model.class_names[1:]), "training cases": summary["train_cases"],
                       "validation cases": summary["val_cases"], "steps": jd.config["settings"]["steps"]},
                       [("Losses", "losses.png"), ("Inversion", "translations.png"), ("Segmentation", "overlays.png")], tables)  # fmt: skip


def _target_report(jd, model, data, summary: dict, factory) -> None:
    out = jd.report_dir
    report.loss_plot(out / "losses.png", jd.metrics(), ["loss", "loss_rec", "loss_cycle", "loss_seg", "loss_translate_seg", "loss_cycle_seg"])
    g, e, s = model.generator, model.encoder, model.feature_scale
    xs, _ = synthetic_source(g, model.branch_source, model.meta["domains"]["source_client_id"], 4, seed=123)
    table = label_table(schema_class_ids(factory.schema), model.class_names, data.ignore_label, data.num_classes)
    labels = table[data.labels]
    fg = torch.nonzero(((labels > 0) & (labels < 255)).flatten(1).any(1)).flatten()
    pool = fg if fg.numel() else torch.arange(len(data))
    pick = pool[torch.linspace(0, pool.numel() - 1, min(4, pool.numel())).long()]
    xt = data.images[pick]
    with torch.no_grad():
        rows = []
        for x, own, other, name in ((xs, SOURCE, TARGET, "synthetic source"), (xt, TARGET, SOURCE, "target")):
            rec, _, _ = invert(g, e, x, own, s)
            tr, _, _ = invert(g, e, x, other, s)
            cyc, _, _ = invert(g, e, tr.clamp(-1, 1), own, s)
            rows += [[x[i, 0], rec[i, 0].clamp(-1, 1), tr[i, 0].clamp(-1, 1), cyc[i, 0].clamp(-1, 1)] for i in range(x.shape[0])]
        names = [f"synthetic source {i}" for i in range(xs.shape[0])] + [f"target {i}" for i in range(xt.shape[0])]
        report.image_grid(out / "translations.png", rows, names, ["image", "reconstruction", "translated", "cycled back"],
                          "source -> target and target -> source through W+")  # fmt: skip
        pred = model.predict(xt).argmax(1)
    has_ref = bool(((labels[pick] != 255).any()))
    report.overlay_grid(
        out / "overlays.png", xt, pred, labels[pick] if has_ref else None, model.class_names, "adapted model (S_t + S_s average) on target slices"
    )
    tables = []
    for mode, r in summary.get("evaluation", {}).items():
        tables.append((f"Dice on held-out labelled target cases: {mode}", ["class", "mean Dice"], _rows(r["mean"], model.class_names)))
    report.write_index(out, f"Target adaptation job {jd.root.name}", {"factory": f"{factory.identity['name']} {factory.identity['version']}",
                       "source branch": f"{jd.config['branch']['name']} {jd.config['branch']['version']}",
                       "few-shot labelled slices": summary["few_shot_slices"], "classes in the few labels": ", ".join(summary["classes_in_few_labels"]),
                       "evaluation cases": summary["eval_cases"], "steps": jd.config["settings"]["steps"]},
                       [("Losses", "losses.png"), ("Translations", "translations.png"), ("Segmentation", "overlays.png")], tables)  # fmt: skip


# -- inference -------------------------------------------------------------------------------


def run_infer(model_path: str | Path, inputs: list[str], out: Path, mode: str = "average", dicom_seg: bool = False,
              modality: str | None = None, overwrite: bool = False) -> list[dict]:  # fmt: skip
    """Segment NIfTI volumes, DICOM series folders or prepared datasets with an adapted model;
    writes ``<out>/<name>.nii.gz`` (label on the input grid) and, for DICOM input with
    ``dicom_seg``, ``<out>/<name>.seg.dcm``. ``<name>`` is the input's name
    (`pipelines.adaptation.volumes.output_stem`) or a dataset's case id. Each written
    volume is logged at INFO.

    Every output path is checked before anything is written: two inputs with the same name,
    or an output file already there (an earlier run's label, perhaps of another patient)
    without `overwrite`, refuse the whole run.

    Args:
        model_path: the adapted model's ``model.pt``.
        inputs: NIfTI files, DICOM series folders or prepared dataset folders.
        out: the output folder (created).
        mode: which branch predicts (``average``, ``target``, ``source``).
        dicom_seg: also write a DICOM SEG for DICOM series inputs.
        modality: CT or MR, for NIfTI inputs.
        overwrite: replace output files that already exist.

    Returns:
        One row per written volume (input, label path, voxels per class, DICOM SEG path).

    Raises:
        UserError: a bad model or input, clashing or existing outputs (nothing written then).
    """
    try:
        model = AdaptedModel.load(model_path)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    schema = parse_schema(model.meta["schema_definition"], f"{model_path}: schema_definition")
    log.debug("model %s: %s model of classes %s, predicting with mode %s", model_path, model.kind, ", ".join(model.class_names), mode)
    sk = model.meta["slices"]
    spacing = sk["spacing"]
    settings = SliceSettings(size=sk["size"], n_bins=sk["n_bins"], spacing=tuple(spacing) if isinstance(spacing, list) else spacing, min_foreground=0.0)
    ids = model.class_ids

    def predict_fn(x, bins):
        p = model.predict(x, mode) if x.shape[0] > 1 else model.predict(torch.cat([x, x]), mode)[:1]
        full = torch.zeros(p.shape[0], schema.num_classes, *p.shape[2:])
        full[:, ids] = p
        return full

    jobs: list[tuple[str, str, Path, str | None]] = []  # (name, kind, source, modality)
    for item in inputs:
        p = Path(item)
        if (p / "manifest.json").is_file():
            try:
                ds = load_dataset(p)
            except DatasetError as exc:
                raise UserError(f"{p}: {exc}") from None
            jobs += [(c.case_id, "nifti", c.image, ds.modality) for c in ds.cases]
        elif p.is_dir():
            jobs.append((_output_stem(V, p), "dicom", p, modality))
        elif p.is_file():
            if modality is None:
                raise UserError(f"{p}: a NIfTI input needs --modality (CT or MR)")
            jobs.append((_output_stem(V, p), "nifti", p, modality))
        else:
            raise UserError(f"{p}: no such file or folder")
    seen: dict[str, Path] = {}
    for name, _, src, _ in jobs:  # one output per name: refuse before writing anything over another
        if name in seen:
            raise UserError(f"{seen[name]} and {src} would both write {out / name}.nii.gz; run them with separate --out folders (or rename one)")
        seen[name] = src
    if dicom_seg and not any(k == "dicom" for _, k, _, _ in jobs):
        raise UserError("--dicom-seg needs a DICOM series folder as input")
    for name, _, src, mod in jobs:
        if mod is not None and mod not in schema.modalities:
            raise UserError(f"{src}: modality {mod!r} has no intensity rule in schema {schema.name} ({', '.join(schema.modalities)})")
    if not overwrite:
        # An earlier run's label may be another patient's under the same name (case_a of
        # another folder): never replace it silently. lexists: a dangling link counts too.
        targets = [out / f"{name}.nii.gz" for name, _, _, _ in jobs]
        targets += [out / f"{name}.seg.dcm" for name, kind, _, _ in jobs if kind == "dicom" and dicom_seg]
        existing = [t for t in targets if os.path.lexists(t)]
        if existing:
            more = f" (and {len(existing) - 1} more output(s) of this run)" if len(existing) > 1 else ""
            raise UserError(f"{existing[0]} already exists{more}; pass --overwrite to replace it, or choose another --out")
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for name, kind, src, mod in jobs:
        try:
            if kind == "dicom":
                files = sorted(f for f in Path(src).rglob("*") if f.is_file() and not f.name.startswith("."))
                pred = V.predict_dicom_series(files, schema, settings, predict_fn, modality=mod)
            else:
                assert mod is not None  # a NIfTI job always has one: its dataset's, or --modality (checked above)
                pred = V.predict_volume_2d(src, mod, schema, settings, predict_fn)
        except (ValueError, OSError) as exc:
            raise UserError(f"{src}: {exc}") from None
        target = out / f"{name}.nii.gz"
        pred.save_nifti(target)
        row = {"input": str(src), "label": str(target), "voxels": {schema_name(schema, c): int((pred.label == c).sum()) for c in ids[1:]}}
        if kind == "dicom" and dicom_seg:
            seg_path = out / f"{name}.seg.dcm"
            assert pred.sources is not None  # predict_dicom_series gives the instance files
            V.write_dicom_seg(pred.label, pred.sources, {c: schema_name(schema, c) for c in ids[1:]}, seg_path, schema)
            row["dicom_seg"] = str(seg_path)
        log.info("%s: %s", name, target)
        rows.append(row)
    return rows


def _output_stem(volumes, path: Path) -> str:
    try:
        return volumes.output_stem(path)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def schema_name(schema: LabelSchema, class_id: int) -> str:
    """The name of a class of the label schema.

    Args:
        schema: the federation's label schema.
        class_id: one of its class ids.

    Returns:
        The class's name.
    """
    return next(k for k, v in schema.classes.items() if v == class_id)
