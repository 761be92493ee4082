"""`site-agent infer` and the adapt commands' input checks, run as a user runs them."""

import json

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import cli

from fedimg_testing.phantom import PlantedIdentifiers, make_phantom, write_dicom_series
from pipelines.adaptation.networks import AdaptConfig, InversionEncoder, SegmentationBranch
from pipelines.adaptation.training import AdaptedModel
from pipelines.factory.networks import FactoryConfig, Generator

SCHEMA_FILE = "preprocessing/schemas/abdominal-ct.yaml"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An (untrained) target model with every part a real one has: what infer loads."""
    torch.manual_seed(0)
    cfg = FactoryConfig.preset("tiny", n_clients=2, key_dim=0, n_bins=0)
    g = Generator(cfg).eval()
    enc = InversionEncoder(cfg, AdaptConfig())
    names = ["background", "kidney", "liver"]
    bs, bt = SegmentationBranch.for_factory(cfg, names), SegmentationBranch.for_factory(cfg, names)
    with torch.no_grad():  # a branch that says "liver" where the image is bright, so labels are not all 0
        bt.fc2.bias.copy_(torch.tensor([0.0, -5.0, 0.0]))
    meta = {"factory": {"name": "f", "version": "v0001", "sha256": ""}, "schema_definition": yaml.safe_load(open(SCHEMA_FILE)),
            "slices": {"size": 64, "n_bins": 0, "spacing": [6.0, 6.0, 10.0], "min_foreground": 0.0}, "class_ids": [0, 1, 3],
            "domains": {"source_client_id": 0, "target_client_id": 1}}  # fmt: skip
    model = AdaptedModel("target", g, enc, bs.eval(), bt.eval(), 1.0, meta)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(model.state(), path)
    return path


def test_infer_dicom_series_writes_nifti_and_seg_on_the_series_grid(model_file, tmp_path):
    vol = make_phantom(4, "portal_venous", (40, 36, 8), (6.0, 6.0, 10.0))
    series = tmp_path / "series"
    write_dicom_series(vol, series, PlantedIdentifiers.for_case(4, 0), seed=4)
    res = cli("site-agent", "infer", series, "--model", model_file, "--out", tmp_path / "out", "--dicom-seg", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads(res.stdout)
    label = np.asarray(nib.load(row["label"]).dataobj)
    assert label.shape == (40, 36, 8) and set(np.unique(label).tolist()) <= {0, 1, 3}
    seg = hd.seg.segread(row["dicom_seg"])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["kidney", "liver"]
    assert str(seg.Modality) == "SEG" and seg.number_of_segments == 2
    src_uid = pydicom.dcmread(next(series.iterdir())).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src_uid


def test_infer_and_adapt_refuse_bad_input_clearly(model_file, tmp_path, site_yaml):
    from site_agent import config as site_config
    from site_agent.adapt import run_infer, run_source, run_target
    from site_agent.errors import UserError

    vol = make_phantom(5, "portal_venous", (32, 32, 8), (6.0, 6.0, 10.0))
    nifti = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(vol.hu.astype(np.float32), np.diag([6.0, 6.0, 10.0, 1.0])), nifti)
    with pytest.raises(UserError, match="needs --modality"):
        run_infer(model_file, [str(nifti)], tmp_path / "o")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match=f"{bad}: not a model file"):
        run_infer(bad, [str(nifti)], tmp_path / "o", modality="CT")
    with pytest.raises(UserError, match="--dicom-seg needs a DICOM series"):
        run_infer(model_file, [str(nifti)], tmp_path / "o", modality="CT", dicom_seg=True)
    with pytest.raises(UserError, match="no such file or folder"):
        run_infer(model_file, [str(tmp_path / "nope.nii.gz")], tmp_path / "o", modality="CT")
    assert not (tmp_path / "o").exists()  # nothing written for refused input
    res = cli("site-agent", "infer", nifti, "--model", model_file, "--out", tmp_path / "o", "--modality", "CT", "--json")
    assert res.returncode == 0, res.stderr
    assert nib.load(json.loads(res.stdout)[0]["label"]).shape == (32, 32, 8)

    # a prepared dataset: one label volume per case, on each case's grid
    from preprocessing.dataset import load_dataset, write_dataset

    write_dataset(tmp_path / "ds", "ds", "CT", {"background": 0, "liver": 3},
                  [(vol.hu.astype(np.float32), None, np.diag([6.0, 6.0, 10.0, 1.0])) for _ in range(2)])  # fmt: skip
    rows = run_infer(model_file, [str(tmp_path / "ds")], tmp_path / "ds-labels")
    cases = load_dataset(tmp_path / "ds").cases
    assert [r["input"] for r in rows] == [str(c.image) for c in cases]
    for r in rows:
        assert nib.load(r["label"]).shape == (32, 32, 8)

    site = site_config.validate(site_yaml, "site.yaml")  # no registry section
    with pytest.raises(UserError, match="no registry section"):
        run_source(site, "x", "f", "b", {})
    with pytest.raises(UserError, match="expected NAME or NAME@vNNNN"):
        run_target(site, "x", "f", "b@3", {})
    with pytest.raises(UserError, match="steps: must be an integer"):
        run_target(site, "x", "f", "b", {"steps": 0})
