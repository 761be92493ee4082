"""`coordinator serve` recovers by itself: its queue decisions, and how runs of dead processes show.

No Fed-BioMed here: a fake federation answers `matching_sites` and runs nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator import runs
from coordinator.service import Coordinator, Recovery, recovery_action
from coordinator.testbed import default_spec_text
from fedimg_core.errors import UserError


class FakeFederation:
    """What the queue asks of a Federation: the sites matching a spec, and running a run."""

    address = "localhost:0"

    def __init__(self, sites: int = 0):
        self.sites = sites
        self.searches = 0
        self.ran: list[tuple[str, bool]] = []
        self.outcome: Exception | None = None

    def matching_sites(self, spec) -> dict[str, str]:
        self.searches += 1
        return {f"node-{i}": f"site-{i}" for i in range(self.sites)}

    def run(self, run_dir, spec, resume=False):
        self.ran.append((Path(run_dir).name, resume))
        runs.mark(run_dir, "running", pid=os.getpid(), error=None)
        if self.outcome is not None:
            error_kind = getattr(self.outcome, "error_kind", None)
            runs.mark(run_dir, "failed", error=str(self.outcome), error_kind=error_kind)
            raise self.outcome
        runs.mark(run_dir, "done")
        return {}


class SitesMissing(UserError):
    error_kind = "sites"


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _coordinator(tmp_path, sites=0, **recovery) -> tuple[Coordinator, FakeFederation, Clock]:
    fed, clock = FakeFederation(sites), Clock()
    settings = {"retry_wait_s": 60.0, "sites_poll_s": 15.0, **recovery}
    return Coordinator(tmp_path / "home", fed, Recovery(**settings), clock=clock), fed, clock


def _run(coord: Coordinator, breakpoint_round: int | None = None, **state) -> Path:
    """A run of the serve queue in the given state (runner: serve), optionally with a breakpoint."""
    run_dir = runs.find_run(coord.home, coord.submit(default_spec_text()))
    if breakpoint_round is not None:
        folder = runs.fedbiomed_dir(run_dir) / f"breakpoint_{breakpoint_round:04d}"
        folder.mkdir(parents=True)
        (folder / f"{folder.name}.json").write_text(json.dumps({"round_current": breakpoint_round}))
    runs.update_state(run_dir, **{"runner": "serve", **state})
    return run_dir


def _state(run_dir: Path) -> dict:
    return runs.read_state(run_dir)


@pytest.mark.parametrize(
    ("state", "action"),
    [
        ({"status": "interrupted", "runner": "serve"}, "requeue"),
        ({"status": "interrupted", "runner": "serve", "auto_resumes": 2}, "requeue"),
        ({"status": "interrupted", "runner": "serve", "auto_resumes": 3}, "exhausted"),
        ({"status": "failed", "runner": "serve", "error_kind": "sites"}, "wait_sites"),
        ({"status": "failed", "runner": "serve", "error_kind": "sites", "auto_resumes": 3}, "exhausted"),
        ({"status": "failed", "runner": "serve", "error": "training plan 'x' is not approved by 1 site(s)"}, "none"),
        ({"status": "failed", "runner": "serve", "error_kind": None}, "none"),
        ({"status": "interrupted"}, "none"),  # a run of `coordinator run`: its researcher decides
        ({"status": "done", "runner": "serve"}, "none"),
        ({"status": "queued", "runner": "serve"}, "none"),
        ({"status": "running", "runner": "serve"}, "none"),
    ],
)
def test_recovery_action(state, action):
    assert recovery_action(state, 3)[0] == action


def test_recovery_off_recovers_nothing():
    assert recovery_action({"status": "interrupted", "runner": "serve"}, 0) == ("none", "automatic recovery is off (--max-auto-resumes 0)")


def test_interrupted_run_is_requeued_to_resume_from_its_breakpoint(tmp_path):
    coord, fed, clock = _coordinator(tmp_path)
    run_dir = _run(coord, breakpoint_round=2, status="interrupted")
    assert coord.recover() == [run_dir.name]
    state = _state(run_dir)
    assert (state["status"], state["resume"], state["auto_resumes"]) == ("queued", True, 1)
    assert fed.searches == 0  # an interrupted run does not wait for sites: its run does (wait_for_sites)
    coord.run_one(run_dir)
    assert fed.ran == [(run_dir.name, True)] and _state(run_dir)["status"] == "done"
    assert coord.recover() == []  # a done run stays done


def test_interrupted_run_without_a_breakpoint_starts_again(tmp_path):
    """Nothing was aggregated before round 1 finished: the run starts again in its own directory."""
    coord, fed, _ = _coordinator(tmp_path)
    run_dir = _run(coord, status="interrupted")
    assert coord.recover() == [run_dir.name]
    assert (_state(run_dir)["status"], _state(run_dir)["resume"]) == ("queued", False)
    coord.run_one(run_dir)
    assert fed.ran == [(run_dir.name, False)]


def test_failed_for_sites_waits_until_enough_sites_are_back(tmp_path):
    coord, fed, clock = _coordinator(tmp_path, sites=1)
    run_dir = _run(coord, breakpoint_round=1, status="failed", error_kind="sites", error="only 1 of the 2 required sites")
    assert coord.recover() == [] and fed.searches == 1
    assert coord.recover() == [] and fed.searches == 1  # polled every sites_poll_s, not at every pass
    clock.now += 16
    assert coord.recover() == [] and fed.searches == 2
    assert _state(run_dir)["status"] == "failed"
    fed.sites = 2
    clock.now += 16
    assert coord.recover() == [run_dir.name]
    state = _state(run_dir)
    assert (state["status"], state["resume"], state["auto_resumes"], state["error_kind"]) == ("queued", True, 1, None)


def test_automatic_resumes_are_bounded_and_spaced(tmp_path):
    coord, fed, clock = _coordinator(tmp_path, sites=2, max_auto_resumes=2)
    fed.outcome = SitesMissing("only 1 of the 2 required sites connected")
    run_dir = _run(coord, breakpoint_round=1, status="failed", error_kind="sites")
    for attempt in (1, 2):
        assert coord.recover() == [run_dir.name]
        coord.run_one(run_dir)  # fails again for lack of sites
        state = _state(run_dir)
        assert (state["status"], state["error_kind"], state["auto_resumes"]) == ("failed", "sites", attempt)
        assert coord.recover() == []  # not before retry_wait_s
        clock.now += 61
    assert coord.recover() == []  # exhausted: it stays failed, with a line saying so
    state = _state(run_dir)
    assert state["status"] == "failed" and "2 of 2 automatic resumes used" in state["auto_recovery"]
    assert f"coordinator resume {run_dir.name}" in state["auto_recovery"]
    assert fed.ran == [(run_dir.name, True)] * 2
    # an operator's resume starts a new series
    fed.outcome = None
    coord.resume(run_dir.name)
    state = _state(run_dir)
    assert (state["status"], state["auto_resumes"], state["auto_recovery"]) == ("queued", 0, None)


def test_other_failures_and_foreign_runs_are_left_alone(tmp_path):
    coord, fed, clock = _coordinator(tmp_path, sites=2)
    plan = _run(coord, breakpoint_round=1, status="failed", error="training plan 'x' is not approved by 1 site(s)")
    code = _run(coord, breakpoint_round=1, status="failed", error="ValueError: bad | site errors: a: boom", error_kind=None)
    foreign = _run(coord, breakpoint_round=1, status="interrupted", runner=None)
    before = {d: (d / "state.json").read_text() for d in (plan, code, foreign)}
    assert coord.recover() == []
    assert {d: (d / "state.json").read_text() for d in before} == before
    assert fed.searches == 0


def test_recovery_off(tmp_path):
    coord, fed, _ = _coordinator(tmp_path, sites=2, max_auto_resumes=0)
    run_dir = _run(coord, breakpoint_round=1, status="interrupted")
    assert coord.recover() == [] and _state(run_dir)["status"] == "interrupted"


def test_run_one_marks_the_run_as_the_services(tmp_path):
    coord, fed, _ = _coordinator(tmp_path)
    run_dir = runs.find_run(coord.home, coord.submit(default_spec_text()))
    coord.run_one(run_dir)
    assert _state(run_dir)["runner"] == "serve"


def test_loop_resumes_a_run_its_dead_process_left_running(tmp_path):
    """The whole start: a 'running' run of a dead pid is marked interrupted, re-queued and resumed."""
    coord, fed, _ = _coordinator(tmp_path)
    run_dir = _run(coord, breakpoint_round=1, status="running", pid=_dead_pid(), started=runs._now())

    def stop_after_run(run_dir, spec, resume=False):
        FakeFederation.run(fed, run_dir, spec, resume)
        coord.stopping.set()

    fed.run = stop_after_run  # type: ignore[method-assign]
    coord.loop()
    assert fed.ran == [(run_dir.name, True)]
    state = _state(run_dir)
    assert (state["status"], state["auto_resumes"]) == ("done", 1)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_running_run_of_a_dead_process_shows_interrupted_without_writing(tmp_path):
    home = tmp_path / "home"
    run_dir = runs.new_run(home, default_spec_text(), "demo")
    runs.mark(run_dir, "running", pid=_dead_pid())
    text = (run_dir / "state.json").read_text()
    (row,) = runs.list_runs(home)
    assert row["status"] == "interrupted" and "is gone" in row["error"]
    assert runs.summary(run_dir)["status"] == "interrupted"
    assert (run_dir / "state.json").read_text() == text  # read-only: nothing written
    res = subprocess.run([str(Path(sys.executable).parent / "coordinator"), "status", "--home", str(home), "--json"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)[0]["status"] == "interrupted"
    assert (run_dir / "state.json").read_text() == text
    assert runs.recover_stale(home) == [run_dir.name]  # what serve and resume do: record it
    assert runs.read_state(run_dir)["status"] == "interrupted"


def test_running_run_of_a_live_process_shows_running(tmp_path):
    home = tmp_path / "home"
    run_dir = runs.new_run(home, default_spec_text(), "demo")
    runs.mark(run_dir, "running", pid=os.getpid())
    assert runs.summary(run_dir)["status"] == "running"  # e.g. serve's own API listing its current run
    assert runs.recover_stale(home) == [run_dir.name]  # but at serve's start, its own pid is a previous process's


def test_a_reused_pid_is_not_the_runs_process(tmp_path):
    """The pid runs another process, started after the run: the run's process is gone."""
    home = tmp_path / "home"
    run_dir = runs.new_run(home, default_spec_text(), "demo")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - 3600))
        runs.mark(run_dir, "running", pid=proc.pid, started=started)
        assert runs.summary(run_dir)["status"] == "interrupted"
        runs.mark(run_dir, "running", pid=proc.pid)  # started now: the process is older than the run
        assert runs.summary(run_dir)["status"] == "running"
    finally:
        proc.kill()
        proc.wait()


