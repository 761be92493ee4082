"""Where `site-agent infer` writes (issue 17, case 7 follow-up): `.` inside a series folder
names the output after that folder (it wrote the hidden file `<out>/.nii.gz`), and an
output already in `--out` (an earlier run's label, perhaps of another patient) is never
replaced without `--overwrite`: one error line naming it, exit 2, nothing written.

Inputs are built here: an untrained target model with every part a real one has (as in
test_adaptation_cli) and phantom DICOM series from `fedimg_testing.phantom`.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import site_agent_in_process as site_agent
from conftest import write_untrained_target_model

from fedimg_testing.phantom import PlantedIdentifiers, make_phantom, write_dicom_series
from pipelines.adaptation.volumes import output_stem


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An untrained target model with every part a real one has: what infer loads."""
    return write_untrained_target_model(tmp_path_factory.mktemp("model") / "model.pt")


def series(path: Path, seed: int, origin: tuple[float, float, float]) -> Path:
    """A small phantom CT series of patient `seed` in folder `path`."""
    vol = make_phantom(seed, "portal_venous", (40, 36, 8), (6.0, 6.0, 10.0))
    write_dicom_series(vol, path, PlantedIdentifiers.for_case(seed, 0), seed=seed, origin=origin)
    return path


def test_dot_inside_a_series_folder_names_the_output_after_the_folder(model_file, tmp_path, monkeypatch):
    case = series(tmp_path / "p1" / "case_a", 1, (-100.0, -100.0, -40.0))
    out = tmp_path / "out"
    monkeypatch.chdir(case)
    code, stdout, stderr = site_agent("infer", ".", "--model", model_file, "--out", out)
    assert code == 0, stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz"]  # not the hidden ".nii.gz"
    assert stdout.strip() == str(out / "case_a.nii.gz")
    assert nib.load(out / "case_a.nii.gz").shape == (40, 36, 8)
    # The same for `..` style paths and NIfTI suffixes; nothing to name an output after is refused.
    monkeypatch.chdir(case / "..")
    assert output_stem("case_a/.") == "case_a" and output_stem("./case_a/../case_a") == "case_a"
    assert output_stem("x/ct.nii.gz") == "ct" and output_stem("ct.nii") == "ct"
    with pytest.raises(ValueError, match="no name to give its output"):
        output_stem("/")
    with pytest.raises(ValueError, match="no name to give its output"):
        output_stem("x/.nii.gz")


def test_an_existing_output_is_never_replaced_without_overwrite(model_file, tmp_path):
    """d1/case_a then d2/case_a (two patients) into one --out: the second run silently
    replaced the first patient's label with the other patient's."""
    d1 = series(tmp_path / "d1" / "case_a", 1, (-100.0, -100.0, -40.0))
    d2 = series(tmp_path / "d2" / "case_a", 2, (-120.0, -90.0, 60.0))
    d3 = series(tmp_path / "d3" / "case_b", 3, (-100.0, -100.0, -40.0))
    out = tmp_path / "out"
    assert site_agent("infer", d1, "--model", model_file, "--out", out)[0] == 0
    first = (out / "case_a.nii.gz").read_bytes()

    # Another patient's series of the same name: refused, naming the file; nothing written,
    # not even the outputs of other inputs of the run (all are checked before any is written).
    code, stdout, stderr = site_agent("infer", d3, d2, "--model", model_file, "--out", out)
    assert code == 2 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and str(out / "case_a.nii.gz") in lines[0] and "already exists" in lines[0] and "--overwrite" in lines[0], stderr
    assert (out / "case_a.nii.gz").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["case_a.nii.gz"]

    # A DICOM SEG of an earlier run counts too.
    (out / "case_b.seg.dcm").write_bytes(b"someone else's file")
    code, _, stderr = site_agent("infer", d3, "--model", model_file, "--out", out, "--dicom-seg")
    assert code == 2 and str(out / "case_b.seg.dcm") in stderr and not (out / "case_b.nii.gz").exists()
    assert (out / "case_b.seg.dcm").read_bytes() == b"someone else's file"

    # --overwrite replaces it, with the second patient's label on the second patient's grid.
    code, _, stderr = site_agent("infer", d2, "--model", model_file, "--out", out, "--overwrite")
    assert code == 0, stderr[-3000:]
    replaced = nib.load(out / "case_a.nii.gz")
    before = nib.Nifti1Image.from_bytes(gzip.decompress(first))
    assert not np.allclose(replaced.affine, before.affine)  # d2's grid, not d1's
