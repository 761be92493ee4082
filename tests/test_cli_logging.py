"""Logging of both CLIs (`fedimg_core.logs`): -v adds debug lines, -q keeps warnings and errors
only, records off a terminal are plain one-line text on stderr (no colour codes), and a
command's result stays alone on stdout."""

import json
import logging
import re
import subprocess

import nibabel as nib
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import cli, write_untrained_target_model
from rich.logging import RichHandler

from coordinator import runs
from coordinator.cli import cli as coordinator_cli
from fedimg_core import logs
from fedimg_testing.phantom import make_phantom
from site_agent.cli import cli as site_cli

ANSI = re.compile(r"\x1b\[")
STAMP = r"\[\d\d:\d\d:\d\d\] "


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    logs.teardown_logging()


# -- the setup -------------------------------------------------------------------------------


def test_plain_records_are_one_line_each_without_colour(capsys):
    logs.setup_logging(logs.NORMAL, terminal=False)
    ours, other = logging.getLogger("coordinator.some_module"), logging.getLogger("some_library")
    ours.info("hello %s", "there")
    ours.debug("a detail")
    ours.warning("careful")
    other.info("library chatter")
    other.warning("library warns")
    err = capsys.readouterr().err
    assert not ANSI.search(err)
    lines = err.splitlines()
    assert re.fullmatch(STAMP + "hello there", lines[0]), lines
    assert re.fullmatch(STAMP + "warning: careful", lines[1]), lines
    # other libraries (pydicom, nibabel, ...) repeat what fedimg reports in its own words: -v shows them
    assert len(lines) == 2 and "detail" not in err and "chatter" not in err and "library warns" not in err

    logging.getLogger("coordinator.some_module").setLevel(logging.DEBUG)  # as caplog.at_level or a library may
    try:
        ours.debug("a lowered logger's detail")
        assert "detail" not in capsys.readouterr().err
    finally:
        logging.getLogger("coordinator.some_module").setLevel(logging.NOTSET)

    logs.setup_logging(logs.VERBOSE, terminal=False)
    other.warning("library warns")
    other.info("library chatter")
    err = capsys.readouterr().err
    assert re.fullmatch(STAMP + "warning: some_library: library warns", err.strip()), err


def test_verbose_adds_debug_lines_and_quiet_keeps_warnings_only(capsys):
    ours = logging.getLogger("site_agent.some_module")
    logs.setup_logging(logs.VERBOSE, terminal=False)
    ours.debug("a detail")
    ours.info("a step")
    err = capsys.readouterr().err
    assert re.search("^" + STAMP + "debug: site_agent.some_module: a detail$", err, re.M) and "a step" in err
    assert logs.verbosity_args() == ["-v"] and logs.show_progress()

    logs.setup_logging(logs.QUIET, terminal=False)  # a second setup replaces the first: one line per record
    ours.debug("a detail")
    ours.info("a step")
    ours.error("it broke")
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and re.fullmatch(STAMP + "error: it broke", err.strip())
    assert logs.verbosity_args() == ["-q"] and not logs.show_progress()


def test_a_terminal_gets_the_rich_handler_and_teardown_restores_logging():
    before = list(logging.getLogger().handlers)
    logs.setup_logging(logs.NORMAL, terminal=True)
    added = [h for h in logging.getLogger().handlers if h not in before]
    assert len(added) == 1 and isinstance(added[0], RichHandler) and added[0].console is logs.stderr_console()
    logs.teardown_logging()
    assert logging.getLogger().handlers == before
    assert logging.getLogger("coordinator").level == logging.NOTSET and logs.verbosity() == logs.NORMAL


def test_fedbiomed_records_take_the_same_route(capsys, monkeypatch):
    fbm = logging.getLogger(logs.FEDBIOMED_LOGGER)
    monkeypatch.setattr(fbm, "propagate", False)  # as Fed-BioMed sets it
    monkeypatch.setattr(fbm, "level", logging.WARNING)
    logs.setup_logging(logs.NORMAL, terminal=False)
    logs.route_fedbiomed()
    fbm.info("per-iteration chatter")
    fbm.warning("node X: training failed")
    fbm.warning("[fedimg] a line the engine mirrors into run.log")  # already shown by our own logger
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and re.fullmatch(STAMP + "warning: fedbiomed: node X: training failed", err.strip())

    logs.setup_logging(logs.VERBOSE, terminal=False)  # -v: Fed-BioMed's debug lines too
    fbm.debug("wire bytes")
    assert re.search("^" + STAMP + "debug: fedbiomed: wire bytes$", capsys.readouterr().err, re.M)


# -- coordinator -----------------------------------------------------------------------------


