"""Researcher-side outputs of a data-factory run: sample grids, loss curves, kept
checkpoints and the published factory.

The coordinator holds the averaged G, D and G_ema (Fed-BioMed's researcher-side copy of
the plan's model) but never a site's domain key, so its samples are conditioned on client
id and slice bin only (key None, which the generator treats as an all-zero key).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from coordinator.registry import Registry
from fedimg_core import atomic

SAMPLE_BINS = 8  # columns of a sample grid: slice positions from top to bottom


def settings_of(exp):
    from pipelines.factory.training import parse_factory_args

    return parse_factory_args({k: v for k, v in exp.model_args().items() if k != "schema_definition"})


@torch.no_grad()
def sample_images(g_ema, n_clients: int, n_bins: int, columns: int = SAMPLE_BINS, seed: int = 0) -> torch.Tensor:
    """(n_clients, columns, H, W) in [-1, 1]: one row per client id, one column per slice
    bin, the same latent z down each column (so rows differ by the client condition only)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(columns, g_ema.cfg.z_dim, generator=gen)
    bins = torch.linspace(0, max(n_bins - 1, 0), columns).round().long() if n_bins else None
    rows = []
    g_ema.eval()
    for cid in range(n_clients):
        img = g_ema(z, torch.full((columns,), cid, dtype=torch.long), bins, None, noise_mode="const")
        rows.append(img[:, 0].clamp(-1, 1))
    return torch.stack(rows)


