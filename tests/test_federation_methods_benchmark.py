"""benchmarks/federation_methods.py and benchmarks/method_baselines.py: the split every method gets, the statistics
over seeds and the verdict, the standalone ensemble's rule and the centralised trainer (no FL processes)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import load_benchmark

from coordinator.spec import parse
from coordinator.testbed import default_spec_text
from pipelines.networks import main_output, output_biases
from pipelines.training import parameter_checksum, parse_plan_args, predict
from preprocessing.schema import load_schema

SCHEMA = load_schema()
ORGANS = list(SCHEMA.groups)
TUMOURS = [x for lesions in SCHEMA.groups.values() for x in lesions]
TINY_NET = {"name": "basic_unet", "features": [4, 4, 8, 8, 16, 4]}


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("federation_methods")


@pytest.fixture(scope="module")
def mb(bench):
    import method_baselines  # on sys.path once the benchmark is loaded (benchmarks/)

    return method_baselines


def test_seeds_vary_training_not_the_split(bench):
    specs = {(m, seed): parse(yaml.safe_dump(bench.spec_for(m, 2, 3, seed, split_seed=5)), "spec") for m in bench.METHODS for seed in (0, 1)}
    demo = yaml.safe_load(default_spec_text())["split"]
    assert {s.seed for (_, seed), s in specs.items() if seed == 1} == {1}
    assert all(s.split == {"validation": demo["validation"], "test": demo["test"], "seed": 5} for s in specs.values())  # the demo spec's shares
    assert len({s.name for s in specs.values()}) == len(specs)  # one run name per method and seed
    assert parse(yaml.safe_dump(bench.spec_for("fedavg", 2, 3, 0)), "spec").split["seed"] == 0
    # each method names its aggregator: the main job's (scaffold) reaches only the methods that say so
    assert {m for (m, _), s in specs.items() if s.aggregator == "scaffold"} == {"scaffold", "condistfl_scaffold", "condistfl_scaffold_bf16"}
    # only the bf16 variant of the main job rounds its models on the wire
    assert {m for (m, _), s in specs.items() if s.transfer["precision"] != "fp32"} == {"condistfl_scaffold_bf16"}


def test_seed_options(bench):
    assert bench.parse_seeds("0, 2,2,1") == [0, 2, 1]
    for bad in ("", "-1", "a"):
        with pytest.raises(ValueError):
            bench.parse_seeds(bad)
    assert bench.run_label("fedavg", 1, [1]) == "fedavg"
    assert bench.run_label("fedavg", 1, [0, 1]) == "fedavg seed 1"


def test_budget_follows_the_demo_and_cases_parse(bench):
    raw = yaml.safe_load(default_spec_text())
    assert bench.demo_budget() == (raw["rounds"], raw["local_steps"])
    assert bench.parse_cases(None) is None  # the testbed's own default
    assert bench.parse_cases("10") == [10]
    assert bench.parse_cases("4, 8") == [4, 8]
    for bad in ("", "0", "x", "4,-1"):
        with pytest.raises(ValueError):
            bench.parse_cases(bad)
    assert bench.DEFAULT_METHODS.split(",") == ["fedavg", "fedprox", "fedopt", "scaffold", "condistfl", "condistfl_scaffold", "standalone", "centralised"]


def test_run_scores_read_test_and_oof_columns(bench):
    record = {
        "split": "test", "mode": "federated",
        "global": {"dice": {"liver": 0.8, "kidney": 0.6}}, "local": {"dice": {"liver": 0.9}},
        "oof": {"out-of-federation": {"global": {"dice": {"liver": 0.7}}, "local_mean": {"dice": {"liver": 0.5}}}},
    }  # fmt: skip
    got = bench.run_scores(record, "out-of-federation")
    assert got == {"global": {"in_fed": {"liver": 0.8, "kidney": 0.6}, "oof": {"liver": 0.7}}, "local": {"in_fed": {"liver": 0.9}, "oof": {"liver": 0.5}}}
    # no test split: the in-federation columns are validation scores, never mixed into the test statistics
    assert bench.run_scores({**record, "split": "validation"}, "out-of-federation")["global"]["in_fed"] is None
    # standalone: no aggregated model (its joint model is the ensemble, scored apart)
    assert bench.run_scores({**record, "mode": "standalone"}, "out-of-federation")["global"] is None
    assert bench.run_scores(record, None)["global"]["oof"] is None


def _rec(method, seed, in_fed=None, oof=None, local=None):
    return {"method": method, "seed": seed, "global": {"in_fed": in_fed, "oof": oof}, "local": local}


def test_seed_statistics_per_class_and_organ_mean(bench):
    records = [
        _rec("fedavg", 0, {"kidney": 0.5, "liver": 0.7, "pancreas": 0.3, "spleen": 0.9, "liver_tumor": 0.1}, {"liver": 0.6}),
        _rec("fedavg", 1, {"kidney": 0.7, "liver": 0.9, "pancreas": 0.5, "spleen": 0.7, "liver_tumor": 0.3}),
        _rec("fedavg", 2, {"kidney": 0.6, "liver": 0.8, "pancreas": 0.4, "spleen": 0.8}),
        _rec("condistfl", 0, {"kidney": 0.9}, local={"in_fed": {"kidney": 0.95}, "oof": None}),
    ]
    stats = bench.seed_statistics(records, ORGANS, TUMOURS)
    liver = stats["fedavg"]["global"]["in_fed"]["classes"]["liver"]
    assert liver["n"] == 3 and liver["mean"] == pytest.approx(0.8) and liver["sd"] == pytest.approx(0.1)  # sample sd
    organs = stats["fedavg"]["global"]["in_fed"]["organs"]
    assert organs["values"] == pytest.approx([0.6, 0.7, 0.65]) and organs["n"] == 3
    tumours = stats["fedavg"]["global"]["in_fed"]["tumours"]
    assert tumours["values"] == pytest.approx([0.1, 0.3]) and tumours["n"] == 2  # seed 2 scored no tumour
    oof = stats["fedavg"]["global"]["oof"]
    assert oof["classes"]["liver"]["n"] == 1 and oof["classes"]["liver"]["sd"] is None
    assert "local" not in stats["fedavg"]  # never scored: no empty cell
    assert stats["condistfl"]["local"]["in_fed"]["organs"]["mean"] == pytest.approx(0.95)
    assert "oof" not in stats["condistfl"]["local"]
    rows = bench.stats_rows(stats, "global", "in_fed", ["kidney", "liver"])
    assert rows[0] == ["FedAvg", "0.600 ± 0.100 (3)", "0.800 ± 0.100 (3)", "0.650 ± 0.050 (3)", "0.200 ± 0.141 (2)"]
    assert rows[1][0] == "ConDistFL" and rows[1][2] == "-"


def test_compare_sentence_exceeds_within_and_missing(bench):
    a = bench.stat([0.80, 0.81, 0.82])
    b = bench.stat([0.67, 0.70, 0.73])
    line = bench.compare_sentence("In federation, global", "ConDistFL", a, "FedAvg", b)
    assert line.startswith("In federation, global: ConDistFL 0.810 ± 0.010 vs FedAvg 0.700 ± 0.030 (n = 3 seeds)")
    assert "advantage (+0.110) exceeds the seed-to-seed spread" in line
    close = bench.stat([0.60, 0.75, 0.90])
    line = bench.compare_sentence("Out of federation, local", "ConDistFL", close, "FedAvg", b)
    assert "advantage (+0.050) is within the seed-to-seed spread" in line
    line = bench.compare_sentence("x", "ConDistFL", b, "FedAvg", a)
    assert "deficit (-0.110) exceeds" in line
    assert bench.compare_sentence("x", "ConDistFL", None, "FedAvg", a) == "x: no score for ConDistFL, nothing to compare."
    assert "no score for ConDistFL and FedAvg" in bench.compare_sentence("x", "ConDistFL", bench.stat([]), "FedAvg", None)
    one = bench.compare_sentence("x", "ConDistFL", bench.stat([0.9]), "FedAvg", a)
    assert "(n = 1 and 3 seeds)" in one and "cannot be set against the seed-to-seed spread" in one


def test_verdict_covers_every_comparison_and_the_centralised_ratio(bench):
    organs = dict.fromkeys(ORGANS, 0.0)
    records = []
    for seed, (c, f, central) in enumerate([(0.80, 0.70, 0.85), (0.82, 0.66, 0.88), (0.81, 0.71, 0.86)]):
        records.append(_rec("condistfl", seed, {**organs, "kidney": 4 * c}, {**organs, "kidney": 4 * c}, {"in_fed": {"kidney": c}, "oof": None}))
        records.append(_rec("fedavg", seed, {**organs, "kidney": 4 * f}, None, {"in_fed": {"kidney": 0.9}, "oof": None}))
        records.append(_rec("centralised", seed, {**organs, "kidney": 4 * central}, {**organs, "kidney": 4 * central}))
    stats = bench.seed_statistics(records, ORGANS, TUMOURS)
    lines = bench.verdict(stats, records, ORGANS)
    joined = "\n".join(lines)
    assert "In federation, global (organ mean): ConDistFL 0.810 ± 0.010 vs FedAvg" in joined and "exceeds the seed-to-seed spread" in lines[0]
    assert any(line.startswith("Out of federation, global (organ mean)") and "no score for FedAvg" in line for line in lines)
    assert any(line.startswith("In federation, local (organ mean)") and "deficit" in line for line in lines)
    ratio = bench.ratio_stat(records, "condistfl", "centralised", "in_fed", ORGANS)
    assert ratio["n"] == 3 and ratio["values"] == pytest.approx([0.80 / 0.85, 0.82 / 0.88, 0.81 / 0.86])
    assert any(line.startswith(f"ConDistFL global / centralised, in federation (organ means, per seed): {ratio['mean']:.3f}") for line in lines)
    assert "the mean is at or above the goal of 0.90" in joined
    # a seed with no centralised model is left out of the ratio, not paired with another seed
    assert bench.ratio_stat(records[:-1], "condistfl", "centralised", "oof", ORGANS)["n"] == 2


class _Fixed(torch.nn.Module):
    """A 'model' whose softmax is a fixed table along the first spatial axis (one column per voxel)."""

    def __init__(self, probs, heads=False):
        super().__init__()
        self.logits = torch.log(torch.tensor(probs, dtype=torch.float32)).T  # (C, X)
        self.heads = heads

    def forward(self, x):
        out = self.logits.view(1, *self.logits.shape, 1, 1).expand(x.shape[0], -1, -1, x.shape[3], x.shape[4]).clone()
        return [out, out[..., ::2, ::2, ::2]] if self.heads else out  # deep-supervision heads: main first


def test_ensemble_takes_each_class_from_its_sites_and_merges_background(mb):
    # classes 0..3; site A labels 1, site B labels 2; nobody labels 3. Three voxels:
    a = _Fixed([[0.2, 0.7, 0.05, 0.05], [0.5, 0.1, 0.35, 0.05], [0.1, 0.2, 0.1, 0.6]])
    b = _Fixed([[0.8, 0.1, 0.05, 0.05], [0.1, 0.05, 0.8, 0.05], [0.1, 0.1, 0.2, 0.6]], heads=True)
    ens = mb.PartialLabelEnsemble([(a, [1]), (b, [2])], num_classes=4, spatial_dims=3)
    probs = ens(torch.zeros(1, 1, 3, 1, 1)).exp()[0, :, :, 0, 0].T  # (voxel, class)
    # voxel 1: background = min(A 0.2+0.05+0.05, B 0.8+0.1+0.05) = 0.3 < class 1 from A alone (0.7): class 1,
    # although the plain mean of the softmaxes (background 0.5, class 1 0.4) would say background
    assert probs[0].tolist() == pytest.approx([0.3, 0.7, 0.05, 1e-6], abs=1e-6)
    # voxel 2: class 2 from B (0.8) over the merged background min(0.9, 0.2) = 0.2
    assert probs[1, :3].tolist() == pytest.approx([0.2, 0.1, 0.8], abs=1e-6)
    # voxel 3: both models put 0.6 on class 3, which no site labels: it is background for both
    assert probs[2, :3].tolist() == pytest.approx([0.8, 0.2, 0.2], abs=1e-6)
    assert probs.argmax(dim=1).tolist() == [1, 2, 0]
    with pytest.raises(ValueError):
        mb.PartialLabelEnsemble([], num_classes=4)
    with pytest.raises(ValueError):
        mb.PartialLabelEnsemble([(a, [4])], num_classes=4)


def test_ensemble_of_one_model_labelling_everything_predicts_like_it(mb):
    settings = parse_plan_args({"network": TINY_NET, "roi_size": [32, 32, 32], "spacing": "native"}, SCHEMA)
    torch.manual_seed(0)
    net = mb.build_model(settings).eval()
    ens = mb.PartialLabelEnsemble([(net, range(1, SCHEMA.num_classes))], SCHEMA.num_classes, 3)
    image = torch.randn(1, 40, 36, 20)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(ens(x).argmax(1), main_output(net(x), 3).argmax(1))
    assert torch.equal(predict(ens, image, settings), predict(net, image, settings))  # through the evaluation's sliding window


def _phantom(label_value: int, offset: int = 0):
    """A (1, 36, 36, 36) volume with a bright cube labelled ``label_value``."""
    image = torch.zeros(1, 36, 36, 36)
    label = torch.zeros(1, 36, 36, 36, dtype=torch.uint8)
    image[:, 10 + offset : 24 + offset, 10:24, 10:24] = 1.0
    label[:, 10 + offset : 24 + offset, 10:24, 10:24] = label_value
    return image + 0.05 * torch.randn_like(image), label


def test_centralised_trainer_learns_and_is_seeded(mb):
    settings = parse_plan_args({"network": TINY_NET, "roi_size": [32, 32, 32], "spacing": "native", "augment": False}, SCHEMA)
    torch.manual_seed(0)
    liver, spleen = SCHEMA.classes["liver"], SCHEMA.classes["spleen"]
    losses: list[float] = []
    threads = torch.get_num_threads()
    net = mb.train_centralised([(*_phantom(liver), (liver,))], settings, 30, 1e-2, 1e-5, seed=3, threads=1, on_step=lambda step, loss: losses.append(loss))
    assert torch.get_num_threads() == threads  # restored after training
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5  # it learns the one volume
    assert not net.training
    with torch.no_grad():
        assert main_output(net(torch.zeros(2, 1, 32, 32, 32)), 3).shape == (2, SCHEMA.num_classes, 32, 32, 32)
    train = [(*_phantom(liver), (liver,)), (*_phantom(spleen, 2), (spleen,))]  # two sites, each its own objective
    again = mb.train_centralised(train, settings, 3, 1e-2, 1e-5, seed=3)
    same = mb.train_centralised(train, settings, 3, 1e-2, 1e-5, seed=3)
    other = mb.train_centralised(train, settings, 3, 1e-2, 1e-5, seed=4)
    assert parameter_checksum(dict(again.named_parameters())) == parameter_checksum(dict(same.named_parameters()))
    assert parameter_checksum(dict(again.named_parameters())) != parameter_checksum(dict(other.named_parameters()))
    with pytest.raises(ValueError):
        mb.train_centralised([], settings, 3, 1e-2, 1e-5, seed=0)


def test_centralised_trainer_starts_from_the_federations_initial_model(mb):
    # the demo spec's background prior: the centralised model starts where the federated methods start
    settings = parse_plan_args({"network": TINY_NET, "roi_size": [32, 32, 32], "spacing": "native", "augment": False, "background_prior": 0.8}, SCHEMA)
    liver = SCHEMA.classes["liver"]
    net = mb.train_centralised([(*_phantom(liver), (liver,))], settings, 1, 0.0, 0.0, seed=0)  # lr 0: the initial weights
    expected = math.log(0.8 * (SCHEMA.num_classes - 1) / 0.2)
    assert all(b[0].item() == pytest.approx(expected) for b in output_biases(net, SCHEMA.num_classes))


class _Oracle(torch.nn.Module):
    """Predicts the class its input's intensity encodes (image == label), so Dice is 1 wherever it is scored."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].round().long().clamp(0, SCHEMA.num_classes - 1), SCHEMA.num_classes).permute(0, 4, 1, 2, 3).float() * 10


