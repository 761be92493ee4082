"""`site-agent infer` on CR/DX radiographs (issue 26): a published 2D model segments each radiograph file on its own
image plane, as `site-agent prepare` converts it, with an optional DICOM SEG referencing the image and areas in cm^2;
a file prepare would refuse fails alone, with one line naming it."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import ROOT, cli

from fedimg_testing.phantom import CHEST_SCANNERS, write_chest_site
from pipelines.model_package import build_package_files
from pipelines.plan_args import parse_plan_args
from pipelines.training import build_model
from preprocessing.dicom import read_header
from preprocessing.radiograph import load_radiograph
from preprocessing.schema import parse_schema

SCHEMA_RAW = yaml.safe_load((ROOT / "preprocessing" / "schemas" / "chest-xr.yaml").read_text())
PLAN_ARGS = {"schema_definition": SCHEMA_RAW, "network": {"name": "basic_unet", "spatial_dims": 2, "features": [4, 4, 8, 8, 16, 4]},
             "roi_size": [32, 32], "spacing": [3.0, 3.0, 1.0], "presence_head": {"classes": ["pneumothorax"]}}  # fmt: skip


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    settings = parse_plan_args({k: v for k, v in PLAN_ARGS.items()}, parse_schema(SCHEMA_RAW, "chest-xr"))
    torch.manual_seed(0)
    files = build_package_files(name="cxr", plan_args=PLAN_ARGS, state_dict=build_model(settings).state_dict(), provenance={"run_id": "r"})
    folder = tmp_path_factory.mktemp("pkg") / "cxr"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def films(tmp_path_factory):
    site = write_chest_site(tmp_path_factory.mktemp("cxr"), seed=2, n_cases=2, scanner=CHEST_SCANNERS[0], classes=["left_lung"], scale=0.08)
    return sorted(site.root.joinpath("images").glob("*.dcm"))


def test_a_radiograph_is_segmented_on_its_own_plane(package, films, tmp_path, one_thread):
    out = tmp_path / "out"
    res = cli("site-agent", "infer", films[0], "--model", package, "--out", out, "--dicom-seg", "--statistics", "--json", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout + res.stderr
    name = films[0].stem  # cxr_000: the DICOM suffix is not kept
    label = nib.load(out / f"{name}.nii.gz")
    header = pydicom.dcmread(films[0], stop_before_pixels=True)
    radiograph = load_radiograph(films[0], read_header(films[0]))
    assert label.shape == (int(header.Columns), int(header.Rows), 1) and np.allclose(label.affine, radiograph.affine_ras)
    values = set(np.unique(np.asarray(label.dataobj)).tolist())
    assert values <= {0, 1, 2, 3, 4}
    seg = pydicom.dcmread(out / f"{name}.seg.dcm")
    assert seg.Modality == "SEG" and [s.SegmentLabel for s in seg.SegmentSequence] == ["left_lung", "right_lung", "heart", "pneumothorax"]
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert (int(seg.Rows), int(seg.Columns)) == (int(header.Rows), int(header.Columns))
    stats = json.loads((out / f"{name}.statistics.json").read_text())
    pixel_mm2 = radiograph.spacing[0] * radiograph.spacing[1]
    assert stats["pixel_area_mm2"] == pytest.approx(pixel_mm2) and "voxel_volume_ml" not in stats
    lung = stats["classes"]["left_lung"]
    assert lung["area_cm2"] == pytest.approx(lung["voxels"] * pixel_mm2 / 100) and "volume_ml" not in lung


def test_a_folder_of_radiographs_gives_one_label_each_and_a_bad_file_fails_alone(package, films, tmp_path, one_thread):
    folder = tmp_path / "films"
    folder.mkdir()
    for f in films:
        shutil.copy(f, folder / f.name)
    raw = pydicom.dcmread(films[1])
    raw.PresentationIntentType = "FOR PROCESSING"
    raw.save_as(folder / "raw.dcm")
    (folder / "notes.dcm").write_text("not a DICOM file")
    out = tmp_path / "out"
    res = cli("site-agent", "infer", folder, "--model", package, "--out", out, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{f.stem}.nii.gz" for f in films]
    problem = [line for line in (res.stdout + res.stderr).splitlines() if "raw.dcm" in line and "for processing" in line]
    assert len(problem) == 1, res.stdout + res.stderr
    assert any("notes.dcm" in line for line in (res.stdout + res.stderr).splitlines())
    assert not (out / "raw.nii.gz").exists() and not (out / "notes.nii.gz").exists()
