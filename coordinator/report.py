"""Run report: one self-contained page per run in ``<run_dir>/report/`` (no FL imports).

``write_report(run_dir)`` writes ``index.html`` and the same content as ``report.md``,
with the figures next to them (referenced by relative file name, no external resources):

1. Header: run id, name, plan, mode, status, rounds done/planned, start and finish.
2. Global model, in federation: Dice per class of the final global model (``val_final``
   of the last round; without it, the ``val_global`` row that scored the best global
   model) on each site's validation cases, and per class the mean across the sites that
   label it (the mean of those is the model-selection score). ``dice_global.png``.
3. Local models, in federation: each site's model after local training in the last round
   (``val_local``), scored on that site's own validation cases, so only on the classes
   that site labels; and each site's best local round.
4. Out of federation: one table per ``evaluations/<dataset>.json`` (rows: models,
   columns: classes and their mean).
5. Per-case Dice boxplots per class, like Figure 3 of the ConDistFL paper
   (``boxplots.png``: the global model, pooled over the sites' cases, and each local
   model on its site's cases; ``boxplots_oof.png``: the out-of-federation cases).
6. Learning curves (``learning_curves.png``): training loss, global Dice per site and the
   selection score, local Dice per site, per round; lambda per round (ConDistFL).
7. Cost: rounds, model size, bytes sent to and received from the sites, the paper's
   estimate 2 x rounds x clients x model size, wall time, local step and teacher times.

The report is built in a temporary sibling folder and swapped in only when complete: a
failed build leaves the previous report as it was. An empty cell means "not recorded"
(a class the site does not label, a round whose metrics were lost, a run that stopped
early). Dice values are shown with 3 decimals.

``compare_runs(run_dirs, out_dir)`` puts several runs side by side (FedAvg, FedProx,
FedOpt, ConDistFL, ...): ``index.html``, ``comparison.md``, ``comparison.json`` and the
``methods_global.png`` bar chart.
"""

from __future__ import annotations

import html
import io
import json
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from coordinator.results import case_dice, class_dice, ordered_classes, per_class_across_sites, selection_score
from fedimg_core import atomic

REPORT_DIR = "report"
EVALUATIONS_DIR = "evaluations"
MB = 1e6
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"
_DPI = 100
MEAN_ACROSS_SITES = "mean across sites"

Log = Callable[[str], Any]
Points = list[tuple[int, float]]


# ---------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """One out-of-federation evaluation file: models scored on a dataset no site trained on."""

    dataset: str
    classes: list[str]
    models: dict[str, dict]  # model key ("global", "local:<site>") -> label, per_case, mean, mean_all
    cases: Any = None
    merge_lesions: Any = None


@dataclass
class Run:
    run_dir: Path
    metrics: dict
    state: dict
    evaluations: list[Evaluation]

    @property
    def run_id(self) -> str:
        return str(self.state.get("run_id") or self.run_dir.name)

    @property
    def schema(self) -> dict[str, int]:
        classes = self.metrics.get("classes")
        return {str(k): v for k, v in classes.items() if isinstance(v, int)} if isinstance(classes, dict) else {}


@dataclass
class Scored:
    """Validation rows of one model kind, site name -> row (``dice_<class>``, ``case<j>_dice_<class>``)."""

    label: str
    rows: dict[str, dict]


def load_run(run_dir: Path, log: Log = print) -> Run:
    run_dir = Path(run_dir)
    return Run(run_dir, _read_json(run_dir / "metrics.json"), _read_json(run_dir / "state.json"), read_evaluations(run_dir, log))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_evaluations(run_dir: Path, log: Log = print) -> list[Evaluation]:
    """The run's ``evaluations/<dataset>.json`` files, by file name; unreadable ones are skipped."""
    folder = Path(run_dir) / EVALUATIONS_DIR
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = _read_json(path)
        models = data.get("models")
        if not isinstance(models, dict):
            log(f"report: skipping {path}: not an evaluation file")
            continue
        models = {str(k): v for k, v in models.items() if isinstance(v, dict)}
        classes = data.get("classes")
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            classes = sorted({c for m in models.values() for c in _mapping(m.get("mean"))})
        dataset = str(data.get("dataset") or path.stem)
        out.append(Evaluation(dataset, classes, models, data.get("cases"), data.get("merge_lesions")))
    return out


