"""An image-level presence head on a segmentation network's encoder: the ConDistFL paper's pneumothorax detector.

The paper adds "an additional binary classification head to the encoder for pneumothorax detection" (its
2D chest setting). Here the head is a global average pooling of the encoder's deepest features and one
linear layer, one logit per headed class ("does this patch show the class?"). It is attached to the MONAI
network itself (`attach_presence_head`): the segmentation output and every existing state_dict key stay
as they were, the head's weights are ``presence_head.*`` and travel with the model. Forward hooks keep the
deepest features and compute the logits on each forward; `presence_logits` reads them. The hooks are
module-level functions that store on the module they are called with, so a deep copy (ConDistFL's teacher)
computes its own logits.

Training (`presence_loss`): a site that labels a headed class learns whether each patch contains it
(binary cross-entropy); a site that does not gives the head zero gradients (it cannot know). Inference
(`absent_classes`): an image's probability is the largest over its sliding windows; below the threshold
the class's probability is folded into background, so a model need not paint a pneumothorax on a healthy film: the
SIIM-ACR rule scores such an empty prediction 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import torch
from monai.metrics.rocauc import compute_roc_auc
from torch import nn

__all__ = [
    "PRESENCE_SOURCES",
    "PresenceHead",
    "PresenceWindows",
    "absent_classes",
    "attach_presence_head",
    "has_presence_head",
    "presence_logits",
    "presence_loss",
    "presence_report",
    "presence_targets",
]

# The module whose output is the encoder's deepest feature map, per network (FlexibleUNet's encoder returns its
# features shallow to deep: the last is taken).
PRESENCE_SOURCES = {"mednext": "bottleneck", "dynunet": "bottleneck", "basic_unet": "down_4", "flexible_unet": "encoder"}
_FEATURES = "_presence_features"  # kept on the source module between its forward and the network's
_LOGITS = "_presence_logits"  # kept on the network after its forward


class PresenceHead(nn.Module):
    """Global average pooling of a feature map and a linear layer: one logit per headed class.

    Args:
        channels: the feature map's channels.
        classes: how many classes the head scores.
    """

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.fc = nn.Linear(channels, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc(features.flatten(2).mean(-1))
        return logits


def _keep_features(module: nn.Module, inputs: object, output: object) -> None:
    features = output[-1] if isinstance(output, (list, tuple)) else output
    module.__dict__[_FEATURES] = features  # a plain attribute: never a buffer, never in the state_dict


def _head_logits(module: nn.Module, inputs: object, output: object) -> None:
    source = module.get_submodule(module.__dict__["presence_source"])
    features = source.__dict__.pop(_FEATURES, None)
    module.__dict__[_LOGITS] = module.get_submodule("presence_head")(features) if features is not None else None


def attach_presence_head(net: nn.Module, name: str, classes: int, spatial_dims: int, probe: Sequence[int]) -> nn.Module:
    """Give a network a presence head on its encoder's deepest features (in place).

    Args:
        net: a network `pipelines.networks.build_network` built.
        name: its name (a key of `PRESENCE_SOURCES`).
        classes: how many classes the head scores.
        spatial_dims: 2 or 3.
        probe: a patch size the network accepts (one dry forward finds the features' channels).

    Returns:
        ``net``, with the submodule ``presence_head`` and its hooks.

    Raises:
        ValueError: a network without a known encoder, or no class.
    """
    if name not in PRESENCE_SOURCES:
        raise ValueError(f"no presence head for network {name!r}; networks with one: {', '.join(sorted(PRESENCE_SOURCES))}")
    if classes < 1:
        raise ValueError("a presence head needs at least one class")
    source = net.get_submodule(PRESENCE_SOURCES[name])
    source.register_forward_hook(_keep_features)
    was_training = net.training
    net.eval()
    in_channels = next(m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))).in_channels
    with torch.no_grad():
        net(torch.zeros(1, in_channels, *probe[:spatial_dims]))
    net.train(was_training)
    channels = int(source.__dict__.pop(_FEATURES).shape[1])
    net.add_module("presence_head", PresenceHead(channels, classes))
    net.__dict__["presence_source"] = PRESENCE_SOURCES[name]
    net.register_forward_hook(_head_logits)
    return net


class PresenceWindows(nn.Module):
    """A network with a presence head, run window by window (sliding-window inference): its output unchanged, and
    per headed class the largest probability of any window so far.

    Args:
        net: the network (`attach_presence_head`).
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.largest: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)  # (deep supervision: what the network returns; the caller picks its head)
        logits = presence_logits(self.net)
        if logits is not None:
            top = torch.sigmoid(logits.float()).amax(dim=0).cpu()
            self.largest = top if self.largest is None else torch.maximum(self.largest, top)
        return out

    def probabilities(self, classes: Sequence[int]) -> dict[int, float]:
        """Headed class id -> the image's probability (the largest over the windows run); empty before any window."""
        return {int(c): float(p) for c, p in zip(classes, self.largest.tolist())} if self.largest is not None else {}


