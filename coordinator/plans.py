"""Registry of training plans a spec can name, and the check of their arguments.

Values are import paths, resolved lazily (importing a plan imports Fed-BioMed).

Segmentation plans take the federation label schema from ``plan_args.schema``: a built-in
name (``abdominal-ct``: preprocessing/schemas/<name>.yaml), a path to a schema file
(relative to the spec file; only for a spec file read on this machine, never for a spec
submitted to the service), or the schema itself as a mapping. The coordinator embeds the
schema's content in the model arguments it sends (``schema_definition``), so every site
uses exactly the researcher's class ids, groups, spacing and intensity rules.
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipelines.config_fields import ConfigValueError

# the argument checks import neither torch nor MONAI: `coordinator validate` stays fast
from pipelines.factory.plan_args import parse_factory_args
from pipelines.fedsr.plan_args import parse_fedsr_args
from pipelines.plan_args import PLAN_ARG_KEYS, PlanArgs, parse_plan_args
from pipelines.plan_args_common import InvalidPlanArgs, validate_plan_args
from preprocessing.schema import SchemaError, parse_schema

PLANS: dict[str, str] = {
    "condistfl": "pipelines.plans.condistfl:ConDistFLPlan",
    "marginal": "pipelines.plans.marginal:MarginalSegmentationPlan",
    "data_factory": "pipelines.plans.data_factory:DataFactoryPlan",
    "fedsr": "pipelines.plans.fedsr:FedSRPlan",
}
SEGMENTATION_PLANS = ("condistfl", "marginal")
FACTORY_PLANS = ("data_factory",)
FEDSR_PLANS = ("fedsr",)  # unlabelled sites, one atlas, personal decoders
# filled in by the coordinator from the spec, the run and the connected sites
FILLED_ARGS = ("rounds_total", "local_steps", "run_id", "client_ids", "aggregator", "device", "transfer")


class PlanArgsError(ConfigValueError):
    """One problem of a spec's ``plan_args``: ``.key`` (relative to plan_args) and ``.problem``.

    Args:
        key: the key path under plan_args (``roi_size``, ``gin.prob``).
        problem: what is wrong, and what is allowed.
    """

    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}", key=key)
        self.problem = problem
        self.problems = [(key, problem)]


def resolve(name: str) -> Any:
    """The training-plan class registered as ``name`` (importing it imports Fed-BioMed)."""
    module, _, attr = PLANS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def builtin_schemas() -> list[str]:
    """Names of the label schemas shipped in preprocessing/schemas."""
    folder = resources.files("preprocessing").joinpath("schemas")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_schema(value: Any, base_dir: Path | None, allow_files: bool = True) -> tuple[dict[str, Any], str]:
    """(raw schema mapping, where it came from) for ``plan_args.schema``.

    Args:
        value: a built-in schema name, a schema file path or the schema mapping itself.
        base_dir: folder relative paths are resolved against (None: the working directory).
        allow_files: False for a spec that came over the network: only built-in names and
            inline mappings, so a submitted spec cannot make the coordinator read (and
            quote back) a file of its own.

    Raises:
        PlanArgsError: key ``schema``, naming the problem.
    """
    if isinstance(value, dict):
        raw, source = value, "plan_args.schema (inline)"
    elif isinstance(value, str) and value:
        shown = repr(value) if len(value) <= 60 else repr(value[:57] + "...")
        if value in builtin_schemas():
            path = Path(str(resources.files("preprocessing").joinpath("schemas", f"{value}.yaml")))
        elif not allow_files:
            raise PlanArgsError(
                "schema",
                f"{shown} is neither a built-in schema ({', '.join(builtin_schemas())}) nor an inline schema mapping; "
                "a submitted spec cannot name files: put the schema in the spec "
                "(`coordinator submit FILE` does that for a schema file next to FILE)",
            )
        else:
            path = Path(value).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise PlanArgsError("schema", f"{shown} is neither a built-in schema ({', '.join(builtin_schemas())}) nor a schema file")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise PlanArgsError("schema", f"{path}: cannot read ({' '.join(str(exc).split())})") from None
        source = str(path)
    else:
        raise PlanArgsError("schema", f"required: a built-in schema name ({', '.join(builtin_schemas())}), a file or a mapping")
    if not isinstance(raw, dict):
        raise PlanArgsError("schema", f"{source}: expected a schema mapping at the top level (got {type(raw).__name__})")
    try:
        parse_schema(raw, source)
    except SchemaError as exc:
        if len(exc.problems) > 1:  # one problem per line, each with its key path under plan_args.schema
            raise _SchemaProblems(exc.problems, source) from None
        raise PlanArgsError("schema", str(exc)) from None
    return raw, source


class _SchemaProblems(PlanArgsError):
    """Several problems of the label schema that plan_args.schema names, each with its own key path."""

    def __init__(self, problems: list[tuple[str, str]], source: str) -> None:
        where = "" if source.endswith("(inline)") else f" (in {source})"
        self.each = [PlanArgsError(f"schema.{key}" if key else "schema", problem + where) for key, problem in problems]
        super().__init__("schema", f"{source}: {len(problems)} problems: " + "; ".join(f"{k}: {p}" for k, p in problems))


def model_args_for(name: str, args: dict[str, Any], base_dir: Path | None = None, allow_files: bool = True) -> dict[str, Any]:
    """The model arguments sent to the sites, checked before anything is sent.

    Raises PlanArgsError(key, problem) naming the plan_args key (the first problem found)."""
    out, problems = check_plan_args(name, args, base_dir, allow_files)
    if problems:
        raise problems[0]
    return out


def check_plan_args(name: str, args: dict[str, Any], base_dir: Path | None = None, allow_files: bool = True) -> tuple[dict[str, Any], list[PlanArgsError]]:
    """Check ``plan_args`` of plan ``name`` and build the model arguments sent to the sites.

    Every problem is reported: what the coordinator fills in, the schema, and each problem
    the plan's model finds (unknown keys, values); the model's errors carry their key path,
    so nothing is recovered from a message. Nothing here imports torch, MONAI or Fed-BioMed
    (`pipelines.plan_args`, `pipelines.factory.plan_args`).

    Args:
        name: a plan of PLANS.
        args: the spec's plan_args mapping (not modified).
        base_dir: folder schema file paths are relative to.
        allow_files: whether plan_args.schema may name a file (see resolve_schema).

    Returns:
        (model_args, problems): model_args is {} when there are problems; each problem has
        ``.key`` (relative to plan_args) and ``.problem``.
    """
    if name not in SEGMENTATION_PLANS + FACTORY_PLANS + FEDSR_PLANS:
        return dict(args), []
    problems: list[PlanArgsError] = []
    if "schema_definition" in args:
        problems.append(PlanArgsError("schema_definition", "is filled in by the coordinator; name the schema with plan_args.schema"))
    for key in FILLED_ARGS:
        if key in args:
            problems.append(
                PlanArgsError(key, "is filled in by the coordinator from the spec (rounds, local_steps, aggregator, device), the run and the sites")
            )
    if "split" in args:
        problems.append(PlanArgsError("split", "is a top-level key of the spec: move it out of plan_args (split: {validation: 0.2, test: 0.2, seed: 0})"))
    schema = None
    raw: dict[str, Any] | None = None
    try:
        raw, source = resolve_schema(args.get("schema", "abdominal-ct"), base_dir, allow_files)
        schema = parse_schema(raw, source)
    except _SchemaProblems as exc:
        problems += exc.each
    except PlanArgsError as exc:
        problems.append(exc)
    checked = {k: v for k, v in args.items() if k not in ("schema_definition", "split") and k not in FILLED_ARGS}
    try:
        if name in FACTORY_PLANS:
            parse_factory_args(checked)
        elif name in FEDSR_PLANS:
            parse_fedsr_args(checked)
        elif schema is not None:
            parse_plan_args(checked, schema)
        else:  # the schema's own problem is reported above; check the rest without its class names
            validate_plan_args(PlanArgs, checked, PLAN_ARG_KEYS, context={"schema": None})
    except InvalidPlanArgs as exc:
        problems += [PlanArgsError(key.removeprefix("plan_args."), problem) for key, problem in exc.problems]
    if problems:
        return {}, problems
    out = {k: v for k, v in args.items() if k != "schema"}
    out["schema_definition"] = raw
    return out, []
