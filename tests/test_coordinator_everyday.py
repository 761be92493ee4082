"""Issue 17 case 12 (coordinator side): `status` without a home says where it looked, the
testbed ends with where to look at its run, `evaluate` shows progress also in a log file, and
run.log is plain text without Fed-BioMed's per-iteration chatter."""

import logging
import re

import pytest
from conftest import cli
from test_evaluate_run import organs_only, run_dir  # noqa: F401 - a scored run and an out-of-federation set

from coordinator import runs

ANSI = re.compile(r"\x1b\[")


def test_status_without_a_home_says_where_it_looked(tmp_path):
    missing = tmp_path / "no-such-home"
    res = cli("coordinator", "status", "--home", missing)
    assert res.returncode == 2, res.stdout
    err = res.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"coordinator home {missing} does not exist" in err and "--home" in err and "FEDIMG_COORDINATOR_HOME" in err
    assert "coordinator run" in err  # how to get one
    assert not missing.exists()  # looking does not create it
    res = cli("coordinator", "results", "some-run", "--home", missing)
    assert res.returncode == 2 and "does not exist" in res.stderr
    missing.mkdir()  # an empty home is fine
    res = cli("coordinator", "status", "--home", missing)
    assert res.returncode == 0 and "no runs yet" in res.stdout


@pytest.fixture
def fbm_logger(tmp_path, monkeypatch):
    """Fed-BioMed's researcher logger with a run.log handler, as the engine sets it up."""
    # importing Fed-BioMed's researcher creates its component folder: here, not in the checkout
    monkeypatch.setenv("FBM_RESEARCHER_COMPONENT_ROOT", str(tmp_path / "researcher"))
    from fedbiomed.common.logger import logger

    inner = getattr(logger, "_logger", logging.getLogger("fedbiomed"))
    log_dir = tmp_path / "run"
    log_dir.mkdir()
    handler = runs.run_log_handler(log_dir)
    old_level = inner.level
    inner.setLevel(logging.DEBUG)
    inner.addHandler(handler)
    yield inner, log_dir / "run.log"
    inner.removeHandler(handler)
    handler.close()
    inner.setLevel(old_level)


def test_run_log_is_plain_text_and_keeps_only_what_matters(fbm_logger, tmp_path):
    from fedbiomed.researcher.monitor import Monitor
    from fedbiomed.researcher.requests import Requests

    inner, path = fbm_logger
    monitor = Monitor(str(tmp_path / "monitor"))
    n_iterations = 200
    for i in range(1, n_iterations + 1):  # what a tiny run's sites send: progress every iteration
        monitor._log_metric_result({
            "train": True, "test_on_global_updates": False, "metric": {"Loss": 0.5}, "batch_samples": 1,
            "total_samples": 8, "node_id": "NODE_a", "node_name": "site-1", "epoch": None, "iteration": i,
            "num_batches": n_iterations, "num_samples_trained": i,
        })  # fmt: skip
        Requests.print_node_log_message({"level": "DEBUG", "node_id": "NODE_a", "msg": '{"message": "batch done"}'})
    Requests.print_node_log_message({"level": "ERROR", "node_id": "NODE_a", "msg": '{"message": "dataset x: not found\\nsecond"}'})
    inner.info("Sampled nodes in round 1 ['NODE_a']")  # one line per round: kept
    inner.warning("[fedimg] round 1/1: 1 site(s), 200 updates")
    inner.warning("[fedimg] plan source sent to the sites for approval:\n%s", "class Plan:\n    pass")
    inner.warning("\033[1;33mheartbeat late\033[0m\n\t\t\t\t\t from NODE_a")
    for _ in range(30):  # Fed-BioMed's approval poll warns every second per site: written once a minute
        inner.warning("Training plan has NOT been approved by the node: NODE_a.Training plan status : Pending")

    text = path.read_text(encoding="utf-8")
    assert not ANSI.search(text), text[:500]
    lines = text.splitlines()
    assert len(lines) < 10, text[:2000]  # 200 iterations x (7 + 4) lines before
    assert "site NODE_a: ERROR: dataset x: not found" in text and "\n    second" in text
    assert "[fedimg] round 1/1: 1 site(s), 200 updates" in text and "INFO Sampled nodes in round 1 ['NODE_a']" in text
    assert "[fedimg] plan source sent to the sites for approval:\nclass Plan:\n    pass" in text  # code stays as written
    assert re.search(r"WARNING heartbeat late from NODE_a$", text, re.M), text
    assert text.count("has NOT been approved by the node: NODE_a") == 1
    assert "batch done" not in text and "Iteration" not in text


def test_run_log_keeps_everything_when_asked(fbm_logger, monkeypatch, tmp_path):
    from fedbiomed.researcher.requests import Requests

    monkeypatch.setenv("FEDIMG_RUN_LOG", "all")
    inner, _ = fbm_logger
    log_dir = tmp_path / "verbose"
    log_dir.mkdir()
    handler = runs.run_log_handler(log_dir)
    inner.addHandler(handler)
    try:
        Requests.print_node_log_message({"level": "DEBUG", "node_id": "NODE_b", "msg": '{"message": "batch done"}'})
    finally:
        inner.removeHandler(handler)
        handler.close()
    text = (log_dir / "run.log").read_text()
    assert "site NODE_b: DEBUG: batch done" in text and not ANSI.search(text)


def test_testbed_ends_with_where_to_look(tmp_path):
    from coordinator.testbed import Testbed

    bed = Testbed(tmp_path / "bed", 2, port=1)
    assert "no run was recorded" in bed.next_steps()[0]
    made_run = runs.new_run(bed.home, "name: x\n", "x")
    runs.mark(made_run, "done")
    (made_run / "report").mkdir()
    (made_run / "report" / "index.html").write_text("<html></html>")
    lines = bed.next_steps()
    text = "\n".join(lines)
    assert lines[0] == f"run {made_run.name}: done (coordinator home {bed.home})"
    assert f"coordinator results {made_run.name} --home {bed.home}" in text
    assert f"coordinator status --home {bed.home}" in text
    assert f"report: {made_run / 'report' / 'index.html'}" in text


def test_plain_progress_prints_first_last_and_at_intervals(monkeypatch):
    from coordinator.commands import evaluation as coordinator_cli

    clock = iter([0.0, 1.0, 2.0, 11.0, 12.0, 13.0])
    said = []
    progress = coordinator_cli._plain_progress(said.append, every_s=10.0, clock=lambda: next(clock))
    for done in range(1, 7):
        progress("global", done, 6)
    # 3 cases in the 11 s after the first report: about 7 s for the last 2
    assert said == ["scoring global: 1/6 cases", "scoring global: 4/6 cases, 11 s, about 7 s left", "scoring global: 6/6 cases, 13 s"]


def test_evaluate_shows_progress_when_not_on_a_terminal(run_dir, organs_only):  # noqa: F811
    home = run_dir.parent.parent
    res = cli("coordinator", "evaluate", run_dir.name, "--home", home, "--data", organs_only)  # stderr is a pipe here
    assert res.returncode == 0, res.stderr
    err = res.stderr
    assert not ANSI.search(err)
    assert re.search(r"^\[\d\d:\d\d:\d\d\] organs-only: preprocessing 2 labelled cases", err, re.M), err
    assert "preprocessing: 1/2 cases" in err and "preprocessing: 2/2 cases" in err
    assert "model 1/2: global (best, round 1)" in err and "scoring global: 2/2 cases" in err
    assert "scoring local:site-a: 2/2 cases" in err
