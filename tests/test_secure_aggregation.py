"""Issue 23, part 5: secure aggregation as a spec switch, without FL processes.

The spec's ``secagg`` key and what it cannot be combined with; the `SecureAggregation` the
coordinator passes to Fed-BioMed (and renews on resume); the strategy that needs every sampled
site of a securely aggregated round; Fed-BioMed's own crypters (LOM and Joye-Libert) giving the
sample-weighted average within the quantisation error, and garbage without a dropped site's
update. tests/integration/test_secure_aggregation.py runs real nodes.
"""

from __future__ import annotations

import random
import secrets
from types import SimpleNamespace

import pytest
import torch
from conftest import spec_problems

from coordinator import spec as spec_mod
from coordinator.engine import _local_params, fresh_secure_aggregation, quorum_message, secure_aggregation
from coordinator.strategy import QuorumNotMet, SampledSitesStrategy

SPEC = """\
name: s
plan: marginal
sites: {tags: [demo], min_sites: 3}
rounds: 10
local_steps: 10
"""


def _parse(extra: str = "") -> spec_mod.Spec:
    return spec_mod.parse(SPEC + extra, "exp.yaml")


# -- the spec ------------------------------------------------------------------------------------


def test_secagg_is_off_by_default_and_resolves_its_defaults():
    assert _parse().secagg is None and _parse("secagg: null\n").secagg is None
    assert _parse("secagg: {}\n").secagg == {"scheme": "lom", "clipping_range": 3}
    spec = _parse("secagg: {scheme: joye-libert, clipping_range: 5}\n")
    assert spec.secagg == {"scheme": "joye-libert", "clipping_range": 5} and not spec.warnings


@pytest.mark.parametrize(
    "extra, key, words",
    [
        ("secagg: {scheme: rsa}\n", "secagg.scheme", "lom, joye-libert"),
        ("secagg: {clipping_range: 0}\n", "secagg.clipping_range", ">= 1"),
        ("secagg: {clipping_range: 2.5}\n", "secagg.clipping_range", "integer"),
        ("secagg: lom\n", "secagg", "mapping"),
        ("secagg: {scheme: lom}\naggregator: scaffold\n", "aggregator", "their sum"),
        ("secagg: {scheme: lom}\nweights: equal\n", "weights", "training cases"),
        ("secagg: {scheme: lom}\nmode: standalone\n", "secagg", "nothing to aggregate"),
    ],
)
def test_what_secagg_is_refused_with(extra, key, words):
    problems = spec_problems(SPEC + extra)
    assert key in problems and words in problems[key], problems


def test_secagg_needs_two_sites_and_refuses_the_data_factory():
    one_site = SPEC.replace("min_sites: 3", "min_sites: 1") + "secagg: {}\n"
    assert "at least 2" in spec_problems(one_site)["sites.min_sites"]
    assert "at least 2" in spec_problems(SPEC.replace(", min_sites: 3", "") + "secagg: {}\n")["sites.min_sites"]  # default: 1 site
    assert not _parse("secagg: {scheme: lom}\n").warnings  # 3 sites: fine
    factory = "name: f\nplan: data_factory\nsites: {tags: [demo], min_sites: 3}\nrounds: 4\nlocal_steps: 2\nsecagg: {}\n"
    assert "drop secagg" in spec_problems(factory)["secagg"]


def test_min_per_round_and_mandatory_are_moot_with_secagg():
    spec = spec_mod.parse(SPEC.replace("min_sites: 3}", "min_sites: 3, min_per_round: 2, mandatory: [a]}") + "secagg: {}\n", "exp.yaml")
    keys = [w.split(": ")[1] for w in spec.warnings]
    assert keys == ["sites.min_per_round", "sites.mandatory"] and all("every sampled site must answer" in w for w in spec.warnings)


# -- the experiment's SecureAggregation ----------------------------------------------------------


