"""Data integrity of `site-agent prepare`, `dataset add` and `infer` (issue 17, cases 3, 4, 7
and the site-local case map of case 12): no label lands on the wrong patient, paths given
for something else are never read as images, other people's files are never written over,
non-regular files never block a run, and staff can map a case id back to its source.

Inputs are built here: phantom DICOM series and label maps from `fedimg_testing.phantom`.
The CLI runs in-process through the `run_cli` wrapper of the console script where nothing
can hang, as a real subprocess (with a timeout) where something could.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from fedimg_testing.phantom import PlantedIdentifiers, make_phantom, volume_affine_ras, write_dicom_series, write_phantom_site
from preprocessing.dicom import discover, load_series
from preprocessing.nifti import canonical, clean_image, save_atomic
from preprocessing.prepare import PrepareOptions, prepare
from preprocessing.schema import load_label_map, load_schema
from tests.conftest import cli as run_console_script
from tests.conftest import site_agent_in_process as site_agent
from tests.conftest import write_untrained_target_model

SHAPE = (24, 24, 10)
SPACING = (1.5, 1.5, 2.5)
ORIGIN = (-20.0, -30.0, -40.0)
IDENTITY = (1, 0, 0, 0, 1, 0)
SCHEMA = load_schema()
LABEL_MAP = {"format": "fedimg-site-labels", "schema": "abdominal-ct", "schema_version": "1.0.0",
             "labels": {0: "background", 1: "liver", 2: "liver_tumor"}}  # fmt: skip


def series_with_label(series_dir: Path, label_path: Path | None, seed: int, origin=ORIGIN):
    """A phantom CT series in `series_dir` and (optionally) its liver label map at `label_path`.
    Returns (HU volume, local label) on the series' grid."""
    vol = make_phantom(seed=seed, shape=SHAPE, spacing=SPACING)
    write_dicom_series(vol, series_dir, PlantedIdentifiers.for_case(seed, 0), origin=origin, file_names="instance", seed=seed)
    local = np.zeros(SHAPE, np.uint8)
    local[vol.label == 3] = 1  # liver
    local[vol.label == 4] = 2  # liver tumour
    if label_path is not None:
        save_atomic(clean_image(local, volume_affine_ras(vol, origin, IDENTITY)), label_path)
    return vol.hu, local


def write_label_map(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(LABEL_MAP))
    return path


