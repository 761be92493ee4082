"""`coordinator`: the researcher side. Thin over coordinator's modules."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

import click
import yaml
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from coordinator import runs
from coordinator import spec as spec_mod
from coordinator.client import call, client_token
from coordinator.registry import Registry
from coordinator.results import class_dice, ordered_classes
from coordinator.site_tokens import SiteTokens
from fedimg_core.cli import run_cli
from fedimg_core.errors import UserError
from fedimg_core.logs import show_progress, stderr_console, verbosity_options
from fedimg_core.site_config import site_json_schema

# deferred: start-up time (`--help` stays fast): the engine, the service, evaluation, reports
# and the testbed import Fed-BioMed, torch or MONAI, so the commands import them when run.
log = logging.getLogger(__name__)

console = Console(width=None if sys.stdout.isatty() else 160)
HOME_ENV, URL_ENV, TOKEN_ENV = "FEDIMG_COORDINATOR_HOME", "FEDIMG_COORDINATOR_URL", "FEDIMG_API_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8750"

home_option = click.option(
    "--home", envvar=HOME_ENV, default="coordinator-home", show_default=True, type=click.Path(file_okay=False),
    help=f"Coordinator home: researcher component, runs/ (env {HOME_ENV}).",
)  # fmt: skip
grpc_options = [
    click.option("--grpc-host", default="0.0.0.0", show_default=True, help="Address the Fed-BioMed server binds."),
    click.option("--grpc-port", default=50051, show_default=True, type=int, help="Port sites connect to."),
    click.option(
        "--public-host",
        envvar="FEDIMG_PUBLIC_HOST",
        default=None,
        help="Name sites dial (put in the TLS certificate; default: --grpc-host, or localhost).",
    ),
]
url_option = click.option("--url", envvar=URL_ENV, default=None, help=f"Coordinator API URL (env {URL_ENV}); default: read --home.")
token_option = click.option("--token", envvar=TOKEN_ENV, default=None, help=f"API token (env {TOKEN_ENV}; default: <home>/api-token).")


def _with(options):
    def deco(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@verbosity_options
def cli() -> None:
    """Coordinate a fedimg federation: run experiment specs on Fed-BioMed, keep their results.

    Progress and log lines go to stderr (-v adds debug lines, -q keeps warnings and errors
    only); results (tables, JSON, paths) go to stdout."""


def _load_spec(spec_file) -> spec_mod.Spec:
    """Load and validate a spec file (every problem at once); print its warnings."""
    s = spec_mod.load(spec_file)
    for warning in s.warnings:
        click.echo(f"warning: {warning}")
    return s


def _require_home(home) -> Path:
    """The coordinator home, or a UserError saying where it was looked for and how to get one."""
    path = Path(home)
    if not path.is_dir():
        raise UserError(
            f"coordinator home {home} does not exist (looked in {path.resolve()}): pass --home DIR or set {HOME_ENV}; "
            "`coordinator run` and `coordinator serve` create one, `coordinator testbed` uses <workdir>/coordinator "
            "(e.g. --home .testbed/<time>/coordinator)"
        )
    log.debug("coordinator home: %s", path.resolve())
    return path


def _find_run(home, run_id: str) -> Path:
    """A run by directory, id or id prefix; the home must exist unless a directory is given."""
    return runs.find_run(Path(home) if Path(run_id).is_dir() else _require_home(home), run_id)


@cli.command()
@click.argument("spec_file", type=click.Path())
def validate(spec_file) -> None:
    """Check SPEC_FILE and print what it will run.

    Lists every problem at once (file, key, what is allowed) and warns about legal but
    risky values (no validation split, very few updates, an unusual learning rate)."""
    s = _load_spec(spec_file)
    sel = f"tags {s.site_tags}" + (f" among nodes {s.site_ids}" if s.site_ids else "")
    click.echo(f"ok: {s.name}: plan {s.plan} ({s.mode}), {s.rounds} rounds x {s.local_steps} steps, sites with {sel} (>= {s.min_sites})")


SCHEMAS = {"spec": spec_mod.spec_json_schema, "site": site_json_schema}


@cli.command()
@click.argument("which", type=click.Choice(sorted(SCHEMAS)))
def schema(which) -> None:
    """Print the JSON Schema of an experiment spec or a site config.

    Editors check a YAML file against it as you type: save it (docs/schemas/ holds both)
    and put `# yaml-language-server: $schema=<its path or URL>` on the file's first line."""
    click.echo(json.dumps(SCHEMAS[which](), indent=2, ensure_ascii=False))


