"""Reading a run for its report: metrics (through `RunMetrics`), state and out-of-federation evaluations,
and which validation rows score the global and the local models."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from coordinator import runs
from coordinator.results import class_dice, ordered_classes, per_class_across_sites, selection_score
from coordinator.run_metrics import RunMetrics

EVALUATIONS_DIR = "evaluations"
MEAN_ACROSS_SITES = "mean across sites"

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
    """

    dataset: str
    classes: list[str]
    models: dict[str, dict[str, Any]]
    cases: Any = None
    merge_lesions: Any = None


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
    """Validation rows of one model kind, site name -> row (``dice_<class>``, ``case<j>_dice_<class>``)."""

    label: str
    rows: dict[str, dict[str, float]]


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
        out.append(Evaluation(dataset, classes, models, data.get("cases"), data.get("merge_lesions")))
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


def global_rows(metrics: Metrics) -> Scored:
    """The rows that score the global model.

    Args:
        metrics: the run's metrics.

    Returns:
        The final global model's rows (``val_final`` of the last round); without them, the
        rows that scored the best global model (``val_global`` of the round after it); else
        the last ``val_global`` rows.
    """
    m = RunMetrics.of(metrics)
    scored = m.scored_rounds()
    last = scored[-1] if scored else None
    if last is not None and (rows := last.rows("val_final")):
        return Scored(f"final global model (after round {last.round})", rows)
    best = m.best_global.model_round if m.best_global is not None else None
    if best is not None:
        for record in m.rounds:
            if record.round == best + 1 and (rows := record.rows("val_global")):
                return Scored(f"best global model (after round {best})", rows)
            if record.round == best and (rows := record.rows("val_final")):
                return Scored(f"best global model (after round {best})", rows)
    if last is not None and (rows := last.rows("val_global")):
        return Scored(f"global model (after round {last.round - 1})", rows)
    return Scored("global model", {})


def local_rows(metrics: Metrics) -> Scored:
    """Each site's model after local training in the last round that has ``val_local`` rows.

    Args:
        metrics: the run's metrics.

    Returns:
        The rows by site name (none when no round has them).
    """
    for record in reversed(RunMetrics.of(metrics).rounds):
        if rows := record.rows("val_local"):
            return Scored(f"local models (after local training in round {record.round})", rows)
    return Scored("local models", {})


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
