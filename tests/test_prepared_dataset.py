import json

import nibabel as nib
import numpy as np
import pytest

from fedimg_testing.synthetic import write_synthetic_dataset
from preprocessing.dataset import DatasetError, load_dataset, write_dataset


def test_synthetic_dataset_round_trip(tmp_path):
    ds = write_synthetic_dataset(tmp_path / "ds", seed=3, n_cases=2, shape=(16, 16, 16))
    assert len(ds.cases) == 2
    again = load_dataset(tmp_path / "ds", verify_checksums=True)
    img = nib.load(again.cases[0].image)
    lab = nib.load(again.cases[0].label)
    assert img.shape == lab.shape == (16, 16, 16)
    assert np.allclose(img.affine, lab.affine)
    assert img.get_qform(coded=True)[1] == 1 and img.get_sform(coded=True)[1] == 1
    assert np.allclose(img.get_qform(), img.get_sform())
    assert img.header["descrip"].tobytes().strip(b"\x00") == b""
    label = np.asarray(lab.dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1, 2}
    desc = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert desc["numTraining"] == 2 and desc["training"][0]["image"].startswith("imagesTr/")


def test_refuses_folder_without_manifest(tmp_path):
    with pytest.raises(DatasetError, match="manifest.json: missing"):
        load_dataset(tmp_path)


def test_refuses_missing_file_and_changed_file(tmp_path):
    write_synthetic_dataset(tmp_path / "ds", seed=1, n_cases=2, shape=(12, 12, 12))
    (tmp_path / "ds" / "labelsTr" / "case_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match="case_0001.nii.gz: listed in manifest.json but missing"):
        load_dataset(tmp_path / "ds")
    write_synthetic_dataset(tmp_path / "ds2", seed=1, n_cases=1, shape=(12, 12, 12))
    target = tmp_path / "ds2" / "imagesTr" / "case_0000.nii.gz"
    target.write_bytes(target.read_bytes() + b"x")
    load_dataset(tmp_path / "ds2")  # structure is fine...
    with pytest.raises(DatasetError, match="checksum does not match"):
        load_dataset(tmp_path / "ds2", verify_checksums=True)  # ...content is not


def test_refuses_path_escaping_the_dataset(tmp_path):
    write_synthetic_dataset(tmp_path / "ds", seed=1, n_cases=1, shape=(12, 12, 12))
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    manifest["cases"][0]["image"] = "../../etc/passwd"
    (tmp_path / "ds" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="leaves the dataset folder"):
        load_dataset(tmp_path / "ds")


def test_failed_write_leaves_no_partial_output(tmp_path):
    def cases():
        yield np.zeros((8, 8, 8), np.float32), np.zeros((8, 8, 8), np.uint8), np.eye(4)
        yield np.zeros((8, 8, 8), np.float32), np.zeros((4, 4, 4), np.uint8), np.eye(4)  # bad label grid

    with pytest.raises(DatasetError, match="label shape"):
        write_dataset(tmp_path / "ds", "x", "CT", {"background": 0, "a": 1}, cases())
    assert list(tmp_path.iterdir()) == []


def test_never_overwrites_an_existing_dataset(tmp_path):
    write_synthetic_dataset(tmp_path / "ds", seed=1, n_cases=1, shape=(12, 12, 12))
    before = (tmp_path / "ds" / "manifest.json").read_text()
    with pytest.raises(DatasetError, match="already exists"):
        write_synthetic_dataset(tmp_path / "ds", seed=2, n_cases=1, shape=(12, 12, 12))
    assert (tmp_path / "ds" / "manifest.json").read_text() == before


def test_outputs_get_ordinary_permissions(tmp_path):
    """Temp-file helpers create 0600/0700; a node running as another user must still read the data."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_synthetic_dataset(tmp_path / "ds", seed=1, n_cases=1, shape=(12, 12, 12))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ds").stat().st_mode) == 0o755
    for f in ("manifest.json", "dataset.json", "imagesTr/case_0000.nii.gz", "labelsTr/case_0000.nii.gz"):
        assert stat.S_IMODE((tmp_path / "ds" / f).stat().st_mode) == 0o644, f


def test_description_carries_no_free_text(tmp_path):
    ds = write_synthetic_dataset(tmp_path / "ds", seed=1, n_cases=1, shape=(12, 12, 12))
    ds.name = "Liver study of John Smith, born 1960-01-02 (MRN 12345)"
    ds.labels = {"background": 0, "liver; patient note: ALLERGIC": 1}
    desc = ds.description()
    assert " " not in desc.split(":")[0] and "," not in desc.split(":")[0]
    assert len(desc.split(":")[0]) <= 48
    assert "ALLERGIC" in desc and "note: " not in desc  # names kept as tokens, never as sentences