def _mapping(v) -> dict:
    return v if isinstance(v, dict) else {}


def _num(v) -> float | None:
    """A finite number as float, else None (missing, NaN, text, bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _int(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _mean(values: Iterable) -> float | None:
    nums = [x for x in map(_num, values) if x is not None]
    return sum(nums) / len(nums) if nums else None


def _rounds(metrics: Mapping) -> list[dict]:
    rounds = metrics.get("rounds")
    return [r for r in rounds if isinstance(r, dict)] if isinstance(rounds, list) else []


def _sites(record: Mapping) -> list[tuple[str, dict]]:
    """(site name, row) of one round, sorted by name; empty for a round whose metrics were lost."""
    sites = record.get("sites")
    if not isinstance(sites, dict):
        return []
    named = [(str(row.get("name") or nid), row) for nid, row in sites.items() if isinstance(row, dict)]
    return sorted(named, key=lambda kv: kv[0])


def _rows(record: Mapping, key: str) -> dict[str, dict]:
    """site name -> validation row ``key`` for the sites that reported it in this round."""
    return {name: row[key] for name, row in _sites(record) if isinstance(row.get(key), dict) and row[key]}


def _last_scored_round(metrics: Mapping) -> dict:
    scored = [r for r in _rounds(metrics) if _sites(r)]
    return scored[-1] if scored else {}


def global_rows(metrics: Mapping) -> Scored:
    """The final global model's rows (``val_final`` of the last round); without them, the
    rows that scored the best global model (``val_global`` of the round after it); else
    the last ``val_global`` rows."""
    last = _last_scored_round(metrics)
    if rows := _rows(last, "val_final"):
        return Scored(f"final global model (after round {last.get('round')})", rows)
    best = _int(_mapping(metrics.get("best_global")).get("model_round"))
    if best is not None:
        for record in _rounds(metrics):
            if record.get("round") == best + 1 and (rows := _rows(record, "val_global")):
                return Scored(f"best global model (after round {best})", rows)
            if record.get("round") == best and (rows := _rows(record, "val_final")):
                return Scored(f"best global model (after round {best})", rows)
    if rows := _rows(last, "val_global"):
        r = _int(last.get("round"))
        return Scored(f"global model (after round {r - 1})" if r is not None else "global model", rows)
    return Scored("global model", {})


def local_rows(metrics: Mapping) -> Scored:
    """Each site's model after local training in the last round that has ``val_local`` rows."""
    for record in reversed(_rounds(metrics)):
        if rows := _rows(record, "val_local"):
            return Scored(f"local models (after local training in round {record.get('round')})", rows)
    return Scored("local models", {})


def class_means(scored: Scored) -> dict[str, float]:
    """Per class, the mean Dice across the sites that score it."""
    return per_class_across_sites(({"row": row} for row in scored.rows.values()), "row")


def scored_mean(scored: Scored) -> float | None:
    """The selection score: mean over classes of the per-class means across sites."""
    return selection_score(({"row": row} for row in scored.rows.values()), "row")


def row_mean(row: Mapping) -> float | None:
    """A site's mean Dice over the classes it scores."""
    v = _num(row.get("dice_mean"))
    return v if v is not None else _mean(class_dice(row).values())


def foreground_classes(schema: Mapping[str, int], *scored: Scored) -> list[str]:
    """The schema's classes except background, plus any other scored class, in schema order."""
    names = {c for c, i in schema.items() if i != 0 and c != "background"}
    names |= {c for s in scored for row in s.rows.values() for c in class_dice(row)}
    return ordered_classes(names, schema)


# ---------------------------------------------------------------------------------------
# Numbers behind the figures and tables
# ---------------------------------------------------------------------------------------


@dataclass
class Curves:
    loss: dict[str, Points] = field(default_factory=dict)
    global_dice: dict[str, Points] = field(default_factory=dict)  # x: the global model's round
    selection: Points = field(default_factory=list)
    local_dice: dict[str, Points] = field(default_factory=dict)
    lam: Points = field(default_factory=list)


