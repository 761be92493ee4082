"""`site-agent evaluate --model NAME --dataset TAG`: score a published model on the site's own labelled cases.

No federation round: the package is loaded (and verified) here, the dataset's labelled cases go
through the model's training chain and are scored exactly as `coordinator evaluate` scores a
run's checkpoints (`pipelines.scoring`: Dice with the empty-mask rule, HD95, ASSD, NSD, RVD,
volumes), so the same model on the same cases gives the same numbers at both ends.

Writes ``<work_dir>/evaluations/<model>-<version>/<dataset>/`` (replaced as a whole on a new
evaluation): ``evaluation.json`` (per case and per class), and ``report/index.html`` with a
per-class table, per-class boxplots of Dice and HD95, and the worst cases (lowest mean Dice)
drawn as overlays. Everything stays at the site; `aggregate` is the part a site may choose to
send (`site-agent evaluate --send`): per-class summaries and counts only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedimg_core import atomic
from fedimg_core.registry_wire import MIN_CASES_SENT
from fedimg_core.reporting import Section, Table, figures, render_sections
from pipelines import training
from pipelines.metrics import METRICS
from pipelines.model_package import WEIGHTS_FILE, ModelPackage
from pipelines.scoring import PreparedCases, ScoringPlan, preprocess_cases, score_model, scoring_plan
from preprocessing.dataset import DatasetError, load_dataset
from site_agent.adapt_common import checked_dataset
from site_agent.config import SiteConfig
from site_agent.errors import UserError

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
REPORT_DIR = "report"

__all__ = ["EVALUATION_FILE", "aggregate", "evaluate_model", "evaluation_dir", "send_aggregate"]

Progress = Callable[[str, int, int], None]


def evaluation_dir(site: SiteConfig, package: ModelPackage, dataset_name: str) -> Path:
    """Where an evaluation of `package` on a dataset is kept.

    Args:
        site: the site.
        package: the model package.
        dataset_name: the dataset's name.

    Returns:
        ``<work_dir>/evaluations/<model>-<version>/<dataset>``.
    """
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in dataset_name) or "dataset"
    return site.work_dir / "evaluations" / f"{package.config['name']}-{package.version or 'unpublished'}" / safe


def evaluate_model(
    site: SiteConfig,
    package: ModelPackage,
    dataset: str,
    merge_lesions: str = "auto",
    worst: int = 3,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Score `package` on the site's labelled prepared dataset `dataset`; write the record and the report.

    The classes scored are those the dataset labels and the model predicts (``not_predicted``: labelled here,
    not predicted by the model: not scored).

    Args:
        site: the site.
        package: the loaded model package (`site_agent.models.open_model`).
        dataset: the dataset's path (absolute, or relative to ``data_dir``).
        merge_lesions: ``auto`` (merge lesions into their organ when the dataset labels the organ but none of its
            lesions), ``yes`` or ``no``.
        worst: how many of the worst cases get an overlay in the report (0: none).
        progress: called as ``progress(step, done, total)``; step is ``preprocessing`` or ``scoring``.

    Returns:
        The evaluation record (``path``: its folder).

    Raises:
        UserError: not a prepared dataset of the model's schema, no labelled case, bad options.
    """
    if worst < 0:
        raise UserError(f"--worst must be 0 or more (got {worst})")
    path = checked_dataset(site, dataset, package.schema)
    try:
        prepared = load_dataset(path)
        plan = scoring_plan(prepared, package.schema, merge_lesions, where=str(path))
        predicted = set(package.class_ids.values())
        not_predicted = [plan.names[c] for c in plan.classes if c not in predicted]
        plan.classes = [c for c in plan.classes if c in predicted]  # a class the model never segments says nothing about it
        if not plan.classes:
            raise UserError(f"{path}: labels none of the classes {package.ref} predicts ({', '.join(k for k in package.class_ids if k != 'background')})")
        if not_predicted:
            log.warning("%s: not scoring %s: labelled in this dataset but not predicted by %s", prepared.name, ", ".join(not_predicted), package.ref)
        log.info("%s: preprocessing %d labelled case(s) on the model's grid", prepared.name, sum(c.label is not None for c in prepared.cases))
        cases = preprocess_cases(prepared, package.settings, progress=(lambda i, n: progress("preprocessing", i, n)) if progress else None)
    except (DatasetError, ValueError) as exc:
        raise UserError(str(exc)) from None
    log.info("scoring %s on %d case(s)", package.ref, len(cases.volumes))
    scores = score_model(package.network, cases, package.settings, plan, progress=(lambda i, n: progress("scoring", i, n)) if progress else None)
    names = plan.names
    record: dict[str, Any] = {
        "model": package.ref,
        "weights_sha256": package.config["files"][WEIGHTS_FILE]["sha256"],
        "dataset": prepared.name,
        "modality": prepared.modality,
        "cases": len(cases.volumes),
        "case_ids": cases.case_ids,
        "merge_lesions": plan.merge,
        "classes": [names[c] for c in plan.classes],
        "not_predicted": not_predicted,
        "case_spacing_mm": cases.spacings,
        "failed_cases": cases.failed,  # unreadable: left out of the scores
        "surface_tolerance_mm": {names[c]: package.schema.surface_tolerance(names[c]) for c in plan.classes},
        **scores,
    }
    folder = evaluation_dir(site, package, prepared.name)
    folder.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> None:
        atomic.write_json(tmp / EVALUATION_FILE, record)
        _write_report(tmp / REPORT_DIR, record, package, cases, plan, worst)

    atomic.publish_dir(folder, build)
    record["path"] = str(folder)
    return record


