"""FedSR around the plan: spec rules, the atlas through the registry (publish, pull over HTTP, tampering),
the site's personalised model (list, infer, evaluate refusals), and the FedSR results and report."""

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import ROOT, site_agent_in_process, spec_problems

from coordinator import spec as spec_mod
from coordinator.registry_http import serve_registry
from coordinator.site_tokens import SiteTokens
from fedimg_testing.phantom import make_brain_atlas, write_brain_atlas

EXAMPLE = ROOT / "coordinator" / "examples" / "phantom_fedsr.yaml"
ATLAS = {"name": "brain-atlas", "version": "v0001", "sha256": "a" * 64}
BASE = {"name": "s", "plan": "fedsr", "sites": {"tags": ["demo"], "min_sites": 2}, "rounds": 4, "plan_args": {"schema": "brain-mri", "atlas": ATLAS}}


def _spec(**changes) -> str:
    raw = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        if key == "plan_args":
            raw["plan_args"].update(value)
        else:
            raw[key] = value
    return yaml.safe_dump(raw)


def test_a_fedsr_spec_gets_its_defaults():
    spec = spec_mod.parse(_spec(), "exp.yaml")
    assert spec.is_fedsr and spec.batch_size == 1 and spec.optimizer == {"lr": 1e-4} and spec.weights == "samples"
    assert spec.split["validation"] == 0 and spec.split["test"] == 0
    args = spec.experiment_model_args(run_id="r1")
    assert args["rounds_total"] == 4 and args["run_id"] == "r1" and args["atlas"] == ATLAS
    assert args["schema_definition"]["name"] == "brain-mri"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"split": {"validation": 0.2, "test": 0.2}}, "split"),
        ({"validate_every": 2}, "validate_every"),
        ({"aggregator": "scaffold"}, "aggregator"),
        ({"secagg": {"scheme": "lom"}}, "secagg"),
        ({"dp": {"type": "local", "sigma": 1.0, "clip": 1.0}}, "dp"),
        ({"optimizer": {"lr": 0.001, "weight_decay": 0.1}}, "optimizer"),
        ({"plan_args": {"finetune_rounds": 4}}, "plan_args.finetune_rounds"),
        ({"plan_args": {"atlas": {"name": "a", "version": "latest", "sha256": "a" * 64}}}, "plan_args.atlas.version"),
        ({"plan_args": {"method": "fedprox"}}, "plan_args.method"),
    ],
)
def test_fedsr_spec_rules_name_the_key(changes, key):
    problems = spec_problems(_spec(**changes))
    assert key in problems, problems


def test_the_example_runs_at_tiny_scale_and_names_the_phantom_atlas():
    from pipelines.fedsr.atlas import ATLAS_FILE, atlas_files
    from preprocessing.schema import load_schema

    full = spec_mod.load(EXAMPLE)
    tiny = spec_mod.load(EXAMPLE, scale="tiny")
    assert tiny.rounds == 2 and tiny.model_args["finetune_rounds"] == 1 and tiny.model_args["network"]["size"] == "tiny"
    # the testbed publishes exactly this content (coordinator.testbed.Testbed.install_atlas): the example's sha256 must match it
    atlas = make_brain_atlas(shape=(32, 32, 32))
    content = atlas_files(atlas.image, atlas.labels, atlas.affine, load_schema("brain-mri"), "MR", "fedimg brain phantom template",
                          "synthetic: no person")[ATLAS_FILE]  # fmt: skip
    assert full.model_args["atlas"]["sha256"] == hashlib.sha256(content).hexdigest()


# -- the atlas through the registry -----------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_site(tmp_path_factory):
    """A coordinator home whose registry is served on loopback, and a site config that names it."""
    root = tmp_path_factory.mktemp("atlas")
    home = root / "coord"
    home.mkdir()
    httpd = serve_registry(home, "127.0.0.1", 0)
    token = root / "site-token"
    token.write_text(SiteTokens(home).issue("site-a") + "\n")
    cfg = root / "site.yaml"
    cfg.write_text(yaml.safe_dump({
        "site_name": "site-a", "coordinator": {"host": "localhost", "port": 50051}, "data_dir": str(root / "data"),
        "work_dir": str(root / "work"), "runtime": "process",
        "registry": {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "token_file": str(token)},
    }))  # fmt: skip
    yield root, home, cfg
    httpd.shutdown()
    httpd.server_close()


