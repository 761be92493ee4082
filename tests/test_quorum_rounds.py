"""Issue 23, part 1: rounds that survive failing sites, without FL processes.

The strategy aggregates the sites that answered (weights renormalised over them) and refuses a
round below its quorum; the request hook adds the round deadline to training requests only
and reads what became of each site's request; the spec validates the quorum keys; a global
model scored by fewer sites is no candidate for the best one. tests/integration/test_site_failures.py
kills and stops real nodes.
"""

from __future__ import annotations

import contextlib
from enum import Enum
from types import SimpleNamespace

import pytest
import torch
from conftest import spec_problems

from coordinator import checkpoints
from coordinator import spec as spec_mod
from coordinator.engine import mandatory_node_ids, missing_mandatory, quorum_message, scaffold_state_lost, site_status
from coordinator.fedbiomed_hooks import RoundOutcomes, outcome_of
from coordinator.run_metrics import RunMetrics
from coordinator.strategy import QuorumNotMet, SampledSitesStrategy

SPEC = """\
name: q
plan: marginal
sites: {tags: [demo], min_sites: 4}
rounds: 10
local_steps: 10
"""


def _reply(nid: str, value: float, samples: int | None = 10, success: bool = True, msg: str = "") -> dict:
    return {"success": success, "node_id": nid, "params": {"w": torch.tensor([value])}, "sample_size": samples, "msg": msg}


def _strategy(min_per_round, mandatory=None, uniform=False, nodes=("A", "B", "C"), round_i=0) -> SampledSitesStrategy:
    strategy = SampledSitesStrategy(None, seed=0, uniform=uniform, min_per_round=min_per_round, mandatory=mandatory)
    strategy.sample_nodes(list(nodes), round_i)
    return strategy


@pytest.mark.parametrize("uniform, expected", [(False, {"A": 0.25, "C": 0.75}), (True, {"A": 0.5, "C": 0.5})])
def test_a_round_is_aggregated_from_the_sites_that_answered(uniform, expected):
    from fedbiomed.researcher.aggregators import FedAverage

    strategy = _strategy(2, uniform=uniform)
    replies = {"A": _reply("A", 1.0, 10), "B": _reply("B", 100.0, 50, success=False, msg="out of memory"), "C": _reply("C", 3.0, 30)}
    params, weights, total, _ = strategy.refine(replies, 0)  # C answered, B failed, nothing from a missing one
    assert set(params) == {"A", "C"} and weights == pytest.approx(expected) and total == 40
    aggregate = FedAverage().aggregate(params, weights)["w"]
    assert aggregate.item() == pytest.approx(expected["A"] * 1.0 + expected["C"] * 3.0)  # B's 100 is nowhere in it
    assert strategy._success_node_history[0] == ["A", "C"]


def test_a_missing_site_is_left_out_like_a_failed_one():
    strategy = _strategy(2)
    params, weights, _, _ = strategy.refine({"A": _reply("A", 1.0, 10), "B": _reply("B", 2.0, 10)}, 0)  # C never answered
    assert set(params) == {"A", "B"} and weights == pytest.approx({"A": 0.5, "B": 0.5})


def test_too_few_answers_refuse_the_round_before_anything_is_aggregated():
    strategy = _strategy(2, round_i=2)
    with pytest.raises(QuorumNotMet) as caught:
        strategy.refine({"A": _reply("A", 1.0), "B": _reply("B", 2.0, samples=None)}, 2)  # B's reply is unusable
    exc = caught.value
    assert exc.answered == ["A"] and exc.sampled == ["A", "B", "C"] and exc.min_per_round == 2 and exc.round_i == 2
    assert "round 3" in str(exc) and "missing: B, C" in str(exc)
    assert 2 not in strategy._success_node_history


def test_a_mandatory_site_must_answer_whatever_the_quorum():
    strategy = _strategy(1, mandatory=["B"])
    with pytest.raises(QuorumNotMet) as caught:
        strategy.refine({"A": _reply("A", 1.0), "C": _reply("C", 2.0)}, 0)
    assert caught.value.mandatory_missing == ["B"]
    not_sampled = SampledSitesStrategy(None, min_per_round=1, mandatory=["B"])
    not_sampled.sample_nodes(["A", "C"], 0)  # a mandatory site is required only where it is asked
    assert set(not_sampled.refine({"A": _reply("A", 1.0)}, 0)[0]) == {"A"}


