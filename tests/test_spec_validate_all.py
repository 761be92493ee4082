"""Issue 17 cases 2 and 11: a spec's problems are all reported at once, risky values warned
about, and a submitted spec can neither blow up the coordinator (alias bombs, huge input,
errors echoing the input) nor make it read its own files."""

import time

import pytest
import yaml
from conftest import cli

from coordinator import spec as spec_mod

GOOD = """\
name: t1
plan: marginal
sites: {tags: [demo], min_sites: 2}
rounds: 10
local_steps: 10
"""


def test_six_typos_give_six_errors_in_one_run(tmp_path):
    path = tmp_path / "typos.yaml"
    path.write_text(
        "name: typos\nplan: condistfl\n"
        "sites: {tags: [demo], min_site: 2}\n"  # 1: sites.min_site
        "roundz: 3\n"  # 2: roundz (and no separate "rounds: required")
        "local_step: 10\n"  # 3
        "optimiser: {lr: 0.001}\n"  # 4
        "test_ratio: 0.25\n"
        "plan_args: {roi_sise: [32, 32, 32], netwrk: {name: mednext}}\n"  # 5, 6
    )
    res = cli("coordinator", "validate", path)
    assert res.returncode == 2, res.stdout + res.stderr
    err = res.stderr
    assert "Traceback" not in err
    assert "6 problems" in err, err
    expected = {
        "sites.min_site": "did you mean 'min_sites'",
        "roundz": "did you mean 'rounds'",
        "local_step": "did you mean 'local_steps'",
        "optimiser": "did you mean 'optimizer'",
        "plan_args.roi_sise": "did you mean 'roi_size'",
        "plan_args.netwrk": "did you mean 'network'",
    }
    lines = [line.strip() for line in err.splitlines()[1:]]
    assert len(lines) == 6, err
    for key, hint in expected.items():
        assert any(line.startswith(f"{path}: {key}: unknown key") and hint in line for line in lines), (key, err)


def test_independent_value_errors_are_all_listed():
    text = GOOD.replace("rounds: 10", "rounds: 0") + "aggregator: median\nsplit: {validation: 2}\ntest_ratio: 2\napproval: {request: maybe}\n"
    with pytest.raises(spec_mod.SpecError) as info:
        spec_mod.parse(text, "exp.yaml")
    keys = [key for key, _ in info.value.problems]
    assert keys == ["rounds", "aggregator", "split.validation", "test_ratio", "approval.request"], info.value
    assert str(info.value).startswith("exp.yaml: 5 problems")
    assert all(f"exp.yaml: {k}: " in str(info.value) for k in keys)


