"""Local domain adaptation across a modality gap: adapted model vs source-only and a few-shot U-Net,
on a centrally trained and a federated factory, over several seeds, one run.

A CT-like source site (portal-venous phantom CTs, liver / kidney / spleen labelled) and an
MR-like target site (other patients' anatomy through `fedimg_testing.phantom.mr_like`: a
non-monotonic T1-like intensity curve, a bias field, masked background). The target has
labels for ``--few-volumes`` volumes (the middle labelled slice of each is all the
adaptation may use); its other labelled volumes are held out entirely and scored.

Compared on the held-out target volumes (Dice per class, pooled over each volume's slices
in the factory's slice space), for every seed:

* ``source only (E_s + S_s)``    -- the source site's encoder and branch applied to target
                                    images (what the target gets without adapting);
* ``source only (2D U-Net)``     -- a MONAI BasicUNet trained on the source slices for the
                                    same number of steps as source + target adaptation;
* ``U-Net + few target slices``  -- the same U-Net with one of the few labelled target
                                    slices in every batch (the obvious few-shot baseline);
* ``adapted (S_t + S_s)``        -- `site-agent adapt target`'s model (and its two halves).

Factories (``--factories``): ``centralised`` trains the factory on both sites' slices pooled
(batches mixing both client ids); ``federated`` trains it as the federation does, with the
in-process replay of the plan (`pipelines.factory.simulate`: each site updates on its own
slices under its own client id, the shared weights are averaged every round; options of the
plan through ``--factory-arg``). Both have the same number of updates. ``--factory DIR`` uses
a published factory folder instead (its slice settings and clients; the sites must be its
members). The inversion encoder's reconstruction error on the held-out target slices is
reported beside the Dice: it is how well the factory can represent the target domain.

Every draw is seeded: a seed fixes the factory's initial weights and batches, the
adaptation jobs (``AdaptSettings.seed``) and the U-Nets; the data and the few-shot volumes
are the same for all seeds. The table gives mean +/- sd over the seeds.

    .venv/bin/python benchmarks/adaptation_domain_gap.py                 # 3 seeds x 2 factories, ~2.5 h on 2 cores
    .venv/bin/python benchmarks/adaptation_domain_gap.py --quick         # the same, small (~10 min)

Writes <workdir>/report/ (summary.json, dice.png, overlays.png, translations.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedimg_testing.phantom import make_phantom, mr_like  # noqa: E402
from pipelines.adaptation import report  # noqa: E402
from pipelines.adaptation.factory import Factory, load_factory  # noqa: E402
from pipelines.adaptation.jobs import JobDir  # noqa: E402
from pipelines.adaptation.networks import invert  # noqa: E402
from pipelines.adaptation.training import (  # noqa: E402
    SOURCE,
    TARGET,
    AdaptSettings,
    evaluate_cases,
    label_table,
    schema_class_ids,
    target_split,
    train_source,
    train_target,
)  # fmt: skip
from pipelines.adaptation.volumes import labelled_slices  # noqa: E402
from pipelines.factory.simulate import simulate_federation, sites_from_slices, train_pooled  # noqa: E402
from pipelines.factory.slices import SliceSettings  # noqa: E402
from pipelines.factory.training import FactorySettings, parse_factory_args  # noqa: E402
from pipelines.losses import IGNORE_INDEX, MarginalDiceCELoss  # noqa: E402
from preprocessing.dataset import write_dataset  # noqa: E402
from preprocessing.schema import load_schema  # noqa: E402

CLASSES = {"background": 0, "kidney": 1, "liver": 3, "spleen": 7}
SHAPE, SPACING = (64, 64, 24), (3.0, 3.0, 5.0)
SLICE_SPACING = [3.0, 3.0, 5.0]  # native phantom grid: no resampling, 24 slices per volume


def organs(label: np.ndarray) -> np.ndarray:
    out = np.zeros_like(label)
    for cid in (1, 3, 7):
        out[label == cid] = cid
    out[label == 2] = 1  # tumours belong to their organ here: the task is organs
    out[label == 4] = 3
    return out


def make_sites(root: Path, n_source: int, n_target: int) -> tuple[Path, Path]:
    src, tgt = root / "source-ct", root / "target-mr"
    if not src.exists():
        vols = [make_phantom(seed, "portal_venous", SHAPE, SPACING) for seed in range(n_source)]
        write_dataset(src, "source-ct", "CT", CLASSES, [(v.hu.astype(np.float32), organs(v.label), np.diag([*v.spacing, 1.0])) for v in vols])
    if not tgt.exists():
        vols = [make_phantom(1000 + seed, "portal_venous", SHAPE, SPACING) for seed in range(n_target)]
        write_dataset(tgt, "target-mr", "MR", CLASSES, [(mr_like(v, seed), organs(v.label), np.diag([*v.spacing, 1.0])) for seed, v in enumerate(vols)])
    return src, tgt


FEDERATED_STEPS = 200  # updates per site per round of the federated factory (as the issue-25 screens)


def factory_settings(kind: str, factory_args: dict) -> FactorySettings:
    """The factory's training settings: client id only (no key), no slice bins; the federated
    factory takes ``factory_args`` (plan options such as ``local_discriminator``) on top."""
    args = {"factory": {"preset": "tiny"}, **(factory_args if kind == "federated" else {})}
    args["factory"] = {**args["factory"], "n_bins": 0}
    return parse_factory_args({**args, "key": None, "client_ids": {"source": 0, "target": 1}})


def train_factory(root: Path, kind: str, seed: int, schema_raw: dict, src_images, tgt_images, updates: int, batch: int,
                  factory_args: dict, console) -> Path:  # fmt: skip
    """Train (or reuse, when its recipe matches) one factory; returns its folder."""
    recipe = {"kind": kind, "seed": seed, "updates": updates, "batch": batch, "factory_args": factory_args if kind == "federated" else {}}
    folder = root / f"factory-{kind}-seed{seed}"
    meta_path = folder / "factory.json"
    if (folder / "generator.pt").is_file() and meta_path.is_file() and json.loads(meta_path.read_text()).get("benchmark_recipe") == recipe:
        console.print(f"  reusing the {kind} factory of seed {seed} ({folder})")
        return folder
    settings = factory_settings(kind, factory_args)
    cfg = settings.config
    t0 = time.perf_counter()

    def progress(done: int) -> None:
        console.print(f"  {kind} factory, seed {seed}: {done}/{updates} updates ({time.perf_counter() - t0:.0f} s)")

    if kind == "centralised":
        images = torch.cat([src_images, tgt_images])
        ids = torch.cat([torch.zeros(len(src_images), dtype=torch.long), torch.ones(len(tgt_images), dtype=torch.long)])
        model, _ = train_pooled(images, torch.zeros(len(images), dtype=torch.long), ids, settings, updates, batch, seed=seed, on_progress=progress)
    else:
        per_site = {"source": (0, src_images, torch.zeros(len(src_images), dtype=torch.long)),
                    "target": (1, tgt_images, torch.zeros(len(tgt_images), dtype=torch.long))}  # fmt: skip
        rounds = max(1, round(updates / (2 * FEDERATED_STEPS)))
        steps = max(1, updates // (2 * rounds))
        model, _ = simulate_federation(sites_from_slices(per_site), settings, rounds, steps, batch, clients_per_round=None, seed=seed,
                                       on_round=lambda i, sampled, row, m: progress((i + 1) * 2 * steps) if (i + 1) % 5 == 0 else None)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.g_ema.state_dict().items()}, folder / "generator.pt")
    meta = {"format": "fedimg-factory", "name": "benchmark", "factory": cfg.to_dict(), "clients": {"source": 0, "target": 1},
            "slices": {"size": cfg.resolution, "n_bins": 0, "spacing": SLICE_SPACING, "min_foreground": 0.0}, "schema_definition": schema_raw,
            "benchmark_recipe": recipe, "train_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    meta_path.write_text(json.dumps(meta))
    return folder


@torch.no_grad()
def reconstruction_error(adapted, tgt, cases: list[int]) -> float:
    """Mean absolute error (intensity range [-1, 1]) of the adapted model's inversion of the
    held-out target slices under the target's own client id: how well the factory and
    encoder represent the target domain."""
    idx = torch.nonzero(torch.isin(tgt.case_index, torch.tensor(cases)) & tgt.foreground()).flatten()
    errs = []
    for i in range(0, idx.numel(), 16):
        x = tgt.images[idx[i : i + 16]]
        if x.shape[0] < 2:
            continue
        rec, _, _ = invert(adapted.generator, adapted.encoder, x, TARGET, adapted.feature_scale)
        errs.append((rec.clamp(-1, 1) - x).abs().mean(dim=(1, 2, 3)))
    return float(torch.cat(errs).mean()) if errs else float("nan")


def train_unet(src, tgt, table, n_classes: int, steps: int, batch: int, few: torch.Tensor | None, seed: int):
    """MONAI BasicUNet (2D) on source slices; with ``few``, one few-shot target slice per batch."""
    from monai.networks.nets import BasicUNet

    torch.manual_seed(seed)
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=n_classes, features=(16, 16, 32, 64, 128, 16))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = MarginalDiceCELoss(list(range(1, n_classes)), n_classes, ignore_index=IGNORE_INDEX)
    src_labels = table[src.labels]
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        k = batch - (1 if few is not None else 0)
        idx = torch.randint(len(src), (k,), generator=gen)
        x, y = src.images[idx], src_labels[idx]
        if few is not None:
            j = few[torch.randint(few.numel(), (1,), generator=gen)]
            x, y = torch.cat([x, tgt.images[j]]), torch.cat([y, table[tgt.labels[j]]])
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    return lambda x: torch.softmax(net(x), 1)


def _spread(values: list[float]) -> str:
    """``mean +/- sd (n)`` over seeds."""
    v = np.asarray([x for x in values if x == x], dtype=float)
    if v.size == 0:
        return "n/a"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else f"{v.mean():.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmark-runs" / "adaptation-domain-gap")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (the spread is over them)")
    ap.add_argument("--factories", default="centralised,federated", help="comma-separated: centralised, federated")
    ap.add_argument("--factory-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="a plan option of the federated factory (VALUE is YAML), e.g. --factory-arg local_discriminator=all")  # fmt: skip
    ap.add_argument("--adapt-network", default=None, metavar="YAML", help="the adaptation network's settings, e.g. '{branch_hidden: 64}'")
    ap.add_argument("--source-volumes", type=int, default=8)
    ap.add_argument("--target-volumes", type=int, default=8)
    ap.add_argument("--few-volumes", type=int, default=3)
    ap.add_argument("--factory-updates", type=int, default=4000)
    ap.add_argument("--source-steps", type=int, default=600)
    ap.add_argument("--target-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--factory", type=Path, default=None, help="A published factory folder instead of training them here.")
    ap.add_argument("--quick", action="store_true", help="Small smoke run (minutes).")
    ap.add_argument("--fresh", action="store_true", help="Delete the workdir first.")
    args = ap.parse_args()
    if args.quick:  # smaller defaults; what the command line gives explicitly stays
        quick = {"factory_updates": 600, "source_steps": 60, "target_steps": 60, "source_volumes": 4, "target_volumes": 5}
        for name, value in quick.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    kinds = [k.strip() for k in args.factories.split(",") if k.strip()] if args.factory is None else ["given"]
    if not seeds or any(k not in ("centralised", "federated", "given") for k in kinds):
        ap.error("--seeds needs at least one seed; --factories takes centralised and/or federated")
    factory_args: dict = {}
    for item in args.factory_arg:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--factory-arg {item!r}: expected KEY=VALUE")
        factory_args[key] = yaml.safe_load(value)
    network = yaml.safe_load(args.adapt_network) if args.adapt_network else {}
    torch.set_num_threads(args.threads)
    console = Console(width=None if sys.stdout.isatty() else 200)  # a log file gets whole table rows
    if args.fresh and args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    out = args.workdir / "report"
    out.mkdir(exist_ok=True)
    schema = load_schema()
    schema_raw = yaml.safe_load((ROOT / "preprocessing" / "schemas" / "abdominal-ct.yaml").read_text())
    t_all = time.perf_counter()

    src_path, tgt_path = make_sites(args.workdir / "data", args.source_volumes, args.target_volumes)
    settings = SliceSettings(size=64, n_bins=0, spacing=tuple(SLICE_SPACING), min_foreground=0.0)
    src = labelled_slices(src_path, schema, settings, cache_dir=args.workdir / "cache")
    tgt = labelled_slices(tgt_path, schema, settings, cache_dir=args.workdir / "cache", only_labelled=False)
    console.print(f"source: {len(src)} slices of {len(src.case_ids)} CT volumes; target: {len(tgt)} slices of {len(tgt.case_ids)} MR-like volumes")

    budget = args.source_steps + args.target_steps
    runs: dict[str, dict[int, dict]] = {}  # row label -> seed -> {class: dice, mean}
    extra: dict[str, dict[int, float]] = {}  # per-run figures beside the Dice (reconstruction error, timings)
    shown: dict[str, tuple] = {}  # factory kind -> (adapted, source model, table, names, eval cases) of the first seed, for the figures

    def record(label: str, seed: int, fn, table, names, eval_cases) -> None:
        with torch.no_grad():
            r = evaluate_cases(fn, tgt, eval_cases, table, len(names))
        row = {names[k]: v for k, v in r["mean"].items()}
        row["mean"] = float(np.nanmean(list(r["mean"].values())))
        runs.setdefault(label, {})[seed] = row

    for seed in seeds:
        s_src = AdaptSettings(steps=args.source_steps, batch=args.batch, val_fraction=0.0, checkpoint_every=max(50, args.source_steps // 4),
                              latent_samples=1024, seed=seed, network=network)  # fmt: skip
        s_tgt = AdaptSettings(steps=args.target_steps, batch=args.batch, few_shot_volumes=args.few_volumes, n_synthetic=512,
                              checkpoint_every=max(50, args.target_steps // 4), latent_samples=1024, seed=seed, network=network)  # fmt: skip
        table = names = eval_cases = few = None
        for kind in kinds:
            t0 = time.perf_counter()
            if kind == "given":
                factory_dir = args.factory
            else:
                console.print(f"seed {seed}: the {kind} factory, {args.factory_updates} updates")
                factory_dir = train_factory(args.workdir, kind, seed, schema_raw, src.images, tgt.images, args.factory_updates, args.batch,
                                            factory_args, console)  # fmt: skip
            factory: Factory = load_factory(factory_dir, "benchmark", "local")
            src_id, tgt_id = factory.client_id("source"), factory.client_id("target")
            jobs = args.workdir / "jobs" / f"{kind}-seed{seed}"
            t1 = time.perf_counter()
            job = JobDir(jobs / "source", "source", {"benchmark": s_src.to_dict(), "factory": factory.identity})
            source_model, _ = train_source(factory, src, s_src, job, src_id, resume=job.open(restart=True))
            job = JobDir(jobs / "target", "target", {"benchmark": s_tgt.to_dict(), "factory": factory.identity})
            adapted, _ = train_target(factory, source_model.branch_source, src_id, tgt_id, tgt, s_tgt, job, resume=job.open(restart=True))
            names = adapted.class_names
            table = label_table(schema_class_ids(schema), names, tgt.ignore_label, tgt.num_classes)
            few, _, eval_cases = target_split(tgt, s_tgt)
            rows = {
                "source only (E_s + S_s)": lambda x: source_model.predict(x),
                "adapted: S_t (own domain)": lambda x: adapted.predict(x, "target"),
                "adapted: S_s on translation": lambda x: adapted.predict(x, "source"),
                "adapted (S_t + S_s average)": lambda x: adapted.predict(x, "average"),
            }
            for label, fn in rows.items():
                record(f"{kind} factory: {label}", seed, fn, table, names, eval_cases)
            extra.setdefault(f"{kind} factory: target reconstruction error (MAE)", {})[seed] = reconstruction_error(adapted, tgt, eval_cases)
            extra.setdefault(f"{kind} factory: factory + adaptation seconds", {})[seed] = round(time.perf_counter() - t0, 1)
            extra.setdefault(f"{kind} factory: adaptation seconds", {})[seed] = round(time.perf_counter() - t1, 1)
            if kind not in shown:
                shown[kind] = (adapted, source_model, table, names, eval_cases)
        console.print(f"seed {seed}: 2D U-Net on source slices, {budget} steps (with and without the few target slices)")
        assert table is not None and names is not None and eval_cases is not None and few is not None
        record("source only (2D U-Net)", seed, train_unet(src, tgt, table, len(names), budget, args.batch, None, seed), table, names, eval_cases)
        record("U-Net + few target slices", seed, train_unet(src, tgt, table, len(names), budget, args.batch, few, seed), table, names, eval_cases)

    assert shown and table is not None and names is not None and eval_cases is not None
    t = Table(title=f"Target (MR-like) Dice on {len(eval_cases)} held-out volumes, mean ± sd over seeds {seeds}; "
                    f"few-shot: {args.few_volumes} labelled slices")  # fmt: skip
    t.add_column("model")
    for n in names[1:]:
        t.add_column(n, justify="right")
    t.add_column("mean", justify="right")
    for label, per_seed in runs.items():
        t.add_row(label, *[_spread([r[n] for r in per_seed.values()]) for n in names[1:] + ["mean"]])
    console.print(t)
    ratios = {}
    for kind in kinds:
        adapted_m = runs[f"{kind} factory: adapted (S_t + S_s average)"]
        base_m = runs[f"{kind} factory: source only (E_s + S_s)"]
        ratios[kind] = [adapted_m[sd]["mean"] / max(base_m[sd]["mean"], 1e-6) for sd in seeds]
        few_m = runs["U-Net + few target slices"]
        console.print(f"{kind} factory: adapted / source-only (E_s + S_s) mean Dice = {_spread(ratios[kind])}x; "
                      f"adapted / few-shot U-Net = {_spread([adapted_m[sd]['mean'] / max(few_m[sd]['mean'], 1e-6) for sd in seeds])}x (n = {len(seeds)} seeds)")  # fmt: skip
    for label, per_seed in extra.items():
        console.print(f"{label}: {_spread(list(per_seed.values()))}")

    # report
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(runs)
    for i, (label, per_seed) in enumerate(runs.items()):
        vals = np.array([[r[n] for n in names[1:] + ["mean"]] for r in per_seed.values()], dtype=float)
        err = vals.std(0, ddof=1) if len(vals) > 1 else None
        ax.bar(np.arange(len(names)) + i * width, np.nanmean(vals, 0), width, yerr=err, label=label, capsize=2)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names[1:] + ["mean"])
    ax.set_ylabel(f"Dice (target, held out; n = {len(seeds)} seeds)")
    ax.legend(fontsize=5)
    fig.tight_layout()
    fig.savefig(out / "dice.png", dpi=90)
    plt.close(fig)
    idx = torch.nonzero(torch.isin(tgt.case_index, torch.tensor(eval_cases)) & tgt.foreground()).flatten()
    pick = idx[torch.linspace(0, idx.numel() - 1, 4).long()]
    x = tgt.images[pick]
    for kind, (adapted, source_model, table, names, _) in shown.items():
        what = f"{kind} factory, seed {seeds[0]}"
        with torch.no_grad():
            report.overlay_grid(out / f"overlays-{kind}.png", x, adapted.predict(x).argmax(1), table[tgt.labels[pick]], names,
                                f"adapted model on held-out MR-like slices ({what})")  # fmt: skip
            report.overlay_grid(out / f"overlays-source-only-{kind}.png", x, source_model.predict(x).argmax(1), table[tgt.labels[pick]], names,
                                f"source-only model on the same slices ({what})")  # fmt: skip
            g, e, fs = adapted.generator, adapted.encoder, adapted.feature_scale
            rec, _, _ = invert(g, e, x, TARGET, fs)
            tr, _, _ = invert(g, e, x, SOURCE, fs)
            cyc, _, _ = invert(g, e, tr.clamp(-1, 1), TARGET, fs)
            grid = [[x[i, 0], rec[i, 0].clamp(-1, 1), tr[i, 0].clamp(-1, 1), cyc[i, 0].clamp(-1, 1)] for i in range(x.shape[0])]
            report.image_grid(out / f"translations-{kind}.png", grid, [f"MR-like {i}" for i in range(x.shape[0])],
                              ["image", "reconstruction", "to source (CT)", "back"], f"target -> source -> target ({what})")  # fmt: skip
    summary_out = {"args": {k: str(v) for k, v in vars(args).items()}, "seeds": seeds, "factories": kinds, "factory_args": factory_args,
                   "dice": {label: {str(sd): r for sd, r in per_seed.items()} for label, per_seed in runs.items()},
                   "per_run": {label: {str(sd): v for sd, v in per_seed.items()} for label, per_seed in extra.items()},
                   "ratio_adapted_over_source_only": ratios, "eval_volumes": len(eval_cases), "few_shot_slices": args.few_volumes,
                   "total_s": round(time.perf_counter() - t_all, 1)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary_out, indent=2, default=str))
    console.print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
