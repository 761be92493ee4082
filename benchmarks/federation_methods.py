"""ConDistFL against its baselines on the phantom federation, measured over training seeds.

One testbed (4 phantom hospitals, each labelling one organ group, real Fed-BioMed nodes on
loopback, plus an out-of-federation test set in another contrast phase) runs every method
with the same backbone, rounds, local steps, seeds, data and split (the demo spec's
validation / test shares, seeded by ``--split-seed``: every method and every training seed
holds out the same cases at every site):

    fedavg      marginal loss, FedAvg
    fedprox     marginal loss, FedAvg + proximal term (mu 1e-6, the paper's)
    fedopt      marginal loss, server momentum SGD (lr 1.0, momentum 0.6)
    scaffold    marginal loss, FedAvg with SCAFFOLD's drift correction (declearn's modules, before AdamW)
    condistfl   marginal loss + conditional distillation from the received global model (the paper's: FedAvg)
    condistfl_scaffold  ConDistFL with SCAFFOLD's correction: the main job's method, judged by the verdict
    condistfl_scaffold_bf16  the same, its models sent in bf16 both ways (transfer.precision: bf16)
    standalone  marginal loss, every site alone (no aggregation); its joint model is the paper's
                ensemble of the sites' best local models ("standalone ensemble": each class from the
                model(s) of the site(s) labelling it, background from every model's merged background)
    centralised in this process, after the federated runs: the same network, objective (each case's
                site's partial labels), patches, augmentation, AdamW and schedule, on every site's training
                cases pooled (the federation's split), for as many steps as the federation ran in all
                (sites x rounds x local steps), seeded by the training seed

Every federated run is scored out of federation (`coordinator evaluate`) and gets its own
report; the comparison page (`compare_runs`) collects global and local per-class Dice. The
centralised model and the ensemble are scored like the federation's models: on each site's test
cases (its own labelled classes) and on the out-of-federation set (lesions merged into their
organ, as `coordinator evaluate` does). Over the seeds, per method and class: mean, sample sd
and n of (a) the best global model's in-federation test Dice, (b) its out-of-federation Dice,
(c) the sites' best local models' in-federation test Dice and out-of-federation Dice (mean over
sites); organ mean (kidney, liver, pancreas, spleen) and tumours apart. The verdict says, for
the main job's method (ConDistFL + SCAFFOLD; the paper's ConDistFL when that is not measured) against every
other method, in and out of federation, for global and local models,
whether the difference of the organ means exceeds the seed-to-seed spread (sd_a + sd_b), and
gives ConDistFL's global / centralised ratio. Printed, and written to
``<workdir>/comparison/benchmark.json`` and ``results.md``.

    .venv/bin/python benchmarks/federation_methods.py                           # every method, seeds 0,1,2, the demo's budget
    .venv/bin/python benchmarks/federation_methods.py --rounds 3 --steps 10 --seeds 0 --methods fedavg,condistfl   # quick look

``--rounds`` / ``--steps`` default to the demo spec's rounds and local steps, ``--cases`` to the
main job's cases per site. The numbers are printed as measured, whichever method wins.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # method_baselines ("benchmarks" itself is taken: opacus installs a package of that name)

from coordinator import runs  # noqa: E402
from coordinator.report import compare_runs, seed_summary  # noqa: E402
from coordinator.testbed import DEMO_CASES_PER_SITE, Testbed, default_spec_text  # noqa: E402
from fedimg_core import atomic  # noqa: E402
from fedimg_core.logs import setup_logging  # noqa: E402

# the aggregator is set for every method: the demo spec's own (scaffold) must not leak into the paper's baselines
METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {"plan": "marginal", "aggregator": "fedavg"},
    "fedprox": {"plan": "marginal", "aggregator": "fedavg", "fedprox_mu": 1e-6},
    "fedopt": {"plan": "marginal", "aggregator": "fedavg", "server_optimizer": {"name": "momentum", "lr": 1.0, "momentum": 0.6}},
    "scaffold": {"plan": "marginal", "aggregator": "scaffold"},
    "condistfl": {"plan": "condistfl", "aggregator": "fedavg"},
    "condistfl_scaffold": {"plan": "condistfl", "aggregator": "scaffold"},
    # the main job with its models sent in bf16 both ways (half the bytes; averaging stays float32): what the rounding costs
    "condistfl_scaffold_bf16": {"plan": "condistfl", "aggregator": "scaffold", "transfer": {"precision": "bf16"}},
    "standalone": {"plan": "marginal", "aggregator": "fedavg", "mode": "standalone"},
}


def spec_for(method: str, rounds: int, steps: int, seed: int, split_seed: int = 0) -> dict[str, Any]:
    """The demo spec for one method and training seed, its split seeded by ``split_seed``.

    Args:
        method: a key of `METHODS`.
        rounds: federated rounds.
        steps: local steps per round.
        seed: the training seed (weights, patches, augmentation).
        split_seed: the split's seed (the same for every method and training seed).

    Returns:
        The spec as a mapping.
    """
    raw: dict[str, Any] = yaml.safe_load(default_spec_text())
    split = dict(raw.get("split") or {"validation": 0.25, "test": 0.25})
    raw.pop("test_ratio", None)  # an older demo spec: its split is the one below
    raw.update({"name": f"bench-{method}-seed{seed}", "rounds": rounds, "local_steps": steps, "seed": seed, **METHODS[method]})
    raw["split"] = {**split, "seed": split_seed}
    return raw


def finished_run(home: Path, spec: Mapping[str, Any], evaluated: bool = True) -> Path | None:
    """The newest finished, evaluated run under a coordinator home that ran this spec.

    What lets a benchmark spread over several sittings (``--resume``): a run counts only when it
    finished every round, was scored out of federation, and its submitted spec equals ``spec``
    (the site selection aside, which the testbed fills in), so a changed demo spec, budget or
    seed runs again.

    Args:
        home: the testbed's coordinator home.
        spec: the spec this benchmark would submit (`spec_for`).
        evaluated: also require an out-of-federation evaluation (a benchmark without such a set: False).

    Returns:
        The run's directory, or None when no run qualifies.
    """
    wanted = {k: v for k, v in spec.items() if k != "sites"}
    for info in reversed(runs.list_runs(home)):
        run_dir = Path(info["run_dir"])
        unscored = evaluated and not any((run_dir / "evaluations").glob("*.json"))
        if info.get("status") != "done" or info.get("rounds_done") != spec.get("rounds") or unscored:
            continue
        try:
            submitted = yaml.safe_load((run_dir / "spec.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(submitted, dict) and {k: v for k, v in submitted.items() if k != "sites"} == wanted:
            return run_dir
    return None


SOURCE_FILE = "benchmark-source.json"  # in each run directory: the checkout that ran it


def source_commit() -> str:
    """The checkout's git commit (``+dirty`` with uncommitted changes); outside git (a copy of the
    tree, so that the checkout can change while the benchmark runs) ``FEDIMG_SOURCE_COMMIT``, else ``unknown``."""
    import subprocess

    if not (ROOT / ".git").exists() and os.environ.get("FEDIMG_SOURCE_COMMIT"):
        return os.environ["FEDIMG_SOURCE_COMMIT"].strip()[:40]
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}+dirty" if dirty else head


def run_commit(run_dir: Path) -> str:
    """The commit a benchmark run was made with (`SOURCE_FILE`), or ``unknown`` for a run from before it was recorded."""
    try:
        return str(json.loads((Path(run_dir) / SOURCE_FILE).read_text()).get("git_commit", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def run_label(method: str, seed: int, seeds: list[int]) -> str:
    """The method's name on the comparison page: ``fedavg``, or ``fedavg seed 1`` with several seeds."""
    return method if len(seeds) == 1 else f"{method} seed {seed}"


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (distinct, in order).

    Raises:
        ValueError: a seed that is not an integer >= 0, or none at all.
    """
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"--seeds: integers >= 0, comma-separated (got {text!r})")
    return list(dict.fromkeys(seeds))


def steady_round_s(metrics: dict[str, Any]) -> float | None:
    walls = [r["wall_s"] for r in metrics.get("rounds", [])[1:]]
    return statistics.median(walls) if walls else None


def mean_step_s(metrics: dict[str, Any]) -> float | None:
    steps = [row["train"]["step_s"] for r in metrics.get("rounds", [])[1:] for row in r["sites"].values() if "step_s" in row.get("train", {})]
    return statistics.mean(steps) if steps else None


IN_PROCESS = ("centralised",)  # trained in this process, after the federated runs
ENSEMBLE = "standalone ensemble"  # the standalone run's joint model (`PartialLabelEnsemble`)
DEFAULT_METHODS = "fedavg,fedprox,fedopt,scaffold,condistfl,condistfl_scaffold,standalone,centralised"
# the federated methods the judged one is set against, in the verdict's order
FEDERATED = ("fedavg", "fedprox", "fedopt", "scaffold", "condistfl")
MAIN_JOB = "condistfl_scaffold"  # the main job's method: judged when measured, else the paper's ConDistFL
NAMES = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedopt": "FedOpt", "scaffold": "SCAFFOLD", "condistfl": "ConDistFL",
         "condistfl_scaffold": "ConDistFL + SCAFFOLD", "condistfl_scaffold_bf16": "ConDistFL + SCAFFOLD, bf16 transfer", "standalone": "standalone",
         ENSEMBLE: "standalone ensemble", "centralised": "centralised"}  # fmt: skip
MODELS = ("global", "local")
PLACES = ("in_fed", "oof")
SCOPES = {("global", "in_fed"): "In federation, global", ("global", "oof"): "Out of federation, global",
          ("local", "in_fed"): "In federation, local", ("local", "oof"): "Out of federation, local"}  # fmt: skip
TABLE_TITLES = {
    ("global", "in_fed"): "(a) global model, in federation: each site's test cases, per class at the site(s) labelling it",
    ("global", "oof"): "(b) global model, out of federation (lesions merged into their organ)",
    ("local", "in_fed"): "(c) the sites' best local models, in federation: each site's test cases, its own classes",
    ("local", "oof"): "(c) the sites' best local models, out of federation: mean over the sites' models",
}  # fmt: skip
GOAL_RATIO = 0.9  # issue 20: ConDistFL's global model >= 0.9 x the centralised model


def demo_budget() -> tuple[int, int]:
    """The demo spec's rounds and local steps (the benchmark's defaults: it follows the demo).

    Returns:
        ``(rounds, local_steps)``.
    """
    raw = yaml.safe_load(default_spec_text())
    return int(raw["rounds"]), int(raw["local_steps"])


def parse_cases(text: str | None) -> list[int] | None:
    """``--cases``: cases per site, comma-separated, cycled over the sites (as `coordinator testbed --cases`).

    Args:
        text: the option's value (None: the testbed's default).

    Returns:
        The counts, or None for the testbed's default.

    Raises:
        ValueError: a count that is not an integer >= 1.
    """
    if text is None:
        return None
    try:
        counts = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--cases: integers >= 1, comma-separated (got {text!r})")
    return counts


# -- statistics over seeds (pure) --------------------------------------------------------------


def run_scores(record: Mapping[str, Any], oof_dataset: str | None) -> dict[str, Any]:
    """One federated run's scores from its comparison record (`coordinator.report.method_record`).

    Args:
        record: the run's record (``comparison.json``'s ``runs``).
        oof_dataset: the out-of-federation dataset's name (None: none).

    Returns:
        ``{"global": {"in_fed": ..., "oof": ...} | None, "local": {...}}``, each a class name -> Dice mapping or None:
        in-federation Dice only on test cases (a run without test cases has none), no global model for a standalone run.
    """
    on_test = record.get("split") == "test"
    oof = (record.get("oof") or {}).get(oof_dataset) or {} if oof_dataset else {}

    def dice(entry: Any) -> dict[str, float] | None:
        return dict(entry["dice"]) if isinstance(entry, Mapping) and entry.get("dice") else None

    glob = None if record.get("mode") == "standalone" else {"in_fed": dice(record.get("global")) if on_test else None, "oof": dice(oof.get("global"))}
    return {"global": glob, "local": {"in_fed": dice(record.get("local")) if on_test else None, "oof": dice(oof.get("local_mean"))}}


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and count.

    Args:
        values: one value per seed.

    Returns:
        ``{"values", "n", "mean", "sd"}``: mean None without values, sd None below 2 values.
    """
    vals = [float(v) for v in values]
    return {"values": vals, "n": len(vals), "mean": statistics.fmean(vals) if vals else None, "sd": statistics.stdev(vals) if len(vals) > 1 else None}


