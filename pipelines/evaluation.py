"""Whole-volume evaluation: sliding-window inference and per-class Dice (no FL imports).

Empty-mask rule (stated once, used everywhere):
  * a class the site does not label is not scored for that site's cases (NaN): its
    reference cannot tell a right prediction from a wrong one;
  * a labelled class absent from a case's reference: Dice is NaN (excluded from means)
    when the prediction is empty too, and 0.0 when the model predicts it anyway (a false
    positive is an error, not a free pass); for a class the schema marks
    ``empty_mask_dice: one`` (a finding most images lack, e.g. pneumothorax: SIIM-ACR's rule),
    an empty prediction on an empty reference is right and scores 1.0;
  * voxels with the ignore label (255) are left out of both prediction and reference.
Out-of-federation test sets that label organs but not lesions are scored with every
lesion merged into its organ, in both prediction and reference (`merge_lesions`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import cast

import numpy as np
import torch
from monai.inferers.utils import sliding_window_inference

from pipelines.device import accumulation_device

IGNORE_LABEL = 255


def predict_volume(
    model: torch.nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    sw_batch_size: int = 2,
    overlap: float = 0.25,
    mode: str = "gaussian",
    head: Callable[[torch.Tensor | Sequence[torch.Tensor]], torch.Tensor] | None = None,
    allowed: Sequence[int] | None = None,
    channels: int = 32,
    absent: Callable[[], Sequence[int]] | None = None,
) -> torch.Tensor:
    """Argmax label map (spatial only) of one image (C, *spatial) by sliding-window inference.

    `head` picks the main output when the network returns several (deep supervision).
    `allowed`: the foreground classes the model was trained to predict. The probability of
    every other class is folded into background before the argmax, as the marginal loss
    treats a class no site labels: its logits were never constrained, so letting it win
    would paint the background (None: every class competes).

    Args:
        model: the network (its train/eval mode is restored afterwards).
        image: the preprocessed volume (C, *spatial).
        roi_size: the sliding window.
        sw_batch_size: windows per forward pass.
        overlap: overlap of neighbouring windows.
        mode: how overlapping windows are blended (MONAI's ``gaussian`` or ``constant``).
        head: picks the main output.
        allowed: the classes the model may predict.
        channels: the network's output channels (an upper bound), for where the output accumulates.
        absent: called once the windows ran: classes found absent from the image (a presence head's gate,
            `pipelines.presence.absent_classes`), folded into background like untrained classes.

    Returns:
        The label map (*spatial), on the image's device (the windows run on the model's
        device; the output accumulates there when it fits, `pipelines.device.accumulation_device`).
    """
    was_training = model.training
    model.eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        return head(out) if head is not None else cast(torch.Tensor, out)

    first = next(model.parameters(), None)
    window_device = first.device if first is not None else image.device  # the windows run where the model is
    try:
        with torch.inference_mode():
            # one tensor in, one tensor out (the predictor returns a tensor, not a tuple or dict)
            logits = cast(torch.Tensor, sliding_window_inference(
                image.unsqueeze(0).float(), roi_size=list(roi_size), sw_batch_size=sw_batch_size, predictor=forward,
                overlap=overlap, mode=mode, padding_mode="constant", sw_device=window_device,
                device=accumulation_device(window_device, int(image[0].numel()), channels),
            ))  # fmt: skip
    finally:
        model.train(was_training)
    gone = {int(c) for c in absent()} if absent is not None else set()
    if allowed is None and not gone:
        return torch.argmax(logits, dim=1)[0].to(image.device)
    candidates = set(range(logits.shape[1])) if allowed is None else {int(c) for c in allowed}
    keep = [0, *sorted(candidates - gone - {0})]
    probs = torch.softmax(logits[0].float(), dim=0)
    folded = probs[keep]
    folded[0] = folded[0] + probs.sum(0) - folded.sum(0)  # untrained classes count as background
    return torch.as_tensor(keep, device=folded.device)[torch.argmax(folded, dim=0)].to(image.device)


def fold_untrained(probabilities: torch.Tensor, allowed: Sequence[int] | None) -> torch.Tensor:
    """Class probabilities with every class outside `allowed` folded into background (as `predict_volume` does before its argmax).

    Args:
        probabilities: (classes, *spatial) softmax probabilities.
        allowed: the foreground classes the model was trained to predict (None: all).

    Returns:
        The same shape; the folded classes are 0 and their probability is added to class 0.
    """
    if allowed is None:
        return probabilities
    mask = torch.zeros(probabilities.shape[0], dtype=torch.bool, device=probabilities.device)
    mask[[0, *sorted({int(c) for c in allowed} - {0})]] = True
    out = probabilities * mask.view(-1, *([1] * (probabilities.ndim - 1)))
    out[0] = out[0] + probabilities[~mask].sum(0)
    return out


def merge_lesions(label: np.ndarray | torch.Tensor, merge_table: np.ndarray) -> np.ndarray:
    """Map every lesion id to its organ id.

    Args:
        label: an integer label map.
        merge_table: class id -> class id to score it as (`LabelSchema.lesion_merge_table()`).

    Returns:
        The merged label map.
    """
    arr = label.cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    return np.asarray(merge_table)[arr.astype(np.int64)]


def dice_per_class(
    pred: np.ndarray | torch.Tensor,
    ref: np.ndarray | torch.Tensor,
    classes: Iterable[int],
    ignore_label: int = IGNORE_LABEL,
    empty_scores_one: Iterable[int] = (),
) -> dict[int, float]:
    """Dice of each class in `classes` for one case, with the empty-mask rule above.

    Args:
        pred: the predicted label map.
        ref: the reference label map, same shape.
        classes: the classes to score.
        ignore_label: the reference value left out of both maps.
        empty_scores_one: classes for which an empty prediction on an empty reference scores 1.0
            (the schema's ``empty_mask_one``) instead of NaN.

    Returns:
        Class id -> Dice (NaN: not scorable).

    Raises:
        ValueError: shapes differ.
    """
    p = pred.cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
    r = ref.cpu().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    if p.shape != r.shape:
        raise ValueError(f"prediction shape {p.shape} != reference shape {r.shape}")
    valid = r != ignore_label
    one = set(empty_scores_one)
    scores: dict[int, float] = {}
    for c in classes:
        pc, rc = (p == c) & valid, (r == c) & valid
        n_ref, n_pred = int(rc.sum()), int(pc.sum())
        if n_ref == 0:
            scores[c] = (1.0 if c in one else float("nan")) if n_pred == 0 else 0.0
        else:
            scores[c] = 2.0 * int((pc & rc).sum()) / (n_ref + n_pred)
    return scores


def summarise(per_case: list[dict[int, float]], classes: Sequence[int]) -> dict[str, float]:
    """Mean (NaN-excluded) Dice per class over cases, plus their mean over scored classes.

    Args:
        per_case: Dice per class of each case (`dice_per_class`).
        classes: the classes to summarise.

    Returns:
        ``str(class id)`` -> mean Dice, and ``mean`` (NaN where nothing was scored).
    """
    out: dict[str, float] = {}
    means = []
    for c in classes:
        vals = [case[c] for case in per_case if c in case and not np.isnan(case[c])]
        out[str(c)] = float(np.mean(vals)) if vals else float("nan")
        if vals:
            means.append(out[str(c)])
    out["mean"] = float(np.mean(means)) if means else float("nan")
    return out
