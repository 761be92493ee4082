"""Test-only reference labels: the phantom writes them, `site-agent prepare --reference-labels`
prepares them like labels (same pairing, grid check, remapping) into ``labelsRef/``, the loader
checks them, and the plan's dataset reads them on the items' grid without ever serving them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from fedimg_core.hashing import sha256_file
from fedimg_testing.phantom import make_phantom, write_phantom_site
from preprocessing.dataset import DatasetError, load_dataset
from preprocessing.nifti import clean_image, save_atomic
from preprocessing.prepare import PrepareError, prepare
from preprocessing.schema import load_label_map, load_schema
from tests.conftest import cli

SHAPE = (32, 28, 12)
SCHEMA = load_schema()
TRAIN = ["liver", "liver_tumor"]
REFERENCE = ["kidney", "kidney_tumor", "spleen"]
REF_IDS = [SCHEMA.classes[c] for c in REFERENCE]  # 1, 2, 7


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return write_phantom_site(tmp_path_factory.mktemp("refsite"), TRAIN, n_cases=3, seed=11, shape=SHAPE, reference_classes=REFERENCE)


def _prepare_cli(site, out: Path, reference: Path | None = None, reference_map: Path | None = None):
    args = ["prepare", site.dicom_dir, "--labels", site.labels_dir, "--label-map", site.label_map, "--out", out, "--no-qc"]
    if reference is not None:
        args += ["--reference-labels", reference]
    if reference_map is not None:
        args += ["--reference-label-map", reference_map]
    return cli("site-agent", *args)


@pytest.fixture(scope="module")
def prepared(site, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "ds"
    res = _prepare_cli(site, out, site.root / "reference-labels", site.reference_label_map)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


@pytest.fixture(scope="module")
def as_training(site, tmp_path_factory):
    """The same reference files prepared as ordinary training labels (their own map): what
    `labelsRef/` must hold, voxel for voxel, if the reference path is the labels' path."""
    out = tmp_path_factory.mktemp("astraining") / "ds"
    res = cli("site-agent", "prepare", site.dicom_dir, "--labels", site.root / "reference-labels", "--label-map", site.reference_label_map,
              "--out", out, "--no-qc")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return out


