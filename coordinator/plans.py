"""Registry of training plans a spec can name. Values are import paths, resolved lazily."""

from __future__ import annotations

import importlib

PLANS: dict[str, str] = {
    "fedavg_segmentation": "pipelines.plans.fedavg_segmentation:FedAvgSegmentationPlan",
}


def resolve(name: str):
    module, _, attr = PLANS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
