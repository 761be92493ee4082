"""Cross-modality federation: federated without GIN, federated with GIN, and centralised.

One testbed: K phantom hospitals (real Fed-BioMed nodes on loopback), alternately CT and
MR-like scanners (`--modalities`), each single-modality, every one labelling the same
organs, written as DICOM and converted with `site-agent prepare`. Two test sets from other
patients, one CT and one MR-like, are scored per class.

    fed            FedAvg (`plan: marginal`), the spec `coordinator/examples/phantom_cross_modality.yaml` without GIN
    fed + GIN      the same spec with `plan_args.gin` (the example's setting)
    centralised    the same network, objective, patches, optimizer and schedule in this process on every
                   site's training cases pooled (each site's split from `pipelines.splits` with the spec's
                   `split`: the same cases the federation trained on), with GIN,
                   for as many optimizer steps as the federation ran in all (rounds x local steps x sites)

Federated models are the coordinator's best global model (selected on the sites'
validation cases); the centralised model is its last. The table gives mean Dice per test
set and class and the federated / centralised ratio (the paper's 93-98 % claim).

    .venv/bin/python benchmarks/cross_modality_gin.py                          # ~30 min on 2 cores
    .venv/bin/python benchmarks/cross_modality_gin.py --rounds 2 --steps 10    # quick look

Writes <workdir>/report/ (summary.json, dice.png, GIN examples). Numbers are printed as
measured, whichever way they fall.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # method_baselines (the name "benchmarks" is taken by opacus)

from method_baselines import labelled_volumes, train_centralised, training_volumes  # noqa: E402

from coordinator import runs  # noqa: E402
from coordinator import spec as spec_mod  # noqa: E402
from coordinator.evaluate import evaluate_run  # noqa: E402
from coordinator.testbed import Testbed  # noqa: E402
from fedimg_core.logs import setup_logging  # noqa: E402
from pipelines.plan_args import SegmentationSettings  # noqa: E402
from pipelines.splits import SplitSettings  # noqa: E402
from pipelines.training import class_means, evaluate_case, parse_plan_args  # noqa: E402
from preprocessing.schema import load_schema  # noqa: E402

SPEC = ROOT / "coordinator" / "examples" / "phantom_cross_modality.yaml"
CENTRAL = "centralised + GIN"  # the reference of the ratio


def volumes_of(dataset: Path, settings: SegmentationSettings) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The labelled cases of a prepared dataset through the plans' deterministic chain."""
    return labelled_volumes(dataset, settings)[1]


def score(net, test: list, settings, classes: list[int]) -> dict[int, float]:
    """Scored as `coordinator evaluate` scores the federated models: the test sets label
    organs but not their lesions, so lesion predictions are merged into their organ."""
    return class_means([evaluate_case(net, image, label, settings, classes, merge_lesion_classes=True) for image, label in test], classes)