@pytest.fixture(scope="module")
def without(site, tmp_path_factory):
    out = tmp_path_factory.mktemp("without") / "ds"
    res = _prepare_cli(site, out)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _data(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _same_cases(a: Path, b: Path) -> dict[str, str]:
    """Case id in dataset `a` -> id of the same patient in `b` (each dataset has its own salt,
    so ids follow another order): matched by the image file, which is the same conversion."""
    by_image = {c["sha256"]["image"]: c["case_id"] for c in _manifest(b)["cases"]}
    return {c["case_id"]: by_image[c["sha256"]["image"]] for c in _manifest(a)["cases"]}


# -- phantom -------------------------------------------------------------------------------


def test_phantom_writes_reference_labels_of_other_classes_only(site):
    assert site.reference_classes == REFERENCE and len(site.reference_label_paths) == 3
    doc = yaml.safe_load(site.reference_label_map.read_text())
    assert doc["labels"] == {0: "background", 1: "kidney", 2: "kidney_tumor", 3: "spleen"}  # local values 1..m, not schema ids
    for i, path in enumerate(site.reference_label_paths):
        truth = make_phantom(11 * 1000 + i, "portal_venous", SHAPE, (1.5, 1.5, 2.5), schema=SCHEMA).label
        ref, lab = _data(path), _data(site.label_paths[i])
        assert ref.shape == truth.shape
        for local, name in ((1, "kidney"), (2, "kidney_tumor"), (3, "spleen")):
            assert np.array_equal(ref == local, truth == SCHEMA.classes[name]), name
        assert not (ref.astype(bool) & lab.astype(bool)).any()  # disjoint from the site's own labels
        assert np.array_equal(nib.load(path).affine, nib.load(site.label_paths[i]).affine)


def test_phantom_refuses_reference_classes_it_labels(tmp_path):
    with pytest.raises(ValueError, match="disjoint"):
        write_phantom_site(tmp_path, ["liver"], n_cases=1, seed=1, shape=SHAPE, reference_classes=["spleen", "liver"])
    with pytest.raises(ValueError, match="not a foreground class"):
        write_phantom_site(tmp_path, ["liver"], n_cases=1, seed=1, shape=SHAPE, reference_classes=["background"])


def test_phantom_without_reference_classes_writes_none(tmp_path):
    plain = write_phantom_site(tmp_path, ["spleen"], n_cases=1, seed=2, shape=SHAPE)
    assert plain.reference_label_paths is None and plain.reference_label_map is None
    assert not (tmp_path / "reference-labels").exists()


# -- prepare -------------------------------------------------------------------------------


def test_prepare_writes_reference_labels_like_labels(prepared, as_training):
    manifest = _manifest(prepared)
    assert manifest["reference_classes"] == REF_IDS and manifest["labeled_classes"] == [3, 4]
    training = {c["case_id"]: c for c in _manifest(as_training)["cases"]}
    same = _same_cases(prepared, as_training)
    for case in manifest["cases"]:
        assert case["reference_label"] == f"labelsRef/{case['case_id']}.nii.gz"
        ref_path = prepared / case["reference_label"]
        assert case["sha256"]["reference_label"] == sha256_file(ref_path)
        ref, img = nib.load(ref_path), nib.load(prepared / case["image"])
        assert ref.get_data_dtype() == np.uint8 and ref.shape == img.shape and np.array_equal(ref.affine, img.affine)
        values = set(np.unique(np.asanyarray(ref.dataobj)).tolist())
        assert values <= {0, *REF_IDS} and 7 in values  # schema ids (spleen 7), not the local 3
        # the reference path is the labels' path: the same files as training labels give the same volume
        assert np.array_equal(np.asanyarray(ref.dataobj), _data(as_training / training[same[case["case_id"]]]["label"]))
        assert not (np.asanyarray(ref.dataobj).astype(bool) & _data(prepared / case["label"]).astype(bool)).any()
    # dataset.json describes the training labels only
    description = json.loads((prepared / "dataset.json").read_text())
    assert all(set(e) == {"image", "label"} and "labelsRef" not in json.dumps(e) for e in description["training"])
    ds = load_dataset(prepared, verify_checksums=True)
    assert ds.reference_classes == REF_IDS and all(c.reference_label == prepared / f"labelsRef/{c.case_id}.nii.gz" for c in ds.cases)
    assert ds.description().endswith("; test-only reference labels: kidney, kidney_tumor, spleen (3 cases)")


def test_dicom_seg_reference_labels_give_the_same_volumes(site, prepared, tmp_path):
    """A DICOM SEG of the reference classes (drawn on the same series: same seed, same UIDs)
    goes through the SEG reader and lands on the voxels the NIfTI reference labels give."""
    seg_site = write_phantom_site(tmp_path / "seg", REFERENCE, n_cases=3, seed=11, shape=SHAPE, label_format="seg")
    assert seg_site.series_uids == site.series_uids
    out = tmp_path / "ds"
    res = _prepare_cli(site, out, seg_site.labels_dir, seg_site.label_map)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _manifest(out)["reference_classes"] == REF_IDS
    nifti = {c["case_id"]: c for c in _manifest(prepared)["cases"]}
    same = _same_cases(out, prepared)
    for case in _manifest(out)["cases"]:
        assert np.array_equal(_data(out / case["reference_label"]), _data(prepared / nifti[same[case["case_id"]]]["reference_label"]))


def test_no_planted_identifier_in_a_dataset_with_reference_labels(site, prepared):
    from tests.test_prepare import _all_output_bytes

    needles = [s.encode() for ident in site.identifiers for s in ident.strings()]
    assert len(needles) > 20
    scanned = set()
    for p, data in _all_output_bytes(prepared):
        scanned.add(p.parent.name)
        for n in needles:
            assert n not in data, f"{n!r} found in {p}"
    assert "labelsRef" in scanned
    description = load_dataset(prepared).description().encode()
    assert not any(n in description for n in needles)


def test_prepare_without_reference_labels_is_unchanged(without):
    manifest = _manifest(without)
    assert manifest["reference_classes"] is None and all(c["reference_label"] is None for c in manifest["cases"])
    assert not (without / "labelsRef").exists()
    ds = load_dataset(without, verify_checksums=True)
    assert ds.reference_classes is None and "reference" not in ds.description()


def test_load_dataset_checks_the_reference_label(prepared, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(prepared, copy)
    ref = copy / "labelsRef" / "case_0001.nii.gz"
    data = _data(ref).copy()
    data[data == 7] = 0  # still a valid volume, another content
    save_atomic(clean_image(data, nib.load(ref).affine), ref)
    load_dataset(copy)  # structure only: fine
    with pytest.raises(DatasetError, match=r"labelsRef/case_0001.nii.gz: checksum does not match"):
        load_dataset(copy, verify_checksums=True)
    ref.unlink()
    with pytest.raises(DatasetError, match=r"labelsRef/case_0001.nii.gz: listed in manifest.json but missing"):
        load_dataset(copy)


def test_overlapping_classes_exit_2_with_one_line_naming_both_maps(site, tmp_path):
    bad_map = tmp_path / "ref-map.yaml"
    doc = yaml.safe_load(site.reference_label_map.read_text())
    doc["labels"][3] = "liver"  # a class the site trains on
    bad_map.write_text(yaml.safe_dump(doc))
    out = tmp_path / "ds"
    res = _prepare_cli(site, out, site.root / "reference-labels", bad_map)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert str(bad_map) in lines[0] and str(site.label_map) in lines[0] and "liver" in lines[0]
    assert not out.exists()  # nothing left behind


def test_reference_labels_and_their_map_go_together(site, tmp_path):
    lmap = load_label_map(site.label_map, SCHEMA)
    with pytest.raises(PrepareError, match="--reference-label-map"):
        prepare([site.dicom_dir], tmp_path / "a", SCHEMA, lmap, labels=[site.labels_dir], reference_labels=[site.root / "reference-labels"])
    with pytest.raises(PrepareError, match="without reference labels"):
        prepare([site.dicom_dir], tmp_path / "b", SCHEMA, lmap, labels=[site.labels_dir],
                reference_label_map=load_label_map(site.reference_label_map, SCHEMA))  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def one_bad(site, tmp_path_factory):
    """A reference folder whose case_001 has another grid and which holds a label of no image."""
    base = tmp_path_factory.mktemp("onebad")
    refs = base / "refs"
    shutil.copytree(site.root / "reference-labels", refs)
    img = nib.load(refs / "case_001.nii.gz")
    data = np.asanyarray(img.dataobj)[:, :, :-2]  # two slices short
    save_atomic(clean_image(np.ascontiguousarray(data), img.affine), refs / "case_001.nii.gz")
    shutil.copy(refs / "case_000.nii.gz", refs / "nobody.nii.gz")
    out = base / "ds"
    res = _prepare_cli(site, out, refs, site.reference_label_map)
    return refs, out, res


def test_a_bad_reference_label_refuses_only_itself(site, one_bad, prepared):
    refs, out, res = one_bad
    assert res.returncode == 3, res.stdout + res.stderr
    manifest = _manifest(out)
    cases = {c["case_id"]: c for c in manifest["cases"]}
    assert sorted(cases) == ["case_0000", "case_0001", "case_0002"]  # every case prepared
    assert all(c["label"] is not None for c in cases.values())  # training labels intact
    without_ref = [cid for cid, c in cases.items() if c["reference_label"] is None]
    assert len(without_ref) == 1 and "reference_label" not in cases[without_ref[0]]["sha256"]
    assert not (out / "labelsRef" / f"{without_ref[0]}.nii.gz").exists()
    assert sorted((r["reason_code"], r.get("kind")) for r in manifest["refused"]) == [
        ("label_grid_mismatch", "reference_label"),
        ("unpaired_label", "reference_label"),
    ]
    assert manifest["counts"]["refused"] == 2
    stdout = " ".join(res.stdout.split())
    assert "label_grid_mismatch" in stdout and "unpaired_label" in stdout
    assert [line for line in res.stderr.splitlines() if line.strip()] == ["site-agent: 2 reference label(s) refused; see the reasons above"]
    ds = load_dataset(out, verify_checksums=True)
    assert sum(c.reference_label is not None for c in ds.cases) == 2
    # the good cases' reference labels are those of a run without the bad files
    good, same = {c["case_id"]: c for c in _manifest(prepared)["cases"]}, _same_cases(out, prepared)
    for cid, c in cases.items():
        if c["reference_label"] is not None:
            assert c["sha256"]["reference_label"] == good[same[cid]]["sha256"]["reference_label"]


def test_a_refused_reference_label_is_reported_again_on_an_unchanged_rerun(site, one_bad):
    refs, out, _ = one_bad
    res = _prepare_cli(site, out, refs, site.reference_label_map)
    assert res.returncode == 3, res.stdout + res.stderr
    assert "3 unchanged" in res.stdout and "label_grid_mismatch" in res.stdout
    assert sorted(r["reason_code"] for r in _manifest(out)["refused"]) == ["label_grid_mismatch", "unpaired_label"]


def test_reference_labels_dropped_on_a_rerun_leave_no_file(site, tmp_path):
    out = tmp_path / "ds"
    assert _prepare_cli(site, out, site.root / "reference-labels", site.reference_label_map).returncode == 0
    assert len(list((out / "labelsRef").glob("*.nii.gz"))) == 3
    assert _prepare_cli(site, out).returncode == 0
    manifest = _manifest(out)
    assert manifest["reference_classes"] is None and all(c["reference_label"] is None for c in manifest["cases"])
    assert not list((out / "labelsRef").glob("*.nii.gz"))
    load_dataset(out, verify_checksums=True)


# -- the plan's dataset --------------------------------------------------------------------


def _dataset(path: Path):
    from fedbiomed.common.dataset_types import DataReturnFormat

    from pipelines.plans.datasets import PreparedSegmentationDataset

    ds = PreparedSegmentationDataset()
    ds.schema = SCHEMA
    ds.load(str(path), to_format=DataReturnFormat.TORCH)  # as the node does: sets the path, then read()
    return ds


def same_ids(a: Path, b: Path, ds) -> list[str]:
    """For each item of the plan's dataset `ds` (of `a`), the id of the same case in `b`."""
    same = _same_cases(a, b)
    return [same[cid] for cid in ds.case_ids]


def test_dataset_reads_reference_labels_on_the_items_grid(prepared, as_training, without, monkeypatch, tmp_path):
    monkeypatch.delenv("FEDIMG_CACHE_DIR", raising=False)
    ds, truth, plain = _dataset(prepared), _dataset(as_training), _dataset(without)
    assert ds.reference_classes == REF_IDS and plain.reference_classes == []
    assert len(ds) == len(plain) == 3
    to_truth = {i: truth.case_ids.index(cid) for i, cid in enumerate(same_ids(prepared, as_training, ds))}
    to_plain = {i: plain.case_ids.index(cid) for i, cid in enumerate(same_ids(prepared, without, ds))}
    for i in range(len(ds)):
        ref = ds.reference_label(i)
        image, label = ds.get_item(i)
        assert ref is not None and ref.dtype == torch.uint8 and ref.shape == label.shape and ref.shape[0] == 1
        # what the same file gives when it is a case's label: same chain, same grid, same voxels
        assert torch.equal(ref, truth.get_item(to_truth[i])[1])
        assert set(torch.unique(ref).tolist()) <= {0, *REF_IDS}
        # items are what they are without reference labels: training never sees them
        plain_image, plain_label = plain.get_item(to_plain[i])
        assert torch.equal(image, plain_image) and torch.equal(label, plain_label)
        assert plain.reference_label(to_plain[i]) is None
        assert ds.reference_label(i) is ref  # kept in memory
    # with the site's cache folder, the reference is computed once and read back from disk
    monkeypatch.setenv("FEDIMG_CACHE_DIR", str(tmp_path / "cache"))
    from pipelines.plans import datasets as mod

    mod._REFERENCE_CACHE.clear()
    first = ds.reference_label(0)
    assert list((tmp_path / "cache").rglob("*.pt"))
    mod._REFERENCE_CACHE.clear()
    assert torch.equal(ds.reference_label(0), first) and torch.equal(first, truth.get_item(to_truth[0])[1])


def test_dataset_returns_none_for_a_case_without_reference(one_bad, monkeypatch):
    monkeypatch.delenv("FEDIMG_CACHE_DIR", raising=False)
    _, out, _ = one_bad
    ds = _dataset(out)
    missing = [cid for cid, c in ((c["case_id"], c) for c in _manifest(out)["cases"]) if c["reference_label"] is None]
    got = {ds.case_ids[i]: ds.reference_label(i) for i in range(len(ds))}
    assert [cid for cid, ref in got.items() if ref is None] == missing
    assert ds.reference_classes == REF_IDS


# -- testbed -------------------------------------------------------------------------------


def test_testbed_reference_classes_are_the_organ_groups_a_site_does_not_label():
    from coordinator.testbed_site import reference_classes_for

    assert reference_classes_for(["liver", "liver_tumor"]) == ["kidney", "kidney_tumor", "pancreas", "pancreas_tumor", "spleen"]
    assert reference_classes_for(["liver"]) == ["kidney", "kidney_tumor", "pancreas", "pancreas_tumor", "spleen"]  # its tumours are liver there
    assert reference_classes_for(["spleen"]) == ["kidney", "kidney_tumor", "liver", "liver_tumor", "pancreas", "pancreas_tumor"]


@pytest.mark.parametrize("reference", [True, False])
def test_testbed_site_prepares_its_phantom_with_reference_labels(tmp_path, reference):
    import argparse

    from coordinator.testbed_site import _prepare_phantom

    args = argparse.Namespace(organs="spleen", seed=4, cases=2, size=32, phase="portal_venous", modality="CT", name="site-4", reference_labels=reference)
    _prepare_phantom(args, tmp_path / "hospital", tmp_path / "ds")
    manifest = _manifest(tmp_path / "ds")
    assert manifest["labeled_classes"] == [SCHEMA.classes["spleen"]]
    if reference:
        assert manifest["reference_classes"] == [1, 2, 3, 4, 5, 6]  # every class but spleen's group
        assert all(c["reference_label"] for c in manifest["cases"]) and not manifest["refused"]
        assert json.loads((tmp_path / "hospital" / "testbed-phantom.json").read_text())["reference_labels"] is True
    else:
        assert manifest["reference_classes"] is None and not (tmp_path / "hospital" / "reference-labels").exists()
    load_dataset(tmp_path / "ds", verify_checksums=True)


def test_testbed_passes_reference_labels_on_by_default(tmp_path, monkeypatch):
    from coordinator import testbed as tb

    commands = []

    def fake_run(cmd, **kwargs):
        commands.append(cmd)
        raise RuntimeError("stop after the command is built")

    monkeypatch.setattr(tb.subprocess, "run", fake_run)
    for on in (True, False):
        commands.clear()
        with pytest.raises(RuntimeError, match="stop after"):
            tb.Testbed(tmp_path, n_sites=1, reference_labels=on).setup_sites()
        assert ("--no-reference-labels" in commands[0]) is not on
    assert tb.Testbed(tmp_path, n_sites=1).reference_labels is True
