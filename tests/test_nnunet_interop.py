"""A prepared dataset read by the tools sites already use: nnU-Net v2 (its own dataset
integrity check) and MONAI's decathlon datalist; `site-agent dataset export-nnunet`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from fedimg_testing.phantom import write_phantom_site
from preprocessing.dataset import load_dataset
from preprocessing.nnunet_export import export_nnunet
from preprocessing.prepare import PrepareOptions, prepare
from preprocessing.schema import load_label_map, load_schema
from tests.conftest import cli


def _nnunet():
    """nnU-Net's own integrity check (a dev dependency; the tests that need it skip without it)."""
    return pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity")


SCHEMA = load_schema()
SHAPE = (24, 20, 10)


def _prepare(root: Path, ignore_tumour: bool) -> Path:
    """Three phantom CT cases labelling liver and liver_tumor; with `ignore_tumour` the
    site maps its tumour label to the schema's ignore label (255)."""
    site = write_phantom_site(root / "site", ["liver", "liver_tumor"], n_cases=3, seed=5, shape=SHAPE)
    if ignore_tumour:
        doc = yaml.safe_load(site.label_map.read_text())
        doc["labels"] = {k: ("ignore" if v == "liver_tumor" else v) for k, v in doc["labels"].items()}
        site.label_map.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = root / "prepared"
    result = prepare([site.dicom_dir], out, SCHEMA, load_label_map(site.label_map, SCHEMA), labels=[site.labels_dir], options=PrepareOptions(name="liver"))
    assert result.count("ok") + result.count("flagged") == 3, result.outcomes
    return out


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return _prepare(tmp_path_factory.mktemp("plain"), ignore_tumour=False)


@pytest.fixture(scope="module")
def prepared_with_ignore(tmp_path_factory) -> Path:
    out = _prepare(tmp_path_factory.mktemp("ignore"), ignore_tumour=True)
    labels = [np.asarray(nib.load(p).dataobj) for p in sorted((out / "labelsTr").iterdir())]
    assert any((lab == SCHEMA.ignore_label).any() for lab in labels)  # the ignore label is really used
    return out


def _fails(*args: str) -> tuple[int, str]:
    done = cli(*args)
    return done.returncode, done.stderr


def _verify(folder: Path, capsys) -> str:
    """nnU-Net's own check (raises on a bad dataset); returns what it printed."""
    _nnunet().verify_dataset_integrity(str(folder), num_processes=1)
    return capsys.readouterr().out


def test_prepared_dataset_is_a_valid_nnunet_v2_raw_dataset(prepared, capsys):
    out = _verify(prepared, capsys)
    assert "Error" not in out and "Warning" not in out, out
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    manifest = json.loads((prepared / "manifest.json").read_text())
    files = get_filenames_of_train_images_and_targets(str(prepared))
    # one nnU-Net case per prepared case (without the `dataset` key every file would read as case "case")
    assert sorted(files) == sorted(c["case_id"] for c in manifest["cases"])
    for c in manifest["cases"]:
        assert files[c["case_id"]] == {"images": [str(prepared / c["image"])], "label": str(prepared / c["label"])}


def test_prepared_dataset_is_a_monai_decathlon_datalist(prepared):
    from monai.data import load_decathlon_datalist, load_decathlon_properties

    items = load_decathlon_datalist(str(prepared / "dataset.json"), is_segmentation=True, data_list_key="training", base_dir=str(prepared))
    ds = load_dataset(prepared)
    assert [(Path(i["image"]), Path(i["label"])) for i in items] == [(c.image, c.label) for c in ds.cases]
    props = load_decathlon_properties(str(prepared / "dataset.json"), ["labels", "numTraining"])
    assert props["numTraining"] == 3 and props["labels"] == SCHEMA.classes