def _worst_cases(record: dict[str, Any], k: int) -> list[int]:
    """Indices of the k cases with the lowest mean Dice over their scored classes (cases with none left out)."""
    means = [(sum(c.values()) / len(c), i) for i, c in enumerate(record["per_case"]) if c]
    return [i for _, i in sorted(means)[:k]]


def _fmt(v: Any, digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _write_report(folder: Path, record: dict[str, Any], package: ModelPackage, cases: PreparedCases, plan: ScoringPlan, worst: int) -> None:
    from fedimg_core.reporting.overlays import overlay_rows, write_case  # deferred: matplotlib

    folder.mkdir(parents=True)
    classes = record["classes"]
    facts = Table([], [["model", record["model"]], ["dataset", f"{record['dataset']} ({record['modality']})"], ["cases scored", record["cases"]],
                       ["lesions merged into organs", "yes" if record["merge_lesions"] else "no"]], caption="What was scored")  # fmt: skip
    rows = []
    for c in classes:
        m = record["metrics_mean"].get(c) or {}

        def cell(metric: str, digits: int = 3, mm: bool = False, m: dict = m) -> str:
            s = m.get(metric) or {}
            return f"{_fmt(s.get('mean'), digits)}{' mm' if mm and s.get('mean') is not None else ''} (n={s.get('n', 0)})"

        rows.append([c, cell("dice"), cell("hd95", 1, True), cell("assd", 2, True), cell("nsd"), f"{record['surface_tolerance_mm'][c]:g} mm", cell("rvd", 2)])
    table = Table(["class", "Dice", "HD95", "ASSD", "NSD", "NSD tolerance", "RVD"], rows,
                  caption="Mean per class (n: the cases behind the mean; distances are undefined where one mask is empty)")  # fmt: skip
    sections = [Section("Summary", text=[_summary_text(record)], tables=[facts, table])]
    dice_panels = [(c, [(record["model"], [case[c] for case in record["per_case"] if c in case])]) for c in classes]
    atomic.write_bytes(folder / "dice.png", figures.boxplots(dice_panels, "Dice per case, by class"))
    hd_panels = [(c, [(record["model"], [v for case in record["metrics"] if (v := (case.get(c) or {}).get("hd95")) is not None])]) for c in classes]
    atomic.write_bytes(folder / "hd95.png", _hd95_boxplots(hd_panels))
    sections.append(Section("Per case", images=[("dice.png", "Dice per case, by class"), ("hd95.png", "HD95 (mm) per case, by class")]))
    images = []
    ids = {name: cid for cid, name in plan.names.items()}
    for rank, i in enumerate(_worst_cases(record, worst), 1):
        image, label = cases.volumes[i]
        pred, ref = training.case_label_maps(package.network, image, label, package.settings, plan.merge)
        dice = {ids[c]: v for c, v in record["per_case"][i].items()}
        overlay = overlay_rows(ref, pred, {ids[c]: c for c in classes}, dice)
        name = f"worst{rank}.png"
        write_case(folder / name, image[0].cpu().numpy(), ref, pred, overlay, f"{record['case_ids'][i]}: rank {rank} of {record['cases']} by mean Dice")
        images.append((name, f"{record['case_ids'][i]}: " + ", ".join(f"{c} {v:.3f}" for c, v in record["per_case"][i].items())))
    if images:
        sections.append(Section("Worst cases", text=["The cases with the lowest mean Dice: image, reference and prediction per class."], images=images))
    atomic.write_text(folder / "index.html", render_sections(f"{record['model']} on {record['dataset']}", sections))


def _summary_text(record: dict[str, Any]) -> str:
    means = [v for v in record["mean"].values()]
    overall = f"mean Dice over classes {sum(means) / len(means):.3f}" if means else "no class could be scored"
    return f"{record['model']} on {record['cases']} labelled case(s) of {record['dataset']}: {overall}."


def _hd95_boxplots(panels: list) -> bytes:
    """Boxplots of HD95 (mm): `figures.boxplots` draws on a 0..1 axis, so this one scales to the data."""
    values = [v for _, boxes in panels for _, vs in boxes for v in vs]
    if not values:
        return figures.empty_figure("HD95: undefined on every case (a mask empty)")
    fig = figures.new_figure((max(4.0, 2.2 * len(panels)), 3.6))
    ax = fig.add_subplot(1, 1, 1)
    data = [vs[0][1] for _, vs in panels]
    ax.boxplot([d if d else [float("nan")] for d in data], widths=0.6)
    ax.set_xticks(range(1, len(panels) + 1), [t for t, _ in panels], rotation=30, ha="right")
    ax.set_ylabel("HD95 (mm)")
    fig.tight_layout()
    return figures.png_bytes(fig)


def aggregate(record: dict[str, Any], site_name: str) -> dict[str, Any]:
    """What `--send` sends: per class and metric the mean, median and n, the number of cases, the modality. No case
    ids, per-case values, dataset names or paths; no mean or median behind fewer than `MIN_CASES_SENT` cases.

    Args:
        record: the evaluation record.
        site_name: this site's name.

    Returns:
        The aggregate.

    Raises:
        UserError: fewer than `MIN_CASES_SENT` cases were scored.
    """
    if record["cases"] < MIN_CASES_SENT:
        raise UserError(
            f"--send needs at least {MIN_CASES_SENT} scored cases (a mean of fewer says too much about each patient); {record['dataset']} has {record['cases']}: nothing was sent"
        )

    def kept(summary: dict[str, Any]) -> dict[str, Any]:  # a number behind fewer than MIN_CASES_SENT cases is not sent, only its n
        return dict(summary) if summary.get("n", 0) >= MIN_CASES_SENT else {"mean": None, "median": None, "n": summary.get("n", 0)}

    return {
        "site": site_name,
        "model": record["model"],
        "weights_sha256": record["weights_sha256"],
        "modality": record["modality"],
        "cases": record["cases"],
        "merge_lesions": record["merge_lesions"],
        "classes": {c: {m: kept(record["metrics_mean"][c][m]) for m in METRICS if m in record["metrics_mean"][c]} for c in record["classes"]},
    }


def send_aggregate(site: SiteConfig, package: ModelPackage, record: dict[str, Any]) -> str:
    """Send `aggregate` of an evaluation to the coordinator (the site chose to: ``--send``).

    Args:
        site: the site (its registry section and token).
        package: the evaluated package (a published version).
        record: the evaluation record.

    Returns:
        Where the coordinator keeps it (``model NAME@vNNNN``).

    Raises:
        UserError: an unpublished package, or the coordinator refused or cannot be reached.
    """
    from site_agent.adapt_common import site_registry

    if not package.version:
        raise UserError(f"{package.folder}: --send needs a published model (NAME@vNNNN pulled from the registry), not a package folder")
    site_registry(site).send_evaluation(package.config["name"], package.version, aggregate(record, site.site_name))
    return f"model {package.ref}"