def group_mean(dice: Mapping[str, float] | None, classes: Sequence[str]) -> float | None:
    """The mean Dice over the given classes that were scored (None: none scored).

    Args:
        dice: class name -> Dice (None: nothing scored).
        classes: the group (organs, or tumours).

    Returns:
        The mean, or None.
    """
    vals = [float(dice[c]) for c in classes if dice and dice.get(c) is not None]
    return statistics.fmean(vals) if vals else None


def seed_statistics(records: Sequence[Mapping[str, Any]], organs: Sequence[str], tumours: Sequence[str]) -> dict[str, Any]:
    """Per method, model and place: per class, organ mean and tumour mean, the mean / sd / n over the seeds' runs.

    Args:
        records: one per run: ``method``, ``seed``, ``global`` and ``local`` (each None or ``{"in_fed": dice, "oof": dice}``,
            dice a class name -> Dice mapping or None).
        organs: the organ classes (the organ mean).
        tumours: the lesion classes (reported apart).

    Returns:
        ``{method: {model: {place: {"classes": {class: stat}, "organs": stat, "tumours": stat}}}}`` (`stat`), only where
        some run was scored; methods in record order.
    """
    values: dict[str, dict[str, dict[str, dict[str, list[float]]]]] = {}
    for r in records:
        for model in MODELS:
            for place in PLACES:
                dice = (r.get(model) or {}).get(place)
                if not dice:
                    continue
                cell = values.setdefault(str(r["method"]), {}).setdefault(model, {}).setdefault(place, {})
                for c, v in dice.items():
                    if v is not None:
                        cell.setdefault(c, []).append(float(v))
                for key, group in (("@organs", organs), ("@tumours", tumours)):
                    g = group_mean(dice, group)
                    if g is not None:
                        cell.setdefault(key, []).append(g)
    out: dict[str, Any] = {}
    for method, models in values.items():
        for model, places in models.items():
            for place, cell in places.items():
                out.setdefault(method, {}).setdefault(model, {})[place] = {
                    "classes": {c: stat(v) for c, v in cell.items() if not c.startswith("@")},
                    "organs": stat(cell.get("@organs", [])),
                    "tumours": stat(cell.get("@tumours", [])),
                }
    return out