def _print_run_footer(info: dict) -> None:
    click.echo(f"run {info['run_id']}: {info['status']}, {info['rounds_done']}/{info.get('rounds_planned')} rounds, dir {info['run_dir']}")
    if info.get("error"):
        click.echo(f"error: {info['error']}")


def _print_factory_results(info: dict, metrics: dict) -> None:
    table = Table("round", "sampled", "site", "client", "D loss", "G loss", "R1", "path length", "key used", "s/update", "MB")
    fmt = lambda d, k, f=".3f": format(d[k], f) if k in d else "-"  # noqa: E731
    for r in metrics.get("rounds", []):
        mb = f"{sum((r.get('bytes') or {}).values()) / 1e6:.1f}" if r.get("bytes") else "-"
        for _, row in sorted(r["sites"].items(), key=lambda kv: kv[1].get("name", kv[0])):
            t = row.get("train", {})
            table.add_row(str(r["round"]), ", ".join(r.get("sampled", [])) if mb else "", row.get("name", "?"),
                          fmt(t, "client_id", ".0f"), fmt(t, "d_loss"), fmt(t, "g_loss"), fmt(t, "r1"), fmt(t, "path_length"),
                          fmt(t, "key_used", ".2f"), fmt(t, "update_s"), mb)  # fmt: skip
            mb = ""
    console.print(table)
    for sample in metrics.get("samples", [])[-1:]:
        click.echo(f"latest samples: {Path(info['run_dir']) / sample}")
    if metrics.get("published"):
        p = metrics["published"]
        click.echo(f"published: {p['kind']}/{p['name']} {p['version']} (coordinator registry)")
    _print_run_footer(info)


def _print_results(run_dir: Path) -> None:
    info = runs.summary(run_dir)
    metrics = runs.read_metrics(run_dir)
    if metrics.get("plan") == "data_factory":
        _print_factory_results(info, metrics)
        return
    # "global" = the model the site received at the start of the round (validated before local
    # training); "local" = the site's model after local training; "final" = after the last round.
    table = Table("round", "site", "samples", "train loss", "lambda", "dice (global)", "dice (local)", "MB sent+received")
    fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
    for r in metrics.get("rounds", []):
        mb = f"{sum((r.get('bytes') or {}).values()) / 1e6:.2f}" if r.get("bytes") else "-"
        for _, row in sorted(r["sites"].items(), key=lambda kv: kv[1].get("name", kv[0])):
            vg, vl, tr = row.get("val_global", {}), row.get("val_local", {}), row.get("train", {})
            table.add_row(
                str(r["round"]), row.get("name", "?"), str(row.get("samples", "-")), fmt(tr, "loss_mean" if "loss_mean" in tr else "Loss"),
                fmt(tr, "lambda"), fmt(vg, "dice_mean"), fmt(vl, "dice_mean"), mb,
            )  # fmt: skip
            mb = ""
    console.print(table)
    last = metrics.get("rounds", [])[-1:]
    final = {row.get("name", n): row.get("val_final") or row.get("val_global") or {} for r in last for n, row in r["sites"].items()}
    if final:
        classes = ordered_classes({c for row in final.values() for c in class_dice(row)}, metrics.get("classes"))
        dice_table = Table("site", *classes, "mean", title="final global model: Dice per class on each site's validation cases")
        for site, row in sorted(final.items()):
            d = class_dice(row)
            dice_table.add_row(site, *[f"{d[c]:.3f}" if c in d else "" for c in classes], fmt(row, "dice_mean"))
        console.print(dice_table)
        click.echo("final global model: " + " | ".join(f"{k}: dice {v.get('dice_mean', float('nan')):.3f}" for k, v in sorted(final.items())))
    if metrics.get("best_global"):
        b = metrics["best_global"]
        click.echo(f"best global model: round {b['model_round']} (mean Dice over classes across sites {b['score']:.3f})")
    _print_run_footer(info)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a stopped run is recorded as interrupted (resumable), not left "running"


def _foreground(home: str, grpc_host: str, grpc_port: int, public_host, spec, resume: bool, make_run_dir) -> None:
    from coordinator.engine import Federation

    signal.signal(signal.SIGTERM, _on_sigterm)
    fed = Federation(home, host=grpc_host, port=grpc_port, public_host=public_host, log=logging.getLogger("coordinator.engine").info)
    run_dir = make_run_dir()  # only once the server runs: a failed start leaves no queued run behind
    log.info("run %s: sites connect to %s", run_dir.name, fed.address)
    try:
        fed.run(run_dir, spec, resume=resume)
    except KeyboardInterrupt:
        log.info("interrupted; continue with `coordinator resume %s --home %s`", run_dir.name, home)
        sys.exit(130)
    _print_results(run_dir)