def has_presence_head(net: nn.Module) -> bool:
    """Whether `attach_presence_head` gave the network a head."""
    return isinstance(getattr(net, "presence_head", None), PresenceHead)


def presence_logits(net: nn.Module) -> torch.Tensor | None:
    """The head's logits of the network's last forward, (B, classes), taken off the network; None without a head.

    Taken, not read: a training forward's logits hold its whole graph, and a network holding a non-leaf
    tensor cannot be deep-copied (Fed-BioMed and ConDistFL's teacher copy it).
    """
    logits = net.__dict__.pop(_LOGITS, None)
    return logits if isinstance(logits, torch.Tensor) else None


def presence_targets(labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """Whether each patch contains each class: (B, len(classes)) of 0 / 1.

    Args:
        labels: the patches' label maps, (B, 1, *spatial).
        classes: the headed classes' schema ids.

    Returns:
        Float targets.
    """
    flat = labels.reshape(labels.shape[0], -1)
    return torch.stack([(flat == int(c)).any(dim=1) for c in classes], dim=1).float()


def presence_loss(logits: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], labelled: Sequence[int]) -> torch.Tensor:
    """Binary cross-entropy of the headed classes the site labels; zero (with zero gradients) for the others.

    A site that does not label a headed class cannot tell whether a patch shows it: its head gets zero
    gradients there (not none: an optimizer stepping every weight with its gradient needs one).

    Args:
        logits: the head's logits of the step's patches, (B, len(classes)).
        labels: the patches' label maps, (B, 1, *spatial).
        classes: the headed classes' schema ids, in the head's order.
        labelled: the classes the site labels.

    Returns:
        The loss (mean over patches and the site's headed classes).
    """
    own = [j for j, c in enumerate(classes) if int(c) in {int(x) for x in labelled}]
    zero = 0.0 * logits.sum()
    if not own:
        return zero
    targets = presence_targets(labels, [classes[j] for j in own]).to(logits.device)
    return nn.functional.binary_cross_entropy_with_logits(logits[:, own].float(), targets) + zero


def absent_classes(probabilities: Mapping[int, float], threshold: float | None) -> list[int]:
    """The headed classes the gate removes from an image: probability (the largest over its windows) below the threshold.

    Inference folds their probability into background before its argmax, as it does for classes no site
    trained (`pipelines.evaluation.predict_volume`, `pipelines.inference.class_probabilities`).

    Args:
        probabilities: headed class id -> the image's probability.
        threshold: the gate's threshold (None: no gate).

    Returns:
        The absent classes' ids.
    """
    return [] if threshold is None else sorted(c for c, p in probabilities.items() if p < threshold)


def presence_report(
    cases: Sequence[tuple[Mapping[int, float], torch.Tensor]], classes: Sequence[int], names: Mapping[int, str], threshold: float | None
) -> dict[str, float]:
    """How well the head tells images with a class from images without it, over a site's scored cases.

    Args:
        cases: per case, (headed class id -> the image's probability, its label map).
        classes: the headed classes the site labels (the truth: a label map that contains the class).
        names: class id -> name.
        threshold: the gate's threshold (None: no gate; accuracy is then taken at 0.5).

    Returns:
        Per class ``presence_accuracy_<name>`` and, when the cases hold images with and without it,
        ``presence_auc_<name>`` (MONAI's ROC AUC); ``presence_positive_<name>``: how many of the cases show it.
        Counts and rates only: no per-case value.
    """
    out: dict[str, float] = {}
    cut = 0.5 if threshold is None else threshold
    for c in classes:
        scored = [(p[c], bool((label == c).any())) for p, label in cases if c in p]
        if not scored:
            continue
        probs = torch.tensor([p for p, _ in scored], dtype=torch.float64)
        truth = torch.tensor([t for _, t in scored], dtype=torch.float64)
        out[f"presence_accuracy_{names[c]}"] = float(((probs >= cut).double() == truth).double().mean())
        out[f"presence_positive_{names[c]}"] = float(truth.sum())
        if 0 < truth.sum() < len(truth):
            out[f"presence_auc_{names[c]}"] = float(cast(float, compute_roc_auc(probs, truth)))
    return out