def cases_by_image(out: Path) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(image, label) arrays of every case of a prepared dataset (canonical RAS+ order)."""
    manifest = json.loads((out / "manifest.json").read_text())
    rows = []
    for c in manifest["cases"]:
        img = np.asarray(nib.load(out / c["image"]).dataobj)
        lab = np.asarray(nib.load(out / c["label"]).dataobj) if c["label"] else None
        rows.append((img, lab))
    return rows


def same_volume(prepared: np.ndarray, hu: np.ndarray) -> bool:
    # the phantom's identity orientation (LPS) comes out of prepare flipped in x and y (RAS+)
    return prepared.shape == hu.shape and np.array_equal(prepared, np.round(hu[::-1, ::-1, :]).astype(prepared.dtype))


# --------------------------------------------------------------------- case 3: pairing


def test_label_named_like_two_series_folders_is_refused_naming_both(tmp_path):
    """p1/case_a and p2/case_a on the same grid, one labels/case_a.nii.gz drawn on p1: the
    old code attached it to one of them (exit 0); now both images and the label are refused
    with a message naming both folders, and an unrelated case is still prepared."""
    root = tmp_path / "site"
    series_with_label(root / "dicom" / "p1" / "case_a", root / "labels" / "case_a.nii.gz", seed=1)
    series_with_label(root / "dicom" / "p2" / "case_a", None, seed=2)  # same grid: geometry alone cannot tell
    hu_c, _ = series_with_label(root / "dicom" / "p3" / "case_c", root / "labels" / "case_c.nii.gz", seed=3)
    lmap = write_label_map(root / "site-labels.yaml")
    out = tmp_path / "ds"
    result = prepare([root / "dicom"], out, SCHEMA, load_label_map(lmap, SCHEMA), labels=[root / "labels"], options=PrepareOptions(qc_report=False))
    refused = [o for o in result.outcomes if o.status == "refused"]
    assert sorted(o.code for o in refused) == ["ambiguous_label"] * 3, [(o.code, o.message) for o in refused]
    (label_msg,) = [o.message for o in refused if o.display.endswith("case_a.nii.gz")]
    for folder in ("p1/case_a", "p2/case_a"):
        assert folder in label_msg and all(folder in o.message for o in refused), folder
    assert "all of them have its voxel grid" in label_msg  # the geometry check is reported too
    assert [o.status for o in result.outcomes if o.status != "refused"] in (["ok"], ["flagged"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["cases"]) == 1 and manifest["cases"][0]["label"]  # only case_c, labelled
    assert sorted(r["reason_code"] for r in manifest["refused"]) == ["ambiguous_label"] * 3
    ((img, lab),) = cases_by_image(out)
    assert same_volume(img, hu_c) and lab is not None


def test_labels_in_subfolders_pair_with_the_image_of_the_same_path(tmp_path):
    """labels/p1/case_a.nii.gz goes to dicom/p1/case_a, labels/p2/case_a.nii.gz to
    dicom/p2/case_a (the old code gave both to the same series and refused one as a
    duplicate); each prepared label is the one drawn on that image."""
    root = tmp_path / "site"
    made = {}
    for seed, parent in ((1, "p1"), (2, "p2")):
        made[parent] = series_with_label(root / "dicom" / parent / "case_a", root / "labels" / parent / "case_a.nii.gz", seed=seed)
    lmap = write_label_map(root / "site-labels.yaml")
    out = tmp_path / "ds"
    code, stdout, stderr = site_agent("prepare", root / "dicom", "--labels", root / "labels", "--label-map", lmap, "--out", out, "--no-qc")
    assert code == 0, stdout + stderr
    rows = cases_by_image(out)
    assert len(rows) == 2
    for hu, local in made.values():
        (match,) = [(img, lab) for img, lab in rows if same_volume(img, hu)]
        expected = np.where(local[::-1, ::-1, :] == 1, 3, np.where(local[::-1, ::-1, :] == 2, 4, 0))  # schema ids
        assert np.array_equal(match[1], expected)


# ------------------------------------------------------- case 4: labels are not images


@pytest.fixture(scope="module")
def docker_layout(tmp_path_factory):
    """The README's Docker example layout: /input/dicom/..., /input/labels/, /input/site-labels.yaml."""
    root = tmp_path_factory.mktemp("input")
    return write_phantom_site(root, ["liver", "liver_tumor"], n_cases=2, seed=21, shape=SHAPE, spacing=SPACING)


def test_readme_docker_prepare_example_gives_labelled_cases(docker_layout, tmp_path):
    """`prepare /input --labels /input/labels --label-map /input/site-labels.yaml --out /data/ct`
    (no --modality): the old code asked for --modality, and with it converted the label maps
    as "CT images" (ct_values_not_hu) next to unlabelled CTs."""
    site = docker_layout
    out = tmp_path / "data" / "ct"
    code, stdout, stderr = site_agent("prepare", site.root, "--labels", site.labels_dir, "--label-map", site.label_map, "--out", out, "--no-qc")
    assert code == 0, stdout + stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["modality"] == "CT"
    assert len(manifest["cases"]) == 2
    for case in manifest["cases"]:
        assert case["label"] and case["source_kind"] == "dicom"
        assert not {"ct_values_not_hu", "looks_like_label", "unlabeled"} & set(case["qc_flags"]), case["qc_flags"]
    assert "the --labels path, not scanned for images" in stdout


