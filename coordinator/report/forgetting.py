"""Forgetting in the reports: how the selected models segment the classes a site does not train on, on that site's own test cases.

A site may hold test-only reference labels of classes it does not label for training (the ConDistFL
paper's forgetting measurement, its Figures 3 and 4). Its test rows then carry ``ref_dice_<class>`` and
``ref_cases`` (`coordinator.results.reference_dice`). A local model that keeps these classes near the
global model's Dice did not forget them; one far below did. Runs without reference labels have no such
keys, and the reports leave the section out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from coordinator.report.reading import MEAN_ACROSS_SITES, Metrics, Scored, global_rows, local_rows
from coordinator.results import ordered_classes, reference_cases, reference_dice
from coordinator.run_metrics import RunMetrics
from fedimg_core.reporting import Section, Table

FORGETTING_TITLE = "Forgetting: classes a site does not train on, on its own test cases"
FORGETTING_TEXT = (
    "Each site holds, for testing only, reference labels of classes it does not train on; n is the number of its test cases "
    "with such a label. A local model that keeps these classes near the global model's Dice did not forget them; a local "
    "model far below the global model forgot what the other sites taught it."
)
COMPARE_FORGETTING_TEXT = (
    "Per method, Dice on the classes each site does not train on (its test-only reference labels, on its own test cases), "
    "per class the mean across the sites that hold it; n: their test cases with a reference label. A method whose local "
    "models stay near its global model on these classes does not make the sites forget them."
)


@dataclass
class Forgetting:
    """The selected models' test rows, as far as they hold reference scores.

    Attributes:
        glob: the best global model's test rows (`global_rows`).
        best_local: each site's best local model's test rows (`local_rows`).
        last_local: each site's last scored local model's test rows (its round in ``rounds``).
    """

    glob: Scored
    best_local: Scored
    last_local: Scored

    @property
    def sites(self) -> list[str]:
        """The sites with reference scores for any of the three models."""
        return sorted({site for s in (self.glob, self.best_local, self.last_local) for site, row in s.rows.items() if reference_dice(row)})

    @property
    def has_data(self) -> bool:
        """Whether any site reported reference scores (runs without reference labels: no)."""
        return bool(self.sites)


def forgetting(metrics: Metrics) -> Forgetting:
    """The best global, best local and last local models' test rows of a run.

    Args:
        metrics: the run's metrics.

    Returns:
        The three sets of rows; `Forgetting.has_data` is False for a run without reference labels.
    """
    m = RunMetrics.of(metrics)
    return Forgetting(global_rows(m, "test"), local_rows(m, "test"), last_local_rows(m))


def last_local_rows(metrics: Metrics) -> Scored:
    """Each site's last scored local model on its test cases.

    Args:
        metrics: the run's metrics.

    Returns:
        Site name -> the ``test_local`` row of the last round that has one; ``rounds`` holds each site's round.
    """
    rows: dict[str, dict[str, float]] = {}
    rounds: dict[str, int] = {}
    for record in RunMetrics.of(metrics).scored_rounds():  # in round order: a later round overwrites
        for site, row in record.rows("test_local").items():
            rows[site], rounds[site] = row, record.round
    return Scored("last local models, test cases", rows, "test", rounds, "last local models")


def reference_classes(schema: Mapping[str, int], *scored: Scored) -> list[str]:
    """The classes some site scored on its reference labels, in schema order."""
    return ordered_classes({c for s in scored for row in s.rows.values() for c in reference_dice(row)}, schema)


def forgetting_table(f: Forgetting, schema: Mapping[str, int]) -> Table:
    """Per site and reference class: n, Dice of the best global, best local and (where scored) last local model.

    Args:
        f: the run's rows (`forgetting`).
        schema: class name -> id (the class order).

    Returns:
        Rows: each site's reference classes, then per class the mean across the sites that hold it (n summed).
    """
    with_last = any(reference_dice(row) for row in f.last_local.rows.values())
    classes = reference_classes(schema, f.glob, f.best_local, f.last_local)
    rows: list[list[Any]] = []
    for site in f.sites:
        scored = {k: s.rows.get(site, {}) for k, s in (("g", f.glob), ("b", f.best_local), ("l", f.last_local))}
        dice = {k: reference_dice(row) for k, row in scored.items()}
        n = next((v for v in (reference_cases(row) for row in scored.values()) if v is not None), None)
        for c in [c for c in classes if any(c in d for d in dice.values())]:
            last = [dice["l"].get(c), f.last_local.rounds.get(site) if dice["l"] else None] if with_last else []
            rows.append([site, c, n, dice["g"].get(c), dice["b"].get(c), f.best_local.rounds.get(site) if dice["b"] else None, *last])
    for c in classes:
        site_rows = [r for r in rows if r[1] == c]
        if len(site_rows) > 1:  # one site: its own row says it all
            last = [_mean(r[6] for r in site_rows), None] if with_last else []
            total = sum(r[2] for r in site_rows if r[2] is not None)
            rows.append([MEAN_ACROSS_SITES, c, total, _mean(r[3] for r in site_rows), _mean(r[4] for r in site_rows), None, *last])
    last_columns = ["last local", "last local's round"] if with_last else []
    columns = ["site", "class", "n (test cases)", "best global", "best local", "best local's round", *last_columns]
    caption = f"Dice on each site's reference classes: {f.glob.model or 'global model'}; {f.best_local.model or 'local models'}"
    return Table(columns, rows, caption + ("; last scored local models" if with_last else ""))


def forgetting_section(metrics: Metrics, schema: Mapping[str, int]) -> Section | None:
    """The run report's forgetting section, None for a run without reference scores.

    Args:
        metrics: the run's metrics.
        schema: class name -> id.

    Returns:
        The section (title `FORGETTING_TITLE`, one table, one sentence saying what it shows), or None.
    """
    f = forgetting(metrics)
    if not f.has_data:
        return None
    return Section(FORGETTING_TITLE, [FORGETTING_TEXT], [forgetting_table(f, schema)])


def forgetting_record(metrics: Metrics) -> dict[str, Any] | None:
    """A run's forgetting numbers for the comparison (JSON-ready), None without reference scores.

    Args:
        metrics: the run's metrics.

    Returns:
        ``global`` and ``local`` (best local models): class -> mean Dice across the sites that hold the class
        as reference; ``n``: class -> their test cases with a reference label (summed over those sites).
    """
    f = forgetting(metrics)
    if not f.has_data:
        return None
    out: dict[str, Any] = {}
    counts: dict[str, dict[str, int]] = {}  # per model kind: class -> test cases with a reference label, summed over sites
    for key, scored in (("global", f.glob), ("local", f.best_local)):
        acc: dict[str, list[float]] = {}
        n = counts.setdefault(key, {})
        for row in scored.rows.values():
            for c, v in reference_dice(row).items():
                acc.setdefault(c, []).append(v)
                if (cases := reference_cases(row)) is not None:
                    n[c] = n.get(c, 0) + cases
        out[key] = {c: sum(v) / len(v) for c, v in acc.items()}
    out["n"] = {**counts["local"], **counts["global"]}  # the global rows' count where they hold the class, else the local rows'
    return out


def forgetting_comparison_table(records: Sequence[Mapping[str, Any]], schema: Mapping[str, int]) -> Table | None:
    """One row per method with reference scores: per class, the best global and the best local models' mean Dice and n.

    Args:
        records: comparison records (`coordinator.report.compare.method_record`), with ``forgetting``.
        schema: class name -> id (the class order).

    Returns:
        The table, None when no run has reference scores.
    """
    with_data = [r for r in records if isinstance(r.get("forgetting"), Mapping)]
    if not with_data:
        return None
    classes = ordered_classes({c for r in with_data for k in ("global", "local") for c in r["forgetting"].get(k, {})}, schema)
    rows: list[list[Any]] = []
    for r in with_data:
        fg = r["forgetting"]
        rows.append([str(r["method"]), *(fg.get(k, {}).get(c) for k in ("global", "local") for c in classes), *(fg.get("n", {}).get(c) for c in classes)])
    groups = [("", 1), ("best global", len(classes)), ("best local", len(classes)), ("n (test cases)", len(classes))]
    return Table(["method", *classes * 3], rows, "Dice on the classes a site does not train on, mean across the sites that hold each class", groups)


def _mean(values: Any) -> float | None:
    nums = [v for v in values if isinstance(v, float)]
    return sum(nums) / len(nums) if nums else None