def test_without_a_quorum_every_sampled_site_is_needed_and_the_quorum_survives_a_breakpoint():
    strategy = _strategy(None)
    with pytest.raises(QuorumNotMet):
        strategy.refine({"A": _reply("A", 1.0), "B": _reply("B", 1.0)}, 0)
    saved = _strategy(2, mandatory=["C"]).save_state_breakpoint()
    restored = SampledSitesStrategy()
    restored.load_state_breakpoint(saved)
    assert restored._parameters["min_per_round"] == 2 and restored._parameters["mandatory"] == ["C"]
    old = SampledSitesStrategy()
    old.load_state_breakpoint({"parameters": {"clients_per_round": None, "seed": 0, "uniform": True}, "history": {}})  # before quorums
    assert old._parameters["min_per_round"] is None and old._parameters["mandatory"] == []


# -- the request hook ----------------------------------------------------------------------------


class _Status(Enum):  # the values of Fed-BioMed's RequestStatus
    DISCONNECT = "DISCONNECT"
    TIMEOUT = "TIMEOUT"
    NO_REPLY_YET = "NO_REPLY_YET"
    SUCCESS = "SUCCESS"


class _Train(SimpleNamespace):
    pass


class _FakeRequests:
    """Fed-BioMed's `Requests.send` shape: a context manager yielding the federated request."""

    def __init__(self, requests):
        self.sent: list[tuple] = []
        self._requests = requests

    @contextlib.contextmanager
    def send(self, message, nodes=None, policies=None):
        self.sent.append((message, nodes, policies))
        yield SimpleNamespace(requests=self._requests)


def _request(nid, reply=None, error=None, status=None):
    return SimpleNamespace(node=SimpleNamespace(id=nid), reply=reply, error=error, status=status)


def test_training_requests_get_the_deadline_and_each_sites_outcome_is_kept():
    fed_requests = [
        _request("A", reply=SimpleNamespace(success=True), status=_Status.SUCCESS),
        _request("B", reply=SimpleNamespace(success=False, msg="CUDA out\n of memory"), status=_Status.SUCCESS),
        _request("C", error=SimpleNamespace(errnum="FB313", extra_msg="plan raised"), status=_Status("SUCCESS")),
        _request("D", status=_Status.DISCONNECT),
        _request("E", status=_Status.NO_REPLY_YET),
    ]
    fake = _FakeRequests(fed_requests)
    outcomes = RoundOutcomes(lambda m: isinstance(m, _Train), lambda t: [("deadline", t)] if t else [])
    outcomes.watch(fake)
    outcomes.watch(fake)  # watching twice wraps once
    outcomes.timeout_s = 20
    messages = {nid: _Train(experiment_id="exp1", round=3, training=True) for nid in "ABCDEF"}
    with fake.send(messages, list("ABCDEF"), []):
        pass
    assert fake.sent[-1][2] == [("deadline", 20)]
    got = outcomes.take("exp1", 3)
    assert got["A"] == {"status": "ok"}
    assert got["B"] == {"status": "failed", "reason": "CUDA out of memory"}
    assert got["C"] == {"status": "failed", "reason": "FB313: plan raised"}
    assert got["D"] == {"status": "failed", "reason": "disconnected during the round"}
    assert got["E"] == {"status": "timeout", "reason": "no update within round_timeout_s (20 s)"}
    assert got["F"] == {"status": "failed", "reason": "not connected"}  # asked, but Fed-BioMed had no agent for it
    assert outcomes.take("exp1", 3) == {}  # taken once
    with fake.send(SimpleNamespace(kind="ping"), policies=["keep"]):  # other requests: untouched, not recorded
        pass
    assert fake.sent[-1][2] == ["keep"]
    outcomes.timeout_s = None
    with fake.send(messages, list("ABCDEF"), None):
        pass
    assert fake.sent[-1][2] == []  # no deadline set
    assert outcome_of(_request("E", status=_Status.NO_REPLY_YET), None) == {"status": "failed", "reason": "no answer"}


