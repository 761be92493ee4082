"""ConDistFL losses for partially labelled federated segmentation (softmax outputs, no FL code).

Details: docs/design/segmentation-training.md, "The ConDistFL losses".
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.deep_supervision import deep_supervision_loss

EPS = 1e-5
IGNORE_INDEX = 255

__all__ = ["MarginalDiceCELoss", "ConDistDiceLoss", "lambda_schedule", "deep_supervision_loss"]


# --------------------------------------------------------------------------- helpers


def _check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _check_num_classes(num_classes: object) -> int:
    num_classes = _check_int(num_classes, "num_classes")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
    return num_classes


def _check_foreground(foreground: object, num_classes: int) -> tuple[int, ...]:
    if isinstance(foreground, (str, bytes, torch.Tensor)) or not hasattr(foreground, "__iter__"):
        raise ValueError(f"foreground must be a list of class ids, got {foreground!r}")
    ids = [_check_int(c, "foreground class id") for c in foreground]
    if not ids:
        raise ValueError("foreground must name at least one class id the site labels")
    for c in ids:
        if not 0 < c < num_classes:
            raise ValueError(
                f"foreground class id {c} out of range: must be in [1, {num_classes - 1}] (0 is the background, always in the merged background channel)"
            )
    if len(set(ids)) != len(ids):
        raise ValueError(f"foreground class ids must be unique, got {ids}")
    return tuple(sorted(ids))


def _check_ignore_index(ignore_index: object, num_classes: int) -> int:
    ignore_index = _check_int(ignore_index, "ignore_index")
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} must not be a class id (classes are 0..{num_classes - 1})")
    return ignore_index


def _check_logits(logits: torch.Tensor, num_classes: int, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() < 3:
        raise ValueError(f"{name} must be (B, C, *spatial) with 1-3 spatial dims, got shape {tuple(logits.shape)}")
    if logits.shape[1] != num_classes:
        raise ValueError(f"{name} have {logits.shape[1]} channels but num_classes is {num_classes} (shape {tuple(logits.shape)})")
    if not logits.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {logits.dtype}")


def _index_label(label: torch.Tensor, logits: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The label as a long (B, *spatial) index map, validated against the logits."""
    if not isinstance(label, torch.Tensor):
        raise ValueError(f"label must be a torch.Tensor, got {type(label).__name__}")
    spatial = tuple(logits.shape[2:])
    batch = logits.shape[0]
    if label.dim() == logits.dim():
        if label.shape[1] != 1:
            raise ValueError(f"label with a channel dim must be (B, 1, *spatial); got {tuple(label.shape)} for logits {tuple(logits.shape)}")
        label = label[:, 0]
    if label.dim() != logits.dim() - 1 or label.shape[0] != batch or tuple(label.shape[1:]) != spatial:
        raise ValueError(
            f"label shape {tuple(label.shape)} does not match logits {tuple(logits.shape)}: expected {(batch, 1, *spatial)} or {(batch, *spatial)}"
        )
    if label.is_floating_point():
        if not torch.equal(label, torch.round(label)):
            raise ValueError("label must be an integer index map (got non-integral float values)")
    elif label.dtype == torch.bool or label.is_complex():
        raise ValueError(f"label must be an integer index map, got dtype {label.dtype}")
    label = label.long()
    bad = (label < 0) | ((label >= num_classes) & (label != ignore_index))
    if bool(bad.any()):
        values = torch.unique(label[bad]).tolist()[:10]
        raise ValueError(f"label values {values} are neither class ids in [0, {num_classes - 1}] nor the ignore label {ignore_index}")
    return label


