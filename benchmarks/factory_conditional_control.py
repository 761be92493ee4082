"""Does the federated data factory learn each site's domain? Conditional control, measured.

1. Update time of the tiny configuration in this process (2 threads by default), per kind
   of update (D, D + lazy R1, G, G + lazy path length) and amortised, with and without the
   domain key, side by side (a ratio). The method note's reference: ~0.06 s per update at
   batch 4 on 2 threads.
2. A phantom federation of K sites scanned in different contrast phases (real Fed-BioMed
   nodes on loopback) trains the factory (`coordinator/examples/phantom_factory.yaml`,
   2 of K sites per round), which is published to the coordinator's registry.
3. A small CNN is trained to tell the sites apart on REAL slices (80/20 split by slice;
   its held-out accuracy is printed). It then classifies GENERATED slices, conditioned on
   each site's client id (key dropped, as the coordinator and other sites would sample;
   and with the site's own key and its own key layers, read from that site's work folder
   since everything runs on this machine: both never leave a site). Conditional control means accuracy well above chance (1/K).

    .venv/bin/python benchmarks/factory_conditional_control.py                       # ~20 min on 2 cores
    .venv/bin/python benchmarks/factory_conditional_control.py --rounds 4 --steps 40   # quick look

The same algorithm at a budget no CPU federation reaches (`--engine inprocess`,
`pipelines.factory.simulate`: same updates, 2-of-K draw and uniform averaging, no
transport), e.g. on a GPU machine that has torch but not the site stack:

    .venv/bin/python benchmarks/factory_conditional_control.py --export-slices slices.pt   # here
    python3 benchmarks/factory_conditional_control.py --engine inprocess --slices slices.pt \
        --device cuda --budget-s 420 --steps 250 --batch 16 --centralised-updates -1      # there

Writes <workdir>/report/ (real vs generated grid, confusion matrices, summary.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedimg_core.logs import setup_logging  # noqa: E402
from pipelines.factory.networks import FactoryConfig, Generator  # noqa: E402
from pipelines.factory.simulate import simulate_federation, sites_from_slices, train_pooled  # noqa: E402
from pipelines.factory.training import FactoryModel, FactorySettings, FactoryUpdater, make_optimizer, parse_factory_args  # noqa: E402

NOTE_REFERENCE_S = 0.06  # ../shared/notes/data-factory-method.md: tiny, batch 4, 2 threads


def update_times(batch: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per update kind for the tiny configuration (3 clients), with and
    without the domain key, the two interleaved update by update (same machine state)."""
    real, bins = torch.rand(batch, 1, 64, 64) * 2 - 1, torch.randint(0, 29, (batch,))
    runs_ = {}
    for with_key in (False, True):
        s = parse_factory_args({"client_ids": {"a": 0, "b": 1, "c": 2}, "key": {} if with_key else None,
                                "r1_interval": 2, "pl_interval": 2})  # fmt: skip
        torch.manual_seed(0)
        model = FactoryModel(s.config)
        key = torch.nn.functional.normalize(torch.randn(s.config.key_dim), dim=0) if with_key else None
        runs_[with_key] = (FactoryUpdater(model, s, 0, key=key), make_optimizer(model))
    times = {w: {"D": [], "D+R1": [], "G": [], "G+PL": []} for w in runs_}
    for i in range(4 * repeats + 4):
        for with_key, (up, opt) in runs_.items():
            kind = ("D+R1" if up.d_steps % 2 == 0 else "D") if up.next_phase == "D" else ("G+PL" if up.g_steps % 2 == 0 else "G")
            t0 = time.perf_counter()
            up.train_step(opt, real, bins)
            if i >= 4:  # warm-up
                times[with_key][kind].append(time.perf_counter() - t0)
    out = {}
    for with_key, per_kind in times.items():
        m = {k: statistics.median(v) for k, v in per_kind.items()}
        # amortised at the paper's intervals: R1 every 16 D updates, path length every 4 G updates
        m["amortised"] = 0.5 * ((15 * m["D"] + m["D+R1"]) / 16 + (3 * m["G"] + m["G+PL"]) / 4)
        out["key" if with_key else "nokey"] = m
    return out


