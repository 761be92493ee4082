"""Segmentation training helpers (pipelines.training): the ConDistFL objective, the frozen
teacher, the schedules, checksums, whole-volume prediction and per-class Dice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.losses import ConDistDiceLoss, MarginalDiceCELoss, deep_supervision_loss
from pipelines.networks import build_network
from pipelines.training import (
    PartialLabelObjective,
    SegmentationSettings,
    class_means,
    cosine_lr,
    evaluate_case,
    frozen_teacher,
    parameter_checksum,
    parse_plan_args,
    predict,
    teacher_logits,
)
from preprocessing.schema import load_schema

N = 8  # abdominal-ct: 0 bg, 1 kidney, 2 kidney_tumor, 3 liver, 4 liver_tumor, 5 pancreas, 6 pancreas_tumor, 7 spleen
IGN = 255


@pytest.fixture(scope="module")
def schema():
    return load_schema()


@pytest.fixture(autouse=True)
def _seed_one_thread_plain_cpu_kernels():
    # Tiny networks: plain CPU kernels (no oneDNN warm-up per shape, as tests/test_networks.py) on
    # one thread. With 2 intra-op threads on a 2-core box that is busy with anything else, every
    # small op waits for a descheduled OpenMP thread: a MedNeXt-tiny step then takes seconds.
    torch.manual_seed(0)
    previous = torch.backends.mkldnn.enabled, torch.get_num_threads()
    torch.backends.mkldnn.enabled = False
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous[0]
        torch.set_num_threads(previous[1])


def _label(shape, foreground, p_ignore=0.05):
    """Random label (B, 1, *shape) with values in {0, *foreground, 255}."""
    values = torch.tensor([0, *foreground])
    lab = values[torch.randint(len(values), (shape[0], 1, *shape[1:]))]
    lab[torch.rand(lab.shape) < p_ignore] = IGN
    return lab


# --------------------------------------------------------------------------- PartialLabelObjective


def test_objective_background_groups_come_from_the_schema(schema):
    obj = PartialLabelObjective(schema, [4, 3])  # a liver + liver-tumour site, unsorted
    assert obj.foreground == [3, 4]
    assert obj.background == [0, [1, 2], [5, 6], 7]
    assert obj.background == schema.background_groups({3, 4})
    assert obj.marginal.foreground == (3, 4)
    assert obj.condist.groups == ((0,), (1, 2), (5, 6), (7,))
    assert obj.condist.temperature == 0.5
    # a site labelling the pancreas only: its tumour stays in the pancreas background group
    assert PartialLabelObjective(schema, [5]).background == [0, [1, 2], [3, 4], 6, 7]


def test_objective_empty_foreground_raises(schema):
    with pytest.raises(ValueError, match="labels no class"):
        PartialLabelObjective(schema, [])


@pytest.mark.parametrize("foreground", [[0, 3], [8], [3, 3]])
def test_objective_invalid_foreground_raises(schema, foreground):
    with pytest.raises(ValueError, match="foreground"):
        PartialLabelObjective(schema, foreground)


def test_objective_without_teacher_is_the_marginal_loss(schema):
    fg = [3, 4]
    logits = torch.randn(2, N, 8, 8, 4, requires_grad=True)
    label = _label((2, 8, 8, 4), fg)
    loss, parts = PartialLabelObjective(schema, fg)(logits, label)
    expected = MarginalDiceCELoss(fg, N, ignore_index=IGN)(logits, label)
    torch.testing.assert_close(loss, expected)
    assert set(parts) == {"sup_loss"}
    assert parts["sup_loss"] == pytest.approx(float(expected.detach()))
    assert isinstance(parts["sup_loss"], float)
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0


def test_objective_deep_supervision_is_weighted_sum_over_heads(schema):
    fg = [1, 2, 7]
    label = _label((2, 16, 16, 8), fg)
    heads = [torch.randn(2, N, 16, 16, 8), torch.randn(2, N, 8, 8, 4), torch.randn(2, N, 4, 4, 2)]
    loss, parts = PartialLabelObjective(schema, fg)(heads, label)
    marginal = MarginalDiceCELoss(fg, N, ignore_index=IGN)
    # by hand: weights 4/7, 2/7, 1/7; label nearest-downsampled to each head's size
    by_hand = sum(w * marginal(h, F.interpolate(label.float(), size=h.shape[2:], mode="nearest-exact").long()) for w, h in zip((4 / 7, 2 / 7, 1 / 7), heads))
    torch.testing.assert_close(loss, by_hand)
    torch.testing.assert_close(loss, deep_supervision_loss(heads, label, marginal))
    assert parts["sup_loss"] == pytest.approx(float(by_hand.detach()), rel=1e-5)
    # a tuple (as MedNeXt returns it) is read the same way; a one-element list is the main head alone
    torch.testing.assert_close(PartialLabelObjective(schema, fg)(tuple(heads), label)[0], loss)
    torch.testing.assert_close(PartialLabelObjective(schema, fg)([heads[0]], label)[0], marginal(heads[0], label))


def test_objective_with_teacher_adds_weighted_condist(schema):
    fg = [3, 4]
    w = 0.37
    student = torch.randn(2, N, 8, 8, 4, requires_grad=True)
    teacher = student.detach().clone()
    label = _label((2, 8, 8, 4), fg)
    obj = PartialLabelObjective(schema, fg, temperature=0.5)
    loss, parts = obj(student, label, teacher=teacher, weight=w)
    sup = MarginalDiceCELoss(fg, N, ignore_index=IGN)(student, label)
    dist = ConDistDiceLoss(N, fg, [0, [1, 2], [5, 6], 7], 0.5, ignore_index=IGN)(student, teacher, label)
    assert float(dist.detach()) > 0  # identical student and teacher: soft Dice of non-one-hot Q is not 0
    torch.testing.assert_close(loss, sup + w * dist)
    assert parts["sup_loss"] == pytest.approx(float(sup.detach()))
    assert parts["condist_loss"] == pytest.approx(float(dist.detach()))
    # weight 0: ConDist is still reported, but does not count
    loss0, parts0 = obj(student, label, teacher=teacher, weight=0.0)
    torch.testing.assert_close(loss0, sup)
    assert parts0["condist_loss"] == pytest.approx(float(dist.detach()))


def test_objective_temperature_is_passed_to_condist(schema):
    fg = [1]
    student, teacher = torch.randn(2, N, 4, 4, 4), torch.randn(2, N, 4, 4, 4)
    label = _label((2, 4, 4, 4), fg)
    _, hot = PartialLabelObjective(schema, fg, temperature=2.0)(student, label, teacher=teacher, weight=1.0)
    expected = ConDistDiceLoss(N, fg, schema.background_groups({1}), 2.0)(student, teacher, label)
    assert hot["condist_loss"] == pytest.approx(float(expected.detach()))
    _, cold = PartialLabelObjective(schema, fg, temperature=0.5)(student, label, teacher=teacher, weight=1.0)
    assert hot["condist_loss"] != pytest.approx(cold["condist_loss"])


def test_objective_condist_uses_main_head_only(schema):
    fg = [5, 6]
    label = _label((2, 16, 16, 8), fg)
    heads = [torch.randn(2, N, 16, 16, 8), torch.randn(2, N, 8, 8, 4)]
    teacher = torch.randn(2, N, 16, 16, 8)
    loss, parts = PartialLabelObjective(schema, fg)(heads, label, teacher=teacher, weight=0.5)
    dist = ConDistDiceLoss(N, fg, schema.background_groups({5, 6}), 0.5)(heads[0], teacher, label)
    sup = deep_supervision_loss(heads, label, MarginalDiceCELoss(fg, N))
    torch.testing.assert_close(loss, sup + 0.5 * dist)
    assert parts["condist_loss"] == pytest.approx(float(dist.detach()))


def test_objective_teacher_gets_no_gradient_student_does(schema):
    fg = [3, 4]
    student = torch.randn(2, N, 8, 8, 4, requires_grad=True)
    teacher = torch.randn(2, N, 8, 8, 4, requires_grad=True)  # even a graph-attached teacher
    label = _label((2, 8, 8, 4), fg)
    loss, _ = PartialLabelObjective(schema, fg)(student, label, teacher=teacher, weight=1.0)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    # the ConDist part alone still moves the student (distillation has a gradient)
    student.grad = None
    obj = PartialLabelObjective(schema, fg)
    with_dist, _ = obj(student, label, teacher=teacher.detach(), weight=1.0)
    without, _ = obj(student, label)
    (with_dist - without).backward()
    assert teacher.grad is None
    assert float(student.grad.abs().sum()) > 0


def test_objective_2d_heads(schema):
    fg = [7]
    label = _label((3, 16, 16), fg)
    heads = (torch.randn(3, N, 16, 16), torch.randn(3, N, 8, 8))
    loss, _ = PartialLabelObjective(schema, fg, spatial_dims=2)(heads, label)
    torch.testing.assert_close(loss, deep_supervision_loss(list(heads), label, MarginalDiceCELoss(fg, N)))


# --------------------------------------------------------------------------- frozen teacher


def _tiny_mednext(deep_supervision=True, dims=3):
    return build_network("mednext", size="tiny", spatial_dims=dims, in_channels=1, out_channels=N,
                         deep_supervision=deep_supervision)  # fmt: skip


def test_frozen_teacher_is_an_independent_frozen_copy():
    student = _tiny_mednext()
    student.train()
    teacher = frozen_teacher(student)
    assert teacher is not student
    assert student.training, "the student is left in training mode"
    assert all(p.requires_grad for p in student.parameters()), "the student still trains"
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    # no shared storage: changing the student later leaves the teacher as it was
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_teacher_logits_main_head_without_graph_even_in_train_mode():
    model = _tiny_mednext(deep_supervision=True)
    x = torch.randn(2, 1, 32, 16, 16)
    model.train()
    heads = model(x)
    assert isinstance(heads, (list, tuple)) and len(heads) > 1  # deep supervision in train mode
    teacher = frozen_teacher(model)
    out = teacher_logits(teacher, x, 3)
    assert isinstance(out, torch.Tensor) and out.shape == (2, N, 32, 16, 16)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, heads[0].detach())
    teacher.train()  # a teacher put back in train mode returns all heads: still the main one
    out_train = teacher_logits(teacher, x, 3)
    assert out_train.shape == (2, N, 32, 16, 16) and not out_train.requires_grad
    torch.testing.assert_close(out_train, out)
    # even a trainable (not frozen) model builds no graph in teacher_logits
    assert not teacher_logits(model, x, 3).requires_grad


def test_teacher_logits_2d():
    model = _tiny_mednext(deep_supervision=True, dims=2)
    model.train()
    x = torch.randn(3, 1, 32, 16)
    out = teacher_logits(model, x, 2)
    assert out.shape == (3, N, 32, 16) and not out.requires_grad


def test_student_teacher_objective_end_to_end(schema):
    """One training step: student gets gradients, the frozen teacher's weights get none."""
    student = _tiny_mednext(deep_supervision=True)
    student.train()
    teacher = frozen_teacher(student)
    x = torch.randn(2, 1, 32, 16, 16)
    label = _label((2, 32, 16, 16), [3, 4])
    outputs = student(x)
    loss, parts = PartialLabelObjective(schema, [3, 4])(outputs, label, teacher=teacher_logits(teacher, x, 3), weight=1.0)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and set(parts) == {"sup_loss", "condist_loss"}
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in student.parameters())


