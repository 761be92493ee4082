"""benchmarks/scoring_schedule.py: the per-run summary it prints (no FL processes)."""

from __future__ import annotations

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("scoring_schedule")


def test_summary_takes_steady_rounds_and_the_selected_models_scores(bench):
    def row(eval_s=None):
        scored = {"val_global": {"dice_mean": 0.1, "eval_s": eval_s}} if eval_s is not None else {}
        return {"name": "a", "train_s": 2.0, "train": {}, **scored}

    metrics = {
        "rounds": [{"round": 1, "wall_s": 90.0, "sites": {"N": row(4.0)}}, {"round": 2, "wall_s": 10.0, "sites": {"N": row()}},
                   {"round": 3, "wall_s": 14.0, "sites": {"N": row(6.0)}}],
        "best_global": {"model_round": 2, "score": 0.3, "test_score": 0.25},
    }  # fmt: skip
    got = bench.summary(metrics)
    assert got["round_s"] == pytest.approx(12.0)  # median of rounds 2..R: round 1 pays the first imports
    assert got["train_s"] == pytest.approx(2.0) and got["eval_s"] == pytest.approx((4.0 + 0.0 + 6.0) / 3)
    assert (got["best_round"], got["validation"], got["test"]) == (2, 0.3, 0.25)
