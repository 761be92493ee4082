"""The run directory's layout (Fed-BioMed's files under fedbiomed/, the old layout still read)
and what the engine learns from Fed-BioMed's objects: site errors, streamed scalars, wire bytes.
No FL processes (tests/integration/test_federation.py runs the real thing)."""

import contextlib
import json
import logging
from types import SimpleNamespace

from conftest import cli
from fedbiomed.common.message import ErrorMessage, TrainReply

from coordinator import runs
from coordinator.fedbiomed_hooks import ScalarFeed, SiteErrors, WireCounter, wire_bytes


def _breakpoint(folder, n: int, complete: bool = True) -> None:
    bkpt = folder / f"breakpoint_{n:04d}"
    bkpt.mkdir(parents=True)
    if complete:
        (bkpt / f"{bkpt.name}.json").write_text(json.dumps({"round_current": n + 1}))


def test_latest_breakpoint_is_under_fedbiomed(tmp_path):
    run = tmp_path / "run"
    for n in (0, 1, 10):
        _breakpoint(runs.fedbiomed_dir(run), n)
    _breakpoint(runs.fedbiomed_dir(run), 11, complete=False)  # stopped while Fed-BioMed saved it
    assert runs.fedbiomed_dir(run) == run / "fedbiomed"
    assert runs.latest_breakpoint(run) == run / "fedbiomed" / "breakpoint_0010"  # by number, not by name order


def test_latest_breakpoint_of_a_run_of_the_old_layout(tmp_path):
    run = tmp_path / "run"
    _breakpoint(run, 0)
    _breakpoint(run, 1)
    bkpt = runs.latest_breakpoint(run)
    assert bkpt == run / "breakpoint_0001"
    # the engine resumes with Fed-BioMed's experiments dir = the breakpoint's grandparent
    assert bkpt.parent.parent == tmp_path


def _old_layout_run(home):
    run = runs.new_run(home, "name: old\n", "old")
    runs.write_metrics(run, {"rounds": [{"round": 1, "wall_s": 1.5, "update_norm": 0.25, "sites": {}}], "rounds_planned": 2})
    runs.mark(run, "interrupted", error="the coordinator stopped during the run")
    (run / "checkpoints").mkdir()
    (run / "run.log").write_text("2026-01-01 00:00:00 INFO [fedimg] round 1/2\n")
    _breakpoint(run, 0)  # Fed-BioMed's files at the top, as runs made before fedbiomed/ have them
    (run / "params_NODE_123456_0f.mpk").write_bytes(b"\x80")
    (run / "model_0f.py").write_text("class Plan: pass\n")
    (run / "runs").mkdir()  # Fed-BioMed's (empty) tensorboard folder
    return run