class SiteClassifier(torch.nn.Module):
    def __init__(self, k: int):
        super().__init__()
        c = 16
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, c, 3, 2, 1), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(c, 2 * c, 3, 2, 1), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(2 * c, 4 * c, 3, 2, 1), torch.nn.LeakyReLU(0.2),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4 * c, k),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


def train_classifier(images, labels, k: int, steps: int = 600, seed: int = 0):
    torch.manual_seed(seed)
    perm = torch.randperm(len(images))
    n_test = max(1, len(images) // 5)
    test, train = perm[:n_test], perm[n_test:]
    clf = SiteClassifier(k)
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = train[torch.randint(len(train), (32,))]
        x = images[idx]
        x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x, x.flip(-1))  # left-right flips
        loss = torch.nn.functional.cross_entropy(clf(x), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(images[test]).argmax(1) == labels[test]).float().mean())
    return clf, acc


def score(clf, xs, ys, clients: dict, k: int) -> dict:
    with torch.no_grad():
        pred = clf(xs).argmax(1)
    return {
        "accuracy": float((pred == ys).float().mean()),
        "per_site": {name: float((pred[ys == cid] == cid).float().mean()) for name, cid in clients.items() if (ys == cid).any()},
        "confusion": confusion(pred, ys, k).tolist(),
    }


def confusion(pred, labels, k):
    m = torch.zeros(k, k, dtype=torch.long)
    for p, t in zip(pred.tolist(), labels.tolist()):
        m[t, p] += 1
    return m


def generate(g, cid: int, real_bins, n: int, z_dim: int, key=None, chunk: int = 50) -> torch.Tensor:
    """n slices conditioned on client id ``cid``, at slice positions drawn from the site's
    real ones (seeded per site: every factory scored sees the same z and bins)."""
    gen = torch.Generator().manual_seed(100 + cid)
    z = torch.randn(n, z_dim, generator=gen)
    bins = real_bins[torch.randint(len(real_bins), (n,), generator=gen)]
    device = next(g.parameters()).device
    with torch.no_grad():
        out = [g(z[i : i + chunk].to(device), torch.full((len(z[i : i + chunk]),), cid, device=device), bins[i : i + chunk].to(device), key)
               for i in range(0, n, chunk)]  # fmt: skip
    return torch.cat(out).clamp(-1, 1).cpu()


def condition_effect(g, n_clients: int, real_bins: dict, z_dim: int, n: int = 64) -> float:
    """How much the client id moves a slice, relative to the latent: mean |G(z, i) - G(z, j)|
    over id pairs divided by mean |G(z, i) - G(z', i)|, same bins and noise. Near 0: the id is
    ignored; a ratio well above 0 with accuracy at chance: the id changes the slices, but not
    towards its site's contrast."""
    gen = torch.Generator().manual_seed(7)
    z, z2 = torch.randn(n, z_dim, generator=gen), torch.randn(n, z_dim, generator=gen)
    pool = torch.cat(list(real_bins.values()))
    bins = pool[torch.randint(len(pool), (n,), generator=gen)]
    device = next(g.parameters()).device

    def run(zz, cid):
        torch.manual_seed(1)  # the same noise inputs for every call
        with torch.no_grad():
            return g(zz.to(device), torch.full((n,), cid, device=device), bins.to(device), None).clamp(-1, 1)

    outs = [run(z, c) for c in range(n_clients)]
    pairs = [(a, b) for a in range(n_clients) for b in range(a + 1, n_clients)]
    if not pairs:
        return float("nan")
    by_id = sum(float((outs[a] - outs[b]).abs().mean()) for a, b in pairs) / len(pairs)
    return by_id / max(float((outs[0] - run(z2, 0)).abs().mean()), 1e-12)