def test_a_site_seen_disconnected_is_not_waited_for_once_it_reconnects(monkeypatch, tmp_path):
    """Fed-BioMed's request counts as pending again when its node reconnects, though the message
    sent while it was away was dropped: `LostStaysLost` ends the wait anyway."""
    monkeypatch.setenv("FBM_RESEARCHER_COMPONENT_ROOT", str(tmp_path / "researcher"))  # Fed-BioMed makes its config on import
    from fedbiomed.researcher.requests import PolicyController
    from fedbiomed.researcher.requests._status import PolicyStatus, RequestStatus

    from coordinator.request_policies import LostStaysLost, round_policies

    back = SimpleNamespace(has_finished=lambda: False, status=RequestStatus.DISCONNECT, reply=None, error=None)
    answered = SimpleNamespace(has_finished=lambda: True, status=RequestStatus.SUCCESS, reply=object(), error=None)
    training = SimpleNamespace(has_finished=lambda: False, status=RequestStatus.NO_REPLY_YET, reply=None, error=None)
    assert PolicyController([LostStaysLost()]).continue_all([back, answered]) == PolicyStatus.COMPLETED
    assert PolicyController([LostStaysLost()]).continue_all([back, training]) == PolicyStatus.CONTINUE
    assert PolicyController([]).continue_all([back, answered]) == PolicyStatus.CONTINUE  # Fed-BioMed alone waits for ever
    assert [type(p).__name__ for p in round_policies(None)] == ["LostStaysLost"]
    assert [type(p).__name__ for p in round_policies(30)] == ["LostStaysLost", "StopOnTimeout"]


def test_a_real_stop_on_timeout_policy_ends_the_wait(monkeypatch, tmp_path):
    """Fed-BioMed's DiscardOnTimeout only marks a request; StopOnTimeout ends the wait (why the hook uses it)."""
    monkeypatch.setenv("FBM_RESEARCHER_COMPONENT_ROOT", str(tmp_path / "researcher"))
    from fedbiomed.researcher.requests import DiscardOnTimeout, PolicyController, StopOnTimeout
    from fedbiomed.researcher.requests._status import PolicyStatus

    pending = SimpleNamespace(node=SimpleNamespace(id="A"), has_finished=lambda: False, status=None)
    stop = StopOnTimeout(0)
    stop._time = stop._time or __import__("datetime").datetime(2000, 1, 1)  # long past its deadline
    assert PolicyController([stop]).continue_all([pending]) == PolicyStatus.COMPLETED
    discard = DiscardOnTimeout(0)
    discard._time = __import__("datetime").datetime(2000, 1, 1)
    assert PolicyController([discard]).continue_all([pending]) == PolicyStatus.CONTINUE


# -- the engine's records --------------------------------------------------------------------------


def test_site_status_and_the_quorum_message_name_every_site():
    sites = {"N1": "site-1", "N2": "site-2", "N3": "site-3", "N4": "site-4"}
    outcomes = {"N2": {"status": "timeout", "reason": "no update within round_timeout_s (20 s)"}, "N1": {"status": "ok"}}
    status = site_status(sites, ["N1", "N2", "N3"], ["N1"], outcomes)
    assert status == {
        "site-1": {"status": "ok"},
        "site-2": {"status": "timeout", "reason": "no update within round_timeout_s (20 s)"},
        "site-3": {"status": "failed", "reason": "no answer"},
        "site-4": {"status": "not_sampled", "reason": "not sampled this round"},
    }
    RunMetrics.of({"rounds": [{"round": 1, "site_status": status, "aggregated_from": 1}]})  # the model takes it
    exc = QuorumNotMet(1, ["N1"], ["N1", "N2", "N3"], 2, [])
    msg = quorum_message(exc, outcomes, sites, 2, 4)
    assert "\n" not in msg and msg.startswith("round 2/4: 1 of 3 sites answered and min_per_round is 2")
    assert "site-2 (timeout: no update within round_timeout_s (20 s))" in msg and "site-3 (failed: no answer)" in msg
    assert "mandatory site(s) site-3" in quorum_message(QuorumNotMet(1, ["N1", "N2"], ["N1", "N2", "N3"], 1, ["N3"]), {}, sites, 2, 4)


def test_mandatory_sites_are_named_by_site_name_or_node_id():
    sites = {"N1": "site-1", "N2": "site-2"}
    assert mandatory_node_ids(["site-2", "N1", "elsewhere"], sites) == ["N2", "N1"]
    assert missing_mandatory(["site-2", "N1", "elsewhere"], sites) == ["elsewhere"]


