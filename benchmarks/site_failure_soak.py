"""Soak benchmark of rounds that survive failing sites (issue 23): a federation on loopback whose
sites are killed and restarted at random while it trains.

N sites (real Fed-BioMed node processes, each with its own phantom dataset) train a tiny ConDistFL
model for R rounds through `coordinator run`. Every K rounds a site drawn at random (seeded, among
those up and not restarted in the last K rounds) has its node killed (SIGKILL); it is started
again after the next round, and rejoins by itself (a node takes ~10 s to start). The run needs
``sites.min_per_round`` updates a round (default: half the sites). Printed, and written as JSON:
runs done and failed, rounds completed, rounds aggregated from fewer sites, the kills and
restarts, and the time per round (all rounds, full rounds, rounds with a site left out).

    .venv/bin/python benchmarks/site_failure_soak.py                       # 8 sites x 20 rounds, a kill every 3 rounds
    .venv/bin/python benchmarks/site_failure_soak.py --sites 4 --rounds 8 --kill-every 2 --json soak.json

The sites and the coordinator share this machine's cores (each node gets cores / sites threads):
the time per round is the federation's on this machine, not a site's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("soak")
ROUND_LINE = re.compile(r" round (\d+)/\d+ \(([^)]*)\)")  # the coordinator's line for a finished round


def soak_spec(name: str, sites: int, rounds: int, min_per_round: int, timeout_s: float) -> dict[str, Any]:
    """The soak run's spec: the testbed's ConDistFL spec, a tiny MedNeXt on native-spacing 32-voxel patches.

    Args:
        name: the run's name.
        sites: the sites the run starts with.
        rounds: federated rounds.
        min_per_round: updates a round needs.
        timeout_s: ``round_timeout_s``.

    Returns:
        The spec as a mapping.
    """
    import yaml

    from coordinator.testbed import TAG, default_spec_text

    raw = yaml.safe_load(default_spec_text())
    raw["plan_args"].update({"roi_size": [32, 32, 32], "spacing": "native", "patches_per_volume": 2})
    raw["plan_args"]["network"] = {"name": "mednext", "size": "tiny", "spatial_dims": 3, "deep_supervision": False}
    raw.update({"name": name, "rounds": rounds, "local_steps": 2, "round_timeout_s": timeout_s, "validate_every": rounds})
    raw["split"] = {"validation": 0.25, "test": 0.0, "seed": 0}
    raw["sites"] = {"tags": [TAG], "min_sites": sites, "min_per_round": min_per_round, "wait_s": 300}
    return raw


def kill_rounds(rounds: int, every: int) -> list[int]:
    """The rounds after which a site is killed: every ``every`` rounds, none after the last two
    (a site killed then would have no round left to rejoin in).

    Args:
        rounds: the run's rounds.
        every: rounds between kills.

    Returns:
        Rounds, from 1.
    """
    return list(range(every, rounds - 1, every))


def pick_site(rng: random.Random, sites: int, down: set[int], restarted: dict[int, int], r: int, every: int) -> int | None:
    """The site to kill after round ``r``: drawn among those up and not restarted within the last ``every`` rounds.

    Args:
        rng: the seeded draw.
        sites: number of sites.
        down: sites killed and not yet restarted.
        restarted: site -> the round after which it was last restarted.
        r: the round just done.
        every: rounds between kills.

    Returns:
        A site index, or None when no site qualifies.
    """
    candidates = [i for i in range(sites) if i not in down and r - restarted.get(i, -every) >= every]
    return rng.choice(candidates) if candidates else None


def summarise(metrics: dict[str, Any], status: str, kills: list[dict[str, Any]]) -> dict[str, Any]:
    """The soak's numbers from one run's metrics.json and state.

    Args:
        metrics: the run's metrics.
        status: the run's final status.
        kills: the kills and restarts made (round, site).

    Returns:
        rounds done and planned, rounds aggregated from fewer sites, time per round (median and mean: all, full, partial).
    """
    rounds = metrics.get("rounds", [])

    def partial(r: dict[str, Any]) -> bool:
        return any(s.get("status") in ("failed", "timeout") for s in (r.get("site_status") or {}).values())

    def times(rows: list[dict[str, Any]]) -> dict[str, float | int | None]:
        walls = [float(r["wall_s"]) for r in rows if r.get("wall_s") is not None]
        return {"n": len(walls), "median_s": statistics.median(walls) if walls else None, "mean_s": statistics.fmean(walls) if walls else None}

    fewer = [r for r in rounds if partial(r)]
    return {
        "status": status,
        "rounds_done": len(rounds),
        "rounds_planned": metrics.get("rounds_planned"),
        "rounds_from_fewer_sites": len(fewer),
        "fewest_sites_in_a_round": min((r.get("aggregated_from") or 0 for r in rounds), default=None),
        "kills": kills,
        "round_time": {"all": times(rounds), "full": times([r for r in rounds if not partial(r)]), "partial": times(fewer)},
    }


def run_soak(workdir: Path, sites: int, rounds: int, every: int, seed: int, min_per_round: int, timeout_s: float) -> dict[str, Any]:
    """Set up the sites, run the spec with kills and restarts, and summarise (see the module docstring)."""
    import yaml

    from coordinator.testbed import Testbed
    from site_agent.runtime import ProcessRuntime, pid_alive

    bed = Testbed(workdir, n_sites=sites, cases=[4], device="cpu", reference_labels=False)
    t0 = time.monotonic()
    log.info("setting up %d sites under %s", sites, workdir)
    bed.setup_sites()
    bed.start_nodes()
    log.info("sites ready in %.0f s", time.monotonic() - t0)
    threads = str(max(1, (os.cpu_count() or 1) // sites))
    plan = set(kill_rounds(rounds, every))
    rng = random.Random(seed)
    restarted: dict[int, int] = {}
    spec_path = workdir / "soak.yaml"
    spec_path.write_text(yaml.safe_dump(soak_spec("soak", sites, rounds, min_per_round, timeout_s)))
    home = workdir / "coordinator"
    cmd = [str(Path(sys.executable).parent / "coordinator"), "run", str(spec_path), "--home", str(home),
           "--grpc-host", "127.0.0.1", "--grpc-port", str(bed.port), "--public-host", "localhost"]  # fmt: skip
    kills: list[dict[str, Any]] = []
    down: dict[int, int] = {}  # site index -> round after which it restarts
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            found = ROUND_LINE.search(line)
            if not found:
                continue
            r = int(found.group(1))
            log.info("round %d/%d done (%s)", r, rounds, found.group(2))
            for i, back_after in list(down.items()):
                if r >= back_after:
                    ProcessRuntime(bed.sites[i]).start(die_with_parent=True, extra_env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
                    kills.append({"restarted_after_round": r, "site": bed.sites[i].site_name})
                    log.info("%s restarted", bed.sites[i].site_name)
                    restarted[i] = r
                    del down[i]
            i = pick_site(rng, sites, set(down), restarted, r, every) if r in plan else None
            if i is not None:
                pid = ProcessRuntime(bed.sites[i]).status().pid
                if pid and pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
                    down[i] = r + 1
                    kills.append({"killed_after_round": r, "site": bed.sites[i].site_name})
                    log.info("%s killed", bed.sites[i].site_name)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        bed.teardown()
    (run_dir,) = sorted((home / "runs").iterdir())
    state = json.loads((run_dir / "state.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = summarise(metrics, state["status"], kills)
    out.update({"sites": sites, "kill_every": every, "seed": seed, "min_per_round": min_per_round, "round_timeout_s": timeout_s,
                "error": state.get("error"), "run_dir": str(run_dir), "wall_s": round(time.monotonic() - t0, 1)})  # fmt: skip
    return out


def main() -> int:
    """Run the soak and print its summary; exit 1 when the run did not finish."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--kill-every", type=int, default=3, help="rounds between kills (a random site each time)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-per-round", type=int, default=None, help="default: half the sites, rounded up")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="round_timeout_s of the spec")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quorum = args.min_per_round or max(1, (args.sites + 1) // 2)
    with tempfile.TemporaryDirectory(prefix="fedimg-soak-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        out = run_soak(workdir, args.sites, args.rounds, args.kill_every, args.seed, quorum, args.round_timeout)
    t = out["round_time"]
    lines = [
        f"runs: 1, {'done' if out['status'] == 'done' else 'FAILED (' + str(out['status']) + ')'}; failed runs: {int(out['status'] != 'done')}",
        f"rounds completed: {out['rounds_done']}/{out['rounds_planned']} with {out['sites']} sites (min_per_round {quorum})",
        f"rounds aggregated from fewer sites: {out['rounds_from_fewer_sites']} (fewest sites in a round: {out['fewest_sites_in_a_round']})",
        f"kills: {sum('killed_after_round' in k for k in out['kills'])}, restarts: {sum('restarted_after_round' in k for k in out['kills'])}",
    ]
    for label in ("all", "full", "partial"):
        row = t[label]
        if row["n"]:
            lines.append(f"time per round, {label} rounds: median {row['median_s']:.1f} s, mean {row['mean_s']:.1f} s (n = {row['n']})")
    lines.append(f"whole benchmark: {out['wall_s']:.0f} s")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0 if out["status"] == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