def score_generators(console, report, summary, generators: dict, real_x, real_y, real_bins, clients: dict, samples: int, z_dim: int,
                     curve: dict[str, int] | None = None) -> dict:  # fmt: skip
    """Train the site classifier on real slices, then classify each factory's generated
    slices per client id. ``generators``: {mode: {cid: (generator, key or None)}};
    ``curve``: {mode: updates} of the federated G_ema at several points (plotted, not gridded)."""
    curve = curve or {}
    k = len(clients)
    clf, real_acc = train_classifier(real_x, real_y, k)
    rows, gen_examples = {}, {}
    for mode, per_site in generators.items():
        xs, ys = [], []
        for cid, (g, key) in sorted(per_site.items()):
            img = generate(g, cid, real_bins[cid], samples, z_dim, key)
            xs.append(img)
            ys.append(torch.full((samples,), cid))
            if mode not in curve or mode == max(curve, key=curve.get):  # the grid shows the last point only
                gen_examples.setdefault(mode, {})[cid] = img[:6]
        rows[mode] = score(clf, torch.cat(xs), torch.cat(ys), clients, k)
        keyless = {cid: g for cid, (g, key) in per_site.items() if key is None}
        if len(keyless) == k and len({id(g) for g in keyless.values()}) == 1:  # one generator for every id
            rows[mode]["id_effect"] = condition_effect(next(iter(keyless.values())), k, real_bins, z_dim)
        # the contrast differences the classifier reads: fraction of bright (enhancing) pixels
        names = {cid: n for n, cid in clients.items()}
        rows[mode]["bright_fraction"] = {names[cid]: float((img > 0).float().mean()) for cid, img in _by_client(xs, ys)}
    t = Table(title=f"site classifier (trained on real slices) on generated slices; chance = {1 / k:.2f}")
    for col in ("conditioning", "accuracy", *clients, "id effect"):
        t.add_column(col, justify="right")
    t.add_row("real slices (held out)", f"{real_acc:.3f}", *["-"] * k, "-")
    for mode, r in rows.items():
        t.add_row(mode, f"{r['accuracy']:.3f}", *(f"{r['per_site'].get(n, float('nan')):.3f}" for n in clients),
                  f"{r['id_effect']:.2f}" if "id_effect" in r else "-")  # fmt: skip
    console.print(t)
    summary.update({"clients": clients, "real_heldout_accuracy": real_acc, "generated": rows, "chance": 1 / k,
                    "real_bright_fraction": {n: float((real_x[real_y == c] > 0).float().mean()) for n, c in clients.items()}})  # fmt: skip
    _plot(report, real_x, real_y, gen_examples, clients)
    _plot_curve(report, sorted((u, rows[m]["accuracy"]) for m, u in curve.items()), 1 / k)
    return rows


def _by_client(xs, ys):
    """(client id, that id's generated slices) for each block generated."""
    return [(int(y[0]), x) for x, y in zip(xs, ys)]


def slice_settings_of(spec: dict):
    """The slice settings a factory spec trains on (as the plan derives them)."""
    from pipelines.factory.slices import SliceSettings

    s = parse_factory_args({k: v for k, v in spec["plan_args"].items() if k != "schema"})
    return SliceSettings(size=s.config.resolution, n_bins=s.config.n_bins, spacing=s.spacing, min_foreground=s.min_foreground)