def _mean_sd(s: Mapping[str, Any]) -> str:
    return f"{s['mean']:.3f}" + (f" ± {s['sd']:.3f}" if s.get("sd") is not None else "")


def compare_sentence(scope: str, a_name: str, a: Mapping[str, Any] | None, b_name: str, b: Mapping[str, Any] | None) -> str:
    """One verdict line: method a against method b (organ means over seeds), and whether the difference exceeds the
    seed-to-seed spread (|mean_a - mean_b| > sd_a + sd_b: the intervals mean ± sd do not overlap).

    Args:
        scope: e.g. ``"In federation, global"``.
        a_name: the method judged (the main job's, ConDistFL + SCAFFOLD, or the paper's ConDistFL).
        a: its `stat` (None: not measured).
        b_name: the method it is compared with.
        b: its `stat`.

    Returns:
        The sentence.
    """
    missing = [name for name, s in ((a_name, a), (b_name, b)) if s is None or s.get("mean") is None]
    if missing:
        return f"{scope}: no score for {' and '.join(missing)}, nothing to compare."
    assert a is not None and b is not None
    n = f"n = {a['n']} seed{'s' if a['n'] != 1 else ''}" if a["n"] == b["n"] else f"n = {a['n']} and {b['n']} seeds"
    head = f"{scope}: {a_name} {_mean_sd(a)} vs {b_name} {_mean_sd(b)} ({n})"
    diff = a["mean"] - b["mean"]
    word = "advantage" if diff > 0 else "deficit" if diff < 0 else "difference"
    if a.get("sd") is None or b.get("sd") is None:
        return f"{head}: the {word} ({diff:+.3f}) cannot be set against the seed-to-seed spread (fewer than 2 seeds)."
    spread = a["sd"] + b["sd"]
    verdict = "exceeds" if abs(diff) > spread else "is within"
    return f"{head}: the {word} ({diff:+.3f}) {verdict} the seed-to-seed spread (sd {a['sd']:.3f} + {b['sd']:.3f} = {spread:.3f})."