def test_site_test_dice_scores_each_site_on_its_own_classes(mb):
    settings = parse_plan_args({"network": TINY_NET, "roi_size": [32, 32, 32], "spacing": "native"}, SCHEMA)
    liver, spleen, kidney = SCHEMA.classes["liver"], SCHEMA.classes["spleen"], SCHEMA.classes["kidney"]
    label = torch.zeros(1, 16, 16, 16, dtype=torch.uint8)
    label[:, 2:6, 2:6, 2:6] = liver
    label[:, 8:12, 8:12, 8:12] = spleen
    case = (label.float(), label)
    wrong = label.clone()
    wrong[wrong == liver] = kidney  # site-2's kidney where the image shows (and the oracle predicts) liver
    sites = [mb.SiteCases("site-1", (liver,), [], [case]), mb.SiteCases("site-2", (kidney,), [], [(label.float(), wrong), case])]
    dice, n = mb.site_test_dice(_Oracle(), sites, settings)
    assert n == 3
    assert dice[liver] == pytest.approx(1.0)  # site-2 predicts liver on its kidney, but it does not label the liver: not counted
    assert dice[kidney] == pytest.approx(0.0)  # its second case has no kidney and predicts none: not scorable, left out of the mean
    assert spleen not in dice  # no site labels it: never scored, although present in the image
    assert mb.named({liver: 0.5}, settings) == {"liver": 0.5}
    # the out-of-federation settings fold classes no site labels into background, as `coordinator evaluate`
    assert mb.oof_settings(settings, [liver, kidney]).predict_classes == (kidney, liver)
    assert mb.oof_settings(settings, list(range(1, SCHEMA.num_classes))).predict_classes is None


