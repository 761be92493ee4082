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
from pipelines.wire import WIRE_KEY, WireChecksumError
from pipelines.wire_aux import aux_var_encoded, decode_aux_var, decode_aux_vars, encode_aux_var, encode_aux_vars

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
    server.set_aux(decode_aux_vars(sent))
    c = _over_the_wire(encode_aux_vars(server.get_aux(), "bf16", pytest.fail))
    assert aux_var_encoded(c["scaffold"])
    reloaded.optimizer.set_aux(c)
    # one site: c is its own state, so its correction c_i - c is zero up to bf16's rounding of c
    assert scaffold_state(reloaded)["scaffold_correction_norm"] < 1e-2


def test_a_site_without_a_transfer_precision_uses_declearns_own_module():
    module = scaffold_adam(0.05, 0.0, 0, transfer=None)._optimizer.modules[0]
    assert type(module).__name__ == "ScaffoldClientModule"


def test_the_coordinator_encodes_c_once_per_request_and_checks_the_sites_states():
    hook = OutgoingModels()
    hook.set("exp", "bf16")
    c = {"scaffold": ScaffoldAuxVar(state=_vector(1))}
    messages = {n: SimpleNamespace(experiment_id="exp", params={"w": torch.ones(2)}, optim_aux_var=c) for n in ("A", "B")}
    hook(messages)
    assert messages["A"].optim_aux_var is messages["B"].optim_aux_var and aux_var_encoded(messages["A"].optim_aux_var["scaffold"])
    good = _over_the_wire({"scaffold": encode_aux_var(ScaffoldAuxVar(delta=_vector(2), clients={"a"}), "bf16", pytest.fail)})
    bad = _over_the_wire({"scaffold": encode_aux_var(ScaffoldAuxVar(delta=_vector(3), clients={"b"}), "bf16", pytest.fail)})
    bad["scaffold"].delta.coefs[WIRE_KEY][-2] ^= 4
    replies = {n: SimpleNamespace(success=True, encrypted=False, msg="", optim_aux_var=aux, node_id=n) for n, aux in (("A", good), ("B", bad), ("C", None))}
    request = SimpleNamespace(requests=[SimpleNamespace(node=SimpleNamespace(id=n), reply=r) for n, r in replies.items()])
    hook.received(request)
    assert replies["A"].success and not aux_var_encoded(replies["A"].optim_aux_var["scaffold"])
    assert replies["A"].optim_aux_var["scaffold"].delta.coefs["conv.bias"].dtype == torch.float32
    assert replies["B"].success is False and replies["B"].optim_aux_var is None and "failed its check" in replies["B"].msg
    assert replies["C"].success and replies["C"].optim_aux_var is None


def test_encoding_twice_is_refused():
    once = encode_aux_var(ScaffoldAuxVar(delta=_vector()), "bf16", pytest.fail)
    with pytest.raises(ValueError, match="already"):
        encode_aux_var(once, "bf16", pytest.fail)
    assert dataclasses.is_dataclass(once)
