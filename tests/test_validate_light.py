"""Issue 17 case 11: `coordinator validate` answers in about a second because checking a spec
imports neither torch, MONAI nor Fed-BioMed (MONAI alone took 8-20 s to import).

Each check runs `coordinator validate` in a fresh interpreter and reads which top-level
packages it loaded: robust on a loaded machine, unlike a wall-clock bound. The table of
extra network options that replaces MONAI's constructor signatures in the check is pinned
to those signatures here.
"""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.network_config import MONAI_OPTIONS, NETWORKS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "coordinator" / "examples").glob("*.yaml"))
HEAVY = {"torch", "monai", "fedbiomed", "matplotlib", "torchvision", "scipy", "sklearn", "itk"}

# the console script's main(), with the top-level packages it loaded printed at exit
_PROBE = (
    "import atexit, json, sys\n"
    "atexit.register(lambda: print('LOADED ' + json.dumps(sorted({m.split('.')[0] for m in sys.modules}))))\n"
    "sys.argv = ['coordinator', 'validate', sys.argv[1]]\n"
    "from coordinator.cli import main\n"
    "main()\n"
)


def _validate(spec: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    res = subprocess.run([sys.executable, "-c", _PROBE, str(spec)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("LOADED ")]
    assert lines, res.stdout + res.stderr
    return res, set(json.loads(lines[-1][len("LOADED ") :]))


def test_examples_exist():
    assert {p.name for p in EXAMPLES} >= {"phantom_condistfl.yaml", "phantom_cross_modality.yaml", "phantom_factory.yaml"}


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda p: p.stem)
def test_validate_example_loads_no_heavy_package(spec):
    res, loaded = _validate(spec)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("ok: "), res.stdout
    assert not loaded & HEAVY, f"validate imported {sorted(loaded & HEAVY)}"


@pytest.mark.parametrize(
    ("plan_args", "expected"),
    [
        # the MONAI option check, without MONAI
        ("{network: {name: mednext, kernal_size: 5}}",
         "plan_args.network.kernal_size: unknown network option 'kernal_size' for mednext; did you mean 'kernel_size'? choose one of"),
        ("{network: {name: dynunet, size: small}, roi_size: [40, 40, 40]}",
         "plan_args.network: roi_size [40, 40, 40] does not fit dynunet size 'small'"),
        ("{gin: {prob: 2}}", "plan_args.gin.prob: must be within [0, 1] (got 2)"),
        ("{predict_classes: [livr]}", "plan_args.predict_classes: 'livr' not foreground classes of schema abdominal-ct"),
    ],
)  # fmt: skip
def test_segmentation_errors_still_reported_without_heavy_packages(tmp_path, plan_args, expected):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"name: bad\nplan: condistfl\nsites: {{tags: [demo], min_sites: 2}}\nrounds: 10\nlocal_steps: 10\nplan_args: {plan_args}\n")
    res, loaded = _validate(spec)
    assert res.returncode == 2, res.stdout + res.stderr
    assert expected in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not loaded & HEAVY, f"validate imported {sorted(loaded & HEAVY)}"


@pytest.mark.parametrize(
    ("plan_args", "expected"),
    [
        ("{key: {kind: random_cnn, proj_dimm: 8}}", "plan_args.key.proj_dimm: unknown option for kind 'random_cnn'"),
        ("{factory: {preset: tiny, resolution: 48}}", "plan_args.factory.resolution: must be a power of two >= 8"),
        ("{diff_augment: {cutout: 2}}", "plan_args.diff_augment.cutout: must be a fraction"),
    ],
)
def test_factory_errors_still_reported_without_heavy_packages(tmp_path, plan_args, expected):
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"name: bad\nplan: data_factory\nsites: {{tags: [demo], min_sites: 3}}\nrounds: 10\nplan_args: {plan_args}\n")
    res, loaded = _validate(spec)
    assert res.returncode == 2, res.stdout + res.stderr
    assert expected in res.stderr, res.stderr
    assert not loaded & HEAVY, f"validate imported {sorted(loaded & HEAVY)}"


def test_network_option_table_matches_monai_signatures():
    """The options a spec may give each network are exactly MONAI's constructor arguments
    less those build_network sets itself; a MONAI upgrade that changes them fails here."""
    from monai.networks.nets import BasicUNet, DynUNet, FlexibleUNet, MedNeXt

    classes = {"basic_unet": BasicUNet, "dynunet": DynUNet, "mednext": MedNeXt, "flexible_unet": FlexibleUNet}
    assert set(classes) == set(NETWORKS) == set(MONAI_OPTIONS)
    set_by_build = {"self", "spatial_dims", "in_channels", "out_channels", "deep_supervision", "dimensions"}
    for name, cls in classes.items():
        params = tuple(p for p in inspect.signature(cls.__init__).parameters if p not in set_by_build)
        assert MONAI_OPTIONS[name] == params, name


def test_old_import_paths_still_work():
    """Plans, tests and the coordinator import these names from the modules that build the
    networks; they are the same objects as the light modules'."""
    import pipelines.factory.domain_key as dk
    import pipelines.factory.networks as fnet
    import pipelines.factory.training as ftr
    import pipelines.gin as gin
    import pipelines.networks as net
    import pipelines.training as tr
    from pipelines import gin_args, network_config, plan_args
    from pipelines.factory import config, key_config
    from pipelines.factory import plan_args as fplan_args

    assert tr.parse_plan_args is plan_args.parse_plan_args and tr.PLAN_ARG_KEYS is plan_args.PLAN_ARG_KEYS
    assert tr.SegmentationSettings is plan_args.SegmentationSettings and tr.DEFAULTS is plan_args.DEFAULTS
    assert callable(tr.is_plain_name) and not tr.is_plain_name("../x")
    assert net.network_config_from_spec is network_config.network_config_from_spec
    assert net.resolve_config is network_config.resolve_config and net.check_patch_size is network_config.check_patch_size
    assert gin.parse_gin_args is gin_args.parse_gin_args and gin.DEFAULTS is gin_args.DEFAULTS
    assert ftr.parse_factory_args is fplan_args.parse_factory_args and ftr.FACTORY_ARG_KEYS is fplan_args.FACTORY_ARG_KEYS
    assert ftr.FactorySettings is fplan_args.FactorySettings
    assert fnet.FactoryConfig is config.FactoryConfig and fnet.preset_values is config.preset_values
    assert dk.validate_key_config is key_config.validate_key_config and dk.KeyConfigError is key_config.KeyConfigError