def _coordinator(*args):
    from coordinator.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_atlas_published_pulled_and_checked(registry_site):
    root, home, cfg = registry_site
    image, labels = write_brain_atlas(root / "atlas-files", shape=(24, 24, 24))
    res = _coordinator("atlas", "publish", "--home", home, "--name", "brain", "--image", image, "--labels", labels, "--schema", "brain-mri",
                       "--source", "phantom template", "--sharing", "synthetic")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "site-agent atlas pull brain@v0001" in res.output
    listed = json.loads(_coordinator("atlas", "list", "--home", home, "--json").output)
    assert [(r["name"], r["version"]) for r in listed] == [("brain", "v0001")]
    sha = listed[0]["sha256"]
    assert f"sha256: {sha}" in res.output  # the plan_args.atlas entry printed for the spec
    code, out, err = site_agent_in_process("--config", cfg, "atlas", "pull", "brain@v0001", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["sha256"] == sha and "cerebral_cortex" in row["classes"] and row["sharing"] == "synthetic"
    folder = Path(row["folder"])
    assert folder == root / "work" / "models" / "registry" / "atlas" / "brain" / "v0001"
    # what the plan loads: the spec's sha256 must match
    from pipelines.fedsr.atlas import AtlasError, load_atlas

    assert load_atlas(folder, sha256=sha).image.shape == (24, 24, 24)
    with pytest.raises(AtlasError, match="the spec names"):
        load_atlas(folder, sha256="b" * 64)
    # a changed byte at the site: listed with its problem, refused by the plan
    data = bytearray((folder / "atlas.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "atlas.safetensors").write_bytes(bytes(data))
    code, out, _ = site_agent_in_process("--config", cfg, "atlas", "list", "--json")
    assert code == 0 and "sha256" in json.loads(out)[0]["problem"]


def test_an_atlas_with_labels_outside_the_schema_is_refused_in_one_line(registry_site):
    root, home, _ = registry_site
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    bad = root / "bad"
    bad.mkdir()
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), affine), bad / "image.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 42, np.uint8), affine), bad / "labels.nii.gz")
    res = _coordinator("atlas", "publish", "--home", home, "--name", "bad", "--image", bad / "image.nii.gz", "--labels", bad / "labels.nii.gz",
                       "--schema", "brain-mri", "--source", "x", "--sharing", "y")  # fmt: skip
    assert res.exit_code != 0 and "42" in str(res.exception or res.output)
    assert not (home / "registry" / "atlas" / "bad").exists()


# -- the personalised model at the site -----------------------------------------------------------------


@pytest.fixture
def personal_site(tmp_path):
    """A site whose work folder holds a personalised model of run 'run-1' (an untrained tiny FedSR model)."""
    from pipelines.fedsr.personal import personal_model_record
    from pipelines.fedsr.plan_args import parse_fedsr_args
    from pipelines.fedsr.training import FEDSR_METHODS, FedSRModel
    from pipelines.plans.fedsr_base import fedsr_network_config
    from preprocessing.schema import load_schema, parse_schema

    raw = yaml.safe_load((ROOT / "preprocessing" / "schemas" / "brain-mri.yaml").read_text())
    settings = parse_fedsr_args({"atlas": ATLAS, "spacing": [6.0, 6.0, 6.0]})
    torch.manual_seed(0)
    model = FedSRModel(fedsr_network_config(settings, parse_schema(raw, "t")), FEDSR_METHODS["fedsr"])
    cache = tmp_path / "work" / "cache" / "fedsr"
    cache.mkdir(parents=True)
    torch.save(personal_model_record(model, run_id="run-1", round_index=3, method="fedsr", size="tiny", integrate_velocity=False,
                                     volume_size=(32, 32, 32), spacing=(6.0, 6.0, 6.0), schema_definition=raw, atlas=ATLAS),
               cache / "run-1-model.pt")  # fmt: skip
    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({"site_name": "site-a", "coordinator": {"host": "localhost", "port": 50051}, "data_dir": str(tmp_path / "data"),
                                   "work_dir": str(tmp_path / "work"), "runtime": "process"}))  # fmt: skip
    assert load_schema("brain-mri").num_classes == 11
    return tmp_path, cfg