def test_a_global_model_scored_by_fewer_sites_is_no_candidate(tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for r in range(3):
        checkpoints.save_tensors(ckpt / f"global_round_{r:04d}.pt", {"w": torch.tensor([float(r)])})
    metrics: dict = {}

    def round_record(r, scores):
        return {"round": r, "sites": {f"N{i}": {"name": f"s{i}", "val_global": {"dice_a": d}} for i, d in scores.items()}}

    checkpoints.select_best(tmp_path, metrics, round_record(1, {1: 0.2, 2: 0.4}), {}, {})
    assert metrics["best_global"]["model_round"] == 0 and metrics["scoring_sites"] == ["s1", "s2"]
    checkpoints.select_best(tmp_path, metrics, round_record(2, {2: 0.9}), {}, {})  # s1 missed the round: 0.9 is s2's alone
    assert metrics["best_global"]["model_round"] == 0
    checkpoints.select_best(tmp_path, metrics, round_record(3, {1: 0.4, 2: 0.5}), {}, {})
    assert metrics["best_global"]["model_round"] == 2 and metrics["best_global"]["score"] == pytest.approx(0.45)


# -- the spec --------------------------------------------------------------------------------------


def test_the_quorum_defaults_to_half_the_sites_and_validates():
    spec = spec_mod.parse(SPEC, "q.yaml")
    assert spec.min_per_round == 2 and spec.mandatory_sites == [] and spec.round_timeout_s is None
    assert spec_mod.parse(SPEC.replace("min_sites: 4", "min_sites: 3"), "q.yaml").min_per_round == 2
    spec = spec_mod.parse(SPEC.replace("min_sites: 4}", "min_sites: 4, min_per_round: 3, mandatory: [site-1]}") + "round_timeout_s: 30\n", "q.yaml")
    assert spec.min_per_round == 3 and spec.mandatory_sites == ["site-1"] and spec.round_timeout_s == 30
    problems = spec_problems(SPEC.replace("min_sites: 4}", "min_sites: 4, min_per_round: 5}") + "round_timeout_s: 0\n")
    assert "at most min_sites (4)" in problems["sites.min_per_round"] and "round_timeout_s" in problems, problems
    standalone = spec_problems(SPEC.replace("min_sites: 4}", "min_sites: 4, min_per_round: 2}") + "mode: standalone\n")
    assert "standalone" in standalone["sites"], standalone


def test_the_data_factory_quorum_fits_its_sampled_sites():
    from conftest import FACTORY_SPEC

    spec = spec_mod.parse(FACTORY_SPEC, "f.yaml")  # 3 sites, 2 sampled a round
    assert spec.clients_per_round == 2 and spec.min_per_round == 2
    problems = spec_problems(FACTORY_SPEC.replace("sites: {", "sites: {min_per_round: 3, "))
    assert "at most clients_per_round (2)" in problems["sites.min_per_round"], problems


def test_results_and_the_report_show_the_rounds_aggregated_from_fewer_sites():
    from coordinator.report.tables import participation_table
    from coordinator.results import participation

    ok = {"status": "ok"}
    rounds = [
        {"round": 1, "sites": {}, "aggregated_from": 2, "site_status": {"a": ok, "b": ok}},
        {
            "round": 2,
            "sites": {},
            "aggregated_from": 1,
            "site_status": {"a": ok, "b": {"status": "timeout", "reason": "no update within round_timeout_s (6 s)"}},
        },
        {"round": 3, "sites": {}},  # a round of an older run: no status
    ]
    sites, rows, lines = participation(rounds)
    assert sites == ["a", "b"] and rows == [["2", "1 of 2", "ok", "timeout"]]
    assert lines == ["round 2: aggregated from 1 of 2 sites (b timeout: no update within round_timeout_s (6 s))"]
    table = participation_table({"rounds": rounds})
    assert table is not None and table.rows == rows and "1 of 3" in table.caption
    assert participation_table({"rounds": rounds[:1]}) is None  # nobody left out: no table


def test_the_quorum_is_checked_against_the_sites_named_by_id():
    problems = spec_problems(SPEC.replace("sites: {tags: [demo], min_sites: 4}", "sites: {tags: [demo], ids: [N1, N2], min_per_round: 3}"))
    assert "at most min_sites (2)" in problems["sites.min_per_round"], problems


def test_the_soak_benchmark_plans_its_kills_and_counts_rounds_from_fewer_sites():
    from conftest import load_benchmark

    soak = load_benchmark("site_failure_soak")
    import random

    assert soak.kill_rounds(20, 3) == [3, 6, 9, 12, 15, 18]
    picks = [soak.pick_site(random.Random(0), 3, {0}, {1: 5}, 6, 3) for _ in range(5)]
    assert set(picks) == {2}  # site 0 is down, site 1 came back after round 5: too recently to be killed again
    assert soak.pick_site(random.Random(0), 2, {0}, {1: 5}, 6, 3) is None
    assert soak.pick_site(random.Random(1), 8, set(), {}, 3, 3) == soak.pick_site(random.Random(1), 8, set(), {}, 3, 3)  # seeded
    ok, gone = {"status": "ok"}, {"status": "failed", "reason": "disconnected during the round"}
    metrics = {
        "rounds_planned": 3,
        "rounds": [
            {"round": 1, "wall_s": 2.0, "aggregated_from": 2, "site_status": {"a": ok, "b": ok}},
            {"round": 2, "wall_s": 12.0, "aggregated_from": 1, "site_status": {"a": ok, "b": gone}},
            {"round": 3, "wall_s": 4.0, "aggregated_from": 2, "site_status": {"a": ok, "b": ok}},
        ],
    }
    out = soak.summarise(metrics, "done", [{"killed_after_round": 1, "site": "b"}])
    assert out["rounds_done"] == 3 and out["rounds_from_fewer_sites"] == 1 and out["fewest_sites_in_a_round"] == 1
    assert out["round_time"]["full"] == {"n": 2, "median_s": 3.0, "mean_s": 3.0} and out["round_time"]["partial"]["n"] == 1
    spec = soak.soak_spec("soak", 8, 20, 4, 60)
    from coordinator import spec as spec_mod

    parsed = spec_mod.validate(spec, "soak")
    assert parsed.min_per_round == 4 and parsed.round_timeout_s == 60 and parsed.min_sites == 8


def test_absent_sites_can_be_waited_for_erring_ones_cannot():
    from coordinator.engine import RunError, SitesMissingError, quorum_error

    sites = {"N1": "site-1", "N2": "site-2", "N3": "site-3"}
    exc = QuorumNotMet(0, ["N1"], ["N1", "N2", "N3"], 2, [])
    erring = {
        "N2": {"status": "failed", "reason": "Could not configure secure aggregation on node"},
        "N3": {"status": "failed", "reason": "FB313: plan raised"},
    }
    refused = quorum_error(exc, erring, sites, 1, 3)
    assert type(refused) is RunError and "once the sites' errors are fixed" in str(refused)  # serve does not retry it
    lost = quorum_error(exc, {**erring, "N3": {"status": "failed", "reason": "disconnected during the round"}}, sites, 1, 3)
    assert isinstance(lost, SitesMissingError) and lost.error_kind == "sites" and "once enough sites are back" in str(lost)
    assert isinstance(quorum_error(exc, {"N2": {"status": "timeout", "reason": "x"}}, sites, 1, 3), SitesMissingError)


def test_a_lost_scaffold_state_is_told_apart_from_a_first_join_after_timeouts():
    """SCAFFOLD: a site that reports no restored state although an earlier update of it was aggregated lost
    its state (listed); one whose earlier rounds all timed out or failed joins fresh, rightly (not listed)."""
    earlier = [
        {"round": 1, "site_status": {"site-1": {"status": "ok"}, "site-2": {"status": "timeout", "reason": "x"}, "site-3": {"status": "ok"}}},
        {"round": 2, "site_status": {"site-1": {"status": "ok"}, "site-2": {"status": "failed", "reason": "y"}, "site-3": {"status": "not_sampled"}}},
    ]
    record = {
        "round": 3,
        "sites": {
            "N1": {"name": "site-1", "train": {"optimizer_state_restored": 0.0}},
            "N2": {"name": "site-2", "train": {"optimizer_state_restored": 0.0}},
            "N3": {"name": "site-3", "train": {"optimizer_state_restored": 1.0}},
            "N4": {"name": "site-4"},  # no training scalars this round
        },
    }
    assert scaffold_state_lost(earlier, record) == ["site-1"]
    assert scaffold_state_lost([], record) == []  # round 1: nothing could have been lost
    record["sites"]["N3"]["train"]["optimizer_state_restored"] = 0.0
    assert scaffold_state_lost(earlier, record) == ["site-1", "site-3"]