def test_a_run_of_the_old_layout_opens_with_results_and_report(tmp_path):
    home = tmp_path / "home"
    run = _old_layout_run(home)
    res = cli("coordinator", "results", run.name, "--home", home, "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["rounds_done"] == 1 and info["status"] == "interrupted"
    res = cli("coordinator", "report", run.name, "--home", home)
    assert res.returncode == 0, res.stderr
    assert (run / "report" / "index.html").is_file()
    assert runs.latest_breakpoint(run) == run / "breakpoint_0000"  # what `coordinator resume` loads


class _FakeRequests:
    """Fed-BioMed's `Requests.send` as the engine sees it: a context manager giving a FederatedRequest."""

    def __init__(self, answers):
        self.answers = answers
        self.sent = 0

    @contextlib.contextmanager
    def send(self, message, nodes=None, policies=None):
        self.sent += 1
        errors, replies = self.answers
        yield SimpleNamespace(errors=lambda: errors, replies=lambda: replies)


def _train_reply(node_id, node_name, success, msg=""):
    return TrainReply(researcher_id="r", experiment_id="e", success=success, node_id=node_id, node_name=node_name,
                      dataset_id="", timing={}, msg=msg)  # fmt: skip


def test_site_errors_are_read_from_the_request_answers():
    error = ErrorMessage(researcher_id="r", node_id="NODE_1", node_name="site-1", extra_msg="Round error:  boom\n", errnum="FB300")
    failed = _train_reply("NODE_2", "site-2", False, "SiteError('fedimg site error dataset [stage=data]')")
    fine = _train_reply("NODE_3", "site-3", True)
    requests = _FakeRequests(({"NODE_1": error}, {"NODE_2": failed, "NODE_3": fine}))
    errors = SiteErrors()
    errors.watch(requests)
    errors.watch(requests)  # watching twice reads each answer once
    for _ in range(2):  # a repeated answer (a poll) is kept once
        with requests.send("msg", ["NODE_1"]) as fed_req:
            assert fed_req.errors() == {"NODE_1": error}  # callers still get Fed-BioMed's object
    assert requests.sent == 2
    assert errors.lines() == [
        "site-1 (NODE_1): FB300: Round error: boom",
        "site-2 (NODE_2): SiteError('fedimg site error dataset [stage=data]')",
    ]
    errors.clear()
    assert errors.lines() == []


def test_site_errors_are_read_when_the_caller_fails():
    requests = _FakeRequests(({}, {"NODE_2": _train_reply("NODE_2", "NODE_2", False)}))
    errors = SiteErrors()
    errors.watch(requests)
    with contextlib.suppress(RuntimeError), requests.send("msg"):
        raise RuntimeError("the strategy refused the round")
    assert errors.lines() == ["NODE_2: failed without a message"]


def _record(msg, *args, level=logging.DEBUG):
    return logging.LogRecord("fedbiomed", level, "server.py", 1, msg, args, None)


def test_wire_bytes_reads_fedbiomed_transport_records():
    # the records exactly as fedbiomed/transport/server.py 6.4.1 logs them
    tx = _record("[WIRE][S->N][TX] node=%s type=%s req=%s retry=%d age_s=%.1f bytes=%d", "NODE_1", "TrainRequest", "r1", 0, 0.1, 1234)
    rx = _record("[WIRE][N->S][RX] node=%s req=%s type=%s bytes=%d", "NODE_1", "r1", "TrainReply", 999)
    assert wire_bytes(tx) == ("to_sites", 1234) and wire_bytes(rx) == ("from_sites", 999)
    assert wire_bytes(_record("[WIRE][N->S][RX] node=%s type=Feedback oneof=%s", "NODE_1", "scalar")) is None
    assert wire_bytes(_record("[WIRE][S->N][REQUEUE] node=%s type=%s req=%s retry=%d reason=x error=%s", "N", "T", "r", 1, "e")) is None
    assert wire_bytes(_record("round %s done", 3)) is None
    counter = WireCounter()
    for record in (tx, tx, rx):
        counter.handle(record)
    assert counter.take() == {"to_sites": 2468, "from_sites": 999}
    assert counter.take() == {"to_sites": 0, "from_sites": 0}


def test_scalar_feed_keeps_each_experiments_scalars_and_forgets_them_on_reset():
    callbacks, seen = {}, []
    requests = SimpleNamespace(add_monitor_callback=callbacks.__setitem__, remove_monitor_callback=callbacks.pop)
    exp = SimpleNamespace(id="exp-1", requests=requests, monitor=lambda: SimpleNamespace(on_message_handler=seen.append))
    feed = ScalarFeed()
    feed.track(exp)
    msg = {"node_id": "NODE_1", "train": False, "test_on_global_updates": True, "metric": {"dice_mean": 0.5}}
    callbacks["exp-1"](msg)
    assert seen == [msg]  # Fed-BioMed's own monitor still gets it
    assert feed.take("exp-2") == []
    assert feed.take("exp-1") == [{"experiment": "exp-1", "node_id": "NODE_1", "train": False, "global": True, "metric": {"dice_mean": 0.5}}]
    assert feed.take("exp-1") == []
    callbacks["exp-1"](msg)
    feed.reset()
    assert callbacks == {} and feed.take("exp-1") == []


class _Node:
    """A node agent that answers at once (what Fed-BioMed's gRPC server does when a reply arrives)."""

    status = None  # never NodeActiveStatus.DISCONNECTED

    def __init__(self, node_id, answer):
        self.id, self.answer = node_id, answer

    def send(self, message, on_reply):
        on_reply(self.answer(message))

    def flush(self, request_id, stopped):
        pass


def test_site_errors_read_fedbiomeds_own_federated_request(monkeypatch, tmp_path):
    """Fed-BioMed's real `Requests.send` and `FederatedRequest`, with node agents that answer at once."""
    monkeypatch.setenv("FBM_RESEARCHER_COMPONENT_ROOT", str(tmp_path / "researcher"))  # its config is made on import
    from fedbiomed.common.message import PingRequest
    from fedbiomed.researcher.requests import Requests

    def error(msg):
        return ErrorMessage(researcher_id="r", node_id="NODE_1", node_name="site-1", extra_msg="Round error: no data", errnum="FB300",
                            request_id=msg.request_id)  # fmt: skip

    def failed(msg):
        reply = _train_reply("NODE_2", "site-2", False, "out of memory")
        reply.request_id = msg.request_id
        return reply

    nodes = {"NODE_1": _Node("NODE_1", error), "NODE_2": _Node("NODE_2", failed)}
    requests = Requests.__new__(Requests)  # no gRPC server: the agents above stand in for it
    requests._grpc_server = SimpleNamespace(get_node=nodes.get, get_all_nodes=lambda: list(nodes.values()))
    errors = SiteErrors()
    errors.watch(requests)
    with requests.send(PingRequest(researcher_id="r"), ["NODE_1", "NODE_2"]) as fed_req:
        assert set(fed_req.errors()) == {"NODE_1"} and set(fed_req.replies()) == {"NODE_2"}
    assert errors.lines() == ["site-1 (NODE_1): FB300: Round error: no data", "site-2 (NODE_2): out of memory"]
