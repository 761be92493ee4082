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
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.plans import model_args_for  # noqa: E402
from coordinator.testbed import Testbed, default_spec_text  # noqa: E402
from pipelines.augment import sampler_for  # noqa: E402
from pipelines.training import PartialLabelObjective, build_model, parse_plan_args  # noqa: E402
from pipelines.transforms import deterministic_transforms  # noqa: E402
from preprocessing.dataset import load_dataset  # noqa: E402
from preprocessing.schema import parse_schema  # noqa: E402


def local_round_seconds(bed: Testbed, spec: dict) -> list[float]:
    """Per site: seconds for `local_steps` steps of the same plan (marginal loss, same
    patches and augmentation), in-process, no FL."""
    margs = model_args_for(spec["plan"], spec["plan_args"])
    schema = parse_schema(margs["schema_definition"], "spec")
    settings = parse_plan_args(margs, schema)
    out = []
    for site in bed.sites:
        ds = load_dataset(site.data_dir / "ct")
        chain = deterministic_transforms(schema, ds.modality, spacing=settings.spacing)
        volumes = [chain({"image": str(c.image), "label": str(c.label)}) for c in ds.cases]
        volumes = [(v["image"].as_tensor().float(), v["label"].as_tensor()) for v in volumes]
        torch.manual_seed(0)
        net = build_model(settings)
        opt = torch.optim.AdamW(net.parameters(), lr=spec["optimizer"]["lr"])
        objective = PartialLabelObjective(schema, ds.labeled_classes, settings.temperature, settings.spatial_dims)
        sampler = sampler_for(settings)
        t0 = time.perf_counter()
        for step in range(spec["local_steps"]):
            x, y = sampler(*volumes[step % len(volumes)])
            loss, _ = objective(net(x), y)
            opt.zero_grad()
            loss.backward()
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
    spec.update(rounds=args.rounds, local_steps=args.steps, name="overhead-bench", split={"validation": 0, "test": 0}, plan="marginal", aggregator="fedavg")
    spec["plan_args"]["gin"] = None  # the in-process baseline steps plain AdamW without GIN: the run must too
    spec["sites"] = {"tags": ["fedimg-demo"], "min_sites": args.sites, "wait_s": 180}

    with tempfile.TemporaryDirectory(prefix="fedimg-bench-") as tmp:
        bed = Testbed(Path(tmp), n_sites=args.sites, out=lambda m: console.log(m) if "round" in m or "ready" in m else None)
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
