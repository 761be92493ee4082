"""Registry of training plans a spec can name. Values are import paths, resolved lazily."""

from __future__ import annotations

import importlib

PLANS: dict[str, str] = {
    "fedavg_segmentation": "pipelines.plans.fedavg_segmentation:FedAvgSegmentationPlan",
}


def resolve(name: str):
    module, _, attr = PLANS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def check_plan_args(name: str, args: dict) -> tuple[str, str] | None:
    """(key, problem) when a plan's arguments are wrong, checked before anything is sent."""
    if name == "fedavg_segmentation":
        n = args.get("num_classes")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            return "num_classes", f"required: an integer >= 2, background included (got {n!r})"
        network = args.get("network", {})
        if not isinstance(network, dict):
            return "network", "must be a mapping (name, spatial_dims, features)"
        dims = network.get("spatial_dims", 3)
        roi = args.get("roi_size")
        if roi is not None and (
            not isinstance(roi, list) or len(roi) != dims or not all(isinstance(v, int) and v >= 8 for v in roi)
        ):
            return "roi_size", f"must be a list of {dims} integers >= 8 (got {roi!r})"
    return None
