"""SCAFFOLD's states in the wire form (`pipelines.wire_aux`): the sites' client module sends the
change of ``c_i`` in the run's precision and checks the ``c`` it receives; the coordinator encodes
``c`` with the global model and checks and widens the sites' states before declearn sums them.
Fed-BioMed's serializer carries every message here, as on the wire; Fed-BioMed's own optimizer
state round trip (`Optimizer.load_state`, what a node does between rounds) rebuilds the module.
tests/integration/test_federation.py runs a bf16 SCAFFOLD federation through real nodes.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from declearn.model.torch import TorchVector
from declearn.optimizer.modules import ScaffoldAuxVar, ScaffoldServerModule
from fedbiomed.common.models import TorchModel
from fedbiomed.common.optimizers import Optimizer
from fedbiomed.common.optimizers.generic_optimizers import DeclearnOptimizer
from fedbiomed.common.serializer import Serializer

from coordinator.fedbiomed_hooks import OutgoingModels
from pipelines.plans.optimizers import WireScaffoldClientModule, scaffold_adam, scaffold_state
from pipelines.wire import WIRE_KEY, WireChecksumError, encode_params
from pipelines.wire_aux import aux_var_encoded, decode_aux_var, encode_aux_var, encode_aux_vars

# half a unit in the last place (relative), and half the spacing of fp16's subnormals (absolute), as in test_wire
ROUNDING = {"fp32": 0.0, "bf16": 2.0**-8, "fp16": 2.0**-11}
SUBNORMAL = {"fp32": 0.0, "bf16": 0.0, "fp16": 2.0**-25}


def _vector(seed: int = 0) -> TorchVector:
    g = torch.Generator().manual_seed(seed)
    return TorchVector({"conv.weight": torch.randn(8, 4, 3, 3, generator=g) * 1e-2, "conv.bias": torch.randn(8, generator=g)})


def _over_the_wire(obj):
    return Serializer.loads(Serializer.dumps(obj))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_scaffold_state_round_trips_within_its_precision_as_float32(precision):
    sent = ScaffoldAuxVar(delta=_vector(), clients={"site-uuid"})
    encoded = encode_aux_var(sent, precision, pytest.fail)
    assert set(encoded.delta.coefs) == {WIRE_KEY} and aux_var_encoded(encoded) and not aux_var_encoded(sent)
    assert set(sent.delta.coefs) == {"conv.weight", "conv.bias"}  # the input is not modified
    got = decode_aux_var(_over_the_wire({"scaffold": encoded})["scaffold"])
    assert isinstance(got, ScaffoldAuxVar) and got.clients == {"site-uuid"} and got.state is None
    for name, want in sent.delta.coefs.items():
        value = got.delta.coefs[name]
        assert value.dtype == torch.float32 and value.shape == want.shape
        assert torch.all((value - want).abs() <= want.abs() * ROUNDING[precision] + SUBNORMAL[precision])
    assert not aux_var_encoded(got)


def test_half_the_bytes_in_bf16():
    aux = {"scaffold": ScaffoldAuxVar(state=TorchVector({"w": torch.randn(100_000)}))}
    plain = len(Serializer.dumps(aux))
    half = len(Serializer.dumps(encode_aux_vars(aux, "bf16", pytest.fail)))
    assert half / plain == pytest.approx(0.5, abs=0.01)


def test_a_changed_state_fails_its_check():
    encoded = _over_the_wire(encode_aux_var(ScaffoldAuxVar(delta=_vector()), "bf16", pytest.fail))
    encoded.delta.coefs[WIRE_KEY][-1] ^= 1  # one bit of the last value
    with pytest.raises(WireChecksumError):
        decode_aux_var(encoded)


def test_scalars_and_plain_states_pass_unchanged():
    first_round = ScaffoldAuxVar(state=0.0)  # declearn's server state before any update
    assert encode_aux_var(first_round, "bf16", pytest.fail) is first_round and decode_aux_var(first_round) is first_round
    plain = ScaffoldAuxVar(delta=_vector(), clients={"x"})  # from a site that sends no wire form
    assert decode_aux_var(plain) is plain


def test_fp16_overflow_sends_that_state_exact_and_says_so():
    said = []
    big = ScaffoldAuxVar(delta=TorchVector({"w": torch.tensor([7.0e4, 1.0 / 3.0])}))
    got = decode_aux_var(encode_aux_var(big, "fp16", said.append))
    assert torch.equal(got.delta.coefs["w"], big.delta.coefs["w"]) and "fp32" in said[0]


class Line(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


def _steps(optimizer: Optimizer, target: torch.Tensor, steps: int = 5) -> DeclearnOptimizer:
    net = Line()
    wrapper = DeclearnOptimizer(TorchModel(net), optimizer)
    wrapper.init_training()
    for _ in range(steps):
        wrapper.zero_grad()
        (0.5 * (net.w - target).pow(2).sum()).backward()
        wrapper.step()
    return wrapper


def test_the_site_module_sends_encoded_states_survives_fedbiomeds_state_round_trip_and_decodes_c():
    optimizer = scaffold_adam(0.05, 0.0, 0, transfer="bf16")
    wrapper = _steps(optimizer, torch.tensor([1.0, 2.0, 3.0]))
    sent = _over_the_wire(wrapper.get_aux())
    assert set(sent) == {"scaffold"} and aux_var_encoded(sent["scaffold"])
    # between rounds a node saves the optimizer's state and Fed-BioMed rebuilds it from its config
    state = _over_the_wire(wrapper.save_state())
    reloaded = DeclearnOptimizer(TorchModel(Line()), scaffold_adam(0.05, 0.0, 0, transfer="bf16")).load_state(state)
    modules = reloaded.optimizer._optimizer.modules
    assert isinstance(modules[0], WireScaffoldClientModule) and modules[0].precision == "bf16"
    # the coordinator decodes and sums, its server module answers with c, sent encoded: the site decodes it
    server = Optimizer(lr=1.0, modules=[ScaffoldServerModule()])
    server.set_aux({name: decode_aux_var(aux) for name, aux in sent.items()})
    c = _over_the_wire(encode_aux_vars(server.get_aux(), "bf16", pytest.fail))
    assert aux_var_encoded(c["scaffold"])
    reloaded.optimizer.set_aux(c)
    # one site: c is its own state, so its correction c_i - c is zero up to bf16's rounding of c
    assert scaffold_state(reloaded)["scaffold_correction_norm"] < 1e-2


def test_a_site_without_a_transfer_precision_uses_declearns_own_module():
    module = scaffold_adam(0.05, 0.0, 0, transfer=None)._optimizer.modules[0]
    assert type(module).__name__ == "ScaffoldClientModule"


def test_the_sites_c_i_is_the_sum_of_what_it_sent():
    """The coordinator adds up the rounded updates; the site keeps the same sum, so the two never drift apart."""
    optimizer = scaffold_adam(0.05, 0.0, 0, transfer="bf16")
    module = optimizer._optimizer.modules[0]
    total = None
    for target in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-0.3, 0.1, 7.0]), torch.tensor([0.01, -0.02, 0.03])):
        update = decode_aux_var(_over_the_wire(_steps(optimizer, target).get_aux())["scaffold"]).delta
        total = update if total is None else total + update
        optimizer.set_aux({"scaffold": ScaffoldAuxVar(state=0.0)})  # the next round (resets declearn's step counter)
    assert torch.equal(module.state.coefs["w"], total.coefs["w"])


def test_a_renamed_or_reset_scaffold_module_is_not_called_restored():
    from pipelines.plans.optimizers import scaffold_state_kept

    wrapper = _steps(scaffold_adam(0.05, 0.0, 0, transfer="bf16"), torch.ones(3))
    assert not scaffold_state_kept(wrapper)  # c_i is computed when the round's state is collected
    wrapper.get_aux()
    assert scaffold_state_kept(wrapper)
    state = wrapper.save_state()
    # a run whose saved state holds declearn's own module, resumed by this version's plan: Fed-BioMed keeps Adam, not SCAFFOLD
    state["config"]["modules"][0] = ("scaffold-client", {})
    state["states"]["modules"][0] = ("scaffold-client", state["states"]["modules"][0][1])
    fresh = DeclearnOptimizer(TorchModel(Line()), scaffold_adam(0.05, 0.0, 0, transfer="bf16")).load_state(state, load_from_state=True)
    assert scaffold_state(fresh)["adam_steps"] == 5 and not scaffold_state_kept(fresh)


UPDATE = {"conv.weight": torch.zeros(8, 4, 3, 3), "conv.bias": torch.zeros(8)}


def _replies(states: dict, updates: dict | None = None) -> tuple[dict, SimpleNamespace]:
    updates = updates or {}
    replies = {n: SimpleNamespace(experiment_id="exp", node_id=n, success=True, encrypted=False, msg="", state_id=f"{n}-new", optim_aux_var=aux,
                                  params=updates.get(n, _over_the_wire(encode_params(UPDATE, "bf16"))))
               for n, aux in states.items()}  # fmt: skip
    return replies, SimpleNamespace(requests=[SimpleNamespace(node=SimpleNamespace(id=n), reply=r) for n, r in replies.items()])


def _site_state(seed: int, precision: str = "bf16", **change) -> dict:
    vector = TorchVector({**_vector(seed).coefs, **change})
    return _over_the_wire({"scaffold": encode_aux_var(ScaffoldAuxVar(delta=vector, clients={str(seed)}), precision, pytest.fail)})


def _sent(hook: OutgoingModels, states: bool = True) -> dict:
    hook.set("exp", "bf16", states=states)
    model = {"conv.weight": torch.zeros(8, 4, 3, 3), "conv.bias": torch.zeros(8), "bn.num_batches_tracked": torch.tensor(3)}
    c = {"scaffold": ScaffoldAuxVar(state=_vector(1))}
    messages = {n: SimpleNamespace(experiment_id="exp", params=model, optim_aux_var=c, state_id=f"{n}-old") for n in ("A", "B", "C", "D")}
    hook(messages)
    return messages


def test_the_coordinator_encodes_c_once_per_request_and_checks_the_sites_states():
    hook = OutgoingModels()
    messages = _sent(hook)
    assert messages["A"].optim_aux_var is messages["B"].optim_aux_var and aux_var_encoded(messages["A"].optim_aux_var["scaffold"])
    bad_digest = _site_state(3)
    bad_digest["scaffold"].delta.coefs[WIRE_KEY][-2] ^= 4
    plain = {"scaffold": ScaffoldAuxVar(delta=_vector(4), clients={"4"})}  # where this run's sites send checked buffers
    replies, request = _replies({"A": _site_state(2), "B": bad_digest, "C": plain, "D": None})
    hook.received(request)
    assert replies["A"].success and not aux_var_encoded(replies["A"].optim_aux_var["scaffold"]) and replies["A"].state_id == "A-new"
    assert replies["A"].optim_aux_var["scaffold"].delta.coefs["conv.bias"].dtype == torch.float32
    for node in ("B", "C"):  # left out, and its node state back to the round's start: the coordinator did not count this round
        assert replies[node].success is False and replies[node].optim_aux_var is None and "failed its check" in replies[node].msg
        assert replies[node].state_id == f"{node}-old"
    assert "plain tensors" in replies["C"].msg
    assert replies["D"].success and replies["D"].optim_aux_var is None and replies["D"].state_id == "D-new"


def test_a_site_state_must_have_the_models_names_and_shapes_and_nothing_beside_its_buffer():
    hook = OutgoingModels()
    _sent(hook)
    extra = _site_state(5)
    extra["scaffold"].delta.coefs["smuggled"] = torch.full((2,), 1e9)  # unchecked values beside the checked buffer
    replies, request = _replies({
        "A": _site_state(6, **{"other.weight": torch.zeros(2)}),  # a name the model does not have
        "B": _site_state(7, **{"conv.bias": torch.zeros(9)}),  # a shape it does not have
        "C": extra,
        "D": _site_state(8),
    })  # fmt: skip
    hook.received(request)
    assert "other.weight" in replies["A"].msg and "(9,)" in replies["B"].msg and "smuggled" in replies["C"].msg
    assert [r.success for r in replies.values()] == [False, False, False, True]


def test_a_site_whose_update_fails_its_check_has_its_state_left_out_too():
    """Fed-BioMed sums the states of every successful reply: an update refused later (by the strategy) would leave
    its state counted; the hook refuses the reply as a whole, before Fed-BioMed reads it."""
    hook = OutgoingModels()
    _sent(hook)
    broken = _over_the_wire(encode_params(UPDATE, "bf16"))
    broken[WIRE_KEY][-1] ^= 1
    replies, request = _replies({"A": _site_state(10), "B": _site_state(11), "C": _site_state(12)},
                                {"B": broken, "C": {k: v.clone() for k, v in UPDATE.items()}})  # fmt: skip
    hook.received(request)
    assert replies["A"].success
    for node in ("B", "C"):
        assert replies[node].success is False and replies[node].optim_aux_var is None and replies[node].state_id == f"{node}-old"
        assert "its update failed its check" in replies[node].msg
    assert "checksum" in replies["B"].msg and "plain tensors" in replies["C"].msg


def test_runs_started_before_states_travelled_in_the_wire_form_keep_them_plain():
    hook = OutgoingModels()
    messages = _sent(hook, states=False)
    assert not aux_var_encoded(messages["A"].optim_aux_var["scaffold"])  # c as before
    assert set(messages["A"].params) == {WIRE_KEY}  # the model in its wire form, as before
    replies, request = _replies({"A": {"scaffold": ScaffoldAuxVar(delta=_vector(9), clients={"9"})}})
    hook.received(request)
    assert replies["A"].success


def test_encoding_twice_is_refused():
    once = encode_aux_var(ScaffoldAuxVar(delta=_vector()), "bf16", pytest.fail)
    with pytest.raises(ValueError, match="already"):
        encode_aux_var(once, "bf16", pytest.fail)
    assert dataclasses.is_dataclass(once)
