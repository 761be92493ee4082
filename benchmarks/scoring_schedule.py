"""What scoring models costs a round, and what `validate_every` frees: the main job's spec run side by
side on one testbed with ``validate_every`` 1 (every round) and k.

Both runs use the same sites, split, seed, rounds and local steps. Printed per run: the median round
time (rounds 2..R; round 1 pays the nodes' first imports and caching), the sites' mean local training
time and scoring time per round (``eval_s``, validation + test, global and local models), and the best
global model's test Dice (selected on validation; the sparser run has fewer candidates). The ratio of
round times comes from the same invocation.

    .venv/bin/python benchmarks/scoring_schedule.py --rounds 10 --steps 80 --every 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator import runs  # noqa: E402
from coordinator.report.numbers import cost_summary  # noqa: E402
from coordinator.testbed import Testbed, default_spec_text  # noqa: E402
from fedimg_core.logs import setup_logging  # noqa: E402


def summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Round time, training and scoring time per site and round, best global model's scores.

    Args:
        metrics: a run's metrics.json.

    Returns:
        ``round_s`` (median of rounds 2..R), ``train_s`` and ``eval_s`` (means per site and round),
        ``best_round``, ``validation`` and ``test`` (the best global model's selection scores).
    """
    walls = [r["wall_s"] for r in metrics.get("rounds", [])[1:]]
    cost = cost_summary(metrics, {})
    best = metrics.get("best_global") or {}
    return {
        "round_s": statistics.median(walls) if walls else None,
        "train_s": cost["train_s_mean"],
        "eval_s": cost["eval_s_mean"],
        "best_round": best.get("model_round"),
        "validation": best.get("score"),
        "test": best.get("test_score"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=80, help="local steps per round")
    ap.add_argument("--every", type=int, default=5, help="validate_every of the sparser run")
    ap.add_argument("--workdir", type=Path, default=None, help="default: .benchmarks/scoring-schedule-<time>")
    args = ap.parse_args()
    if args.every < 2:
        ap.error("--every must be at least 2 (1 is the baseline)")
    console = Console()
    workdir = (args.workdir or ROOT / ".benchmarks" / f"scoring-schedule-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    setup_logging()
    bed = Testbed(workdir, n_sites=4, out=lambda line: console.print(line, markup=False, highlight=False))
    results: dict[int, dict[str, Any]] = {}
    try:
        with console.status("setting up 4 phantom sites and their nodes"):
            bed.setup_sites()
            bed.start_nodes()
        for every in (1, args.every):
            raw = yaml.safe_load(default_spec_text())
            raw.update({"name": f"schedule-every-{every}", "rounds": args.rounds, "local_steps": args.steps, "validate_every": every})
            console.rule(f"validate_every {every}: {args.rounds} rounds x {args.steps} steps")
            if bed.run_spec(yaml.safe_dump(raw, sort_keys=False)) != 0:
                console.print(f"[red]validate_every {every}: run failed")
                return 1
            results[every] = summary(runs.read_metrics(Path(runs.list_runs(bed.home)[-1]["run_dir"])))
    finally:
        bed.teardown()
    base = results[1]["round_s"]
    t = Table(title=f"scoring schedule, {args.rounds} rounds x {args.steps} steps, 4 sites (one testbed)")
    for col in (
        "validate_every",
        "round s (median 2..R)",
        "round / every round",
        "train s / site-round",
        "scoring s / site-round",
        "best round",
        "val",
        "test",
    ):
        t.add_column(col, justify="right")
    for every, r in results.items():
        ratio = r["round_s"] / base if r["round_s"] and base else None
        cells = [r["round_s"], ratio, r["train_s"], r["eval_s"], r["best_round"], r["validation"], r["test"]]
        t.add_row(str(every), *("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in cells))
    console.print(t)
    out = workdir / "scoring_schedule.json"
    out.write_text(json.dumps({"rounds": args.rounds, "steps": args.steps, "results": {str(k): v for k, v in results.items()}}, indent=2))
    console.print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