def ratio_stat(records: Sequence[Mapping[str, Any]], num: str, den: str, place: str, organs: Sequence[str]) -> dict[str, Any]:
    """Per seed, the ratio of two methods' global organ means (``num`` / ``den``, same training seed), over the seeds.

    Args:
        records: as `seed_statistics` takes them.
        num: the numerator's method.
        den: the denominator's method.
        place: ``in_fed`` or ``oof``.
        organs: the organ classes.

    Returns:
        The `stat` of the per-seed ratios (seeds where either is missing, or the denominator is 0, left out).
    """

    def organ_means(method: str) -> dict[int, float]:
        out = {}
        for r in records:
            if r["method"] == method:
                g = group_mean(((r.get("global") or {}).get(place)), organs)
                if g is not None:
                    out[int(r["seed"])] = g
        return out

    a, b = organ_means(num), organ_means(den)
    return stat([a[s] / b[s] for s in a if s in b and b[s] > 0])


def verdict(stats: Mapping[str, Any], records: Sequence[Mapping[str, Any]], organs: Sequence[str], judged: str = "condistfl") -> list[str]:
    """The benchmark's verdict in plain words: the judged method against every other one (federated baselines first, then
    standalone training: its ensemble for the global model, its local models for the local ones), in and out of
    federation, for global and local models (organ means over seeds), then its global / centralised ratio.

    Args:
        stats: `seed_statistics`.
        records: the runs' records (for the per-seed ratios).
        organs: the organ classes.
        judged: the method judged.

    Returns:
        One sentence per comparison.
    """
    lines = []
    for model, place in SCOPES:
        others = [m for m in FEDERATED if m in stats and m != judged] + [ENSEMBLE if model == "global" else "standalone"]
        for other in others:
            if other not in stats and other not in FEDERATED:
                continue
            a = stats.get(judged, {}).get(model, {}).get(place, {}).get("organs")
            b = stats.get(other, {}).get(model, {}).get(place, {}).get("organs")
            lines.append(compare_sentence(f"{SCOPES[(model, place)]} (organ mean)", NAMES.get(judged, judged), a, NAMES.get(other, other), b))
    if "centralised" in stats:
        for place, where in (("in_fed", "in federation"), ("oof", "out of federation")):
            r = ratio_stat(records, judged, "centralised", place, organs)
            if r["mean"] is None:
                lines.append(f"{NAMES.get(judged, judged)} global / centralised, {where}: not measured (no seed with both).")
                continue
            spread = f" ± {r['sd']:.3f}" if r["sd"] is not None else ""
            side = "at or above" if r["mean"] >= GOAL_RATIO else "below"
            lines.append(f"{NAMES.get(judged, judged)} global / centralised, {where} (organ means, per seed): {r['mean']:.3f}{spread} "
                         f"(n = {r['n']} seed{'s' if r['n'] != 1 else ''}): the mean is {side} the goal of {GOAL_RATIO:.2f}.")  # fmt: skip
    return lines