# --------------------------------------------------------------------------- schedule and checksum


def test_cosine_lr():
    base = 0.02
    assert cosine_lr(base, 0, 100) == pytest.approx(base)
    assert cosine_lr(base, 100, 100) == pytest.approx(0.0, abs=1e-15)
    assert cosine_lr(base, 50, 100) == pytest.approx(base / 2)
    assert cosine_lr(base, 25, 100) == pytest.approx(base * 0.5 * (1 + math.cos(math.pi / 4)))
    # clamped outside [0, total]
    assert cosine_lr(base, -5, 100) == pytest.approx(base)
    assert cosine_lr(base, 250, 100) == pytest.approx(0.0, abs=1e-15)
    # monotonically non-increasing
    values = [cosine_lr(base, s, 37) for s in range(38)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    # no schedule to follow: the base rate
    assert cosine_lr(base, 3, 0) == base


def test_parameter_checksum():
    a = torch.randn(3, 4)
    b = torch.randn(5)
    s, sq = parameter_checksum({"w": a, "b": b})
    assert s == pytest.approx(float(a.double().sum() + b.double().sum()))
    assert sq == pytest.approx(float((a.double() ** 2).sum() + (b.double() ** 2).sum()))
    # same values, other order / other container: same checksum
    assert parameter_checksum({"b": b.clone(), "w": a.clone()}) == (s, sq)
    assert parameter_checksum([("b", b), ("w", a)]) == (s, sq)
    # a tiny change shows
    a2 = a.clone()
    a2[1, 2] += 1e-4
    assert parameter_checksum({"w": a2, "b": b}) != (s, sq)
    # a sign flip keeps the sum of squares but not the sum
    b2 = b.clone()
    b2[0] = -b2[0]
    s2, sq2 = parameter_checksum({"w": a, "b": b2})
    assert sq2 == pytest.approx(sq) and s2 != pytest.approx(s)


def test_parameter_checksum_of_a_model_and_its_copy():
    model = build_network("basic_unet", spatial_dims=3, out_channels=N, features=(2, 2, 4, 4, 8, 2))
    params = dict(model.named_parameters())
    teacher = frozen_teacher(model)
    assert parameter_checksum(dict(teacher.named_parameters())) == parameter_checksum(params)
    assert parameter_checksum(dict(reversed(list(params.items())))) == parameter_checksum(params)
    assert parameter_checksum(model.state_dict()) == parameter_checksum(teacher.state_dict())
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert parameter_checksum(dict(model.named_parameters())) != parameter_checksum(dict(teacher.named_parameters()))


# --------------------------------------------------------------------------- prediction and evaluation


class IntensityToClass(torch.nn.Module):
    """Voxel-wise classifier: logit_c = -10 (x - c)^2, so argmax is the nearest class id to the
    intensity. Works on 2D or 3D inputs of any size (like a 1x1 convolution)."""

    def __init__(self, num_classes=N, deep_supervision=False):
        super().__init__()
        self.classes = torch.nn.Parameter(torch.arange(num_classes, dtype=torch.float32), requires_grad=False)
        self.deep_supervision = deep_supervision

    def forward(self, x):
        c = self.classes.view(1, -1, *([1] * (x.dim() - 2)))
        logits = -10.0 * (x[:, :1] - c) ** 2
        if self.training and self.deep_supervision:  # like MedNeXt: (main, half-resolution head)
            return logits, -logits[(slice(None), slice(None), *[slice(None, None, 2)] * (x.dim() - 2))]
        return logits


SHAPE = (40, 36, 20)


def _phantom_label():
    lab = torch.zeros(1, *SHAPE, dtype=torch.long)
    lab[0, 4:16, 5:20, 2:12] = 3  # liver
    lab[0, 8:12, 9:13, 5:9] = 4  # liver tumour inside it
    lab[0, 22:30, 20:30, 6:16] = 1  # kidney
    lab[0, 32:38, 2:8, 14:18] = 7  # spleen
    return lab


def _settings(schema, dims=3, **extra):
    if dims == 3:
        args = {"roi_size": [32, 16, 16], "network": {"name": "mednext", "size": "tiny"}, **extra}
    else:
        args = {"roi_size": [32, 16], "network": {"name": "mednext", "size": "tiny", "spatial_dims": 2}, **extra}
    return parse_plan_args(args, schema)


def test_predict_3d_reproduces_the_label_and_restores_mode(schema):
    label = _phantom_label()
    model = IntensityToClass()
    model.train()
    pred = predict(model, label.float(), _settings(schema))
    assert pred.shape == SHAPE
    assert torch.equal(pred, label[0])
    assert model.training, "the model's mode is restored"
    model.eval()
    predict(model, label.float(), _settings(schema))
    assert not model.training


def test_predict_3d_uses_the_main_head_of_deep_supervision_outputs(schema):
    label = _phantom_label()
    model = IntensityToClass(deep_supervision=True)
    model.train()
    assert isinstance(model(label[None].float()), tuple)
    pred = predict(model, label.float(), _settings(schema, inference={"overlap": 0.5, "sw_batch_size": 3}))
    assert torch.equal(pred, label[0])


def test_predict_2d_segments_slice_wise(schema):
    label = _phantom_label()
    settings = _settings(schema, dims=2)
    assert settings.spatial_dims == 2 and settings.inference_roi == (32, 16, 1)
    seen_shapes = []

    class Recorder(IntensityToClass):
        def forward(self, x):
            seen_shapes.append(tuple(x.shape))
            return super().forward(x)

    model = Recorder(deep_supervision=True)
    model.train()
    pred = predict(model, label.float(), settings)
    assert pred.shape == SHAPE
    assert torch.equal(pred, label[0])
    assert seen_shapes and all(len(s) == 4 and s[2:] == (32, 16) for s in seen_shapes), "2D (B, C, X, Y) windows"


def test_predict_2d_restores_eval_mode(schema):
    model = IntensityToClass()
    model.eval()
    predict(model, _phantom_label().float(), _settings(schema, dims=2))
    assert not model.training


def test_evaluate_case_perfect_model(schema):
    label = _phantom_label()
    classes = list(range(1, N))
    scores = evaluate_case(IntensityToClass(), label.float(), label, _settings(schema), classes)
    assert set(scores) == set(classes)
    for c in (1, 3, 4, 7):  # present: perfect
        assert scores[c] == pytest.approx(1.0)
    for c in (2, 5, 6):  # absent from reference and prediction: not scored
        assert math.isnan(scores[c])
    # a subset of classes is scored alone; a (X, Y, Z) label works as well as (1, X, Y, Z)
    assert evaluate_case(IntensityToClass(), label.float(), label[0], _settings(schema), [3]) == {3: pytest.approx(1.0)}


def test_evaluate_case_imperfect_model_and_ignore_label(schema):
    label = _phantom_label()
    image = label.float().clone()
    image[0, 22:26, 20:30, 6:16] = 0.0  # the model misses the first 4 of 8 kidney rows
    image[0, 0:2, 0:4, 0:4] = 5.0  # and predicts pancreas where there is none
    scores = evaluate_case(IntensityToClass(), image, label, _settings(schema), [1, 3, 5])
    assert scores[1] == pytest.approx(2 * 400 / (800 + 400))
    assert scores[3] == pytest.approx(1.0)
    assert scores[5] == 0.0  # a false positive of an absent class is an error, not NaN
    # voxels with the ignore label are left out of both sides
    ignored = label.clone()
    ignored[0, 22:26, 20:30, 6:16] = IGN
    ignored[0, 0:2, 0:4, 0:4] = IGN
    scores = evaluate_case(IntensityToClass(), image, ignored, _settings(schema), [1, 3, 5])
    assert scores[1] == pytest.approx(1.0) and scores[3] == pytest.approx(1.0) and math.isnan(scores[5])


def test_evaluate_case_merge_lesion_classes(schema):
    label = _phantom_label()
    image = label.float().clone()
    image[image == 4] = 3.0  # the model sees no tumour: all liver
    plain = evaluate_case(IntensityToClass(), image, label, _settings(schema), [3, 4])
    liver_voxels, tumour_voxels = int((label == 3).sum()), int((label == 4).sum())
    assert plain[4] == 0.0
    assert plain[3] == pytest.approx(2 * liver_voxels / (2 * liver_voxels + tumour_voxels))
    merged = evaluate_case(IntensityToClass(), image, label, _settings(schema), [1, 3, 4, 7], merge_lesion_classes=True)
    assert merged[3] == pytest.approx(1.0)  # tumour merged into the liver on both sides
    assert math.isnan(merged[4])  # no lesion class left after merging
    assert merged[1] == pytest.approx(1.0) and merged[7] == pytest.approx(1.0)


def test_evaluate_case_2d(schema):
    label = _phantom_label()
    scores = evaluate_case(IntensityToClass(), label.float(), label, _settings(schema, dims=2), [1, 2, 3, 4, 7])
    assert scores[1] == scores[3] == scores[4] == scores[7] == pytest.approx(1.0)
    assert math.isnan(scores[2])


def test_evaluate_case_with_a_real_tiny_network(schema):
    """Shapes and score ranges with an untrained MedNeXt (the plans' default backbone)."""
    settings = _settings(schema)
    model = build_network(**settings.network, out_channels=schema.num_classes)
    label = _phantom_label()
    pred = predict(model, torch.randn(1, *SHAPE), settings)
    assert pred.shape == SHAPE and pred.dtype == torch.int64
    assert int(pred.min()) >= 0 and int(pred.max()) < N
    scores = evaluate_case(model, torch.randn(1, *SHAPE), label, settings, [1, 3])
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in scores.values())


def test_segmentation_settings_properties(schema):
    settings = _settings(schema)
    assert isinstance(settings, SegmentationSettings)
    assert settings.num_classes == 8 and settings.spatial_dims == 3
    assert settings.inference_roi == (32, 16, 16)


# --------------------------------------------------------------------------- class means


def test_class_means():
    nan = float("nan")
    per_case = [
        {1: 0.8, 3: nan, 4: 0.2},
        {1: 0.6, 3: 0.9, 4: nan},
        {1: nan, 3: 0.7},  # class 4 not scored in this case
    ]
    means = class_means(per_case, [1, 3, 4, 5, 7])
    assert means == {1: pytest.approx(0.7), 3: pytest.approx(0.8), 4: pytest.approx(0.2)}
    assert 5 not in means and 7 not in means  # never scored (or only NaN): left out, not NaN
    assert class_means([{2: nan}, {2: nan}], [2]) == {}
    assert class_means([], [1, 2]) == {}
    assert class_means(per_case, [4]) == {4: pytest.approx(0.2)}
    assert all(isinstance(v, float) for v in means.values())
    assert not any(np.isnan(v) for v in means.values())