def test_personalised_models_are_listed_and_segment_a_nifti_on_its_own_grid(personal_site):
    root, cfg = personal_site
    code, out, err = site_agent_in_process("--config", cfg, "models", "personal", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["ref"] == "personal:run-1" and row["round"] == 4 and row["atlas"] == "brain-atlas@v0001"
    image = make_brain_atlas(shape=(40, 44, 36), spacing_mm=(4.8, 4.4, 5.3))
    source = root / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image.image, image.affine), source)
    code, out, err = site_agent_in_process("--config", cfg, "infer", source, "--model", "personal:run-1", "--modality", "MR", "--out", root / "out")
    assert code == 0, err
    label = nib.load(root / "out" / "scan.nii.gz")
    assert label.shape == (40, 44, 36) and np.allclose(label.affine, image.affine)
    assert set(np.unique(np.asarray(label.dataobj))) <= set(range(11))


def test_personalised_model_refusals_name_the_problem(personal_site):
    root, cfg = personal_site
    code, _, err = site_agent_in_process("--config", cfg, "infer", root, "--model", "personal:run-2", "--out", root / "o")
    assert code != 0 and "personal:run-1" in err and len(err.strip().splitlines()) == 1  # names what this site has
    code, _, err = site_agent_in_process("--config", cfg, "infer", root, "--model", "personal:../x", "--out", root / "o")
    assert code != 0 and "plain name" in err
    (root / "work" / "cache" / "fedsr" / "run-3-model.pt").write_bytes(b"not a model")
    code, out, _ = site_agent_in_process("--config", cfg, "models", "personal", "--json")
    assert code == 0 and "cannot read" in next(r for r in json.loads(out) if r["run_id"] == "run-3")["problem"]


# -- results and report ------------------------------------------------------------------------


def _fedsr_run(home: Path) -> Path:
    from coordinator import runs

    run_dir = home / "runs" / "20261206-000000-fedsr-abcd"
    run_dir.mkdir(parents=True)
    site = lambda name, dice, finetune: {  # noqa: E731
        "name": name, "samples": 4,
        "train": {"loss_registration": -0.5, "loss_segmentation": 0.4, "mi_segmentation": 0.1, "sa_shift": 0.01, "finetune": finetune,
                  "volumes_training": 4.0, "round_index": 1.0,
                  **({"eval_cases": 2.0, "eval_seg_dice": dice, "eval_seg_hd95_mm": 3.0, "eval_reg_dice_mean": 0.7, "eval_reg_ncc": 0.8,
                      "eval_seg_dice.cerebral_cortex": dice} if finetune else {})},
    }  # fmt: skip
    metrics = {
        "plan": "fedsr", "mode": "federated", "rounds_planned": 2, "local_steps": 3, "classes": {"background": 0, "cerebral_cortex": 2},
        "rounds": [{"round": r, "wall_s": 1.0, "update_norm": 0.1, "sites": {"N1": site("site-1", 0.61, r == 2), "N2": site("site-2", 0.52, r == 2)}}
                   for r in (1, 2)],
    }  # fmt: skip
    runs.write_metrics(run_dir, metrics)
    (run_dir / "state.json").write_text(json.dumps({"run_id": run_dir.name, "name": "fedsr", "status": "done", "plan": "fedsr"}))
    return run_dir


def test_results_and_report_show_each_sites_personalised_model(tmp_path):
    home = tmp_path / "home"
    run_dir = _fedsr_run(home)
    res = _coordinator("results", run_dir.name, "--home", home)
    assert res.exit_code == 0, res.output
    assert "personalised models" in res.output and "0.610" in res.output and "0.520" in res.output and "fine-tune" in res.output
    res = _coordinator("report", run_dir.name, "--home", home)
    assert res.exit_code == 0, res.output
    page = (run_dir / "report" / "report.md").read_text()
    assert "| site-1 | 2 | 2 | 0.610 |" in page and "segmentation Dice per structure" in page
    assert (run_dir / "report" / "training_curves.png").stat().st_size > 1000