def test_risky_values_are_warned_about_not_refused(tmp_path):
    path = tmp_path / "risky.yaml"
    path.write_text(GOOD.replace("min_sites: 2", "min_sites: 1").replace("rounds: 10", "rounds: 2")
                    + "split: {validation: 0, test: 0}\noptimizer: {lr: 5.0}\n")  # fmt: skip
    res = cli("coordinator", "validate", path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert f"warning: {path}: split.validation: no validation cases: no Dice per round and no best-model selection" in out, out
    assert f"warning: {path}: rounds: 2 rounds x 10 local_steps = 20 updates" in out
    assert f"warning: {path}: optimizer.lr: 5 is outside" in out
    assert f"warning: {path}: sites.min_sites: 1" in out
    assert "ok: t1" in out
    quiet = spec_mod.parse(GOOD, "good.yaml")
    assert quiet.warnings == []


def _bomb(levels: int, width: int = 10) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + f"\nname: *a{levels - 1}\nplan: marginal\nsites: {{tags: [demo]}}\nrounds: 1\n"


def test_alias_bomb_is_refused_quickly_with_a_short_error():
    text = _bomb(6)  # a few hundred bytes expanding to a million values
    assert len(text) < 600
    start = time.monotonic()
    with pytest.raises(spec_mod.SpecError) as info:
        spec_mod.parse(text, "submitted spec")
    assert time.monotonic() - start < 5
    msg = str(info.value)
    assert msg.startswith("submitted spec: has more than 20000 values once YAML aliases are expanded"), msg
    assert len(msg) < 500
    # aliases within the limit still work
    s = spec_mod.parse(GOOD.replace("name: t1", "name: &n demo").replace("[demo]", "[*n]"), "x")
    assert s.site_tags == ["demo"] and s.name == "demo"


@pytest.mark.parametrize("depth", [40, 3000])
def test_deeply_nested_spec_is_refused_with_a_spec_error(depth):
    text = '{"name": ' + "[" * depth + "]" * depth + "}"  # JSON is YAML
    with pytest.raises(spec_mod.SpecError, match=f"submitted spec: is nested more than {spec_mod.MAX_YAML_DEPTH} levels deep"):
        spec_mod.parse(text, "submitted spec")


def test_errors_never_echo_a_large_value_whole():
    big = "x" * 5000
    with pytest.raises(spec_mod.SpecError) as info:
        spec_mod.parse(GOOD.replace("name: t1", f"name: {big}") + f"mode: {big}\n{'k' * 900}: 1\n", "submitted spec")
    msg = str(info.value)
    assert len(msg) < 1500 and big not in msg and "k" * 900 not in msg, len(msg)
    assert "name: must be 1-64" in msg and "mode: must be one of" in msg and "unknown key" in msg


def test_many_problems_are_capped():
    text = GOOD + "".join(f"extra{i}: 1\n" for i in range(500))
    with pytest.raises(spec_mod.SpecError) as info:
        spec_mod.parse(text, "s")
    msg = str(info.value)
    assert msg.startswith("s: 500 problems") and f"and {500 - spec_mod.MAX_LISTED} more" in msg
    assert len(msg.splitlines()) == spec_mod.MAX_LISTED + 2


def test_oversized_spec_is_refused_before_parsing(tmp_path):
    text = GOOD + "# " + "x" * spec_mod.MAX_SPEC_BYTES + "\n"
    with pytest.raises(spec_mod.SpecError, match="a spec is at most"):
        spec_mod.parse(text, "submitted spec")
    path = tmp_path / "huge.yaml"
    path.write_text(text)
    with pytest.raises(spec_mod.SpecError, match="huge.yaml: .* a spec is at most"):
        spec_mod.load(path)


def _secret_schema(tmp_path):
    path = tmp_path / "private" / "secret.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"format": "fedimg-label-schema", "name": "s", "version": "1.0.0", "SECRET_KEY_4711": 1}))
    return path


def test_submitted_spec_cannot_name_schema_files(tmp_path, monkeypatch):
    secret = _secret_schema(tmp_path)
    text = GOOD + f"plan_args: {{schema: {secret}}}\n"
    with pytest.raises(spec_mod.SpecError) as info:
        spec_mod.parse(text, "submitted spec")
    msg = str(info.value)
    assert "plan_args.schema:" in msg and "a submitted spec cannot name files" in msg, msg
    assert "SECRET_KEY_4711" not in msg
    monkeypatch.chdir(secret.parent)  # nor relative to the server's working directory
    with pytest.raises(spec_mod.SpecError, match="cannot name files"):
        spec_mod.parse(GOOD + "plan_args: {schema: secret.yaml}\n", "submitted spec")
    # what the HTTP service does with a submitted body
    from coordinator.service import Coordinator

    with pytest.raises(spec_mod.SpecError, match="cannot name files"):
        Coordinator(tmp_path / "home", federation=None).submit(text)
    assert not (tmp_path / "home" / "runs").exists()
    # a spec file on the researcher's own machine may still name a schema file next to it
    spec_file = tmp_path / "exp.yaml"
    spec_file.write_text(GOOD + "plan_args: {schema: private/secret.yaml}\n")
    with pytest.raises(spec_mod.SpecError, match=r"exp.yaml: plan_args.schema[.:].*secret.yaml"):
        spec_mod.load(spec_file)  # read, and its problems shown, for the researcher's own file


def test_rules_across_keys_run_beside_the_problems_of_other_keys():
    # rounds is invalid, but the batch_size and clients_per_round rules read only plan and their own key
    text = GOOD.replace("rounds: 10", "rounds: 0") + "batch_size: 3\nclients_per_round: 2\nplan_args: {roi_sise: [32, 32, 32]}\n"
    with pytest.raises(spec_mod.SpecError) as info:
        spec_mod.parse(text, "exp.yaml")
    keys = [key for key, _ in info.value.problems]
    assert keys == ["rounds", "batch_size", "clients_per_round", "plan_args.roi_sise"], info.value
    # a rule whose key is invalid stays quiet: only the key's own problem is listed
    with pytest.raises(spec_mod.SpecError) as info:
        spec_mod.parse(GOOD + "batch_size: two\n", "exp.yaml")
    assert info.value.problems == [("batch_size", "must be an integer >= 1 (got 'two')")]


def test_spec_error_is_a_config_error_naming_file_and_first_key():
    from fedimg_core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        spec_mod.parse(GOOD.replace("plan: marginal", "plan: marginl"), "exp.yaml")
    assert isinstance(info.value, spec_mod.SpecError)
    assert info.value.file == "exp.yaml" and info.value.key == "plan"
    assert str(info.value) == "exp.yaml: plan: unknown plan 'marginl'; did you mean 'marginal'? (known: condistfl, data_factory, fedsr, marginal)"


def test_plan_dependent_defaults():
    seg = spec_mod.parse(GOOD, "x")
    assert (seg.batch_size, seg.split, seg.weights, seg.clients_per_round, seg.optimizer) == (
        1,
        {"validation": 0.2, "test": 0.2, "seed": 0},
        "samples",
        None,
        {"lr": 1e-3},
    )
    factory = "name: f\nplan: data_factory\nsites: {tags: [demo], ids: [N1, N2, N3]}\nrounds: 4\n"
    s = spec_mod.parse(factory, "x")
    assert (s.batch_size, s.split, s.weights, s.clients_per_round, s.optimizer, s.min_sites) == (
        8,
        {"validation": 0.0, "test": 0.0, "seed": 0},
        "equal",
        2,
        {"lr": 0.002},
        3,
    )
    assert spec_mod.parse(factory + "clients_per_round: null\n", "x").clients_per_round is None  # every site each round
    assert spec_mod.parse(GOOD + "optimizer: {lr: 0.01, weight_decay: 0.1, amsgrad: true}\n", "x").optimizer == {
        "lr": 0.01,
        "weight_decay": 0.1,
        "amsgrad": True,
    }