def write_sample_grid(path: Path, images: torch.Tensor, client_names: dict[int, str], title: str, n_bins: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = images.shape[:2]
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols + 1.2, 1.3 * rows + 0.6), squeeze=False)
    bins = torch.linspace(0, max(n_bins - 1, 0), cols).round().long().tolist() if n_bins else [0] * cols
    for i in range(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.imshow(images[i, j].T.flip(0).numpy(), cmap="gray", vmin=-1, vmax=1)  # RAS x,y -> radiological view
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(client_names.get(i, f"client {i}"), fontsize=8)
            if i == 0:
                ax.set_title(f"bin {bins[j]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def write_loss_plot(path: Path, metrics: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, list]] = {}
    for record in metrics.get("rounds", []):
        for row in record.get("sites", {}).values():
            train = row.get("train") or {}
            for key in ("d_loss", "g_loss", "r1", "pl_penalty"):
                if key in train:
                    s = series.setdefault(key, {}).setdefault(row.get("name", "?"), [[], []])
                    s[0].append(record["round"])
                    s[1].append(train[key])
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (key, per_site) in zip(axes[0], sorted(series.items())):
        for name, (xs, ys) in sorted(per_site.items()):
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_title(key)
        ax.set_xlabel("round")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())


def _kept(r: int, every: int, last: int) -> bool:
    return r == 0 or r == last or r % every == 0


def after_round(run_dir: Path, exp, r: int, total: int, metrics: dict, log) -> None:
    """Every ``sample_every`` rounds and at the end: a sample grid per client id and the
    loss curves. Round checkpoints are kept at the same rounds (a paper-size factory is
    ~360 MB per checkpoint); the latest is always kept."""
    s = settings_of(exp)
    sums = {row["train"]["key_checksum32"] for row in metrics["rounds"][-1]["sites"].values() if "key_checksum32" in row.get("train", {})}
    seen = set(metrics.setdefault("key_checksums32", []))
    if sums - seen:
        metrics["key_checksums32"] = sorted(seen | sums)
        if len(metrics["key_checksums32"]) > 1:
            log(f"WARNING: sites computed their domain keys with different key functions (checksums {metrics['key_checksums32']}): "
                "their keys are not comparable; check each site's image version and encoder file")  # fmt: skip
    ckpt = run_dir / "checkpoints"
    if r - 1 >= 1 and not _kept(r - 1, s.sample_every, total):
        (ckpt / f"global_round_{r - 1:04d}.pt").unlink(missing_ok=True)
    if r % s.sample_every and r != total:
        return
    model = exp.training_plan().model()
    names = {cid: name for name, cid in (metrics.get("clients") or {}).items()}
    images = sample_images(model.g_ema, s.config.n_clients, s.config.n_bins)
    target = run_dir / "samples" / f"round_{r:04d}.png"
    write_sample_grid(target, images, names, f"G_ema after round {r}/{total} (rows: client id, no key)", s.config.n_bins)
    write_loss_plot(run_dir / "samples" / "losses.png", metrics)
    metrics.setdefault("samples", []).append(str(target.relative_to(run_dir)))
    log(f"samples: {target.relative_to(run_dir)}")


def publish(home: Path, run_dir: Path, spec, exp, metrics: dict) -> dict:
    """The trained factory in the coordinator's artifact registry (kind "factory", named
    after the experiment): G_ema alone (what adaptation jobs sample), the whole G/D/G_ema
    state, and its configuration. Weights and configuration only, by construction."""
    s = settings_of(exp)
    model = exp.training_plan().model()
    args = exp.model_args()
    schema = args["schema_definition"]
    sites_key = sorted({row["train"]["key_checksum32"] for rec in metrics.get("rounds", []) for row in rec.get("sites", {}).values()
                        if "key_checksum32" in (row.get("train") or {})})  # fmt: skip
    config = {
        "format": "fedimg-factory",
        "factory": s.config.to_dict(),
        "clients": metrics.get("clients", {}),
        "key": s.key,
        "key_checksum32_reported_by_sites": sites_key,
        "slices": {"size": s.config.resolution, "n_bins": s.config.n_bins, "spacing": s.spacing, "min_foreground": s.min_foreground},
        "schema": {"name": schema.get("name"), "version": schema.get("version")},
        # the whole label schema (no patient data): adaptation jobs slice and label with it
        "schema_definition": schema,
        "run_id": run_dir.name,
        "rounds": len(metrics.get("rounds", [])),
        "local_steps": spec.local_steps,
        # how it was trained (provenance; sampling needs only the network config)
        "training": {k: getattr(s, k) for k in ("r1_gamma", "r1_interval", "pl_weight", "pl_interval", "ema_decay", "key_drop",
                                                "mismatch_weight", "diff_augment", "key_align_weight", "refine_rounds", "keep_optimizer_state")},
    }

    def blob(obj) -> bytes:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    files = {
        "generator.pt": blob({k: v.detach().clone() for k, v in model.g_ema.state_dict().items()}),
        "factory.pt": blob({k: v.detach().clone() for k, v in model.state_dict().items()}),
        "factory.json": json.dumps(config, indent=2, sort_keys=True).encode(),
    }
    record = Registry(home).publish("factory", spec.name, files, meta=config)
    return {"kind": "factory", "name": spec.name, "version": record["version"]}


def write_report(run_dir: Path, log=print) -> Path:
    """``<run_dir>/report/index.html`` for a factory run: the latest sample grid and the
    earlier ones, the loss curves, which sites each round sampled with their losses, the
    key-function checksums the sites reported, and where the factory was published."""
    import html
    import shutil

    from coordinator import runs

    metrics = runs.read_metrics(run_dir)
    info = runs.summary(run_dir)

    def build(folder: Path) -> None:
        images = [p for p in sorted((run_dir / "samples").glob("*.png"))] if (run_dir / "samples").is_dir() else []
        for p in images:
            shutil.copy2(p, folder / p.name)
        grids = [p.name for p in images if p.name.startswith("round_")]
        rows = []
        for r in metrics.get("rounds", []):
            for row in sorted(r.get("sites", {}).values(), key=lambda x: x.get("name", "")):
                t = row.get("train", {})
                cells = [r["round"], row.get("name", "?"), f"{t.get('client_id', float('nan')):.0f}"] + [
                    f"{t[k]:.3f}" if k in t else "-" for k in ("d_loss", "g_loss", "d_real", "d_fake", "d_mismatch", "r1", "path_length", "key_used", "key_align", "update_s")
                ]  # fmt: skip
                rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
        sums = sorted({t["key_checksum32"] for r in metrics.get("rounds", []) for row in r.get("sites", {}).values()
                       if "key_checksum32" in (t := row.get("train", {}))})  # fmt: skip
        key_line = ("every site reported the same key-function checksum" if len(sums) == 1 and sums[0] >= 0
                    else "no key (ablation)" if sums == [-1.0] else f"sites reported DIFFERENT key-function checksums: {sums}")  # fmt: skip
        pub = metrics.get("published")
        parts = [
            f"<h1>Data factory run {html.escape(info['run_id'])}</h1>",
            f"<p>status {html.escape(str(info['status']))}, {info['rounds_done']}/{info.get('rounds_planned')} rounds; clients: "
            + ", ".join(f"{html.escape(n)} = {c}" for n, c in (metrics.get("clients") or {}).items()) + "</p>",
            f"<p>{html.escape(key_line)}.</p>",
            f"<p>published: factory/{html.escape(pub['name'])} {html.escape(pub['version'])}</p>" if pub else "<p>not published (run not finished)</p>",
        ]
        if grids:
            parts.append(f"<h2>Samples of G_ema, {html.escape(grids[-1])}</h2><p>one row per client id, one column per slice bin, "
                         f"the same latent down each column; no key (the coordinator never holds one)</p><img src='{grids[-1]}'>")  # fmt: skip
        if "losses.png" in {p.name for p in images}:
            parts.append("<h2>Losses per site and round</h2><img src='losses.png'>")
        parts.append("<h2>Rounds</h2><table border=1 cellspacing=0 cellpadding=3><tr>" + "".join(
            f"<th>{h}</th>" for h in ("round", "site", "client", "D loss", "G loss", "D(real)", "D(fake)", "D mismatch", "R1", "path length", "key used", "key align", "s/update")
        ) + "</tr>" + "".join(rows) + "</table>")  # fmt: skip
        if len(grids) > 1:
            parts.append("<h2>Earlier samples</h2>" + "".join(f"<p>{html.escape(g)}</p><img src='{g}'>" for g in reversed(grids[:-1])))
        page = "<!doctype html><meta charset='utf-8'><title>factory report</title><body style='font-family:sans-serif'>" + "\n".join(parts)
        atomic.write_text(folder / "index.html", page)

    target = run_dir / "report"
    atomic.publish_dir(target, build)
    log(f"report: {target / 'index.html'}")
    return target