def test_site_cases_and_oof_classes_of_a_prepared_dataset(mb, tmp_path):
    from fedimg_testing.phantom import write_phantom_site
    from pipelines.splits import SplitSettings, split_indices
    from preprocessing.dataset import load_dataset
    from preprocessing.prepare import PrepareOptions, prepare
    from preprocessing.schema import load_label_map

    site = write_phantom_site(tmp_path / "src", ["liver"], n_cases=5, seed=3, shape=(16, 16, 8))
    out = tmp_path / "ds"
    prepare([site.dicom_dir], out, SCHEMA, load_label_map(site.label_map, SCHEMA), labels=[site.labels_dir],
            options=PrepareOptions(name="ds", qc_report=False))  # fmt: skip
    settings = parse_plan_args({"network": TINY_NET, "roi_size": [32, 32, 32], "spacing": "native"}, SCHEMA)
    split = SplitSettings(validation=0.2, test=0.2, seed=0)
    cases = mb.load_site("site-1", out, settings, split)
    ids = [c.case_id for c in load_dataset(out).cases if c.label is not None]
    expected = split_indices(ids, split)
    assert cases.classes == (SCHEMA.classes["liver"],)
    assert (len(cases.training), len(cases.test)) == (len(expected.training), len(expected.test)) == (3, 1)
    volumes = mb.labelled_volumes(out, settings)[1]
    assert cases.test[0][0].equal(volumes[expected.test[0]][0])  # the very case the site tests on
    # the dataset labels the liver but not its tumour: scored with lesions merged, as `coordinator evaluate` does
    assert mb.oof_classes(out, settings) == ([SCHEMA.classes["liver"]], True)


