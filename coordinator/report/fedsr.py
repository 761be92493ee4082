"""The report of a FedSR run: each site's personalised model on its labelled cases, and the training curves.

FedSR sites score their own personalised models (shared encoder + their decoders) on their
labelled cases, which never train; the report shows those numbers per site and per structure,
each with its case count, and the per-round losses, the MI estimate and how far the SA
representation moved, one line per site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator import runs
from coordinator.report.reading import Run
from coordinator.report.tables import header_table, participation_table
from coordinator.results import fedsr_scores, ordered_classes
from fedimg_core import atomic
from fedimg_core.reporting import Section, Table, render_markdown, render_sections
from fedimg_core.reporting import figures as F

__all__ = ["build_fedsr_report"]

SCORES = (
    ("S-Dice", "eval_seg_dice"), ("Jaccard", "eval_seg_jaccard"), ("HD95 mm", "eval_seg_hd95_mm"), ("ASD mm", "eval_seg_asd_mm"),
    ("AVD %", "eval_seg_avd_percent"), ("R-Dice", "eval_reg_dice_mean"), ("NCC", "eval_reg_ncc"), ("local NCC", "eval_reg_local_ncc"),
)  # fmt: skip
CURVES = (
    ("registration loss L_reg", "loss_registration"), ("segmentation loss L_seg", "loss_segmentation"),
    ("MI estimate, segmentation decoder", "mi_segmentation"), ("SA representation moved (L2, eq. 7)", "sa_shift"),
)  # fmt: skip


def _curves(metrics: Mapping[str, Any]) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    panels: list[tuple[str, dict[str, list[tuple[float, float]]]]] = []
    for title, key in CURVES:
        series: dict[str, list[tuple[float, float]]] = {}
        for r in metrics.get("rounds", []):
            for row in r.get("sites", {}).values():
                value = (row.get("train") or {}).get(key)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    series.setdefault(str(row.get("name", "?")), []).append((float(r["round"]), float(value)))
        panels.append((title, series))
    return panels


def _round(value: Any, digits: int) -> Any:
    """A number for a table; None (shown as nothing recorded) for a missing or NaN one (e.g. HD95 of an empty prediction)."""
    return round(float(value), digits) if isinstance(value, (int, float)) and math.isfinite(value) else None


def build_fedsr_report(run: Run, folder: Path) -> None:
    """Write a FedSR run's report (index.html, report.md, training_curves.png) into ``folder``.

    Args:
        run: the run.
        folder: an empty folder.
    """
    metrics = runs.read_metrics(run.run_dir)
    scores = fedsr_scores(metrics)
    text = [
        "Each site's personalised model (the encoder as it left the round: the global one, frozen, in the fine-tuning rounds; "
        "with the site's own registration and segmentation decoders and the SA representation) scored at the site on its labelled "
        "cases, which never train. "
        "S-Dice, Jaccard, HD95, ASD and AVD: its segmentation (means over structures, then cases); R-Dice and NCC: the atlas "
        "registered to each case by its registration decoder. n: the cases behind each number."
    ]
    tables = []
    if scores:
        rows = [[site, row["round"], int(row.get("eval_cases") or 0), *[_round(row.get(k), 3) for _, k in SCORES]] for site, row in sorted(scores.items())]
        tables.append(Table(["site", "round", "n", *[c for c, _ in SCORES]], rows, "personalised models on each site's labelled cases"))
        classes = ordered_classes({k.split(".", 1)[1] for row in scores.values() for k in row if k.startswith("eval_seg_dice.")}, metrics.get("classes"))
        for metric, caption in (("eval_seg_dice", "segmentation Dice per structure"), ("eval_reg_dice", "registration Dice per structure")):
            per = [[site, *[_round(row.get(f"{metric}.{c}"), 3) for c in classes]] for site, row in sorted(scores.items())]
            tables.append(Table(["site", *classes], per, caption))
        if transductive := sorted(site for site, row in scores.items() if row.get("eval_trained_on_images")):
            text.append(f"{', '.join(transductive)}: every case has labels, so the site trained on these cases' images (never their labels): "
                        "its numbers are on images the networks saw.")  # fmt: skip
    else:
        text.append("No site scored a personalised model: sites without labelled cases report their losses only.")
    run_tables = [header_table(run)]
    if (left_out := participation_table(run.metrics)) is not None:
        run_tables.append(left_out)
    figure = F.png_bytes(F.line_panels(_curves(metrics), "round"))
    sections = [
        Section("Run", tables=run_tables),
        Section("Personalised models", text, tables),
        Section(
            "Training",
            ["Per round and site: the two losses, the Jensen-Shannon MI estimate and the SA representation's move."],
            images=[("training_curves.png", "FedSR losses, MI and SA representation per round and site")],
        ),  # fmt: skip
    ]
    atomic.write_bytes(folder / "training_curves.png", figure)
    title = f"Run report: {run.run_id}"
    atomic.write_text(folder / "index.html", render_sections(title, sections))
    atomic.write_text(folder / "report.md", render_markdown(title, sections))