def stats_rows(stats: Mapping[str, Any], model: str, place: str, classes: Sequence[str]) -> list[list[str]]:
    """One table's rows: per method, ``mean ± sd (n)`` per class, organ mean and tumour mean.

    Args:
        stats: `seed_statistics`.
        model: ``global`` or ``local``.
        place: ``in_fed`` or ``oof``.
        classes: the class columns.

    Returns:
        ``[method, *classes, organs, tumours]`` per method with scores there.
    """
    rows = []
    for method, models in stats.items():
        cell = models.get(model, {}).get(place)
        if not cell:
            continue
        row = [NAMES.get(method, method)] + [_cell(cell["classes"].get(c)) for c in classes]
        rows.append(row + [_cell(cell["organs"]), _cell(cell["tumours"])])
    return rows


def _cell(s: Mapping[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{_mean_sd(s)} ({s['n']})"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table.

    Args:
        columns: the header.
        rows: the cells.

    Returns:
        The table's text.
    """
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- the in-process baselines -------------------------------------------------------------------


def centralised_key(spec_raw: Mapping[str, Any], steps: int, seed: int) -> dict[str, Any]:
    """What a centralised model's scores depend on: the spec's plan_args, optimizer and split, the steps and the seed (as JSON)."""
    key = {k: spec_raw.get(k) for k in ("plan_args", "optimizer", "split")} | {"steps": steps, "seed": seed}
    return dict(json.loads(json.dumps(key, default=str)))


def read_kept(path: Path, key: Mapping[str, Any]) -> dict[str, Any] | None:
    """A kept centralised score (``{"key", "record", "seconds"}``) when it was computed for ``key``; None when absent, unreadable or other."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and kept.get("key") == key and isinstance(kept.get("record"), dict) else None


def in_process_baselines(bed: Testbed, spec_raw: dict[str, Any], seeds: list[int], methods: list[str], standalone_runs: Mapping[int, Path],
                         total_steps: int, console: Console, cache: Path | None = None,
                         resume: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """The centralised model (per seed) and the standalone ensemble (per standalone run), scored like the federation's models.

    Args:
        bed: the testbed (its sites' prepared datasets and the out-of-federation set; the nodes may be down).
        spec_raw: the spec every method ran (plan_args, optimizer, split).
        seeds: the training seeds.
        methods: the benchmark's methods.
        standalone_runs: seed -> the standalone run's directory.
        total_steps: the centralised model's steps (sites x rounds x local steps).
        console: progress and messages.
        cache: a folder where each centralised model's scores are kept (``centralised-seed<k>.json``,
            with what they depend on: plan_args, optimizer, split, steps, seed).
        resume: reuse a kept score whose dependencies are this run's instead of training again.

    Returns:
        ``(records, facts)``: one record per model as `seed_statistics` takes them; facts (test cases, seconds).
    """
    import method_baselines as mb  # torch and MONAI: only when a baseline is asked for

    from coordinator import spec as spec_mod
    from coordinator.evaluate import _models  # where a run's local checkpoints are (best, else last)
    from pipelines.plan_args import parse_plan_args
    from pipelines.splits import SplitSettings
    from preprocessing.schema import parse_schema

    spec = spec_mod.parse(yaml.safe_dump(spec_raw, sort_keys=False), "benchmark spec")
    args = spec.experiment_model_args()
    settings = parse_plan_args(args, parse_schema(args["schema_definition"], "benchmark spec"))
    split = SplitSettings.from_mapping(spec.split)
    threads = os.cpu_count() or 1  # the nodes are idle (stopped) now: every core for the in-process training
    sites = [mb.load_site(runs.safe_name(site.site_name, "site"), bed.dataset_dir(i), settings, split) for i, site in enumerate(bed.sites)]
    trained = sorted({c for s in sites for c in s.classes})
    oof_volumes: list[mb.Volume] = []
    classes: list[int] = []
    merge = False
    if bed.oof_phase and (bed.oof_dataset / "manifest.json").is_file():
        classes, merge = mb.oof_classes(bed.oof_dataset, settings)
        oof_volumes = mb.labelled_volumes(bed.oof_dataset, settings)[1]
    scored_oof = mb.oof_settings(settings, trained)
    facts: dict[str, Any] = {"test_cases": {s.name: len(s.test) for s in sites}, "training_cases": {s.name: len(s.training) for s in sites},
                             "oof_cases": len(oof_volumes), "torch_threads": threads, "centralised_s": {}, "centralised_steps": total_steps}  # fmt: skip

    def scores(net: Any) -> dict[str, Any]:
        with mb.torch_threads(threads):
            in_fed = mb.named(mb.site_test_dice(net, sites, settings)[0], settings)
            oof = mb.named(mb.oof_dice(net, oof_volumes, scored_oof, classes, merge), settings) if oof_volumes else None
        return {"in_fed": in_fed or None, "oof": oof or None}

    records: list[dict[str, Any]] = []
    if "centralised" in methods:
        train = [(image, label, s.classes) for s in sites for image, label in s.training]
        for seed in seeds:
            key = centralised_key(spec_raw, total_steps, seed)
            kept = cache / f"centralised-seed{seed}.json" if cache else None
            old = read_kept(kept, key) if resume and kept is not None else None
            if old is not None:
                console.print(f"centralised seed {seed}: reusing {kept} (same plan_args, optimizer, split, steps)", markup=False, highlight=False)
                records.append(old["record"])
                facts["centralised_s"][str(seed)] = old.get("seconds")
                continue
            console.rule(f"centralised seed {seed}: {total_steps} steps on {len(train)} pooled training cases, {threads} torch threads")
            t0 = time.monotonic()
            net = mb.train_centralised(train, settings, total_steps, float(spec.optimizer["lr"]), float(spec.optimizer.get("weight_decay", 1e-5)),
                                       seed, console, threads=threads, label=f"centralised seed {seed}")  # fmt: skip
            facts["centralised_s"][str(seed)] = time.monotonic() - t0
            with console.status(f"scoring the centralised model (seed {seed})"):
                records.append({"method": "centralised", "seed": seed, "global": scores(net), "local": None})
            if kept is not None:
                kept.parent.mkdir(parents=True, exist_ok=True)
                atomic.write_text(kept, json.dumps({"key": key, "record": records[-1], "seconds": facts["centralised_s"][str(seed)]}, default=str))
    for seed, run_dir in standalone_runs.items():
        found = _models(run_dir, runs.read_metrics(run_dir))
        checkpoints = {key.split(":", 1)[1]: path for key, (_, path) in found.items() if key.startswith("local:")}
        members = mb.load_members(checkpoints, sites, settings)
        if not members:
            console.print(f"[yellow]standalone seed {seed}: no local checkpoints under {run_dir}: no ensemble")
            continue
        ensemble = mb.PartialLabelEnsemble(members, settings.num_classes, settings.spatial_dims)
        with console.status(f"scoring the standalone ensemble (seed {seed}, {len(members)} models)"):
            records.append({"method": ENSEMBLE, "seed": seed, "global": scores(ensemble), "local": None})
    return records, facts


# -- the benchmark ------------------------------------------------------------------------------


def main() -> int:
    rounds0, steps0 = demo_budget()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=rounds0, help=f"default: the demo spec's ({rounds0})")
    ap.add_argument("--steps", type=int, default=steps0, help=f"local steps per round; default: the demo spec's ({steps0})")
    ap.add_argument("--cases", default=str(DEMO_CASES_PER_SITE), help="cases per site, comma-separated, cycled over the sites (default: the main job's)")
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, comma-separated: every method runs once per seed")
    ap.add_argument("--split-seed", type=int, default=0, help="the split's seed: the same held-out cases for every method and seed")
    ap.add_argument("--workdir", type=Path, default=None, help="default: .benchmarks/federation-methods-<time>")
    ap.add_argument("--resume", action="store_true",
                    help="reuse --workdir's finished, evaluated runs whose spec is the one this run would submit, and its "
                         "centralised models' scores of the same spec and steps (a benchmark spread over several sittings)")  # fmt: skip
    args = ap.parse_args()
    if args.resume and args.workdir is None:
        ap.error("--resume needs --workdir: the folder of the benchmark to go on with")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS and m not in IN_PROCESS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; known: {', '.join([*METHODS, *IN_PROCESS])}")
    try:
        seeds = parse_seeds(args.seeds)
        cases = parse_cases(args.cases)
    except ValueError as e:
        ap.error(str(e))
    if args.split_seed < 0 or args.rounds < 1 or args.steps < 1:
        ap.error("--split-seed: an integer >= 0; --rounds, --steps: integers >= 1")
    console = Console()
    command = shlex.join([".venv/bin/python", "benchmarks/federation_methods.py", *sys.argv[1:]])
    workdir = (args.workdir or ROOT / ".benchmarks" / f"federation-methods-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    setup_logging()  # the testbed's progress lines
    n_sites = 4
    bed = Testbed(workdir, n_sites=n_sites, out=lambda line: console.print(line, markup=False, highlight=False),
                  oof_phase="non_contrast", cases=cases)  # fmt: skip
    federated = [m for m in methods if m in METHODS]
    commit = source_commit()
    reused: dict[str, Path] = {}
    if args.resume and (workdir / "coordinator").is_dir():
        for seed in seeds:
            for method in federated:
                found = finished_run(bed.home, spec_for(method, args.rounds, args.steps, seed, args.split_seed))
                if found is not None:
                    reused[run_label(method, seed, seeds)] = found
        for label, found in reused.items():
            console.print(
                f"{label}: reusing {found.name} (finished, evaluated, same spec; made with commit {run_commit(found)})", markup=False, highlight=False
            )
    run_dirs: dict[str, Path] = {}
    method_of: dict[str, str] = {}
    seed_of: dict[str, int] = {}
    t_start = time.monotonic()
    try:
        with console.status(f"setting up {n_sites} phantom sites, the out-of-federation set and the nodes"):
            bed.setup_sites()
            if len(reused) < len(federated) * len(seeds):
                bed.start_nodes()
        for seed in seeds:
            for method in federated:
                label = run_label(method, seed, seeds)
                if label in reused:
                    run_dirs[label], method_of[label], seed_of[label] = reused[label], method, seed
                    continue
                console.rule(f"{label}: {args.rounds} rounds x {args.steps} steps, split seed {args.split_seed}")
                spec = spec_for(method, args.rounds, args.steps, seed, args.split_seed)
                code = bed.run_spec(yaml.safe_dump(spec, sort_keys=False))
                if code != 0:
                    console.print(f"[red]{label}: run failed ({code})")
                    return 1
                code = bed.evaluate_and_report()
                if code != 0:
                    console.print(f"[red]{label}: evaluation failed ({code})")
                    return 1
                run_dirs[label] = Path(runs.list_runs(bed.home)[-1]["run_dir"])
                atomic.write_text(run_dirs[label] / SOURCE_FILE, json.dumps({"git_commit": commit}))  # what --resume reports
                method_of[label] = method
                seed_of[label] = seed
    finally:
        bed.teardown()

    out = workdir / "comparison"
    out.mkdir(parents=True, exist_ok=True)
    table_json: dict[str, Any] = {"runs": [], "oof_datasets": {}}
    if run_dirs:
        compare_runs(list(run_dirs.values()), out, labels=list(run_dirs))
        table_json = json.loads((out / "comparison.json").read_text())
        console.print((out / "comparison.md").read_text(), markup=False, highlight=False)
    oof_names = sorted(table_json.get("oof_datasets") or {})
    oof_name = oof_names[0] if oof_names else None
    if len(oof_names) > 1 and (bed.oof_dataset / "manifest.json").is_file():
        from preprocessing.dataset import load_dataset

        oof_name = load_dataset(bed.oof_dataset).name  # the testbed's out-of-federation set (`coordinator evaluate` names its record so)
    records: list[dict[str, Any]] = []
    for r in table_json["runs"]:
        label = str(r["method"])
        if label in method_of:
            records.append({"method": method_of[label], "seed": seed_of[label], **run_scores(r, oof_name)})

    facts: dict[str, Any] = {}
    standalone_runs = {seed_of[label]: d for label, d in run_dirs.items() if method_of[label] == "standalone"}
    if "centralised" in methods or standalone_runs:
        base = spec_for(federated[0] if federated else "fedavg", args.rounds, args.steps, seeds[0], args.split_seed)
        extra, facts = in_process_baselines(bed, base, seeds, methods, standalone_runs, n_sites * args.rounds * args.steps, console,
                                            cache=workdir / "comparison", resume=args.resume)  # fmt: skip
        records += extra
    order = [m for m in methods if m != "centralised"] + ([ENSEMBLE] if standalone_runs else []) + (["centralised"] if "centralised" in methods else [])
    records.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order), r["seed"]))

    from preprocessing.schema import load_schema

    schema = load_schema()
    organs = [o for o in schema.groups]
    tumours = [x for lesions in schema.groups.values() for x in lesions]
    class_order = [c for c in schema.classes if c != "background"]
    stats = seed_statistics(records, organs, tumours)
    words = verdict(stats, records, organs, judged=MAIN_JOB if MAIN_JOB in stats else "condistfl")
    md_tables = []
    for (model, place), title in TABLE_TITLES.items():
        rows = stats_rows(stats, model, place, class_order)
        if not rows:
            continue
        columns = ["method", *class_order, "organ mean", "tumour mean"]
        t = Table(title=f"{title}: mean ± sd (n seeds) over seeds {', '.join(map(str, seeds))}")
        for col in columns:
            t.add_column(col, justify="right")
        for row in rows:
            t.add_row(*row)
        console.print(t)
        md_tables.append(f"### {title}\n\nmean ± sd (n = seeds) over training seeds {', '.join(map(str, seeds))}\n\n{markdown_table(columns, rows)}\n")
    console.rule("verdict")
    for line in words:
        console.print(line, markup=False, highlight=False)

    first = {method_of[label]: label for label in reversed(list(run_dirs))}  # each method's run of the first seed
    metrics = {m: runs.read_metrics(run_dirs[label]) for m, label in sorted(first.items(), key=lambda kv: methods.index(kv[0]))}
    if metrics:
        t = Table(title=f"round time (steady rounds 2..R, median) and local step time (mean), seed {seeds[0]}")
        for col in ("method", "round s", "step s", "round / fedavg", "step / fedavg"):
            t.add_column(col, justify="right")
        base_round = steady_round_s(metrics["fedavg"]) if "fedavg" in metrics else None
        base_step = mean_step_s(metrics["fedavg"]) if "fedavg" in metrics else None
        for m, mt in metrics.items():
            rs, ss = steady_round_s(mt), mean_step_s(mt)
            t.add_row(m, f"{rs:.2f}" if rs else "-", f"{ss:.3f}" if ss else "-",
                      f"{rs / base_round:.3f}" if rs and base_round else "-", f"{ss / base_step:.3f}" if ss and base_step else "-")  # fmt: skip
        console.print(t)
    else:
        base_round = None
    summary: dict[str, Any] = {
        "command": command, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu_count": os.cpu_count(),
        "rounds": args.rounds, "steps": args.steps, "cases_per_site": cases, "seeds": seeds, "split_seed": args.split_seed,
        "methods": methods, "reused_runs": {label: str(d) for label, d in reused.items()}, "git_commit": commit,
        "run_commits": {label: run_commit(d) for label, d in run_dirs.items()}, "run_dirs": {label: str(d) for label, d in run_dirs.items()}, "method_of": method_of, "seed_of": seed_of,
        "comparison": table_json, "records": records, "stats": stats, "verdict": words, "baselines": facts,
        "test_dice_over_seeds": seed_summary(table_json["runs"], method_of),
        "round_s": {m: steady_round_s(mt) for m, mt in metrics.items()},
        "step_s": {m: mean_step_s(mt) for m, mt in metrics.items()},
        "total_wall_s": time.monotonic() - t_start,
    }  # fmt: skip
    if "condistfl" in metrics and base_round:
        summary["condistfl_over_fedavg_round_time"] = summary["round_s"]["condistfl"] / base_round
        console.print(f"ConDistFL / FedAvg round time (same benchmark, seed {seeds[0]}): {summary['condistfl_over_fedavg_round_time']:.3f}")
    atomic.write_text(out / "benchmark.json", json.dumps(summary, indent=2, default=str))  # never a truncated result
    atomic.write_text(out / "results.md", results_markdown(summary, md_tables))
    if run_dirs:
        console.print(f"comparison page: {out / 'index.html'}")
    console.print(f"results: {out / 'results.md'}  (total {summary['total_wall_s'] / 60:.1f} min)")
    return 0