def _stale_run(home):
    """A run left 'running' by a process that is gone: `status` shows it interrupted and says so (writing nothing)."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    run_dir = runs.new_run(home, "name: x\n", "x")
    runs.mark(run_dir, "running", pid=gone.pid)
    return run_dir.name


def test_coordinator_verbosity_options(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    runner = CliRunner()  # stdout and stderr are not terminals here: plain records

    run_id = _stale_run(home)
    res = runner.invoke(coordinator_cli, ["status", "--home", str(home), "--json"])
    assert res.exit_code == 0, res.output
    assert [r["status"] for r in json.loads(res.stdout)] == ["interrupted"]  # stdout: the result only, pure JSON
    assert re.search("^" + STAMP + f"run {run_id}: its coordinator process is gone", res.stderr, re.M), res.stderr
    assert "debug" not in res.stderr and not ANSI.search(res.stdout + res.stderr)

    run_id = _stale_run(home)
    res = runner.invoke(coordinator_cli, ["-v", "status", "--home", str(home)])
    assert res.exit_code == 0, res.output
    assert re.search("^" + STAMP + f"debug: coordinator.cli: coordinator home: {re.escape(str(home.resolve()))}$", res.stderr, re.M), res.stderr
    assert f"run {run_id}: its coordinator process is gone" in res.stderr and not ANSI.search(res.stdout + res.stderr)

    _stale_run(home)
    res = runner.invoke(coordinator_cli, ["--quiet", "status", "--home", str(home)])
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    assert "interrupted" in res.stdout

    res = runner.invoke(coordinator_cli, ["-v", "-q", "status", "--home", str(home)])
    assert res.exit_code == 2 and "--verbose and --quiet exclude each other" in res.stderr


def test_coordinator_console_script_is_quiet_with_q_and_plain_off_a_terminal(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    run_id = _stale_run(home)
    res = cli("coordinator", "-q", "status", "--home", home)
    assert res.returncode == 0 and res.stderr == "" and run_id in res.stdout
    res = cli("coordinator", "--verbose", "status", "--home", home)
    assert res.returncode == 0 and re.search("^" + STAMP + "debug: coordinator.cli: coordinator home", res.stderr, re.M), res.stderr
    assert not ANSI.search(res.stdout + res.stderr)


def test_coordinator_help_documents_the_options():
    text = CliRunner().invoke(coordinator_cli, ["--help"]).output
    assert "-v, --verbose" in text and "-q, --quiet" in text


# -- site-agent ------------------------------------------------------------------------------


def test_site_agent_verbosity_options(tmp_path):
    model = write_untrained_target_model(tmp_path / "model.pt")
    vol = make_phantom(5, "portal_venous", (32, 32, 8), (6.0, 6.0, 10.0))
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.hu.astype(np.float32), np.diag([6.0, 6.0, 10.0, 1.0])), nifti)
    runner = CliRunner()  # not a terminal: plain records, no progress bars

    def infer(*flags, out):
        return runner.invoke(site_cli, [*flags, "infer", str(nifti), "--model", str(model), "--out", str(tmp_path / out), "--modality", "CT", "--json"])

    res = infer(out="a")
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)  # stdout: the result only, pure JSON
    assert re.search("^" + STAMP + f"ct: {re.escape(row['label'])}$", res.stderr, re.M), res.stderr
    assert "debug" not in res.stderr and not ANSI.search(res.stdout + res.stderr)

    res = infer("-v", out="b")
    assert res.exit_code == 0, res.output
    assert re.search("^" + STAMP + "debug: site_agent.adapt: model .*model.pt: target model of classes background, kidney, liver", res.stderr, re.M), res.stderr
    assert not ANSI.search(res.stdout + res.stderr)

    res = infer("-q", out="c")
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    assert json.loads(res.stdout)[0]["label"].endswith("ct.nii.gz")


def test_site_agent_console_script_debug_and_quiet(tmp_path, site_yaml):
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump(site_yaml))
    res = cli("site-agent", "-v", "--config", cfg, "logs")
    assert res.returncode == 0, res.stderr
    assert re.search("^" + STAMP + f"debug: site_agent.cli: site config {re.escape(str(cfg))}: site site-a", res.stderr, re.M), res.stderr
    assert not ANSI.search(res.stdout + res.stderr)
    res = cli("site-agent", "--config", cfg, "-q", "logs")
    assert res.returncode == 0 and res.stderr == "", res.stderr


def test_site_agent_help_documents_the_options():
    text = CliRunner().invoke(site_cli, ["--help"]).output
    assert "-v, --verbose" in text and "-q, --quiet" in text
