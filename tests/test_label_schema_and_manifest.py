"""The label schema, site label map and prepared-dataset manifest as typed formats (fedimg_core).

Datasets written by earlier fedimg versions still load: the files here are built the way the
earlier writers built them (format 1 of the first writer, format 2 of `write_dataset` and of
``site-agent prepare`` before the manifest became a model).
"""

import copy
import hashlib
import json

import nibabel as nib
import numpy as np
import pytest
import yaml

from fedimg_core.config import validate_config
from fedimg_core.dataset_manifest import CaseRecord, Manifest, read_manifest
from fedimg_core.errors import ConfigError, UserError
from fedimg_core.label_schema import LabelSchemaFile, SchemaError
from preprocessing.dataset import DatasetError, check_schema, load_dataset, write_dataset
from preprocessing.schema import DEFAULT_SCHEMA, load_label_map, load_schema, parse_label_map, parse_schema

RAW = yaml.safe_load(DEFAULT_SCHEMA.read_text())
LABEL_MAP = {"format": "fedimg-site-labels", "schema": "abdominal-ct", "schema_version": "1.0.0", "labels": {0: "background", 1: "liver", 2: "liver_tumor"}}


def _schema(**changes):
    raw = copy.deepcopy(RAW)
    raw.update(changes)
    return raw


# --- label schema -------------------------------------------------------------------------


def test_the_shipped_schema_reads_as_before():
    s = load_schema()
    assert s.classes == {"background": 0, "kidney": 1, "kidney_tumor": 2, "liver": 3, "liver_tumor": 4, "pancreas": 5, "pancreas_tumor": 6, "spleen": 7}
    assert s.groups == {"kidney": ("kidney_tumor",), "liver": ("liver_tumor",), "pancreas": ("pancreas_tumor",), "spleen": ()}
    assert s.modalities["CT"].clip == (-54.0, 258.0) and s.modalities["CT"].centre == 100.0 and s.modalities["MR"].clip is None
    assert s.target_spacing == (1.5, 1.5, 1.5) and s.ignore_label == 255 and s.num_classes == 8
    # the defaults of a minimal schema: the CT window, 1.5 mm, 255, every class an organ of its own
    minimal = parse_schema({"format": "fedimg-label-schema", "name": "m", "version": "2.1.0", "classes": {"background": 0, "a": 1}}, "m.yaml")
    assert minimal.groups == {"a": ()} and minimal.ignore_label == 255 and minimal.target_spacing == (1.5, 1.5, 1.5)
    assert minimal.modalities["CT"].normalisation == "ct_window" and minimal.major == 2


@pytest.mark.parametrize(
    "raw,key,words",
    [
        (_schema(classz=RAW["classes"]), "classz", "unknown key; did you mean 'classes'?"),
        (_schema(classes={"background": 0, "liver": 3}, groups=None), "classes", "contiguous from 0"),
        (_schema(classes={"liver": 0}, groups=None), "classes", "'background: 0'"),
        (_schema(classes={**RAW["classes"], "Liver2": 8}), "classes.Liver2", "lower-case letters"),
        (_schema(classes={**RAW["classes"], "liver": 300}), "classes.liver", "must be an integer in [0, 254] (got 300)"),
        (_schema(classes={**RAW["classes"], "liver": True}), "classes.liver", "must be an integer"),
        (_schema(ignore_label=3), "ignore_label", "not a class id"),
        (_schema(groups={**RAW["groups"], "livr": []}), "groups.livr", "not a foreground class; did you mean 'liver'?"),
        (_schema(groups={**RAW["groups"], "kidney": ["liver_tumor"]}), "groups.liver", "in more than one group"),
        (_schema(target_spacing=[1, 2]), "target_spacing", "three positive numbers"),
        (_schema(target_spacing=[1, 2, -1]), "target_spacing[2]", "must be > 0 (got -1)"),
        (_schema(version="1.0"), "version", "MAJOR.MINOR.PATCH"),
        (_schema(format="fedimg-labels"), "format", "must be one of fedimg-label-schema"),
        (_schema(modalities={"CT": {"normalisation": "ct_window", "clip": [5, 1]}}), "modalities.CT.clip", "low < high"),
        (_schema(modalities={"CT": {"normalisation": "window"}}), "modalities.CT.normalisation", "did you mean 'ct_window'?"),
        (_schema(modalities={"CT": {"normalisation": "ct_window", "clip": [0, 1], "scale": 0}}), "modalities.CT.scale", "positive"),
        (_schema(modalities={"CT": {"normalisation": "zscore", "centr": 1}}), "modalities.CT.centr", "unknown key"),
        (_schema(surface_tolerance_mm={"livr": 2}), "surface_tolerance_mm.livr", "not a foreground class; did you mean 'liver'?"),
        (_schema(surface_tolerance_mm={"liver": -1}), "surface_tolerance_mm.liver", "must be > 0 and <= 50 (got -1)"),
    ],
)
def test_schema_problems_name_the_file_the_key_and_what_is_allowed(raw, key, words):
    with pytest.raises(SchemaError) as info:
        parse_schema(raw, "schema.yaml")
    err = info.value
    assert str(err).startswith(f"schema.yaml: {key}: ") and words in str(err), str(err)
    assert err.file == "schema.yaml" and err.key == key


