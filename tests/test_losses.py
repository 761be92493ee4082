"""ConDistFL losses: formulas on hand-computed cases, invariances, masking, gradients, stability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from pipelines.losses import ConDistDiceLoss, MarginalDiceCELoss, deep_supervision_loss, lambda_schedule

IGN = 255


def _np_softmax(z, axis=1):
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _np_marginal(logits, label, foreground):
    """Independent numpy reference: merged (B_k, *F_k) softmax Dice + CE, (B, C, N) / (B, N)."""
    logits = np.asarray(logits, dtype=np.float64)
    label = np.asarray(label)
    C = logits.shape[1]
    bg = [c for c in range(C) if c not in foreground]
    p = _np_softmax(logits)
    pm = np.concatenate([p[:, bg].sum(1, keepdims=True), p[:, foreground]], axis=1)
    valid = label != IGN
    merged = np.zeros_like(label)
    for i, f in enumerate(foreground):
        merged[label == f] = i + 1
    y = np.stack([(merged == k) & valid for k in range(len(foreground) + 1)], axis=1).astype(float)
    pm_v = pm * valid[:, None]
    dice = np.mean(1 - 2 * (pm_v * y).sum((0, 2)) / (pm_v.sum((0, 2)) + y.sum((0, 2)) + 1e-5))
    ptrue = np.take_along_axis(pm, merged[:, None], axis=1)[:, 0]
    ce = -np.log(ptrue[valid]).mean()
    return dice, ce


def _np_condist(s, t, label, foreground, groups, tau):
    s = np.asarray(s, np.float64)
    t = np.asarray(t, np.float64)

    def cond(z):
        q = _np_softmax(z / tau)
        f = q[:, foreground].sum(1)
        G = np.stack([q[:, list(np.atleast_1d(g))].sum(1) for g in groups], 1)
        return G / (1 - f + 1e-5)[:, None]

    mask = ~(np.isin(t.argmax(1), foreground) | np.isin(label, foreground) | (label == IGN))
    qs, qt = cond(s) * mask[:, None], cond(t) * mask[:, None]
    return np.mean(1 - 2 * (qs * qt).sum((0, 2)) / (qs.sum((0, 2)) + qt.sum((0, 2)) + 1e-5))


# --------------------------------------------------------------------------- marginal loss


def test_marginal_hand_computed_two_voxels():
    # 2 voxels, 3 classes, the site labels class 1 only: merged channels (0+2, 1).
    z = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]).T.reshape(1, 3, 2)  # (B=1, C=3, N=2)
    label = torch.tensor([[1, 2]])  # voxel a = class 1, voxel b = unlabeled class 2 -> merged background
    # numpy by hand: p_a = (.24473, .66524, .09003), p_b = (.04528, .04528, .90944)
    # merged p_a = (.33476, .66524), p_b = (.95472, .04528); merged y_a = (0, 1), y_b = (1, 0)
    # dice = mean(1 - 2*.95472/(1.28948+1+1e-5), 1 - 2*.66524/(.71052+1+1e-5)) = 0.1940889
    # ce = -(log .66524 + log .95472)/2 = 0.2269708
    dice, ce = _np_marginal(z.numpy(), label.numpy(), [1])
    assert dice == pytest.approx(0.1940888948, abs=1e-8)
    assert ce == pytest.approx(0.2269707846, abs=1e-8)
    loss = MarginalDiceCELoss([1], 3)(z, label)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(0.4210596795, abs=1e-5)
    # weights
    only_dice = MarginalDiceCELoss([1], 3, lambda_dice=1.0, lambda_ce=0.0)(z, label)
    only_ce = MarginalDiceCELoss([1], 3, lambda_dice=0.0, lambda_ce=1.0)(z, label)
    assert only_dice.item() == pytest.approx(0.1940889, abs=1e-5)
    assert only_ce.item() == pytest.approx(0.2269708, abs=1e-5)
    weighted = MarginalDiceCELoss([1], 3, lambda_dice=0.5, lambda_ce=2.0)(z, label)
    assert weighted.item() == pytest.approx(0.5 * 0.1940889 + 2 * 0.2269708, abs=1e-5)


def test_marginal_ce_is_not_double_softmax():
    # The public implementation's bug: CE(logits=merged probabilities). Must differ from ours.
    z = torch.tensor([[4.0, -2.0, 1.0]]).reshape(1, 3, 1)
    label = torch.tensor([[0]])
    ce = MarginalDiceCELoss([1], 3, lambda_dice=0.0)(z, label).item()
    p = torch.softmax(z, 1)
    merged = torch.cat([p[:, [0, 2]].sum(1, keepdim=True), p[:, [1]]], 1)
    double = torch.nn.functional.cross_entropy(merged, torch.tensor([[0]])).item()
    expected = -np.log(float(merged[0, 0, 0]))
    assert ce == pytest.approx(expected, abs=1e-6)
    assert abs(ce - double) > 0.1


@pytest.mark.parametrize("spatial", [(5, 6), (3, 4, 5)])
@pytest.mark.parametrize("channel_dim", [True, False])
def test_marginal_matches_numpy_random(spatial, channel_dim):
    g = torch.Generator().manual_seed(0)
    C = 6
    z = torch.randn(2, C, *spatial, generator=g) * 3
    label = torch.randint(0, C, (2, *spatial), generator=g)
    label[0, 0] = IGN
    fg = [2, 5]
    dice, ce = _np_marginal(z.reshape(2, C, -1).numpy(), label.reshape(2, -1).numpy(), fg)
    lab = label.unsqueeze(1) if channel_dim else label
    loss = MarginalDiceCELoss(fg, C)(z, lab)
    assert loss.item() == pytest.approx(dice + ce, abs=1e-5)


@pytest.mark.parametrize("spatial", [(7, 5), (4, 3, 5)])
def test_marginal_equals_plain_dice_ce_when_all_labeled(spatial):
    g = torch.Generator().manual_seed(1)
    C = 4
    z = torch.randn(3, C, *spatial, generator=g) * 2
    label = torch.randint(0, C, (3, 1, *spatial), generator=g)
    ours = MarginalDiceCELoss([1, 2, 3], C)(z, label)
    ref = DiceCELoss(softmax=True, to_onehot_y=True, batch=True, smooth_nr=0.0, smooth_dr=1e-5)(z, label)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)


def test_marginal_merge_invariance():
    # moving probability mass between two unlabeled classes (0 and 2, and 2 and 3) changes nothing
    g = torch.Generator().manual_seed(2)
    C = 4
    p = torch.softmax(torch.randn(2, C, 6, 6, generator=g), 1)
    label = torch.randint(0, C, (2, 6, 6), generator=g)
    loss = MarginalDiceCELoss([1], C)
    base = loss(torch.log(p), label)
    moved = p.clone()
    frac = torch.rand(2, 6, 6, generator=g)
    pool = p[:, 0] + p[:, 2] + p[:, 3]
    moved[:, 0], moved[:, 2], moved[:, 3] = frac * pool * 0.5, (1 - frac) * pool * 0.5, pool * 0.5
    assert not torch.allclose(moved, p)
    assert loss(torch.log(moved) + 7.0, label).item() == pytest.approx(base.item(), abs=1e-5)
    # but moving mass into the labeled class does change it
    other = p.clone()
    other[:, 1], other[:, 0] = p[:, 0], p[:, 1]
    assert abs(loss(torch.log(other), label).item() - base.item()) > 1e-3


def test_marginal_ignore_label_contributes_nothing():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 5, 5, generator=g)
    label = torch.randint(0, 4, (2, 1, 5, 5), generator=g)
    label[:, :, :2] = IGN
    loss = MarginalDiceCELoss([1, 3], 4)
    base = loss(z, label)
    z2 = z.clone()
    z2[:, :, :2] = torch.randn(2, 4, 2, 5, generator=g) * 50
    assert loss(z2, label).item() == pytest.approx(base.item(), abs=1e-6)
    # equal to the loss on the cropped, un-ignored region
    assert loss(z[:, :, 2:], label[:, :, 2:]).item() == pytest.approx(base.item(), abs=1e-5)
    # gradient is zero at ignored voxels
    zz = z.clone().requires_grad_(True)
    loss(zz, label).backward()
    assert torch.all(zz.grad[:, :, :2] == 0) and zz.grad[:, :, 2:].abs().sum() > 0
    # all ignored: finite, CE 0, Dice 1 per channel
    allign = torch.full_like(label, IGN)
    assert loss(z, allign).item() == pytest.approx(1.0)


def test_marginal_saturated_and_autocast():
    g = torch.Generator().manual_seed(4)
    C = 5
    label = torch.randint(0, C, (2, 1, 4, 4, 4), generator=g)
    sat = (torch.randint(0, 2, (2, C, 4, 4, 4), generator=g).float() * 2 - 1) * 1e4
    sat.requires_grad_(True)
    loss = MarginalDiceCELoss([1, 2], C)(sat, label)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sat.grad).all()
    # fp16 / bf16 logits and autocast
    z = torch.randn(2, C, 4, 4, 4, generator=g) * 3
    ref = MarginalDiceCELoss([1, 2], C)(z, label)
    zh = z.half().requires_grad_(True)
    lh = MarginalDiceCELoss([1, 2], C)(zh, label)
    lh.backward()
    assert lh.dtype == torch.float32 and torch.isfinite(zh.grad.float()).all()
    assert lh.item() == pytest.approx(ref.item(), abs=1e-2)
    conv = torch.nn.Conv3d(1, C, 1)
    x = torch.randn(2, 1, 4, 4, 4, generator=g)
    with torch.no_grad():
        ref_c = MarginalDiceCELoss([1, 2], C)(conv(x) * 1e3, label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x) * 1e3
        assert out.dtype == torch.bfloat16
        lb = MarginalDiceCELoss([1, 2], C)(out, label)
    lb.backward()
    assert lb.dtype == torch.float32 and torch.isfinite(lb)
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())
    assert lb.item() == pytest.approx(ref_c.item(), rel=2e-2, abs=2e-2)


def test_marginal_validation():
    with pytest.raises(ValueError, match="out of range"):
        MarginalDiceCELoss([1, 4], 4)
    with pytest.raises(ValueError, match="0 is the background"):
        MarginalDiceCELoss([0, 1], 4)
    with pytest.raises(ValueError, match="unique"):
        MarginalDiceCELoss([1, 1], 4)
    with pytest.raises(ValueError, match="at least one"):
        MarginalDiceCELoss([], 4)
    with pytest.raises(ValueError, match="num_classes"):
        MarginalDiceCELoss([1], 1)
    with pytest.raises(ValueError, match="lambda_ce"):
        MarginalDiceCELoss([1], 3, lambda_ce=-1)
    loss = MarginalDiceCELoss([1], 3)
    with pytest.raises(ValueError, match="channels"):
        loss(torch.zeros(1, 4, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        loss(torch.zeros(1, 3, 3, 3), torch.zeros(1, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 1, \*spatial\)"):
        loss(torch.zeros(1, 3, 3, 3), torch.zeros(1, 2, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        loss(torch.zeros(1, 3, 2, 2), torch.tensor([[[0, 7], [1, IGN]]]))


# --------------------------------------------------------------------------- ConDist loss


def _logits_from_probs(q, tau):
    """Logits whose softmax(./tau) is exactly q."""
    return tau * torch.log(q)


def test_condist_hand_computed():
    # 4 voxels, 5 classes; the site labels 1; background groups 0, {2, 3}, 4; tau = 0.5
    s = torch.tensor([[0.0, 1.0, 2.0, 0.5, -1.0], [2.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0], [1.0, 0.0, 0.5, 0.5, 0.0]])
    t = torch.tensor([[0.0, 0.0, 3.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0, 2.0], [0.0, 5.0, 0.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0, 0.0]])
    s, t = s.T.unsqueeze(0), t.T.unsqueeze(0)  # (1, 5, 4)
    label = torch.tensor([[0, 3, 4, 1]])  # voxel 2: teacher says 1 -> masked; voxel 3: label 1 -> masked
    groups = [0, [2, 3], 4]
    tau = 0.5
    expected = _np_condist(s.numpy(), t.numpy(), label.numpy(), [1], groups, tau)
    # by hand for the unmasked voxels 0 and 1: q = softmax(z / 0.5); Q_i = G_i / (1 - q_1 + 1e-5)
    q_s = _np_softmax(s.numpy()[0].T[:2].astype(np.float64) / tau, axis=1)
    q_t = _np_softmax(t.numpy()[0].T[:2].astype(np.float64) / tau, axis=1)
    Qs = np.stack([q_s[:, 0], q_s[:, 2] + q_s[:, 3], q_s[:, 4]], 1) / (1 - q_s[:, 1:2] + 1e-5)
    Qt = np.stack([q_t[:, 0], q_t[:, 2] + q_t[:, 3], q_t[:, 4]], 1) / (1 - q_t[:, 1:2] + 1e-5)
    by_hand = np.mean(1 - 2 * (Qs * Qt).sum(0) / (Qs.sum(0) + Qt.sum(0) + 1e-5))
    assert expected == pytest.approx(by_hand, abs=1e-12)
    assert by_hand == pytest.approx(0.6178007313, abs=1e-9)
    loss = ConDistDiceLoss(5, [1], groups, tau)(s, t, label)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("spatial", [(6, 5), (3, 4, 5)])
@pytest.mark.parametrize("channel_dim", [True, False])
def test_condist_matches_numpy_random(spatial, channel_dim):
    g = torch.Generator().manual_seed(5)
    C = 8
    s = torch.randn(2, C, *spatial, generator=g) * 2
    t = torch.randn(2, C, *spatial, generator=g) * 2
    label = torch.randint(0, C, (2, *spatial), generator=g)
    label[1, 0] = IGN
    fg, groups = [3, 4], [0, [1, 2], [5, 6], 7]
    expected = _np_condist(s.reshape(2, C, -1).numpy(), t.reshape(2, C, -1).numpy(), label.reshape(2, -1).numpy(), fg, groups, 2.0)
    loss = ConDistDiceLoss(C, fg, groups, 2.0)(s, t, label.unsqueeze(1) if channel_dim else label)
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_condist_schema_background_groups():
    from preprocessing.schema import load_schema

    schema = load_schema()
    labeled = {schema.class_id("liver"), schema.class_id("liver_tumor")}
    groups = schema.background_groups(labeled)
    loss = ConDistDiceLoss(schema.num_classes, sorted(labeled), groups, 0.5)
    assert len(loss.groups) == len(groups)


def test_condist_invariant_to_foreground_split():
    g = torch.Generator().manual_seed(6)
    C, fg, groups, tau = 6, [1, 2], [0, [3, 4], 5], 0.5
    q_s = torch.softmax(torch.randn(2, C, 5, 5, generator=g), 1)
    q_t = torch.softmax(torch.randn(2, C, 5, 5, generator=g), 1)
    # teacher: background-dominated where its argmax is a background class; keep its fg split
    # below its max so the argmax side (in F_k or not) is unchanged
    label = torch.randint(0, C, (2, 5, 5), generator=g)
    loss = ConDistDiceLoss(C, fg, groups, tau)
    base = loss(_logits_from_probs(q_s, tau), _logits_from_probs(q_t, tau), label)
    assert base.item() > 0
    # student: arbitrary new split of its foreground mass
    frac = torch.rand(2, 5, 5, generator=g)
    q_s2 = q_s.clone()
    f_s = q_s[:, 1] + q_s[:, 2]
    q_s2[:, 1], q_s2[:, 2] = frac * f_s, (1 - frac) * f_s
    # teacher: swap its two foreground classes (keeps the argmax side)
    q_t2 = q_t.clone()
    q_t2[:, 1], q_t2[:, 2] = q_t[:, 2], q_t[:, 1]
    moved = loss(_logits_from_probs(q_s2, tau), _logits_from_probs(q_t2, tau), label)
    assert moved.item() == pytest.approx(base.item(), abs=1e-5)
    # moving mass between background groups does change the loss
    q_s3 = q_s.clone()
    q_s3[:, 0], q_s3[:, 5] = q_s[:, 5], q_s[:, 0]
    assert abs(loss(_logits_from_probs(q_s3, tau), _logits_from_probs(q_t, tau), label).item() - base.item()) > 1e-3


def test_condist_identical_student_teacher():
    g = torch.Generator().manual_seed(7)
    C, fg, groups = 5, [1], [0, [2, 3], 4]
    loss = ConDistDiceLoss(C, fg, groups, 1.0)
    # confident (near one-hot) predictions: only the eps effect is left
    cls = torch.randint(0, C, (2, 6, 6), generator=g)
    z = torch.nn.functional.one_hot(cls, C).movedim(-1, 1).float() * 40.0
    label = torch.zeros(2, 6, 6, dtype=torch.long)
    assert loss(z, z.clone(), label).item() < 1e-4
    # soft predictions: soft Dice of Q with itself, exactly 1 - sum Q^2 / (sum Q + 5e-6) per group
    zs = torch.randn(2, C, 6, 6, generator=g)
    expected = _np_condist(zs.reshape(2, C, -1).numpy(), zs.reshape(2, C, -1).numpy(), label.reshape(2, -1).numpy(), fg, groups, 1.0)
    assert loss(zs, zs.clone(), label).item() == pytest.approx(expected, abs=1e-6)
    # differing students in the unmasked region: larger loss
    other = z.clone()
    bg_vox = ~torch.isin(cls, torch.tensor(fg))
    other[:, 0][bg_vox], other[:, 4][bg_vox] = z[:, 4][bg_vox], z[:, 0][bg_vox]
    assert loss(other, z, label).item() > 0.1


def test_condist_gradients_student_only():
    g = torch.Generator().manual_seed(8)
    C = 5
    s = torch.randn(2, C, 4, 4, 4, generator=g).requires_grad_(True)
    t = torch.randn(2, C, 4, 4, 4, generator=g).requires_grad_(True)
    label = torch.randint(0, C, (2, 1, 4, 4, 4), generator=g)
    loss = ConDistDiceLoss(C, [2], [0, 1, [3, 4]], 0.5)(s, t, label)
    loss.backward()
    assert t.grad is None or torch.all(t.grad == 0)
    assert s.grad is not None and s.grad.abs().sum() > 0
    # same when the teacher is the output of a module with parameters
    teacher = torch.nn.Conv3d(1, C, 1)
    x = torch.randn(2, 1, 4, 4, 4, generator=g)
    s2 = s.detach().clone().requires_grad_(True)
    ConDistDiceLoss(C, [2], [0, 1, [3, 4]], 0.5)(s2, teacher(x), label).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert s2.grad.abs().sum() > 0


def test_condist_masked_voxels_contribute_nothing():
    g = torch.Generator().manual_seed(9)
    C, fg, groups = 6, [1, 2], [0, [3, 4], 5]
    s = torch.randn(2, C, 6, 6, generator=g)
    t = torch.randn(2, C, 6, 6, generator=g) * 2
    label = torch.randint(0, C, (2, 6, 6), generator=g)
    label[:, 0] = IGN
    loss = ConDistDiceLoss(C, fg, groups, 0.5)
    base = loss(s, t, label)
    fgt = torch.tensor(fg)
    masked = torch.isin(t.argmax(1), fgt) | torch.isin(label, fgt) | (label == IGN)
    assert masked.any() and (~masked).any()
    s2 = s.clone()
    noise = torch.randn(2, C, 6, 6, generator=g) * 20
    s2 = torch.where(masked.unsqueeze(1), noise, s2)
    assert loss(s2, t, label).item() == pytest.approx(base.item(), abs=1e-6)
    # the teacher's soft target at masked voxels does not matter either (argmax side kept)
    t2 = t.clone()
    t2[:, 1:3] = torch.where(masked.unsqueeze(1), t[:, 1:3] + 0.1, t[:, 1:3])
    t2[:, [0, 3, 4, 5]] = torch.where(masked.unsqueeze(1), t[:, [0, 3, 4, 5]] - 0.1, t[:, [0, 3, 4, 5]])
    assert loss(s, t2, label).item() == pytest.approx(base.item(), abs=1e-6)
    # changing unmasked voxels does change it
    s3 = torch.where(~masked.unsqueeze(1), noise, s)
    assert abs(loss(s3, t, label).item() - base.item()) > 1e-3
    # gradient only at unmasked voxels
    ss = s.clone().requires_grad_(True)
    loss(ss, t, label).backward()
    assert torch.all(ss.grad.abs().sum(1)[masked] == 0)
    assert ss.grad.abs().sum(1)[~masked].sum() > 0


def test_condist_saturated_and_autocast():
    g = torch.Generator().manual_seed(10)
    C, fg, groups = 8, [3, 4], [0, [1, 2], [5, 6], 7]
    label = torch.randint(0, C, (2, 1, 4, 4, 4), generator=g)
    sat_s = ((torch.randint(0, 2, (2, C, 4, 4, 4), generator=g).float() * 2 - 1) * 1e4).requires_grad_(True)
    sat_t = (torch.randint(0, 2, (2, C, 4, 4, 4), generator=g).float() * 2 - 1) * 1e4
    for tau in (0.5, 2.0):
        sat_s.grad = None
        loss = ConDistDiceLoss(C, fg, groups, tau)(sat_s, sat_t, label)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(sat_s.grad).all()
    # all-foreground student (1 - f == 0 in float32) stays finite
    s = torch.full((1, C, 3, 3), -1e4)
    s[:, 3] = 1e4
    s.requires_grad_(True)
    t = torch.zeros(1, C, 3, 3)
    t[:, 0] = 5.0
    out = ConDistDiceLoss(C, fg, groups, 0.5)(s, t, torch.zeros(1, 3, 3, dtype=torch.long))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    # bf16 autocast
    conv_s, conv_t = torch.nn.Conv3d(1, C, 1), torch.nn.Conv3d(1, C, 1)
    x = torch.randn(2, 1, 4, 4, 4, generator=g)
    crit = ConDistDiceLoss(C, fg, groups, 0.5)
    with torch.no_grad():
        ref = crit(conv_s(x) * 3, conv_t(x) * 3, label)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = conv_s(x) * 3, conv_t(x) * 3
        assert a.dtype == torch.bfloat16
        lb = crit(a, b, label)
    lb.backward()
    assert lb.dtype == torch.float32 and torch.isfinite(lb)
    assert all(torch.isfinite(p.grad).all() for p in conv_s.parameters())
    assert lb.item() == pytest.approx(ref.item(), abs=3e-2)
    # fp16 inputs
    lh = crit(a.detach().half(), b.detach().half(), label)
    assert torch.isfinite(lh) and lh.item() == pytest.approx(lb.item(), abs=1e-2)


def test_condist_label_none_uses_teacher_mask_only():
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(1, 4, 5, 5, generator=g), torch.randn(1, 4, 5, 5, generator=g)
    crit = ConDistDiceLoss(4, [1], [0, [2, 3]], 1.0)
    all_bg = torch.zeros(1, 5, 5, dtype=torch.long)
    assert crit(s, t, None).item() == pytest.approx(crit(s, t, all_bg).item(), abs=1e-7)


def test_condist_validation():
    with pytest.raises(ValueError, match="temperature"):
        ConDistDiceLoss(4, [1], [0, [2, 3]], 0.0)
    with pytest.raises(ValueError, match="temperature"):
        ConDistDiceLoss(4, [1], [0, [2, 3]], float("nan"))
    with pytest.raises(ValueError, match="both in foreground"):
        ConDistDiceLoss(4, [1], [0, [1, 2], 3], 1.0)
    with pytest.raises(ValueError, match="disjoint"):
        ConDistDiceLoss(4, [1], [0, [2, 3], 3], 1.0)
    with pytest.raises(ValueError, match="cover all"):
        ConDistDiceLoss(4, [1], [0, 2], 1.0)
    with pytest.raises(ValueError, match="class 0"):
        ConDistDiceLoss(4, [1], [[2, 3]], 1.0)
    with pytest.raises(ValueError, match="out of range"):
        ConDistDiceLoss(4, [1], [0, [2, 3], 4], 1.0)
    with pytest.raises(ValueError, match="out of range"):
        ConDistDiceLoss(4, [5], [0, [2, 3]], 1.0)
    with pytest.raises(ValueError, match="empty"):
        ConDistDiceLoss(4, [1], [0, [2, 3], []], 1.0)
    assert ConDistDiceLoss(4, [1], None, 1.0).groups == ((0,), (2,), (3,))
    crit = ConDistDiceLoss(4, [1], [0, [2, 3]], 1.0)
    with pytest.raises(ValueError, match="teacher_logits shape"):
        crit(torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 3, 4), None)
    with pytest.raises(ValueError, match="channels"):
        crit(torch.zeros(1, 5, 3, 3), torch.zeros(1, 5, 3, 3), None)
    with pytest.raises(ValueError, match="does not match"):
        crit(torch.zeros(1, 4, 3, 3), torch.zeros(1, 4, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long))


# --------------------------------------------------------------------------- schedule, deep supervision


def test_lambda_schedule():
    assert lambda_schedule(0, 120) == pytest.approx(0.01)
    assert lambda_schedule(119, 120) == pytest.approx(1.0)
    assert lambda_schedule(50, 101) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lambda_schedule(1, 3) == pytest.approx(0.505)
    assert lambda_schedule(2, 5, start=0.0, end=2.0) == pytest.approx(1.0)
    assert lambda_schedule(0, 1) == pytest.approx(0.01)
    vals = [lambda_schedule(r, 10) for r in range(10)]
    assert all(b > a for a, b in zip(vals, vals[1:]))
    for bad in [(10, 10), (-1, 10), (0, 0), (1.5, 10)]:
        with pytest.raises(ValueError):
            lambda_schedule(*bad)


def _recording_loss(record):
    def fn(logits, label):
        record.append((tuple(logits.shape), label.clone()))
        return torch.tensor(float(len(record)))  # head i contributes i + 1

    return fn


def test_deep_supervision_weights_list_and_downsampling():
    label = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    label[:, :, 4:, :] = 2
    label[:, :, 0, 0] = IGN
    heads = [torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 2, 2)]
    rec: list = []
    out = deep_supervision_loss(heads, label, _recording_loss(rec))
    assert out.item() == pytest.approx(4 / 7 * 1 + 2 / 7 * 2 + 1 / 7 * 3)
    assert [r[0] for r in rec] == [(1, 3, 8, 8), (1, 3, 4, 4), (1, 3, 2, 2)]
    assert torch.equal(rec[0][1], label)
    assert rec[1][1].dtype == torch.long and set(rec[1][1].unique().tolist()) <= {0, 2, IGN}
    assert torch.equal(rec[1][1][0, 0, :2], torch.zeros(2, 4, dtype=torch.long))
    assert torch.equal(rec[1][1][0, 0, 2:], torch.full((2, 4), 2))
    # label without channel dim
    rec2: list = []
    deep_supervision_loss(heads, label[:, 0], _recording_loss(rec2))
    assert [r[0] for r in rec2] == [r[0] for r in rec]


def test_deep_supervision_stacked_dynunet_and_real_loss():
    g = torch.Generator().manual_seed(12)
    label = torch.randint(0, 4, (2, 1, 4, 4, 4), generator=g)
    stacked = torch.randn(2, 3, 4, 4, 4, 4, generator=g).requires_grad_(True)  # (B, heads, C, X, Y, Z)
    crit = MarginalDiceCELoss([1, 2], 4)
    out = deep_supervision_loss(stacked, label, crit)
    expected = sum(w * crit(stacked[:, i], label) for i, w in enumerate([4 / 7, 2 / 7, 1 / 7]))
    assert out.item() == pytest.approx(expected.item(), abs=1e-6)
    out.backward()
    assert torch.isfinite(stacked.grad).all() and stacked.grad[:, 2].abs().sum() > 0
    # single head = the loss itself
    assert deep_supervision_loss([stacked[:, 0]], label, crit).item() == pytest.approx(crit(stacked[:, 0], label).item())
    # a plain (B, C, X, Y, Z) tensor with a channel-dim label is rejected, not misread
    with pytest.raises(ValueError):
        deep_supervision_loss(stacked[:, 0], label, crit)
    with pytest.raises(ValueError):
        deep_supervision_loss([], label, crit)
    with pytest.raises(ValueError, match="larger"):
        deep_supervision_loss([torch.zeros(2, 4, 8, 8, 8)], label, crit)
