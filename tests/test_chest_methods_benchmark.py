"""benchmarks/chest_methods.py: every method gets the chest example's spec with only its objective and aggregation
changed, and the Table 5 cells and the round-time ratio are summarised over seeds as measured (no FL processes)."""

from __future__ import annotations

import pytest
import yaml
from conftest import load_benchmark

from coordinator.spec import parse
from coordinator.testbed import chest_spec_text


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("chest_methods")


def test_every_method_runs_the_chest_example_with_its_own_objective(bench):
    example = yaml.safe_load(chest_spec_text())
    for method in bench.CHEST_METHODS:
        raw = bench.spec_for(method, 3, 7, seed=2, split_seed=4)
        spec = parse(yaml.safe_dump(raw), "spec")
        assert spec.rounds == 3 and spec.local_steps == 7 and spec.seed == 2 and raw["split"]["seed"] == 4
        assert raw["plan_args"] == example["plan_args"] and raw["optimizer"] == example["optimizer"]  # same network, patches, optimizer
        assert raw["split"]["validation"] == example["split"]["validation"] and raw["split"]["test"] == example["split"]["test"]
    assert bench.spec_for("fedavg", 1, 1, 0)["aggregator"] == "fedavg"  # the example's SCAFFOLD does not leak into the baselines
    assert bench.spec_for("condistfl", 1, 1, 0)["plan"] == "condistfl" and bench.spec_for("fedprox", 1, 1, 0)["fedprox_mu"] == 1e-6
    assert "server_optimizer" in bench.spec_for("fedopt", 1, 1, 0)
    assert bench.example_budget() == (example["rounds"], example["local_steps"])
    assert "presence_head" in bench.spec_for("condistfl", 1, 1, 0)["plan_args"]  # the example's head, by default
    assert "presence_head" not in bench.spec_for("condistfl", 1, 1, 0, presence_head=False)["plan_args"]


def _record(method: str, seed: int, own: float, ref: float) -> dict:
    sites = {"site-1": {"trained": {"left_lung": own}, "test_only": {"right_lung": ref}, "cases": 3, "test_only_cases": 3}}
    return {"method": method, "seed": seed, "site_classes": {"global": {"sites": sites, "average_excluding": own, "average_including": (own + ref) / 2}}}


def test_cells_are_summarised_over_seeds(bench):
    records = [_record("fedavg", 0, 0.8, 0.2), _record("fedavg", 1, 0.6, 0.4), _record("condistfl", 0, 0.7, 0.7)]
    assert bench.cells_of(records[0]["site_classes"]["global"]) == {
        "average_excluding": 0.8, "average_including": 0.5, "site-1: left_lung": 0.8, "site-1: right_lung*": 0.2,
    }  # fmt: skip
    stats = bench.seed_table(records, "global", ["fedavg", "condistfl"])
    assert stats["fedavg"]["site-1: left_lung"]["mean"] == pytest.approx(0.7) and stats["fedavg"]["site-1: left_lung"]["n"] == 2
    assert stats["fedavg"]["site-1: right_lung*"]["sd"] == pytest.approx(0.1414, abs=1e-4)
    assert stats["condistfl"]["average_including"]["sd"] is None and bench.cell_text(stats["condistfl"]["average_including"]) == "0.700"
    assert bench.cell_text(stats["fedavg"]["site-1: left_lung"]) == "0.700 ± 0.141" and bench.cell_text(None) == "-"


def test_the_round_time_ratio_is_taken_within_each_seed(bench):
    timing = {0: {"condistfl_round": 6.0, "fedavg_round": 5.0}, 1: {"condistfl_round": 9.0, "fedavg_round": 6.0}, 2: {"fedavg_round": 4.0}}
    ratio = bench.ratio_over_seeds(timing, "condistfl_round", "fedavg_round")
    assert ratio["values"] == [1.2, 1.5] and ratio["n"] == 2 and ratio["mean"] == pytest.approx(1.35)
