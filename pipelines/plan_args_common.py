"""What the segmentation and data-factory plans' arguments share: the base model, the error, the parse.

Both plans' ``plan_args`` models (`pipelines.plan_args.PlanArgs`,
`pipelines.factory.plan_args.FactoryPlanArgs`) derive from `PlanArgsBase` (schema, spacing,
optimizer state, what the coordinator fills in) and are validated by `validate_plan_args`,
which raises one `InvalidPlanArgs` naming every problem as ``plan_args.<key>: <problem>``.
Imports neither torch nor MONAI.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, TypeVar

from pydantic import BeforeValidator, Field

from fedimg_core.config import ConfigModel, short
from fedimg_core.config_types import Flag
from fedimg_core.devices import GPU_POLICIES, PRECISIONS, TRANSFER_PRECISIONS
from pipelines.config_fields import ConfigValueError, check_model, choice, is_number, plain_name, worded_integer

__all__ = ["DeviceArgs", "InvalidPlanArgs", "PlanArgsBase", "Spacing", "TransferArgs", "parse_spacing", "validate_plan_args"]

ModelT = TypeVar("ModelT", bound="PlanArgsBase")


class DeviceArgs(ConfigModel):
    """The spec's ``device`` section as the sites receive it (filled in by the coordinator)."""

    gpu: Annotated[str, choice(GPU_POLICIES)] = "optional"
    precision: Annotated[str, choice(PRECISIONS)] = "auto"


class TransferArgs(ConfigModel):
    """The spec's ``transfer`` section as the sites receive it (filled in by the coordinator; `pipelines.plans.transfer`)."""

    precision: Annotated[str, choice(TRANSFER_PRECISIONS)] = "fp32"
    # SCAFFOLD's states travel in the wire form too (`pipelines.wire_aux`); False in runs started by an earlier
    # coordinator, whose sites' saved optimizer states hold declearn's own SCAFFOLD module
    states: bool = False


class InvalidPlanArgs(ConfigValueError):
    """``plan_args`` has problems; ``.problems`` holds each (``plan_args.<key>``, problem), ``.key`` the first key.

    A `ValueError` too, so callers that caught the plans' old ValueErrors still catch it.
    """


def parse_spacing(value: Any) -> str | tuple[float, ...] | None:
    """``spacing`` as a spec gives it: ``"schema"``, ``"native"`` (-> None) or three positive numbers in mm (-> a tuple).

    Args:
        value: the spec's value.

    Returns:
        ``"schema"``, None or the tuple.

    Raises:
        ValueError: anything else.
    """
    if value == "native":
        return None
    if value == "schema":
        return "schema"
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 3 and all(is_number(v) and v > 0 for v in value):
        return tuple(float(v) for v in value)
    raise ValueError(f"must be 'schema', 'native' or three positive numbers in mm (got {short(value)})")


# "schema" (the label schema's target spacing), None (native grid: "native" in a spec) or mm per axis
Spacing = Annotated[str | tuple[float, ...] | None, BeforeValidator(parse_spacing)]


_POSITIVE = "must be a positive integer (got {got})"


# keys the coordinator fills in (the schema's content, the run's length and id, the sites' client ids, the spec's split
# and aggregator)
FILLED_IN = ("schema_definition", "rounds_total", "local_steps", "run_id", "client_ids", "split", "aggregator", "device", "transfer")


class PlanArgsBase(ConfigModel):
    """The keys every plan with a label schema takes (the coordinator fills in the last three)."""

    REFUSED: ClassVar[dict[str, str]] = {}  # keys refused first, with why

    schema_: Any = Field(default=None, alias="schema")  # resolved by the coordinator (coordinator.plans.resolve_schema), not read on the node
    schema_definition: Any = None  # the schema's content, embedded by the coordinator
    spacing: Spacing = "schema"
    keep_optimizer_state: Flag = True
    rounds_total: Annotated[int | None, worded_integer(1, message=_POSITIVE, optional=True)] = None
    local_steps: Annotated[int | None, worded_integer(1, message=_POSITIVE, optional=True)] = None
    run_id: Annotated[str | None, plain_name()] = None  # it names the site's state files


def validate_plan_args(model: type[ModelT], args: Any, keys: Sequence[str], context: Mapping[str, Any] | None = None) -> ModelT:
    """Validate ``args`` against a plan-args model.

    Args:
        model: the plan's model.
        args: the spec's ``plan_args`` (plus what the coordinator filled in).
        keys: the plan's keys, in their documented order (every other key is reported).
        context: passed to the model's validators (the segmentation plans pass the label schema).

    Returns:
        The validated model.

    Raises:
        InvalidPlanArgs: ``"plan_args.<key>: <problem>"``, one line per problem.
    """
    if not isinstance(args, Mapping):
        raise InvalidPlanArgs.of("plan_args", "must be a mapping")
    for key, problem in model.REFUSED.items():  # a misunderstanding, said before anything else
        if key in args:
            raise InvalidPlanArgs.of(f"plan_args.{key}", problem)
    # what the coordinator fills in is accepted but never offered to a researcher as an allowed key
    return check_model(model, args, "plan_args", InvalidPlanArgs, context, keys=keys, hidden=FILLED_IN)
