"""benchmarks/cross_modality_gin.py: the centralised model trains on the cases the federation's sites train on."""

from __future__ import annotations

from conftest import load_benchmark

from fedimg_testing.phantom import write_phantom_site
from pipelines.splits import SplitSettings, assign_splits
from pipelines.training import parse_plan_args
from preprocessing.dataset import load_dataset
from preprocessing.prepare import PrepareOptions, prepare
from preprocessing.schema import load_label_map, load_schema

SCHEMA = load_schema()


def test_centralised_training_cases_are_the_splits_training_cases(tmp_path):
    bench = load_benchmark("cross_modality_gin")
    site = write_phantom_site(tmp_path / "src", ["liver"], n_cases=5, seed=3, shape=(16, 16, 8))
    out = tmp_path / "ds"
    prepare([site.dicom_dir], out, SCHEMA, load_label_map(site.label_map, SCHEMA), labels=[site.labels_dir],
            options=PrepareOptions(name="ds", qc_report=False))  # fmt: skip
    settings = parse_plan_args({"network": {"name": "basic_unet", "features": [4, 4, 8, 8, 16, 4]}, "roi_size": [32, 32, 32], "spacing": "native"}, SCHEMA)
    split = SplitSettings(validation=0.2, test=0.2, seed=0)
    ids, volumes = bench.labelled_volumes(out, settings)
    assert ids == [c.case_id for c in load_dataset(out).cases if c.label is not None]
    train = bench.training_volumes(out, settings, split)
    expected = [v for case, v in zip(ids, volumes) if assign_splits(ids, split)[case] == "training"]
    assert len(train) == 3  # 5 cases: 3 training, 1 validation, 1 test
    assert all(a[0].equal(b[0]) for a, b in zip(train, expected))