@cli.command()
@click.argument("spec_file", type=click.Path())
@home_option
@_with(grpc_options)
def run(spec_file, home, grpc_host, grpc_port, public_host) -> None:
    """Run SPEC_FILE in the foreground (this process hosts the Fed-BioMed server)."""
    s = _load_spec(spec_file)
    text = Path(spec_file).read_text(encoding="utf-8")
    _foreground(home, grpc_host, grpc_port, public_host, s, False, lambda: runs.new_run(Path(home), text, s.name, resolved=s.resolved_raw()))


@cli.command()
@click.argument("run_id")
@home_option
@_with(grpc_options)
@url_option
@token_option
def resume(run_id, home, grpc_host, grpc_port, public_host, url, token) -> None:
    """Continue an interrupted run from its last breakpoint (via --url: re-queue it on the service)."""
    if url:
        reply = call(url, "POST", f"/runs/{run_id}/resume", client_token(Path(home), token))
        click.echo(f"re-queued {reply['run_id']}")
        return
    run_dir = _find_run(home, run_id)
    state = runs.read_state(run_dir)
    if state["status"] == "done":
        raise UserError(f"run {run_dir.name} is already done")
    if state["status"] == "running":
        runs.recover_stale(Path(home))
        if runs.read_state(run_dir)["status"] == "running":
            raise UserError(f"run {run_dir.name} is running in process {state.get('pid')}")
    s = spec_mod.load(runs.spec_file(run_dir))
    _foreground(home, grpc_host, grpc_port, public_host, s, True, lambda: run_dir)


@cli.command()
@home_option
@_with(grpc_options)
@click.option("--api-host", default="127.0.0.1", show_default=True, help="Address of the researcher API.")
@click.option("--api-port", default=8750, show_default=True, type=int, help="Port of the researcher API.")
def serve(home, grpc_host, grpc_port, public_host, api_host, api_port) -> None:
    """Long-running coordinator: hosts the Fed-BioMed server, runs submitted specs in order."""
    from coordinator.service import serve as _serve

    _serve(Path(home), grpc_host, grpc_port, api_host, api_port, public_host=public_host)


@cli.command()
@click.argument("spec_file", type=click.Path())
@home_option
@url_option
@token_option
def submit(spec_file, home, url, token) -> None:
    """Submit SPEC_FILE to a running `coordinator serve`."""
    s = _load_spec(spec_file)  # fail here, with the file name, before anything is sent
    body = Path(spec_file).read_bytes()
    if s.resolved_raw() != s.raw:  # a schema file on this machine: send its content along
        body = yaml.safe_dump(s.resolved_raw(), sort_keys=False).encode()
    reply = call(url or DEFAULT_URL, "POST", "/runs", client_token(Path(home), token), body=body)
    click.echo(f"submitted {s.name}: run {reply['run_id']}")


@cli.command()
@home_option
@url_option
@token_option
@click.option("--json", "as_json", is_flag=True)
def status(home, url, token, as_json) -> None:
    """List runs and their state."""
    if url:
        rows = call(url, "GET", "/runs", client_token(Path(home), token))["runs"]
    else:
        _require_home(home)
        for stale in runs.recover_stale(Path(home)):  # runs whose process died show as interrupted, not running
            log.info("run %s: its coordinator process is gone; marked interrupted (`coordinator resume %s` continues it)", stale, stale)
        rows = runs.list_runs(Path(home))
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("run", "status", "rounds", "error")
    for r in rows:
        table.add_row(r["run_id"], r["status"], f"{r['rounds_done']}/{r.get('rounds_planned') or '?'}", (r.get("error") or "")[:80])
    console.print(table if rows else "no runs yet")


@cli.command()
@click.argument("run_id")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the metrics JSON.")
def results(run_id, home, as_json) -> None:
    """Per-round metrics of RUN_ID (id, id prefix or run directory)."""
    run_dir = _find_run(home, run_id)
    if as_json:
        click.echo(json.dumps({**runs.summary(run_dir), "metrics": runs.read_metrics(run_dir)}, indent=2, default=str))
    else:
        _print_results(run_dir)


