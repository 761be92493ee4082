"""Comparing runs side by side (FedAvg, FedProx, FedOpt, ConDistFL, ...): index.html,
comparison.md, comparison.json and the methods_global.png bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from coordinator.report.figures import plot_grouped_bars
from coordinator.report.numbers import cost_summary
from coordinator.report.reading import Evaluation, Run, class_means, foreground_classes, global_rows, load_run, local_rows, mapping, mean, num, scored_mean
from coordinator.report.tables import evaluation_mean
from coordinator.results import ordered_classes
from fedimg_core import atomic
from fedimg_core.reporting import Section, Table, fixed, render_markdown, render_sections


def method_record(run: Run, label: str | None = None) -> dict[str, Any]:
    """One run's row of the comparison (JSON-ready, None where not recorded).

    Args:
        run: the run.
        label: the method's name (default ``<plan> (<mode>)``).

    Returns:
        Global and local Dice per class and mean, out-of-federation summaries, rounds, bytes, wall time.
    """
    glob, local = global_rows(run.metrics), local_rows(run.metrics)
    cost = cost_summary(run.metrics, run.state)
    plan, mode = run.metrics.plan or "?", run.metrics.mode or "?"
    return {
        "method": label or f"{plan} ({mode})",
        "run_id": run.run_id,
        "run_dir": str(run.run_dir),
        "plan": plan,
        "mode": mode,
        "status": run.state.get("status"),
        "classes": foreground_classes(run.schema, glob, local),
        "global": {"model": glob.label, "dice": class_means(glob), "mean": scored_mean(glob)},
        "local": {"model": local.label, "dice": class_means(local), "mean": scored_mean(local)},
        "oof": {ev.dataset: oof_summary(ev) for ev in run.evaluations},
        "rounds_done": cost["rounds_done"],
        "rounds_planned": cost["rounds_planned"],
        "mb_to_sites": cost["mb_to_sites_total"],
        "mb_from_sites": cost["mb_from_sites_total"],
        "mb_total": cost["mb_total"],
        "wall_s_rounds": cost["wall_s_rounds"],
        "run_s": cost["run_s"],
        "wall_s": cost["run_s"] if cost["run_s"] is not None else cost["wall_s_rounds"],
    }


def oof_summary(ev: Evaluation) -> dict[str, Any]:
    """The global model's Dice per class and mean on an out-of-federation dataset, and the
    same averaged over the local models (None where the evaluation has no such model)."""
    glob = ev.models.get("global")
    locals_ = [mapping(m.get("mean")) for k, m in ev.models.items() if k.startswith("local")]
    local_mean = {"mean": {c: mean(m.get(c) for m in locals_) for c in ev.classes}}
    return {
        "global": _eval_summary(glob, ev.classes) if glob else None,
        "local_mean": _eval_summary(local_mean, ev.classes) if locals_ else None,
    }


def _eval_summary(model: Mapping[str, Any], classes: list[str]) -> dict[str, Any]:
    means = mapping(model.get("mean"))
    dice = {c: v for c in classes if (v := num(means.get(c))) is not None}
    return {"dice": dice, "mean": evaluation_mean(model, classes)}


def compare_runs(run_dirs: list[Path], out_dir: Path, labels: list[str] | None = None) -> Path:
    """Write a comparison of runs into ``out_dir`` (index.html, comparison.md, comparison.json, methods_global.png).

    Args:
        run_dirs: the runs' directories.
        out_dir: the output folder (created).
        labels: one method name per run (default ``<plan> (<mode>)``).

    Returns:
        ``out_dir``.

    Raises:
        ValueError: ``labels`` and ``run_dirs`` differ in length.
    """
    run_dirs = [Path(d) for d in run_dirs]
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_run(d, log=lambda _msg: None) for d in run_dirs]
    records = _unique_methods([method_record(run, labels[i] if labels else None) for i, run in enumerate(runs)])
    schema = runs[0].schema if runs else {}
    classes = ordered_classes({c for r in records for c in r["classes"]}, schema)
    datasets = _oof_columns(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    series = [(r["method"], [r["global"]["dice"].get(c) for c in classes] + [r["global"]["mean"]]) for r in records]
    chart = plot_grouped_bars([*classes, "mean"], series, "global model, in federation: Dice per class")
    atomic.write_bytes(out_dir / "methods_global.png", chart)
    atomic.write_json(out_dir / "comparison.json", {"classes": classes, "oof_datasets": datasets, "runs": records})
    sections = comparison_sections(records, classes, datasets)
    title = f"Comparison of {len(records)} runs"
    atomic.write_text(out_dir / "index.html", render_sections(title, sections))
    atomic.write_text(out_dir / "comparison.md", render_markdown(title, sections))
    return out_dir


def _unique_methods(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two runs with the same method label get their run id appended."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r["method"]] = counts.get(r["method"], 0) + 1
    for r in records:
        if counts[r["method"]] > 1:
            r["method"] = f"{r['method']} [{r['run_id']}]"
    return records


def _oof_columns(runs: list[Run]) -> dict[str, list[str]]:
    """Out-of-federation dataset -> its classes (union over the runs evaluated on it)."""
    out: dict[str, list[str]] = {}
    for run in runs:
        for ev in run.evaluations:
            out.setdefault(ev.dataset, [])
            out[ev.dataset] += [c for c in ev.classes if c not in out[ev.dataset]]
    return dict(sorted(out.items()))


def comparison_table(records: list[dict[str, Any]], classes: list[str], datasets: Mapping[str, list[str]]) -> Table:
    """One row per run: global and local Dice per class and mean, out-of-federation Dice, cost."""
    groups = [("", 1), ("global in-fed", len(classes) + 1), ("local in-fed", len(classes) + 1)]
    columns = ["method", *classes, "mean", *classes, "mean"]
    for dataset, ds_classes in datasets.items():
        groups.append((f"best global OOF {dataset}", len(ds_classes) + 1))
        columns += [*ds_classes, "mean"]
    groups.append(("cost", 3))
    columns += ["rounds", "MB sent + received", "wall time (s)"]
    rows = []
    for r in records:
        row = [r["method"]]
        for kind in ("global", "local"):
            row += [r[kind]["dice"].get(c) for c in classes] + [r[kind]["mean"]]
        for dataset, ds_classes in datasets.items():
            g = mapping(mapping(r["oof"].get(dataset)).get("global"))
            row += [mapping(g.get("dice")).get(c) for c in ds_classes] + [g.get("mean")]
        row += [str(r["rounds_done"]), fixed(r["mb_total"], 3), fixed(r["wall_s"], 1)]
        rows.append(row)
    return Table(columns, rows, "Dice per class (mean across the sites that label each class) and cost", groups)


def comparison_sections(records: list[dict[str, Any]], classes: list[str], datasets: Mapping[str, list[str]]) -> list[Section]:
    """The comparison page: the runs, then Dice and cost."""
    runs_table = Table(
        ["method", "run id", "plan", "mode", "status", "global model", "local models"],
        [[r["method"], r["run_id"], r["plan"], r["mode"], str(r["status"] or ""), r["global"]["model"], r["local"]["model"]] for r in records],
        "runs",
    )
    return [
        Section("Runs", tables=[runs_table]),
        Section(
            "Dice and cost",
            [
                "In-fed (in federation): Dice on each site's validation cases, per class the mean across the sites "
                "that label it; global: the final global model (the best one where the run has no final scores); "
                "local: each site's model after local training in the last round. OOF (out of federation): the best global "
                "model (the paper's selection rule, as `coordinator evaluate` scores it) on a dataset no site trained on "
                "(evaluations/<dataset>.json). "
                "Wall time: run start to finish (sum of round times where unknown)."
            ],
            [comparison_table(records, classes, datasets)],
            [("methods_global.png", "global model Dice per class and method")],
        ),
    ]
