import pytest

from coordinator import spec as spec_mod
from coordinator.testbed import default_spec_text

GOOD = """
name: t1
plan: marginal
sites: {tags: [demo], min_sites: 2}
rounds: 2
"""


def test_builtin_demo_spec_is_valid():
    s = spec_mod.parse(default_spec_text(), "demo")
    assert s.plan == "condistfl" and s.rounds >= 2
    assert s.model_args["schema_definition"]["name"] == "abdominal-ct"


def test_defaults_and_training_args():
    s = spec_mod.parse(GOOD, "good.yaml")
    assert s.site_tags == ["demo"] and s.min_sites == 2
    args = s.training_args()
    assert args["num_updates"] == s.local_steps
    # segmentation plans: one whole volume per step (patches are drawn from it), whole volumes to validate
    assert args["loader_args"]["batch_size"] == s.batch_size == 1 and args["test_batch_size"] == 1
    margs = s.experiment_model_args()
    assert margs["rounds_total"] == 2 and margs["local_steps"] == s.local_steps and "schema" not in margs
    assert "fedprox_mu" not in args
    s2 = spec_mod.parse(GOOD + "fedprox_mu: 0.01\n", "x")
    assert s2.training_args()["fedprox_mu"] == 0.01


@pytest.mark.parametrize(
    "extra, message",
    [
        ("rounds: 0\n", "rounds: must be an integer >= 1"),
        ("roundz: 3\n", "roundz: unknown key; did you mean 'rounds'"),
        ("aggregator: median\n", "aggregator: must be one of"),
        ("server_optimizer: {name: sgd}\n", "server_optimizer.name: must be one of momentum, adam, yogi"),
        ("server_optimizer: [momentum]\n", "server_optimizer: must be a mapping with keys"),
        (
            "server_optimizer: {name: momentum, lr: 1.0, beta_1: 0.6}\n",
            r"server_optimizer: unknown argument\(s\) beta_1 for momentum \(it takes lr, momentum\)",
        ),
        ("server_optimizer: {name: momentum, lr: 1.0, beta: 0.6}\n", "server_optimizer.beta: unknown key; did you mean 'beta_"),
        ("test_ratio: 2\n", r"test_ratio: must be in \[0, 0.9\]"),
        ("split: {validation: 2}\n", r"split.validation: must be in \[0, 0.9\]"),
        ("weights: mean\n", "weights: must be one of samples, equal"),
        ("approval: {request: maybe}\n", "approval.request"),
        ("batch_size: 2\n", "batch_size: must be 1 for marginal"),
        ("mode: solo\n", "mode: must be one of federated, standalone"),
    ],
)
def test_bad_values_name_file_and_key(extra, message):
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith(extra.split(":")[0] + ":")) + "\n" + extra
    with pytest.raises(spec_mod.SpecError, match=message):
        spec_mod.parse(text, "exp.yaml")
    try:
        spec_mod.parse(text, "exp.yaml")
    except spec_mod.SpecError as exc:
        assert str(exc).startswith("exp.yaml: ")


def test_unknown_plan_suggests_the_close_one():
    with pytest.raises(spec_mod.SpecError, match="did you mean 'marginal'"):
        spec_mod.parse(GOOD.replace("plan: marginal", "plan: marginl"), "x")


def test_sites_are_selected_by_tags_optionally_narrowed_by_ids():
    s = spec_mod.parse(GOOD.replace("{tags: [demo], min_sites: 2}", "{tags: [a], ids: [NODE_1, NODE_2]}"), "x")
    assert s.site_tags == ["a"] and s.site_ids == ["NODE_1", "NODE_2"] and s.min_sites == 2
    with pytest.raises(spec_mod.SpecError, match="sites.tags: required"):
        spec_mod.parse(GOOD.replace("{tags: [demo], min_sites: 2}", "{ids: [NODE_1]}"), "x")
    with pytest.raises(spec_mod.SpecError, match="required"):
        spec_mod.parse("name: a\nplan: marginal\nrounds: 1\n", "x")


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(spec_mod.SpecError, match="not valid YAML"):
        spec_mod.parse("name: [", "x")
    with pytest.raises(spec_mod.SpecError, match="spec file not found"):
        spec_mod.load(tmp_path / "missing.yaml")


def test_server_optimizer_builds_fedopt_momentum():
    from coordinator.engine import _server_optimizer

    s = spec_mod.parse(GOOD + "server_optimizer: {name: momentum, lr: 1.0, momentum: 0.6}\n", "x")
    opt = _server_optimizer(s)
    assert opt is not None
    assert spec_mod.parse(GOOD, "x").server_optimizer is None


def test_plan_args_are_checked_before_anything_is_sent():
    with pytest.raises(spec_mod.SpecError, match=r"x: plan_args.num_classes: comes from the schema"):
        spec_mod.parse(GOOD + "plan_args: {num_classes: 3}\n", "x")
    with pytest.raises(spec_mod.SpecError, match="plan_args.roi_size: must have 3 entries for a 3D network"):
        spec_mod.parse(GOOD + "plan_args: {roi_size: [32, 32]}\n", "x")
    with pytest.raises(spec_mod.SpecError, match="plan_args.schema: 'nope' is neither a built-in schema"):
        spec_mod.parse(GOOD + "plan_args: {schema: nope}\n", "x")


def test_schema_file_is_found_next_to_the_spec_and_inlined_for_remote_runs(tmp_path):
    from importlib import resources

    schema_text = resources.files("preprocessing").joinpath("schemas", "abdominal-ct.yaml").read_text()
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "mine.yaml").write_text(schema_text.replace("name: abdominal-ct", "name: my-federation"))
    spec_file = tmp_path / "exp.yaml"
    spec_file.write_text(GOOD + "plan_args: {schema: schemas/mine.yaml}\n")
    s = spec_mod.load(spec_file)
    assert s.model_args["schema_definition"]["name"] == "my-federation"
    # what `submit` sends and a run directory keeps: the schema itself, not a path on this machine
    assert s.resolved_raw()["plan_args"]["schema"]["name"] == "my-federation"
    again = spec_mod.validate(s.resolved_raw(), "resolved", base_dir=None)
    assert again.model_args == s.model_args
    with pytest.raises(spec_mod.SpecError, match=r"exp.yaml: plan_args.schema: .*classes"):
        (tmp_path / "schemas" / "mine.yaml").write_text("format: fedimg-label-schema\nname: x\nversion: 1.0.0\n")
        spec_mod.load(spec_file)


def test_standalone_mode_has_no_server_side():
    assert spec_mod.parse(GOOD + "mode: standalone\n", "x").mode == "standalone"
    with pytest.raises(spec_mod.SpecError, match="mode: standalone runs have no aggregation"):
        spec_mod.parse(GOOD + "mode: standalone\nserver_optimizer: {name: momentum, lr: 1.0, momentum: 0.6}\n", "x")
