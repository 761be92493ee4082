"""FedAvg, FedProx, FedOpt and ConDistFL on the chest radiograph phantom, in the shape of the ConDistFL paper's Tables 5 and 7.

One testbed (`coordinator testbed --body chest`'s sites: four radiograph hospitals, each with its own
CR/DX machine and labelling one structure, left lung, right lung, heart or pneumothorax, each holding
test-only reference masks of the structures it does not label; real Fed-BioMed nodes on loopback)
runs every method with the chest example spec's network, patches, optimizer, rounds, steps, data and
split (``coordinator/examples/chest_condistfl.yaml``; only the objective and aggregation differ):

    fedavg      marginal loss, FedAvg
    fedprox     marginal loss, FedAvg + proximal term (mu 1e-6, the paper's)
    fedopt      marginal loss, server momentum SGD (lr 1.0, momentum 0.6)
    condistfl   marginal loss + conditional distillation from the received global model, FedAvg (the paper's)
    scaffold, condistfl_scaffold   (on request) the same with SCAFFOLD's correction; the example spec's own method
                is condistfl_scaffold

Each run's report has the per-site table (`coordinator.report.site_classes`). Over the training seeds,
per method: mean, sample sd and n of each cell of Table 5's shape (per site, Dice of the best global
model on the classes it trains on and, marked *, on its test-only classes; the two averages over
cells: excluding and including *), the same for the sites' best local models, and Table 7's numbers
(rounds, model size, traffic, wall time). The ConDistFL / FedAvg ratio of the steady round time
(median of rounds 2..R) and of the local step time is taken per seed, in the same sitting on the same
machine, and summarised over seeds (the paper: 5.9 h / 5.2 h = 1.135 for the whole 2D training).
Printed, and written to ``<workdir>/comparison/benchmark.json`` and ``results.md`` beside the
comparison page.

    .venv/bin/python benchmarks/chest_methods.py                                   # 4 methods, seeds 0,1,2, the example's budget
    .venv/bin/python benchmarks/chest_methods.py --rounds 2 --steps 10 --seeds 0   # quick look

The numbers are printed as measured, whichever method wins.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # federation_methods, the script beside this one (also sets the root's path)
from federation_methods import (  # noqa: E402  (the abdominal benchmark's methods and bookkeeping)
    METHODS,
    NAMES,
    ROOT,
    SOURCE_FILE,
    finished_run,
    markdown_table,
    mean_step_s,
    parse_seeds,
    run_commit,
    run_label,
    source_commit,
    stat,
    steady_round_s,
)

from coordinator import runs  # noqa: E402
from coordinator.report import compare_runs, global_rows  # noqa: E402
from coordinator.report.site_classes import TEST_ONLY_MARK, column_layout  # noqa: E402
from coordinator.testbed import Testbed, chest_spec_text  # noqa: E402
from fedimg_core import atomic  # noqa: E402
from fedimg_core.logs import setup_logging  # noqa: E402
from preprocessing.schema import load_schema  # noqa: E402

DEFAULT_METHODS = "fedavg,fedprox,fedopt,condistfl"
CHEST_METHODS = ("fedavg", "fedprox", "fedopt", "scaffold", "condistfl", "condistfl_scaffold")
DEFAULT_CASES = 12  # per site: 6 training, 3 validation, 3 test cases with the example's split
PAPER_ROUND_RATIO = 5.9 / 5.2  # the paper's Table 7: ConDistFL's over FedAvg's 2D training time
AVERAGES = ("average_excluding", "average_including")


def example_budget() -> tuple[int, int]:
    """The chest example spec's rounds and local steps (the benchmark's defaults)."""
    raw = yaml.safe_load(chest_spec_text())
    return int(raw["rounds"]), int(raw["local_steps"])


def spec_for(method: str, rounds: int, steps: int, seed: int, split_seed: int = 0, presence_head: bool = True) -> dict[str, Any]:
    """The chest example spec for one method and training seed, its split seeded by ``split_seed``.

    Args:
        method: one of `CHEST_METHODS`.
        rounds: federated rounds.
        steps: local steps per round.
        seed: the training seed.
        split_seed: the split's seed (the same for every method and training seed).
        presence_head: keep the example's pneumothorax presence head (False: the segmentation network alone).

    Returns:
        The spec as a mapping.
    """
    raw: dict[str, Any] = yaml.safe_load(chest_spec_text())
    if not presence_head:
        raw["plan_args"].pop("presence_head", None)
    raw.update({"name": f"chest-{method}-seed{seed}", "rounds": rounds, "local_steps": steps, "seed": seed, **METHODS[method]})
    raw["split"] = {**dict(raw.get("split") or {}), "seed": split_seed}
    return raw


def cell_key(site: str, cls: str, test_only: bool) -> str:
    """A Table 5 cell's name: ``<site>: <class>`` with ``*`` for a test-only class."""
    return f"{site}: {cls}{TEST_ONLY_MARK if test_only else ''}"


