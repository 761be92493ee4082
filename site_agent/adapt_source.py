"""`site-agent adapt source`: train a source encoder and segmentation branch on labelled data, and publish the branch.

The branch (weights + a JSON config) is pushed to the coordinator's registry, which
validates it; images, labels, the encoder and the report stay in the site's work folder.
"""

from __future__ import annotations

from typing import Callable

import torch

from fedimg_core import atomic
from pipelines.adaptation import report
from pipelines.adaptation.jobs import tensor_blob
from pipelines.adaptation.networks import branch_files, invert
from pipelines.adaptation.training import SOURCE, label_table, schema_class_ids, train_source
from pipelines.adaptation.volumes import labelled_slices
from preprocessing.dataset import DatasetError
from site_agent.adapt_common import (
    BRANCH_KIND,
    adapt_command,
    adapt_settings,
    checked_dataset,
    dice_rows,
    finite_values,
    job_device,
    job_dir,
    log,
    open_job,
    parse_ref,
    pull_factory,
    site_registry,
)
from site_agent.config import SiteConfig
from site_agent.errors import UserError

__all__ = ["run_source"]


def run_source(site: SiteConfig, dataset: str, factory_ref: str, branch_name: str, settings_raw: dict, job: str | None = None,
               publish: bool = True, restart: bool = False, progress: Callable | None = None, device: str | None = None) -> dict:  # fmt: skip
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
        device: where the job trains: auto, cpu, cuda or cuda:N (None: the site's ``device``).

    Returns:
        The job folder, model, report, classes, validation Dice, published version and the
        device it trained on.

    Raises:
        UserError: bad settings, dataset, factory or job; a device this machine lacks
            (before anything is pulled or written); a registry refusal.
    """
    parse_ref(branch_name, "branch")
    parse_ref(factory_ref, "factory")
    adapt_settings(settings_raw)
    resolved = job_device(site, device)
    with adapt_command(site) as pulls:
        return _run_source(pulls, site, dataset, factory_ref, branch_name, settings_raw, job, publish, restart, progress, resolved)


def _run_source(pulls, site: SiteConfig, dataset: str, factory_ref: str, branch_name: str, settings_raw: dict, job: str | None,
                publish: bool, restart: bool, progress: Callable | None, device: torch.device) -> dict:  # fmt: skip
    parse_ref(branch_name, "branch")
    parse_ref(factory_ref, "factory")
    settings = adapt_settings(settings_raw)
    factory, folder = pull_factory(site, factory_ref, pulls)
    path = checked_dataset(site, dataset, factory.schema)
    client_id = factory.client_id(site.site_name)
    config = {"dataset": str(path), "factory": factory.identity, "branch": branch_name, "settings": settings.to_dict(), "site_client_id": client_id}
    jd, resume = open_job(job_dir(site, job or f"source-{branch_name}"), "source", config, restart)
    try:
        jd.write_record(device=str(device))  # where it ran, not what it is: a job may resume on another device
        if client_id is None:
            log.info("note: site %s did not train factory %s; its domain is the mean over all client ids", site.site_name, factory.identity["name"])
        try:
            data = labelled_slices(path, factory.schema, factory.slices, cache_dir=site.work_dir / "cache", only_labelled=True)
        except (ValueError, DatasetError) as exc:
            raise UserError(f"{path}: {exc}") from None
        try:
            model, summary = train_source(factory, data, settings, jd, client_id, resume=resume, progress=progress, device=device)
        except ValueError as exc:
            raise UserError(f"source job {jd.root}: {exc}") from None
        atomic.write_bytes(jd.model_file, tensor_blob(model.state()))  # CPU tensors: loads on any machine
        files = branch_files(model.branch_source)  # CPU tensors too
        for name, blob in files.items():
            atomic.write_bytes(jd.root / "branch" / name, blob)
        _source_report(jd, model, data, summary, factory)
        validation = {model.class_names[int(k)]: v for k, v in summary.get("validation", {}).get("mean", {}).items()}
        record = None
        if publish:
            meta = {"source_site": site.site_name, "source_client_id": client_id, "factory": factory.identity,
                    "classes": model.class_names, "validation_dice": finite_values(validation), "steps": settings.steps}  # fmt: skip
            record = site_registry(site).push(BRANCH_KIND, branch_name, files, meta)
            log.info("published %s %s %s", BRANCH_KIND, branch_name, record["version"])
        jd.finish(published=record["version"] if record else None, validation_dice=finite_values(validation))
    except BaseException as exc:
        jd.fail(f"{type(exc).__name__}: {exc}")
        raise
    return {"job": str(jd.root), "model": str(jd.model_file), "report": str(jd.report_dir / "index.html"), "classes": model.class_names,
            "validation_dice": finite_values(validation), "published": record["version"] if record else None, "device": str(device)}  # fmt: skip


def _source_report(jd, model, data, summary: dict, factory) -> None:
    out = jd.report_dir
    report.loss_plot(out / "losses.png", jd.metrics())
    table = label_table(schema_class_ids(factory.schema), model.class_names, data.ignore_label, data.num_classes)
    labels = table[data.labels]
    fg = torch.nonzero(((labels > 0) & (labels < 255)).flatten(1).any(1)).flatten()
    pick = fg[torch.linspace(0, fg.numel() - 1, min(6, fg.numel())).long()] if fg.numel() else torch.arange(min(6, len(data)))
    x = data.images[pick]
    with torch.no_grad():
        rec, _, _ = invert(model.generator, model.encoder, x.to(model.device), SOURCE, model.feature_scale)
        pred = model.predict(x).argmax(1)
    report.image_grid(out / "translations.png", [[x[i, 0], rec[i, 0].clamp(-1, 1)] for i in range(x.shape[0])],
                      [f"slice {i}" for i in range(x.shape[0])], ["image", "reconstruction"], "source encoder: inversion into the factory")  # fmt: skip
    report.overlay_grid(out / "overlays.png", x, pred, labels[pick], model.class_names, "source branch on training-set slices")
    val = summary.get("validation")
    tables = [("Validation Dice (held-out cases, factory slice space)", ["class", "mean Dice"], dice_rows(val["mean"], model.class_names))] if val else []
    report.write_index(out, f"Source branch job {jd.root.name}", {"factory": f"{factory.identity['name']} {factory.identity['version']}",
                       "classes": ", ".join(model.class_names[1:]), "training cases": summary["train_cases"],
                       "validation cases": summary["val_cases"], "steps": jd.config["settings"]["steps"]},
                       [("Losses", "losses.png"), ("Inversion", "translations.png"), ("Segmentation", "overlays.png")], tables)  # fmt: skip
