"""The model goes home: `coordinator publish` -> registry over HTTP -> `site-agent models pull` ->
`site-agent infer` on DICOM series (phantom and real public ones) and NIfTI files, with DICOM SEG,
statistics, previews, batches that survive a bad input, and resumable runs."""

import json

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml
from conftest import site_agent_in_process
from public_dicom import public_series
from test_model_package import _fake_run, _scan

from coordinator.publish import publish_model
from coordinator.registry import Registry
from coordinator.registry_http import serve_registry
from coordinator.site_tokens import SiteTokens
from fedimg_testing.phantom import write_phantom_site

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A coordinator home with a published model (from a run's checkpoints), its registry served on loopback,
    and a site config that names it."""
    root = tmp_path_factory.mktemp("home")
    home = root / "coord"
    torch.set_num_threads(1)
    run = _fake_run(home)
    publish_model(home, run.name, description="test model")
    httpd = serve_registry(home, "127.0.0.1", 0)
    token = root / "site-token"
    token.write_text(SiteTokens(home).issue("site-a") + "\n")
    cfg = root / "site.yaml"
    cfg.write_text(yaml.safe_dump({
        "site_name": "site-a", "coordinator": {"host": "localhost", "port": 50051}, "data_dir": str(root / "data"),
        "work_dir": str(root / "work"), "runtime": "process",
        "registry": {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "token_file": str(token)},
    }))  # fmt: skip
    yield home, cfg, root / "work"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    site = write_phantom_site(tmp_path_factory.mktemp("phantom"), ["liver", "kidney"], n_cases=2, seed=4, shape=(40, 36, 14))
    return site.dicom_dir


def _agent(cfg, *args):
    code, out, err = site_agent_in_process("--config", cfg, *args)
    return code, out, err


def _headers(files):
    out = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        out.append((np.array([float(v) for v in ds.ImagePositionPatient]), np.array([float(v) for v in ds.ImageOrientationPatient]),
                    (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])), int(ds.Rows), int(ds.Columns), ds.SOPInstanceUID))  # fmt: skip
    return out


def assert_on_series_grid(label_path, files):
    """Every slice of the series, read from its own header (PS3.3 C.7.6.2.1.1), is a slice of the label's grid:
    the label's affine maps voxel (column c, row r, slice k) to the centre of that pixel of one instance."""
    img = nib.load(label_path)
    headers = _headers(files)
    assert img.shape[:2] == (headers[0][4], headers[0][3]) and img.shape[2] == len(headers)  # (columns, rows, slices)
    found = set()
    for ipp, iop, (row_mm, col_mm), rows, cols, _ in headers:
        first = LPS_TO_RAS @ ipp
        k = int(round(np.linalg.solve(img.affine[:3, :3], first - img.affine[:3, 3])[2]))
        for r, c in ((0, 0), (0, cols - 1), (rows - 1, 0), (rows - 1, cols - 1)):
            world = LPS_TO_RAS @ (ipp + iop[:3] * col_mm * c + iop[3:] * row_mm * r)
            assert np.allclose(img.affine @ [c, r, k, 1], [*world, 1], atol=0.01), (label_path, r, c, k)
        found.add(k)
    assert found == set(range(len(headers)))


def test_pull_then_infer_a_dicom_series_with_seg_statistics_and_preview(federation, phantom, tmp_path):
    home, cfg, work = federation
    code, out, err = _agent(cfg, "models", "pull", "abdomen")
    assert code == 0, err
    assert "abdomen@v0001: kidney, liver" in out
    pulled = work / "models" / "registry" / "model" / "abdomen" / "v0001"
    assert (pulled / "model.safetensors").is_file() and (pulled / "artifact.json").is_file()
    code, out, err = _agent(cfg, "models", "list", "--json")
    assert code == 0, err
    assert [(r["name"], r["version"], r["pulled"], r["published"]) for r in json.loads(out)] == [("abdomen", "v0001", True, True)]

    series = phantom / "case_000"
    code, out, err = _agent(cfg, "infer", str(series), "--model", "abdomen@v0001", "--out", str(tmp_path / "out"),
                            "--dicom-seg", "--statistics", "--preview", "--json")  # fmt: skip
    assert code == 0, err
    (row,) = json.loads(out)
    files = sorted(p for p in series.iterdir() if p.is_file())
    assert_on_series_grid(row["label"], files)
    label = np.asarray(nib.load(row["label"]).dataobj)
    assert set(np.unique(label)) <= {0, 1, 3}  # only the classes the model predicts

    seg = hd.seg.segread(row["dicom_seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["kidney", "liver"]
    assert seg.SeriesDescription == "fedimg abdomen@v0001"
    uids = [h[5] for h in _headers(files)]
    order = {uid: k for k, uid in enumerate(uids)}
    grid_order = [order[u] for u in uids]
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, assert_missing_frames_are_empty=True)  # [instance, row, column]
    assert pixels.shape == (len(uids), label.shape[1], label.shape[0])
    assert int((pixels > 0).sum()) == int((label > 0).sum()) and grid_order == sorted(grid_order)

    stats = json.loads((tmp_path / "out" / "case_000.statistics.json").read_text())
    voxel_ml = abs(np.linalg.det(nib.load(row["label"]).affine[:3, :3])) / 1000
    for name, value in (("kidney", 1), ("liver", 3)):
        n = int((label == value).sum())
        assert stats["classes"][name]["voxels"] == n
        assert stats["classes"][name]["volume_ml"] == pytest.approx(n * voxel_ml, rel=1e-9)
    assert (tmp_path / "out" / "preview" / "case_000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_tampered_package_is_refused_on_pull_and_on_load(federation, tmp_path):
    home, cfg, work = federation
    # changed at the site after the pull: refused when loaded
    code, _, err = _agent(cfg, "models", "pull", "abdomen@v0001")
    assert code == 0, err
    pulled = work / "models" / "registry" / "model" / "abdomen" / "v0001" / "model.safetensors"
    original = pulled.read_bytes()
    data = bytearray(original)
    data[-5] ^= 0xFF
    pulled.write_bytes(bytes(data))
    scan = _scan(tmp_path / "scan.nii.gz")
    code, _, err = _agent(cfg, "infer", str(scan), "--modality", "CT", "--model", "abdomen@v0001", "--out", str(tmp_path / "o1"))
    assert code != 0 and "model.safetensors: does not match its checksum" in err
    assert not (tmp_path / "o1").exists()
    pulled.write_bytes(original)
    # changed on the coordinator's disk after publishing: the pull refuses it and keeps nothing
    publish_model(home, next((home / "runs").iterdir()).name, model="last", name="other")
    served = Registry(home).path("model", "other") / "model-card.md"
    served.write_text(served.read_text() + "tampered\n")
    code, _, err = _agent(cfg, "models", "pull", "other")
    assert code != 0 and "model-card.md" in err and "checksum" in err
    assert not (work / "models" / "registry" / "model" / "other").exists()


def test_a_batch_goes_on_past_a_bad_input_and_resumes(federation, tmp_path):
    home, cfg, work = federation
    batch = tmp_path / "scans"
    batch.mkdir()
    _scan(batch / "a.nii.gz", seed=1)
    _scan(batch / "c.nii.gz", seed=2)
    (batch / "b.nii.gz").write_bytes(b"not a nifti file")
    (batch / "d.nii.gz").write_bytes((batch / "c.nii.gz").read_bytes()[:2000])  # truncated: its header reads, its voxels do not
    out = tmp_path / "out"
    code, stdout, err = _agent(cfg, "infer", str(batch), "--modality", "CT", "--model", "abdomen", "--out", str(out), "--statistics")
    assert code != 0
    assert "b.nii.gz" in err and "d.nii.gz" in err and "2 of 4 input(s) failed" in err
    (batch / "d.nii.gz").unlink()
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "a.statistics.json", "c.nii.gz", "c.statistics.json", "fedimg-infer.json"]
    for name in ("a", "c"):
        assert nib.load(out / f"{name}.nii.gz").shape == nib.load(batch / f"{name}.nii.gz").shape
    record = json.loads((out / "fedimg-infer.json").read_text())
    assert sorted(record["done"]) == ["a", "c"] and record["model"]["ref"] == "abdomen@v0001"

    # again without --resume or --overwrite: refused before anything is written
    code, _, err = _agent(cfg, "infer", str(batch / "a.nii.gz"), "--modality", "CT", "--model", "abdomen", "--out", str(out))
    assert code != 0 and "already exists" in err and "--resume" in err
    # the bad input fixed: --resume segments it and leaves the others alone
    _scan(batch / "b.nii.gz", seed=3)
    before = (out / "a.nii.gz").stat().st_mtime_ns
    code, stdout, err = _agent(cfg, "infer", str(batch), "--modality", "CT", "--model", "abdomen", "--out", str(out), "--statistics", "--resume")
    assert code == 0, err
    assert stdout.split() == [str(out / "b.nii.gz")] and (out / "a.nii.gz").stat().st_mtime_ns == before
    record = json.loads((out / "fedimg-infer.json").read_text())
    assert sorted(record["done"]) == ["a", "b", "c"]
    # another model's outputs are never mixed in
    publish_model(home, next((home / "runs").iterdir()).name, model="round 0", name="abdomen")
    code, _, err = _agent(cfg, "infer", str(batch), "--modality", "CT", "--model", "abdomen", "--out", str(out), "--resume")
    assert code != 0 and "made with model abdomen@v0001" in err


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_real_public_series_get_labels_on_their_exact_grid(federation, tmp_path, modality):
    """Real series nobody on this team wrote (`tests/public_dicom.py`): the label is on each series' own grid,
    oblique ones included."""
    home, cfg, work = federation
    candidates = [e for e in public_series(min_slices=8, regular_grid=True, modality=modality) if e["rows"] * e["columns"] * e["n_files"] <= 4_000_000]
    if not candidates:
        pytest.skip(f"no public {modality} series available")
    entry = max(candidates, key=lambda e: (e.get("oblique", False), e["n_files"]))  # an oblique one where there is one
    code, out, err = _agent(cfg, "infer", entry["path"], "--model", "abdomen", "--out", str(tmp_path / "out"), "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["modality"] == modality
    assert_on_series_grid(row["label"], entry["file_paths"])


@pytest.fixture(scope="module")
def labelled_dataset(federation, tmp_path_factory):
    """A labelled prepared dataset in the site's data_dir (kidney, liver and spleen labelled)."""
    from preprocessing.prepare import PrepareOptions, prepare
    from preprocessing.schema import load_label_map, load_schema

    home, cfg, work = federation
    data_dir = work.parent / "data"
    schema = load_schema()
    src = write_phantom_site(tmp_path_factory.mktemp("labelled"), ["kidney", "liver", "spleen"], n_cases=5, seed=8, phase="non_contrast", shape=(40, 36, 16))
    prepare([src.dicom_dir], data_dir / "organs", schema, load_label_map(src.label_map, schema), labels=[src.labels_dir],
            options=PrepareOptions(name="organs", qc_report=False))  # fmt: skip
    return data_dir / "organs"


def test_site_evaluate_reproduces_the_coordinators_scores_and_sends_only_aggregates(federation, labelled_dataset):
    from coordinator.evaluate import evaluate_run
    from coordinator.model_evaluations import read_evaluations

    home, cfg, work = federation
    code, out, err = _agent(cfg, "evaluate", "--model", "abdomen@v0001", "--dataset", "organs", "--send", "--json")
    assert code == 0, err
    record = json.loads(out)
    run = next((home / "runs").iterdir())
    coordinator = evaluate_run(run, labelled_dataset, overlays=0)["models"]["global"]  # the published model is the run's best
    # scored: the classes the dataset labels and the model predicts (the run's sites labelled kidney and liver)
    assert record["classes"] == ["kidney", "liver"] and record["not_predicted"] == ["spleen"] and record["cases"] == 5
    assert record["per_case"] == [{c: v for c, v in case.items() if c != "spleen"} for case in coordinator["per_case"]]
    assert record["metrics_mean"] == {c: v for c, v in coordinator["metrics_mean"].items() if c != "spleen"}
    report = work / "evaluations" / "abdomen-v0001" / "organs" / "report"
    assert {"index.html", "dice.png", "hd95.png", "worst1.png", "worst3.png"} <= {p.name for p in report.iterdir()}
    assert record["failed_cases"] == []
    assert "worst" in (report / "index.html").read_text()
    # what reached the coordinator: aggregates only, under the token's site name
    (sent,) = read_evaluations(home, "abdomen", "v0001")
    assert sent["site"] == "site-a" and sent["cases"] == 5 and sent["model"] == "abdomen@v0001"
    assert set(sent) == {"site", "model", "weights_sha256", "modality", "cases", "merge_lesions", "classes"}
    assert sent["classes"]["liver"]["dice"] == record["metrics_mean"]["liver"]["dice"]
    text = json.dumps(sent)
    assert "case_" not in text and "organs" not in text  # no case ids, no dataset name


def test_the_coordinator_refuses_an_evaluation_that_is_more_than_aggregates(federation, labelled_dataset):
    from site_agent.registry_client import RegistryClient
    from site_agent.registry_transport import RegistryClientError

    home, cfg, work = federation
    site_cfg = yaml.safe_load(cfg.read_text())
    client = RegistryClient(site_cfg["registry"]["url"], (work.parent / "site-token").read_text().strip())
    weights = Registry(home).get("model", "abdomen", "v0001")["files"]["model.safetensors"]["sha256"]
    good = {"model": "abdomen@v0001", "weights_sha256": weights, "modality": "CT", "cases": 6, "merge_lesions": False,
            "classes": {"liver": {"dice": {"mean": 0.5, "median": 0.5, "n": 6}, "hd95": {"mean": None, "median": None, "n": 3}}}}  # fmt: skip
    assert client.send_evaluation("abdomen", "v0001", good)["site"] == "site-a"
    for bad, problem in (
        ({**good, "case_ids": ["case_0001"]}, "case_ids"),  # anything per case
        ({**good, "classes": {"liver": {"dice": {"mean": 0.5, "median": 0.5, "n": 6, "values": [0.4, 0.6]}}}}, "values"),
        ({**good, "classes": {"pancreas": {"dice": {"mean": 0.5, "median": 0.5, "n": 6}}}}, "not classes the model predicts"),
        ({**good, "weights_sha256": "0" * 64}, "other weights"),
        ({**good, "cases": 4}, "at least 5 are needed"),  # too few patients behind the numbers
        ({**good, "classes": {"liver": {"hd95": {"mean": 3.0, "median": 3.0, "n": 3}}}}, "send null below 5 cases"),
    ):
        with pytest.raises(RegistryClientError, match=problem):
            client.send_evaluation("abdomen", "v0001", bad)


def test_a_failing_output_leaves_nothing_of_its_input_and_resume_redoes_it(federation, phantom, tmp_path, monkeypatch):
    """The DICOM SEG of one series fails after its label was computed: nothing of that input is left in --out (no
    label without its SEG), the other series is complete; --resume then redoes only the failed one."""
    from pipelines.adaptation import volumes as V

    home, cfg, work = federation
    real = V.write_dicom_seg

    def failing(label, sources, names, path, schema, **kw):
        if "case_001" in str(path):
            raise ValueError("the SEG writer failed")
        return real(label, sources, names, path, schema, **kw)

    monkeypatch.setattr(V, "write_dicom_seg", failing)
    out = tmp_path / "out"
    code, _, err = _agent(cfg, "infer", str(phantom), "--model", "abdomen@v0001", "--out", str(out), "--dicom-seg", "--modality", "MR")
    assert code != 0 and "case_001" in err and "the SEG writer failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["case_000.nii.gz", "case_000.seg.dcm", "fedimg-infer.json"]  # no staging left either
    monkeypatch.setattr(V, "write_dicom_seg", real)
    code, stdout, err = _agent(cfg, "infer", str(phantom), "--model", "abdomen@v0001", "--out", str(out), "--dicom-seg", "--resume", "--json")
    assert code == 0, err
    (row,) = json.loads(stdout)
    assert row["label"] == str(out / "case_001.nii.gz") and row["modality"] == "CT"  # a series keeps its own modality (--modality is for NIfTI)
