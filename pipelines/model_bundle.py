"""The MONAI bundle view of a model package: ``metadata.json`` and ``inference.json``.

MONAI's own bundle runner executes the package on a NIfTI file with MONAI components only
(plus ``safetensors`` to read the weights)::

    python -m monai.bundle run --bundle_root PKG --config_file PKG/inference.json \
        --meta_file PKG/metadata.json --input_image scan.nii.gz --output_dir out/

The chain is the one fedimg trains and infers with (`pipelines.transforms.deterministic_transforms`):
RAS+ orientation, resampling to the training spacing (bilinear), the schema's intensity rule
(``intensity`` picks the modality: ``@intensity_CT`` by default, ``--intensity "@intensity_MR"``
for MR), gaussian-blended sliding windows, softmax, classes the model never trained folded
into background, MONAI's inverse of the chain on the probabilities, argmax, and the label saved
on the input's grid (``<output_dir>/<input name>_seg.nii.gz``). The same config runs in the
package's flat folder and in MONAI's standard layout (``configs/``, ``models/``, ``docs/``) that
`export_bundle` writes. fedimg itself never executes this config (`pipelines.model_package`); it
is written for the tools sites already use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import monai
import numpy as np
import torch

__all__ = ["bundle_files", "export_bundle"]


def _intensity(rule: Mapping[str, Any]) -> dict[str, Any]:
    """The MONAI transform of one modality rule (as `pipelines.transforms.intensity_transform` builds it)."""
    if rule["normalisation"] == "ct_window":
        lo, hi = rule["clip_hu"]
        centre, scale = rule["centre"], rule["scale"]
        return {
            "_target_": "ScaleIntensityRanged", "keys": "image", "a_min": lo, "a_max": hi,
            "b_min": (lo - centre) / scale, "b_max": (hi - centre) / scale, "clip": True,
        }  # fmt: skip
    if rule["normalisation"] == "zscore":
        return {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}
    return {"_target_": "Identityd", "keys": "image"}


def bundle_files(config: Mapping[str, Any], network: tuple[str, dict[str, Any]]) -> dict[str, bytes]:
    """``metadata.json`` and ``inference.json`` of a package (none for a 2D network: MONAI's
    sliding window would need fedimg's slice-wise wrapper).

    Args:
        config: the package's ``package.json`` content (without ``files``).
        network: MONAI's class name and constructor arguments (`pipelines.model_package.network_kwargs`).

    Returns:
        File name -> content (empty for 2D networks and for networks with a presence head).
    """
    if config["network"]["spatial_dims"] != 3 or (config.get("plan_args") or {}).get("presence_head"):
        return {}  # MONAI's runner would build the network without fedimg's presence head (and refuse its weights)
    import safetensors

    pre = config["preprocessing"]
    infer = config["inference"]
    schema = config["schema_definition"]
    n_classes = max(int(v) for v in schema["classes"].values()) + 1
    predicted = {int(v) for v in config["classes"].values()}
    class_mask = [1.0 if c in predicted else 0.0 for c in range(n_classes)]
    modalities = list(pre["intensity"])
    default_modality = "CT" if "CT" in modalities else modalities[0]
    target, kwargs = network
    preprocessing: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "NibabelReader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": [["L", "R"], ["P", "A"], ["I", "S"]]},
    ]
    if pre["spacing_mm"] != "native":
        preprocessing.append({"_target_": "Spacingd", "keys": "image", "pixdim": pre["spacing_mm"], "mode": "bilinear", "padding_mode": "border"})
    preprocessing_steps: list[Any] = [*preprocessing, "@intensity", {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"}]
    postprocessing: list[dict[str, Any]] = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    if min(class_mask) == 0.0:
        postprocessing.append({
            "_target_": "Lambdad", "keys": "pred",
            "func": "$lambda p: torch.cat([p[:1] + ((1 - @class_mask.to(p.device))[:, None, None, None] * p).sum(0, keepdim=True), "
                    "p[1:] * @class_mask.to(p.device)[1:, None, None, None]])",
        })  # fmt: skip
    postprocessing += [
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image", "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg", "output_dtype": "$numpy.uint8",
         "resample": False, "separate_folder": False, "print_log": False},
    ]  # fmt: skip
    inference: dict[str, Any] = {
        "imports": ["$import os", "$import numpy", "$import torch", "$from safetensors.torch import load_file as load_safetensors"],
        "bundle_root": ".",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "input_image": "",
        # the package's flat layout, or MONAI's standard one (`site-agent models export`: models/model.safetensors)
        "weights": "$os.path.join(@bundle_root, 'models', 'model.safetensors') if os.path.isdir(os.path.join(@bundle_root, 'models')) "
        "else os.path.join(@bundle_root, 'model.safetensors')",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": target, **kwargs},
        "network": "$@network_def.to(@device)",
        "class_mask": f"$torch.tensor({class_mask})",
        **{f"intensity_{m}": _intensity(rule) for m, rule in pre["intensity"].items()},
        "intensity": f"@intensity_{default_modality}",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing_steps},
        "datalist": "$[{'image': @input_image}]",
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": infer["roi_size"],
            "sw_batch_size": infer["sw_batch_size"],
            "overlap": infer["overlap"],
            "mode": "gaussian",
            "padding_mode": "constant",
        },  # fmt: skip
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },  # fmt: skip
        "initialize": [
            "$@network_def.load_state_dict(load_safetensors(@weights))",
            "$@network_def.eval()",
        ],
        "run": ["$@evaluator.run()"],
    }
    names = {int(v): k for k, v in schema["classes"].items()}
    prov = config.get("provenance") or {}
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": str(config.get("version") or "0.1.0"),
        "changelog": {str(config.get("version") or "0.1.0"): f"published from fedimg run {prov.get('run_id', '?')}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"safetensors": safetensors.__version__, "nibabel": _version("nibabel")},
        "name": config["name"],
        "task": f"Segmentation of {', '.join(k for k in config['classes'] if k != 'background')}",
        "description": config.get("description") or "A fedimg federated segmentation model.",
        "authors": "fedimg federation",
        "copyright": "the federation's sites",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if default_modality == "CT" else "magnitude",
                    "modality": default_modality,
                    "num_channels": 1,
                    "spatial_shape": infer["roi_size"],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": n_classes,
                    "spatial_shape": infer["roi_size"],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {str(c): names.get(c, f"unused_{c}") for c in range(n_classes)},
                }
            },
        },  # fmt: skip
    }
    return {
        "metadata.json": (json.dumps(metadata, indent=2) + "\n").encode("utf-8"),
        "inference.json": (json.dumps(inference, indent=2) + "\n").encode("utf-8"),
    }


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def export_bundle(package_folder: Any, target: Any) -> Any:
    """Copy a verified package into MONAI's standard bundle layout::

        <target>/configs/metadata.json, configs/inference.json, models/model.safetensors,
        docs/README.md (the model card), docs/package.json (fedimg's description)

    Args:
        package_folder: the package folder (verify it first: `pipelines.model_package.load_package`).
        target: the bundle folder to create (must not exist).

    Returns:
        ``target`` as a Path.

    Raises:
        ValueError: ``target`` exists, or the package has no bundle view (a 2D network).
    """
    import os
    import shutil
    from pathlib import Path

    from fedimg_core import atomic

    src, out = Path(package_folder), Path(target)
    if os.path.lexists(out):
        raise ValueError(f"{out} already exists; give a new folder")
    if not (src / "inference.json").is_file():
        raise ValueError(f"{src}: this package has no MONAI bundle view (2D networks have none)")
    layout = {"configs/metadata.json": "metadata.json", "configs/inference.json": "inference.json", "models/model.safetensors": "model.safetensors",
              "docs/README.md": "model-card.md", "docs/package.json": "package.json"}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> None:
        for dest, name in layout.items():
            (tmp / dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, tmp / dest)

    atomic.publish_dir(out, build)
    return out
