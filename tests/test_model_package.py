"""Model packages: built from a run (`coordinator publish`), verified byte for byte, loaded as a site
loads them, run by MONAI's own bundle runner, and inverted exactly onto the input's grid."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT

from coordinator import runs
from coordinator.publish import publish_model
from coordinator.registry import Registry, RegistryError
from coordinator.spec import parse
from fedimg_core.errors import UserError
from pipelines.inference import segment_image
from pipelines.model_package import PackageError, build_package_files, load_package, verify_package_files
from pipelines.networks import build_network

SCHEMA_RAW = yaml.safe_load((ROOT / "preprocessing" / "schemas" / "abdominal-ct.yaml").read_text())
NET = {"name": "basic_unet", "features": [4, 4, 8, 8, 16, 4]}
SPEC = """
name: abdomen
plan: marginal
sites: {tags: [x]}
rounds: 2
plan_args:
  schema: abdominal-ct
  network: {name: basic_unet, features: [4, 4, 8, 8, 16, 4]}
  roi_size: [32, 32, 32]
  spacing: [2.5, 2.5, 2.5]
"""


def _net(seed=0):
    torch.manual_seed(seed)
    return build_network(out_channels=8, **NET)


def _plan_args(spacing=(2.5, 2.5, 2.5), predict=("kidney", "liver", "spleen")):
    return {"schema_definition": SCHEMA_RAW, "network": NET, "roi_size": [32, 32, 32], "spacing": list(spacing) if spacing else "native",
            "predict_classes": list(predict) if predict else None, "lr": 0.01, "split": {"validation": 0.2}}  # fmt: skip


def _write(folder, files):
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _scan(path, shape=(40, 36, 18), affine=None, seed=0):
    """A CT-like volume in an LPS-ordered, anisotropic grid with an off-centre origin (not RAS+, not the training spacing)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(40, 15, shape).astype(np.float32)
    data[10:25, 8:20, 4:12] += 150  # a bright block (190 HU: 1.8 after the CT rule, the rest -1.2)
    data[10:12, 20:22, 4:6] += 400  # a small bright spot outside it, asymmetric: a flipped axis would move it
    if affine is None:
        affine = np.array([[-0.9, 0, 0, 20.0], [0, -1.1, 0, 35.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    files = build_package_files(name="abdomen", plan_args=_plan_args(), state_dict=_net().state_dict(), provenance={"run_id": "r1"})
    return _write(tmp_path_factory.mktemp("pkg") / "abdomen", files)


def test_a_package_loads_back_the_same_network_and_settings(package_dir, one_thread):
    package = load_package(package_dir)
    assert package.class_ids == {"background": 0, "kidney": 1, "liver": 3, "spleen": 7}  # predicted classes only
    assert package.settings.spacing == (2.5, 2.5, 2.5) and package.settings.roi_size == (32, 32, 32)
    assert package.settings.predict_classes == (1, 3, 7)
    config = json.loads((package_dir / "package.json").read_text())
    assert "lr" not in json.dumps(config["plan_args"]) and "split" not in config["plan_args"]  # training settings stay behind
    assert set(config["files"]) == {"model.safetensors", "metadata.json", "inference.json", "model-card.md"}
    assert config["monai_bundle"] is True
    x = torch.randn(1, 1, 32, 32, 32)
    reference = _net().eval()
    with torch.no_grad():
        assert torch.equal(package.network(x), reference(x))
    assert (package_dir / "model.safetensors").read_bytes()[:8] != b"PK\x03\x04"  # not a pickle zip: tensors only


def test_weights_that_do_not_fit_the_network_are_refused():
    state = _net().state_dict()
    state.pop(next(iter(state)))
    with pytest.raises(PackageError, match="do not fit the network"):
        build_package_files(name="bad", plan_args=_plan_args(), state_dict=state, provenance={})


@pytest.mark.parametrize("filename", ["package.json", "model.safetensors", "inference.json", "metadata.json", "model-card.md"])
def test_one_changed_byte_in_any_file_refuses_a_published_package(tmp_path, filename):
    home = tmp_path / "coord"
    files = build_package_files(name="abdomen", plan_args=_plan_args(), state_dict=_net().state_dict(), provenance={})
    Registry(home).publish("model", "abdomen", files)
    folder = Registry(home).path("model", "abdomen")
    load_package(folder)  # intact: loads
    data = bytearray((folder / filename).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / filename).write_bytes(bytes(data))
    with pytest.raises(PackageError, match=f"{filename}: does not match its checksum"):
        load_package(folder)


def test_extra_and_missing_files_are_refused(package_dir, tmp_path):
    copy = _write(tmp_path / "copy", {p.name: p.read_bytes() for p in package_dir.iterdir()})
    (copy / "notes.txt").write_text("x")
    with pytest.raises(PackageError, match="not part of the package: notes.txt"):
        verify_package_files(copy)
    (copy / "notes.txt").unlink()
    (copy / "model-card.md").unlink()
    with pytest.raises(PackageError, match="model-card.md: missing"):
        verify_package_files(copy)


def _rewrite(folder, filename, data):
    """Replace a file and update package.json's checksum of it, as someone forging a package would."""
    (folder / filename).write_bytes(data)
    config = json.loads((folder / "package.json").read_text())
    config["files"][filename] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (folder / "package.json").write_text(json.dumps(config))


def test_a_forged_bundle_config_is_refused_even_with_matching_checksums(package_dir, tmp_path):
    """MONAI executes a bundle config's expressions: a package whose inference.json is not the one fedimg builds from its
    package.json is refused, even when package.json lists the forged file's checksum (a folder without a registry record)."""
    copy = _write(tmp_path / "forged", {p.name: p.read_bytes() for p in package_dir.iterdir()})
    config = json.loads((copy / "inference.json").read_text())
    config["initialize"].append("$__import__('os').system('touch /tmp/pwned')")
    _rewrite(copy, "inference.json", json.dumps(config).encode())
    verify_package_files(copy)  # the checksums agree with package.json...
    with pytest.raises(PackageError, match="not the MONAI bundle config fedimg builds"):
        load_package(copy)  # ...but the config is not fedimg's


def test_a_package_name_that_is_a_path_is_refused(package_dir, tmp_path):
    copy = _write(tmp_path / "named", {p.name: p.read_bytes() for p in package_dir.iterdir()})
    config = json.loads((copy / "package.json").read_text())
    config["name"] = "../../elsewhere"
    (copy / "package.json").write_text(json.dumps(config))
    with pytest.raises(PackageError, match="is not a package name"):
        load_package(copy)


def test_a_registry_record_must_list_exactly_the_package_files(tmp_path):
    home = tmp_path / "coord"
    files = build_package_files(name="abdomen", plan_args=_plan_args(), state_dict=_net().state_dict(), provenance={})
    with pytest.raises(RegistryError, match="not part of the package: notes.json"):  # the registry refuses it outright
        Registry(home).publish("model", "abdomen", {**files, "notes.json": b"{}"})
    Registry(home).publish("model", "abdomen", files)
    folder = Registry(home).path("model", "abdomen")
    (folder / "notes.json").write_bytes(b"{}")  # slipped in later, with a record that lists it
    record = json.loads((folder / "artifact.json").read_text())
    record["files"]["notes.json"] = {"sha256": hashlib.sha256(b"{}").hexdigest(), "bytes": 2}
    (folder / "artifact.json").write_text(json.dumps(record))
    with pytest.raises(PackageError, match="lists other files than package.json does"):
        load_package(folder)


def test_the_registry_refuses_a_model_that_does_not_load(tmp_path):
    files = build_package_files(name="abdomen", plan_args=_plan_args(), state_dict=_net().state_dict(), provenance={})
    files["model.safetensors"] = build_package_files(name="x", plan_args=_plan_args(), state_dict=_net(1).state_dict(), provenance={})["model.safetensors"]
    with pytest.raises(RegistryError, match="model.safetensors: does not match its checksum"):
        Registry(tmp_path).publish("model", "abdomen", files)
    assert not (tmp_path / "registry" / "model" / "abdomen").exists() or not Registry(tmp_path).versions("model", "abdomen")


class _Threshold(torch.nn.Module):
    """Class 3 (liver) wherever the normalised intensity is above 0.5, else background: a network whose answer is known."""

    def forward(self, x):
        logits = torch.full((x.shape[0], 8, *x.shape[2:]), -20.0)
        logits[:, 0] = 0.0
        logits[:, 3] = (x[:, 0] - 0.5) * 50
        return logits


def test_the_label_is_inverted_exactly_onto_the_input_grid(tmp_path, one_thread):
    """Native spacing: the chain only reorients (LPS -> RAS+), so its inverse must give back the
    threshold of the input itself, voxel for voxel, on the input's shape and affine."""
    files = build_package_files(name="native", plan_args=_plan_args(spacing=None, predict=None), state_dict=_net().state_dict(), provenance={})
    package = load_package(_write(tmp_path / "native", files))
    scan = _scan(tmp_path / "scan.nii.gz")
    pred = segment_image(_Threshold(), package.settings, scan, "CT")
    image = nib.load(scan)
    expected = np.where((image.get_fdata() - 100) / 50 > 0.5, 3, 0)  # the schema's CT rule: (HU - 100) / 50 in the window
    assert pred.label.shape == image.shape and np.array_equal(pred.affine, image.affine)
    assert np.array_equal(pred.label, expected)
    out = tmp_path / "label.nii.gz"
    pred.save_nifti(out)
    saved = nib.load(out)
    assert np.allclose(saved.affine, image.affine) and np.array_equal(np.asarray(saved.dataobj), expected)


def test_resampled_inference_lands_on_the_input_grid(tmp_path, one_thread):
    """Training spacing 2.5 mm, input 0.9 x 1.1 x 2.5 mm LPS: the label comes back on the input grid and matches the
    threshold except within a voxel or so of the block's edges (bilinear resampling there and back)."""
    files = build_package_files(name="resampled", plan_args=_plan_args(predict=None), state_dict=_net().state_dict(), provenance={})
    package = load_package(_write(tmp_path / "resampled", files))
    scan = _scan(tmp_path / "scan.nii.gz")
    pred = segment_image(_Threshold(), package.settings, scan, "CT")
    image = nib.load(scan)
    assert pred.label.shape == image.shape and np.array_equal(pred.affine, image.affine)
    block = np.zeros(image.shape, bool)
    block[9:26, 7:21, 3:13] = True  # the block and a voxel around it
    block[9:13, 19:23, 3:7] = True  # the spot
    inner = np.zeros(image.shape, bool)
    inner[13:22, 11:17, 6:10] = True  # 3 voxels (>= 2.5 mm) inside the block's edges
    assert (pred.label[inner] == 3).all()  # the bright block
    assert (pred.label[~block] == 3).mean() < 0.01  # only next to the block's edges and the spot


@pytest.mark.parametrize("layout", ["flat", "standard"])
def test_monai_bundle_runner_gives_the_same_label_as_fedimg(package_dir, tmp_path, layout):
    """The package is a MONAI bundle: MONAI's own runner (`python -m monai.bundle run`) segments a NIfTI file and
    writes the label fedimg's inference writes, on the input's grid; as the package's flat folder, and exported
    (`pipelines.model_bundle.export_bundle`) into MONAI's standard layout."""
    from pipelines.model_bundle import export_bundle

    scan = _scan(tmp_path / "scan.nii.gz")
    out = tmp_path / "bundle-out"
    root, configs = package_dir, package_dir
    if layout == "standard":
        root = export_bundle(package_dir, tmp_path / "bundle")
        configs = root / "configs"
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
            "configs/inference.json", "configs/metadata.json", "docs/README.md", "docs/package.json", "models/model.safetensors"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root), "--config_file", str(configs / "inference.json"),
         "--meta_file", str(configs / "metadata.json"), "--input_image", str(scan), "--output_dir", str(out)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    monai_label = nib.load(out / "scan_seg.nii.gz")
    image = nib.load(scan)
    assert monai_label.shape == image.shape and np.allclose(monai_label.affine, image.affine)
    package = load_package(package_dir)
    ours = segment_image(package.network, package.settings, scan, "CT").label
    assert set(np.unique(ours)) <= {0, 1, 3, 7}  # untrained classes folded into background, in both
    assert set(np.unique(np.asarray(monai_label.dataobj))) <= {0, 1, 3, 7}
    assert (np.asarray(monai_label.dataobj) == ours).mean() > 0.999


def _fake_run(home, spec=SPEC):
    run = runs.new_run(home, spec, "abdomen", resolved=parse(spec, "spec").resolved_raw())
    ckpt = run / "checkpoints"
    (ckpt / "local").mkdir(parents=True)
    for r in range(3):
        torch.save(_net(r).state_dict(), ckpt / f"global_round_{r:04d}.pt")
    torch.save(_net(1).state_dict(), ckpt / "best_global.pt")
    val = {"case0_dice_liver": 0.8, "case1_dice_liver": 0.6, "dice_liver": 0.7, "dice_mean": 0.7, "cases": 2.0}
    val_k = {"case0_dice_kidney": 0.5, "dice_kidney": 0.5, "dice_mean": 0.5, "cases": 1.0}
    runs.write_metrics(run, {
        "rounds": [
            {"round": 1, "sites": {"NODE_a": {"name": "site-a", "val_local": val}, "NODE_b": {"name": "site-b", "val_local": val_k}}},
            {"round": 2, "sites": {"NODE_a": {"name": "site-a", "val_global": val}, "NODE_b": {"name": "site-b", "val_global": val_k}}},
        ],
        "best_global": {"model_round": 1, "score": 0.6},
        "rounds_planned": 2,
    })  # fmt: skip
    return run


def test_publish_writes_a_versioned_package_with_provenance(tmp_path, one_thread):
    home = tmp_path / "coord"
    run = _fake_run(home)
    record = publish_model(home, run.name, description="Kidney and liver on CT")
    assert record["kind"] == "model" and record["name"] == "abdomen" and record["version"] == "v0001"
    folder = Registry(home).path("model", "abdomen")
    package = load_package(folder)
    assert package.ref == "abdomen@v0001"
    # trained classes only: the sites scored kidney and liver, so the others fold into background
    assert package.class_ids == {"background": 0, "kidney": 1, "liver": 3}
    with torch.no_grad():
        x = torch.randn(1, 1, 32, 32, 32)
        assert torch.equal(package.network(x), _net(1).eval()(x))  # the best model (round 1), not the last
    prov = package.config["provenance"]
    assert prov["run_id"] == run.name and prov["model_round"] == 1
    assert prov["spec_sha256"] == hashlib.sha256((run / prov["spec_file"]).read_bytes()).hexdigest()
    assert prov["spec_file"] == runs.spec_file(run).name
    assert prov["sites"] == ["site-a", "site-b"]  # names only: no Fed-BioMed node ids go to every site
    # the best model is the global model of round 1: the sites scored it at the start of round 2
    assert prov["validation"] == {"kidney": {"mean": 0.5, "n": 1}, "liver": {"mean": 0.7, "n": 2}}
    card = (folder / "model-card.md").read_text()
    assert "Kidney and liver on CT" in card and "| liver | 0.700 | 2 |" in card
    assert publish_model(home, run.name, model="last")["version"] == "v0002"
    last = load_package(Registry(home).path("model", "abdomen", "v0002"))
    with torch.no_grad():
        assert torch.equal(last.network(x), _net(2).eval()(x))
    assert load_package(Registry(home).path("model", "abdomen")).ref == "abdomen@v0002"  # latest moved


def test_publish_refuses_what_the_run_does_not_have(tmp_path):
    home = tmp_path / "coord"
    run = _fake_run(home)
    with pytest.raises(UserError, match="no global model of round 7; it has rounds 0-2"):
        publish_model(home, run.name, model="round 7")
    with pytest.raises(UserError, match="use best, last or round N"):
        publish_model(home, run.name, model="newest")
    (run / "checkpoints" / "best_global.pt").unlink()
    with pytest.raises(UserError, match="no best global model"):
        publish_model(home, run.name)
    out = tmp_path / "exists"
    out.mkdir()
    with pytest.raises(UserError, match="already exists"):
        publish_model(home, run.name, model="round 2", out=out)
    assert not Registry(home).versions("model", "abdomen")  # nothing published by a refused command


def test_a_package_keeps_the_presence_head_and_its_gate(tmp_path, one_thread):
    """A model with a presence head (`pipelines.presence`) is packaged with its head's weights and settings and loads back
    gating as it was trained to; MONAI's bundle runner, which would build the network without the head, gets no config."""
    from pipelines.plan_args import parse_plan_args
    from pipelines.presence import has_presence_head, presence_logits
    from pipelines.training import build_model
    from preprocessing.schema import parse_schema

    plan_args = {**_plan_args(), "presence_head": {"classes": ["liver"], "threshold": 0.4}}
    settings = parse_plan_args({k: v for k, v in plan_args.items() if k not in ("lr", "split")}, parse_schema(SCHEMA_RAW, "schema"))
    torch.manual_seed(3)
    trained = build_model(settings)
    files = build_package_files(name="headed", plan_args=plan_args, state_dict=trained.state_dict(), provenance={"run_id": "r2"})
    assert "inference.json" not in files
    package = load_package(_write(tmp_path / "headed", files))
    assert has_presence_head(package.network) and package.settings.presence_classes == (3,) and package.settings.presence_threshold == 0.4
    x = torch.randn(2, 1, 32, 32, 32)
    trained.eval()
    with torch.no_grad():
        trained(x)
        package.network(x)
    assert torch.equal(presence_logits(package.network), presence_logits(trained))
    with pytest.raises(PackageError, match="do not fit"):  # the head's weights without a head in the plan arguments
        build_package_files(name="headless", plan_args=_plan_args(), state_dict=trained.state_dict(), provenance={})


def test_a_package_without_a_head_stays_version_1_and_a_head_needs_version_2(package_dir, tmp_path):
    config = json.loads((package_dir / "package.json").read_text())
    assert config["format_version"] == 1 and "presence_head" not in config["plan_args"]  # an older fedimg still reads it
    forged = dict(config, plan_args={**config["plan_args"], "presence_head": {"classes": ["liver"]}})
    folder = tmp_path / "forged"
    shutil.copytree(package_dir, folder)
    (folder / "package.json").write_text(json.dumps(forged))
    with pytest.raises(PackageError, match="format_version 2 is for, and only for, packages with plan_args.presence_head"):
        load_package(folder)