def test_results_markdown_states_command_machine_and_n(bench):
    summary = {
        "command": ".venv/bin/python benchmarks/federation_methods.py --seeds 0,1", "date_utc": "2026-12-05 10:00 UTC", "cpu_count": 2,
        "total_wall_s": 600.0, "rounds": 10, "steps": 80, "seeds": [0, 1], "split_seed": 0, "cases_per_site": None,
        "baselines": {"centralised_steps": 3200, "torch_threads": 2, "test_cases": {"site-1": 4}, "oof_cases": 4},
        "verdict": ["In federation, global (organ mean): ..."],
    }  # fmt: skip
    text = bench.results_markdown(summary, ["### (a) table\n\n| method |\n| --- |\n"])
    for part in ("`.venv/bin/python benchmarks/federation_methods.py --seeds 0,1`", "2026-12-05", "2 CPU cores", "3200 steps",
                 "site-1 4", "out-of-federation cases: 4", "### (a) table", "- In federation, global (organ mean): ..."):  # fmt: skip
        assert part in text


def test_main_job_and_benchmark_use_the_same_cases_per_site(bench):
    from coordinator.commands.testbed import testbed as testbed_command
    from coordinator.testbed import DEMO_CASES_PER_SITE

    option = next(p for p in testbed_command.params if p.name == "cases")
    assert option.default == str(DEMO_CASES_PER_SITE)
    assert bench.parse_cases(str(DEMO_CASES_PER_SITE)) == [DEMO_CASES_PER_SITE]


