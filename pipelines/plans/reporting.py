"""What a plan running at a site tells the outside, and how it names itself to the site.

Failures leave a plan as `pipelines.site_errors.SiteError` (a code and allowlisted fields;
the full text stays in the site's log): the plans decorate their entry points (init in
`pipelines.plans.seeding`, data, training, testing) with `site_boundary`.

- `report_training`: a site's round summary, streamed to the coordinator as training scalars.
- `embedded_schema`: the federation schema the coordinator embedded in the model arguments.
- `plan_origin`: who asks when a plan wants to load an artifact (plan class, sha256 of the
  source the node received, run, round), recorded in the site's approval store so that
  ``site-agent plans show`` lists what each plan asked for.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

__all__ = ["embedded_schema", "plan_origin", "plan_source_sha256", "report_training"]


class _Plan(Protocol):
    """What `plan_origin` reads of a Fed-BioMed training plan."""

    def round(self) -> int | None: ...


def plan_source_sha256(plan: object) -> str | None:
    """sha256 of the source file the node wrote for this plan (the shipped source).

    Args:
        plan: a training plan instance.

    Returns:
        The hex digest, or None when the plan's module has no readable file (a plan defined in a test).
    """
    module = sys.modules.get(type(plan).__module__)
    file = getattr(module, "__file__", None)
    try:
        return hashlib.sha256(Path(file).read_bytes()).hexdigest() if file else None
    except OSError:
        return None


def plan_origin(plan: _Plan, setting: str | None = None) -> dict[str, Any]:
    """The origin recorded with an artifact request made by `plan` (`pipelines.artifact_approval`).

    Args:
        plan: the training plan asking.
        setting: the plan argument that named the artifact (``plan_args.key.file``).

    Returns:
        ``plan_class``, ``plan_source_sha256``, ``run_id``, ``round`` (1-based) and ``setting``, those known.
    """
    settings = getattr(plan, "_settings", None)
    origin: dict[str, Any] = {"plan_class": type(plan).__name__, "plan_source_sha256": plan_source_sha256(plan),
              "run_id": getattr(settings, "run_id", None)}  # fmt: skip
    try:
        origin["round"] = int(plan.round() or 0) + 1
    except Exception:  # noqa: BLE001 - outside a node round there is no round number
        pass
    if setting:
        origin["setting"] = setting
    return {k: v for k, v in origin.items() if v is not None}


def report_training(history_monitor: Any, metric: dict[str, float], samples: int, updates: int) -> None:
    """Stream a round's training summary to the coordinator (Fed-BioMed's training scalars).

    Args:
        history_monitor: Fed-BioMed's metric channel (None outside a node round: nothing is sent).
        metric: the values, all floats (the coordinator keeps them under the site's ``train`` row).
        samples: samples trained on in the round.
        updates: updates made in the round.
    """
    if history_monitor is None:
        return
    history_monitor.add_scalar(
        metric=metric, iteration=updates, epoch=None, total_samples=samples, batch_samples=samples,
        num_batches=updates, num_samples_trained=samples, train=True,
    )  # fmt: skip


def embedded_schema(model_args: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The federation's label schema the coordinator embedded in the model arguments.

    Args:
        model_args: what the plan received (``schema_definition`` and the plan's own arguments).

    Returns:
        (the parsed `LabelSchema`, the raw mapping).

    Raises:
        ValueError: no embedded schema; `SchemaError` for one that does not parse.
    """
    from preprocessing.schema import parse_schema

    raw = model_args.get("schema_definition")
    if not isinstance(raw, dict):
        raise ValueError("model_args.schema_definition is missing: the coordinator embeds the federation schema")
    return parse_schema(raw, "the experiment's label schema"), raw