def test_every_schema_problem_is_listed_and_the_error_is_a_config_error(tmp_path):
    with pytest.raises(SchemaError) as info:
        parse_schema(_schema(nam="x", version="one", ignore_label=0), "s.yaml")
    assert [k for k, _ in info.value.problems] == ["version", "ignore_label", "nam"]
    assert isinstance(info.value, ConfigError) and isinstance(info.value, UserError) and info.value.exit_code == 2
    path = tmp_path / "s.yaml"
    path.write_text("classes: [unclosed\n")
    with pytest.raises(SchemaError, match=r"s.yaml: line \d+ not valid YAML") as info:
        load_schema(path)
    assert info.value.file == str(path)


def test_schema_model_publishes_a_json_schema():
    body = LabelSchemaFile.model_json_schema()
    assert {"format", "name", "version", "classes"} <= set(body["required"])
    assert validate_config(LabelSchemaFile, RAW, where="x").name == "abdominal-ct"


# --- site label map -----------------------------------------------------------------------


def test_label_map_reads_integer_values_and_segment_names():
    m = parse_label_map({**LABEL_MAP, "labels": {0: "background", 1: "liver", "Tumour A": "ignore"}}, load_schema(), "m.yaml")
    assert m.mapping == {0: "background", 1: "liver", "Tumour A": "ignore"} and m.labeled_class_ids(load_schema()) == [3]


@pytest.mark.parametrize(
    "change,key,words",
    [
        ({"labels": {0: "background", 1: "livr"}}, "labels.1", "'livr' is not a class of schema abdominal-ct; did you mean 'liver'?"),
        ({"schema": "brain-mr", "labels": {1: "white_matter"}}, "schema", "federation schema is 'abdominal-ct'"),
        ({"schema_version": "2.0.0"}, "schema_version", "another major version"),
        ({"labels": {0: "background"}}, "labels", "maps nothing to a foreground class"),
        ({"labels": {}}, "labels", "must map local label values"),
        ({"labels": {70000: "liver"}}, "labels.70000", "[0, 65535]"),
        ({"labels": {1.5: "liver"}}, "labels.1.5", "integer label values or segment names"),
        ({"lables": {1: "liver"}}, "lables", "did you mean 'labels'?"),
    ],
)
def test_label_map_problems_name_the_file_and_the_key(change, key, words):
    raw = {**LABEL_MAP, **change}
    with pytest.raises(SchemaError) as info:
        parse_label_map(raw, load_schema(), "m.yaml")
    assert f"m.yaml: {key}: " in str(info.value) and words in str(info.value), str(info.value)
    assert info.value.key == key


def test_label_map_file_errors_name_the_file(tmp_path):
    with pytest.raises(SchemaError, match="cannot read"):
        load_label_map(tmp_path / "missing.yaml", load_schema())
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SchemaError, match="list.yaml: expected a mapping at the top level"):
        load_label_map(tmp_path / "list.yaml", load_schema())