@cli.command()
@home_option
@click.option("--kind", default=None, help="Only artifacts of this kind (factory, segmentation-branch).")
@click.option("--verify", is_flag=True, help="Recompute every file's checksum.")
@click.option("--json", "as_json", is_flag=True)
def registry(home, kind, verify, as_json) -> None:
    """Artifacts published to this coordinator's registry (weights and configs only)."""
    reg = Registry(Path(home))
    rows = reg.list(kind)
    if verify:
        rows = [reg.verify(r["kind"], r["name"], r["version"]) for r in rows]
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("kind", "name", "version", "created", "files", "MB")
    for r in rows:
        size = sum(f["bytes"] for f in r["files"].values()) / 1e6
        table.add_row(r["kind"], r["name"], r["version"], r["created"], ", ".join(sorted(r["files"])), f"{size:.1f}")
    console.print(table if rows else "the registry is empty")


@cli.group("site-token")
def site_token() -> None:
    """Tokens sites use to pull from and push to the registry (coordinator side)."""


@site_token.command("issue")
@click.argument("site")
@home_option
def site_token_issue(site, home) -> None:
    """Issue a token for SITE (replaces its previous one); printed once, only its hash is kept."""
    store = SiteTokens(Path(home))
    token = store.issue(site)
    click.echo(token)  # alone on stdout: `coordinator site-token issue a > token-file` works
    click.echo(
        f"site token for {site}: shown only now ({store.path} keeps its hash). On the site, save it in a "
        "file only the site's user can read (e.g. /srv/fedimg/site-token, mode 0600, or a docker secret "
        "at /run/secrets/site-token) and add to site.yaml:\n"
        "  registry: {url: http://<coordinator>:8750, token_file: /srv/fedimg/site-token}\n"
        "or set FEDIMG_SITE_TOKEN in the site's environment.",
        err=True,
    )


@site_token.command("revoke")
@click.argument("site")
@home_option
def site_token_revoke(site, home) -> None:
    """Revoke SITE's token (it stops working at once)."""
    SiteTokens(Path(home)).revoke(site)
    click.echo(f"revoked the token of {site}")


@site_token.command("list")
@home_option
@click.option("--json", "as_json", is_flag=True)
def site_token_list(home, as_json) -> None:
    """Sites holding a token, and when it was issued (never the tokens)."""
    rows = SiteTokens(Path(home)).list()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("site", "issued")
    for r in rows:
        table.add_row(r["site"], str(r["created"]))
    console.print(table if rows else "no site tokens")