def test_late_reply_store_drops_replies_of_unknown_nodes(caplog):
    import asyncio

    from coordinator.late_replies import LateReplyStore

    class Store:
        agents = {"known": "agent"}

        async def get(self, node_id):
            return self.agents.get(node_id)

        def other(self):
            return "passed through"

    store = LateReplyStore(Store())

    async def scenario():
        assert await store.get("known") == "agent"
        agent = await store.get("gone")
        with caplog.at_level("INFO", logger="coordinator.late_replies"):
            await agent.on_reply({"request_id": "req-1", "node_id": "gone"})

    asyncio.run(scenario())
    assert store.other() == "passed through"
    assert "dropped a reply of node gone to request req-1" in caplog.text


def test_install_wraps_the_agent_store_of_fedbiomeds_servicer():
    from fedbiomed.transport.server import ResearcherServicer

    from coordinator import late_replies
    from coordinator.late_replies import LateReplyStore

    late_replies.install()
    late_replies.install()  # once only
    servicer = ResearcherServicer(agent_store=object(), on_message=print)
    assert isinstance(servicer._agent_store, LateReplyStore)
    assert not isinstance(servicer._agent_store._store, LateReplyStore)


def test_each_decision_is_logged_once(tmp_path, caplog):
    coord, fed, clock = _coordinator(tmp_path, sites=1, max_auto_resumes=1)
    waiting = _run(coord, breakpoint_round=1, status="failed", error_kind="sites")
    used = _run(coord, breakpoint_round=1, status="interrupted", auto_resumes=1)
    with caplog.at_level("INFO", logger="coordinator.service"):
        for _ in range(3):
            coord.recover()
            clock.now += 16
    assert fed.searches == 3
    lines = [r.getMessage() for r in caplog.records]
    assert sum(f"run {waiting.name}: failed for lack of sites: waiting for 2 sites" in m for m in lines) == 1, lines
    assert sum(f"run {used.name}: not resumed automatically: interrupted; 1 of 1 automatic resumes used" in m for m in lines) == 1, lines
