"""Orchestration overhead per round: a real Fed-BioMed federation on loopback vs the same
local training done in-process, side by side in one run.

For each round the coordinator measures the round's wall time; each node reports the time
it spent in its training routine. Overhead = round wall time - the slowest site's training
time (what the round would take with free, instant orchestration). The in-process
baseline trains the same network for the same steps on each site's data with no FL at all.

    .venv/bin/python benchmarks/orchestration_overhead.py --sites 4 --rounds 6 --steps 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from monai.losses import DiceCELoss
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.testbed import Testbed, default_spec_text  # noqa: E402
from pipelines.networks import build_network  # noqa: E402
from pipelines.segmentation import preprocess_case, random_flip_batch  # noqa: E402
from preprocessing.dataset import load_dataset  # noqa: E402


def local_round_seconds(bed: Testbed, spec: dict) -> list[float]:
    """Per site: seconds for `local_steps` optimizer steps of the same network, in-process."""
    out = []
    for site in bed.sites:
        ds = load_dataset(site.data_dir / "demo")
        items = [preprocess_case(str(c.image), str(c.label)) for c in ds.cases]
        torch.manual_seed(0)
        net = build_network(out_channels=spec["plan_args"]["num_classes"], **spec["plan_args"]["network"])
        opt = torch.optim.Adam(net.parameters(), lr=spec["optimizer"]["lr"])
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        bs = spec["batch_size"]
        t0 = time.perf_counter()
        for step in range(spec["local_steps"]):
            batch = [items[(step * bs + j) % len(items)] for j in range(bs)]
            x, y = torch.stack([b[0] for b in batch]), torch.stack([b[1] for b in batch])
            x, y = random_flip_batch(x, y)
            opt.zero_grad()
            loss_fn(net(x), y).backward()
            opt.step()
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4, help="local optimizer steps per round")
    ap.add_argument("--json", type=Path, default=None, help="also write the measurements here")
    args = ap.parse_args()
    console = Console()

    spec = yaml.safe_load(default_spec_text())
    spec.update(rounds=args.rounds, local_steps=args.steps, name="overhead-bench", test_ratio=0.0)
    spec["sites"] = {"tags": ["fedimg-demo"], "min_sites": args.sites, "wait_s": 180}

    with tempfile.TemporaryDirectory(prefix="fedimg-bench-") as tmp:
        bed = Testbed(Path(tmp), n_sites=args.sites, log=lambda m: console.log(m) if "round" in m or "ready" in m else None)
        try:
            with console.status("setting up sites and nodes"):
                bed.setup_sites()
                bed.start_nodes()
            code = bed.run_spec(yaml.safe_dump(spec))
            if code != 0:
                console.print(f"[red]federated run failed ({code})")
                return 1
            (run_dir,) = (Path(tmp) / "coordinator" / "runs").iterdir()
            metrics = json.loads((run_dir / "metrics.json").read_text())
            with console.status("in-process baseline"):
                local = local_round_seconds(bed, spec)
        finally:
            bed.teardown()

    table = Table(title=f"orchestration overhead per round ({args.sites} sites, {args.steps} steps, "
                        f"{metrics['model']['parameters']} params)")  # fmt: skip
    for col in ("round", "round wall s", "slowest site train s", "overhead s", "wall / slowest train"):
        table.add_column(col, justify="right")
    rows = []
    for r in metrics["rounds"]:
        slowest = max(s["train_s"] for s in r["sites"].values())
        rows.append((r["round"], r["wall_s"], slowest, r["wall_s"] - slowest))
        table.add_row(str(r["round"]), f"{r['wall_s']:.2f}", f"{slowest:.2f}", f"{r['wall_s'] - slowest:.2f}",
                      f"{r['wall_s'] / slowest:.2f}" if slowest > 0 else "-")  # fmt: skip
    console.print(table)
    steady = rows[1:] or rows  # round 1 also pays the nodes' first imports and data caching
    med_wall = statistics.median(r[1] for r in steady)
    med_over = statistics.median(r[3] for r in steady)
    seq_local = sum(local)
    summary = {
        "sites": args.sites,
        "steps": args.steps,
        "median_round_wall_s": med_wall,
        "median_overhead_s": med_over,
        "in_process_training_s_all_sites_sequential": seq_local,
        "in_process_training_s_slowest_site": max(local),
        "ratio_round_wall_over_in_process_sequential": med_wall / seq_local,
        "first_round_wall_s": rows[0][1],
    }
    console.print(
        f"steady rounds (2..{len(rows)}): median wall {med_wall:.2f}s, median overhead {med_over:.2f}s per round\n"
        f"same training in-process, no FL: {seq_local:.2f}s for all {args.sites} sites one after another "
        f"(slowest site {max(local):.2f}s)\n"
        f"ratio federated round / in-process training of all sites: {summary['ratio_round_wall_over_in_process_sequential']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rounds": rows, "local": local}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