@cli.command()
@click.argument("run_id")
@click.option("--data", "dataset", required=True, type=click.Path(), help="A prepared dataset (site-agent prepare) that took no part in training.")
@click.option("--merge-lesions", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Score lesions as their organ (auto: when the dataset labels an organ but not its lesions).")  # fmt: skip
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation record as JSON.")
def evaluate(run_id, dataset, merge_lesions, home, as_json) -> None:
    """Score RUN_ID's best global model and last local models on an out-of-federation dataset."""
    from coordinator.evaluate import evaluate_run

    run_dir = _find_run(home, run_id)
    if not sys.stderr.isatty():  # a log file or a pipe: plain progress lines (log records), at most every PROGRESS_EVERY_S
        record = evaluate_run(run_dir, Path(dataset), merge_lesions=merge_lesions, progress=_plain_progress(log.info))
    else:  # a bar on the console the log lines use: they scroll above it (--quiet: no bar)
        with Progress(console=stderr_console(), transient=True, disable=not show_progress()) as bar:
            task = bar.add_task("evaluating", total=None)

            def progress(model, done, total):
                bar.update(task, description=f"{model}" if model == "preprocessing" else f"scoring {model}", completed=done, total=total)

            record = evaluate_run(run_dir, Path(dataset), merge_lesions=merge_lesions, progress=progress)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    _print_evaluation(record)


PROGRESS_EVERY_S = 10.0


def _plain_progress(say, every_s: float = PROGRESS_EVERY_S):
    """A progress callback printing plain lines: the first call, then at most every `every_s`
    seconds, and each step's last case."""
    last = {"at": None}

    def progress(step: str, done: int, total: int) -> None:
        now = time.monotonic()
        if last["at"] is None or done == total or now - last["at"] >= every_s:
            last["at"] = now
            say(f"{step}: {done}/{total} cases" if step == "preprocessing" else f"scoring {step}: {done}/{total} cases")

    return progress


def _print_evaluation(record: dict) -> None:
    classes = record["classes"]
    title = f"out-of-federation: {record['dataset']} ({record['cases']} cases{', lesions merged into organs' if record['merge_lesions'] else ''})"
    table = Table("model", *classes, "mean", title=title)
    for key, m in record["models"].items():
        table.add_row(m["label"], *[f"{m['mean'][c]:.3f}" if c in m["mean"] else "" for c in classes],
                      f"{m['mean_all']:.3f}" if m.get("mean_all") is not None else "")  # fmt: skip
    console.print(table)
    click.echo(f"written: {record['path']}")


@cli.command()
@click.argument("run_id")
@home_option
def report(run_id, home) -> None:
    """Write RUN_ID's report (Dice tables, boxplots, learning curves, cost): report/index.html."""
    from coordinator import factory
    from coordinator.report import write_report

    run_dir = _find_run(home, run_id)
    factory_run = runs.read_metrics(run_dir).get("plan") == "data_factory"
    path = factory.write_report(run_dir) if factory_run else write_report(run_dir, log=logging.getLogger("coordinator.report").info)
    click.echo(f"report: {path}")


@cli.command()
@click.option("--sites", "n_sites", default=4, show_default=True, help="Number of site nodes (site i labels organ group i: kidney, liver, pancreas, spleen).")
@click.option("--rounds", default=None, type=int, help="Override the spec's rounds.")
@click.option("--spec", "spec_file", default=None, type=click.Path(), help="Spec to run (default: the built-in demo).")
@click.option("--workdir", default=None, type=click.Path(file_okay=False), help="Where the federation lives (default: .testbed/<time>).")
@click.option("--port", default=0, type=int, help="gRPC port (default: a free one).")
@click.option("--no-approve", is_flag=True, help="Sites do not approve plans (shows the refusal path).")
@click.option(
    "--oof-phase",
    default="non_contrast",
    show_default=True,
    type=click.Choice(["non_contrast", "arterial", "portal_venous", "delayed", "none"]),
    help="Contrast phase of the out-of-federation test set scored after the run (none: skip).",
)
@click.option(
    "--phases",
    default="portal_venous",
    show_default=True,
    help="Contrast phase of each site's scanner, comma-separated, cycled over the sites (e.g. arterial,portal_venous,delayed: a domain shift between sites).",
)
@click.option(
    "--modalities",
    default="CT",
    show_default=True,
    help="Each site's scanner, CT or MR (MR-like intensities of the same anatomy), comma-separated, "
    "cycled over the sites (e.g. CT,MR: a cross-modality federation).",
)
@click.option("--classes", default=None, help="Classes every site labels, comma-separated (default: organ group i at site i).")  # fmt: skip
def testbed(n_sites, rounds, spec_file, workdir, port, no_approve, oof_phase, phases, modalities, classes) -> None:
    """Start a coordinator and N site nodes on loopback, run a spec, tear everything down."""
    from coordinator import testbed as tb

    text = None
    if spec_file:
        spec_mod.load(spec_file)  # its warnings are printed by the run itself
        text = Path(spec_file).read_text(encoding="utf-8")
    wd = Path(workdir) if workdir else Path(".testbed") / time.strftime("%Y%m%d-%H%M%S")
    phase_list = [p.strip() for p in phases.split(",") if p.strip()]
    from fedimg_testing.phantom import PHASES

    bad = [p for p in phase_list if p not in PHASES]
    if bad or not phase_list:
        raise click.BadParameter(f"unknown phase(s) {bad or phases!r}; known: {', '.join(PHASES)}", param_hint="--phases")
    mods = [m.strip().upper() for m in modalities.split(",") if m.strip()]
    if not mods or set(mods) - {"CT", "MR"}:
        raise click.BadParameter(f"must be CT and/or MR, comma-separated (got {modalities!r})", param_hint="--modalities")
    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if class_list:
        from preprocessing.schema import load_schema

        unknown = [c for c in class_list if c not in load_schema().classes or c == "background"]
        if unknown:
            raise click.BadParameter(f"not foreground classes of the built-in schema: {', '.join(unknown)}", param_hint="--classes")
    code = tb.run(wd, n_sites, spec_text=text, rounds=rounds, port=port, auto_approve=not no_approve,
                  oof_phase=None if oof_phase == "none" else oof_phase, phases=phase_list, modalities=mods, classes=class_list)  # fmt: skip
    if code != 0:
        sys.exit(code)


def main() -> None:
    run_cli(cli, "coordinator")


if __name__ == "__main__":
    main()
