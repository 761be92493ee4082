"""Bytes on the wire per round, by transfer precision, against the paper's 2 x sites x float32 model.

Runs a real federation on loopback (Fed-BioMed node processes, the coordinator's gRPC server)
once per ``transfer.precision`` on the same sites, FedAvg, and reads the bytes Fed-BioMed's
server sent and received in each round (`coordinator.fedbiomed_hooks.WireCounter`). Prints, per
precision, bytes per round / (2 x sites x the model's float32 bytes) next to the goal (<= 1.02 in
fp32, <= 0.51 in 16 bits), the bytes against the fp32 run's, and what the bytes beyond the model
are per message. ``--aggregator scaffold`` runs the main job's SCAFFOLD instead: its states (one
value per parameter, each way) travel beside the model in the same precision, so a round carries
about twice the model; the 16-bit goal is then half the fp32 run's bytes.

``--large`` also sends a ~100 M-parameter model (a 2D BasicUNet, widths 232 ... 1856) through the
same transport, two rounds on 2 sites, fp32 and bf16: the bytes, the round's wall time and
what the transfers took, checked by the SHA-256 each model travels with.

    .venv/bin/python benchmarks/wire_bytes.py [--sites 4] [--rounds 3] [--aggregator fedavg|scaffold] [--large]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.testbed import Testbed, default_spec_text  # noqa: E402

LAST_LINES: collections.deque[str] = collections.deque(maxlen=40)  # the coordinator's last lines, printed when a run fails
GOALS = {"fp32": 1.02, "bf16": 0.51, "fp16": 0.51}
LARGE_FEATURES = [232, 232, 464, 928, 1856, 232]  # BasicUNet 2D: ~104 M parameters (2D: a step on a 32 x 32 slice patch stays cheap)


def spec_for(precision: str, rounds: int, steps: int, large: bool, aggregator: str = "fedavg") -> dict[str, Any]:
    """The demo spec, shortened, over equal weights, with the given transfer precision and aggregator."""
    raw = yaml.safe_load(default_spec_text())
    raw.update(name=f"wire-{'large-' if large else ''}{aggregator}-{precision}", rounds=rounds, local_steps=steps, aggregator=aggregator, weights="equal",
               transfer={"precision": precision}, split={"validation": 0.0, "test": 0.0, "seed": 0})  # fmt: skip
    raw["plan_args"]["gin"] = None
    if large:
        raw["plan_args"].update(network={"name": "basic_unet", "spatial_dims": 2, "features": LARGE_FEATURES}, roi_size=[32, 32],
                                patches_per_volume=1)  # fmt: skip
        raw["approval"] = {"request": True, "wait_s": 300}
    return raw


def run_one(bed: Testbed, spec: dict[str, Any]) -> dict[str, Any]:
    """Run a spec on the testbed; its metrics.json."""
    t0 = time.monotonic()
    code = bed.run_spec(yaml.safe_dump(spec))
    wall = time.monotonic() - t0
    if code != 0:
        raise SystemExit(f"{spec['name']}: the federated run failed ({code}); the coordinator's last lines:\n" + "\n".join(LAST_LINES))
    (run_dir,) = [p for p in (bed.home / "runs").iterdir() if f"-{spec['name']}-" in p.name]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["_wall_s"] = wall
    return metrics


def per_round(metrics: dict[str, Any], sites: int, skip_first: bool = False) -> dict[str, float]:
    """Bytes per training round (the last round also carries the final validation request: left out when there are others;
    ``skip_first``: SCAFFOLD's round 1, whose state to the sites is still a scalar, too)."""
    rounds = metrics["rounds"]
    steady = rounds[1 if skip_first else 0 : -1] or rounds[:-1] or rounds
    to_sites = statistics.median(r["bytes"]["to_sites"] for r in steady)
    from_sites = statistics.median(r["bytes"]["from_sites"] for r in steady)
    model = metrics["model"]["bytes"]
    return {
        "to_sites": to_sites,
        "from_sites": from_sites,
        "total": to_sites + from_sites,
        "model_bytes": model,
        "parameters": metrics["model"]["parameters"],
        "ratio": (to_sites + from_sites) / (2 * sites * model),
        "round_s": statistics.median(r["wall_s"] for r in steady),
    }


def table(rows: dict[str, dict[str, float]], sites: int, aggregator: str = "fedavg") -> None:
    """Print one row per precision; with SCAFFOLD the goal applies to the bytes against the fp32 run's."""
    units = 2 if aggregator == "scaffold" else 1  # the model, and SCAFFOLD's state of the same size
    fp32 = rows.get("fp32", {}).get("total")
    print(f"{'precision':<10}{'to sites':>16}{'from sites':>16}{'total':>16}{'ratio':>8}{'vs fp32':>9}{'goal':>7}  "
          f"{'beyond model' + (' + state' if units == 2 else '') + ', per message':>38}{'round s':>9}")  # fmt: skip
    for precision, row in rows.items():
        payload = units * row["model_bytes"] * (0.5 if precision != "fp32" else 1.0)
        extra = (row["total"] - 2 * sites * payload) / (2 * sites)
        against_fp32 = row["total"] / fp32 if fp32 else float("nan")
        if units == 1:
            goal, measured = GOALS[precision], row["ratio"]
        else:  # SCAFFOLD: half the fp32 run's bytes in 16 bits (no goal for fp32 itself)
            goal, measured = (GOALS[precision], against_fp32) if precision != "fp32" else (float("nan"), float("nan"))
        ok = "" if goal != goal else ("ok" if measured <= goal else "MISSED")
        goal_text = "-" if goal != goal else "<=" + format(goal, ".2f")
        print(f"{precision:<10}{row['to_sites']:>16,.0f}{row['from_sites']:>16,.0f}{row['total']:>16,.0f}{row['ratio']:>8.3f}{against_fp32:>9.3f}"
              f"{goal_text:>7}  {extra:>30,.0f} bytes {ok:<6}{row['round_s']:>9.1f}")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="local steps per round")
    ap.add_argument("--precisions", default="fp32,bf16,fp16", help="the small model's runs (empty: none)")
    ap.add_argument("--aggregator", choices=["fedavg", "scaffold"], default="fedavg", help="the small model's runs' aggregator")
    ap.add_argument("--large", action="store_true", help="also send a ~100 M-parameter model (1 round, 2 sites, fp32 and bf16)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedimg-wire-") as tmp:
        if precisions:
            bed = Testbed(Path(tmp) / "small", n_sites=args.sites, out=LAST_LINES.append)
            try:
                print(f"setting up {args.sites} sites ...", flush=True)
                bed.setup_sites()
                bed.start_nodes()
                rows = {}
                for precision in precisions:
                    print(f"{precision}: {args.rounds} rounds of {args.steps} steps ...", flush=True)
                    rows[precision] = per_round(run_one(bed, spec_for(precision, args.rounds, args.steps, large=False, aggregator=args.aggregator)), args.sites,
                                               skip_first=args.aggregator == "scaffold")  # fmt: skip
            finally:
                bed.teardown()
            first = next(iter(rows.values()))
            counted = f"rounds 2..{args.rounds - 1}" if args.aggregator == "scaffold" and args.rounds > 2 else f"rounds 1..{max(1, args.rounds - 1)}"
            print(f"\nbytes per round on the wire: {args.sites} sites, {first['parameters']:,} parameters "
                  f"({first['model_bytes']:,} bytes in float32); {args.aggregator}; median over {counted}; "
                  f"ratio = total / (2 x sites x float32 model)")  # fmt: skip
            table(rows, args.sites, args.aggregator)
            out["small"] = rows
        if args.large:
            big = Testbed(Path(tmp) / "large", n_sites=2, out=LAST_LINES.append)
            try:
                print("\nsetting up 2 sites for the ~100 M-parameter model ...", flush=True)
                big.setup_sites()
                big.start_nodes()
                large = {}
                for precision in ("fp32", "bf16"):
                    print(f"{precision}: 2 rounds of 1 step ...", flush=True)  # round 1 alone: round 2 also sends the final validation
                    metrics = run_one(big, spec_for(precision, 2, 1, large=True))
                    row = per_round(metrics, 2)
                    row["run_s"] = metrics["_wall_s"]
                    large[precision] = row
            finally:
                big.teardown()
            p = next(iter(large.values()))
            print(f"\n~100 M parameters through the real transport (loopback, 2 sites, round 1 of 2): {p['parameters']:,} parameters, "
                  f"{p['model_bytes'] / 1e6:,.0f} MB in float32; every model checked by its SHA-256 on arrival")  # fmt: skip
            table(large, 2)
            for precision, row in large.items():
                # the time one 4 MB-chunked message takes at a hospital's link speed, against Fed-BioMed's 300 s resend limit
                per_message = row["from_sites"] / 2  # one site's update
                print(f"{precision}: one model message {per_message / 1e6:,.0f} MB: {per_message * 8 / 100e6:,.0f} s at 100 Mbit/s, "
                      f"{per_message * 8 / 20e6:,.0f} s at 20 Mbit/s (Fed-BioMed discards a message that must be resent after 300 s)")  # fmt: skip
            out["large"] = large
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
