"""The numbers behind the run report's figures and tables: learning curves, per-case Dice
panels and the run's cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Iterable, Mapping

from coordinator.report.reading import Evaluation, Metrics, Scored, mapping, mean, num, row_mean, scored_mean
from coordinator.results import TEST_ROWS, case_dice, ordered_classes
from coordinator.run_metrics import RunMetrics
from fedimg_core.reporting.figures import BoxPanel, Points

MB = 1e6
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


@dataclass
class Curves:
    """Per-round series of the learning-curve figure (x: round, or the global model's round)."""

    loss: dict[str, Points] = field(default_factory=dict)
    global_dice: dict[str, Points] = field(default_factory=dict)  # x: the global model's round, validation cases
    selection: Points = field(default_factory=list)  # the selection score (validation cases)
    test_score: Points = field(default_factory=list)  # the same mean on the test cases (not used for selection)
    local_dice: dict[str, Points] = field(default_factory=dict)
    lam: Points = field(default_factory=list)


def learning_curves(metrics: Metrics) -> Curves:
    """Per round: training loss, global Dice on the validation cases (``val_global`` scores the
    model after round r-1, ``val_final`` the model after the last round) and the selection score,
    the same score on the test cases where recorded, local Dice (validation), lambda.

    Args:
        metrics: the run's metrics.

    Returns:
        The series, sorted by x.
    """
    c = Curves()
    for record in RunMetrics.of(metrics).rounds:
        r = record.round
        for name, row in record.named_sites():
            _add(c.loss, name, r, row.train.get("loss_mean", row.train.get("Loss")))
            _add(c.local_dice, name, r, row_mean(row.val_local or {}))
        for key, x in (("val_global", r - 1), ("val_final", r)):
            rows = record.rows(key)
            for name, vrow in rows.items():
                _add(c.global_dice, name, x, row_mean(vrow))
            if (score := scored_mean(Scored("", rows))) is not None:
                c.selection.append((x, score))
            if (score := scored_mean(Scored("", record.rows(TEST_ROWS[key])))) is not None:
                c.test_score.append((x, score))
        lam = mean(row.train.get("lambda") for _, row in record.named_sites())
        if lam is not None:
            c.lam.append((r, lam))
    for series in (c.loss, c.global_dice, c.local_dice):
        for points in series.values():
            points.sort()
    c.selection.sort()
    c.test_score.sort()
    return c


def _add(series: dict[str, Points], name: str, x: int, value: object) -> None:
    if (v := num(value)) is not None:
        series.setdefault(name, []).append((x, v))


def federation_box_panels(glob: Scored, local: Scored, schema: Mapping[str, int]) -> list[BoxPanel]:
    """Per class: the global model's per-case Dice pooled over the sites, then each local
    model's on its own site's cases (empty where the site does not label the class).

    Args:
        glob: the global model's rows.
        local: the local models' rows.
        schema: class name -> id (the panel order).

    Returns:
        One panel per class.
    """
    per_model: dict[str, dict[str, list[float]]] = {"global": _pooled_cases(glob.rows.values())}
    for site, row in sorted(local.rows.items()):
        per_model[f"local {site}"] = case_dice(row)
    return _panels(per_model, ordered_classes({c for d in per_model.values() for c in d}, schema))


def oof_box_panels(evaluations: list[Evaluation]) -> list[BoxPanel]:
    """Per out-of-federation dataset and class, one box of per-case Dice per model.

    Args:
        evaluations: the run's evaluations.

    Returns:
        The panels, titled ``<dataset>: <class>``.
    """
    panels = []
    for ev in evaluations:
        per_model = {}
        for key in model_order(ev.models):
            model = ev.models[key]
            per_model[str(model.get("label") or key)] = _pooled_case_dicts(_list(model.get("per_case")))
        for title, boxes in _panels(per_model, [c for c in ev.classes if any(c in d for d in per_model.values())]):
            panels.append((f"{ev.dataset}: {title}", boxes))
    return panels


def _pooled_cases(rows: Iterable[Mapping[str, float]]) -> dict[str, list[float]]:
    """class -> per-case Dice pooled over rows (``case<j>_dice_<class>``)."""
    out: dict[str, list[float]] = {}
    for row in rows:
        for c, values in case_dice(row).items():
            out.setdefault(c, []).extend(values)
    return out


def _pooled_case_dicts(cases: Iterable[object]) -> dict[str, list[float]]:
    """class -> per-case Dice from an evaluation's ``per_case`` list ({class: Dice} per case)."""
    out: dict[str, list[float]] = {}
    for case in cases:
        for c, v in mapping(case).items():
            if (x := num(v)) is not None:
                out.setdefault(str(c), []).append(x)
    return out


def _panels(per_model: dict[str, dict[str, list[float]]], classes: list[str]) -> list[BoxPanel]:
    return [(c, [(m, per_model[m].get(c, [])) for m in per_model]) for c in classes]


def _list(v: object) -> list[Any]:
    return v if isinstance(v, list) else []


def model_order(models: Iterable[str]) -> list[str]:
    """Evaluation model keys: ``global`` first, then the others by name."""
    return sorted(models, key=lambda k: (k != "global", k))


def _duration_s(state: Mapping[str, Any]) -> float | None:
    try:
        start = datetime.strptime(str(state["started"]), _TIME_FORMAT)
        end = datetime.strptime(str(state["finished"]), _TIME_FORMAT)
    except (KeyError, ValueError):
        return None
    return (end - start).total_seconds()


def cost_summary(metrics: Metrics, state: Mapping[str, Any]) -> dict[str, Any]:
    """The run's cost in numbers (None where not recorded); MB = 1e6 bytes.

    Args:
        metrics: the run's metrics.
        state: the run's state.json (start and finish times).

    Returns:
        Rounds, sites, model size, bytes on the wire, the paper's estimate, wall and step times.
    """
    m = RunMetrics.of(metrics)
    rounds = m.rounds
    wire = [r.bytes for r in rounds if r.bytes is not None]
    to_sites = [float(b.to_sites) for b in wire if b.to_sites is not None]
    from_sites = [float(b.from_sites) for b in wire if b.from_sites is not None]
    sites = {name for r in rounds for name, _ in r.named_sites()}
    trains = [row for r in rounds for _, row in r.named_sites()]
    model_bytes = m.model.bytes if m.model is not None else None
    model_mb = model_bytes / MB if model_bytes is not None else None
    wall = [v for v in (num(r.wall_s) for r in rounds) if v is not None]
    return {
        "rounds_done": len(rounds),
        "rounds_planned": m.rounds_planned,
        "rounds_metrics_lost": sum(1 for r in rounds if r.metrics_lost),
        "sites": len(sites),
        "parameters": m.model.parameters if m.model is not None else None,
        "model_mb": model_mb,
        "mb_to_sites_mean": sum(to_sites) / len(to_sites) / MB if to_sites else None,
        "mb_to_sites_total": sum(to_sites) / MB if to_sites else None,
        "mb_from_sites_mean": sum(from_sites) / len(from_sites) / MB if from_sites else None,
        "mb_from_sites_total": sum(from_sites) / MB if from_sites else None,
        "mb_total": (sum(to_sites) + sum(from_sites)) / MB if wire else None,
        "paper_estimate_mb": 2 * len(rounds) * len(sites) * model_mb if model_mb is not None else None,
        "wall_s_rounds": sum(wall) if rounds else None,
        "run_s": _duration_s(state),
        "train_s_mean": mean(row.train_s for row in trains),
        "step_ms_mean": _ms(mean(row.train.get("step_s") for row in trains)),
        "teacher_ms_mean": _ms(mean(row.train.get("teacher_s") for row in trains)),
        "eval_s_mean": _scoring_mean(trains),
    }


def _scoring_mean(rows: list[Any]) -> float | None:
    """Mean seconds of scoring per site and round; a round a site scored nothing in (``validate_every``) counts 0
    once the run records scoring times at all (older runs: None)."""
    times = [_scoring_s(row) for row in rows]
    if all(t is None for t in times):
        return None
    return mean(0.0 if t is None else t for t in times)


def _scoring_s(row: Any) -> float | None:
    """Seconds a site spent scoring models in a round (validation + test, every model it scored), None if not recorded."""
    times = [num(v.get("eval_s")) for key in ("val_global", "val_local", "val_final") if (v := getattr(row, key, None))]
    recorded = [t for t in times if t is not None]
    return sum(recorded) if recorded else None


def _ms(seconds: float | None) -> float | None:
    return seconds * 1000 if seconds is not None else None
