"""Config error messages stay at least as clear as before the typed configs (issue 18 review).

Each test states the message as the code before issue 18 (commit 31c97db) gave it; they fail on
3031af5 and pass once the message is again at least as clear (file, key path, problem, what is allowed).
"""

import json

import pytest
import yaml

from coordinator.spec import SpecError, parse
from fedimg_testing.synthetic import write_synthetic_dataset
from preprocessing.dataset import DatasetError, load_dataset
from preprocessing.schema import SchemaError, builtin_schema_path, parse_schema

SPEC = {
    "name": "x",
    "plan": "condistfl",
    "sites": {"tags": ["a"], "min_sites": 2},
    "rounds": 10,
    "local_steps": 80,
    "plan_args": {"schema": "abdominal-ct", "roi_size": [32, 32, 32]},
}


def _spec_error(spec: dict) -> str:
    with pytest.raises(SpecError) as info:
        parse(yaml.safe_dump(spec, sort_keys=False), "spec.yaml")
    return str(info.value)


def test_plan_args_unknown_key_does_not_offer_what_the_coordinator_fills_in():
    # before: "plan_args.zzzz: unknown key (allowed: schema, network, ..., keep_optimizer_state)";
    # now the list also offers rounds_total, local_steps, run_id, which the same check then refuses.
    message = _spec_error({**SPEC, "plan_args": {**SPEC["plan_args"], "zzzz": 1}})
    assert "plan_args.zzzz: unknown key" in message
    for filled in ("rounds_total", "run_id", "client_ids"):
        assert filled not in message, message


def test_inline_schema_problems_keep_their_key_paths_one_per_line():
    # before: "plan_args.schema: plan_args.schema (inline): nam: unknown key (did you mean 'name'?)";
    # now every problem of the schema is flattened into one line, its source repeated five times.
    schema = yaml.safe_load(builtin_schema_path("abdominal-ct").read_text())
    schema["nam"] = schema.pop("name")
    schema.pop("version")
    message = _spec_error({**SPEC, "plan_args": {**SPEC["plan_args"], "schema": schema}})
    assert "did you mean 'name'" in message
    assert message.count("(inline)") <= 1, message


def test_label_schema_without_format_names_the_format():
    # before: "format: must be 'fedimg-label-schema', got None"; now "format: required".
    raw = yaml.safe_load(builtin_schema_path("abdominal-ct").read_text())
    raw.pop("format")
    with pytest.raises(SchemaError, match="fedimg-label-schema"):
        parse_schema(raw, "schema.yaml")


def test_spec_with_a_non_string_key_says_unknown_key():
    # before: "12345: unknown key; allowed: aggregator, approval, ..."; now "[12345]: Keys should be strings (got 12345)".
    message = _spec_error({**SPEC, 12345: 1})
    assert "unknown key" in message and "Keys should be" not in message, message


@pytest.mark.parametrize("cases", ["x", {"a": 1}])
def test_damaged_manifest_is_described_in_fedimg_words(tmp_path, cases):
    # before: "'cases' must be a non-empty list"; now "cases: Input should be a valid list (got 'x')".
    write_synthetic_dataset(tmp_path / "ds", seed=1, n_cases=1, shape=(8, 8, 8))
    path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["cases"] = cases
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "ds")
    assert "cases" in str(info.value) and "Input should" not in str(info.value), str(info.value)
