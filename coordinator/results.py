"""Reading a run's metrics: per-class Dice tables, model selection scores (no FL imports).

Validation rows per site and round (written by the engine from what the sites report):
``val_global`` (the model the site received, scored before local training), ``val_local``
(the site's model after local training), ``val_final`` (the final global model, after the
last round). Each holds ``dice_<class>`` means over the site's validation cases, for the
classes that site labels, ``dice_mean``, ``cases`` and ``case<j>_dice_<class>`` per case.

Test rows ``test_global``, ``test_local`` and ``test_final`` hold the same keys for the same
models on the site's test cases. A site reports both in one metric dict, the test keys
prefixed ``test_`` (`split_test_keys` separates them). Validation selects the models (best
global, best local); test rows only score them and never select. Runs written before the
test split (or a site without test cases) have no test rows.

A site that holds test-only reference labels of classes it does not train on also scores each
model on those classes on its test cases: the test row then holds ``ref_dice_<class>``,
``ref_dice_mean``, ``ref_cases`` and ``ref_case<j>_dice_<class>`` (`reference_dice`,
`reference_case_dice`). They measure forgetting and never select; `class_dice` and
`selection_score` do not read them. Runs without reference labels have none of these keys.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

_CASE = re.compile(r"^case(\d+)_dice_(.+)$")
TEST_PREFIX = "test_"  # a site's metric keys on its test cases; the unprefixed keys are on its validation cases
TEST_ROWS = {"val_global": "test_global", "val_local": "test_local", "val_final": "test_final"}
REFERENCE_PREFIX = "ref_"  # a test row's keys on the reference classes (test-only labels of classes the site does not train on)


def split_test_keys(metric: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """A site's testing metric dict as its validation row and its test row.

    Args:
        metric: what the site reported for one model: validation keys (``dice_<class>``,
            ``dice_mean``, ``cases``, ``case<j>_dice_<class>``) and the same keys prefixed
            ``test_`` for its test cases; on the test cases, with reference labels, also
            ``test_ref_dice_<class>``, ``test_ref_dice_mean``, ``test_ref_cases``, ``test_ref_case<j>_dice_<class>``.

    Returns:
        ``(validation, test)``: the unprefixed keys, and the prefixed keys with the prefix
        stripped (empty when the site reported no test cases): the reference keys become
        ``ref_dice_<class>``, ``ref_dice_mean``, ``ref_cases``, ``ref_case<j>_dice_<class>``.
    """
    validation = {k: v for k, v in metric.items() if not k.startswith(TEST_PREFIX)}
    test = {k[len(TEST_PREFIX) :]: v for k, v in metric.items() if k.startswith(TEST_PREFIX)}
    return validation, test


def class_dice(row: Mapping[str, float]) -> dict[str, float]:
    """{class name: mean Dice} of one validation row."""
    return {k[5:]: float(v) for k, v in row.items() if k.startswith("dice_") and k != "dice_mean" and _finite(v)}


def case_dice(row: Mapping[str, float]) -> dict[str, list[float]]:
    """{class name: [Dice per case]} of one validation row."""
    out: dict[str, list[float]] = {}
    for k, v in row.items():
        m = _CASE.match(k)
        if m and _finite(v):
            out.setdefault(m.group(2), []).append(float(v))
    return out


def reference_dice(row: Mapping[str, float]) -> dict[str, float]:
    """{class name: mean Dice} on the reference classes of one test row (``ref_dice_<class>``; empty without reference labels)."""
    return class_dice(_reference_keys(row))


def reference_case_dice(row: Mapping[str, float]) -> dict[str, list[float]]:
    """{class name: [Dice per case]} on the reference classes of one test row (``ref_case<j>_dice_<class>``)."""
    return case_dice(_reference_keys(row))


def reference_cases(row: Mapping[str, float]) -> int | None:
    """The number of test cases of one test row that have a reference label (``ref_cases``), None where not recorded."""
    v = row.get(f"{REFERENCE_PREFIX}cases")
    return int(v) if v is not None and _finite(v) else None


def _reference_keys(row: Mapping[str, float]) -> dict[str, float]:
    """The ``ref_`` keys of a test row, prefix stripped."""
    return {k[len(REFERENCE_PREFIX) :]: v for k, v in row.items() if k.startswith(REFERENCE_PREFIX)}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def per_class_across_sites(site_rows: Iterable[Mapping], key: str) -> dict[str, float]:
    """Mean over the sites that score a class (each site scores the classes it labels)."""
    acc: dict[str, list[float]] = {}
    for row in site_rows:
        for cls, v in class_dice(row.get(key, {}) or {}).items():
            acc.setdefault(cls, []).append(v)
    return {c: sum(v) / len(v) for c, v in acc.items()}


def selection_score(site_rows: Iterable[Mapping], key: str) -> float | None:
    """The paper's model-selection score: mean Dice over all classes across sites."""
    per_class = per_class_across_sites(site_rows, key)
    return sum(per_class.values()) / len(per_class) if per_class else None


def ordered_classes(names: Iterable[str], schema_classes: Mapping[str, int] | None = None) -> list[str]:
    """Class names in schema order (by class id), unknown names after them, sorted.

    Args:
        names: the class names to order.
        schema_classes: class name -> id of the label schema, or None (then alphabetical).

    Returns:
        The names, ordered.
    """
    names = set(names)
    if schema_classes:
        known = [c for c, _ in sorted(schema_classes.items(), key=lambda kv: kv[1]) if c in names]
        return known + sorted(names - set(known))
    return sorted(names)


def participation(rounds: Iterable[Mapping]) -> tuple[list[str], list[list[str]], list[str]]:
    """Each site's part in each round, for the rounds a site was left out of.

    Args:
        rounds: the run's round records (``site_status``, ``aggregated_from``; older runs have neither).

    Returns:
        ``(sites, rows, lines)``: the site names; one row per round some sampled site was left
        out of (round, ``k of n``, each site's status); one line per such round with the reasons.
        Empty when every site took part in every round it was asked to.
    """
    rounds = [r for r in rounds if r.get("site_status")]
    sites = sorted({name for r in rounds for name in r["site_status"]})
    rows, lines = [], []
    for r in rounds:
        status = r["site_status"]
        asked = [name for name, row in status.items() if row.get("status") != "not_sampled"]
        left = {name: row for name, row in status.items() if row.get("status") in ("failed", "timeout")}
        if not left:
            continue
        taken = r.get("aggregated_from")
        rows.append([str(r["round"]), f"{taken} of {len(asked)}", *[status.get(name, {}).get("status", "-") for name in sites]])
        why = "; ".join(f"{name} {row['status']}: {row.get('reason') or 'no reason recorded'}" for name, row in sorted(left.items()))
        lines.append(f"round {r['round']}: aggregated from {taken} of {len(asked)} sites ({why})")
    return sites, rows, lines


def fedsr_scores(metrics: Mapping) -> dict[str, dict]:
    """FedSR: each site's latest scores of its personalised model (its ``eval_*`` training scalars).

    Args:
        metrics: a FedSR run's metrics.

    Returns:
        site name -> the ``eval_*`` values of the last round it scored, plus ``round`` (from 1).
    """
    out: dict[str, dict] = {}
    for r in metrics.get("rounds", []):
        for row in r.get("sites", {}).values():
            train = row.get("train") or {}
            if "eval_cases" in train:
                out[row.get("name", "?")] = {"round": r["round"], **{k: v for k, v in train.items() if k.startswith("eval_")}}
    return out
