"""What the ConDistFL teacher costs per local step, side by side in one process.

Times one training step (forward, loss, backward, AdamW step) of the same network on the
same augmented batch with the marginal loss only (FedAvg/FedProx/FedOpt) and with
marginal + ConDist (the teacher's extra forward), for several ways of running the teacher:

    no_grad        float32, torch.no_grad() (what the plan does)
    inference      float32, torch.inference_mode() then a clone (usable in the student's loss)
    bf16           bfloat16 autocast for the teacher forward
    channels_last  teacher weights and input in channels_last_3d memory format

Variants run interleaved, repeated, and the median step time of each is divided by the
marginal step's: the ratio is the ConDistFL / FedAvg cost of local training alone
(a round also validates and communicates, which dilutes it; see federation_methods.py
for round times).

    .venv/bin/python benchmarks/condistfl_step_cost.py --size tiny --roi 32 --repeats 30
    .venv/bin/python benchmarks/condistfl_step_cost.py --size base --roi 128 --device cuda   # paper size, GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.networks import build_network, count_parameters, main_output  # noqa: E402
from pipelines.training import PartialLabelObjective, frozen_teacher  # noqa: E402
from preprocessing.schema import load_schema  # noqa: E402


def teacher_forward(variant: str, teacher, x, device: str):
    if variant == "no_grad":
        with torch.no_grad():
            return main_output(teacher(x), 3)
    if variant == "inference":
        with torch.inference_mode():
            out = main_output(teacher(x), 3)
        return out.clone()
    if variant == "bf16":
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
            return main_output(teacher(x), 3).float()
    if variant == "channels_last":
        with torch.no_grad():
            return main_output(teacher(x.contiguous(memory_format=torch.channels_last_3d)), 3).contiguous()
    raise ValueError(variant)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--network", default="mednext")
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--roi", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2, help="patches per step")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="no_grad,inference,bf16,channels_last")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    schema = load_schema()
    device = args.device
    torch.manual_seed(0)
    net = build_network(args.network, size=args.size, out_channels=schema.num_classes, deep_supervision=args.network != "basic_unet").to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    objective = PartialLabelObjective(schema, [3, 4], temperature=0.5)
    x = torch.randn(args.batch, 1, args.roi, args.roi, args.roi, device=device)
    y = torch.randint(0, schema.num_classes, (args.batch, 1, args.roi, args.roi, args.roi), device=device)
    variants = ["marginal"] + [v.strip() for v in args.variants.split(",") if v.strip()]
    teachers = {v: frozen_teacher(net) for v in variants if v != "marginal"}
    if "channels_last" in teachers:
        teachers["channels_last"] = teachers["channels_last"].to(memory_format=torch.channels_last_3d)

    def step(variant: str) -> float:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = net(x)
        t = None if variant == "marginal" else teacher_forward(variant, teachers[variant], x, device)
        loss, _ = objective(out, y, t, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        return time.perf_counter() - t0

    for v in variants:  # warm-up: first-shape kernels, allocator
        for _ in range(3):
            step(v)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v in variants:  # interleaved, so machine noise hits every variant alike
            times[v].append(step(v))
    med = {v: statistics.median(ts) for v, ts in times.items()}
    table = Table(title=f"{args.network}-{args.size} ({count_parameters(net):,} params), {args.batch} x {args.roi}^3, {device}, "
                        f"{torch.get_num_threads()} threads, median of {args.repeats}")  # fmt: skip
    for col in ("variant", "step ms", "ratio to marginal"):
        table.add_column(col, justify="right")
    for v in variants:
        table.add_row(v, f"{med[v] * 1000:.1f}", f"{med[v] / med['marginal']:.3f}")
    console.print(table)
    result = {"config": vars(args) | {"json": None}, "median_s": med, "ratio": {v: med[v] / med["marginal"] for v in variants}}
    if device == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        console.print(f"peak GPU memory: {result['peak_memory_gb']:.2f} GB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