def _soft_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over channels of 1 - 2*sum(p*t)/(sum p + sum t + 1e-5), pooled over batch and space."""
    dims = [0, *range(2, pred.dim())]
    inter = (pred * target).sum(dim=dims)
    denom = pred.sum(dim=dims) + target.sum(dim=dims)
    return (1.0 - 2.0 * inter / (denom + EPS)).mean()


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # device type without autocast support
        return contextlib.nullcontext()


# --------------------------------------------------------------------------- supervised loss


class MarginalDiceCELoss(torch.nn.Module):
    """Marginal Dice + marginal cross-entropy (Shi et al. 2021, as used by ConDistFL).

    ``foreground`` lists the class ids the site labels (``F_k``, background 0 excluded);
    every other class (background + unlabeled classes, ``B_k``) is merged into one
    channel by summing the softmax probabilities, and the one-hot label is merged the
    same way. Merged channels: ``[B_k, *sorted(F_k)]``.

    * Dice: on the merged channels incl. the merged background, pooled over batch and
      space, ``1 - 2*sum(p*y)/(sum(p)+sum(y)+1e-5)`` per channel, mean over channels.
    * Cross-entropy: mean over (non-ignored) voxels of ``-log p_merged[true channel]``,
      from log-sum-exp over the logits: ``log p_Bk = logsumexp(z[B_k]) - logsumexp(z)``,
      ``log p_f = z_f - logsumexp(z)``. (Not the public implementation's softmax applied
      twice to merged probabilities.)
    * Total: ``lambda_dice * dice + lambda_ce * ce`` (both 1.0 by default, as in the paper).

    When ``F_k`` is every non-background class this is plain softmax Dice + CE (MONAI
    ``DiceCELoss(softmax=True, to_onehot_y=True, batch=True, smooth_nr=0, smooth_dr=1e-5)``).

    Voxels labelled ``ignore_index`` are excluded from both terms; if every voxel is
    ignored, the CE term is 0 and each Dice channel is 1 (no gradient).

    Args:
        foreground: the class ids the site labels (``F_k``, not 0).
        num_classes: the number of classes, background included (>= 2).
        lambda_dice: weight of the Dice term (finite, >= 0).
        lambda_ce: weight of the cross-entropy term (finite, >= 0).
        ignore_index: the label value left out of both terms (not a class id).

    Raises:
        ValueError: an argument out of range (the message names it).
    """

    # buffers (register_buffer), declared for the type checker
    _merge_table: torch.Tensor
    _bg_index: torch.Tensor
    _fg_index: torch.Tensor

    def __init__(
        self,
        foreground: Sequence[int],
        num_classes: int,
        *,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.num_classes = _check_num_classes(num_classes)
        self.foreground = _check_foreground(foreground, self.num_classes)
        self.background = tuple(c for c in range(self.num_classes) if c not in self.foreground)  # B_k, contains 0
        for name, value in (("lambda_dice", lambda_dice), ("lambda_ce", lambda_ce)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.lambda_dice = float(lambda_dice)
        self.lambda_ce = float(lambda_ce)
        self.ignore_index = _check_ignore_index(ignore_index, self.num_classes)
        # class id -> merged channel (0 = merged B_k, 1.. = F_k in sorted order)
        table = torch.zeros(self.num_classes, dtype=torch.long)
        for i, c in enumerate(self.foreground):
            table[c] = i + 1
        self.register_buffer("_merge_table", table, persistent=False)
        self.register_buffer("_bg_index", torch.tensor(self.background, dtype=torch.long), persistent=False)
        self.register_buffer("_fg_index", torch.tensor(self.foreground, dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        """The loss's settings, for ``repr``."""
        return f"foreground={list(self.foreground)}, num_classes={self.num_classes}, lambda_dice={self.lambda_dice}, lambda_ce={self.lambda_ce}"

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The loss of ``logits`` against ``label`` (see the class).

        Args:
            logits: (B, C, *spatial).
            label: (B, 1, *spatial) or (B, *spatial) integer labels.

        Returns:
            A float32 scalar.

        Raises:
            ValueError: bad shapes or label values.
        """
        _check_logits(logits, self.num_classes)
        label = _index_label(label, logits, self.num_classes, self.ignore_index)
        device = logits.device
        with _no_autocast(device.type):
            z = logits.float()
            valid = label != self.ignore_index  # (B, *sp)
            merged_label = self._merge_table.to(device)[torch.where(valid, label, torch.zeros_like(label))]
            n_merged = len(self.foreground) + 1

            # merged log-probabilities, stable: logsumexp over B_k / over all classes
            lse_all = torch.logsumexp(z, dim=1, keepdim=True)
            log_bg = torch.logsumexp(z.index_select(1, self._bg_index.to(device)), dim=1, keepdim=True)
            log_fg = z.index_select(1, self._fg_index.to(device))
            log_p = torch.cat([log_bg, log_fg], dim=1) - lse_all  # (B, n_merged, *sp)

            # Dice on merged probabilities (sum of softmax over B_k == exp(log_bg - lse_all))
            p = torch.softmax(z, dim=1)
            p_merged = torch.cat(
                [p.index_select(1, self._bg_index.to(device)).sum(1, keepdim=True), p.index_select(1, self._fg_index.to(device))],
                dim=1,
            )
            y = F.one_hot(merged_label, n_merged).movedim(-1, 1).to(p.dtype)
            vmask = valid.unsqueeze(1).to(p.dtype)
            dice = _soft_dice(p_merged * vmask, y * vmask)

            nll = -log_p.gather(1, merged_label.unsqueeze(1)).squeeze(1)  # (B, *sp)
            n_valid = valid.sum()
            ce = torch.where(valid, nll, torch.zeros_like(nll)).sum() / n_valid.clamp_min(1).to(nll.dtype)
            return self.lambda_dice * dice + self.lambda_ce * ce


# --------------------------------------------------------------------------- ConDist loss


def _check_background(background: object, foreground: tuple[int, ...], num_classes: int) -> tuple[tuple[int, ...], ...]:
    if background is None:  # every non-foreground class its own group
        return tuple((c,) for c in range(num_classes) if c not in foreground)
    if isinstance(background, (int, str, bytes)) or not isinstance(background, Sequence):
        raise ValueError(f"background must be a list of groups (int or list of ints), e.g. [0, [3, 4], 7]; got {background!r}")
    groups: list[tuple[int, ...]] = []
    for g in background:
        members = [g] if not isinstance(g, (list, tuple, set, frozenset)) else list(g)
        if not members:
            raise ValueError(f"background group {g!r} is empty")
        ids = tuple(sorted(_check_int(c, "background class id") for c in members))
        for c in ids:
            if not 0 <= c < num_classes:
                raise ValueError(f"background class id {c} out of range [0, {num_classes - 1}]")
        groups.append(ids)
    if not groups:
        raise ValueError("background must contain at least the background group 0")
    flat = [c for g in groups for c in g]
    dup = sorted({c for c in flat if flat.count(c) > 1})
    if dup:
        raise ValueError(f"background groups must be disjoint: class ids {dup} appear more than once")
    clash = sorted(set(flat) & set(foreground))
    if clash:
        raise ValueError(f"class ids {clash} are both in foreground {list(foreground)} and in a background group")
    if 0 not in flat:
        raise ValueError("background groups must contain the background class 0")
    missing = sorted(set(range(num_classes)) - set(flat) - set(foreground))
    if missing:
        raise ValueError(
            f"class ids {missing} are neither foreground nor in a background group: foreground and background "
            f"groups must cover all {num_classes} classes exactly once"
        )
    return tuple(groups)


class ConDistDiceLoss(torch.nn.Module):
    """Conditional distillation loss (ConDistFL, eqs. 2-7).

    ``background`` lists the background groups ``O_k``: ``0`` for the true background,
    then each unlabeled organ as an int or a list of ints (organ + its lesions), e.g.
    ``[0, [3, 4], [5, 6], 7]`` (``LabelSchema.background_groups(labeled)``); ``None`` makes
    every non-foreground class its own group. Steps, for student and teacher alike:

    1. ``q = softmax(logits / tau)`` (float32);
    2. ``f = sum_{c in F_k} q_c``; ``G_i = sum_{c in group i} q_c``;
    3. ``Q_i = G_i / (1 - f + 1e-5)``, with ``1 - f`` computed as ``sum_{c in B_k} q_c``
       (the same quantity, without float32 cancellation when ``f`` is close to 1);
    4. mask ``M = 0`` where the argmax of the TEACHER logits is in ``F_k`` (computed as
       max over ``F_k`` > max over ``B_k``: exact ties count as background), or the label is
       in ``F_k``, or the label is ``ignore_index``; 1 elsewhere (``label=None``: teacher
       term only);
    5. loss = soft Dice between ``M*Q_s`` and ``M*Q_t`` per group, pooled over batch and
       space, ``1 - 2*sum(Qs*Qt)/(sum Qs + sum Qt + 1e-5)``, mean over groups.

    The teacher is a soft target: it is detached and computed under ``no_grad`` whatever
    the caller passes. Note that this soft Dice is not zero for ``student == teacher``
    unless the conditional distribution ``Q`` is (close to) one-hot; it equals
    ``1 - sum Q^2 / (sum Q + 5e-6)`` per group then (the paper's / note's formula).

    Args:
        num_classes: the number of classes, background included (>= 2).
        foreground: the class ids the site labels (``F_k``, not 0).
        background: the background groups ``O_k`` as above (None: one group per class).
        temperature: the softmax temperature ``tau`` (finite, > 0).
        ignore_index: the label value left out of the mask (not a class id).

    Raises:
        ValueError: an argument out of range, or groups that overlap or do not cover the classes.
    """

    # buffers (register_buffer), declared for the type checker
    _member: torch.Tensor
    _is_fg: torch.Tensor
    _fg_index: torch.Tensor
    _bg_index: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        foreground: Sequence[int],
        background: Sequence[int | Sequence[int]] | None,
        temperature: float,
        *,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.num_classes = _check_num_classes(num_classes)
        self.foreground = _check_foreground(foreground, self.num_classes)
        self.groups = _check_background(background, self.foreground, self.num_classes)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.ignore_index = _check_ignore_index(ignore_index, self.num_classes)
        # (num_classes, n_groups) 0/1 matrix: class -> group; foreground indicator per class
        member = torch.zeros(self.num_classes, len(self.groups))
        for i, g in enumerate(self.groups):
            member[list(g), i] = 1.0
        is_fg = torch.zeros(self.num_classes, dtype=torch.bool)
        is_fg[list(self.foreground)] = True
        self.register_buffer("_member", member, persistent=False)
        self.register_buffer("_is_fg", is_fg, persistent=False)
        self.register_buffer("_fg_index", torch.tensor(self.foreground, dtype=torch.long), persistent=False)
        self.register_buffer("_bg_index", torch.tensor([c for c in range(self.num_classes) if c not in self.foreground], dtype=torch.long), persistent=False)

    def extra_repr(self) -> str:
        """The loss's settings, for ``repr``."""
        groups = [g[0] if len(g) == 1 else list(g) for g in self.groups]
        return f"num_classes={self.num_classes}, foreground={list(self.foreground)}, background={groups}, temperature={self.temperature}"

    def _conditional(self, logits: torch.Tensor) -> torch.Tensor:
        """Q = G / (1 - f + 1e-5), (B, n_groups, *spatial), float32."""
        q = torch.softmax(logits.float() / self.temperature, dim=1)
        member = self._member.to(q.device)
        g = torch.einsum("bc...,cg->bg...", q, member)
        not_fg = g.sum(dim=1, keepdim=True)  # == 1 - f, groups cover B_k exactly
        return g / (not_fg + EPS)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """The distillation loss of the student against the teacher (see the class).

        Args:
            student_logits: (B, C, *spatial).
            teacher_logits: the same shape; detached here.
            label: the patch labels (None: the teacher's mask only).

        Returns:
            A float32 scalar.

        Raises:
            ValueError: bad shapes or label values.
        """
        _check_logits(student_logits, self.num_classes, "student_logits")
        _check_logits(teacher_logits, self.num_classes, "teacher_logits")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape {tuple(student_logits.shape)}")
        if label is not None:
            label = _index_label(label, student_logits, self.num_classes, self.ignore_index)
        device = student_logits.device
        is_fg = self._is_fg.to(device)
        with _no_autocast(device.type):
            with torch.no_grad():
                teacher = teacher_logits.detach()
                q_t = self._conditional(teacher)
                # the teacher's most likely class is a labelled one: max over F_k logits beats
                # max over B_k logits (== is_fg[argmax], exact ties aside, which count as
                # background); ~100x faster on CPU than argmax over the strided class axis
                drop = teacher.index_select(1, self._fg_index.to(device)).amax(1) > teacher.index_select(1, self._bg_index.to(device)).amax(1)
                if label is not None:
                    ignored = label == self.ignore_index
                    drop = drop | ignored | is_fg[torch.where(ignored, torch.zeros_like(label), label)]
                mask = (~drop).unsqueeze(1).to(q_t.dtype)
                q_t = q_t * mask
            q_s = self._conditional(student_logits) * mask
            return _soft_dice(q_s, q_t)


# --------------------------------------------------------------------------- schedule


def lambda_schedule(round_index: int, total_rounds: int, start: float = 0.01, end: float = 1.0) -> float:
    """ConDist weight for 0-based round ``round_index`` of ``total_rounds``: linear from
    ``start`` (round 0) to ``end`` (round R-1), ``start + (end - start) * r / (R - 1)``.

    With a single round (R = 1) the weight is ``start``: round 0 always gets ``start``
    (its teacher is the initial global model), as for every R >= 2.

    Args:
        round_index: 0-based round.
        total_rounds: the run's rounds (>= 1).
        start: the weight of round 0.
        end: the weight of the last round.

    Returns:
        The weight.

    Raises:
        ValueError: a round outside the run, or a weight that is not a finite number.
    """
    r = _check_int(round_index, "round_index")
    n = _check_int(total_rounds, "total_rounds")
    if n < 1:
        raise ValueError(f"total_rounds must be >= 1, got {n}")
    if not 0 <= r < n:
        raise ValueError(f"round_index must be in [0, {n - 1}] (0-based), got {r}")
    for name, v in (("start", start), ("end", end)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if n == 1:
        return float(start)
    return float(start) + (float(end) - float(start)) * r / (n - 1)
