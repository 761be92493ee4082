"""`site-agent infer` against the same model called directly in Python, and MONAI's bundle runner,
on the same volume, side by side in one run: wall time per volume and peak memory.

    .venv/bin/python benchmarks/inference_overhead.py --shape 512 512 120 --repeats 3

Each measurement is a fresh process (start-up included, as a user pays it), run under a
small wrapper that reports the child's peak resident memory (``getrusage(RUSAGE_CHILDREN)``).
The three ways run in turn within each repeat, so machine noise hits them alike.

* ``site-agent infer``: the command a site runs (config-free, on a package folder): package
  checksums, network rebuild, preprocessing, sliding window, inverse to the input grid, label
  written as NIfTI.
* ``direct``: a Python process that loads the weights (safetensors) into the network and calls
  `pipelines.inference.segment_image` on the file, then writes the label: the model "called
  directly", with the same preprocessing and inverse but no CLI, checks or records.
* ``monai bundle``: ``python -m monai.bundle run`` on the package's ``inference.json``.

The package is the main job's network (``coordinator/examples/phantom_condistfl.yaml``) with
random weights (timing does not depend on the weights), or ``--package DIR``. The volume is a
synthetic CT of ``--shape`` voxels at ``--spacing`` mm (a typical abdominal CT by default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": rc.returncode, "wall_s": wall, "peak_mb": peak_kb / 1024, "stderr": rc.stderr[-800:]}))
"""

DIRECT = """
import json, sys
from safetensors.torch import load_file
from pipelines.inference import segment_image
from pipelines.plan_args import parse_plan_args
from pipelines.training import build_model
from preprocessing.schema import parse_schema
pkg, scan, out = sys.argv[1:4]
config = json.load(open(pkg + "/package.json"))
schema = parse_schema(config["schema_definition"], "package")
settings = parse_plan_args({**config["plan_args"], "schema_definition": config["schema_definition"]}, schema)
net = build_model(settings)
net.load_state_dict(load_file(pkg + "/model.safetensors"))
pred = segment_image(net.eval(), settings, scan, "CT")
pred.save_nifti(out)
"""


def build_package(folder: Path) -> Path:
    """The main job's network with random weights, as a package folder."""
    import torch

    from coordinator.spec import load
    from pipelines.model_package import build_package_files
    from pipelines.training import build_model, parse_plan_args
    from preprocessing.schema import parse_schema

    args = load(ROOT / "coordinator" / "examples" / "phantom_condistfl.yaml").experiment_model_args()
    schema = parse_schema(args["schema_definition"], "spec")
    settings = parse_plan_args(args, schema)
    torch.manual_seed(0)
    net = build_model(settings)
    files = build_package_files(name="benchmark", plan_args=args, state_dict=net.state_dict(), provenance={"note": "random weights"})
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def write_volume(path: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
    """A synthetic CT: soft tissue with a few brighter ellipsoids, LPS-ordered like a scanner's."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    grid = np.indices(shape, dtype=np.float32)
    centre = [(s - 1) / 2 for s in shape]
    body = sum(((g - c) / (0.45 * s)) ** 2 for g, c, s in zip(grid, centre, shape)) < 1
    data = np.where(body, 40.0, -1000.0).astype(np.float32) + rng.normal(0, 10, shape).astype(np.float32)
    for k, (fx, fy, fz) in enumerate([(0.35, 0.45, 0.5), (0.65, 0.45, 0.5), (0.5, 0.6, 0.4)]):
        organ = sum(((g - f * s) / (0.12 * s)) ** 2 for g, f, s in zip(grid, (fx, fy, fz), shape)) < 1
        data[organ] += 60 + 20 * k
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=env, check=True)
    row = json.loads(out.stdout)
    if row["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed: {row['stderr']}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", type=Path, default=None, help="A model package folder (default: the main job's network, random weights).")
    ap.add_argument("--shape", type=int, nargs=3, default=(512, 512, 120))
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.8, 0.8, 2.5))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each process (OMP_NUM_THREADS)")
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = ap.parse_args()

    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    with tempfile.TemporaryDirectory(prefix="fedimg-infer-bench-") as tmp_name:
        tmp = Path(tmp_name)
        package = args.package or build_package(tmp / "package")
        scan = tmp / "scan.nii.gz"
        write_volume(scan, tuple(args.shape), tuple(args.spacing))
        agent = str(Path(sys.executable).with_name("site-agent"))
        ways = {
            "site-agent infer": lambda r: [agent, "-q", "infer", str(scan), "--modality", "CT", "--model", str(package), "--out", str(tmp / f"agent{r}")],
            "direct": lambda r: [sys.executable, "-c", DIRECT, str(package), str(scan), str(tmp / f"direct{r}.nii.gz")],
            "monai bundle": lambda r: [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "--bundle_root",
                str(package),
                "--config_file",
                str(package / "inference.json"),
                "--meta_file",
                str(package / "metadata.json"),
                "--input_image",
                str(scan),
                "--output_dir",
                str(tmp / f"bundle{r}"),
            ],  # fmt: skip
        }
        rows: dict[str, list[dict]] = {k: [] for k in ways}
        for r in range(args.repeats):
            for name, cmd in ways.items():
                row = measure(cmd(r), env)
                rows[name].append(row)
                print(f"repeat {r + 1}/{args.repeats} {name}: {row['wall_s']:.1f} s, peak {row['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    base = rows["direct"]
    print(f"\nvolume {args.shape[0]}x{args.shape[1]}x{args.shape[2]} at {args.spacing} mm, {args.threads} torch threads, n = {args.repeats} per way\n")
    print("| way | wall s (median, min-max) | peak MB (median) | wall / direct (median of paired ratios) | peak / direct |")
    print("|---|---|---|---|---|")
    for name, rs in rows.items():
        walls = [x["wall_s"] for x in rs]
        peaks = [x["peak_mb"] for x in rs]
        ratio = statistics.median(x["wall_s"] / b["wall_s"] for x, b in zip(rs, base))
        mem = statistics.median(x["peak_mb"] / b["peak_mb"] for x, b in zip(rs, base))
        print(f"| {name} | {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) | {statistics.median(peaks):.0f} | {ratio:.2f} | {mem:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"shape": args.shape, "spacing": args.spacing, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"\n(took {time.time() - started:.0f} s)", file=sys.stderr)
