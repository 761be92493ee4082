"""Researcher-side outputs of a data-factory run: sample grids, loss curves, kept
checkpoints and the published factory.

The coordinator holds the averaged G, D and G_ema (Fed-BioMed's researcher-side copy of
the plan's model) but never a site's domain key, so its samples are conditioned on client
id and slice bin only (key None, which the generator treats as an all-zero key).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import torch

from coordinator import runs
from coordinator.registry import Registry
from coordinator.run_metrics import RunMetrics
from fedimg_core import atomic
from fedimg_core.reporting import Section, Table, figures, render_sections
from pipelines.factory.training import parse_factory_args

log = logging.getLogger(__name__)
SAMPLE_BINS = 8  # columns of a sample grid: slice positions from top to bottom


def settings_of(exp):
    """The factory settings of an experiment, parsed from its model args (the schema left out)."""
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
    """Write a grid of samples as PNG: one row per client id, one column per slice bin.

    Args:
        path: the PNG file.
        images: (rows, columns, H, W) in [-1, 1], RAS (x, y) slices.
        client_names: client id -> site name (row labels).
        title: the figure title.
        n_bins: slice bins of the factory (column titles).
    """
    rows, cols = images.shape[:2]
    bins = torch.linspace(0, max(n_bins - 1, 0), cols).round().long().tolist() if n_bins else [0] * cols
    cells = [[images[i, j].T.flip(0).numpy() for j in range(cols)] for i in range(rows)]  # RAS x,y -> radiological view
    names = [client_names.get(i, f"client {i}") for i in range(rows)]
    fig = figures.grey_grid(cells, names, [f"bin {b}" for b in bins], title, cell_inches=1.3)
    figures.write_png(path, fig, dpi=80, tight=False)


def write_loss_plot(path: Path, metrics: dict | RunMetrics) -> None:
    """Write the factory's losses (D, G, R1, path-length penalty) per site and round as PNG; nothing without any.

    Args:
        path: the PNG file.
        metrics: the run's metrics.
    """
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for record in RunMetrics.of(metrics).rounds:
        for row in record.sites.values():
            for key in ("d_loss", "g_loss", "r1", "pl_penalty"):
                if key in row.train:
                    series.setdefault(key, {}).setdefault(row.name or "?", []).append((record.round, row.train[key]))
    if not series:
        return
    fig = figures.line_panels(sorted(series.items()), "round")
    figures.write_png(path, fig, dpi=80, tight=False)


def report_sections(metrics: RunMetrics, info: dict, images: list[str]) -> list[Section]:
    """The factory report's sections: status, key checksums and publication, the latest sample
    grid, the loss curves, a table of the sites' losses per round, the earlier sample grids.

    Args:
        metrics: the run's metrics.
        info: the run's summary (`coordinator.runs.summary`).
        images: the PNG files beside the page.

    Returns:
        The sections.
    """
    grids = [name for name in images if name.startswith("round_")]
    losses = ("d_loss", "g_loss", "d_real", "d_fake", "d_mismatch", "r1", "path_length", "key_used", "key_align", "update_s")
    rows: list[list[object]] = []
    for r in metrics.rounds:
        for row in sorted(r.sites.values(), key=lambda x: x.name or ""):
            t = row.train
            rows.append([r.round, row.name or "?", f"{t.get('client_id', float('nan')):.0f}"] + [f"{t[k]:.3f}" if k in t else "-" for k in losses])
    sums = sorted({row.train["key_checksum32"] for r in metrics.rounds for row in r.sites.values() if "key_checksum32" in row.train})
    key_line = (
        "every site reported the same key-function checksum" if len(sums) == 1 and sums[0] >= 0
        else "no key (ablation)" if sums == [-1.0]
        else f"sites reported DIFFERENT key-function checksums: {sums}"
    )  # fmt: skip
    pub = metrics.published
    clients = ", ".join(f"{n} = {c}" for n, c in metrics.clients.items())
    sections = [
        Section(
            "",
            [
                f"status {info['status']}, {info['rounds_done']}/{info.get('rounds_planned')} rounds; clients: {clients}",
                f"{key_line}.",
                f"published: factory/{pub.name} {pub.version}" if pub else "not published (run not finished)",
            ],
        )
    ]
    if grids:
        sections.append(Section(
            f"Samples of G_ema, {grids[-1]}",
            ["one row per client id, one column per slice bin, the same latent down each column; no key (the coordinator never holds one)"],
            images=[(grids[-1], f"G_ema samples, {grids[-1]}")],
        ))  # fmt: skip
    if "losses.png" in images:
        sections.append(Section("Losses per site and round", images=[("losses.png", "losses per site and round")]))
    header = ["round", "site", "client", "D loss", "G loss", "D(real)", "D(fake)", "D mismatch", "R1", "path length", "key used", "key align", "s/update"]
    sections.append(Section("Rounds", tables=[Table(header, rows, "losses per site and round")]))
    if len(grids) > 1:
        sections.append(Section("Earlier samples", images=[(g, g) for g in reversed(grids[:-1])]))
    return sections


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
        "training": {
            k: getattr(s, k)
            for k in (
                "r1_gamma",
                "r1_interval",
                "pl_weight",
                "pl_interval",
                "ema_decay",
                "key_drop",
                "mismatch_weight",
                "diff_augment",
                "key_align_weight",
                "refine_rounds",
                "prox_mu",
                "local_discriminator",
                "keep_optimizer_state",
            )
        },
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


def write_report(run_dir: Path) -> Path:
    """``<run_dir>/report/index.html`` for a factory run: the latest sample grid and the
    earlier ones, the loss curves, which sites each round sampled with their losses, the
    key-function checksums the sites reported, and where the factory was published."""
    metrics = runs.load_metrics(run_dir)
    info = runs.summary(run_dir)

    def build(folder: Path) -> None:
        images = [p for p in sorted((run_dir / "samples").glob("*.png"))] if (run_dir / "samples").is_dir() else []
        for p in images:
            shutil.copy2(p, folder / p.name)
        atomic.write_text(
            folder / "index.html", render_sections(f"Data factory run {info['run_id']}", report_sections(metrics, info, [p.name for p in images]))
        )

    target = run_dir / "report"
    atomic.publish_dir(target, build)
    log.info("report: %s", target / "index.html")
    return target
