"""Device settings as the configs spell them, and the rule that turns them into Fed-BioMed's node arguments.

Three settings meet at a site (torch-free here, so that config validation and `site-agent
start` stay light; `pipelines.device` does the torch side):

* the site's ``device`` (``site.yaml``): ``auto`` (a GPU when torch sees one), ``cpu``, ``cuda``
  or ``cuda:N`` (that GPU, and refuse to run without it);
* the experiment's ``device.gpu`` (the spec): ``optional`` (the site decides), ``required`` (a
  site without a GPU refuses the round) or ``forbidden`` (CPU everywhere, e.g. bit-for-bit runs);
* the experiment's ``device.precision``: ``auto`` (bf16 on GPUs that have it, else fp16 with a
  loss scale; fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.

Fed-BioMed 6.4.1 trains on CUDA when it is available and either the node offers a GPU
(``gpu``) and the researcher asks for one (``training_args.use_gpu``), or the node forces it
(``gpu_only``); ``gpu_num`` picks the card.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "DEVICE_ENV",
    "DEVICE_PATTERN",
    "GPU_POLICIES",
    "PRECISIONS",
    "TRANSFER_PRECISIONS",
    "cuda_index",
    "node_args_for",
    "parse_device",
]

DEVICE_ENV = "FEDIMG_DEVICE"  # the site's device setting, in its node's environment (site_agent.runtime)
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,2})?)$"
GPU_POLICIES = ("optional", "required", "forbidden")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# how models travel between coordinator and sites (spec `transfer.precision`, pipelines.wire)
TRANSFER_PRECISIONS = ("fp32", "bf16", "fp16")


def parse_device(value: str) -> str:
    """Check a device setting.

    Args:
        value: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns:
        The setting, lower-cased and stripped.

    Raises:
        ValueError: any other value, saying what is allowed.
    """
    text = str(value).strip().lower()
    if not re.match(DEVICE_PATTERN, text):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N (got {value!r})")
    return text


def cuda_index(device: str) -> int | None:
    """The GPU index of ``cuda:N`` (None for ``cuda``, ``auto`` and ``cpu``).

    Args:
        device: a checked device setting.

    Returns:
        N, or None.
    """
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else None


def node_args_for(device: str) -> dict[str, Any]:
    """Fed-BioMed's node arguments for a site's device setting.

    Args:
        device: the site's checked device setting.

    Returns:
        ``{"gpu", "gpu_num", "gpu_only", "debug"}``: ``cpu`` offers no GPU; ``auto`` offers one
        (used when the experiment asks and torch sees one); ``cuda[:N]`` forces it.
    """
    device = parse_device(device)
    return {
        "gpu": device != "cpu",
        "gpu_num": cuda_index(device),  # None: the default card (Fed-BioMed's own default of 1 is the second card)
        "gpu_only": device.startswith("cuda"),
        "debug": False,
    }
