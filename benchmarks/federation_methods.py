"""ConDistFL against its baselines on the phantom federation, side by side in one run.

One testbed (4 phantom hospitals, each labelling one organ group, real Fed-BioMed nodes on
loopback, plus an out-of-federation test set in another contrast phase) runs every method
with the same backbone, rounds, local steps, seeds, data and split (the demo spec's
validation / test shares, seeded by ``--split-seed``: every method and every training seed
holds out the same cases at every site):

    fedavg      marginal loss, FedAvg
    fedprox     marginal loss, FedAvg + proximal term (mu 1e-6, the paper's)
    fedopt      marginal loss, server momentum SGD (lr 1.0, momentum 0.6)
    condistfl   marginal loss + conditional distillation from the received global model
    standalone  marginal loss, every site alone (no aggregation)   [--methods to include]

Each run is scored out of federation (`coordinator evaluate`), gets its own report, and
the comparison page (`compare_runs`, over every run) collects global and local per-class Dice
in federation (on the sites' test cases; the models were selected on their validation cases)
and out of federation, traffic and wall time. With several training seeds (``--seeds``),
every method runs once per seed and, per method, the mean, the sample standard deviation and
the number of runs of the best global model's test Dice (mean over classes) are printed and
written to benchmark.json (``seeds``). The ConDistFL / FedAvg round-time ratio is printed from
the same benchmark (median of the steady rounds, round 1 excluded: it pays the nodes' first
imports and data caching; with several seeds, the first seed's runs).

    .venv/bin/python benchmarks/federation_methods.py --rounds 10 --steps 80
    .venv/bin/python benchmarks/federation_methods.py --rounds 10 --steps 80 --seeds 0,1,2       # mean +- sd over seeds
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
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator import runs  # noqa: E402
from coordinator.report import compare_runs, seed_summary  # noqa: E402
from coordinator.testbed import Testbed, default_spec_text  # noqa: E402
from fedimg_core.logs import setup_logging  # noqa: E402

METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"plan": "marginal"},
    "fedprox": {"plan": "marginal", "fedprox_mu": 1e-6},
    "fedopt": {"plan": "marginal", "server_optimizer": {"name": "momentum", "lr": 1.0, "momentum": 0.6}},
    "condistfl": {"plan": "condistfl"},
    "standalone": {"plan": "marginal", "mode": "standalone"},
}


def spec_for(method: str, rounds: int, steps: int, seed: int, split_seed: int = 0) -> dict[str, Any]:
    """The demo spec for one method and training seed, its split seeded by ``split_seed``.

    Args:
        method: a key of `METHODS`.
        rounds: federated rounds.
        steps: local steps per round.
        seed: the training seed (weights, patches, augmentation).
        split_seed: the split's seed (the same for every method and training seed).

    Returns:
        The spec as a mapping.
    """
    raw: dict[str, Any] = yaml.safe_load(default_spec_text())
    split = dict(raw.get("split") or {"validation": 0.25, "test": 0.25})
    raw.pop("test_ratio", None)  # an older demo spec: its split is the one below
    raw.update({"name": f"bench-{method}-seed{seed}", "rounds": rounds, "local_steps": steps, "seed": seed, **METHODS[method]})
    raw["split"] = {**split, "seed": split_seed}
    return raw


def run_label(method: str, seed: int, seeds: list[int]) -> str:
    """The method's name on the comparison page: ``fedavg``, or ``fedavg seed 1`` with several seeds."""
    return method if len(seeds) == 1 else f"{method} seed {seed}"


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (distinct, in order).

    Raises:
        ValueError: a seed that is not an integer >= 0, or none at all.
    """
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds: integers >= 0, comma-separated (got {text!r})")
    return list(dict.fromkeys(seeds))


def steady_round_s(metrics: dict[str, Any]) -> float | None:
    walls = [r["wall_s"] for r in metrics.get("rounds", [])[1:]]
    return statistics.median(walls) if walls else None


def mean_step_s(metrics: dict[str, Any]) -> float | None:
    steps = [row["train"]["step_s"] for r in metrics.get("rounds", [])[1:] for row in r["sites"].values() if "step_s" in row.get("train", {})]
    return statistics.mean(steps) if steps else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=80, help="local steps per round")
    ap.add_argument("--methods", default="fedavg,fedprox,fedopt,condistfl")
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated: every method runs once per seed")
    ap.add_argument("--split-seed", type=int, default=0, help="the split's seed: the same held-out cases for every method and seed")
    ap.add_argument("--workdir", type=Path, default=None, help="default: .benchmarks/federation-methods-<time>")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        ap.error(str(e))
    if args.split_seed < 0:
        ap.error("--split-seed: an integer >= 0")
    console = Console()
    workdir = (args.workdir or ROOT / ".benchmarks" / f"federation-methods-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    setup_logging()  # the testbed's progress lines
    bed = Testbed(workdir, n_sites=4, out=lambda line: console.print(line, markup=False, highlight=False),
                  oof_phase="non_contrast")  # fmt: skip
    run_dirs: dict[str, Path] = {}
    method_of: dict[str, str] = {}
    t_start = time.monotonic()
    try:
        with console.status("setting up 4 phantom sites, the out-of-federation set and the nodes"):
            bed.setup_sites()
            bed.start_nodes()
        for seed in seeds:
            for method in methods:
                label = run_label(method, seed, seeds)
                console.rule(f"{label}: {args.rounds} rounds x {args.steps} steps, split seed {args.split_seed}")
                spec = spec_for(method, args.rounds, args.steps, seed, args.split_seed)
                code = bed.run_spec(yaml.safe_dump(spec, sort_keys=False))
                if code != 0:
                    console.print(f"[red]{label}: run failed ({code})")
                    return 1
                code = bed.evaluate_and_report()
                if code != 0:
                    console.print(f"[red]{label}: evaluation failed ({code})")
                    return 1
                run_dirs[label] = Path(runs.list_runs(bed.home)[-1]["run_dir"])
                method_of[label] = method
    finally:
        bed.teardown()

    out = compare_runs(list(run_dirs.values()), workdir / "comparison", labels=list(run_dirs))
    table_json = json.loads((out / "comparison.json").read_text())
    console.print((out / "comparison.md").read_text(), markup=False, highlight=False)
    by_seed = seed_summary(table_json["runs"], method_of)
    t = Table(title=f"best global model, test cases: Dice (mean over classes) over training seeds {', '.join(map(str, seeds))}")
    for col in ("method", "mean", "sd", "n", "runs without test cases"):
        t.add_column(col, justify="right")
    for m, entry in by_seed.items():
        t.add_row(m, _fmt(entry["mean"]), _fmt(entry["sd"]), str(entry["n"]), str(entry["without_test"]))
    console.print(t)

    first = {method_of[label]: label for label in reversed(list(run_dirs))}  # each method's run of the first seed
    metrics = {m: runs.read_metrics(run_dirs[label]) for m, label in sorted(first.items(), key=lambda kv: methods.index(kv[0]))}
    t = Table(title=f"round time (steady rounds 2..R, median) and local step time (mean), seed {seeds[0]}")
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
        "rounds": args.rounds, "steps": args.steps, "seeds": seeds, "split_seed": args.split_seed, "methods": methods,
        "run_dirs": {label: str(d) for label, d in run_dirs.items()}, "method_of": method_of, "comparison": table_json,
        "test_dice_over_seeds": by_seed,
        "round_s": {m: steady_round_s(mt) for m, mt in metrics.items()},
        "step_s": {m: mean_step_s(mt) for m, mt in metrics.items()},
        "total_wall_s": time.monotonic() - t_start,
    }  # fmt: skip
    if "condistfl" in metrics and base_round:
        summary["condistfl_over_fedavg_round_time"] = summary["round_s"]["condistfl"] / base_round
        console.print(f"ConDistFL / FedAvg round time (same benchmark, seed {seeds[0]}): {summary['condistfl_over_fedavg_round_time']:.3f}")
    (out / "benchmark.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"comparison page: {out / 'index.html'}")
    return 0


def _fmt(v: float | None) -> str:
    return f"{v:.3f}" if v is not None else "-"


if __name__ == "__main__":
    sys.exit(main())