def learning_curves(metrics: Mapping) -> Curves:
    """Per round: training loss, global Dice (``val_global`` scores the model after round
    r-1, ``val_final`` the model after the last round), local Dice, lambda."""
    c = Curves()
    for record in _rounds(metrics):
        r = _int(record.get("round"))
        if r is None:
            continue
        for name, row in _sites(record):
            train = _mapping(row.get("train"))
            _add(c.loss, name, r, train.get("loss_mean", train.get("Loss")))
            _add(c.local_dice, name, r, row_mean(_mapping(row.get("val_local"))))
        for key, x in (("val_global", r - 1), ("val_final", r)):
            rows = _rows(record, key)
            for name, row in rows.items():
                _add(c.global_dice, name, x, row_mean(row))
            if (score := scored_mean(Scored("", rows))) is not None:
                c.selection.append((x, score))
        lam = _mean(_mapping(row.get("train")).get("lambda") for _, row in _sites(record))
        if lam is not None:
            c.lam.append((r, lam))
    for series in (c.loss, c.global_dice, c.local_dice):
        for points in series.values():
            points.sort()
    c.selection.sort()
    return c


def _add(series: dict[str, Points], name: str, x: int, value) -> None:
    if (v := _num(value)) is not None:
        series.setdefault(name, []).append((x, v))


BoxPanel = tuple[str, list[tuple[str, list[float]]]]  # title, [(model, per-case Dice)]


def federation_box_panels(glob: Scored, local: Scored, schema: Mapping[str, int]) -> list[BoxPanel]:
    """Per class: the global model's per-case Dice pooled over the sites, then each local
    model's on its own site's cases (empty where the site does not label the class)."""
    per_model: dict[str, dict[str, list[float]]] = {"global": _pooled_cases(glob.rows.values())}
    for site, row in sorted(local.rows.items()):
        per_model[f"local {site}"] = case_dice(row)
    return _panels(per_model, ordered_classes({c for d in per_model.values() for c in d}, schema))


def oof_box_panels(evaluations: list[Evaluation]) -> list[BoxPanel]:
    panels = []
    for ev in evaluations:
        per_model = {}
        for key in _model_order(ev.models):
            model = ev.models[key]
            per_model[str(model.get("label") or key)] = _pooled_case_dicts(_list(model.get("per_case")))
        for title, boxes in _panels(per_model, [c for c in ev.classes if any(c in d for d in per_model.values())]):
            panels.append((f"{ev.dataset}: {title}", boxes))
    return panels


def _pooled_cases(rows: Iterable[Mapping]) -> dict[str, list[float]]:
    """class -> per-case Dice pooled over validation rows (``case<j>_dice_<class>``)."""
    out: dict[str, list[float]] = {}
    for row in rows:
        for c, values in case_dice(row).items():
            out.setdefault(c, []).extend(values)
    return out


def _pooled_case_dicts(cases: Iterable) -> dict[str, list[float]]:
    """class -> per-case Dice from an evaluation's ``per_case`` list ({class: Dice} per case)."""
    out: dict[str, list[float]] = {}
    for case in cases:
        for c, v in _mapping(case).items():
            if (x := _num(v)) is not None:
                out.setdefault(str(c), []).append(x)
    return out


def _panels(per_model: dict[str, dict[str, list[float]]], classes: list[str]) -> list[BoxPanel]:
    return [(c, [(m, per_model[m].get(c, [])) for m in per_model]) for c in classes]


def _list(v) -> list:
    return v if isinstance(v, list) else []


def _model_order(models: Iterable[str]) -> list[str]:
    return sorted(models, key=lambda k: (k != "global", k))


def _duration_s(state: Mapping) -> float | None:
    try:
        start = datetime.strptime(str(state["started"]), _TIME_FORMAT)
        end = datetime.strptime(str(state["finished"]), _TIME_FORMAT)
    except (KeyError, ValueError):
        return None
    return (end - start).total_seconds()