def _fake_run(home, spec: dict, *, status: str = "done", rounds: int | None = None, evaluated: bool = True):
    """A run directory as `coordinator run` leaves it: the submitted spec (sites filled in by the testbed), state, metrics."""
    from coordinator import runs

    submitted = {**spec, "sites": {"tags": ["fedimg-demo"], "min_sites": 4}}
    run_dir = runs.new_run(home, yaml.safe_dump(submitted, sort_keys=False), spec["name"])
    runs.mark(run_dir, status)
    n = spec["rounds"] if rounds is None else rounds
    runs.write_metrics(run_dir, {"rounds_planned": spec["rounds"], "rounds": [{"round": i + 1} for i in range(n)]})
    if evaluated:
        (run_dir / "evaluations").mkdir()
        (run_dir / "evaluations" / "out-of-federation.json").write_text("{}")
    return run_dir


def test_resume_reuses_only_finished_evaluated_runs_of_the_same_spec(bench, tmp_path):
    spec = bench.spec_for("fedavg", 2, 3, seed=1)
    assert bench.finished_run(tmp_path, spec) is None  # an empty home
    _fake_run(tmp_path, spec, status="failed")
    _fake_run(tmp_path, spec, rounds=1)  # stopped after round 1 of 2
    _fake_run(tmp_path, spec, evaluated=False)  # never scored out of federation
    _fake_run(tmp_path, bench.spec_for("fedavg", 2, 3, seed=2))  # another seed
    changed = {**spec, "plan_args": {**spec["plan_args"], "gin": {"prob": 0.9}}}
    _fake_run(tmp_path, changed)  # the demo spec changed since
    assert bench.finished_run(tmp_path, spec) is None
    good = _fake_run(tmp_path, spec)
    assert bench.finished_run(tmp_path, spec) == good.resolve()
    assert bench.finished_run(tmp_path, changed) is not None and bench.finished_run(tmp_path, changed) != good.resolve()


