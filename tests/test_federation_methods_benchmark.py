"""benchmarks/federation_methods.py: every method and training seed gets the same split (no FL processes)."""

from __future__ import annotations

import pytest
import yaml
from conftest import load_benchmark

from coordinator.spec import parse


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("federation_methods")


def test_seeds_vary_training_not_the_split(bench):
    specs = {(m, seed): parse(yaml.safe_dump(bench.spec_for(m, 2, 3, seed, split_seed=5)), "spec") for m in bench.METHODS for seed in (0, 1)}
    assert {s.seed for (_, seed), s in specs.items() if seed == 1} == {1}
    assert all(s.split == {"validation": 0.25, "test": 0.25, "seed": 5} for s in specs.values())  # the demo spec's shares
    assert len({s.name for s in specs.values()}) == len(specs)  # one run name per method and seed
    assert parse(yaml.safe_dump(bench.spec_for("fedavg", 2, 3, 0)), "spec").split["seed"] == 0


def test_seed_options(bench):
    assert bench.parse_seeds("0, 2,2,1") == [0, 2, 1]
    for bad in ("", "-1", "a"):
        with pytest.raises(ValueError):
            bench.parse_seeds(bad)
    assert bench.run_label("fedavg", 1, [1]) == "fedavg"
    assert bench.run_label("fedavg", 1, [0, 1]) == "fedavg seed 1"
