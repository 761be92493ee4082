"""Segmentation plan arguments: pipelines.training.parse_plan_args (node side) and
coordinator.plans.model_args_for / resolve_schema (coordinator side, schema embedding)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from coordinator.plans import PlanArgsError, builtin_schemas, model_args_for, resolve_schema
from pipelines.splits import SplitSettings
from pipelines.training import DEFAULTS, PLAN_ARG_KEYS, SegmentationSettings, parse_plan_args
from preprocessing.schema import DEFAULT_SCHEMA, load_schema, parse_schema

TINY_2D = {"name": "mednext", "size": "tiny", "spatial_dims": 2}


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def _error(args, schema) -> str:
    with pytest.raises(ValueError) as info:
        parse_plan_args(args, schema)
    return str(info.value)


# --------------------------------------------------------------------------- parse_plan_args


def test_defaults(schema):
    s = parse_plan_args({}, schema)
    assert isinstance(s, SegmentationSettings)
    assert s.schema is schema and s.num_classes == 8
    assert s.network == {"name": "mednext", "spatial_dims": 3, "size": "tiny", "in_channels": 1, "deep_supervision": False}
    assert s.spatial_dims == 3
    assert s.roi_size == (32, 32, 32) and s.inference_roi == (32, 32, 32)
    assert s.patches_per_volume == 2
    assert s.spacing == "schema"
    assert s.temperature == 0.5
    assert s.lambda_range == (0.01, 1.0)
    assert s.lr_schedule == "cosine"
    assert s.augment is True
    assert s.overlap == 0.25 and s.sw_batch_size == 2
    assert s.rounds_total is None and s.local_steps is None
    assert s.split is None  # an older coordinator sent no split: the site keeps its old rule (test_ratio = validation)
    assert DEFAULTS["roi_size"] == 32  # the module's documented defaults are what comes back


def test_all_keys_given(schema):
    args = {
        "network": {"name": "dynunet", "size": "tiny", "deep_supervision": True},
        "roi_size": [16, 24, 8],
        "patches_per_volume": 4,
        "spacing": [0.8, 0.8, 2],
        "temperature": 2,
        "lambda": [0, 3],
        "lr_schedule": "constant",
        "augment": False,
        "inference": {"overlap": 0.5, "sw_batch_size": 8},
        "rounds_total": 10,
        "local_steps": 25,
    }
    before = copy.deepcopy(args)
    s = parse_plan_args(args, schema)
    assert args == before, "the arguments are not modified"
    assert s.network["name"] == "dynunet" and s.network["deep_supervision"] is True
    assert s.roi_size == (16, 24, 8)
    assert s.patches_per_volume == 4
    assert s.spacing == (0.8, 0.8, 2.0) and all(isinstance(v, float) for v in s.spacing)
    assert s.temperature == 2.0 and isinstance(s.temperature, float)
    assert s.lambda_range == (0.0, 3.0)
    assert s.lr_schedule == "constant" and s.augment is False
    assert s.overlap == 0.5 and s.sw_batch_size == 8
    assert s.rounds_total == 10 and s.local_steps == 25


def test_schema_keys_are_accepted_and_ignored(schema):
    s = parse_plan_args({"schema": "abdominal-ct", "schema_definition": {"anything": 1}}, schema)
    assert s.schema is schema


@pytest.mark.parametrize("network,roi,expected", [(None, 48, (48, 48, 48)), (TINY_2D, 32, (32, 32)), (TINY_2D, [48, 16], (48, 16))])
def test_roi_size_int_expands_to_the_network_dims(schema, network, roi, expected):
    args = {"roi_size": roi} if network is None else {"roi_size": roi, "network": network}
    s = parse_plan_args(args, schema)
    assert s.roi_size == expected
    assert s.spatial_dims == len(expected)
    assert s.inference_roi == (expected if len(expected) == 3 else (*expected, 1))


def test_roi_with_the_wrong_number_of_entries_names_roi_size(schema):
    msg = _error({"network": TINY_2D, "roi_size": [32, 32, 32]}, schema)
    assert msg == "plan_args.roi_size: must have 2 entries for a 2D network (got [32, 32, 32])"
    msg = _error({"roi_size": [32, 32]}, schema)  # 3D default network, 2 entries
    assert msg == "plan_args.roi_size: must have 3 entries for a 3D network (got [32, 32])"


@pytest.mark.parametrize("roi", [4, [32, 32, 4], "32", 32.0, True, [32, 32, None], {"x": 32}])
def test_bad_roi_size(schema, roi):
    assert _error({"roi_size": roi}, schema).startswith("plan_args.roi_size: must be an integer or a list of integers >= 8")


def test_roi_that_does_not_fit_the_network_is_rejected(schema):
    msg = _error({"roi_size": 30}, schema)  # mednext tiny needs multiples of 16
    assert msg.startswith("plan_args.") and "roi_size [30, 30, 30] does not fit mednext" in msg
    assert "nearest valid roi_size: [32, 32, 32]" in msg


def test_unknown_key_with_did_you_mean(schema):
    msg = _error({"roi_sise": 32}, schema)
    assert msg == "plan_args.roi_sise: unknown key; did you mean 'roi_size'?"
    msg = _error({"temprature": 1.0}, schema)
    assert msg.startswith("plan_args.temprature: unknown key; did you mean 'temperature'?")


def test_unknown_key_without_close_match_lists_allowed_keys(schema):
    msg = _error({"zzz": 1}, schema)
    assert msg.startswith("plan_args.zzz: unknown key (allowed: ")
    # by the coordinator (split: from the spec's top-level `split`): never advertised as plan_args keys
    filled_in = ("schema_definition", "rounds_total", "local_steps", "run_id", "split", "aggregator", "device", "transfer")
    for key in PLAN_ARG_KEYS:
        assert (key in msg) != (key in filled_in), key


def test_num_classes_is_rejected(schema):
    assert _error({"num_classes": 8}, schema) == "plan_args.num_classes: comes from the schema"
    # also when other keys are wrong too: the schema remark comes first
    assert _error({"zzz": 1, "num_classes": 8}, schema) == "plan_args.num_classes: comes from the schema"


def test_network_errors_name_the_network_key(schema):
    assert _error({"network": {"name": "unet"}}, schema).startswith("plan_args.network.name: unknown network 'unet'")
    assert _error({"network": {"name": "mednext", "size": "huge"}}, schema).startswith("plan_args.network.size: unknown size")
    assert _error({"network": {"name": "mednext", "out_channels": 8}}, schema).startswith("plan_args.network.out_channels: not allowed")
    assert _error({"network": "mednext"}, schema).startswith("plan_args.network: network must be a mapping")


def test_default_network_is_tiny_mednext(schema):
    assert parse_plan_args({"network": None}, schema).network["name"] == "mednext"
    assert parse_plan_args({"network": {}}, schema).network["name"] == "mednext"
    named = parse_plan_args({"network": {"name": "basic_unet"}}, schema).network
    assert named["name"] == "basic_unet" and named["size"] == "tiny"


def test_partial_network_mapping_keeps_the_default_backbone(schema):
    assert parse_plan_args({"network": {"size": "tiny"}}, schema).network["name"] == "mednext"


def test_spacing(schema):
    assert parse_plan_args({"spacing": "native"}, schema).spacing is None
    assert parse_plan_args({"spacing": "schema"}, schema).spacing == "schema"
    assert parse_plan_args({"spacing": [1, 1.5, 3]}, schema).spacing == (1.0, 1.5, 3.0)
    assert parse_plan_args({"spacing": (2, 2, 2)}, schema).spacing == (2.0, 2.0, 2.0)
    for bad in ("iso", [1, 1], [1, 1, 0], [1, -1, 1], [1, 1, "2"], [1, True, 1], None, 1.5):
        msg = _error({"spacing": bad}, schema)
        assert msg.startswith("plan_args.spacing: must be 'schema', 'native' or three positive numbers in mm"), bad


def test_lambda(schema):
    assert parse_plan_args({"lambda": [0.5, 0.5]}, schema).lambda_range == (0.5, 0.5)
    assert parse_plan_args({"lambda": (1, 0)}, schema).lambda_range == (1.0, 0.0)
    for bad in (0.5, [0.1], [0.1, 0.2, 0.3], [-0.1, 1], [0, 101], [0, "1"], [False, 1], "0.01,1"):
        assert _error({"lambda": bad}, schema).startswith("plan_args.lambda: must be [start, end]"), bad


def test_lr_schedule_and_augment(schema):
    assert parse_plan_args({"lr_schedule": "constant"}, schema).lr_schedule == "constant"
    for bad in ("step", "Cosine", None, 1):
        assert _error({"lr_schedule": bad}, schema).startswith("plan_args.lr_schedule: must be 'cosine' or 'constant'")
    assert parse_plan_args({"augment": False}, schema).augment is False
    for bad in ("yes", 1, 0, None):
        assert _error({"augment": bad}, schema).startswith("plan_args.augment: must be true or false")


def test_mirror_axes(schema):
    assert parse_plan_args({}, schema).mirror_axes is None  # every axis, nnU-Net's mirroring
    assert parse_plan_args({"mirror_axes": []}, schema).mirror_axes == ()  # no flips: lateral anatomy
    assert parse_plan_args({"mirror_axes": [2, 1]}, schema).mirror_axes == (2, 1)
    for bad in ([0, 0], [3], [-1], "0", [1.5], [True]):
        assert _error({"mirror_axes": bad}, schema).startswith("plan_args.mirror_axes: must be a list of distinct axes 0-2")
    two_d = {"network": {"name": "basic_unet", "spatial_dims": 2}, "roi_size": [32, 32]}
    assert parse_plan_args({**two_d, "mirror_axes": [1]}, schema).mirror_axes == (1,)
    assert _error({**two_d, "mirror_axes": [2]}, schema).startswith("plan_args.mirror_axes: a 2D network's patches have axes 0-1")


def test_inference(schema):
    s = parse_plan_args({"inference": {"overlap": 0.0}}, schema)
    assert s.overlap == 0.0 and s.sw_batch_size == 2  # the missing key keeps its default
    s = parse_plan_args({"inference": {"sw_batch_size": 1}}, schema)
    assert s.overlap == 0.25 and s.sw_batch_size == 1
    assert parse_plan_args({"inference": None}, schema).overlap == 0.25
    assert _error({"inference": {"overlp": 0.5}}, schema).startswith("plan_args.inference: must be a mapping with overlap and/or sw_batch_size")
    for bad in ({"overlap": 0.95}, {"overlap": -0.1}, {"overlap": "0.5"}, {"sw_batch_size": 0}, {"sw_batch_size": 2.0},
                {"sw_batch_size": True}, {"overlap": float("nan")}):  # fmt: skip
        msg = _error({"inference": bad}, schema)
        assert "overlap" in msg or "sw_batch_size" in msg


def test_inference_value_errors_name_the_inference_key(schema):
    assert _error({"inference": {"overlap": 0.95}}, schema).startswith("plan_args.inference")


@pytest.mark.parametrize("bad", [0.5, "fast", [0.5, 2]])
def test_inference_not_a_mapping(schema, bad):
    assert _error({"inference": bad}, schema).startswith("plan_args.inference")


def test_numbers(schema):
    assert parse_plan_args({"patches_per_volume": 64}, schema).patches_per_volume == 64
    for bad in (0, 65, 2.0, True, "2"):
        assert _error({"patches_per_volume": bad}, schema).startswith("plan_args.patches_per_volume: must be"), bad
    assert parse_plan_args({"temperature": 0.001}, schema).temperature == 0.001
    for bad in (0, 1e-4, 101, float("inf"), float("nan"), "1", None):
        assert _error({"temperature": bad}, schema).startswith("plan_args.temperature: must be"), bad
    for key in ("rounds_total", "local_steps"):
        assert getattr(parse_plan_args({key: 3}, schema), key) == 3
        for bad in (0, -1, 2.5, True, "3"):
            assert _error({key: bad}, schema) == f"plan_args.{key}: must be a positive integer (got {bad!r})"


def test_split_from_the_coordinator(schema):
    s = parse_plan_args({"split": {"validation": 0.25, "test": 0.25, "seed": 3}}, schema)
    assert s.split == SplitSettings(validation=0.25, test=0.25, seed=3)
    assert parse_plan_args({"split": {"test": 0.1}}, schema).split == SplitSettings(validation=0.2, test=0.1, seed=0)
    assert parse_plan_args({"split": None}, schema).split is None


@pytest.mark.parametrize(
    "split, message",
    [
        ({"validation": 1.2}, "plan_args.split.validation: must be a number in [0, 1) (got 1.2)"),
        ({"test": "0.2"}, "plan_args.split.test: must be a number in [0, 1) (got '0.2')"),
        ({"seed": -1}, "plan_args.split.seed: must be an integer >= 0 (got -1)"),
        ({"validation": 0.5, "test": 0.5}, "plan_args.split: validation + test must be below 1 so that some cases train (got 1)"),
        ({"ratio": 0.2}, "plan_args.split: unknown key(s) ratio (known: validation, test, seed)"),
        (0.2, "plan_args.split: must be a mapping with validation, test and/or seed (got 0.2)"),
        ({1: 0.2}, "plan_args.split: must be a mapping with validation, test and/or seed (got {1: 0.2})"),
    ],
)
def test_bad_split_names_its_key(schema, split, message):
    assert _error({"split": split}, schema) == message


def test_not_a_mapping(schema):
    assert _error([("roi_size", 32)], schema) == "plan_args: must be a mapping"


def test_every_error_message_names_its_key(schema):
    cases = {
        "roi_size": {"roi_size": 2},
        "spacing": {"spacing": "x"},
        "lambda": {"lambda": [1]},
        "lr_schedule": {"lr_schedule": "x"},
        "augment": {"augment": "x"},
        "inference": {"inference": {"x": 1}},
        "patches_per_volume": {"patches_per_volume": 0},
        "temperature": {"temperature": 0},
        "rounds_total": {"rounds_total": 0},
        "local_steps": {"local_steps": 0},
        "network": {"network": {"name": "x"}},
    }
    for key, args in cases.items():
        assert _error(args, schema).startswith((f"plan_args.{key}: ", f"plan_args.{key}.")), key


# --------------------------------------------------------------------------- resolve_schema / model_args_for

SMALL_SCHEMA = {
    "format": "fedimg-label-schema",
    "name": "liver-only",
    "version": "2.1.0",
    "classes": {"background": 0, "liver": 1, "liver_tumor": 2},
    "groups": {"liver": ["liver_tumor"]},
    "target_spacing": [1.0, 1.0, 2.0],
}


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def _plan_error(name, args, base_dir=None) -> PlanArgsError:
    with pytest.raises(PlanArgsError) as info:
        model_args_for(name, args, base_dir)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err) == f"{err.key}: {err.problem}"
    return err


def test_builtin_schemas():
    assert "abdominal-ct" in builtin_schemas()


@pytest.mark.parametrize("plan", ["condistfl", "marginal"])
def test_model_args_embed_the_default_schema(plan):
    args = {"roi_size": 32, "lambda": [0.01, 1.0]}
    out = model_args_for(plan, args)
    assert "schema" not in out
    definition = out["schema_definition"]
    assert isinstance(definition, dict)
    assert definition["classes"] == load_schema().classes
    assert definition == yaml.safe_load(DEFAULT_SCHEMA.read_text(encoding="utf-8"))
    assert out["roi_size"] == 32 and out["lambda"] == [0.01, 1.0]
    assert args == {"roi_size": 32, "lambda": [0.01, 1.0]}, "the caller's dict is not modified"
    # what the node does on arrival: parse the embedded schema, then the same args
    settings = parse_plan_args(out, parse_schema(definition, "<sent>"))
    assert settings.num_classes == 8 and settings.roi_size == (32, 32, 32)


@pytest.mark.parametrize("plan", ["condistfl", "marginal"])
def test_model_args_builtin_schema_by_name(plan):
    args = {"schema": "abdominal-ct", "roi_size": [32, 16, 16]}
    out = model_args_for(plan, args)
    assert "schema" not in out and args["schema"] == "abdominal-ct"
    assert out["schema_definition"]["name"] == "abdominal-ct"
    assert out["schema_definition"]["classes"]["spleen"] == 7
    assert out == model_args_for("condistfl", {"schema": "abdominal-ct", "roi_size": [32, 16, 16]})


def test_condistfl_and_marginal_give_the_same_model_args(tmp_path):
    _write(tmp_path / "liver.yaml", SMALL_SCHEMA)
    args = {"schema": "liver.yaml", "roi_size": [32, 16, 16], "augment": False}
    assert model_args_for("condistfl", args, tmp_path) == model_args_for("marginal", args, tmp_path)
    for bad in ({"roi_size": 4}, {"nope": 1}, {"schema": "missing.yaml"}):
        assert _plan_error("condistfl", bad, tmp_path).key == _plan_error("marginal", bad, tmp_path).key


def test_schema_file_relative_to_base_dir(tmp_path, monkeypatch):
    spec_dir = tmp_path / "spec"
    _write(spec_dir / "schemas" / "liver.yaml", SMALL_SCHEMA)
    monkeypatch.chdir(tmp_path)  # not the spec's folder: the path resolves against base_dir
    out = model_args_for("condistfl", {"schema": "schemas/liver.yaml"}, spec_dir)
    assert out["schema_definition"] == SMALL_SCHEMA
    assert out["schema_definition"]["classes"] == {"background": 0, "liver": 1, "liver_tumor": 2}
    raw, source = resolve_schema("schemas/liver.yaml", spec_dir)
    assert raw == SMALL_SCHEMA and Path(source) == spec_dir / "schemas" / "liver.yaml"
    # absolute paths work with any base_dir
    assert model_args_for("condistfl", {"schema": str(spec_dir / "schemas" / "liver.yaml")}, tmp_path / "x") == out
    # without base_dir a relative path is relative to the working directory
    monkeypatch.chdir(spec_dir)
    assert model_args_for("condistfl", {"schema": "schemas/liver.yaml"}, None) == out


def test_inline_schema_mapping():
    out = model_args_for("condistfl", {"schema": SMALL_SCHEMA})
    assert out["schema_definition"] == SMALL_SCHEMA
    raw, source = resolve_schema(SMALL_SCHEMA, None)
    assert raw is SMALL_SCHEMA and source == "plan_args.schema (inline)"


def test_resolve_builtin_schema_source():
    raw, source = resolve_schema("abdominal-ct", None)
    assert Path(source).name == "abdominal-ct.yaml" and Path(source).is_file()
    assert parse_schema(raw, source).num_classes == 8


def test_missing_schema_file(tmp_path):
    err = _plan_error("condistfl", {"schema": "nowhere.yaml"}, tmp_path)
    assert err.key == "schema"
    assert "'nowhere.yaml' is neither a built-in schema (abdominal-ct" in err.problem
    (tmp_path / "adir").mkdir()
    assert _plan_error("condistfl", {"schema": "adir"}, tmp_path).key == "schema"


@pytest.mark.parametrize(
    "content,fragment",
    [
        ({**SMALL_SCHEMA, "classes": {"liver": 1}}, "classes"),  # no background
        ({**SMALL_SCHEMA, "format": "other"}, "format"),
        ({**SMALL_SCHEMA, "colour": "red"}, "colour"),
        ({**SMALL_SCHEMA, "groups": {"kidney": []}}, "groups.kidney"),
        ("classes: [unclosed\n", "cannot read"),  # invalid YAML
        ("just a string\n", "expected a schema mapping at the top level"),
    ],
)
def test_bad_schema_file(tmp_path, content, fragment):
    path = _write(tmp_path / "bad.yaml", content)
    err = _plan_error("condistfl", {"schema": "bad.yaml"}, tmp_path)
    assert err.key == "schema"
    assert fragment in err.problem
    assert str(path) in err.problem, "the message names the file"


def test_empty_schema_file(tmp_path):
    _write(tmp_path / "empty.yaml", "")
    assert _plan_error("condistfl", {"schema": "empty.yaml"}, tmp_path).key == "schema"


def test_non_utf8_schema_file(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01 not text")
    assert _plan_error("condistfl", {"schema": "binary.yaml"}, tmp_path).key == "schema"


@pytest.mark.parametrize("value", ["", 5, None, ["abdominal-ct"]])
def test_schema_value_of_the_wrong_kind(value):
    err = _plan_error("condistfl", {"schema": value})
    assert err.key == "schema" and err.problem.startswith("required: a built-in schema name (abdominal-ct")


def test_bad_inline_schema():
    err = _plan_error("condistfl", {"schema": {**SMALL_SCHEMA, "version": "one"}})
    assert err.key == "schema" and "plan_args.schema (inline)" in err.problem and "version" in err.problem


def test_plan_arg_errors_carry_the_key():
    err = _plan_error("condistfl", {"roi_size": 4})
    assert err.key == "roi_size" and err.problem.startswith("must be an integer or a list of integers >= 8")
    err = _plan_error("condistfl", {"roi_sise": 32})
    assert err.key == "roi_sise" and "did you mean 'roi_size'?" in err.problem
    assert _plan_error("condistfl", {"lambda": [1]}).key == "lambda"
    assert _plan_error("condistfl", {"network": {"name": "x"}}).key == "network.name"
    assert _plan_error("condistfl", {"num_classes": 3}).key == "num_classes"


def test_roi_dims_mismatch_has_key_roi_size():
    err = _plan_error("condistfl", {"network": TINY_2D, "roi_size": [32, 32, 32]})
    assert err.key == "roi_size" and err.problem == "must have 2 entries for a 2D network (got [32, 32, 32])"


def test_roi_that_does_not_fit_the_network_has_a_plan_args_key():
    err = _plan_error("condistfl", {"roi_size": 30})
    assert err.key in ("roi_size", "network") and "roi_size [30, 30, 30] does not fit" in err.problem


def test_schema_definition_is_refused():
    err = _plan_error("condistfl", {"schema_definition": {"classes": {}}})
    assert err.key == "schema_definition" and "filled in by the coordinator" in err.problem
    assert _plan_error("marginal", {"schema": "abdominal-ct", "schema_definition": {}}).key == "schema_definition"


def test_plan_args_are_checked_against_the_named_schema(tmp_path):
    # a 3-class schema: the node would build 3 output channels; the args themselves are unchanged
    _write(tmp_path / "liver.yaml", SMALL_SCHEMA)
    out = model_args_for("condistfl", {"schema": "liver.yaml", "spacing": "native"}, tmp_path)
    settings = parse_plan_args(out, parse_schema(out["schema_definition"], "<sent>"))
    assert settings.num_classes == 3 and settings.spacing is None


def test_other_plans_pass_their_args_through():
    args = {"anything": [1, 2], "schema": 5, "schema_definition": "x"}
    out = model_args_for("some_other_plan", args)
    assert out == args and out is not args


def test_gin_is_a_plan_option_for_every_segmentation_plan():
    from pipelines.training import parse_plan_args
    from preprocessing.schema import load_schema

    schema = load_schema()
    assert parse_plan_args({}, schema).gin is None
    s = parse_plan_args({"gin": {"prob": 1.0, "alpha": [0.2, 0.9]}}, schema)
    assert s.gin["prob"] == 1.0 and tuple(s.gin["alpha"]) == (0.2, 0.9) and s.gin["n_layers"] == 4
    assert parse_plan_args({"gin": True}, schema).gin["prob"] == 0.5
    with pytest.raises(ValueError, match=r"plan_args\.gin\.prob"):
        parse_plan_args({"gin": {"prob": 2}}, schema)
    with pytest.raises(ValueError, match=r"plan_args\.gin\.strength: unknown key"):
        parse_plan_args({"gin": {"strength": 1}}, schema)


@pytest.mark.parametrize("example", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "coordinator" / "examples").glob("*.yaml")))
def test_every_example_spec_is_valid(example):
    from coordinator import spec as spec_mod

    path = Path(__file__).resolve().parents[1] / "coordinator" / "examples" / example
    s = spec_mod.load(path)
    out = model_args_for(s.plan, dict(s.plan_args), path.parent)
    assert "schema_definition" in out


def test_cross_modality_example_turns_gin_on_and_the_schema_has_both_modalities():
    from coordinator import spec as spec_mod

    path = Path(__file__).resolve().parents[1] / "coordinator" / "examples" / "phantom_cross_modality.yaml"
    s = spec_mod.load(path)
    settings = parse_plan_args({k: v for k, v in s.plan_args.items() if k != "schema"}, load_schema())
    assert settings.gin is not None and settings.gin["prob"] > 0
    assert {"CT", "MR"} <= set(load_schema().modalities)


def test_predict_classes_are_schema_names():
    schema = load_schema()
    s = parse_plan_args({"predict_classes": ["spleen", "liver", "kidney"]}, schema)
    assert s.predict_classes == tuple(sorted(schema.classes[c] for c in ("spleen", "liver", "kidney")))
    assert parse_plan_args({}, schema).predict_classes is None
    with pytest.raises(ValueError, match=r"plan_args\.predict_classes: 'brain' not foreground classes"):
        parse_plan_args({"predict_classes": ["liver", "brain"]}, schema)
    with pytest.raises(ValueError, match=r"plan_args\.predict_classes: must be a non-empty list"):
        parse_plan_args({"predict_classes": []}, schema)