def test_output_inside_the_input_is_not_ingested_on_rerun(docker_layout, tmp_path):
    """--out inside the input folder: a re-run finds the same cases unchanged (the old code
    took the dataset's own NIfTI outputs as new cases on every run)."""
    import shutil

    root = tmp_path / "input"
    shutil.copytree(docker_layout.root, root)
    args = ["prepare", root, "--labels", root / "labels", "--label-map", root / "site-labels.yaml", "--out", root / "prepared", "--no-qc", "--json"]
    for attempt in range(2):
        code, stdout, stderr = site_agent(*args)
        assert code == 0, stdout + stderr
        result = json.loads(stdout)
        assert len(result["cases"]) == 2, result
        assert {c["status"] for c in result["cases"]} <= ({"unchanged"} if attempt else {"ok", "flagged"})
    # a prepared dataset elsewhere under the input is never read as images either
    args[args.index("--out") + 1] = tmp_path / "other"
    code, stdout, stderr = site_agent(*args)
    assert code == 0 and len(json.loads(stdout)["cases"]) == 2, stdout + stderr
    assert any("prepared dataset" in n for n in json.loads(stdout)["notes"])


def test_missing_modality_error_names_the_nifti_files_found(docker_layout, tmp_path):
    """A stray label map outside --labels asks for --modality: the error names it."""
    import shutil

    root = tmp_path / "input"
    shutil.copytree(docker_layout.root, root)
    strays = sorted((root / "labels").iterdir())
    for i, f in enumerate(strays * 2):  # four NIfTI files outside --labels
        shutil.copy(f, root / "dicom" / f"stray{i}.nii.gz")
    code, stdout, stderr = site_agent("prepare", root, "--labels", root / "labels", "--label-map", root / "site-labels.yaml", "--out", tmp_path / "ds")
    assert code == 2, stdout + stderr
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "--modality" in lines[0], lines
    assert str(root / "dicom" / "stray0.nii.gz") in lines[0] and "and 1 more" in lines[0], lines[0]


def test_labels_folder_given_as_images_too_is_refused(docker_layout, tmp_path):
    site = docker_layout
    code, stdout, stderr = site_agent("prepare", site.labels_dir, "--labels", site.labels_dir, "--label-map", site.label_map,
                                      "--modality", "CT", "--out", tmp_path / "ds")  # fmt: skip
    assert code == 2 and "--labels" in stderr and "Traceback" not in stderr, stderr
    assert not (tmp_path / "ds").exists()


@pytest.fixture(scope="module")
def site_node(tmp_path_factory):
    base = tmp_path_factory.mktemp("node")
    cfg = base / "site.yaml"
    code, stdout, stderr = site_agent("--config", cfg, "init", "--site-name", "site-i", "--coordinator-host", "127.0.0.1",
                                      "--coordinator-port", "1", "--data-dir", base / "data", "--work-dir", base / "work", "--runtime", "process")  # fmt: skip
    assert code == 0, stdout + stderr
    return cfg


def test_dataset_add_refuses_label_maps_taken_for_images_and_unlabelled_cases(docker_layout, site_node, tmp_path):
    """The old bug's result (label maps prepared as CT images, no labels) was registered by
    `dataset add`; now it is refused, naming the cases and the flag to override."""
    site = docker_layout
    wrong = tmp_path / "wrong"
    code, stdout, stderr = site_agent("prepare", site.labels_dir, "--modality", "CT", "--out", wrong, "--no-qc", "--json")
    assert code == 0, stdout + stderr
    flags = {f for c in json.loads(stdout)["cases"] for f in c["flags"]}
    assert {"looks_like_label", "ct_values_not_hu", "unlabeled"} <= flags
    code, _, stderr = site_agent("--config", site_node, "dataset", "add", wrong, "--tag", "wrong")
    assert code == 2 and "probably not images" in stderr and "--allow-suspect-images" in stderr, stderr
    assert "have no label" in stderr and "--allow-unlabelled" in stderr, stderr  # both reasons at once
    assert len([l for l in stderr.splitlines() if l.strip()]) == 1
    code, _, stderr = site_agent("--config", site_node, "dataset", "add", wrong, "--tag", "wrong", "--allow-suspect-images")
    assert code == 2 and "have no label" in stderr and "--allow-unlabelled" in stderr, stderr

    images_only = tmp_path / "images-only"  # real CTs, no labels: refused unless told
    code, stdout, stderr = site_agent("prepare", site.dicom_dir, "--out", images_only, "--no-qc")
    assert code == 0, stdout + stderr
    code, _, stderr = site_agent("--config", site_node, "dataset", "add", images_only, "--tag", "img")
    assert code == 2 and "2 of 2 case(s) have no label" in stderr, stderr
    code, stdout, stderr = site_agent("--config", site_node, "dataset", "add", images_only, "--tag", "img", "--allow-unlabelled")
    assert code == 0 and "registered" in stdout, stdout + stderr