def test_ignore_label_is_refused_by_nnunet_in_place_and_export_fixes_it(prepared_with_ignore, tmp_path, capsys):
    # in place, nnU-Net sees 255 as an undeclared label: the limitation the export exists for
    with pytest.raises(RuntimeError, match="unexpected labels"):
        _verify(prepared_with_ignore, capsys)
    capsys.readouterr()

    done = export_nnunet(prepared_with_ignore, tmp_path / "raw", 501, link=True)
    assert done.folder == tmp_path / "raw" / "Dataset501_liver" and done.cases == 3
    assert done.labels == {"background": 0, "liver": 1, "ignore": 2}  # the site labels liver only; ignore = max + 1
    printed = _verify(done.folder, capsys)
    assert "Error" not in printed, printed

    ds = load_dataset(prepared_with_ignore)
    liver = SCHEMA.classes["liver"]
    for case in ds.cases:
        src = np.asarray(nib.load(case.label).dataobj)
        exported = nib.load(done.folder / "labelsTr" / f"{case.case_id}.nii.gz")
        lab = np.asarray(exported.dataobj)
        expected = np.where(src == liver, 1, np.where(src == SCHEMA.ignore_label, 2, 0))
        assert np.array_equal(lab, expected) and np.allclose(exported.affine, nib.load(case.label).affine)
        image = done.folder / "imagesTr" / f"{case.case_id}_0000.nii.gz"
        assert os.path.samefile(image, case.image)  # hard-linked, not copied
    assert done.ignore_voxels == sum(int((np.asarray(nib.load(c.label).dataobj) == 255).sum()) for c in ds.cases) > 0
    meta = json.loads((done.folder / "dataset.json").read_text())["fedimg"]
    assert meta["schema_ids"] == {"liver": liver} and meta["ignore"] == {"schema_value": 255, "exported_value": 2}
    load_dataset(prepared_with_ignore, verify_checksums=True)  # the prepared dataset is untouched


def test_export_all_classes_keeps_schema_ids_and_says_what_is_learned_as_background(prepared, tmp_path, capsys):
    done = export_nnunet(prepared, tmp_path / "raw", 7, name="all", classes="all")
    assert done.labels == SCHEMA.classes and "ignore" not in done.labels
    meta = json.loads((done.folder / "dataset.json").read_text())["fedimg"]
    assert set(meta["unlabelled_classes_learned_as_background"]) == set(SCHEMA.classes) - {"background", "liver", "liver_tumor"}
    case = load_dataset(prepared).cases[0]
    assert np.array_equal(np.asarray(nib.load(done.folder / "labelsTr" / f"{case.case_id}.nii.gz").dataobj), np.asarray(nib.load(case.label).dataobj))
    assert not os.path.samefile(done.folder / "imagesTr" / f"{case.case_id}_0000.nii.gz", case.image)  # copied by default
    assert "Error" not in _verify(done.folder, capsys)


def test_cli_export_refuses_taken_ids_tampered_datasets_and_writes_nothing(prepared, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    done = cli("site-agent", "dataset", "export-nnunet", str(prepared), "--out", str(raw), "--id", "12", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["labels"] == {"background": 0, "liver": 1, "liver_tumor": 2}
    before = sorted(p.relative_to(raw) for p in raw.rglob("*"))

    rc, stderr = _fails("site-agent", "dataset", "export-nnunet", str(prepared), "--out", str(raw), "--id", "12", "--name", "other")
    assert rc != 0 and "id 12 is taken" in stderr and len(stderr.strip().splitlines()) == 1
    rc, stderr = _fails("site-agent", "dataset", "export-nnunet", str(prepared), "--out", str(raw), "--id", "12")
    assert rc != 0 and "already exists" in stderr
    assert sorted(p.relative_to(raw) for p in raw.rglob("*")) == before  # nothing overwritten, no temp folder left

    tampered = tmp_path / "tampered"
    shutil.copytree(prepared, tampered)
    label = next((tampered / "labelsTr").iterdir())
    data = bytearray(label.read_bytes())
    data[-1] ^= 0xFF
    label.write_bytes(bytes(data))
    rc, stderr = _fails("site-agent", "dataset", "export-nnunet", str(tampered), "--out", str(raw), "--id", "13")
    assert rc != 0 and "checksum" in stderr and not list(raw.glob("Dataset013_*"))


def test_a_case_labelling_fewer_classes_is_left_out_not_taught_as_background(prepared, tmp_path):
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(prepared, partial)
    manifest = json.loads((partial / "manifest.json").read_text())
    first = manifest["cases"][0]
    first["labeled_classes"] = [SCHEMA.classes["liver"]]  # this case's annotator drew the liver only
    (partial / "manifest.json").write_text(json.dumps(manifest))
    done = export_nnunet(partial, tmp_path / "raw", 42)
    assert done.left_out == [first["case_id"]] and done.cases == 2
    assert not (done.folder / "labelsTr" / f"{first['case_id']}.nii.gz").exists()
