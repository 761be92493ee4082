"""Each site's trained and test-only classes side by side, in the shape of the ConDistFL paper's Table 5.

A site of a partially labelled federation scores a model on the classes it trains on (its test rows'
``dice_<class>``) and, where it holds test-only reference labels, on classes it does not train on
(``ref_dice_<class>``, marked ``*``). The paper's tables put every site's cells in one row per
method and average them twice: over the trained cells only ("excluding *") and over all cells
("including *"). An average over cells, not classes: a class two sites score counts twice, as in the
paper. A model that forgets what other sites taught it keeps its "excluding" average and loses the
"including" one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from coordinator.report.forgetting import forgetting
from coordinator.report.reading import Scored, mapping
from coordinator.results import class_dice, ordered_classes, reference_cases, reference_dice
from fedimg_core.reporting import Section, Table

TEST_ONLY_MARK = "*"
SITE_CLASSES_TITLE = "Per site: classes trained on and test-only classes (*)"
SITE_CLASSES_TEXT = (
    "Dice on each site's test cases, per site the classes it trains on and, marked *, the classes it holds test-only reference "
    "labels of (never in a loss or in model selection). Average excluding *: the mean over the trained cells; including *: over "
    "all cells (the ConDistFL paper's Table 5). A model that forgets what the other sites taught it keeps the first and loses "
    "the second. n: the site's test cases; a test-only class is scored on those of them that have a reference label."
)


def site_cells(scored: Scored) -> dict[str, Any]:
    """One model kind's cells per site, and their two averages (JSON-ready).

    Args:
        scored: the model's test rows, site name -> row (`coordinator.report.reading.global_rows` / ``local_rows``).

    Returns:
        ``sites``: site -> ``{"trained": {class: Dice}, "test_only": {class: Dice}, "cases": n or None,
        "test_only_cases": n or None}``; ``average_excluding`` / ``average_including``: the mean over the
        trained cells / over all cells (None without cells).
    """
    sites: dict[str, Any] = {}
    for site, row in sorted(scored.rows.items()):
        trained, test_only = class_dice(row), reference_dice(row)
        if trained or test_only:
            cases = row.get("cases")
            sites[site] = {
                "trained": trained,
                "test_only": {c: v for c, v in test_only.items() if c not in trained},  # a site's own label wins
                "cases": int(cases) if isinstance(cases, (int, float)) else None,
                "test_only_cases": reference_cases(row),
            }
    return {"sites": sites, **cell_averages(sites)}


def cell_averages(sites: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """The mean over the trained cells and over all cells of `site_cells`'s ``sites``.

    Args:
        sites: site -> ``{"trained": {class: Dice}, "test_only": {class: Dice}}``.

    Returns:
        ``average_excluding`` and ``average_including`` (None where there is no cell).
    """
    trained = [float(v) for s in sites.values() for v in s.get("trained", {}).values()]
    test_only = [float(v) for s in sites.values() for v in s.get("test_only", {}).values()]
    every = trained + test_only
    return {
        "average_excluding": sum(trained) / len(trained) if trained else None,
        "average_including": sum(every) / len(every) if every else None,
    }


def has_test_only(record: Mapping[str, Any] | None) -> bool:
    """Whether a `site_cells` record holds any test-only cell (without one, the table says nothing the others do not)."""
    return record is not None and any(s.get("test_only") for s in record.get("sites", {}).values())


def column_layout(records: Sequence[Mapping[str, Any]], schema: Mapping[str, int]) -> list[tuple[str, str, bool]]:
    """The table's cell columns, ``(site, class, test_only)``: sites sorted, each site's classes in schema order.

    Args:
        records: `site_cells` records (a class is a column when any record scores it at that site).
        schema: class name -> id.

    Returns:
        The columns; where records disagree on whether a class is trained at a site, trained wins.
    """
    per_site: dict[str, dict[str, bool]] = {}
    for record in records:
        for site, cells in record.get("sites", {}).items():
            kinds = per_site.setdefault(site, {})
            for c in cells.get("trained", {}):
                kinds[c] = False
            for c in cells.get("test_only", {}):
                kinds.setdefault(c, True)
    return [(site, c, per_site[site][c]) for site in sorted(per_site) for c in ordered_classes(per_site[site], schema)]


def site_classes_table(rows: Sequence[tuple[str, Mapping[str, Any]]], schema: Mapping[str, int], caption: str,
                       first_column: str = "model") -> Table:  # fmt: skip
    """Rows of models or methods, columns: the two averages, then per site its trained and test-only (*) classes.

    Args:
        rows: (row name, `site_cells` record).
        schema: class name -> id (the class order within a site).
        caption: the table's caption.
        first_column: the row header's column name.

    Returns:
        The table; each site's group header gives its test cases (n).
    """
    layout = column_layout([r for _, r in rows], schema)
    cases: dict[str, int] = {}
    for _, record in rows:
        for site, cells in record.get("sites", {}).items():
            if isinstance(cells.get("cases"), int):
                cases.setdefault(site, cells["cases"])
    body: list[list[Any]] = []
    for name, record in rows:
        sites = record.get("sites", {})
        cells = [sites.get(site, {}).get("test_only" if test_only else "trained", {}).get(c) for site, c, test_only in layout]
        body.append([name, record.get("average_excluding"), record.get("average_including"), *cells])
    groups: list[tuple[str, int]] = [("", 1), ("average Dice", 2)]
    for site in dict.fromkeys(site for site, _, _ in layout):
        label = f"{site} (n={cases[site]})" if site in cases else site
        groups.append((label, sum(1 for s, _, _ in layout if s == site)))
    columns = [first_column, f"excluding {TEST_ONLY_MARK}", f"including {TEST_ONLY_MARK}"]
    columns += [c + (TEST_ONLY_MARK if test_only else "") for _, c, test_only in layout]
    return Table(columns, body, caption, groups)


def site_classes_records(metrics: Any) -> dict[str, Any]:
    """A run's `site_cells` records of the best global model and of the sites' best local models, on the test cases.

    Args:
        metrics: the run's metrics.

    Returns:
        ``global`` and ``local`` records (empty ``sites`` for a run without test rows).
    """
    f = forgetting(metrics)
    return {"global": site_cells(f.glob), "local": site_cells(f.best_local)}


def site_classes_section(metrics: Any, schema: Mapping[str, int]) -> Section | None:
    """The run report's per-site table (best global and best local models), None for a run without test-only scores.

    Args:
        metrics: the run's metrics.
        schema: class name -> id.

    Returns:
        The section, or None.
    """
    f = forgetting(metrics)
    if not f.has_data:
        return None
    rows = [(f.glob.model or "best global model", site_cells(f.glob)), (f.best_local.model or "best local models", site_cells(f.best_local))]
    return Section(SITE_CLASSES_TITLE, [SITE_CLASSES_TEXT], [site_classes_table(rows, schema, "Dice on each site's test cases")])


def site_classes_comparison(records: Sequence[Mapping[str, Any]], schema: Mapping[str, int]) -> Section | None:
    """The comparison page's per-site tables, one row per method (global models, then local models).

    Args:
        records: comparison records (`coordinator.report.compare.method_record`) with ``site_classes``.
        schema: class name -> id.

    Returns:
        The section, None when no run has a test-only score.
    """
    with_data = [r for r in records if has_test_only(mapping(r.get("site_classes")).get("global"))]
    if not with_data:
        return None
    tables = [
        site_classes_table([(str(r["method"]), r["site_classes"][kind]) for r in with_data], schema, caption, "method")
        for kind, caption in (("global", "best global model, test cases"), ("local", "each site's best local model, its test cases"))
    ]
    return Section(SITE_CLASSES_TITLE, [SITE_CLASSES_TEXT], tables)
