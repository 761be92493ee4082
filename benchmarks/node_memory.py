"""Memory an idle site node holds: after start-up, and between rounds of a real run.

Starts a testbed (real Fed-BioMed node processes on loopback, the process runtime a site
runs), waits until every node is connected and idle, and samples each node's resident set
(RSS, and PSS where the kernel reports it: shared library pages divided among the processes
sharing them) with its children. Then it runs a short federation and samples again once the
run is over and the nodes are idle between tasks: what a node keeps after it has trained.
Prints each figure beside the goal (an idle node <= 400 MB RSS) and which modules the idle
node process has imported (from /proc, by file mappings of the big libraries).

    .venv/bin/python benchmarks/node_memory.py [--sites 2] [--rounds 2] [--settle 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.testbed import Testbed, default_spec_text  # noqa: E402
from site_agent.runtime import ProcessRuntime  # noqa: E402

GOAL_MB = 400.0
MB = 1e6
# shared libraries whose mapping shows which heavy packages a process has imported
LIBRARIES = {"torch": "libtorch_cpu", "monai/itk": "_ITKCommon", "scipy": "scipy", "grpc": "cygrpc", "cryptography": "_rust"}


def _tree(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def sample(pid: int) -> dict[str, float | int | list[str]]:
    """RSS and PSS (MB) of a node process and its children, and the heavy libraries it has mapped."""
    rss = pss = 0.0
    procs = _tree(pid)
    for p in procs:
        try:
            full = p.memory_full_info()
            rss += full.rss / MB
            pss += getattr(full, "pss", full.rss) / MB
        except psutil.Error:
            continue
    try:
        mapped = {m.path for m in psutil.Process(pid).memory_maps(grouped=True)}
    except psutil.Error:
        mapped = set()
    libs = sorted(name for name, needle in LIBRARIES.items() if any(needle in path for path in mapped))
    return {"rss_mb": rss, "pss_mb": pss, "processes": len(procs), "libraries": libs}


def node_pids(bed: Testbed) -> list[int]:
    pids = []
    for site in bed.sites:
        st = ProcessRuntime(site).status()
        if st.pid:
            pids.append(st.pid)
    return pids


def steady(pids: list[int], quiet_s: float, timeout: float = 240.0) -> list[dict]:
    """Samples once no node's RSS has moved by more than 2 MB for ``quiet_s`` seconds (start-up
    imports done, or the last task's memory returned), or at ``timeout``."""
    deadline = time.monotonic() + timeout
    last = [sample(pid) for pid in pids]
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = [sample(pid) for pid in pids]
        if any(abs(float(a["rss_mb"]) - float(b["rss_mb"])) > 2.0 for a, b in zip(now, last, strict=True)):
            still_since = time.monotonic()
        last = now
        if time.monotonic() - still_since >= quiet_s:
            break
    return last


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--settle", type=float, default=20.0, help="seconds a node's memory must hold still before it is sampled")
    ap.add_argument("--json", type=Path, default=None, help="also write the samples here")
    args = ap.parse_args()

    spec = yaml.safe_load(default_spec_text())
    spec.update(rounds=args.rounds, local_steps=args.steps, name="node-memory", split={"validation": 0.25, "test": 0})
    with tempfile.TemporaryDirectory(prefix="fedimg-mem-") as tmp:
        bed = Testbed(Path(tmp), n_sites=args.sites, out=lambda line: None, cases=[4])
        try:
            print(f"setting up {args.sites} sites and starting their nodes ...", flush=True)
            bed.setup_sites()
            bed.start_nodes()
            pids = node_pids(bed)
            print(f"nodes started (pids {pids}); sampling once their memory has been steady for {args.settle:g} s ...", flush=True)
            idle = steady(pids, args.settle)
            print(f"running {args.rounds} rounds of {args.steps} steps ...", flush=True)
            code = bed.run_spec(yaml.safe_dump(spec))
            if code != 0:
                print(f"federated run failed ({code})", file=sys.stderr)
                return 1
            after = steady(pids, args.settle)
        finally:
            bed.teardown()

    def line(label: str, rows: list[dict]) -> None:
        rss = [float(r["rss_mb"]) for r in rows]
        pss = [float(r["pss_mb"]) for r in rows]
        libs = sorted({lib for r in rows for lib in r["libraries"]})
        print(f"{label:<34}{statistics.median(rss):>10.0f}{max(rss):>10.0f}{statistics.median(pss):>10.0f}"
              f"{GOAL_MB:>8.0f}{max(rss) / GOAL_MB:>9.2f}   {', '.join(libs) or '-'}")  # fmt: skip

    print(f"\nnode memory, MB = 1e6 bytes; n = {args.sites} nodes (median and max over nodes); idle after start-up = started, before the coordinator's run")
    print(f"{'when':<34}{'RSS med':>10}{'RSS max':>10}{'PSS med':>10}{'goal':>8}{'max/goal':>9}   libraries mapped")
    line("idle after start-up", idle)
    line(f"idle after a {args.rounds}-round run", after)
    if args.json:
        args.json.write_text(json.dumps({"idle": idle, "after_run": after, "goal_mb": GOAL_MB}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