# --- prepared-dataset manifest ------------------------------------------------------------


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cases(root, n=2):
    """NIfTI files as every writer so far has written them; returns (entries, sums, shapes)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    out = []
    for i in range(n):
        case_id = f"case_{i:04d}"
        affine = np.diag([1.5, 1.5, 2.0, 1.0])
        img = nib.Nifti1Image(np.full((6, 6, 4), i, np.float32), affine)
        lab = nib.Nifti1Image(np.zeros((6, 6, 4), np.uint8), affine)
        for x in (img, lab):
            x.set_qform(affine, code=1)
            x.set_sform(affine, code=1)
        nib.save(img, root / "imagesTr" / f"{case_id}.nii.gz")
        nib.save(lab, root / "labelsTr" / f"{case_id}.nii.gz")
        out.append((case_id, affine))
    return out


def _write_v1(root):
    """A format-1 dataset as the first `write_dataset` (fedimg's foundation commit) wrote it."""
    entries, cases = [], []
    for case_id, affine in _cases(root):
        entry = {"image": f"imagesTr/{case_id}.nii.gz", "label": f"labelsTr/{case_id}.nii.gz"}
        sums = {k: _sha(root / v) for k, v in entry.items()}
        entries.append(entry)
        cases.append({"case_id": case_id, **entry, "shape": [6, 6, 4], "spacing": [1.5, 1.5, 2.0], "affine": affine.tolist(),
                      "intensity_range": [0.0, 1.0], "sha256": sums, "qc_flags": []})  # fmt: skip
    (root / "dataset.json").write_text(json.dumps({"name": "old", "description": "old (fedimg prepared dataset)", "channel_names": {"0": "CT"},
        "modality": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 2, "file_ending": ".nii.gz", "training": entries}))  # fmt: skip
    (root / "manifest.json").write_text(json.dumps({"format": "fedimg-prepared-dataset", "format_version": 1, "converter_version": "0.1.0",
        "labeled_classes": [1], "cases": cases}))  # fmt: skip


def _write_v2_prepare(root):
    """A format-2 dataset as ``site-agent prepare`` wrote it before the manifest became a model
    (its _write_metadata, with its allowlist of case keys, copied here)."""
    case_keys = ("case_id", "image", "label", "source_hash", "source_kind", "label_source_kind", "shape", "spacing", "affine",
                 "orientation", "dtype", "intensity_range", "schema_version", "labeled_classes", "label_voxels",
                 "converter_version", "input_sha256", "sha256", "qc_flags", "status")  # fmt: skip
    records = []
    for case_id, affine in _cases(root):
        image, label = f"imagesTr/{case_id}.nii.gz", f"labelsTr/{case_id}.nii.gz"
        records.append({"case_id": case_id, "image": image, "label": label, "source_hash": "0123456789abcdef", "source_kind": "dicom",
                        "label_source_kind": "seg", "shape": [6, 6, 4], "spacing": [1.5, 1.5, 2.0], "affine": affine.tolist(),
                        "orientation": ["R", "A", "S"], "dtype": "int16", "intensity_range": [-1000.0, 1500.0], "schema_version": "1.0.0",
                        "labeled_classes": [3, 4], "label_voxels": {"liver": 40}, "converter_version": "0.2.0", "input_sha256": "ab" * 32,
                        "sha256": {"image": _sha(root / image), "label": _sha(root / label)}, "qc_flags": ["few_slices"], "status": "flagged",
                        "not_allowlisted": "dropped"})  # fmt: skip
    cases = sorted(({k: r.get(k) for k in case_keys} for r in records), key=lambda r: r["case_id"])
    training = [{"image": c["image"], "label": c["label"]} for c in cases]
    (root / "dataset.json").write_text(json.dumps({"name": "site_ct", "description": "site_ct (fedimg prepared dataset, schema abdominal-ct 1.0.0)",
        "tensorImageSize": "3D", "channel_names": {"0": "CT"}, "modality": {"0": "CT"}, "labels": load_schema().classes, "numTraining": 2,
        "file_ending": ".nii.gz", "training": training}, indent=2, sort_keys=True))  # fmt: skip
    (root / "manifest.json").write_text(json.dumps({"format": "fedimg-prepared-dataset", "format_version": 2, "converter_version": "0.2.0",
        "schema": {"name": "abdominal-ct", "version": "1.0.0"}, "modality": "CT", "labeled_classes": [3, 4], "ignore_label": 255, "cases": cases,
        "refused": [{"source": "fedcba9876543210", "reason_code": "localizer"}], "counts": {"ok": 0, "flagged": 2, "refused": 1}},
        indent=2, sort_keys=True))  # fmt: skip


def test_a_format_1_dataset_of_the_first_writer_still_loads(tmp_path):
    _write_v1(tmp_path / "v1")
    ds = load_dataset(tmp_path / "v1", verify_checksums=True)
    assert [c.case_id for c in ds.cases] == ["case_0000", "case_0001"] and ds.modality == "CT" and ds.labeled_classes == [1]
    check_schema(json.loads((tmp_path / "v1" / "manifest.json").read_text()), load_schema(), "v1")  # no schema block: not refused


def test_a_format_2_dataset_of_the_former_prepare_still_loads(tmp_path):
    _write_v2_prepare(tmp_path / "v2")
    ds = load_dataset(tmp_path / "v2", verify_checksums=True)
    assert ds.name == "site_ct" and ds.labeled_classes == [3, 4] and ds.labels["spleen"] == 7
    assert ds.description() == "site_ct: 2 CT cases, classes: liver, liver_tumor"
    manifest = read_manifest(tmp_path / "v2")
    assert manifest.cases[0].model_extra["status"] == "flagged"  # keys a reader does not need are kept
    check_schema(manifest, load_schema(), "v2")
    other = parse_schema({**RAW, "version": "2.0.0"}, "x")
    with pytest.raises(ValueError, match="prepared with label schema abdominal-ct 1.0.0, but the experiment uses abdominal-ct 2.0.0"):
        check_schema(manifest, other, "v2")


def test_the_writers_write_the_same_files_as_before(tmp_path):
    def cases():
        yield np.zeros((6, 6, 4), np.float32), np.zeros((6, 6, 4), np.uint8), np.diag([1.5, 1.5, 2.0, 1.0])
        yield np.ones((6, 6, 4), np.float32), None, np.diag([1.5, 1.5, 2.0, 1.0])

    write_dataset(tmp_path / "ds", "synth", "CT", {"background": 0, "liver": 1}, cases())
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert sorted(manifest) == ["cases", "converter_version", "format", "format_version", "labeled_classes", "modality", "refused", "schema"]
    assert manifest["schema"] is None and manifest["refused"] == [] and manifest["format_version"] == 2
    keys = ["affine", "case_id", "image", "intensity_range", "qc_flags", "sha256", "shape", "spacing"]
    assert sorted(manifest["cases"][0]) == sorted([*keys, "label"]) and sorted(manifest["cases"][1]) == keys  # no "label": null
    desc = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    # the decathlon keys, and nnU-Net v2's explicit file list of the labelled cases
    assert sorted(desc) == [
        "channel_names",
        "dataset",
        "description",
        "file_ending",
        "labels",
        "modality",
        "name",
        "numTraining",
        "tensorImageSize",
        "training",
    ]
    assert desc["training"][1] == {"image": "imagesTr/case_0001.nii.gz"}
    assert desc["dataset"] == {"case_0000": {"images": ["imagesTr/case_0000.nii.gz"], "label": "labelsTr/case_0000.nii.gz"}} and desc["numTraining"] == 1
    # a prepare record: every allowlisted key is written, null or not
    record = CaseRecord.model_validate({k: None for k in CaseRecord.model_fields} | {"case_id": "case_0000", "image": "i", "sha256": {}, "qc_flags": []})
    dumped = Manifest.model_validate({"cases": [record]}).model_dump(by_alias=True, exclude_unset=True)["cases"][0]
    assert sorted(dumped) == sorted(CaseRecord.model_fields) and dumped["label"] is None


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda m: m.update(format="other"), "'format' is 'other', expected 'fedimg-prepared-dataset'"),
        (lambda m: m.update(format_version=7), "format_version 7 is not supported"),
        (lambda m: m.update(cases=[]), "manifest.json: cases: must be a non-empty list"),
        (lambda m: m["cases"][1].pop("image"), "manifest.json: cases[1].image: required"),
        (lambda m: m["cases"][0].update(sha256=["x"]), "manifest.json: cases[0].sha256: must be a mapping"),
    ],
)
def test_a_broken_manifest_names_the_file_and_the_key(tmp_path, change, words):
    _write_v1(tmp_path / "ds")
    path = tmp_path / "ds" / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "ds")
    assert words in str(info.value) and info.value.file == str(path), str(info.value)
    assert not isinstance(info.value, UserError)  # run_cli's handling of a broken dataset is unchanged


def test_a_broken_description_names_its_key(tmp_path):
    _write_v1(tmp_path / "ds")
    path = tmp_path / "ds" / "dataset.json"
    desc = json.loads(path.read_text())
    desc["labels"] = {"liver": "one"}
    path.write_text(json.dumps(desc))
    with pytest.raises(DatasetError, match=r"dataset.json: labels.liver: "):
        load_dataset(tmp_path / "ds")
