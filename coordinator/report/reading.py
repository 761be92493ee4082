"""Reading a run for its report: metrics (through `RunMetrics`), state and out-of-federation evaluations,
and which rows score the selected global and local models on the validation and the test cases.

Selection uses the validation cases only (``val_*`` rows); the test cases (``test_*`` rows, runs
since issue 19) score the selected models and nothing else. Older runs have no test rows."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from coordinator import runs
from coordinator.results import class_dice, ordered_classes, per_class_across_sites, selection_score
from coordinator.run_metrics import RoundRecord, RunMetrics

EVALUATIONS_DIR = "evaluations"
MEAN_ACROSS_SITES = "mean across sites"
SPLIT_PREFIX = {"validation": "val", "test": "test"}  # a split -> the prefix of its rows in metrics.json
NO_TEST_SPLIT = "no test split in this run"

Log = Callable[[str], Any]
Metrics = RunMetrics | Mapping[str, Any]  # a dict is validated by RunMetrics


@dataclass
class Evaluation:
    """One out-of-federation evaluation file: models scored on a dataset no site trained on.

    Attributes:
        dataset: the dataset's name.
        classes: the classes scored, in file order.
        models: model key (``global``, ``local:<site>``) -> label, per_case, mean, mean_all.
        cases: number of cases, as recorded.
        merge_lesions: whether lesions were merged into their organs.
        surface_tolerance_mm: class -> the NSD tolerance its ``metrics_mean`` used (empty in
            evaluations from before the clinical metrics).
    """

    dataset: str
    classes: list[str]
    models: dict[str, dict[str, Any]]
    cases: Any = None
    merge_lesions: Any = None
    surface_tolerance_mm: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    """What a report shows of one run directory."""

    run_dir: Path
    metrics: RunMetrics
    state: dict[str, Any]
    evaluations: list[Evaluation]

    @property
    def run_id(self) -> str:
        """The run id (state.json's, else the directory name)."""
        return str(self.state.get("run_id") or self.run_dir.name)

    @property
    def schema(self) -> dict[str, int]:
        """The label schema's classes, name -> id."""
        return dict(self.metrics.classes)


@dataclass
class Scored:
    """One model kind's rows on one split, site name -> row (``dice_<class>``, ``case<j>_dice_<class>``, ``cases``).

    Attributes:
        label: which model and which split.
        rows: site name -> row.
        split: ``validation`` or ``test``.
        rounds: local models: site name -> the round its model was trained in.
        model: which model, without the split.
    """

    label: str
    rows: dict[str, dict[str, float]]
    split: str = "validation"
    rounds: dict[str, int] = field(default_factory=dict)
    model: str = ""


def load_run(run_dir: Path, log: Log = print) -> Run:
    """Read a run directory's metrics, state and evaluations.

    Args:
        run_dir: the run directory.
        log: where skipped evaluation files are reported.

    Returns:
        The run; without metrics.json its metrics are empty.

    Raises:
        ConfigError: metrics.json is not JSON or does not fit `RunMetrics`.
    """
    run_dir = Path(run_dir)
    return Run(run_dir, runs.load_metrics(run_dir), _read_json(run_dir / "state.json"), read_evaluations(run_dir, log))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_evaluations(run_dir: Path, log: Log = print) -> list[Evaluation]:
    """The run's ``evaluations/<dataset>.json`` files, by file name; unreadable ones are skipped.

    Args:
        run_dir: the run directory.
        log: where a skipped file is reported.

    Returns:
        The evaluations.
    """
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
            classes = sorted({c for m in models.values() for c in mapping(m.get("mean"))})
        dataset = str(data.get("dataset") or path.stem)
        out.append(Evaluation(dataset, classes, models, data.get("cases"), data.get("merge_lesions"), mapping(data.get("surface_tolerance_mm"))))
    return out


def mapping(v: object) -> dict[Any, Any]:
    """``v`` when it is a dict, else an empty one (evaluation files are read leniently)."""
    return v if isinstance(v, dict) else {}


def num(v: object) -> float | None:
    """A finite number as float, else None (missing, NaN, text, bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def mean(values: Iterable[object]) -> float | None:
    """The mean of the finite numbers among ``values``, None without any."""
    nums = [x for x in map(num, values) if x is not None]
    return sum(nums) / len(nums) if nums else None


def split_key(kind: str, split: str) -> str:
    """The metrics.json row of a model kind on a split: ``val_global`` / ``test_global``, ``val_local``, ``val_final``, ...

    Args:
        kind: ``global``, ``local`` or ``final``.
        split: ``validation`` or ``test``.

    Returns:
        The row's key.

    Raises:
        ValueError: an unknown split.
    """
    if split not in SPLIT_PREFIX:
        raise ValueError(f"split must be one of {', '.join(SPLIT_PREFIX)} (got {split!r})")
    return f"{SPLIT_PREFIX[split]}_{kind}"


def _selected_global(m: RunMetrics) -> tuple[str, RoundRecord, str] | None:
    """The selected global model: (label, the round record whose rows score it, ``global`` or ``final``).

    The best global model (selected on validation) is scored by ``val_global`` of the round after it,
    or by ``val_final`` when it is the last round's; without a best, the final model; else the last
    global model the sites scored.
    """
    scored = m.scored_rounds()
    best = m.best_global.model_round if m.best_global is not None else None
    if best is not None:
        for record in scored:
            if record.round == best + 1 and record.rows("val_global"):
                return f"best global model (after round {best}, selected on validation)", record, "global"
            if record.round == best and record.rows("val_final"):
                return f"best global model (after round {best}, selected on validation)", record, "final"
    last = scored[-1] if scored else None
    if last is not None and last.rows("val_final"):
        return f"final global model (after round {last.round})", last, "final"
    for record in reversed(scored):
        if record.rows("val_global"):
            return f"global model (after round {record.round - 1})", record, "global"
    return None


def global_rows(metrics: Metrics, split: str = "validation") -> Scored:
    """The rows that score the selected global model on one split.

    Args:
        metrics: the run's metrics.
        split: ``validation`` (the cases that selected the model) or ``test`` (never used for
            training or selection).

    Returns:
        The best global model's rows (``val_global`` / ``test_global`` of the round after it, or
        ``val_final`` / ``test_final`` when it is the last round's); without a best, the final
        model's (last round's ``*_final``); else the last ``*_global`` rows. The same model for
        both splits; empty rows when the run has none on that split (a run without test cases).

    Raises:
        ValueError: an unknown split.
    """
    split_key("global", split)  # an unknown split fails here, also for a run without rows
    selected = _selected_global(RunMetrics.of(metrics))
    if selected is None:
        return Scored(f"global model, {split} cases", {}, split, model="global model")
    label, record, kind = selected
    return Scored(f"{label}, {split} cases", record.rows(split_key(kind, split)), split, model=label)


def local_rows(metrics: Metrics, split: str = "validation") -> Scored:
    """Each site's best local model (selected on the site's validation cases) on one split.

    Args:
        metrics: the run's metrics.
        split: ``validation`` or ``test``.

    Returns:
        Site name -> ``val_local`` / ``test_local`` row of the round of the site's best local model;
        for a site without a recorded best (or without rows that round), the last round that has
        its local rows. ``rounds`` holds each site's round.

    Raises:
        ValueError: an unknown split.
    """
    key = split_key("local", split)
    m = RunMetrics.of(metrics)
    by_round = {r.round: r for r in m.scored_rounds()}
    sites = sorted({name for r in by_round.values() for name in r.rows("val_local")})
    rows: dict[str, dict[str, float]] = {}
    rounds: dict[str, int] = {}
    best_used = False
    for site in sites:
        best = m.best_local.get(site)
        record = by_round.get(best.round) if best is not None and best.round is not None else None
        if record is not None and site in record.rows("val_local"):
            best_used = True
        else:  # no best recorded for this site: its last local model scored
            record = next(r for r in reversed(list(by_round.values())) if site in r.rows("val_local"))
        rounds[site] = record.round
        if (row := record.rows(key).get(site)) is not None:
            rows[site] = row
    details = ["selected on each site's validation cases"] if best_used else []
    if rounds and len(set(rounds.values())) == 1:
        details.append(f"trained in round {next(iter(rounds.values()))}")
    label = ("best local models" if best_used else "last local models") + (f" ({'; '.join(details)})" if details else "")
    return Scored(f"{label}, {split} cases", rows, split, {s: r for s, r in rounds.items() if s in rows}, label)


@dataclass
class InFederation:
    """The selected global and local models' rows on the validation and the test cases of the sites."""

    global_validation: Scored
    global_test: Scored
    local_validation: Scored
    local_test: Scored

    @property
    def has_test(self) -> bool:
        """Whether the run scored any model on test cases (runs before issue 19, and runs with ``split.test: 0``, did not)."""
        return bool(self.global_test.rows or self.local_test.rows)

    @property
    def split(self) -> str:
        """The split the report's primary numbers are on: ``test``, else ``validation``."""
        return "test" if self.has_test else "validation"

    @property
    def glob(self) -> Scored:
        """The global model's primary rows (test; validation in a run without test cases)."""
        return self.global_test if self.has_test else self.global_validation

    @property
    def local(self) -> Scored:
        """The local models' primary rows (test; validation in a run without test cases)."""
        return self.local_test if self.has_test else self.local_validation


