"""The run report's tables: Dice per site and class, validation and test side by side,
out-of-federation evaluations, cost, the run's header and its split sizes."""

from __future__ import annotations

from typing import Any, Mapping

from coordinator.report.numbers import model_order
from coordinator.report.reading import (
    MEAN_ACROSS_SITES,
    Evaluation,
    Metrics,
    Run,
    Scored,
    class_means,
    mapping,
    mean,
    num,
    row_mean,
    scored_mean,
)
from coordinator.results import class_dice, participation
from coordinator.run_metrics import RunMetrics
from fedimg_core.reporting import Table, cell, fixed


def dice_table(scored: Scored, classes: list[str], caption: str) -> Table:
    """Rows: sites, then the mean across the sites that score each class; columns: classes, mean.

    Args:
        scored: the rows of one model kind.
        classes: the columns.
        caption: the table's caption.

    Returns:
        The table.
    """
    rows: list[list[Any]] = []
    for site, row in sorted(scored.rows.items()):
        d = class_dice(row)
        rows.append([site, *[d.get(c) for c in classes], row_mean(row)])
    if rows:
        means = class_means(scored)
        rows.append([MEAN_ACROSS_SITES, *[means.get(c) for c in classes], scored_mean(scored)])
    return Table(["site", *classes, "mean"], rows, caption)


def split_table(val: Scored, test: Scored, caption: str) -> Table:
    """Validation and test side by side, per site: cases and mean Dice on each split.

    Args:
        val: the model kind's rows on the validation cases (what selected it).
        test: the same models' rows on the test cases.
        caption: the table's caption.

    Returns:
        Rows: sites (with the round of each local model where ``val.rounds`` has it), then the
        mean across sites (cases summed; Dice: mean over classes of the per-class means across
        sites, on validation the selection score); columns: validation cases, validation Dice,
        test cases, test Dice.
    """
    with_round = bool(val.rounds)
    rows: list[list[Any]] = []
    for site in sorted(set(val.rows) | set(test.rows)):
        v, t = val.rows.get(site, {}), test.rows.get(site, {})
        rounds = [val.rounds.get(site)] if with_round else []
        rows.append([site, *rounds, _cases(v), row_mean(v) if v else None, _cases(t), row_mean(t) if t else None])
    if rows:
        rounds = [None] if with_round else []
        rows.append([MEAN_ACROSS_SITES, *rounds, _total_cases(val), scored_mean(val), _total_cases(test), scored_mean(test)])
    columns = ["site", *(["round"] if with_round else []), "validation cases", "validation Dice", "test cases", "test Dice"]
    return Table(columns, rows, caption)


def _count(value: object) -> int | None:
    v = num(value)
    return int(v) if v is not None else None


def _cases(row: Mapping[str, float]) -> int | None:
    """The number of cases a row scored (``cases``), None where not recorded."""
    return _count(row.get("cases"))


def _total_cases(scored: Scored) -> int | None:
    counts = [c for c in (_cases(row) for row in scored.rows.values()) if c is not None]
    return sum(counts) if counts else None


def evaluation_table(ev: Evaluation) -> Table:
    """One out-of-federation evaluation: rows models, columns classes and their mean."""
    rows: list[list[Any]] = []
    for key in model_order(ev.models):
        model = ev.models[key]
        means = mapping(model.get("mean"))
        label = str(model.get("label") or key)
        rows.append([label, *[num(means.get(c)) for c in ev.classes], evaluation_mean(model, ev.classes)])
    details = [f"{ev.cases} cases"] if ev.cases is not None else []
    details += ["lesions merged into their organs"] if ev.merge_lesions else []
    caption = ev.dataset + (f" ({', '.join(details)})" if details else "")
    return Table(["model", *ev.classes, "mean"], rows, caption)


def evaluation_metrics_table(ev: Evaluation) -> Table | None:
    """One out-of-federation evaluation's clinical metrics (``metrics_mean``, `pipelines.metrics`):
    rows model and class, columns the means of Dice, HD95, ASSD, NSD and RVD, and the cases behind them.

    Returns:
        The table, or None for an evaluation from before these metrics.
    """
    if not any(isinstance(m.get("metrics_mean"), dict) for m in ev.models.values()):
        return None
    rows: list[list[Any]] = []
    for key in model_order(ev.models):
        model = ev.models[key]
        summary = mapping(model.get("metrics_mean"))
        label = str(model.get("label") or key)
        for c in ev.classes:
            row = mapping(summary.get(c))
            mean_of = {m: num(mapping(row.get(m)).get("mean")) for m in ("dice", "hd95", "assd", "nsd", "rvd")}
            tolerance = num(ev.surface_tolerance_mm.get(c))
            rows.append([
                label, c, mean_of["dice"], mean_of["hd95"], mean_of["assd"], mean_of["nsd"], f"{tolerance:g}" if tolerance is not None else "",
                mean_of["rvd"], _count(mapping(row.get("dice")).get("n")), _count(mapping(row.get("hd95")).get("n")),
            ])  # fmt: skip
    caption = (f"{ev.dataset}: boundary and volume metrics, means over cases (HD95, ASSD in mm; NSD at the class's tolerance; "
               "RVD = (predicted - reference volume) / reference volume). Distances leave out the cases where only one of "
               "prediction and reference has the class: the two counts differ by those cases.")  # fmt: skip
    columns = ["model", "class", "Dice", "HD95 (mm)", "ASSD (mm)", "NSD", "NSD tolerance (mm)", "RVD", "cases scored", "cases with both masks"]
    return Table(columns, rows, caption)


