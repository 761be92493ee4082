"""The ground floor's one set of config field types and one error path (fedimg_core.config / config_types)."""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import pytest

import pipelines.config_fields as compat
from fedimg_core import config, config_types
from fedimg_core.config import ConfigModel, ConfigValueError, check_model, validate_config
from fedimg_core.config_types import integer, integer_list, is_int, is_number, is_plain_name, number, one_of, plain_name
from fedimg_core.errors import ConfigError, FedimgError
from fedimg_core.label_schema import LabelSchemaFile


class Sub(ConfigModel):
    centre: float = 0.0
    scale: float = 1.0


class Fields(ConfigModel):
    count: Annotated[int, integer(1, 10)] = 1
    steps: Annotated[int | None, integer(1, message="must be a positive integer (got {got})", optional=True)] = None
    rate: Annotated[float, number(0.0, 1.0)] = 0.5
    size: Annotated[float | None, number(0, exclusive_minimum=True, optional=True)] = None
    share: Annotated[float, number(0, 1, message="must be a fraction (got {got})")] = 0.0
    widths: Annotated[tuple[int, ...], integer_list(3, 1, 64)] = (1, 2, 3)
    schedule: Annotated[str, one_of("cosine", "constant", message="must be 'cosine' or 'constant' (got {got})")] = "cosine"
    run_id: Annotated[str | None, plain_name(optional=True)] = None
    rules: dict[str, Sub] = {}
    items: list[Sub] = []


def problems(data: dict[str, object]) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        validate_config(Fields, data, where="f.yaml")
    return info.value.problems


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"count": 0}, ("count", "must be an integer in [1, 10] (got 0)")),
        ({"count": True}, ("count", "must be an integer in [1, 10] (got True)")),
        ({"steps": 0}, ("steps", "must be a positive integer (got 0)")),
        ({"rate": "x"}, ("rate", "must be a number in [0, 1] (got 'x')")),
        ({"rate": 2}, ("rate", "must be in [0, 1] (got 2)")),
        ({"rate": math.nan}, ("rate", "must be a finite number (got nan)")),
        ({"size": 0}, ("size", "must be > 0 (got 0)")),
        ({"share": math.inf}, ("share", "must be a fraction (got inf)")),
        ({"widths": [1, 2]}, ("widths", "must be a list of 3 integers in [1, 64] (got 2 entries: [1, 2])")),
        ({"widths": [1, 2, 99]}, ("widths", "must be a list of 3 integers in [1, 64] (got [1, 2, 99])")),
        ({"schedule": "cosin"}, ("schedule", "must be 'cosine' or 'constant' (got 'cosin'); did you mean 'cosine'?")),
        ({"run_id": "../x"}, ("run_id", "must be a plain name: letters, digits, '-', '_', '.' (got '../x')")),
    ],
)
def test_each_field_type_words_its_problem(data: dict[str, object], expected: tuple[str, str]) -> None:
    assert problems(data) == [expected]


def test_optional_fields_take_none_and_numpy_values_become_python_ones() -> None:
    got = Fields.model_validate({"steps": None, "size": None, "count": np.int64(3), "rate": np.float32(0.25), "widths": (np.int32(1), 2, 3)})
    assert got.steps is None and got.size is None
    assert type(got.count) is int and got.count == 3 and type(got.rate) is float and got.rate == 0.25
    assert got.widths == (1, 2, 3) and all(type(w) is int for w in got.widths)


def test_value_predicates() -> None:
    assert is_int(3) and is_int(np.int64(3)) and not is_int(True) and not is_int(np.bool_(True)) and not is_int(3.0)
    assert is_number(1) and is_number(np.float32(0.5)) and not is_number(math.nan) and not is_number(False) and not is_number("1")
    assert is_plain_name("run-1_a.b") and not is_plain_name("..") and not is_plain_name("a/b") and not is_plain_name("")


def test_schema_states_the_constraints() -> None:
    props = Fields.model_json_schema()["properties"]
    assert props["count"]["minimum"] == 1 and props["count"]["maximum"] == 10
    assert props["size"]["anyOf"][0]["exclusiveMinimum"] == 0
    assert props["widths"]["minItems"] == props["widths"]["maxItems"] == 3 and props["widths"]["items"] == {"type": "integer", "minimum": 1, "maximum": 64}
    assert props["schedule"]["enum"] == ["cosine", "constant"]


def test_misspelt_key_inside_a_dict_or_list_of_models_gets_a_suggestion() -> None:
    assert problems({"rules": {"CT": {"centr": 1}}}) == [("rules.CT.centr", "unknown key; did you mean 'centre'?")]
    assert problems({"items": [{"scal": 2}]}) == [("items[0].scal", "unknown key; did you mean 'scale'?")]
    assert problems({"rules": {"CT": {"zzz": 1}}}) == [("rules.CT.zzz", "unknown key; allowed: centre, scale")]


def test_label_schema_modality_key_gets_a_suggestion() -> None:
    data = {"format": "fedimg-label-schema", "modalities": {"CT": {"normalisation": "ct_window", "centr": 1}}}
    with pytest.raises(ConfigError) as info:
        validate_config(LabelSchemaFile, data, where="schema.json")
    assert ("modalities.CT.centr", "unknown key; did you mean 'centre'?") in info.value.problems


def test_check_model_reports_key_paths_inside_the_enclosing_file() -> None:
    with pytest.raises(ConfigValueError) as info:
        check_model(Fields, {"count": 0, "rat": 1}, "plan_args.x", keys=["count", "rate", "hidden"], hidden=["hidden"])
    err = info.value
    assert err.problems == [
        ("plan_args.x.rat", "unknown key; did you mean 'rate'?"),
        ("plan_args.x.count", "must be an integer in [1, 10] (got 0)"),
    ]
    assert str(err).startswith("plan_args.x: 2 problems:\n  plan_args.x.rat:") and err.key == "plan_args.x.rat"
    assert isinstance(err, ValueError) and isinstance(err, FedimgError)
    with pytest.raises(ConfigValueError, match=r"^plan_args.x: must be a mapping \(got list\)$"):
        check_model(Fields, [], "plan_args.x")


def test_pipelines_config_fields_re_exports_the_ground_floor_with_its_older_wording() -> None:
    assert compat.ConfigValueError is config.ConfigValueError and compat.check_model is config.check_model
    assert compat.is_int is config_types.is_int and compat.refuse_unknown_keys is config.refuse_unknown_keys

    class Old(ConfigModel):
        n: Annotated[float, compat.worded_number(0.0, 1.0)] = 0.0
        k: Annotated[int | None, compat.worded_integer(1, 10**9 - 1, optional=True)] = None
        c: Annotated[str, compat.choice(("a", "b"))] = "a"
        w: Annotated[tuple[int, ...], compat.integer_list(lo=1, message="must be a list of positive integers (got {got})")] = (1,)
        r: Annotated[str | None, compat.plain_name()] = None

    with pytest.raises(ConfigError) as info:
        validate_config(Old, {"n": 2, "k": 0, "c": "c", "w": [0], "r": None}, where="o")
    assert info.value.problems == [
        ("n", "must be a finite number in [0.0, 1.0] (got 2)"),
        ("k", "must be an integer in [1, 999999999] (got 0)"),
        ("c", "must be 'a' or 'b' (got 'c')"),
        ("w", "must be a list of positive integers (got [0])"),
    ]
