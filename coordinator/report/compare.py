"""Comparing runs side by side (FedAvg, FedProx, FedOpt, ConDistFL, ...): index.html,
comparison.md, comparison.json and the methods_global.png bar chart."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Mapping

from coordinator.report.figures import plot_grouped_bars
from coordinator.report.forgetting import COMPARE_FORGETTING_TEXT, FORGETTING_TITLE, forgetting_comparison_table, forgetting_record
from coordinator.report.numbers import cost_summary
from coordinator.report.reading import Evaluation, Run, class_means, foreground_classes, in_federation, load_run, mapping, mean, num, scored_mean
from coordinator.report.site_classes import site_classes_comparison, site_classes_records
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
        Global and local Dice per class and mean on the test cases (``split``: ``test``; a run without
        test cases falls back to its validation cases, ``split``: ``validation``), the selected global
        model on its validation cases (``global_validation``), out-of-federation summaries, rounds,
        bytes, wall time; ``forgetting``: Dice on the classes each site does not train on (`forgetting_record`);
        ``site_classes``: per site, its trained and test-only classes (`site_classes_records`).
    """
    fed = in_federation(run.metrics)
    cost = cost_summary(run.metrics, run.state)
    plan, mode = run.metrics.plan or "?", run.metrics.mode or "?"
    return {
        "method": label or f"{plan} ({mode})",
        "run_id": run.run_id,
        "run_dir": str(run.run_dir),
        "plan": plan,
        "mode": mode,
        "status": run.state.get("status"),
        "split": fed.split,
        "classes": foreground_classes(run.schema, fed.glob, fed.local, fed.global_validation),
        "global": {"model": fed.glob.label, "dice": class_means(fed.glob), "mean": scored_mean(fed.glob)},
        "local": {"model": fed.local.label, "dice": class_means(fed.local), "mean": scored_mean(fed.local)},
        "global_validation": {"model": fed.global_validation.label, "dice": class_means(fed.global_validation), "mean": scored_mean(fed.global_validation)},
        "oof": {ev.dataset: oof_summary(ev) for ev in run.evaluations},
        "forgetting": forgetting_record(run.metrics),  # classes a site does not train on (test-only reference labels); None without
        "site_classes": site_classes_records(run.metrics),  # per site, trained and test-only classes (the paper's Table 5)
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
    series = [(_method_cell(r), [r["global"]["dice"].get(c) for c in classes] + [r["global"]["mean"]]) for r in records]
    fallback = " (* validation cases: no test split)" if any(r["split"] == "validation" for r in records) else ""
    chart = plot_grouped_bars([*classes, "mean"], series, f"global model, in federation, test cases{fallback}: Dice per class")
    atomic.write_bytes(out_dir / "methods_global.png", chart)
    atomic.write_json(out_dir / "comparison.json", {"classes": classes, "oof_datasets": datasets, "runs": records})
    sections = comparison_sections(records, classes, datasets)
    title = f"Comparison of {len(records)} runs"
    atomic.write_text(out_dir / "index.html", render_sections(title, sections))
    atomic.write_text(out_dir / "comparison.md", render_markdown(title, sections))
    return out_dir


def seed_summary(records: list[Mapping[str, Any]], method_of: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per method, the global model's test Dice (mean over classes) over the runs of its seeds.

    Args:
        records: comparison records (`method_record`, ``comparison.json``'s ``runs``), one per run.
        method_of: a record's ``method`` label -> the method it is a run of (e.g. ``"fedavg seed 1"`` -> ``"fedavg"``);
            records not listed are left out.

    Returns:
        method -> ``values`` (one per run with a test score, in record order), ``n``, ``mean``, ``sd`` (the
        sample standard deviation, None below 2 runs) and ``without_test`` (runs left out because they
        have no test split or no score).
    """
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        method = method_of.get(str(r.get("method")))
        if method is None:
            continue
        entry = out.setdefault(method, {"values": [], "without_test": 0})
        score = num(mapping(r.get("global")).get("mean"))
        if r.get("split") == "test" and score is not None:
            entry["values"].append(score)
        else:
            entry["without_test"] += 1
    for entry in out.values():
        values = entry["values"]
        entry["n"] = len(values)
        entry["mean"] = statistics.fmean(values) if values else None
        entry["sd"] = statistics.stdev(values) if len(values) > 1 else None
    return out


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
    """One row per run: global and local Dice per class and mean (test cases), the selected global
    model's validation mean, out-of-federation Dice, cost."""
    on = "test" if any(r.get("split") == "test" for r in records) or not records else "validation (no test split)"
    groups = [("", 1), (f"global in-fed, {on}", len(classes) + 1), (f"local in-fed, {on}", len(classes) + 1), ("selected on validation", 1)]
    columns = ["method", *classes, "mean", *classes, "mean", "global mean"]
    for dataset, ds_classes in datasets.items():
        groups.append((f"best global OOF {dataset}", len(ds_classes) + 1))
        columns += [*ds_classes, "mean"]
    groups.append(("cost", 3))
    columns += ["rounds", "MB sent + received", "wall time (s)"]
    rows = []
    for r in records:
        row: list[Any] = [_method_cell(r)]
        for kind in ("global", "local"):
            row += [r[kind]["dice"].get(c) for c in classes] + [r[kind]["mean"]]
        row.append(mapping(r.get("global_validation")).get("mean"))
        for dataset, ds_classes in datasets.items():
            g = mapping(mapping(r["oof"].get(dataset)).get("global"))
            row += [mapping(g.get("dice")).get(c) for c in ds_classes] + [g.get("mean")]
        row += [str(r["rounds_done"]), fixed(r["mb_total"], 3), fixed(r["wall_s"], 1)]
        rows.append(row)
    return Table(columns, rows, "Dice per class (mean across the sites that label each class) and cost", groups)


def _method_cell(record: Mapping[str, Any]) -> str:
    """The method's name, marked ``*`` when its in-fed columns fall back to the validation cases."""
    return str(record["method"]) + (" *" if record.get("split") == "validation" else "")


def comparison_sections(records: list[dict[str, Any]], classes: list[str], datasets: Mapping[str, list[str]]) -> list[Section]:
    """The comparison page: the runs, then Dice and cost."""
    runs_table = Table(
        ["method", "run id", "plan", "mode", "status", "in-fed cases", "global model", "local models"],
        [
            [r["method"], r["run_id"], r["plan"], r["mode"], str(r["status"] or ""), str(r.get("split") or ""), r["global"]["model"], r["local"]["model"]]
            for r in records
        ],
        "runs",
    )
    fallback = [r["method"] for r in records if r.get("split") == "validation"]
    notes = (
        [
            f"* No test split in {'this run' if len(fallback) == 1 else 'these runs'} ({', '.join(fallback)}): "
            "in-fed columns on the validation cases that also selected the model, which is optimistic; not comparable with test columns."
        ]
        if fallback
        else []
    )
    return [
        Section("Runs", tables=[runs_table]),
        Section(
            "Dice and cost",
            [
                "In-fed (in federation): Dice on each site's test cases (never used for training or selection), per class the "
                "mean across the sites that label it; global: the best global model (selected on the sites' validation cases; "
                "the final model where the run recorded no best); local: each site's best local model (selected on its own "
                "validation cases). 'selected on validation': the selected global model's selection score on the validation "
                "cases. OOF (out of federation): the best global model (the paper's selection rule, as `coordinator evaluate` "
                "scores it) on a dataset no site trained on (evaluations/<dataset>.json). "
                "Wall time: run start to finish (sum of round times where unknown).",
                *notes,
            ],
            [comparison_table(records, classes, datasets)],
            [("methods_global.png", "global model Dice per class and method, test cases")],
        ),
        *_forgetting_sections(records, classes),
    ]


def _forgetting_sections(records: list[dict[str, Any]], classes: list[str]) -> list[Section]:
    """The forgetting section when some run has reference scores (none otherwise)."""
    schema = {c: i for i, c in enumerate(classes)}
    table = forgetting_comparison_table(records, schema)
    per_site = site_classes_comparison(records, schema)
    return ([per_site] if per_site is not None else []) + ([Section(FORGETTING_TITLE, [COMPARE_FORGETTING_TEXT], [table])] if table is not None else [])