def evaluation_mean(model: Mapping[str, Any], classes: list[str]) -> float | None:
    """The evaluation's own overall mean (``mean_all``), else the mean of its class means."""
    v = num(model.get("mean_all"))
    return v if v is not None else mean(mapping(model.get("mean")).get(c) for c in classes)


def cost_table(cost: Mapping[str, Any]) -> Table:
    """The cost summary (`cost_summary`) as a table of quantities."""
    done, planned, lost = cost["rounds_done"], cost["rounds_planned"], cost["rounds_metrics_lost"]
    rounds = f"{done} / {planned}" if planned is not None else str(done)
    if lost:
        rounds += f" ({lost} with metrics lost)"
    estimate = fixed(cost["paper_estimate_mb"], 3)
    if estimate:
        estimate += f" (2 × {done} rounds × {cost['sites']} clients × {cost['model_mb']:.3f} MB)"
    rows: list[list[Any]] = [
        ["rounds done", rounds],
        ["sites", str(cost["sites"])],
        ["model parameters", f"{cost['parameters']:,}" if cost["parameters"] is not None else ""],
        ["model size (MB)", fixed(cost["model_mb"], 3)],
        ["sent to sites per round, mean (MB)", fixed(cost["mb_to_sites_mean"], 3)],
        ["sent to sites, total (MB)", fixed(cost["mb_to_sites_total"], 3)],
        ["received from sites per round, mean (MB)", fixed(cost["mb_from_sites_mean"], 3)],
        ["received from sites, total (MB)", fixed(cost["mb_from_sites_total"], 3)],
        ["sent + received, total (MB)", fixed(cost["mb_total"], 3)],
        ["paper's estimate 2 × rounds × clients × model size (MB)", estimate],
        ["wall time, sum of rounds (s)", fixed(cost["wall_s_rounds"], 1)],
        ["wall time, run start to finish (s)", fixed(cost["run_s"], 1)],
        ["local training per site and round, mean (s)", fixed(cost["train_s_mean"], 3)],
        ["local step, mean (ms)", fixed(cost["step_ms_mean"], 1)],
        ["teacher forward per step, mean (ms)", fixed(cost["teacher_ms_mean"], 1)],
        ["scoring models per site and round, mean (s): validation + test, global and local", fixed(cost.get("eval_s_mean"), 3)],
    ]
    return Table(["quantity", "value"], rows, "communication and time (MB = 10^6 bytes)")


def header_table(run: Run) -> Table:
    """The run's id, name, plan, mode, status, rounds, times, scoring schedule (when not every round), split, weights, best global model and error."""
    m, s = run.metrics, run.state
    rounds = len(m.rounds)
    best = m.best_global
    best_text = ""
    if best is not None and best.model_round is not None:
        best_text = f"after round {best.model_round} (selection score on validation {cell(num(best.score))}"
        test_score = num(best.test_score)
        best_text += f"; on test {cell(test_score)})" if test_score is not None else ")"
    rows: list[list[Any]] = [
        ["run id", run.run_id],
        ["name", str(s.get("name") or "")],
        ["plan", m.plan or ""],
        ["mode", m.mode or ""],
        ["status", str(s.get("status") or "")],
        ["rounds", f"{rounds} / {m.rounds_planned}" if m.rounds_planned is not None else str(rounds)],
        ["local steps per round", str(m.local_steps) if m.local_steps is not None else ""],
        *([["scoring schedule", scoring_text(m.validate_every)]] if m.validate_every is not None and m.validate_every > 1 else []),
        ["started", str(s.get("started") or "")],
        ["finished", str(s.get("finished") or "")],
        ["split (shares of each site's cases)", split_text(m.split)],
        ["aggregation weights", "none (standalone: no aggregation)" if m.mode == "standalone" else (m.weights or "not recorded")],
        ["best global model", best_text],
    ]
    if s.get("error"):
        rows.append(["error", str(s["error"])])
    return Table(["field", "value"], rows)