def cells_of(record: Mapping[str, Any]) -> dict[str, float]:
    """A `coordinator.report.site_classes.site_cells` record as {cell name or average: Dice}."""
    out = {k: float(record[k]) for k in AVERAGES if record.get(k) is not None}
    for site, cells in record.get("sites", {}).items():
        for kind, test_only in (("trained", False), ("test_only", True)):
            for c, v in cells.get(kind, {}).items():
                out[cell_key(site, c, test_only)] = float(v)
    return out


def seed_table(records: Sequence[Mapping[str, Any]], model: str, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per method, per Table 5 cell and average: `stat` over the seeds' runs.

    Args:
        records: comparison records (``comparison.json``'s runs) with ``method`` set to the method's key.
        model: ``global`` or ``local``.
        methods: the methods, in order.

    Returns:
        method -> {cell name or average: stat}.
    """
    out: dict[str, dict[str, Any]] = {}
    for method in methods:
        values: dict[str, list[float]] = {}
        for r in records:
            if r["method"] == method:
                for key, v in cells_of(r["site_classes"][model]).items():
                    values.setdefault(key, []).append(v)
        out[method] = {key: stat(v) for key, v in values.items()}
    return out


def presence_scores(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The presence head's test scores of a run's best global model: ``"<site>: presence_<score>_<class>"`` -> value."""
    rows = global_rows(metrics, "test").rows
    return {f"{site}: {k}": float(v) for site, row in rows.items() for k, v in row.items() if k.startswith(("presence_accuracy_", "presence_auc_"))}


def cell_text(s: Mapping[str, Any] | None) -> str:
    """``mean ± sd`` (``mean`` with one seed), ``-`` without a value."""
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:.3f} ± {s['sd']:.3f}" if s.get("sd") is not None else f"{s['mean']:.3f}"


def ratio_over_seeds(per_seed: Mapping[int, Mapping[str, float | None]], num: str, den: str) -> dict[str, Any]:
    """`stat` of num / den over the seeds that measured both (each ratio taken within one seed's sitting)."""
    return stat([v[num] / v[den] for v in per_seed.values() if v.get(num) and v.get(den)])  # type: ignore[operator]


def main() -> int:
    rounds0, steps0 = example_budget()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=rounds0, help=f"default: the chest example's ({rounds0})")
    ap.add_argument("--steps", type=int, default=steps0, help=f"local steps per round; default: the chest example's ({steps0})")
    ap.add_argument("--cases", type=int, default=DEFAULT_CASES, help=f"radiographs per site (default {DEFAULT_CASES})")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated, of {', '.join(CHEST_METHODS)}")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated: every method runs once per seed")
    ap.add_argument("--split-seed", type=int, default=0, help="the split's seed: the same held-out cases for every method and seed")
    ap.add_argument("--workdir", type=Path, default=None, help="default: .benchmarks/chest-methods-<time>")
    ap.add_argument("--resume", action="store_true", help="reuse --workdir's finished runs of the very spec this run would submit")
    ap.add_argument("--no-presence-head", dest="presence_head", action="store_false",
                    help="drop the example's pneumothorax presence head (plan_args.presence_head) from every method's spec")  # fmt: skip
    args = ap.parse_args()
    if args.resume and args.workdir is None:
        ap.error("--resume needs --workdir: the folder of the benchmark to go on with")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in methods if m not in CHEST_METHODS]:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join(CHEST_METHODS)}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        ap.error(str(e))
    if args.split_seed < 0 or args.rounds < 1 or args.steps < 1 or args.cases < 4:
        ap.error("--split-seed: an integer >= 0; --rounds, --steps: integers >= 1; --cases: >= 4 (a training, validation and test case)")
    console = Console()

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False)

    command = shlex.join([".venv/bin/python", "benchmarks/chest_methods.py", *sys.argv[1:]])
    workdir = (args.workdir or ROOT / ".benchmarks" / f"chest-methods-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    setup_logging()
    n_sites = 4
    bed = Testbed(workdir, n_sites=n_sites, out=say, cases=[args.cases], body="chest")
    commit = source_commit()
    reused: dict[str, Path] = {}
    if args.resume and (workdir / "coordinator").is_dir():
        for seed in seeds:
            for method in methods:
                found = finished_run(bed.home, spec_for(method, args.rounds, args.steps, seed, args.split_seed, args.presence_head), evaluated=False)
                if found is not None:
                    reused[run_label(method, seed, seeds)] = found
        for label, found in reused.items():
            say(f"{label}: reusing {found.name} (finished, same spec; made with commit {run_commit(found)})")
    run_dirs: dict[str, Path] = {}
    method_of: dict[str, str] = {}
    seed_of: dict[str, int] = {}
    t_start = time.monotonic()
    try:
        with console.status(f"setting up {n_sites} radiograph sites and their nodes"):
            bed.setup_sites()
            if len(reused) < len(methods) * len(seeds):
                bed.start_nodes()
        for seed in seeds:
            for method in methods:
                label = run_label(method, seed, seeds)
                method_of[label], seed_of[label] = method, seed
                if label in reused:
                    run_dirs[label] = reused[label]
                    continue
                console.rule(f"{label}: {args.rounds} rounds x {args.steps} steps, split seed {args.split_seed}")
                spec = spec_for(method, args.rounds, args.steps, seed, args.split_seed, args.presence_head)
                code = bed.run_spec(yaml.safe_dump(spec, sort_keys=False))
                if code == 0:
                    code = bed.evaluate_and_report()  # the run's report (no out-of-federation set for radiographs)
                if code != 0:
                    console.print(f"[red]{label}: run or report failed ({code})")
                    return 1
                run_dirs[label] = Path(runs.list_runs(bed.home)[-1]["run_dir"])
                atomic.write_text(run_dirs[label] / SOURCE_FILE, json.dumps({"git_commit": commit}))
    finally:
        bed.teardown()

    out = workdir / "comparison"
    compare_runs(list(run_dirs.values()), out, labels=list(run_dirs))
    comparison = json.loads((out / "comparison.json").read_text())
    records = [{**r, "method": method_of[r["method"]], "seed": seed_of[r["method"]]} for r in comparison["runs"] if r["method"] in method_of]
    schema = load_schema("chest-xr").classes
    tables: dict[str, Any] = {}
    md: list[str] = []
    for model, title in (("global", "best global model"), ("local", "each site's best local model")):
        stats = seed_table(records, model, methods)
        tables[model] = stats
        layout = column_layout([r["site_classes"][model] for r in records], schema)
        # one row per cell (the paper's columns), one column per method: 18 cells do not fit a terminal's width as columns
        names = {"average_excluding": f"average excluding {TEST_ONLY_MARK}", "average_including": f"average including {TEST_ONLY_MARK}"}
        keys = [*AVERAGES, *(cell_key(*c) for c in layout)]
        columns = ["cell", *(NAMES.get(m, m) for m in methods)]
        rows = [[names.get(k, k), *(cell_text(stats[m].get(k)) for m in methods)] for k in keys]
        heading = f"Table 5 shape, {title}: Dice on each site's test cases, mean ± sd over seeds {', '.join(map(str, seeds))} (n = {len(seeds)})"
        t = Table(title=heading)
        for col in columns:
            t.add_column(col, justify="right")
        for row in rows:
            t.add_row(*row)
        console.print(t)
        md.append(f"### {heading}\n\n{markdown_table(columns, rows)}\n")

    # Table 7's numbers and the round-time ratio, each seed's runs side by side in one sitting
    timing: dict[int, dict[str, float | None]] = {}
    presence: dict[str, dict[str, list[float]]] = {}  # method -> "<site>: <score>" -> values over seeds
    for label, run_dir in run_dirs.items():
        m = runs.read_metrics(run_dir)
        timing.setdefault(seed_of[label], {})[f"{method_of[label]}_round"] = steady_round_s(m)
        timing[seed_of[label]][f"{method_of[label]}_step"] = mean_step_s(m)
        for key, value in presence_scores(m).items():
            presence.setdefault(method_of[label], {}).setdefault(key, []).append(value)
    if presence:  # the presence head at the site that labels its class: the best global model on that site's test cases
        keys = sorted({k for per in presence.values() for k in per})
        presence_stats = {m: {k: stat(presence.get(m, {}).get(k, [])) for k in keys} for m in methods}
        presence_rows = [[k, *(cell_text(presence_stats[m][k]) for m in methods)] for k in keys]
        md.append("### Presence head: the best global model on the test cases of the site labelling the class, mean ± sd over seeds\n\n"
                  + markdown_table(["site: score", *(NAMES.get(m, m) for m in methods)], presence_rows) + "\n")  # fmt: skip
        for row in presence_rows:
            say("presence " + " | ".join(row))
    cost_rows = []
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        rounds_s = [v for s in timing.values() if (v := s.get(f"{method}_round"))]
        cost_rows.append([
            NAMES.get(method, method), str(args.rounds), _fmt(statistics.fmean([r["mb_total"] / (2 * args.rounds * n_sites) for r in mine if r.get("mb_total")]) if mine else None),
            _fmt(statistics.fmean([r["mb_total"] for r in mine if r.get("mb_total")]) if mine else None),
            _fmt(statistics.fmean([r["wall_s"] for r in mine if r.get("wall_s")]) if mine else None, 0),
            _fmt(statistics.median(rounds_s) if rounds_s else None, 2),
        ])  # fmt: skip
    cost_columns = ["method", "rounds", "MB per transfer (mean)", "traffic MB (total)", "wall s per run (mean)", "steady round s (median)"]
    md.append(f"### Table 7 shape: cost per run, mean over seeds\n\n{markdown_table(cost_columns, cost_rows)}\n")
    ratios = {}
    if "condistfl" in methods and "fedavg" in methods:
        ratios = {"round": ratio_over_seeds(timing, "condistfl_round", "fedavg_round"),
                  "step": ratio_over_seeds(timing, "condistfl_step", "fedavg_step")}  # fmt: skip
        line = (f"ConDistFL / FedAvg, per seed in one sitting: steady round time {cell_text(ratios['round'])} (n = {ratios['round']['n']}), "
                f"local step time {cell_text(ratios['step'])} (n = {ratios['step']['n']}); the paper's 2D training time ratio {PAPER_ROUND_RATIO:.3f}")  # fmt: skip
        say(line)
        md.append(f"- {line}\n")
    summary: dict[str, Any] = {
        "command": command, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
        "rounds": args.rounds, "steps": args.steps, "cases_per_site": args.cases, "seeds": seeds, "split_seed": args.split_seed,
        "methods": methods, "presence_head": args.presence_head, "git_commit": commit, "reused_runs": {k: str(v) for k, v in reused.items()},
        "run_commits": {label: run_commit(d) for label, d in run_dirs.items()}, "run_dirs": {k: str(v) for k, v in run_dirs.items()},
        "tables": tables, "presence": presence, "timing": timing, "ratios": ratios, "total_wall_s": time.monotonic() - t_start,
    }  # fmt: skip
    atomic.write_text(out / "benchmark.json", json.dumps(summary, indent=2, default=str))
    atomic.write_text(out / "results.md", results_markdown(summary, md, records))
    say(f"comparison page: {out / 'index.html'}")
    say(f"results: {out / 'results.md'}  (total {summary['total_wall_s'] / 60:.1f} min)")
    return 0


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def results_markdown(summary: Mapping[str, Any], tables: Sequence[str], records: Sequence[Mapping[str, Any]]) -> str:
    """The benchmark's ``results.md``: command, date, machine, budget, test cases per site, the tables.

    Args:
        summary: what ``benchmark.json`` holds.
        tables: the markdown tables with their headings (Table 5's columns as rows), and the ratio line.
        records: the comparison records (for the test cases per site).

    Returns:
        The text.
    """
    cases: dict[str, Any] = {}
    for r in records:
        for site, cells in r["site_classes"]["global"].get("sites", {}).items():
            cases.setdefault(site, (cells.get("cases"), cells.get("test_only_cases")))
    lines = [
        "# Federation methods on chest radiographs (the ConDistFL paper's 2D setting)",
        "",
        f"- Command: `{summary['command']}`",
        f"- Date: {summary['date_utc']}; machine: {summary['cpu_count']} CPU cores; wall time {summary['total_wall_s'] / 60:.1f} min; commit {summary['git_commit']}",
        f"- Budget: {summary['rounds']} rounds x {summary['steps']} local steps per site; {summary['cases_per_site']} radiographs per site; "
        f"seeds {', '.join(map(str, summary['seeds']))}, split seed {summary['split_seed']}; pneumothorax presence head: "
        f"{'yes (the example spec)' if summary.get('presence_head', True) else 'no (--no-presence-head)'}",
        "- Test cases per site (with a test-only reference label): "
        + ", ".join(f"{s} {n} ({k if k is not None else 'none'})" for s, (n, k) in sorted(cases.items())),
        "- Cells: Dice, mean ± sample sd over seeds; `*`: a class the site holds test-only reference labels of (never in its loss or in "
        "model selection). Averages over cells, as the paper's Table 5. Pneumothorax scores an empty prediction on an empty mask as 1 (SIIM-ACR).",
        "",
        *tables,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
