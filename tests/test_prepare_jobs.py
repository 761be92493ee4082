"""Issue 27, part 1: `site-agent prepare --jobs N` converts cases in worker processes, byte for byte as one does.

Also the streamed NIfTI writer (no whole-volume copies in memory), the worker pool's order and
its crash handling (a worker killed mid-case costs that case only), and `site-agent dataset qc`
for a dataset prepared with --no-qc. benchmarks/prepare_vs_dcm2niix.py times them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedimg_testing.files import same_tree
from fedimg_testing.phantom import write_phantom_site
from preprocessing.nifti import save_atomic
from preprocessing.parallel import ordered_map
from preprocessing.prepare import PrepareError, PrepareOptions, prepare, write_qc_report
from preprocessing.schema import load_label_map, load_schema
from tests.conftest import cli

SCHEMA = load_schema()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    # labels, reference labels, and a case whose label is on another grid (refused): every kind of outcome
    root = tmp_path_factory.mktemp("jobs-site")
    site = write_phantom_site(root, ["kidney", "kidney_tumor"], n_cases=4, seed=5, shape=(40, 36, 14), reference_classes=["liver"])
    bad = sorted(site.labels_dir.glob("*.nii.gz"))[1]
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), bad)
    return site


def _prepare(site, out: Path, salt: Path, jobs: int):
    lmap = load_label_map(site.label_map, SCHEMA)
    ref_map = load_label_map(site.reference_label_map, SCHEMA)
    opts = PrepareOptions(name="jobs", jobs=jobs)
    return prepare([site.dicom_dir], out, SCHEMA, lmap, labels=[site.labels_dir], options=opts, salt_file=salt,
                   case_map=out.with_suffix(".map"), reference_labels=[site.root / "reference-labels"], reference_label_map=ref_map)  # fmt: skip


def test_jobs_give_the_serial_dataset_byte_for_byte(site, tmp_path):
    salt = tmp_path / "salt"
    salt.write_text(os.urandom(32).hex() + "\n")
    serial = _prepare(site, tmp_path / "serial", salt, jobs=1)
    parallel = _prepare(site, tmp_path / "parallel", salt, jobs=2)
    assert [(o.case_id, o.status, o.code) for o in serial.outcomes] == [(o.case_id, o.status, o.code) for o in parallel.outcomes]
    assert serial.count("refused") == 1 and serial.count("ok") + serial.count("flagged") == 3  # the label on another grid: refused alone
    assert (tmp_path / "serial" / "qc" / "case_0000.png").is_file()  # QC figures too (drawn by the workers)
    assert same_tree(tmp_path / "serial", tmp_path / "parallel")  # NIfTI, manifest, QC, records: every byte
    assert not list((tmp_path / "parallel").rglob(".staged-*"))  # nothing left under staging names
    again = _prepare(site, tmp_path / "parallel", salt, jobs=2)  # a re-run with jobs finds every case unchanged
    assert again.count("unchanged") == 3 and again.count("refused") == 1 and same_tree(tmp_path / "serial", tmp_path / "parallel")


def test_the_cli_takes_jobs_and_a_later_qc_report(site, tmp_path):
    out = tmp_path / "ds"
    res = cli("site-agent", "prepare", site.dicom_dir, "--out", out, "--labels", site.labels_dir, "--label-map", site.label_map,
              "--no-qc", "--jobs", "0", "--json")  # fmt: skip
    assert res.returncode == 3, res.stderr  # one case refused, the others prepared
    assert not (out / "qc").exists()
    res = cli("site-agent", "dataset", "qc", out, "--jobs", "2")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert {p.name for p in (out / "qc").glob("*.png")} == {f"{c['case_id']}.png" for c in manifest["cases"]}
    assert "case_0000" in (out / "qc" / "index.html").read_text()
    res = cli("site-agent", "dataset", "qc", tmp_path)
    assert res.returncode != 0 and "not a prepared dataset" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_a_large_volume_is_streamed_to_the_same_file_a_copy_would_give(tmp_path):
    rng = np.random.default_rng(0)
    data = np.asfortranarray(rng.integers(-1000, 2000, size=(256, 256, 80), dtype=np.int16))  # 10 MB: the streamed path
    img = nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.0, 1.0]))
    img.header.set_data_dtype(np.int16)
    sha = save_atomic(img, tmp_path / "a.nii.gz")
    raw = (tmp_path / "a.nii.gz").read_bytes()
    assert sha == hashlib.sha256(raw).hexdigest() and raw[4:8] == b"\0\0\0\0"  # the hash of what was written; mtime 0
    assert gzip.decompress(raw) == img.to_bytes()  # exactly nibabel's file
    assert save_atomic(img, tmp_path / "b.nii.gz") == sha  # the same volume, the same bytes
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def _square_slowly(n: int) -> int:
    time.sleep(0.02 * (n % 3))
    return n * n


def _dies_on_three(n: int) -> int:
    if n == 3:
        os._exit(1)  # a crashing decoder: the worker process ends without a word
    return n * n


def test_the_pool_keeps_the_order_and_a_dying_worker_costs_its_item_only():
    assert list(ordered_map(_square_slowly, range(9), jobs=2, on_crash=lambda n: -1)) == [n * n for n in range(9)]
    assert list(ordered_map(_dies_on_three, range(7), jobs=2, on_crash=lambda n: -n)) == [0, 1, 4, -3, 16, 25, 36]
    assert list(ordered_map(_square_slowly, [], jobs=2, on_crash=lambda n: -1)) == []


def test_a_qc_report_needs_the_datasets_own_schema(site, tmp_path):
    salt = tmp_path / "salt"
    salt.write_text(os.urandom(32).hex() + "\n")
    lmap = load_label_map(site.label_map, SCHEMA)
    prepare([site.dicom_dir], tmp_path / "ds", SCHEMA, lmap, labels=[site.labels_dir], options=PrepareOptions(qc_report=False), salt_file=salt)
    with pytest.raises(PrepareError, match="prepared with schema abdominal-ct 1.0.0, not abdominal-ct 9.9.9"):
        write_qc_report(tmp_path / "ds", dataclasses.replace(SCHEMA, version="9.9.9"))
    assert not (tmp_path / "ds" / "qc").exists()
    assert write_qc_report(tmp_path / "ds").name == "index.html"  # the built-in schema the manifest names


def test_two_copies_of_one_image_stage_apart_and_give_the_serial_dataset(tmp_path):
    # a NIfTI source is identified by its bytes: two copies share a source hash, and were once staged under one name
    rng = np.random.default_rng(3)
    volume = rng.integers(-1000, 1500, size=(40, 40, 20), dtype=np.int16)
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", "c.nii.gz"):
        data = volume if name != "c.nii.gz" else volume[::-1].copy()
        nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), folder / name)
    (folder / "b.nii.gz").write_bytes((folder / "a.nii.gz").read_bytes())
    salt = tmp_path / "salt"
    salt.write_text(os.urandom(32).hex() + "\n")
    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs-{jobs}"
        results[jobs] = prepare([folder], out, SCHEMA, None, options=PrepareOptions(modality="CT", jobs=jobs), salt_file=salt, case_map=out.with_suffix(".map"))
    assert [(o.status, o.case_id) for o in results[1].outcomes] == [(o.status, o.case_id) for o in results[2].outcomes]
    assert not [o for o in results[2].outcomes if o.status == "refused"]
    assert same_tree(tmp_path / "jobs-1", tmp_path / "jobs-2") and not list((tmp_path / "jobs-2").rglob(".staged-*"))
