"""Local domain adaptation across a modality gap: adapted model vs source-only, one run.

A CT-like source site (portal-venous phantom CTs, liver / kidney / spleen labelled) and an
MR-like target site (other patients' anatomy through `fedimg_testing.phantom.mr_like`: a
non-monotonic T1-like intensity curve, a bias field, masked background). The target has
labels for ``--few-volumes`` volumes (the middle labelled slice of each is all the
adaptation may use); its other labelled volumes are held out entirely and scored.

Compared on the held-out target volumes (Dice per class, pooled over each volume's slices
in the factory's slice space):

* ``source only (E_s + S_s)``    -- the source site's encoder and branch applied to target
                                    images (what the target gets without adapting);
* ``source only (2D U-Net)``     -- a MONAI BasicUNet trained on the source slices for the
                                    same number of steps as source + target adaptation;
* ``U-Net + few target slices``  -- the same U-Net with one of the few labelled target
                                    slices in every batch (the obvious few-shot baseline);
* ``adapted (S_t + S_s)``        -- `site-agent adapt target`'s model (and its two halves).

The factory is trained centrally here on both sites' slices (pooled, both client ids), to
keep the run on a CPU budget; the federated path to the same artifact is what
tests/integration/test_adaptation_e2e.py runs. ``--factory DIR`` uses a published factory
folder instead (its slice settings and clients; the sites must be its members).

    .venv/bin/python benchmarks/adaptation_domain_gap.py                 # ~25 min on 2 cores
    .venv/bin/python benchmarks/adaptation_domain_gap.py --quick         # ~3 min smoke run

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
from pipelines.factory.networks import FactoryConfig  # noqa: E402
from pipelines.factory.slices import SliceSettings  # noqa: E402
from pipelines.factory.training import FactoryModel, FactorySettings, FactoryUpdater, make_optimizer  # noqa: E402
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


def train_factory(root: Path, schema_raw: dict, src_images, tgt_images, updates: int, batch: int, console) -> Path:
    folder = root / "factory"
    if (folder / "generator.pt").is_file():
        return folder
    torch.manual_seed(0)
    cfg = FactoryConfig.preset("tiny", n_clients=2, key_dim=0, n_bins=0)
    model = FactoryModel(cfg)
    up = FactoryUpdater(model, FactorySettings(config=cfg, key=None), 0)
    opt = make_optimizer(model)
    images = torch.cat([src_images, tgt_images])
    ids = torch.cat([torch.zeros(len(src_images), dtype=torch.long), torch.ones(len(tgt_images), dtype=torch.long)])
    t0 = time.perf_counter()
    for i in range(updates):
        idx = torch.randint(len(images), (batch,))
        up.train_step(opt, images[idx], None, ids[idx])
        if (i + 1) % 500 == 0:
            console.print(f"  factory update {i + 1}/{updates} ({time.perf_counter() - t0:.0f} s)")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in model.g_ema.state_dict().items()}, folder / "generator.pt")
    meta = {"format": "fedimg-factory", "name": "benchmark", "factory": cfg.to_dict(), "clients": {"source": 0, "target": 1},
            "slices": {"size": cfg.resolution, "n_bins": 0, "spacing": SLICE_SPACING, "min_foreground": 0.0}, "schema_definition": schema_raw}  # fmt: skip
    (folder / "factory.json").write_text(json.dumps(meta))
    return folder


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=ROOT / "benchmark-runs" / "adaptation-domain-gap")
    ap.add_argument("--source-volumes", type=int, default=8)
    ap.add_argument("--target-volumes", type=int, default=8)
    ap.add_argument("--few-volumes", type=int, default=3)
    ap.add_argument("--factory-updates", type=int, default=4000)
    ap.add_argument("--source-steps", type=int, default=600)
    ap.add_argument("--target-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--factory", type=Path, default=None, help="A published factory folder instead of training one here.")
    ap.add_argument("--quick", action="store_true", help="Small smoke run (minutes).")
    ap.add_argument("--fresh", action="store_true", help="Delete the workdir first.")
    args = ap.parse_args()
    if args.quick:
        args.factory_updates, args.source_steps, args.target_steps = 600, 60, 60
        args.source_volumes, args.target_volumes = 4, 5
    torch.set_num_threads(args.threads)
    console = Console()
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

    t0 = time.perf_counter()
    if args.factory is not None:
        factory_dir = args.factory
    else:
        console.print(f"training the factory centrally: {args.factory_updates} updates")
        factory_dir = train_factory(args.workdir, schema_raw, src.images, tgt.images, args.factory_updates, args.batch, console)
    factory: Factory = load_factory(factory_dir, "benchmark", "local")
    t_factory = time.perf_counter() - t0
    src_id, tgt_id = factory.client_id("source"), factory.client_id("target")

    s_src = AdaptSettings(steps=args.source_steps, batch=args.batch, val_fraction=0.0, checkpoint_every=max(50, args.source_steps // 4), latent_samples=1024)
    s_tgt = AdaptSettings(steps=args.target_steps, batch=args.batch, few_shot_volumes=args.few_volumes, n_synthetic=512,
                          checkpoint_every=max(50, args.target_steps // 4), latent_samples=1024)  # fmt: skip
    jobs = args.workdir / "jobs"
    t0 = time.perf_counter()
    job = JobDir(jobs / "source", "source", {"benchmark": s_src.to_dict(), "factory": factory.identity})
    source_model, _ = train_source(factory, src, s_src, job, src_id, resume=job.open(restart=True))
    t_source = time.perf_counter() - t0
    t0 = time.perf_counter()
    job = JobDir(jobs / "target", "target", {"benchmark": s_tgt.to_dict(), "factory": factory.identity})
    adapted, summary = train_target(factory, source_model.branch_source, src_id, tgt_id, tgt, s_tgt, job, resume=job.open(restart=True))
    t_target = time.perf_counter() - t0

    names = adapted.class_names
    table = label_table(schema_class_ids(schema), names, tgt.ignore_label, tgt.num_classes)
    few, _, eval_cases = target_split(tgt, s_tgt)
    budget = args.source_steps + args.target_steps
    console.print(f"baselines: 2D U-Net on source slices, {budget} steps (with and without the few target slices)")
    t0 = time.perf_counter()
    unet = train_unet(src, tgt, table, len(names), budget, args.batch, None, 0)
    unet_few = train_unet(src, tgt, table, len(names), budget, args.batch, few, 0)
    t_unet = time.perf_counter() - t0

    rows = {
        "source only (E_s + S_s)": lambda x: source_model.predict(x),
        "source only (2D U-Net)": unet,
        "U-Net + few target slices": unet_few,
        "adapted: S_t (own domain)": lambda x: adapted.predict(x, "target"),
        "adapted: S_s on translation": lambda x: adapted.predict(x, "source"),
        "adapted (S_t + S_s average)": lambda x: adapted.predict(x, "average"),
    }
    results = {}
    with torch.no_grad():
        for label, fn in rows.items():
            r = evaluate_cases(fn, tgt, eval_cases, table, len(names))
            results[label] = {names[k]: v for k, v in r["mean"].items()}
            results[label]["mean"] = float(np.nanmean([v for v in r["mean"].values()]))

    t = Table(title=f"Target (MR-like) Dice on {len(eval_cases)} held-out volumes; few-shot: {few.numel()} labelled slices")
    t.add_column("model")
    for n in names[1:]:
        t.add_column(n, justify="right")
    t.add_column("mean", justify="right")
    for label, r in results.items():
        t.add_row(label, *[f"{r[n]:.3f}" for n in names[1:]], f"{r['mean']:.3f}")
    console.print(t)
    base = results["source only (E_s + S_s)"]["mean"]
    adapted_mean = results["adapted (S_t + S_s average)"]["mean"]
    console.print(f"adapted / source-only (E_s + S_s) mean Dice: {adapted_mean:.3f} / {base:.3f} = {adapted_mean / max(base, 1e-6):.2f}x")
    console.print(f"adapted / source-only (U-Net) mean Dice: {adapted_mean:.3f} / {results['source only (2D U-Net)']['mean']:.3f}")
    src_eval = evaluate_cases(
        source_model.predict, src, list(range(len(src.case_ids))), label_table(schema_class_ids(schema), names, src.ignore_label, src.num_classes), len(names)
    )
    console.print(f"(source model on its own training volumes: mean Dice {np.nanmean(list(src_eval['mean'].values())):.3f})")

    # report
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / len(results)
    for i, (label, r) in enumerate(results.items()):
        ax.bar(np.arange(len(names)) + i * width, [r[n] for n in names[1:]] + [r["mean"]], width, label=label)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names[1:] + ["mean"])
    ax.set_ylabel("Dice (target, held out)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "dice.png", dpi=90)
    plt.close(fig)
    idx = torch.nonzero(torch.isin(tgt.case_index, torch.tensor(eval_cases)) & tgt.foreground()).flatten()
    pick = idx[torch.linspace(0, idx.numel() - 1, 4).long()]
    x = tgt.images[pick]
    with torch.no_grad():
        report.overlay_grid(out / "overlays.png", x, adapted.predict(x).argmax(1), table[tgt.labels[pick]], names, "adapted model on held-out MR-like slices")
        report.overlay_grid(
            out / "overlays_source_only.png", x, source_model.predict(x).argmax(1), table[tgt.labels[pick]], names, "source-only model on the same slices"
        )
        g, e, fs = adapted.generator, adapted.encoder, adapted.feature_scale
        grid = []
        for dom, other in ((TARGET, SOURCE),):
            rec, _, _ = invert(g, e, x, dom, fs)
            tr, _, _ = invert(g, e, x, other, fs)
            cyc, _, _ = invert(g, e, tr.clamp(-1, 1), dom, fs)
            grid += [[x[i, 0], rec[i, 0].clamp(-1, 1), tr[i, 0].clamp(-1, 1), cyc[i, 0].clamp(-1, 1)] for i in range(x.shape[0])]
        report.image_grid(
            out / "translations.png",
            grid,
            [f"MR-like {i}" for i in range(x.shape[0])],
            ["image", "reconstruction", "to source (CT)", "back"],
            "target -> source -> target",
        )
    timing = {"factory_s": round(t_factory, 1), "source_s": round(t_source, 1), "target_s": round(t_target, 1), "unet_baselines_s": round(t_unet, 1),
              "total_s": round(time.perf_counter() - t_all, 1)}  # fmt: skip
    summary_out = {"args": {k: str(v) for k, v in vars(args).items()}, "dice": results, "eval_volumes": len(eval_cases), "few_shot_slices": int(few.numel()),
                   "ratio_adapted_over_source_only": adapted_mean / max(base, 1e-6), "source_on_own_volumes": src_eval["mean"], "timing": timing}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary_out, indent=2, default=str))
    console.print(f"timing: {timing}")
    console.print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
