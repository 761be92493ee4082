"""One script for the device measurements of issue 22: CPU here, a GPU wherever one is at hand.

Three side-by-side tables, each measured on one device in one run, through the plans' own code
(`pipelines.training`, `pipelines.device`, `pipelines.evaluation`, `pipelines.factory.training`):

    step      a ConDistFL local step vs a FedAvg (marginal) step: forward under the site's
              precision, the loss, backward, AdamW; MedNeXt sizes x patch sides; median step
              time, peak memory, and the ratio ConDistFL / FedAvg (the paper's +10.2 %, 3D)
    infer     sliding-window inference of one volume (the plans' validation path): seconds
              and peak memory per volume, per network size
    factory   data-factory updates per second (D and G alternating, with their lazy
              regularisers) at each resolution, batch 16

Every configuration runs in a child process of its own, so the CPU's peak memory (the child's
maximum resident set) belongs to that configuration alone; on CUDA the peak is torch's
``max_memory_allocated``. Variants of one table row (FedAvg and ConDistFL) run interleaved in
the same child so the machine's noise hits both alike.

    .venv/bin/python benchmarks/device_suite.py                         # CPU defaults (small: minutes)
    .venv/bin/python benchmarks/device_suite.py --device cuda --full    # tiny/small/base x 64/128, 64 and 512 px
    .venv/bin/python benchmarks/device_suite.py --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_DEFAULTS = {"sizes": "tiny,small", "rois": "32", "infer_shape": "96,96,64", "factory_res": "64", "repeats": 5}
GPU_FULL = {"sizes": "tiny,small,base", "rois": "64,128", "infer_shape": "256,256,160", "factory_res": "64,512", "repeats": 10}


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_step(size: str, roi: int, device_name: str, precision_name: str, repeats: int) -> dict[str, Any]:
    """FedAvg (marginal) and ConDistFL steps of one MedNeXt size and patch side, interleaved."""
    import torch

    from pipelines.device import autocast, precision_for, resolve_device
    from pipelines.networks import build_network, count_parameters
    from pipelines.training import PartialLabelObjective, frozen_teacher, teacher_logits
    from preprocessing.schema import load_schema

    device = resolve_device(device_name)
    precision = precision_for(device, precision_name)
    schema = load_schema()
    torch.manual_seed(0)
    net = build_network("mednext", size=size, out_channels=schema.num_classes, deep_supervision=True).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    objective = PartialLabelObjective(schema, [3, 4], temperature=0.5)
    x = torch.randn(2, 1, roi, roi, roi, device=device)  # the plans' 2 patches per step
    y = torch.randint(0, schema.num_classes, (2, 1, roi, roi, roi), device=device)
    teacher = frozen_teacher(net)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN pick its kernels once

    def step(distill: bool) -> float:
        _sync(device.type)
        t0 = time.perf_counter()
        with autocast(device, precision):
            out = net(x)
            t = teacher_logits(teacher, x, 3) if distill else None
            loss, _ = objective(out, y, t, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.float().backward()
        opt.step()
        _sync(device.type)
        return time.perf_counter() - t0

    for distill in (False, True, False, True):  # warm-up: kernels, allocator, cuDNN autotuning
        step(distill)
    times: dict[str, list[float]] = {"fedavg": [], "condistfl": []}
    peaks: dict[str, float] = {}
    for name, distill in (("fedavg", False), ("condistfl", True)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step(distill)
        peaks[name] = _peak_mb(device.type)
    for _ in range(repeats):
        for name, distill in (("fedavg", False), ("condistfl", True)):
            times[name].append(step(distill))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "table": "step", "size": size, "roi": roi, "params": count_parameters(net), "precision": precision.name,
        "fedavg_s": med["fedavg"], "condistfl_s": med["condistfl"], "ratio": med["condistfl"] / med["fedavg"],
        "fedavg_peak_mb": peaks["fedavg"], "condistfl_peak_mb": peaks["condistfl"], "n": repeats,
        "peak_note": "process max RSS" if device.type == "cpu" else "torch max allocated",
    }  # fmt: skip


def measure_infer(size: str, shape: tuple[int, int, int], roi: int, device_name: str, repeats: int) -> dict[str, Any]:
    """Sliding-window inference of one volume, as the plans score validation and test cases."""
    import torch

    from pipelines.device import resolve_device
    from pipelines.evaluation import predict_volume
    from pipelines.networks import build_network, main_output
    from preprocessing.schema import load_schema

    device = resolve_device(device_name)
    schema = load_schema()
    torch.manual_seed(0)
    net = build_network("mednext", size=size, out_channels=schema.num_classes, deep_supervision=True).to(device)
    image = torch.randn(1, *shape)  # on the CPU, as the plans hold volumes; windows move to the device

    def once() -> float:
        _sync(device.type)
        t0 = time.perf_counter()
        predict_volume(net, image, (roi,) * 3, sw_batch_size=4, overlap=0.25, head=lambda o: main_output(o, 3))
        _sync(device.type)
        return time.perf_counter() - t0

    once()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [once() for _ in range(repeats)]
    return {"table": "infer", "size": size, "shape": list(shape), "roi": roi, "seconds": statistics.median(times),
            "peak_mb": _peak_mb(device.type), "n": repeats}  # fmt: skip


def measure_factory(resolution: int, device_name: str, repeats: int, batch: int = 16) -> dict[str, Any]:
    """Updates per second of the data factory (D and G alternating, lazy regularisers included)."""
    import torch

    from pipelines.device import resolve_device
    from pipelines.factory.plan_args import parse_factory_args
    from pipelines.factory.training import FactoryModel, FactoryUpdater, make_optimizer

    device = resolve_device(device_name)
    preset = {64: "tiny", 128: "small", 512: "paper"}[resolution]
    settings = parse_factory_args({"factory": {"preset": preset}, "key": {"kind": "none"}, "client_ids": {"A": 0, "B": 1}})
    torch.manual_seed(0)
    model = FactoryModel(settings.config).to(device)
    opt = make_optimizer(model)
    updater = FactoryUpdater(model, settings, 0)
    real = torch.randn(batch, 1, resolution, resolution, device=device).clamp(-1, 1)
    bins = torch.randint(0, settings.config.n_bins, (batch,), device=device)

    def update() -> None:
        loss = updater.loss(real, bins)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        updater.after_step()

    warm = 2 * max(settings.r1_interval, settings.pl_interval)  # every kind of update (R1, path length) once
    for _ in range(min(warm, 8) if device.type == "cpu" else warm):
        update()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n = max(repeats, 8)
    _sync(device.type)
    t0 = time.perf_counter()
    for _ in range(n):
        update()
    _sync(device.type)
    seconds = time.perf_counter() - t0
    return {"table": "factory", "resolution": resolution, "batch": batch, "updates_per_s": n / seconds, "n": n, "peak_mb": _peak_mb(device.type)}


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    kind = spec["kind"]
    if kind == "step":
        return measure_step(spec["size"], spec["roi"], spec["device"], spec["precision"], spec["repeats"])
    if kind == "infer":
        return measure_infer(spec["size"], tuple(spec["shape"]), spec["roi"], spec["device"], spec["repeats"])
    return measure_factory(spec["resolution"], spec["device"], spec["repeats"])


def _run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    if proc.returncode != 0:
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return {**spec, **json.loads(proc.stdout.strip().splitlines()[-1])}


def _markdown(results: list[dict[str, Any]], header: str) -> str:
    lines = [header, ""]
    steps = [r for r in results if r["kind"] == "step"]
    if steps:
        lines += ["| MedNeXt | patch | params | precision | FedAvg step s | ConDistFL step s | ConDistFL / FedAvg | peak MB FedAvg | peak MB ConDistFL | n |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in steps:
            if "error" in r:
                lines.append(f"| {r['size']} | {r['roi']}^3 | | | error: {r['error']} | | | | | |")
                continue
            lines.append(f"| {r['size']} | {r['roi']}^3 | {r['params'] / 1e6:.2f} M | {r['precision']} | {r['fedavg_s']:.3f} | {r['condistfl_s']:.3f} | "
                         f"**{r['ratio']:.3f}** | {r['fedavg_peak_mb']:.0f} | {r['condistfl_peak_mb']:.0f} | {r['n']} |")  # fmt: skip
        lines.append("")
    infers = [r for r in results if r["kind"] == "infer"]
    if infers:
        lines += ["| MedNeXt | volume | window | s per volume | peak MB | n |", "|---|---|---|---|---|---|"]
        for r in infers:
            value = f"{r['seconds']:.2f} | {r['peak_mb']:.0f}" if "error" not in r else f"error: {r['error']} |"
            lines.append(f"| {r['size']} | {'x'.join(map(str, r['shape']))} | {r['roi']}^3 | {value} | {r.get('n', '')} |")
        lines.append("")
    factories = [r for r in results if r["kind"] == "factory"]
    if factories:
        lines += ["| factory | batch | updates / s | peak MB | n |", "|---|---|---|---|---|"]
        for r in factories:
            value = f"{r['updates_per_s']:.2f} | {r['peak_mb']:.0f}" if "error" not in r else f"error: {r['error']} |"
            lines.append(f"| {r['resolution']} px | 16 | {value} | {r.get('n', '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument(
        "--precision", default="auto", help="auto, fp32, bf16 or fp16 (the spec's device.precision); comma-separated: each, side by side in this run"
    )
    ap.add_argument("--full", action="store_true", help="the GPU set: MedNeXt tiny/small/base at 64^3 and 128^3, factory at 64 and 512 px")
    ap.add_argument("--sizes", default=None)
    ap.add_argument("--rois", default=None)
    ap.add_argument("--infer-shape", default=None)
    ap.add_argument("--factory-res", default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--tables", default="step,infer,factory")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per child (CPU)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0

    from pipelines.device import describe_devices, resolve_device

    device = str(resolve_device(args.device))
    defaults = GPU_FULL if args.full else CPU_DEFAULTS
    sizes = (args.sizes or defaults["sizes"]).split(",")
    rois = [int(r) for r in (args.rois or defaults["rois"]).split(",")]
    shape = [int(v) for v in (args.infer_shape or defaults["infer_shape"]).split(",")]
    factory_res = [int(r) for r in (args.factory_res or defaults["factory_res"]).split(",")]
    repeats = args.repeats or int(defaults["repeats"])
    tables = set(args.tables.split(","))
    common = {"device": device, "repeats": repeats, "threads": args.threads}
    specs: list[dict[str, Any]] = []
    if "step" in tables:
        precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
        specs += [{"kind": "step", "size": s, "roi": r, "precision": p, **common} for s in sizes for r in rois for p in precisions]
    if "infer" in tables:
        specs += [{"kind": "infer", "size": s, "shape": shape, "roi": min(rois), **common} for s in sizes]
    if "factory" in tables:
        specs += [{"kind": "factory", "resolution": r, **common} for r in factory_res]
    seen = describe_devices()
    where = (f"{seen['gpus'][0]['name']}, CUDA {seen['cuda_build']}" if device.startswith("cuda") and seen["gpus"] else
             f"CPU ({os.cpu_count()} cores, {args.threads or 'default'} torch threads)")  # fmt: skip
    header = f"device_suite on {device}: {where}; torch {seen['torch']}; {time.strftime('%Y-%m-%d %H:%M')}"
    print(header, flush=True)
    results = []
    t0 = time.time()
    for i, spec in enumerate(specs, start=1):
        result = _run_child(spec, args.timeout)
        results.append(result)
        label = ", ".join(f"{k}={v}" for k, v in spec.items() if k in ("kind", "size", "roi", "resolution"))
        print(f"[{i}/{len(specs)}] {label}: {'error: ' + result['error'] if 'error' in result else 'done'} ({time.time() - t0:.0f} s)", flush=True)
    text = _markdown(results, header)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "devices": seen, "results": results}, indent=2))
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0 if not any("error" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