def test_the_experiment_gets_fedbiomeds_secure_aggregation_of_the_spec():
    from fedbiomed.common.constants import SecureAggregationSchemes

    assert secure_aggregation(_parse()) is False  # Fed-BioMed refuses None
    lom = secure_aggregation(_parse("secagg: {}\n"))
    assert lom.scheme == SecureAggregationSchemes.LOM and lom.clipping_range == 3 and lom.active
    jls = secure_aggregation(_parse("secagg: {scheme: joye-libert, clipping_range: 4}\n"))
    assert jls.scheme == SecureAggregationSchemes.JOYE_LIBERT and jls.clipping_range == 4


def test_a_resumed_experiment_sets_up_new_keys():
    """The breakpoint's context (parties, key id) is dropped: the next round sets up new keys."""
    old = secure_aggregation(_parse("secagg: {scheme: joye-libert, clipping_range: 4}\n"))
    old._SecureAggregation__secagg._parties = ["N1", "N2"]  # as after a round
    exp = SimpleNamespace(secagg=old, set_secagg=lambda s: setattr(exp, "secagg", s))
    fresh_secure_aggregation(exp)
    assert exp.secagg is not old and exp.secagg.scheme == old.scheme and exp.secagg.clipping_range == 4 and exp.secagg.parties is None
    plain = SimpleNamespace(secagg=secure_aggregation(_parse()) or SimpleNamespace(active=False), set_secagg=None)
    fresh_secure_aggregation(plain)  # no secure aggregation: nothing to renew


def test_encrypted_replies_give_no_local_models():
    replies = {0: {"N1": {"params": [123, 456]}, "N2": {"params": {"w": [1.0]}}}}
    exp = SimpleNamespace(training_replies=lambda: replies)
    assert list(_local_params(exp, 1)) == ["N2"]


# -- the strategy --------------------------------------------------------------------------------


def _reply(nid: str, samples: int = 10, encrypted: bool = False) -> dict:
    params = [1, 2, 3] if encrypted else {"w": torch.tensor([1.0])}
    return {"success": True, "node_id": nid, "params": params, "sample_size": samples, "encrypted": encrypted, "encryption_factor": [7] if encrypted else None}


@pytest.mark.parametrize("secure, encrypted", [(True, False), (False, True), (True, True)])
def test_a_secure_round_needs_every_sampled_site_whatever_the_quorum(secure, encrypted):
    strategy = SampledSitesStrategy(None, seed=0, min_per_round=1, secure=secure)
    strategy.sample_nodes(["A", "B", "C"], 1)
    with pytest.raises(QuorumNotMet) as info:
        strategy.refine({"A": _reply("A", encrypted=encrypted), "B": _reply("B", encrypted=encrypted)}, 1)  # C dropped
    exc = info.value
    assert exc.secure and exc.min_per_round == 3 and "secure aggregation needs every sampled site" in str(exc)
    assert 1 not in strategy._success_node_history
    msg = quorum_message(exc, {"C": {"status": "failed", "reason": "disconnected during the round"}}, {"A": "a", "B": "b", "C": "c"}, 2, 4)
    assert "\n" not in msg and msg.startswith("round 2/4: 2 of 3 sites answered and secure aggregation needs every sampled site; missing: c (failed: ")


def test_a_complete_secure_round_is_weighted_by_samples_and_the_flag_survives_a_breakpoint():
    strategy = SampledSitesStrategy(None, seed=0, min_per_round=1, secure=True)
    strategy.sample_nodes(["A", "B"], 0)
    params, weights, total, factors = strategy.refine({"A": _reply("A", 10, True), "B": _reply("B", 30, True)}, 0)
    assert params == {"A": [1, 2, 3], "B": [1, 2, 3]} and total == 40 and factors == {"A": [7], "B": [7]}
    assert weights == pytest.approx({"A": 0.25, "B": 0.75})
    restored = SampledSitesStrategy()
    restored.load_state_breakpoint(strategy.save_state_breakpoint())
    assert restored._parameters["secure"] is True
    old = SampledSitesStrategy()
    old.load_state_breakpoint({"parameters": {"clients_per_round": None, "seed": 0, "uniform": False}, "history": {}})
    assert old._parameters["secure"] is False