def cost_summary(metrics: Mapping, state: Mapping) -> dict[str, Any]:
    """The run's cost in numbers (None where not recorded); MB = 1e6 bytes."""
    rounds = _rounds(metrics)
    wire = [_mapping(r.get("bytes")) for r in rounds if isinstance(r.get("bytes"), dict)]
    to_sites = [v for v in (_num(b.get("to_sites")) for b in wire) if v is not None]
    from_sites = [v for v in (_num(b.get("from_sites")) for b in wire) if v is not None]
    sites = {name for r in rounds for name, _ in _sites(r)}
    trains = [(_mapping(row.get("train")), row) for r in rounds for _, row in _sites(r)]
    model = _mapping(metrics.get("model"))
    model_mb = _num(model.get("bytes")) / MB if _num(model.get("bytes")) is not None else None
    mb_total = (sum(to_sites) + sum(from_sites)) / MB if wire else None
    return {
        "rounds_done": len(rounds),
        "rounds_planned": _int(metrics.get("rounds_planned")),
        "rounds_metrics_lost": sum(1 for r in rounds if r.get("metrics_lost")),
        "sites": len(sites),
        "parameters": _int(model.get("parameters")),
        "model_mb": model_mb,
        "mb_to_sites_mean": sum(to_sites) / len(to_sites) / MB if to_sites else None,
        "mb_to_sites_total": sum(to_sites) / MB if to_sites else None,
        "mb_from_sites_mean": sum(from_sites) / len(from_sites) / MB if from_sites else None,
        "mb_from_sites_total": sum(from_sites) / MB if from_sites else None,
        "mb_total": mb_total,
        "paper_estimate_mb": 2 * len(rounds) * len(sites) * model_mb if model_mb is not None else None,
        "wall_s_rounds": sum(v for v in (_num(r.get("wall_s")) for r in rounds) if v is not None) if rounds else None,
        "run_s": _duration_s(state),
        "train_s_mean": _mean(row.get("train_s") for _, row in trains),
        "step_ms_mean": _ms(_mean(t.get("step_s") for t, _ in trains)),
        "teacher_ms_mean": _ms(_mean(t.get("teacher_s") for t, _ in trains)),
    }


def _ms(seconds: float | None) -> float | None:
    return seconds * 1000 if seconds is not None else None


# ---------------------------------------------------------------------------------------
# Tables and page rendering
# ---------------------------------------------------------------------------------------


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""
    groups: list[tuple[str, int]] = field(default_factory=list)  # header groups spanning columns

    def flat_columns(self) -> list[str]:
        """Column names with their group as prefix (Markdown has a single header row)."""
        if not self.groups:
            return list(self.columns)
        prefixes = [g for g, n in self.groups for _ in range(n)]
        return [f"{g}: {c}" if g else c for g, c in zip(prefixes, self.columns)]


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (file name, description)


def cell(v) -> str:
    """Floats with 3 decimals; None, NaN and inf as an empty cell."""
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3f}" if math.isfinite(v) else ""
    return str(v)


def _fixed(v: float | None, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:90em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}"
    "th,td{border:1px solid #bbb;padding:.2em .6em;text-align:right}"
    "thead th{background:#eee;text-align:center}tbody th{text-align:left;font-weight:normal}"
    "caption{text-align:left;font-weight:bold;padding:.3em 0}img{max-width:100%;display:block;margin:1em 0}"
)


