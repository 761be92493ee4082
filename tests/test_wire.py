"""Issue 27, part 2: models travel as one checked buffer, optionally in 16 bits, and are averaged in float32.

`pipelines.wire` encodes and decodes; the plans' `WireTransfer` encodes a node's update and checks
what it receives; the coordinator's `OutgoingModels` encodes the global model of a training
request, and `SampledSitesStrategy.refine` checks and decodes the sites' updates before
averaging. Fed-BioMed's own serializer carries every message here, as on the wire.
tests/integration/test_federation.py runs a bf16 federation through real nodes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from fedbiomed.common.serializer import Serializer

from coordinator.fedbiomed_hooks import OutgoingModels
from coordinator.strategy import SampledSitesStrategy
from pipelines.networks import build_network
from pipelines.wire import WIRE_KEY, WireChecksumError, decode_params, encode_params, merge_received, transfer_precision

# rounding error of one value: half a unit in the last place of each format's mantissa (relative), and half the
# spacing of fp16's subnormals below its smallest normal value, 6.1e-5 (absolute)
ROUNDING = {"fp32": 0.0, "bf16": 2.0**-8, "fp16": 2.0**-11}
SUBNORMAL = {"fp32": 0.0, "bf16": 0.0, "fp16": 2.0**-25}


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = build_network("dynunet", spatial_dims=3, in_channels=1, out_channels=3, size="tiny")
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _over_the_wire(params: dict) -> dict:
    """What arrives: Fed-BioMed's msgpack serializer, both ways."""
    return Serializer.loads(Serializer.dumps(params))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_model_round_trips_within_its_precision_and_comes_back_float32(precision):
    state = _state()
    received = decode_params(_over_the_wire(encode_params(state, precision)))
    assert list(received) == list(state)  # names and their order
    for name, value in state.items():
        got = received[name]
        assert got.shape == value.shape
        if value.is_floating_point():
            assert got.dtype == torch.float32
            err = (got - value).abs()
            assert torch.all(err <= value.abs() * ROUNDING[precision] + SUBNORMAL[precision]), name  # round to nearest
            if precision == "fp32":
                assert torch.equal(got, value)
        else:  # BatchNorm/InstanceNorm counters travel unchanged
            assert got.dtype == value.dtype and torch.equal(got, value)
    if precision != "fp32":
        assert any(not torch.equal(received[k], state[k]) for k in state if state[k].is_floating_point())  # it did round


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_int_buffers_after_any_number_of_bytes_decode(precision):
    # BatchNorm's int64 counters sit after float tensors of any length: the buffer packs them at odd offsets
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 1, 1), torch.nn.BatchNorm2d(1))
    state = {**net.state_dict(), "odd": torch.ones(3, dtype=torch.bool), "after_odd": torch.tensor(5), "half": torch.ones(3, dtype=torch.float16)}
    received = decode_params(_over_the_wire(encode_params(state, precision)))
    assert set(received) == set(state)
    assert all(torch.equal(received[k], state[k]) for k in state if not state[k].is_floating_point())
    assert received["half"].dtype == torch.float32 and torch.equal(received["half"], torch.ones(3))


def _forged(state: dict, edit) -> dict:
    """A wire buffer whose record was edited and whose digest was recomputed (anyone can compute a SHA-256)."""
    import json
    import zlib

    from pipelines import wire

    buf = encode_params(state, "fp32")[WIRE_KEY].numpy().tobytes()
    n = int.from_bytes(buf[:8], "little")
    record, data = json.loads(zlib.decompress(buf[8 : 8 + n])), buf[8 + n :]
    edit(record)
    record["sha256"] = wire._digest(json.dumps(record["layout"], separators=(",", ":")).encode(), torch.frombuffer(bytearray(data), dtype=torch.uint8).numpy())
    packed = zlib.compress(json.dumps(record).encode())
    return {WIRE_KEY: torch.frombuffer(bytearray(len(packed).to_bytes(8, "little") + packed + data), dtype=torch.uint8)}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda r: r["layout"][0].__setitem__(2, [1000, 1000]), "runs past"),
        (lambda r: r["layout"][0].__setitem__(2, [-1, 4]), "non-negative"),
        (lambda r: r["layout"][0].__setitem__(1, "torch.complex64"), "not carried"),
        (lambda r: r["layout"].append(["x"]), "malformed"),
        (lambda r: r["layout"].pop(), "covers"),
    ],
)
def test_a_forged_layout_with_a_matching_digest_is_refused_not_crashing(edit, message):
    with pytest.raises(WireChecksumError, match=message):
        decode_params(_forged({"w": torch.ones(2, 3), "b": torch.zeros(3)}, edit))


def test_a_record_that_inflates_without_end_is_refused():
    import zlib

    bomb = zlib.compress(b"[" * (80 << 20), 9)  # 80 MB of text from ~80 kB
    buf = torch.frombuffer(bytearray(len(bomb).to_bytes(8, "little") + bomb), dtype=torch.uint8)
    with pytest.raises(WireChecksumError, match="inflates beyond"):
        decode_params({WIRE_KEY: buf})