def test_results_markdown_names_the_reused_runs(bench):
    summary = {
        "command": "c", "date_utc": "d", "cpu_count": 2, "total_wall_s": 60.0, "rounds": 2, "steps": 3, "seeds": [0], "split_seed": 0,
        "cases_per_site": None, "baselines": {}, "verdict": [], "reused_runs": {"fedavg seed 0": "/x/runs/20261205-bench-fedavg-seed0-ab12"},
    }  # fmt: skip
    assert "fedavg seed 0 (20261205-bench-fedavg-seed0-ab12, commit unknown)" in bench.results_markdown(summary, [])
    summary["run_commits"] = {"fedavg seed 0": "abc123"}
    assert "fedavg seed 0 (20261205-bench-fedavg-seed0-ab12, commit abc123)" in bench.results_markdown(summary, [])
    assert "Reused" not in bench.results_markdown({**summary, "reused_runs": {}}, [])


def test_kept_centralised_scores_are_reused_only_for_the_same_dependencies(bench, tmp_path):
    spec = bench.spec_for("fedavg", 2, 3, seed=0)
    key = bench.centralised_key(spec, 24, 1)
    kept = tmp_path / "centralised-seed1.json"
    assert bench.read_kept(kept, key) is None  # nothing kept yet
    kept.write_text(json.dumps({"key": key, "record": {"method": "centralised", "seed": 1}, "seconds": 5.0}))
    assert bench.read_kept(kept, key)["record"] == {"method": "centralised", "seed": 1}
    assert bench.read_kept(kept, bench.centralised_key(spec, 48, 1)) is None  # other steps
    assert bench.read_kept(kept, bench.centralised_key(spec, 24, 2)) is None  # other seed
    other = {**spec, "optimizer": {"lr": 0.01}}
    assert bench.read_kept(kept, bench.centralised_key(other, 24, 1)) is None
    kept.write_text("{not json")
    assert bench.read_kept(kept, key) is None


def test_run_commit_reads_what_the_benchmark_recorded(bench, tmp_path):
    assert bench.run_commit(tmp_path) == "unknown"  # a run from before commits were recorded
    (tmp_path / bench.SOURCE_FILE).write_text(json.dumps({"git_commit": "0123456789ab"}))
    assert bench.run_commit(tmp_path) == "0123456789ab"
    (tmp_path / bench.SOURCE_FILE).write_text("[]")
    assert bench.run_commit(tmp_path) == "unknown"
    head = bench.source_commit()
    assert head == "unknown" or len(head.removesuffix("+dirty")) == 12
