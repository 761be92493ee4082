"""The published JSON Schemas of the experiment spec and the site config (`coordinator schema spec|site`).

They are what editors check YAML files against as people type, so: the committed copies in
docs/schemas/ are what the command prints, the shipped examples pass them, and a file the
models refuse for a type or an unknown key is refused by the schema too.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from coordinator import spec as spec_mod
from coordinator.cli import cli
from fedimg_core.config_types import integer, json_schema, matches, number, one_of, strings
from fedimg_core.errors import ConfigError
from site_agent import config as site_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in resources.files("coordinator").joinpath("examples").iterdir() if p.name.endswith(".yaml"))


def _printed(which: str) -> str:
    res = CliRunner().invoke(cli, ["schema", which])
    assert res.exit_code == 0, res.output
    return res.output


def _validator(which: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(_printed(which))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("which", ["spec", "site"])
def test_committed_schemas_are_what_the_command_prints(which):
    committed = (ROOT / "docs" / "schemas" / f"{which}.schema.json").read_text(encoding="utf-8")
    assert committed == _printed(which), (
        f"docs/schemas/{which}.schema.json is stale: regenerate it with `.venv/bin/coordinator schema {which} > docs/schemas/{which}.schema.json`"
    )


@pytest.mark.parametrize("which, title", [("spec", "fedimg experiment spec"), ("site", "fedimg site config")])
def test_schema_is_draft_2020_12_with_id_title_and_described_keys(which, title):
    schema = json.loads(_printed(which))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].startswith("urn:fedimg:schema:") and schema["title"] == title and schema["description"]
    sections = [schema, *schema["$defs"].values()]
    for section in sections:
        for key, prop in section["properties"].items():
            assert prop.get("description"), (which, key)


def test_unknown_schema_name_is_refused():
    res = CliRunner().invoke(cli, ["schema", "specs"])
    assert res.exit_code == 2 and "'specs' is not one of" in res.output


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_pass_the_spec_schema(example):
    raw = yaml.safe_load(resources.files("coordinator").joinpath("examples", example).read_text(encoding="utf-8"))
    _validator("spec").validate(raw)
    spec_mod.validate(raw, example)  # and the model


GOOD_SPEC = {"name": "t1", "plan": "marginal", "sites": {"tags": ["demo"], "min_sites": 2}, "rounds": 10, "local_steps": 10}


@pytest.mark.parametrize(
    "change",
    [
        {"roundz": 3},  # unknown key
        {"sites": {"tags": ["demo"], "min_site": 2}},  # unknown nested key
        {"approval": {"request": True, "wait": 3}},
        {"server_optimizer": {"name": "adam", "beta": 0.9}},
        {"rounds": "3"},  # types: no silent coercion
        {"rounds": True},
        {"rounds": 0},
        {"rounds": 2.5},
        {"test_ratio": "0.25"},
        {"test_ratio": 2},
        {"split": {"validation": "0.2"}},
        {"split": {"validation": 0.2, "tests": 0.2}},
        {"split": {"seed": -1}},
        {"split": 0.2},
        {"weights": "mean"},
        {"aggregator": "median"},
        {"mode": "solo"},
        {"plan": "marginl"},
        {"name": "bad name"},
        {"sites": "demo"},
        {"sites": {"tags": "demo"}},
        {"sites": {"tags": []}},
        {"sites": {"tags": [""]}},
        {"approval": {"request": "yes"}},
        {"optimizer": {"lr": -1}},
        {"optimizer": [0.001]},
        {"plan_args": [1]},
        {"seed": -1},
    ],
)
def test_what_the_spec_model_refuses_for_type_or_key_the_schema_refuses(change):
    raw = {**GOOD_SPEC, **change}
    with pytest.raises(spec_mod.SpecError):
        spec_mod.validate(raw, "exp.yaml")
    assert list(_validator("spec").iter_errors(raw)), change


def test_required_spec_keys_are_required_by_the_schema():
    validator = _validator("spec")
    for key in ("name", "plan", "sites", "rounds"):
        raw = {k: v for k, v in GOOD_SPEC.items() if k != key}
        assert list(validator.iter_errors(raw)), key
        with pytest.raises(spec_mod.SpecError, match=f"{key}: required"):
            spec_mod.validate(raw, "exp.yaml")
    assert not list(validator.iter_errors(GOOD_SPEC))


def test_site_config_written_by_the_agent_passes_the_site_schema(tmp_path, site_yaml):
    cfg = site_config.validate({**site_yaml, "registry": {"url": "http://coord:8750", "token_file": str(tmp_path / "t")}}, "t")
    cfg.save(tmp_path / "site.yaml")
    _validator("site").validate(yaml.safe_load((tmp_path / "site.yaml").read_text()))


@pytest.mark.parametrize(
    "change",
    [
        {"colour": "blue"},
        {"site_name": "Bad Name"},
        {"coordinator": {"host": "h", "port": "50051"}},
        {"coordinator": {"host": "h", "port": 70000}},
        {"coordinator": {"host": "h"}},
        {"runtime": "k8s"},
        {"docker": {"restart": "sometimes"}},
        {"docker": {"tag": "x"}},
        {"registry": {"token_file": "/t"}},
        {"registry": "http://coord"},
        {"config_version": "1"},
    ],
)
def test_what_the_site_model_refuses_for_type_or_key_the_schema_refuses(site_yaml, change):
    raw = {**site_yaml, **change}
    with pytest.raises(ConfigError):
        site_config.validate(raw, "site.yaml")
    assert list(_validator("site").iter_errors(raw)), change


def test_field_types_word_their_problem_and_state_their_constraints():
    from typing import Annotated

    from fedimg_core.config import ConfigModel, validate_config

    class Example(ConfigModel):
        count: Annotated[int, integer(1, 9)] = 1
        share: Annotated[float, number(0, 0.9)] = 0.5
        rate: Annotated[float, number(positive=True)] = 1.0
        kind: Annotated[str, one_of("alpha", "beta")] = "alpha"
        name: Annotated[str, matches(r"^[a-z]+$", "lower-case letters")] = "x"
        tags: Annotated[list[str], strings()] = []

    bad = {"count": True, "share": 2, "rate": 0, "kind": "alpah", "name": "X", "tags": ["a", ""]}
    with pytest.raises(ConfigError) as info:
        validate_config(Example, bad, where="e.yaml")
    assert dict(info.value.problems) == {
        "count": "must be an integer in [1, 9] (got True)",
        "share": "must be in [0, 0.9] (got 2)",
        "rate": "must be > 0 (got 0)",
        "kind": "must be one of alpha, beta (got 'alpah'); did you mean 'alpha'?",
        "name": "must be lower-case letters (got 'X')",
        "tags": "must be a list of non-empty strings (got ['a', ''])",
    }
    with pytest.raises(ConfigError, match="share: must be a finite number"):
        validate_config(Example, {"share": float("nan")}, where="e.yaml")
    props = json_schema(Example, schema_id="urn:x", title="x", description="x")["properties"]
    assert props["count"] == {"default": 1, "minimum": 1, "maximum": 9, "type": "integer"}
    assert props["share"]["minimum"] == 0 and props["share"]["maximum"] == 0.9 and props["rate"]["exclusiveMinimum"] == 0
    assert props["kind"]["enum"] == ["alpha", "beta"] and props["name"]["pattern"] == "^[a-z]+$"
    assert props["tags"]["items"] == {"type": "string", "minLength": 1}
