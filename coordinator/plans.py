"""Registry of training plans a spec can name, and the check of their arguments.

Values are import paths, resolved lazily (importing a plan imports Fed-BioMed).

Segmentation plans take the federation label schema from ``plan_args.schema``: a built-in
name (``abdominal-ct``: preprocessing/schemas/<name>.yaml), a path to a schema file
(relative to the spec file), or the schema itself as a mapping. The coordinator embeds the
schema's content in the model arguments it sends (``schema_definition``), so every site
uses exactly the researcher's class ids, groups, spacing and intensity rules.
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PLANS: dict[str, str] = {
    "condistfl": "pipelines.plans.condistfl:ConDistFLPlan",
    "marginal": "pipelines.plans.marginal:MarginalSegmentationPlan",
    "data_factory": "pipelines.plans.data_factory:DataFactoryPlan",
}
SEGMENTATION_PLANS = ("condistfl", "marginal")
FACTORY_PLANS = ("data_factory",)
# filled in by the coordinator from the spec, the run and the connected sites
FILLED_ARGS = ("rounds_total", "local_steps", "run_id", "client_ids")


class PlanArgsError(ValueError):
    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


def resolve(name: str):
    module, _, attr = PLANS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def builtin_schemas() -> list[str]:
    folder = resources.files("preprocessing").joinpath("schemas")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def resolve_schema(value: Any, base_dir: Path | None) -> tuple[dict, str]:
    """(raw schema mapping, where it came from) for ``plan_args.schema``."""
    from preprocessing.schema import SchemaError, parse_schema

    if isinstance(value, dict):
        raw, source = value, "plan_args.schema (inline)"
    elif isinstance(value, str) and value:
        if value in builtin_schemas():
            path = Path(str(resources.files("preprocessing").joinpath("schemas", f"{value}.yaml")))
        else:
            path = Path(value).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            if not path.is_file():
                raise PlanArgsError(
                    "schema", f"{value!r} is neither a built-in schema ({', '.join(builtin_schemas())}) nor a schema file"
                )
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
        raise PlanArgsError("schema", str(exc)) from None
    return raw, source


def model_args_for(name: str, args: dict, base_dir: Path | None = None) -> dict:
    """The model arguments sent to the sites, checked before anything is sent.

    Raises PlanArgsError(key, problem) naming the plan_args key."""
    if name not in SEGMENTATION_PLANS + FACTORY_PLANS:
        return dict(args)
    from pipelines.factory.training import parse_factory_args
    from pipelines.training import parse_plan_args
    from preprocessing.schema import parse_schema

    if "schema_definition" in args:
        raise PlanArgsError("schema_definition", "is filled in by the coordinator; name the schema with plan_args.schema")
    for key in FILLED_ARGS:
        if key in args:
            raise PlanArgsError(key, "is filled in by the coordinator from the spec (rounds, local_steps), the run and the sites")
    raw, source = resolve_schema(args.get("schema", "abdominal-ct"), base_dir)
    schema = parse_schema(raw, source)
    out = {k: v for k, v in args.items() if k != "schema"}
    try:
        if name in FACTORY_PLANS:
            parse_factory_args(out)
        else:
            parse_plan_args(out, schema)
    except ValueError as exc:
        msg = str(exc)
        key, _, problem = msg.partition(": ")
        raise PlanArgsError(key.removeprefix("plan_args."), problem or msg) from None
    out["schema_definition"] = raw
    return out