# ----------------------------------------------------------- case 7: other people's files


def test_output_folder_with_somebody_elses_manifest_is_refused_untouched(docker_layout, tmp_path):
    site = docker_layout
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "manifest.json").write_text('{"project": "somebody else\'s"}\n')
    (out / "notes.txt").write_text("keep me\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, stdout, stderr = site_agent("prepare", site.dicom_dir, "--labels", site.labels_dir, "--label-map", site.label_map, "--out", out)
    assert code == 2, stdout + stderr
    assert "manifest.json that is not a fedimg-prepared-dataset manifest" in stderr and "Traceback" not in stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "theirs.case-map.json").exists()
    # a file of the case map's name that is not ours is not overwritten either
    (tmp_path / "new.case-map.json").write_text("their notes\n")
    code, _, stderr = site_agent("prepare", site.dicom_dir, "--labels", site.labels_dir, "--label-map", site.label_map, "--out", tmp_path / "new")
    assert code == 2 and "not a case map" in stderr, stderr
    assert (tmp_path / "new.case-map.json").read_text() == "their notes\n" and not (tmp_path / "new").exists()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_and_link_to_dev_zero_in_the_input_are_skipped(docker_layout, tmp_path):
    """A FIFO named x.nii.gz and a link to /dev/zero named y.dcm in the input: the old code
    blocked forever reading them; now they are skipped with a note."""
    import shutil

    root = tmp_path / "input"
    shutil.copytree(docker_layout.root, root)
    os.mkfifo(root / "dicom" / "x.nii.gz")
    os.symlink("/dev/zero", root / "dicom" / "y.dcm")
    os.mkfifo(root / "labels" / "z.nii.gz")
    res = run_console_script("site-agent", "prepare", root / "dicom", "--labels", root / "labels", "--label-map", root / "site-labels.yaml",
                             "--out", tmp_path / "ds", "--no-qc", "--json", timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads(res.stdout)
    for name in ("x.nii.gz", "y.dcm", "z.nii.gz"):
        assert any(f"{name}: not a regular file" in n for n in result["notes"]), name
    assert len(result["cases"]) == 2 and all(c["status"] in ("ok", "flagged") for c in result["cases"])
    assert stat.S_ISFIFO(os.lstat(root / "dicom" / "x.nii.gz").st_mode)  # left as it was


def _limited_memory():  # in the child: reading /dev/zero without bound fails at 4 GiB, not the machine's RAM
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("option,what", [("--label-map", "label map"), ("--schema", "schema"), ("--salt-file", "salt file")])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "too-large"])
def test_config_file_that_is_not_a_small_regular_file_is_one_error_line(docker_layout, tmp_path, option, what, kind):
    """--label-map / --schema / --salt-file naming a FIFO (the old code blocked forever), a
    device such as /dev/zero (read without bound: MemoryError), a folder or a 2 MB file:
    exit 2, one error line naming the file, nothing written."""
    import subprocess

    site = docker_layout
    bad = tmp_path / "cfg.yaml"
    if kind == "fifo":
        os.mkfifo(bad)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", bad)
    elif kind == "folder":
        bad.mkdir()
    else:
        bad.write_text("# padding\n" * 200_000)
    args = {"--label-map": site.label_map, "--schema": None, "--salt-file": None, option: bad}
    cmd = [
        str(Path(sys.executable).with_name("site-agent")),
        "prepare",
        str(site.root),
        "--labels",
        str(site.labels_dir),
        "--out",
        str(tmp_path / "ds"),
        "--no-qc",
    ]
    for opt, value in args.items():
        if value is not None:
            cmd += [opt, str(value)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_limited_memory)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and f"the {what} " in lines[0] and "Traceback" not in res.stderr, lines
    expected = {"fifo": "a FIFO", "dev-zero": "a device", "folder": "a folder", "too-large": "larger than 1,048,576 bytes"}[kind]
    assert expected in lines[0]
    assert not (tmp_path / "ds").exists()