def gin_examples(report: Path, volume: torch.Tensor, gin: dict, title: str) -> None:
    """One axial slice through GIN with a few seeds: what the sites' models see."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.gin import GINAugmentation

    z = volume.shape[-1] // 2
    image = volume[..., z]  # (C, X, Y): GIN in 2D on the slice
    t = GINAugmentation(**{**gin, "prob": 1.0})
    fig, axes = plt.subplots(1, 6, figsize=(12, 2.4))
    axes[0].imshow(image[0].T, cmap="gray")
    axes[0].set_title(title, fontsize=8)
    for j, ax in enumerate(axes[1:]):
        t.set_random_state(j)
        ax.imshow(torch.as_tensor(t(image))[0].T, cmap="gray")
        ax.set_title(f"GIN seed {j}", fontsize=8)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(report / f"gin_{title.lower().replace(' ', '_')}.png", dpi=80)
    plt.close(fig)


def plot(report: Path, table: dict, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(5 * len(table), 3.2), squeeze=False)
    for ax, (test, rows) in zip(axes[0], table.items()):
        width = 0.8 / len(rows)
        for i, (label, dice) in enumerate(rows.items()):
            ax.bar([j + i * width for j in range(len(names) + 1)], [dice.get(n, 0.0) for n in names] + [dice["mean"]], width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names) + 1)], names + ["mean"])
        ax.set_ylim(0, 1)
        ax.set_title(f"{test} test set: Dice")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "dice.png", dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--modalities", default="CT,MR", help="cycled over the sites")
    ap.add_argument("--classes", default="liver,spleen,kidney", help="what every site (and the test sets) labels")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=80, help="local steps per site per round")
    ap.add_argument("--test-cases", type=int, default=4, help="cases per modality's test set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="score the federated runs already in --workdir; train only the centralised model")
    ap.add_argument("--workdir", type=Path, default=None, help="default: .benchmarks/cross-modality-<time>")
    args = ap.parse_args()
    console = Console()
    workdir = (args.workdir or ROOT / ".benchmarks" / f"cross-modality-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    report = workdir / "report"
    report.mkdir(parents=True, exist_ok=True)
    modalities = [m.strip().upper() for m in args.modalities.split(",") if m.strip()]
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    base = yaml.safe_load(SPEC.read_text())
    gin = base["plan_args"]["gin"]
    schema = load_schema()
    t_start = time.monotonic()

    setup_logging()  # the testbed's progress lines
    bed = Testbed(workdir, n_sites=args.sites, modalities=modalities, classes=classes,
                  out=lambda line: console.print(line, markup=False, highlight=False))  # fmt: skip
    tests = {m: workdir / "test-sets" / m.lower() for m in sorted(set(modalities))}
    run_dirs: dict[str, Path] = {}
    names_of = {"fed": "xmod-nogin", "fed + GIN": "xmod-gin"}
    if args.reuse:
        from site_agent import config as site_config

        bed.sites = [site_config.load(bed.site_config_path(i)) for i in range(args.sites)]
        for variant, name in names_of.items():
            done = [Path(r["run_dir"]) for r in runs.list_runs(bed.home) if f"-{name}-" in Path(r["run_dir"]).name]
            if not done:
                console.print(f"[red]--reuse: no {name} run under {bed.home}")
                return 1
            run_dirs[variant] = done[-1]
    else:
        try:
            with console.status(f"setting up {args.sites} sites ({', '.join(bed.modality(i) for i in range(args.sites))}), the test sets and the nodes"):
                bed.setup_sites()
                for k, (modality, path) in enumerate(tests.items()):
                    cmd = [sys.executable, "-m", "coordinator.testbed_site", "data", "--out", str(path), "--seed", str(90 + k),
                           "--phase", "portal_venous", "--modality", modality, "--classes", ",".join(classes),
                           "--cases", str(args.test_cases), "--name", f"test-{modality.lower()}"]  # fmt: skip
                    res = subprocess.run(cmd, capture_output=True, text=True)
                    if res.returncode != 0:
                        console.print(f"[red]{modality} test set failed: {res.stderr.strip()[-800:]}")
                        return 1
                bed.start_nodes()
            for variant, use_gin in (("fed", False), ("fed + GIN", True)):
                spec = {**base, "name": names_of[variant], "rounds": args.rounds, "local_steps": args.steps, "seed": args.seed}
                spec["plan_args"] = {**base["plan_args"], "gin": gin if use_gin else None}
                console.rule(f"{variant}: {args.rounds} rounds x {args.steps} steps on {args.sites} sites")
                code = bed.run_spec(yaml.safe_dump(spec, sort_keys=False))
                if code != 0:
                    console.print(f"[red]{variant}: run failed ({code})")
                    return 1
                run_dirs[variant] = Path(runs.list_runs(bed.home)[-1]["run_dir"])
        finally:
            bed.teardown()

    settings = parse_plan_args({k: v for k, v in base["plan_args"].items() if k != "schema"}, schema)
    names = {v: k for k, v in schema.classes.items()}
    class_ids = sorted(schema.classes[c] for c in classes)
    table: dict[str, dict[str, dict[str, float]]] = {m: {} for m in tests}
    for variant, run_dir in run_dirs.items():
        for modality, path in tests.items():
            record = evaluate_run(run_dir, path)
            mean = record["models"]["global"]["mean"]
            table[modality][variant] = {**mean, "mean": sum(mean.values()) / len(mean)}

    # centralised: every site's training cases pooled; the split is the spec's (the same cases as the federation's sites hold out)
    split = SplitSettings.from_mapping(spec_mod.parse(SPEC.read_text(), str(SPEC)).split)
    train = []
    for i in range(args.sites):
        train += [(image, label, tuple(class_ids)) for image, label in training_volumes(bed.dataset_dir(i), settings, split)]
    steps = args.rounds * args.steps * args.sites
    settings = dataclasses.replace(settings, predict_classes=tuple(class_ids))  # the classes it is trained on, as evaluate infers
    central_s = {}
    # the reference: as many steps as the federation ran in all; and, to show how much of a gap
    # is budget, as many as one site ran (what FedAvg's averaged model has progressed at most)
    for label, n in ((CENTRAL, steps), (f"centralised + GIN, {args.rounds * args.steps} steps", args.rounds * args.steps)):
        t0 = time.monotonic()
        net = train_centralised(train, settings, n, base["optimizer"]["lr"], base["optimizer"]["weight_decay"], args.seed, console)
        central_s[label] = time.monotonic() - t0
        for modality, path in tests.items():
            dice = score(net, volumes_of(path, settings), settings, class_ids)
            means = {names[c]: v for c, v in dice.items()}
            table[modality][label] = {**means, "mean": sum(means.values()) / len(means)}

    t = Table(title=f"mean Dice on each modality's test set ({args.test_cases} cases each); federated / centralised in the last columns")
    for col in ("test set", "model", *classes, "mean", "/ centralised"):
        t.add_column(col, justify="right")
    summary = {"args": {k: str(v) for k, v in vars(args).items()}, "gin": gin, "run_dirs": {k: str(v) for k, v in run_dirs.items()},
               "centralised_steps": steps, "centralised_s": central_s, "split": split.to_dict(), "dice": table, "ratio": {}}  # fmt: skip
    for modality, rows in table.items():
        central = rows[CENTRAL]["mean"]
        for label, dice in rows.items():
            ratio = dice["mean"] / central if central > 0 else float("nan")
            if label != CENTRAL:
                summary["ratio"][f"{modality}: {label}"] = ratio
            t.add_row(modality, label, *(f"{dice.get(c, float('nan')):.3f}" for c in classes), f"{dice['mean']:.3f}",
                      "-" if label == CENTRAL else f"{ratio:.2f}")  # fmt: skip
    console.print(t)
    summary["total_wall_s"] = time.monotonic() - t_start
    plot(report, table, classes)
    for modality, path in tests.items():
        gin_examples(report, volumes_of(path, settings)[0][0], gin, f"{modality} test case")
    (report / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"report: {report}  (total {summary['total_wall_s'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