def scoring_text(every: int) -> str:
    """What a run scored under ``validate_every`` > 1 (see docs/design/evaluation-protocol.md, "Scoring schedule")."""
    return (f"models scored every {every} rounds: the global model at the start of rounds 1, {every + 1}, {2 * every + 1}, ... and of the last round, "
            f"the local models after rounds {every}, {2 * every}, ..., and the final model; only these are candidates for the best models")  # fmt: skip


def split_text(split: Mapping[str, Any] | None) -> str:
    """``validation 0.25, test 0.25, split seed 0``; for a run that did not record its split, says so."""
    if not split:
        return "not recorded (a run from before the three-way split)"
    shares = ", ".join(f"{name} {v:g}" for name in ("validation", "test") if (v := num(split.get(name))) is not None)
    seed = split.get("seed")
    return shares + (f", split seed {seed}" if seed is not None else "")


def split_sizes_table(metrics: Metrics) -> Table:
    """Cases per site and split as the sites reported them (``metrics.splits``)."""
    sizes = RunMetrics.of(metrics).splits
    rows: list[list[Any]] = [[site, *(_count(n.get(k)) for k in ("training", "validation", "test"))] for site, n in sorted(sizes.items())]
    return Table(["site", "training cases", "validation cases", "test cases"], rows, "cases per site and split")


FINAL_METRICS = ("hd95", "assd", "nsd", "rvd")  # what the sites add to the final global model's test rows (pipelines.plans.segmentation)


def final_metrics_table(metrics: RunMetrics, classes: list[str]) -> Table | None:
    """The final global model's boundary and volume metrics on each site's test cases (its ``test_final`` row):
    per site and class the means of HD95, ASSD, NSD and RVD, and the cases behind each.

    Args:
        metrics: the run's metrics.
        classes: the classes, in display order.

    Returns:
        The table, or None when no site reported them (an older run, or no test cases).
    """
    rows: list[list[Any]] = []
    for record in metrics.rounds:
        for site in record.sites.values():
            row = site.test_final or {}
            dice = class_dice(row)
            for c in classes:
                if f"hd95_n_{c}" not in row:
                    continue
                means = [num(row.get(f"{m}_{c}")) for m in FINAL_METRICS]
                counts = f"{_count(row.get(f'hd95_n_{c}'))}/{_count(row.get(f'rvd_n_{c}'))}"
                rows.append([site.name or "?", c, dice.get(c), *means, counts])
    if not rows:
        return None
    caption = ("Final global model on each site's test cases: Dice, and means over the cases of HD95 and ASSD (mm, on the scoring "
               "grid), NSD (at the class's tolerance of the schema) and RVD; n: the cases behind HD95 / RVD (distances leave out a "
               "case where only one of prediction and reference has the class).")  # fmt: skip
    return Table(["site", "class", "Dice", "HD95 (mm)", "ASSD (mm)", "NSD", "RVD", "n"], rows, caption)


def participation_table(metrics: Metrics) -> Table | None:
    """The rounds some site was left out of (failed, timed out), each site's status; None when there were none."""
    rounds = [r.model_dump() for r in RunMetrics.of(metrics).rounds]
    sites, rows, _ = participation(rounds)
    if not rows:
        return None
    return Table(
        ["round", "aggregated from", *sites],
        rows,
        f"rounds aggregated from fewer sites: {len(rows)} of {len(rounds)} (the reasons: run.log, metrics.json site_status)",
    )


def privacy_table(metrics: Metrics) -> Table | None:
    """Each site's epsilon at the stated delta after each round (``dp: local``); the settings alone for ``central``; None without ``dp``.

    Args:
        metrics: the run's metrics.

    Returns:
        The table, or None.
    """
    m = RunMetrics.of(metrics)
    p = m.privacy
    if p is None:
        return None
    settings = f"sigma {p.sigma:g}, clip {p.clip:g}" if p.sigma is not None and p.clip is not None else "settings not recorded"
    if p.type != "local":
        return Table(
            ["type", "sigma", "clip", "epsilon"],
            [[p.type, cell(p.sigma), cell(p.clip), "not stated"]],
            "differential privacy, central: each site adds noise of standard deviation sigma * clip to the parameters it sends, once per "
            "round; nothing bounds how far one case moves those parameters, so no epsilon is stated",
        )
    sites = sorted({name for r in m.rounds for name, row in r.named_sites() if row.privacy is not None})
    rows: list[list[Any]] = []
    for r in m.rounds:
        named = dict(r.named_sites())
        cells = [f"{e:.3g}" if (row := named.get(s)) is not None and row.privacy is not None and (e := row.privacy.epsilon) is not None else "-" for s in sites]
        if any(c != "-" for c in cells):
            rows.append([str(r.round), *cells])
    return Table(
        ["round", *sites],
        rows,
        f"differential privacy, local ({settings}): each site's epsilon at delta {p.delta:g} after each round, composed over the rounds it "
        "trained in (Opacus's RDP accountant; the privacy unit is a case; '-': the site did not train that round)",
    )