# -- Fed-BioMed's crypters: the aggregate and its quantisation error ------------------------------

TARGET = 2**13  # Fed-BioMed's SAParameters.TARGET_RANGE for training


def _sites(n_values: int, clip: int) -> tuple[list[list[float]], list[int], list[float]]:
    rng = random.Random(0)
    params = [[rng.uniform(-clip, clip) for _ in range(n_values)] for _ in range(3)]
    weights = [5, 17, 40]
    average = [sum(w * p[i] for w, p in zip(weights, params)) / sum(weights) for i in range(n_values)]
    return params, weights, average


@pytest.mark.parametrize("clip", [3, 10])
def test_lom_gives_the_sample_weighted_average_within_the_quantisation_error(clip):
    from fedbiomed.common.secagg import SecaggLomCrypter

    nodes = ["N1", "N2", "N3"]
    shared = {frozenset(pair): secrets.token_bytes(32) for pair in (("N1", "N2"), ("N1", "N3"), ("N2", "N3"))}
    params, weights, average = _sites(500, clip)
    crypter = SecaggLomCrypter(nonce="secagg_test")

    def masked(i: int, node: str) -> list[int]:
        pairwise = {other: shared[frozenset((node, other))] for other in nodes if other != node}
        return crypter.encrypt(
            current_round=1, node_id=node, params=params[i], pairwise_secrets=pairwise, node_ids=nodes, clipping_range=clip, weight=weights[i]
        )

    sent = [masked(i, node) for i, node in enumerate(nodes)]
    assert max(abs(a - b) for a, b in zip(sent[0][:20], params[0][:20])) > 1e6  # masked: no site's model is readable
    got = crypter.aggregate(params=sent, total_sample_size=sum(weights), clipping_range=clip)
    step = 2 * clip / (TARGET - 1)
    assert max(abs(g - a) for g, a in zip(got, average)) <= 2 * step  # quantisation: at most two levels
    dropped = crypter.aggregate(params=sent[:2], total_sample_size=sum(weights[:2]), clipping_range=clip)
    assert max(abs(g - a) for g, a in zip(dropped, average)) > 1.0  # one site missing: its masks stay, the sum is garbage


def test_joye_libert_gives_the_same_average_without_external_tools():
    from fedbiomed.common.secagg import SecaggCrypter
    from fedbiomed.common.utils import get_default_biprime

    params, weights, average = _sites(300, 3)
    biprime = get_default_biprime()
    keys = [secrets.randbits(2048) for _ in range(3)]  # the sites' user keys; the server key is minus their sum
    crypter = SecaggCrypter()
    sent = [
        crypter.encrypt(num_nodes=3, current_round=2, params=p, key=k, biprime=biprime, clipping_range=3, weight=w) for p, k, w in zip(params, keys, weights)
    ]
    got = crypter.aggregate(
        current_round=2, num_nodes=3, params=sent, key=-sum(keys), biprime=biprime, total_sample_size=sum(weights), clipping_range=3, num_expected_params=300
    )
    assert max(abs(g - a) for g, a in zip(got, average)) <= 2 * 6 / (TARGET - 1)


# -- the sites -----------------------------------------------------------------------------------


def test_a_new_node_accepts_secure_aggregation_and_keeps_its_operators_choice(tmp_path):
    import configparser

    from site_agent.config import SiteConfig
    from site_agent.node import create_node, node_settings

    site = SiteConfig(site_name="s", coordinator_host="127.0.0.1", coordinator_port=50051, data_dir=tmp_path / "data", work_dir=tmp_path / "work")
    create_node(site)
    settings = node_settings(site)
    assert settings["secure_aggregation"] is True and settings["force_secure_aggregation"] is False
    ini = site.node_dir / "etc" / "config.ini"
    config = configparser.ConfigParser()
    config.read(ini)
    config["security"]["secure_aggregation"] = "False"  # the operator refuses secure aggregation
    with ini.open("w") as f:
        config.write(f)
    create_node(site)  # `site-agent init` again
    assert node_settings(site)["secure_aggregation"] is False
