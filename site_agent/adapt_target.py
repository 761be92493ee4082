"""`site-agent adapt target`: adapt a published source branch to this site's domain with a few labels.

No coordinator round: the factory and the branch are pulled (and checked to fit each other),
and everything the job makes stays in the site's work folder.
"""

from __future__ import annotations

from typing import Callable

import torch

from fedimg_core import atomic
from pipelines.adaptation import report
from pipelines.adaptation.jobs import tensor_blob
from pipelines.adaptation.networks import invert
from pipelines.adaptation.training import SOURCE, TARGET, label_table, schema_class_ids, synthetic_source, train_target
from pipelines.adaptation.volumes import labelled_slices
from preprocessing.dataset import DatasetError
from site_agent.adapt_common import (
    adapt_command,
    adapt_settings,
    checked_dataset,
    dice_rows,
    finite_values,
    job_device,
    job_dir,
    open_job,
    parse_ref,
    pull_branch,
    pull_factory,
)
from site_agent.config import SiteConfig
from site_agent.errors import UserError

__all__ = ["run_target"]


def run_target(site: SiteConfig, dataset: str, factory_ref: str, branch_ref: str, settings_raw: dict, job: str | None = None,
               restart: bool = False, progress: Callable | None = None, device: str | None = None) -> dict:  # fmt: skip
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
        device: where the job trains: auto, cpu, cuda or cuda:N (None: the site's ``device``).

    Returns:
        The job folder, model, report, classes, few-shot slices, evaluation Dice and the
        device it trained on.

    Raises:
        UserError: bad settings, dataset, factory, branch or job; a branch that does not fit
            the factory; a device this machine lacks (before anything is pulled or written);
            a registry refusal.
    """
    adapt_settings(settings_raw)
    parse_ref(factory_ref, "factory")
    parse_ref(branch_ref, "branch")
    resolved = job_device(site, device)
    with adapt_command(site) as pulls:
        return _run_target(pulls, site, dataset, factory_ref, branch_ref, settings_raw, job, restart, progress, resolved)


def _run_target(pulls, site: SiteConfig, dataset: str, factory_ref: str, branch_ref: str, settings_raw: dict, job: str | None,
                restart: bool, progress: Callable | None, device: torch.device) -> dict:  # fmt: skip
    settings = adapt_settings(settings_raw)
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
    path = checked_dataset(site, dataset, factory.schema)
    target_client = factory.client_id(site.site_name)
    config = {"dataset": str(path), "factory": factory.identity, "branch": {"name": folder.parent.name, "version": folder.name},
              "settings": settings.to_dict(), "source_client_id": source_client, "target_client_id": target_client}  # fmt: skip
    jd, resume = open_job(job_dir(site, job or f"target-{folder.parent.name}"), "target", config, restart)
    try:
        jd.write_record(device=str(device))  # where it ran, not what it is: a job may resume on another device
        try:
            data = labelled_slices(path, factory.schema, factory.slices, cache_dir=site.work_dir / "cache", only_labelled=False)
        except (ValueError, DatasetError) as exc:
            raise UserError(f"{path}: {exc}") from None
        try:  # messages of training name the job folder, the branch or the dataset themselves
            model, summary = train_target(factory, branch, source_client, target_client, data, settings, jd, resume=resume, progress=progress,
                                          device=device)  # fmt: skip
        except ValueError as exc:
            raise UserError(f"target job {jd.root}: {exc}") from None
        atomic.write_bytes(jd.model_file, tensor_blob(model.state()))  # CPU tensors: loads on any machine
        _target_report(jd, model, data, summary, factory)
        ev = summary.get("evaluation", {})
        dice = {mode: finite_values({model.class_names[int(k)]: v for k, v in r["mean"].items()}) for mode, r in ev.items()}
        jd.finish(evaluation_dice=dice)
    except BaseException as exc:
        jd.fail(f"{type(exc).__name__}: {exc}")
        raise
    return {"job": str(jd.root), "model": str(jd.model_file), "report": str(jd.report_dir / "index.html"), "classes": model.class_names,
            "few_shot_slices": summary["few_shot_slices"], "evaluation_dice": dice, "device": str(device)}  # fmt: skip


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
        for x_cpu, own, other, name in ((xs, SOURCE, TARGET, "synthetic source"), (xt, TARGET, SOURCE, "target")):
            x = x_cpu.to(model.device)
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
        tables.append((f"Dice on held-out labelled target cases: {mode}", ["class", "mean Dice"], dice_rows(r["mean"], model.class_names)))
    report.write_index(out, f"Target adaptation job {jd.root.name}", {"factory": f"{factory.identity['name']} {factory.identity['version']}",
                       "source branch": f"{jd.config['branch']['name']} {jd.config['branch']['version']}",
                       "few-shot labelled slices": summary["few_shot_slices"], "classes in the few labels": ", ".join(summary["classes_in_few_labels"]),
                       "evaluation cases": summary["eval_cases"], "steps": jd.config["settings"]["steps"]},
                       [("Losses", "losses.png"), ("Translations", "translations.png"), ("Segmentation", "overlays.png")], tables)  # fmt: skip
