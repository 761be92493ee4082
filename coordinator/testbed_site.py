"""One testbed site's chores, run as its own process (as a hospital's staff would):

    python -m coordinator.testbed_site setup   --config C --seed S [...]   # init + demo data + register
    python -m coordinator.testbed_site approve --config C                   # approve every plan sent (loop)

The testbed runs these in separate processes so each site's Fed-BioMed state (its
logger, its database) stays in a process of its own, like on a real site.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from site_agent import config as site_config


def setup(args) -> None:
    from preprocessing.synthetic import write_synthetic_dataset
    from site_agent import node

    base = Path(args.config).resolve().parent
    site = site_config.validate(
        {
            "site_name": args.name,
            "coordinator": {"host": args.host, "port": args.port},
            "data_dir": str(base / "data"),
            "work_dir": str(base / "work"),
            "runtime": "process",
        },
        "testbed",
    )
    site.work_dir.mkdir(parents=True, exist_ok=True)
    node.create_node(site)
    site.save(args.config)
    site = site_config.load(args.config)
    dataset = site.data_dir / "demo"
    if not dataset.exists():
        write_synthetic_dataset(
            dataset, seed=args.seed, n_cases=args.cases, shape=(args.size,) * 3, intensity_shift=args.shift, name=f"{args.name}-demo"
        )
    if not node.list_datasets(site):
        node.add_dataset(site, dataset, [args.tag])


def approve(args) -> None:
    from site_agent import node

    site = site_config.load(args.config)
    while True:
        for plan in node.list_plans(site, status="Pending"):
            node.set_plan_status(site, plan["id"], approve=True, note="testbed auto-approval")
            print(f"{site.site_name}: approved {plan['name']} (sha256 {plan['hash'][:16]}...)", flush=True)
        time.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m coordinator.testbed_site")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--config", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--host", default="localhost")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--cases", type=int, default=4)
    s.add_argument("--size", type=int, default=32)
    s.add_argument("--shift", type=float, default=0.0)
    s.add_argument("--tag", default="fedimg-demo")
    a = sub.add_parser("approve")
    a.add_argument("--config", required=True)
    args = p.parse_args(argv)
    try:
        setup(args) if args.cmd == "setup" else approve(args)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
