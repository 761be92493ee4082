"""Bad input at the coordinator's boundary: one clear line, non-zero exit, no traceback."""

import re
import socket

import pytest
from conftest import cli

GOOD = "name: t\nplan: marginal\nsites: {tags: [nobody], min_sites: 1, wait_s: 1}\nrounds: 1\nplan_args: {schema: abdominal-ct}\n"


LOG_RECORD = re.compile(r"^\[\d\d:\d\d:\d\d\] ")  # a log line off a terminal (fedimg_core.logs)


def _one_clear_line(res, *needles):
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    # stderr also carries the progress of a run that got going (log records, one line each);
    # the error is one line, the last.
    assert all(LOG_RECORD.match(line) for line in lines[:-1]), res.stderr
    err = lines[-1]
    assert err.startswith("coordinator: error"), err
    for n in needles:
        assert n in err, err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broken_spec(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: t\nplan: [unclosed\n")
    _one_clear_line(cli("coordinator", "run", p, "--home", tmp_path / "h"), "broken.yaml: not valid YAML")
    assert not (tmp_path / "h" / "runs").exists()  # nothing created for a refused spec


def test_unknown_plan(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(GOOD.replace("marginal", "condistfl_v9"))
    _one_clear_line(cli("coordinator", "validate", p), "exp.yaml: plan: unknown plan 'condistfl_v9'")


def test_missing_spec_file(tmp_path):
    _one_clear_line(cli("coordinator", "submit", tmp_path / "nope.yaml"), "nope.yaml: spec file not found")


def test_unreachable_coordinator(tmp_path):
    p = tmp_path / "exp.yaml"
    p.write_text(GOOD)
    url = f"http://127.0.0.1:{_closed_port()}"
    res = cli("coordinator", "submit", p, "--url", url, "--token", "x")
    _one_clear_line(res, "cannot reach the coordinator", url)
    _one_clear_line(cli("coordinator", "status", "--url", url, "--token", "x"), "cannot reach the coordinator")


def test_no_site_connects(tmp_path):
    """A run whose sites never show up fails with the reason and is recorded as failed."""
    p = tmp_path / "exp.yaml"
    p.write_text(GOOD)
    res = cli("coordinator", "run", p, "--home", tmp_path / "h", "--grpc-host", "127.0.0.1", "--grpc-port", str(_closed_port()))
    _one_clear_line(res, "only 0 of the 1 required sites", "nobody")
    st = cli("coordinator", "status", "--home", tmp_path / "h", "--json")
    assert '"status": "failed"' in st.stdout


def test_unknown_run(tmp_path):
    _one_clear_line(cli("coordinator", "results", "nope", "--home", tmp_path), "no run 'nope'")


@pytest.mark.parametrize("verb", ["run", "resume", "serve", "submit", "status", "results", "validate", "testbed"])
def test_every_verb_has_help(verb):
    res = cli("coordinator", verb, "--help")
    assert res.returncode == 0 and "Usage:" in res.stdout


def test_runs_module_skips_half_written_breakpoints(tmp_path):
    from coordinator import runs

    run = tmp_path / "r"
    (run / "breakpoint_0000").mkdir(parents=True)
    (run / "breakpoint_0000" / "breakpoint_0000.json").write_text('{"round_current": 1}')
    (run / "breakpoint_0001").mkdir()  # a stop while Fed-BioMed saved it: no JSON yet
    (run / "breakpoint_0002").mkdir()
    (run / "breakpoint_0002" / "breakpoint_0002.json").write_text('{"round_cur')  # cut short
    assert runs.latest_breakpoint(run).name == "breakpoint_0000"
    assert runs.latest_breakpoint(tmp_path / "empty") is None


def test_client_never_invents_a_token(tmp_path, monkeypatch):
    from coordinator.client import client_token
    from site_agent.errors import UserError

    monkeypatch.delenv("FEDIMG_API_TOKEN", raising=False)
    with pytest.raises(UserError, match="no API token"):
        client_token(tmp_path, None)
    assert not (tmp_path / "api-token").exists()
    (tmp_path / "api-token").write_text("abc\n")
    assert client_token(tmp_path, None) == "abc"
    assert client_token(tmp_path, "given") == "given"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--modalities", "CT,PET"], "must be CT and/or MR"),
        (["--classes", "liver,brain"], "not foreground classes of the built-in schema: brain"),
        (["--cases", "4,0"], "must be integers >= 1, comma-separated (got '4,0')"),
        (["--cases", "many"], "must be integers >= 1, comma-separated (got 'many')"),
    ],
)
def test_testbed_refuses_bad_modalities_and_classes_before_starting(tmp_path, args, message):
    res = cli("coordinator", "testbed", "--workdir", tmp_path / "bed", *args)
    assert res.returncode != 0 and message in res.stderr
    assert not (tmp_path / "bed").exists()  # nothing was set up


def test_testbed_cycles_modalities_and_names_datasets_after_them(tmp_path):
    from coordinator.testbed import Testbed

    bed = Testbed(tmp_path, n_sites=3, modalities=["CT", "MR"], classes=["liver"])
    assert [bed.modality(i) for i in range(3)] == ["CT", "MR", "CT"]


def test_testbed_passes_the_cases_per_site_on(tmp_path, monkeypatch):
    """`--cases 10,6` reaches the testbed: sites of 10 and 6 cases, cycled."""
    from click.testing import CliRunner

    from coordinator import testbed as tb
    from coordinator.cli import cli as coordinator_cli

    seen = {}
    monkeypatch.setattr(tb, "run", lambda *args, **kwargs: seen.update(kwargs) or 0)
    res = CliRunner().invoke(coordinator_cli, ["testbed", "--workdir", str(tmp_path / "bed"), "--cases", "10,6"])
    assert res.exit_code == 0, res.output
    assert seen["cases"] == [10, 6]
    # each site's setup gets its count, cycled over the sites
    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        raise RuntimeError("stop after the command is built")

    monkeypatch.setattr(tb.subprocess, "run", fake_run)
    bed = tb.Testbed(tmp_path, n_sites=3, cases=seen["cases"])
    with pytest.raises(RuntimeError, match="stop after"):
        bed.setup_sites()
    counts = {cmd[cmd.index("--name") + 1]: cmd[cmd.index("--cases") + 1] for cmd in commands}
    assert counts == {"site-1": "10", "site-2": "6", "site-3": "10"}