def phantom_slices(bed, spec: dict) -> dict[str, tuple[int, torch.Tensor, torch.Tensor]]:
    """{site name: (client id, images, bins)} of the testbed's prepared sites (client ids
    in site order, as the coordinator assigns them)."""
    from pipelines.factory.slices import dataset_slices
    from preprocessing.schema import load_schema

    schema, settings = load_schema(), slice_settings_of(spec)
    out = {}
    for cid, site in enumerate(sorted(bed.sites, key=lambda s: s.site_name)):
        x, b = dataset_slices(site.data_dir / "ct", schema, settings)
        out[site.site_name] = (cid, x, b)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--phases", default="arterial,portal_venous,delayed")
    ap.add_argument(
        "--engine",
        choices=("fedbiomed", "inprocess"),
        default="fedbiomed",
        help="fedbiomed: real nodes on loopback; inprocess: pipelines.factory.simulate (same algorithm, no transport)",
    )
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200, help="updates per sampled site per round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clients-per-round", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=None, help="inprocess: train for this long instead of --rounds")
    ap.add_argument("--device", default="cpu", help="inprocess: torch device (e.g. cuda)")
    ap.add_argument("--samples", type=int, default=300, help="generated slices per site")
    ap.add_argument("--seed", type=int, default=0, help="inprocess: seed of the factories' initial weights, site draws and batches")
    ap.add_argument("--score-every", type=int, default=None, metavar="N", help="inprocess: also score the federated G_ema every N rounds (a learning curve)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the update-time measurement")
    ap.add_argument("--repeats", type=int, default=25, help="updates of each kind timed (median)")
    ap.add_argument("--timing-only", action="store_true", help="only the update-time table")
    ap.add_argument("--skip-timing", action="store_true", help="skip the update-time table")
    ap.add_argument(
        "--centralised-updates",
        type=int,
        default=3000,
        help="updates of the centralised baseline: the same factory trained in this process on all sites' "
        "slices pooled, every batch mixing client ids (0: skip; -1: as many as the federation ran in all)",
    )
    ap.add_argument(
        "--only", choices=("both", "federated", "centralised"), default="both", help="inprocess: train only one of the two (e.g. one process each on a GPU)"
    )
    ap.add_argument("--reuse", action="store_true", help="reuse the federation already trained in --workdir")
    ap.add_argument("--slices", type=Path, default=None, help="inprocess: real slices from --export-slices (no site setup)")
    ap.add_argument("--export-slices", type=Path, default=None, help="set up the phantom sites, save their slices there, stop")
    ap.add_argument(
        "--plan-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one of the spec's plan_args (VALUE is YAML), e.g. --plan-arg mismatch_weight=0",
    )
    ap.add_argument("--workdir", type=Path, default=None, help="default: .benchmarks/factory-<time>")
    args = ap.parse_args()
    if args.engine == "inprocess" and args.only == "centralised" and args.centralised_updates < 0 and args.budget_s is None:
        ap.error("--only centralised with --centralised-updates -1 needs --budget-s (there is no federation to match)")
    console = Console()
    workdir = (args.workdir or ROOT / ".benchmarks" / f"factory-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    report = workdir / "report"
    report.mkdir(parents=True, exist_ok=True)
    summary: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    phases = [p for p in args.phases.split(",") if p]
    spec = yaml.safe_load((ROOT / "coordinator" / "examples" / "phantom_factory.yaml").read_text())
    for item in args.plan_arg:
        name, sep, value = item.partition("=")
        if not sep or not name:
            ap.error(f"--plan-arg {item!r}: expected KEY=VALUE")
        spec["plan_args"][name] = yaml.safe_load(value)

    if args.reuse:  # score the factory already trained in --workdir
        from coordinator.testbed import Testbed

        return control(args, console, workdir, report, summary, phases, Testbed(workdir, n_sites=args.sites, phases=phases))

    if args.export_slices or (args.engine == "inprocess" and args.slices is None):
        from coordinator.testbed import Testbed

        setup_logging()  # the testbed's progress lines
        bed = Testbed(workdir, n_sites=args.sites, phases=phases)
        with console.status(f"setting up {args.sites} phantom sites ({', '.join(phases)})"):
            bed.setup_sites()
        per_site = phantom_slices(bed, spec)
        if args.export_slices:
            torch.save({"phases": {n: phases[i % len(phases)] for i, n in enumerate(sorted(per_site))},
                        "slices": {n: (cid, x.half(), b) for n, (cid, x, b) in per_site.items()}}, args.export_slices)  # fmt: skip
            console.print(f"slices of {len(per_site)} sites: {args.export_slices} ({', '.join(f'{n}: {len(v[1])}' for n, v in per_site.items())})")
            return 0
    else:
        per_site = torch.load(args.slices)["slices"] if args.slices else None

    # 1. update time, side by side
    if not args.skip_timing:
        torch.set_num_threads(args.threads)
        t = Table(title=f"tiny factory update time (s), {args.threads} threads")
        for col in ("batch", "key", "D", "D+R1", "G", "G+PL", "amortised", "vs note 0.06 s"):
            t.add_column(col, justify="right")
        summary["update_s"] = {}
        for batch in (4, 8):
            for variant, m in update_times(batch, repeats=args.repeats).items():
                summary["update_s"][f"batch{batch}_{variant}"] = m
                t.add_row(str(batch), "yes" if variant == "key" else "no", *(f"{m[k]:.3f}" for k in ("D", "D+R1", "G", "G+PL", "amortised")),
                          f"{m['amortised'] / NOTE_REFERENCE_S:.2f}x" if batch == 4 else "-")  # fmt: skip
        console.print(t)
        k4 = summary["update_s"]
        console.print(f"key conditioning cost (same run, batch 4, interleaved): {k4['batch4_key']['amortised'] / k4['batch4_nokey']['amortised']:.2f}x")
        if args.timing_only:
            (report / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            return 0

    if args.engine == "inprocess":
        return inprocess(args, console, report, summary, spec, per_site)

    # 2. the federation
    from coordinator.testbed import Testbed

    setup_logging()  # the testbed's progress lines
    bed = Testbed(workdir, n_sites=args.sites, phases=phases,
                  out=lambda line: console.print(line, markup=False, highlight=False))  # fmt: skip
    spec.update({"rounds": args.rounds, "local_steps": args.steps, "batch_size": args.batch, "name": "bench-factory",
                 "clients_per_round": args.clients_per_round})  # fmt: skip
    spec["plan_args"]["sample_every"] = max(1, args.rounds // 6)
    spec["plan_args"]["refine_rounds"] = max(1, args.rounds // 10)
    t0 = time.monotonic()
    try:
        with console.status(f"setting up {args.sites} phantom sites ({', '.join(phases)}) and their nodes"):
            bed.setup_sites()
            bed.start_nodes()
        code = bed.run_spec(yaml.safe_dump(spec, sort_keys=False))
    finally:
        bed.teardown()
    if code != 0:
        console.print(f"[red]the factory run failed ({code})")
        return 1
    summary["federation_wall_s"] = time.monotonic() - t0
    return control(args, console, workdir, report, summary, phases, bed)


def inprocess(args, console, report, summary, spec, per_site) -> int:
    """Train the factory with `pipelines.factory.simulate` (and/or the pooled reference)
    on ``args.device``, then score conditional control."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    device = torch.device(args.device)
    plan_args = {k: v for k, v in spec["plan_args"].items() if k not in ("schema", "refine_rounds", "sample_every")}
    plan_args.update({"key": None, "client_ids": {n: cid for n, (cid, _, _) in per_site.items()}})
    settings = parse_factory_args(plan_args)  # client id only: the control the issue asks for
    cfg = settings.config
    clients = {n: cid for n, (cid, _, _) in sorted(per_site.items(), key=lambda kv: kv[1][0])}
    real_x = torch.cat([per_site[n][1].float() for n in clients])
    real_y = torch.cat([torch.full((len(per_site[n][1]),), cid) for n, cid in clients.items()])
    real_bins = {cid: per_site[n][2].long() for n, cid in clients.items()}
    generators, fed_updates, curve = {}, None, {}
    summary.update({"engine": "inprocess", "device": str(device), "factory": cfg.to_dict()})
    if args.only in ("both", "federated"):
        sites = sites_from_slices(per_site, device)
        snapshots, done = {}, [0]  # done: updates so far (a cell the callback can bump)
        total = args.rounds if args.budget_s is None else None
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed} rounds"), TimeElapsedColumn(),
                      console=console) as bar:  # fmt: skip
            task = bar.add_task("federated (in process)", total=total)

            def on_round(i, sampled, row, model):
                done[0] += row["updates"]
                if args.score_every and (i + 1) % args.score_every == 0 and (args.rounds is None or i + 1 < args.rounds):
                    mode = f"federated @ round {i + 1} ({done[0]} updates)"
                    snapshots[mode], curve[mode] = copy.deepcopy(model.g_ema).eval(), done[0]
                bar.update(task, completed=i + 1, description=f"federated: {row['updates_per_s']:.0f} updates/s, sampled {', '.join(sampled)}")
                if not console.is_terminal and i % 10 == 0:  # a log file gets a line now and then
                    console.log(f"round {i + 1}: {row['updates_per_s']:.0f} updates/s, sampled {', '.join(sampled)}")

            t0 = time.monotonic()
            model, history = simulate_federation(sites, settings, total, args.steps, args.batch, args.clients_per_round, seed=args.seed,
                                                 device=device, budget_s=args.budget_s, on_round=on_round)  # fmt: skip
        fed_updates = sum(r["updates"] for r in history)
        summary["federated"] = {"rounds": len(history), "updates_total": fed_updates, "updates_per_site": {
            n: sum(s.updater_state["updates"] if s.updater_state else 0 for s in sites if s.name == n) for n in clients}, "wall_s": time.monotonic() - t0,
            "updates_per_s": fed_updates / (time.monotonic() - t0), "last_rounds": history[-3:]}  # fmt: skip
        for mode, g in snapshots.items():
            generators[mode] = {cid: (g, None) for cid in clients.values()}
        final = f"federated, client id only ({len(history)} rounds x {args.steps}, {fed_updates} updates)"
        generators[final], curve[final] = {cid: (model.g_ema.eval(), None) for cid in clients.values()}, fed_updates
        torch.save({"factory": cfg.to_dict(), "g_ema": model.g_ema.state_dict()}, report / "g_ema_federated.pt")
    if args.only in ("both", "centralised") and args.centralised_updates:
        n = None if args.centralised_updates < 0 else args.centralised_updates
        if n is None and fed_updates is not None:
            n = fed_updates  # the same number of updates as the federation ran in all
        budget = args.budget_s if n is None else None
        with console.status("centralised reference: pooled slices, batches mixing client ids") as st:
            t0 = time.monotonic()
            model, done = train_pooled(real_x.to(device), torch.cat([real_bins[c] for c in clients.values()]).to(device), real_y.to(device),
                                       settings, n, args.batch, seed=args.seed, budget_s=budget, on_progress=lambda d: st.update(f"centralised: {d} updates") if console.is_terminal else console.log(f"centralised: {d} updates"))  # fmt: skip
        summary["centralised"] = {"updates": done, "wall_s": time.monotonic() - t0, "updates_per_s": done / (time.monotonic() - t0)}
        generators[f"centralised, pooled ({done} updates)"] = {cid: (model.g_ema.eval(), None) for cid in clients.values()}
        torch.save({"factory": cfg.to_dict(), "g_ema": model.g_ema.state_dict()}, report / "g_ema_centralised.pt")
    score_generators(console, report, summary, generators, real_x, real_y, real_bins, clients, args.samples, cfg.z_dim, curve)
    (report / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"report: {report}")
    return 0


def control(args, console, workdir, report, summary, phases, bed) -> int:
    from coordinator import runs
    from coordinator.registry import Registry
    from site_agent import config as site_config

    bed.sites = [site_config.load(bed.site_config_path(i)) for i in range(bed.n_sites)]
    run_dir = Path(runs.list_runs(bed.home)[-1]["run_dir"])
    metrics = runs.read_metrics(run_dir)

    # 3. conditional control
    reg = Registry(bed.home)
    config = json.loads(reg.load("factory", "bench-factory", "factory.json").read_text())
    cfg = FactoryConfig.from_dict(config["factory"])
    g = Generator(cfg)
    g.load_state_dict(torch.load(reg.load("factory", "bench-factory", "generator.pt")))
    g.eval()
    from pipelines.factory.slices import SliceSettings, dataset_slices
    from preprocessing.schema import load_schema

    schema = load_schema()
    sl = config["slices"]
    settings = SliceSettings(size=sl["size"], n_bins=sl["n_bins"], spacing=tuple(sl["spacing"]) if isinstance(sl["spacing"], list) else sl["spacing"],
                             min_foreground=sl["min_foreground"])  # fmt: skip
    k = len(config["clients"])
    real_x, real_y, real_bins, keys, site_g = [], [], {}, {}, {}
    site_by_name = {s.site_name: s for s in bed.sites}
    for name, cid in config["clients"].items():
        x, b = dataset_slices(site_by_name[name].data_dir / "ct", schema, settings)
        real_x.append(x.float())
        real_y.append(torch.full((len(x),), cid))
        real_bins[cid] = b
        folder = site_by_name[name].work_dir / "cache" / "factory-keys"
        if (folder / f"{run_dir.name}-domain-key.pt").is_file() and (folder / f"{run_dir.name}-key-layers.pt").is_file():
            # the site's key and its own key layers (they never leave the site)
            keys[cid] = torch.load(folder / f"{run_dir.name}-domain-key.pt")["key"].float()
            layers = torch.load(folder / f"{run_dir.name}-key-layers.pt")
            site_g[cid] = copy.deepcopy(g)
            site_g[cid].load_state_dict({n[len("g_ema.") :]: v for n, v in layers.items() if n.startswith("g_ema.")}, strict=False)
    real_x, real_y = torch.cat(real_x), torch.cat(real_y)
    generators = {"client id only": {cid: (g, None) for cid in range(k)}}
    if keys:
        generators["client id + own key"] = {cid: (site_g[cid], keys[cid]) for cid in keys}
    if args.centralised_updates:
        # -1: as many updates as the federation ran in all (every sampled site's, every round)
        last: dict = {}  # a site's "updates" metric counts on across rounds (its state is kept): take its last
        for r in metrics["rounds"]:
            for node, row in r.get("sites", {}).items():
                last[node] = int(row.get("train", {}).get("updates", 0))
        fed_total = sum(last.values())
        updates = args.centralised_updates if args.centralised_updates > 0 else (fed_total or 3000)
        with console.status(f"centralised baseline: {updates} updates on the pooled slices"):
            trained = config.get("training", {})  # the federation's losses (key aside: client id only)
            s = FactorySettings(config=FactoryConfig.from_dict({**cfg.to_dict(), "key_dim": 0}), key=None,
                                mismatch_weight=float(trained.get("mismatch_weight", 0.0)), diff_augment=trained.get("diff_augment"))  # fmt: skip
            model, _ = train_pooled(real_x, torch.cat([real_bins[c] for c in sorted(real_bins)]), real_y, s, updates, args.batch)
        generators[f"centralised, pooled, {updates} updates"] = {cid: (model.g_ema.eval(), None) for cid in range(k)}
    score_generators(console, report, summary, generators, real_x, real_y, real_bins, config["clients"], args.samples, cfg.z_dim)
    summary.update({"run_dir": str(run_dir), "phases": {s.site_name: phases[i % len(phases)] for i, s in enumerate(bed.sites)},
                    "rounds": len(metrics["rounds"]), "sampled": [r.get("sampled") for r in metrics["rounds"]]})  # fmt: skip
    (report / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(f"report: {report}  (samples per round: {run_dir / 'samples'})")
    return 0


def _plot(report: Path, real_x, real_y, gen_examples, clients: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {cid: n for n, cid in clients.items()}
    cols = 6
    blocks = [("real", {cid: real_x[real_y == cid][torch.linspace(0, int((real_y == cid).sum()) - 1, cols).long()] for cid in names})]
    blocks += list(gen_examples.items())
    fig, axes = plt.subplots(len(names), cols * len(blocks), figsize=(1.1 * cols * len(blocks), 1.2 * len(names) + 0.6), squeeze=False)
    for bi, (title, imgs) in enumerate(blocks):
        for cid in names:
            for j in range(cols):
                ax = axes[cid][bi * cols + j]
                ax.set_xticks([])
                ax.set_yticks([])
                if cid in imgs and j < len(imgs[cid]):
                    ax.imshow(imgs[cid][j, 0].T.flip(0).numpy(), cmap="gray", vmin=-1, vmax=1)
                if bi == 0 and j == 0:
                    ax.set_ylabel(names[cid], fontsize=8)
                if cid == 0 and j == 0:
                    ax.set_title(title, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(report / "real_vs_generated.png", dpi=80)
    plt.close(fig)


def _plot_curve(report: Path, pts: list[tuple[int, float]], chance: float) -> None:
    """Accuracy against updates for the federated G_ema (--score-every), if more than one point."""
    if len(pts) < 2:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="federated G_ema")
    ax.axhline(chance, color="grey", ls="--", label="chance")
    ax.xaxis.set_major_formatter(lambda v, _: f"{v / 1000:g}k")
    ax.set_xlabel("updates (all sites)")
    ax.set_ylabel("site accuracy on generated slices")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(report / "control_vs_updates.png", dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