def test_sixteen_bits_halve_the_serialized_model_and_one_buffer_drops_the_per_tensor_framing():
    state = _state()
    plain = len(Serializer.dumps(state))  # Fed-BioMed's own form: each tensor framed on its own
    raw = sum(v.numel() * v.element_size() for v in state.values())
    fp32 = len(Serializer.dumps(encode_params(state, "fp32")))
    bf16 = len(Serializer.dumps(encode_params(state, "bf16")))
    assert plain - raw > 40 * len(state)  # ~70 bytes of name and type tags per tensor
    assert fp32 < plain and (fp32 - raw) < 0.5 * (plain - raw)  # one framed buffer and a compressed layout
    floats = sum(v.numel() * v.element_size() for v in state.values() if v.is_floating_point())
    assert bf16 - (fp32 - floats // 2) == pytest.approx(0, abs=64)  # exactly half the floating bytes (layout text aside)
    assert bf16 / raw < 0.51


@pytest.mark.parametrize("where", ["data", "record"])
def test_a_changed_byte_fails_the_checksum(where):
    sent = _over_the_wire(encode_params(_state(), "bf16"))
    buf = sent[WIRE_KEY].clone()
    buf[-5 if where == "data" else 20] ^= 0x10
    with pytest.raises(WireChecksumError):
        decode_params({WIRE_KEY: buf})


def test_a_truncated_or_mixed_message_is_refused():
    sent = encode_params(_state(), "fp32")
    with pytest.raises(WireChecksumError, match="checksum mismatch|layout covers"):
        decode_params({WIRE_KEY: sent[WIRE_KEY][:-100]})
    with pytest.raises(WireChecksumError, match="cut short"):
        decode_params({WIRE_KEY: sent[WIRE_KEY][:12]})
    with pytest.raises(WireChecksumError, match="besides its buffer"):
        decode_params({**sent, "extra.weight": torch.zeros(1)})


def test_fp16_refuses_a_value_beyond_its_range_and_names_the_parameter():
    with pytest.raises(ValueError, match=r"head\.bias: values beyond fp16's range"):
        encode_params({"head.weight": torch.ones(2), "head.bias": torch.tensor([7.0e4])}, "fp16")
    big = decode_params(encode_params({"b": torch.tensor([7.0e4, -3.0e38])}, "bf16"))["b"]  # bf16 keeps float32's range
    assert torch.isfinite(big).all() and big[0] == pytest.approx(7.0e4, rel=2**-8)


def test_plain_tensors_pass_unchecked_and_received_ones_win_a_merge():
    assert decode_params({"w": torch.ones(2, dtype=torch.float64)})["w"].dtype == torch.float32  # Fed-BioMed's own form
    received = encode_params({"w": torch.full((2,), 3.0)}, "bf16")
    merged = merge_received({"w": torch.zeros(2), "local.v": torch.ones(1), **received})  # a node's {**initial, **received}
    assert set(merged) == {"w", "local.v"} and torch.equal(merged["w"], torch.full((2,), 3.0)) and torch.equal(merged["local.v"], torch.ones(1))


def test_the_precision_comes_from_the_model_args():
    assert transfer_precision({"transfer": {"precision": "bf16"}}) == "bf16"
    assert transfer_precision({}) is None  # an older coordinator: plain tensors both ways
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        transfer_precision({"transfer": {"precision": "int8"}})


def _reply(value: float, precision: str, samples: int = 10) -> dict:
    return {"success": True, "params": _over_the_wire(encode_params({"w": torch.tensor([value, 1.0 / 3.0])}, precision)), "sample_size": samples,
            "msg": ""}  # fmt: skip


def test_the_strategy_averages_float32_and_leaves_out_an_update_that_fails_its_check():
    from fedbiomed.researcher.aggregators import FedAverage

    strategy = SampledSitesStrategy(None, seed=0, uniform=True, min_per_round=2)
    strategy.sample_nodes(["A", "B", "C"], 0)
    replies = {"A": _reply(1.0, "bf16"), "B": _reply(100.0, "bf16"), "C": _reply(3.0, "bf16")}
    replies["B"]["params"][WIRE_KEY][-1] ^= 1  # B's update changed on its way
    params, weights, _, _ = strategy.refine(replies, 0)
    assert set(params) == {"A", "C"} and weights == pytest.approx({"A": 0.5, "C": 0.5})
    assert "failed its check" in strategy.rejected[0]["B"] and "checksum mismatch" in strategy.rejected[0]["B"]
    aggregate = FedAverage().aggregate(params, weights)["w"]
    third = float(torch.tensor(1.0 / 3.0).to(torch.bfloat16).float())
    assert aggregate.dtype == torch.float32 and aggregate.tolist() == pytest.approx([2.0, third])  # no B; averaged in float32
    strategy.require_wire_form(True)  # the experiment's sites send the wire form: a plain update is refused, not trusted
    strategy.sample_nodes(["A", "C"], 1)
    plain = {"A": _reply(1.0, "bf16"), "C": {**_reply(3.0, "bf16"), "params": {"w": torch.tensor([9.0, 9.0])}}}
    with pytest.raises(Exception, match="1 of 2 sites answered"):  # C left out, below the quorum of 2
        strategy.refine(plain, 1)
    assert "plain tensors" in strategy.rejected[1]["C"]


def test_outgoing_models_encode_each_training_request_once_for_the_experiments_set():
    hook = OutgoingModels()
    hook.set("exp-bf16", "bf16")
    hook.set("exp-old", None)  # a run from before wire forms: its sites expect plain tensors
    shared = {"w": torch.tensor([1.0, 2.0])}  # Fed-BioMed's training job gives every site the same mapping
    messages = {n: SimpleNamespace(experiment_id="exp-bf16", params=shared) for n in ("A", "B")}
    hook(messages)
    assert messages["A"].params is messages["B"].params and set(messages["A"].params) == {WIRE_KEY}
    assert torch.equal(decode_params(messages["A"].params)["w"], shared["w"])
    hook(messages)  # already encoded: left as it is
    assert set(messages["A"].params) == {WIRE_KEY}
    old = {"A": SimpleNamespace(experiment_id="exp-old", params=dict(shared))}
    hook(old)
    assert set(old["A"].params) == {"w"}
    hook.set("exp-fp16", "fp16")  # a value fp16 cannot hold: that model goes in fp32, the run goes on
    big = {"A": SimpleNamespace(experiment_id="exp-fp16", params={"w": torch.tensor([7.0e4, 1.0 / 3.0])})}
    hook(big)
    assert torch.equal(decode_params(big["A"].params)["w"], torch.tensor([7.0e4, 1.0 / 3.0]))  # every float32 bit


def test_the_plan_sends_its_update_in_the_wire_form_and_checks_what_it_receives(site_process):
    from coordinator.plans import model_args_for
    from pipelines.plans.marginal import MarginalSegmentationPlan
    from tests.test_split_data import _training_args

    args = model_args_for("marginal", {"network": {"name": "basic_unet", "size": "tiny"}, "roi_size": 32, "spacing": "native"})
    args.update(run_id="run-wire", rounds_total=2, local_steps=1, transfer={"precision": "bf16"}, split={"validation": 0.0, "test": 0.0, "seed": 0})
    plan = MarginalSegmentationPlan()
    plan.post_init(args, _training_args(0.0), node_id="NODE_A", round=0)
    sent = plan.after_training_params()
    assert set(sent) == {WIRE_KEY}
    state = {k: v.detach().clone() for k, v in plan.model().state_dict().items()}
    assert all(torch.allclose(decode_params(sent)[k], state[k], rtol=2**-8, atol=0) for k in state if state[k].is_floating_point())
    doubled = encode_params({k: v * 2 if v.is_floating_point() else v for k, v in state.items()}, "fp32")
    plan.set_model_params({**state, **doubled})  # the node merges what it received over its initial weights
    assert all(torch.equal(plan.model().state_dict()[k], state[k] * 2) for k in state if state[k].is_floating_point())
    doubled[WIRE_KEY][-1] ^= 1
    with pytest.raises(WireChecksumError):
        plan.set_model_params({**state, **doubled})
    assert set(plan.after_training_params(flatten=True)) != {WIRE_KEY}  # secure aggregation's flat vector: sent as it is


SPEC = """\
name: wire
plan: condistfl
sites: {tags: [demo], min_sites: 2}
rounds: 2
"""


def test_the_spec_sends_its_transfer_precision_to_the_sites_and_refuses_it_with_secagg():
    from conftest import spec_problems

    from coordinator import spec as spec_mod

    assert spec_mod.parse(SPEC, "exp.yaml").experiment_model_args()["transfer"] == {"precision": "fp32", "states": True}  # exact, checked; SCAFFOLD's too
    assert spec_mod.parse(SPEC + "transfer: {precision: bf16}\n", "exp.yaml").experiment_model_args()["transfer"] == {"precision": "bf16", "states": True}
    problems = spec_problems(SPEC + "transfer: {precision: int8}\n")
    assert "fp32, bf16, fp16" in problems["transfer.precision"]
    problems = spec_problems(SPEC + "transfer: {precision: fp16}\nsecagg: {}\n")
    assert "cannot be combined with secagg" in problems["transfer.precision"]
    problems = spec_problems(SPEC + "plan_args: {transfer: {precision: bf16}}\n")  # filled in by the coordinator, not a plan argument
    assert "filled in by the coordinator" in problems["plan_args.transfer"]