def in_federation(metrics: Metrics) -> InFederation:
    """The selected global and local models on both splits (`global_rows`, `local_rows`).

    Args:
        metrics: the run's metrics.

    Returns:
        The four sets of rows.
    """
    m = RunMetrics.of(metrics)
    return InFederation(global_rows(m, "validation"), global_rows(m, "test"), local_rows(m, "validation"), local_rows(m, "test"))


def class_means(scored: Scored) -> dict[str, float]:
    """Per class, the mean Dice across the sites that score it."""
    return per_class_across_sites(({"row": row} for row in scored.rows.values()), "row")


def scored_mean(scored: Scored) -> float | None:
    """The selection score: mean over classes of the per-class means across sites."""
    return selection_score(({"row": row} for row in scored.rows.values()), "row")


def row_mean(row: Mapping[str, float]) -> float | None:
    """A site's mean Dice over the classes it scores."""
    v = num(row.get("dice_mean"))
    return v if v is not None else mean(class_dice(row).values())


def foreground_classes(schema: Mapping[str, int], *scored: Scored) -> list[str]:
    """The schema's classes except background, plus any other scored class, in schema order."""
    names = {c for c, i in schema.items() if i != 0 and c != "background"}
    names |= {c for s in scored for row in s.rows.values() for c in class_dice(row)}
    return ordered_classes(names, schema)
