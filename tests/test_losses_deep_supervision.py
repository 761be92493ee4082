"""`pipelines.losses.deep_supervision_loss` on MONAI's DeepSupervisionLoss gives exactly the
numbers of the former hand-written weighting (weights 2**-i normalised, label resized
nearest-exact to each head)."""

import pytest
import torch
import torch.nn.functional as F

from pipelines.losses import MarginalDiceCELoss, deep_supervision_loss

IGN = 255


def _former(heads, label, loss_fn):
    """The formula as it was written by hand before MONAI's class did it."""
    lab = label if label.dim() == heads[0].dim() else label.unsqueeze(1)
    weights = [0.5**i for i in range(len(heads))]
    total = sum(weights)
    loss = None
    for head, w in zip(heads, weights):
        size = tuple(head.shape[2:])
        target = lab if size == tuple(lab.shape[2:]) else F.interpolate(lab.float(), size=size, mode="nearest-exact").to(lab.dtype)
        term = loss_fn(head, target) * (w / total)
        loss = term if loss is None else loss + term
    return loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_monai_deep_supervision_equals_the_former_formula(seed):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (2, 1, 16, 16, 8), generator=g)
    label[:, :, :2] = IGN
    heads = [torch.randn(2, 4, *s, generator=g, requires_grad=True) for s in [(16, 16, 8), (8, 8, 4), (4, 4, 2), (2, 2, 1)]]
    crit = MarginalDiceCELoss([1, 3], 4, ignore_index=IGN)
    new = deep_supervision_loss(heads, label, crit)
    old = _former(heads, label, crit)
    assert new.dtype == old.dtype == torch.float32
    assert torch.equal(new.detach(), old.detach())  # bit for bit
    grads_new = torch.autograd.grad(new, heads)
    grads_old = torch.autograd.grad(old, heads)
    for a, b in zip(grads_new, grads_old):
        assert torch.allclose(a, b, rtol=0, atol=1e-7)
    # label without channel dim, stacked heads (DynUNet) too
    assert torch.equal(deep_supervision_loss(heads, label[:, 0], crit).detach(), old.detach())
    stacked = torch.randn(2, 3, 4, 16, 16, 8, generator=g)
    assert torch.equal(deep_supervision_loss(stacked, label, crit), _former(list(torch.unbind(stacked, 1)), label, crit))