def _html_table(t: Table) -> str:
    e = html.escape
    out = ["<table>"]
    if t.caption:
        out.append(f"<caption>{e(t.caption)}</caption>")
    out.append("<thead>")
    if t.groups:
        out.append("<tr>" + "".join(f'<th colspan="{n}">{e(g)}</th>' for g, n in t.groups) + "</tr>")
    out.append("<tr>" + "".join(f"<th>{e(c)}</th>" for c in t.columns) + "</tr></thead>")
    out.append("<tbody>")
    for row in t.rows:
        cells = [cell(v) for v in row]
        out.append(f'<tr><th scope="row">{e(cells[0])}</th>' + "".join(f"<td>{e(c)}</td>" for c in cells[1:]) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def render_html(title: str, sections: list[Section]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{e(s.title)}</h2>")
        body += [f"<p>{e(p)}</p>" for p in s.text]
        body += [_html_table(t) if t.rows else f"<p>{e(t.caption)}: nothing recorded.</p>" for t in s.tables]
        body += [f'<img src="{e(name)}" alt="{e(alt)}" title="{e(alt)}">' for name, alt in s.images]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _md(text: str) -> str:
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    if not t.rows:
        return f"{_md(t.caption)}: nothing recorded."
    cols = t.flat_columns()
    lines = [f"**{_md(t.caption)}**", ""] if t.caption else []
    lines.append("| " + " | ".join(_md(c) for c in cols) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(cols) - 1)) + "|")
    lines += ["| " + " | ".join(_md(cell(v)) for v in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render_markdown(title: str, sections: list[Section]) -> str:
    parts = [f"# {_md(title)}"]
    for s in sections:
        parts.append(f"## {_md(s.title)}")
        parts += [_md(p) for p in s.text]
        parts += [_md_table(t) for t in s.tables]
        parts += [f"![{_md(alt)}]({name})" for name, alt in s.images]
    return "\n\n".join(parts) + "\n"


def dice_table(scored: Scored, classes: list[str], caption: str) -> Table:
    """Rows: sites, then the mean across the sites that score each class; columns: classes, mean."""
    rows = []
    for site, row in sorted(scored.rows.items()):
        d = class_dice(row)
        rows.append([site, *[d.get(c) for c in classes], row_mean(row)])
    if rows:
        means = class_means(scored)
        rows.append([MEAN_ACROSS_SITES, *[means.get(c) for c in classes], scored_mean(scored)])
    return Table(["site", *classes, "mean"], rows, caption)


def best_local_table(metrics: Mapping) -> Table:
    best = _mapping(metrics.get("best_local"))
    rows = [[site, _int(_mapping(b).get("round")), _num(_mapping(b).get("score"))] for site, b in sorted(best.items())]
    return Table(["site", "best round", "Dice (mean over its classes)"], rows, "best local model per site (own validation cases)")


def evaluation_table(ev: Evaluation) -> Table:
    rows = []
    for key in _model_order(ev.models):
        model = ev.models[key]
        mean = _mapping(model.get("mean"))
        label = str(model.get("label") or key)
        rows.append([label, *[_num(mean.get(c)) for c in ev.classes], evaluation_mean(model, ev.classes)])
    details = [f"{ev.cases} cases"] if ev.cases is not None else []
    details += ["lesions merged into their organs"] if ev.merge_lesions else []
    caption = ev.dataset + (f" ({', '.join(details)})" if details else "")
    return Table(["model", *ev.classes, "mean"], rows, caption)


def evaluation_mean(model: Mapping, classes: list[str]) -> float | None:
    """The evaluation's own overall mean (``mean_all``), else the mean of its class means."""
    v = _num(model.get("mean_all"))
    return v if v is not None else _mean(_mapping(model.get("mean")).get(c) for c in classes)


def cost_table(cost: Mapping[str, Any]) -> Table:
    done, planned, lost = cost["rounds_done"], cost["rounds_planned"], cost["rounds_metrics_lost"]
    rounds = f"{done} / {planned}" if planned is not None else str(done)
    if lost:
        rounds += f" ({lost} with metrics lost)"
    estimate = _fixed(cost["paper_estimate_mb"], 3)
    if estimate:
        estimate += f" (2 × {done} rounds × {cost['sites']} clients × {cost['model_mb']:.3f} MB)"
    rows = [
        ["rounds done", rounds],
        ["sites", str(cost["sites"])],
        ["model parameters", f"{cost['parameters']:,}" if cost["parameters"] is not None else ""],
        ["model size (MB)", _fixed(cost["model_mb"], 3)],
        ["sent to sites per round, mean (MB)", _fixed(cost["mb_to_sites_mean"], 3)],
        ["sent to sites, total (MB)", _fixed(cost["mb_to_sites_total"], 3)],
        ["received from sites per round, mean (MB)", _fixed(cost["mb_from_sites_mean"], 3)],
        ["received from sites, total (MB)", _fixed(cost["mb_from_sites_total"], 3)],
        ["sent + received, total (MB)", _fixed(cost["mb_total"], 3)],
        ["paper's estimate 2 × rounds × clients × model size (MB)", estimate],
        ["wall time, sum of rounds (s)", _fixed(cost["wall_s_rounds"], 1)],
        ["wall time, run start to finish (s)", _fixed(cost["run_s"], 1)],
        ["local training per site and round, mean (s)", _fixed(cost["train_s_mean"], 3)],
        ["local step, mean (ms)", _fixed(cost["step_ms_mean"], 1)],
        ["teacher forward per step, mean (ms)", _fixed(cost["teacher_ms_mean"], 1)],
    ]
    return Table(["quantity", "value"], rows, "communication and time (MB = 10^6 bytes)")


def header_table(run: Run) -> Table:
    m, s = run.metrics, run.state
    cost_rounds = len(_rounds(m))
    planned = _int(m.get("rounds_planned"))
    best = _mapping(m.get("best_global"))
    best_text = ""
    if _int(best.get("model_round")) is not None:
        best_text = f"after round {best['model_round']} (selection score {cell(_num(best.get('score')))})"
    rows = [
        ["run id", run.run_id],
        ["name", str(s.get("name") or "")],
        ["plan", str(m.get("plan") or "")],
        ["mode", str(m.get("mode") or "")],
        ["status", str(s.get("status") or "")],
        ["rounds", f"{cost_rounds} / {planned}" if planned is not None else str(cost_rounds)],
        ["local steps per round", str(m.get("local_steps") if m.get("local_steps") is not None else "")],
        ["started", str(s.get("started") or "")],
        ["finished", str(s.get("finished") or "")],
        ["best global model", best_text],
    ]
    if s.get("error"):
        rows.append(["error", str(s["error"])])
    return Table(["field", "value"], rows)


# ---------------------------------------------------------------------------------------
# Figures (matplotlib Figure objects, no pyplot global state)
# ---------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight")
    return buf.getvalue()


def _empty_figure(message: str) -> bytes:
    fig = Figure(figsize=(6, 2))
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center")
    return _png(fig)


def _color(i: int) -> str:
    return f"C{i % 10}"


def plot_grouped_bars(
    categories: list[str], series: list[tuple[str, list[float | None]]], title: str, ylabel: str = "Dice"
) -> bytes:
    """One group of bars per category, one bar per series; missing values draw no bar and
    categories without any value are left out."""
    keep = [j for j in range(len(categories)) if any(values[j] is not None for _, values in series)]
    if not keep:
        return _empty_figure(f"{title}: nothing recorded")
    categories = [categories[j] for j in keep]
    series = [(name, [values[j] for j in keep]) for name, values in series]
    fig = Figure(figsize=(max(6.0, 1.0 + 0.35 * len(categories) * len(series)), 4))
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    x = np.arange(len(categories))
    for i, (name, values) in enumerate(series):
        pos = [x[j] + (i - (len(series) - 1) / 2) * width for j, v in enumerate(values) if v is not None]
        color = "0.25" if name == MEAN_ACROSS_SITES else _color(i)
        ax.bar(pos, [v for v in values if v is not None], width, label=name, color=color)
    ax.set_xticks(x, categories, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def plot_dice_global(glob: Scored, classes: list[str]) -> bytes:
    """dice_global.png: per class, the global model's Dice on each site and the mean across sites."""
    series = [(site, [class_dice(row).get(c) for c in classes]) for site, row in sorted(glob.rows.items())]
    means = class_means(glob)
    series.append((MEAN_ACROSS_SITES, [means.get(c) for c in classes]))
    return plot_grouped_bars(classes, series, f"{glob.label}: Dice per class")


def plot_boxplots(panels: list[BoxPanel], title: str) -> bytes:
    """One panel per class, one box of per-case Dice per model (same position and color
    for a model in every panel)."""
    if not panels:
        return _empty_figure(f"{title}: no per-case Dice recorded")
    models = list(dict.fromkeys(m for _, boxes in panels for m, _ in boxes))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(max(3.0, 0.6 * len(models) + 1.2) * ncols, 3.6 * nrows))
    for k, (panel_title, boxes) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        data = {m: v for m, v in boxes if v}
        pos = [models.index(m) + 1 for m in data]
        if data:
            art = ax.boxplot(list(data.values()), positions=pos, widths=0.6, patch_artist=True, medianprops={"color": "black"})
            for patch, m in zip(art["boxes"], data):
                patch.set_facecolor(_color(models.index(m)))
                patch.set_alpha(0.6)
        ax.set_xticks(range(1, len(models) + 1), models, rotation=45, ha="right", fontsize="small")
        ax.set_xlim(0.3, len(models) + 0.7)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(panel_title, fontsize="medium")
        if k % ncols == 0:
            ax.set_ylabel("Dice per case")
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def plot_learning_curves(c: Curves) -> bytes:
    """learning_curves.png: loss, global Dice and selection score, local Dice, lambda."""
    fig = Figure(figsize=(11, 8))
    axes = [fig.add_subplot(2, 2, k) for k in range(1, 5)]
    _line_panel(axes[0], c.loss, "training loss (loss_mean) per site", "loss", "round")
    _line_panel(axes[1], c.global_dice, "global model Dice per site (dice_mean)", "Dice", "global model after round")
    if c.selection:
        xs, ys = zip(*c.selection)
        axes[1].plot(xs, ys, "k-", lw=2.5, marker="s", label="selection score (mean over classes across sites)")
        axes[1].legend(fontsize="small")
    _line_panel(axes[2], c.local_dice, "local model Dice per site (after local training)", "Dice", "round")
    if c.lam:
        _line_panel(axes[3], {"lambda": c.lam}, "ConDistFL lambda per round", "lambda", "round")
    else:
        axes[3].set_axis_off()
        axes[3].text(0.5, 0.5, "no lambda recorded", ha="center", va="center")
    fig.tight_layout()
    return _png(fig)


def _line_panel(ax, series: Mapping[str, Points], title: str, ylabel: str, xlabel: str) -> None:
    for i, (name, points) in enumerate(sorted(series.items())):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", color=_color(i), label=name)
    if series:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


# ---------------------------------------------------------------------------------------
# The run report
# ---------------------------------------------------------------------------------------


def write_report(run_dir: Path, log: Log = print) -> Path:
    """Write ``<run_dir>/report/`` (index.html, report.md, PNG figures); returns its path.
    Built in a temporary sibling folder and swapped in on success only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    run = load_run(run_dir, log)
    target = run_dir / REPORT_DIR
    atomic.publish_dir(target, lambda folder: build_report(run, folder))
    log(f"report: {target / 'index.html'}")
    return target


def build_report(run: Run, folder: Path) -> None:
    glob, local = global_rows(run.metrics), local_rows(run.metrics)
    classes = foreground_classes(run.schema, glob, local)
    figures = {
        "dice_global.png": plot_dice_global(glob, classes),
        "boxplots.png": plot_boxplots(federation_box_panels(glob, local, run.schema), "per-case Dice, in federation"),
        "learning_curves.png": plot_learning_curves(learning_curves(run.metrics)),
    }
    if oof := oof_box_panels(run.evaluations):
        figures["boxplots_oof.png"] = plot_boxplots(oof, "per-case Dice, out of federation")
    sections = report_sections(run, glob, local, classes, set(figures))
    for name, data in figures.items():
        atomic.write_bytes(folder / name, data)
    title = f"Run report: {run.run_id}"
    atomic.write_text(folder / "index.html", render_html(title, sections))
    atomic.write_text(folder / "report.md", render_markdown(title, sections))


def report_sections(run: Run, glob: Scored, local: Scored, classes: list[str], figures: set[str]) -> list[Section]:
    standalone = (
        ["Standalone mode: the sites never share weights, so each site's 'global' model is its own model."]
        if run.metrics.get("mode") == "standalone"
        else []
    )
    return [
        Section("Run", tables=[header_table(run)]),
        Section(
            "Global model, in federation",
            [
                f"Model: {glob.label}. Dice per class on each site's validation cases; each site scores the classes it labels. "
                "The last row is, per class, the mean across the sites that score it; its mean over classes is the "
                "model-selection score.",
                *standalone,
            ],
            [dice_table(glob, classes, f"{glob.label}: Dice per site and class")],
            [("dice_global.png", "global model: Dice per class and site")],
        ),
        Section(
            "Local models, in federation",
            [
                f"Models: {local.label}. Each site's own model is scored on that site's validation cases only, "
                "so only on the classes that site labels: the other cells are empty."
            ],
            [dice_table(local, classes, f"{local.label}: Dice per site and class"), best_local_table(run.metrics)],
        ),
        Section(
            "Out of federation",
            [] if run.evaluations else [f"No out-of-federation evaluation ({EVALUATIONS_DIR}/<dataset>.json) for this run."],
            [evaluation_table(ev) for ev in run.evaluations],
        ),
        Section(
            "Per-case Dice",
            [
                "Boxes of per-case Dice per class: the global model pooled over all sites' validation cases, and each "
                "local model on its own site's cases (a site without labels for a class has no box)."
            ],
            images=[
                (name, alt)
                for name, alt in (
                    ("boxplots.png", "per-case Dice in federation"),
                    ("boxplots_oof.png", "per-case Dice out of federation"),
                )
                if name in figures
            ],
        ),
        Section(
            "Learning curves",
            [
                "Global Dice is plotted at the round of the model scored: a site scores the global model after round r-1 "
                "at the start of round r, and the final model after the last round."
            ],
            images=[("learning_curves.png", "learning curves")],
        ),
        Section("Cost", tables=[cost_table(cost_summary(run.metrics, run.state))]),
    ]


_publish_dir = atomic.publish_dir  # its former name


# ---------------------------------------------------------------------------------------
# Comparing runs
# ---------------------------------------------------------------------------------------


def method_record(run: Run, label: str | None = None) -> dict[str, Any]:
    """One run's row of the comparison (JSON-ready, None where not recorded)."""
    glob, local = global_rows(run.metrics), local_rows(run.metrics)
    cost = cost_summary(run.metrics, run.state)
    plan, mode = run.metrics.get("plan") or "?", run.metrics.get("mode") or "?"
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
    locals_ = [_mapping(m.get("mean")) for k, m in ev.models.items() if k.startswith("local")]
    local_mean = {"mean": {c: _mean(m.get(c) for m in locals_) for c in ev.classes}}
    return {
        "global": _eval_summary(glob, ev.classes) if glob else None,
        "local_mean": _eval_summary(local_mean, ev.classes) if locals_ else None,
    }


def _eval_summary(model: Mapping, classes: list[str]) -> dict[str, Any]:
    mean = _mapping(model.get("mean"))
    dice = {c: v for c in classes if (v := _num(mean.get(c))) is not None}
    return {"dice": dice, "mean": evaluation_mean(model, classes)}


def compare_runs(run_dirs: list[Path], out_dir: Path, labels: list[str] | None = None) -> Path:
    """Write a comparison of runs into ``out_dir`` (index.html, comparison.md,
    comparison.json, methods_global.png); returns ``out_dir``."""
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
    atomic.write_text(out_dir / "index.html", render_html(title, sections))
    atomic.write_text(out_dir / "comparison.md", render_markdown(title, sections))
    return out_dir


def _unique_methods(records: list[dict]) -> list[dict]:
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


def comparison_table(records: list[dict], classes: list[str], datasets: Mapping[str, list[str]]) -> Table:
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
            g = _mapping(_mapping(r["oof"].get(dataset)).get("global"))
            row += [_mapping(g.get("dice")).get(c) for c in ds_classes] + [g.get("mean")]
        row += [str(r["rounds_done"]), _fixed(r["mb_total"], 3), _fixed(r["wall_s"], 1)]
        rows.append(row)
    return Table(columns, rows, "Dice per class (mean across the sites that label each class) and cost", groups)


def comparison_sections(records: list[dict], classes: list[str], datasets: Mapping[str, list[str]]) -> list[Section]:
    runs_table = Table(
        ["method", "run id", "plan", "mode", "status", "global model", "local models"],
        [
            [r["method"], r["run_id"], r["plan"], r["mode"], str(r["status"] or ""), r["global"]["model"], r["local"]["model"]]
            for r in records
        ],
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