def results_markdown(summary: Mapping[str, Any], tables: Sequence[str]) -> str:
    """The benchmark's ``results.md``: command, date, machine, budget, n, the tables and the verdict.

    Args:
        summary: what ``benchmark.json`` holds.
        tables: the markdown tables with their headings.

    Returns:
        The text.
    """
    facts = summary.get("baselines") or {}
    tests = facts.get("test_cases") or {}
    lines = [
        "# Federation methods over training seeds",
        "",
        f"- Command: `{summary['command']}`",
        f"- Date: {summary['date_utc']}; machine: {summary['cpu_count']} CPU cores; wall time {summary['total_wall_s'] / 60:.1f} min; "
        f"commit {summary.get('git_commit', 'unknown')}",
        f"- Budget: {summary['rounds']} rounds x {summary['steps']} local steps per site; centralised: "
        f"{facts.get('centralised_steps', '-')} steps in this process ({facts.get('torch_threads', '-')} torch threads)",
        f"- Seeds {', '.join(map(str, summary['seeds']))}, split seed {summary['split_seed']}; cases per site: "
        f"{summary['cases_per_site'] or 'the testbed default'}",
    ]
    if tests:
        lines.append(f"- Test cases per site: {', '.join(f'{k} {v}' for k, v in tests.items())}; out-of-federation cases: {facts.get('oof_cases', '-')}")
    if summary.get("reused_runs"):
        commits = summary.get("run_commits") or {}
        kept = ", ".join(f"{label} ({Path(d).name}, commit {commits.get(label, 'unknown')})" for label, d in summary["reused_runs"].items())
        lines.append(f"- Reused from an earlier sitting (`--resume`: finished, evaluated, same spec; the wall time counts this sitting only): {kept}")
    lines += [
        "- Cells: mean ± sample sd over seeds (n = seeds with a score). Organ mean: kidney, liver, pancreas, spleen; tumours apart.",
        "",
        *tables,
        "## Verdict",
        "",
        *[f"- {line}" for line in summary["verdict"]],
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