def test_read_small_file_reads_a_small_regular_file(tmp_path):
    from fedimg_core.atomic import FileReadError, read_small_file

    (tmp_path / "a.yaml").write_bytes(b"x" * 1000)
    os.symlink(tmp_path / "a.yaml", tmp_path / "link.yaml")
    assert read_small_file(tmp_path / "link.yaml", "label map") == b"x" * 1000
    with pytest.raises(FileReadError, match="larger than 999 bytes"):
        read_small_file(tmp_path / "a.yaml", "label map", limit=999)
    with pytest.raises(FileNotFoundError):
        read_small_file(tmp_path / "missing.yaml")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """An untrained target model with every part a real one has (as in test_adaptation_cli)."""
    return write_untrained_target_model(tmp_path_factory.mktemp("model") / "model.pt")


def test_infer_refuses_two_inputs_that_would_write_the_same_output(model_file, tmp_path):
    """p1/ct.nii.gz and p2/ct.nii.gz both became <out>/ct.nii.gz, the second over the first."""
    from site_agent.adapt import run_infer
    from site_agent.errors import UserError

    vol = make_phantom(seed=4, shape=(40, 36, 8), spacing=(6.0, 6.0, 10.0))
    for parent in ("p1", "p2"):
        (tmp_path / parent).mkdir()
        nib.save(nib.Nifti1Image(vol.hu.astype(np.float32), np.diag([6.0, 6.0, 10.0, 1.0])), tmp_path / parent / "ct.nii.gz")
    with pytest.raises(UserError) as err:
        run_infer(model_file, [str(tmp_path / "p1" / "ct.nii.gz"), str(tmp_path / "p2" / "ct.nii.gz")], tmp_path / "out", modality="CT")
    assert "p1/ct.nii.gz" in str(err.value) and "p2/ct.nii.gz" in str(err.value) and "ct.nii.gz" in str(err.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


# -------------------------------------------------------- case 12: site-local case map


def test_case_map_maps_case_ids_to_source_folders_outside_the_dataset(docker_layout, tmp_path):
    site = docker_layout
    out = tmp_path / "data" / "ct"
    code, stdout, stderr = site_agent("prepare", site.dicom_dir, "--labels", site.labels_dir, "--label-map", site.label_map, "--out", out)
    assert code == 0, stdout + stderr
    case_map = tmp_path / "data" / "ct.case-map.json"
    assert f"case map (site-local, never sent): {case_map}" in " ".join(stdout.split()) or str(case_map) in stdout
    assert stat.S_IMODE(case_map.stat().st_mode) == 0o600  # it names patients' folders
    code, stdout, stderr = site_agent("dataset", "where", out, "--json")
    assert code == 0, stderr
    where = json.loads(stdout)
    assert sorted(where) == ["case_0000", "case_0001"]
    assert sorted(e["source"] for e in where.values()) == sorted(str(site.series_dir(i)) for i in range(2))
    assert sorted(e["label"] for e in where.values()) == sorted(str(p) for p in site.label_paths)
    # each case id maps to the series its prepared image came from
    for case_id, entry in where.items():
        i = [str(site.series_dir(k)) for k in range(2)].index(entry["source"])
        assert entry["series_uid"] == site.series_uids[i] and entry["label"] == str(site.label_paths[i])
        vol = load_series(discover([site.series_dir(i)]).series[0])
        source = np.asarray(canonical(nib.Nifti1Image(vol.array, vol.affine_ras)).dataobj)
        assert np.array_equal(np.asarray(nib.load(out / "imagesTr" / f"{case_id}.nii.gz").dataobj), source)
    code, stdout, _ = site_agent("dataset", "where", out, "case_0001")
    assert code == 0 and stdout.startswith("case_0001: ") and "DICOM series" in stdout
    code, _, stderr = site_agent("dataset", "where", out, "case_0042")
    assert code == 2 and "no case case_0042" in stderr
    # nothing of the map is inside the dataset: no output byte names a source path
    needles = [str(site.root).encode(), *(p.name.encode() for p in site.label_paths), *(u.encode() for u in site.series_uids)]
    for p in out.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert not any(n in data for n in needles), p
