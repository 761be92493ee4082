"""A site that adds cases keeps every existing case in its split: `site-agent prepare` keeps case
numbers, and `pipelines.splits` depends only on a case's number and the split seed."""

from __future__ import annotations

import json
import shutil

from fedimg_testing.phantom import write_phantom_site
from pipelines.splits import SplitSettings, assign_splits
from preprocessing.prepare import PrepareOptions, prepare
from preprocessing.schema import load_label_map, load_schema

SCHEMA = load_schema()
SHAPE = (24, 24, 8)


def _prepare(site, out):
    lmap = load_label_map(site.label_map, SCHEMA)
    result = prepare([site.dicom_dir], out, SCHEMA, lmap, labels=[site.labels_dir], options=PrepareOptions(name="growing"))
    assert result.count("refused") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    return {c["source_hash"]: c["case_id"] for c in manifest["cases"]}


def test_cases_keep_their_split_when_the_site_adds_cases(tmp_path):
    full = write_phantom_site(tmp_path / "full", ["liver", "liver_tumor"], n_cases=7, seed=5, shape=SHAPE)
    growing = tmp_path / "growing"
    shutil.copytree(full.root, growing)
    site = full.__class__(**{**full.__dict__, "root": growing, "dicom_dir": growing / "dicom", "labels_dir": growing / "labels",
                             "label_map": growing / "site-labels.yaml"})  # fmt: skip
    later = full.cases[3:]
    for case in later:  # the site starts with its first 3 cases
        shutil.rmtree(site.dicom_dir / case)
        (site.labels_dir / f"{case}.nii.gz").unlink()
    out = tmp_path / "prepared"
    before = _prepare(site, out)
    for case in later:  # 4 more scans arrive and prepare runs again on the same output
        shutil.copytree(full.dicom_dir / case, site.dicom_dir / case)
        shutil.copy(full.labels_dir / f"{case}.nii.gz", site.labels_dir / f"{case}.nii.gz")
    after = _prepare(site, out)
    assert len(before) == 3 and len(after) == 7
    assert all(after[source] == case_id for source, case_id in before.items())  # prepare kept every case number
    for settings in (SplitSettings(0.2, 0.2, 0), SplitSettings(0.25, 0.25, 1), SplitSettings(0.1, 0.3, 7)):
        split_before = assign_splits(sorted(before.values()), settings)
        split_after = assign_splits(sorted(after.values()), settings)
        assert {c: split_after[c] for c in split_before} == split_before, settings
