"""ConDistFL against its baselines on the phantom federation, side by side in one run.

One testbed (4 phantom hospitals, each labelling one organ group, real Fed-BioMed nodes on
loopback, plus an out-of-federation test set in another contrast phase) runs every method
with the same backbone, rounds, local steps, seed and data:

    fedavg      marginal loss, FedAvg
    fedprox     marginal loss, FedAvg + proximal term (mu 1e-6, the paper's)
    fedopt      marginal loss, server momentum SGD (lr 1.0, momentum 0.6)
    condistfl   marginal loss + conditional distillation from the received global model
    standalone  marginal loss, every site alone (no aggregation)   [--methods to include]

Each run is scored out of federation (`coordinator evaluate`), gets its own report, and
the comparison page (`compare_runs`) collects global and local per-class Dice in and out
of federation, traffic and wall time. The ConDistFL / FedAvg round-time ratio is printed
from the same run (median of the steady rounds, round 1 excluded: it pays the nodes'
first imports and data caching).

    .venv/bin/python benchmarks/federation_methods.py --rounds 10 --steps 80
    .venv/bin/python benchmarks/federation_methods.py --rounds 3 --steps 10 --methods fedavg,condistfl   # quick look

The numbers are printed as measured, whichever method wins.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator import runs  # noqa: E402
from coordinator.report import compare_runs  # noqa: E402
from coordinator.testbed import Testbed, default_spec_text  # noqa: E402
from fedimg_core.logs import setup_logging  # noqa: E402

METHODS = {
    "fedavg": {"plan": "marginal"},
    "fedprox": {"plan": "marginal", "fedprox_mu": 1e-6},
    "fedopt": {"plan": "marginal", "server_optimizer": {"name": "momentum", "lr": 1.0, "momentum": 0.6}},
    "condistfl": {"plan": "condistfl"},
    "standalone": {"plan": "marginal", "mode": "standalone"},
}


def spec_for(method: str, rounds: int, steps: int, seed: int) -> dict:
    raw = yaml.safe_load(default_spec_text())
    raw.update({"name": f"bench-{method}", "rounds": rounds, "local_steps": steps, "seed": seed, **METHODS[method]})
    return raw


def steady_round_s(metrics: dict) -> float | None:
    walls = [r["wall_s"] for r in metrics.get("rounds", [])[1:]]
    return statistics.median(walls) if walls else None


def mean_step_s(metrics: dict) -> float | None:
    steps = [row["train"]["step_s"] for r in metrics.get("rounds", [])[1:] for row in r["sites"].values() if "step_s" in row.get("train", {})]
    return statistics.mean(steps) if steps else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=80, help="local steps per round")
    ap.add_argument("--methods", default="fedavg,fedprox,fedopt,condistfl")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="default: .benchmarks/federation-methods-<time>")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    console = Console()
    workdir = (args.workdir or ROOT / ".benchmarks" / f"federation-methods-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    setup_logging()  # the testbed's progress lines
    bed = Testbed(workdir, n_sites=4, out=lambda line: console.print(line, markup=False, highlight=False),
                  oof_phase="non_contrast")  # fmt: skip
    run_dirs: dict[str, Path] = {}
    t_start = time.monotonic()
    try:
        with console.status("setting up 4 phantom sites, the out-of-federation set and the nodes"):
            bed.setup_sites()
            bed.start_nodes()
        for method in methods:
            console.rule(f"{method}: {args.rounds} rounds x {args.steps} steps")
            code = bed.run_spec(yaml.safe_dump(spec_for(method, args.rounds, args.steps, args.seed), sort_keys=False))
            if code != 0:
                console.print(f"[red]{method}: run failed ({code})")
                return 1
            code = bed.evaluate_and_report()
            if code != 0:
                console.print(f"[red]{method}: evaluation failed ({code})")
                return 1
            run_dirs[method] = Path(runs.list_runs(bed.home)[-1]["run_dir"])
    finally:
        bed.teardown()

    out = compare_runs(list(run_dirs.values()), workdir / "comparison", labels=list(run_dirs))
    table_json = json.loads((out / "comparison.json").read_text())
    console.print((out / "comparison.md").read_text(), markup=False, highlight=False)

    metrics = {m: runs.read_metrics(d) for m, d in run_dirs.items()}
    t = Table(title="round time (steady rounds 2..R, median) and local step time (mean)")
    for col in ("method", "round s", "step s", "round / fedavg", "step / fedavg"):
        t.add_column(col, justify="right")
    base_round = steady_round_s(metrics["fedavg"]) if "fedavg" in metrics else None
    base_step = mean_step_s(metrics["fedavg"]) if "fedavg" in metrics else None
    for m, mt in metrics.items():
        rs, ss = steady_round_s(mt), mean_step_s(mt)
        t.add_row(m, f"{rs:.2f}" if rs else "-", f"{ss:.3f}" if ss else "-",
                  f"{rs / base_round:.3f}" if rs and base_round else "-", f"{ss / base_step:.3f}" if ss and base_step else "-")  # fmt: skip
    console.print(t)
    summary = {
        "rounds": args.rounds, "steps": args.steps, "seed": args.seed, "methods": methods,
        "run_dirs": {m: str(d) for m, d in run_dirs.items()}, "comparison": table_json,
        "round_s": {m: steady_round_s(mt) for m, mt in metrics.items()},
        "step_s": {m: mean_step_s(mt) for m, mt in metrics.items()},
        "total_wall_s": time.monotonic() - t_start,
    }  # fmt: skip
    if "condistfl" in metrics and base_round:
        summary["condistfl_over_fedavg_round_time"] = summary["round_s"]["condistfl"] / base_round
        console.print(f"ConDistFL / FedAvg round time (same run): {summary['condistfl_over_fedavg_round_time']:.3f}")
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"comparison page: {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
