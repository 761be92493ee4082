"""`coordinator run|resume|status|results`: run a spec in the foreground, follow and read runs."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path

import click
from rich.table import Table

from coordinator import runs
from coordinator import spec as spec_mod
from coordinator.client import call, client_token
from coordinator.commands.common import (
    console,
    find_run,
    grpc_options,
    home_option,
    load_spec,
    log,
    require_home,
    scale_option,
    spec_text,
    token_option,
    url_option,
    with_options,
)
from coordinator.privacy import privacy_summary
from coordinator.results import TEST_ROWS, class_dice, ordered_classes, participation
from fedimg_core.errors import UserError


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
    _print_participation(metrics.get("rounds", []))
    for sample in metrics.get("samples", [])[-1:]:
        click.echo(f"latest samples: {Path(info['run_dir']) / sample}")
    if metrics.get("published"):
        p = metrics["published"]
        click.echo(f"published: {p['kind']}/{p['name']} {p['version']} (coordinator registry)")
    _print_run_footer(info)


def _print_participation(rounds: list[dict]) -> None:
    """The rounds some site was left out of (failed, timeout), with the reasons; nothing when there were none."""
    sites, rows, lines = participation(rounds)
    if not rows:
        return
    table = Table("round", "aggregated from", *sites, title=f"rounds aggregated from fewer sites: {len(rows)} of {len(rounds)}")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in lines:
        click.echo(line)


def _print_results(run_dir: Path) -> None:
    info = runs.summary(run_dir)
    metrics = runs.read_metrics(run_dir)
    if metrics.get("plan") == "data_factory":
        _print_factory_results(info, metrics)
        return
    if metrics.get("plan") == "fedsr":
        _print_fedsr_results(info, metrics)
        return
    # "global" = the model the site received at the start of the round (scored before local
    # training); "local" = the site's model after local training; "final" = after the last round.
    # "val" = the site's validation cases (they select the models), "test" = its test cases
    # (they only score them); runs without a test split have no test columns.
    rounds = metrics.get("rounds", [])
    tested = any(row.get(k) for r in rounds for row in r["sites"].values() for k in TEST_ROWS.values())
    dice_cols = ("dice global val", "dice global test", "dice local val", "dice local test") if tested else ("dice global val", "dice local val")
    private = isinstance(metrics.get("privacy"), dict)  # dp: each site's epsilon so far (`coordinator.privacy`)
    table = Table("round", "site", "samples", "train loss", "lambda", *dice_cols, *(("epsilon",) if private else ()), "MB sent+received")
    fmt = lambda d, k: f"{d[k]:.3f}" if k in d else "-"  # noqa: E731
    for r in rounds:
        mb = f"{sum((r.get('bytes') or {}).values()) / 1e6:.2f}" if r.get("bytes") else "-"
        for _, row in sorted(r["sites"].items(), key=lambda kv: kv[1].get("name", kv[0])):
            tr = row.get("train", {})
            keys = ("val_global", "test_global", "val_local", "test_local") if tested else ("val_global", "val_local")
            table.add_row(
                str(r["round"]), row.get("name", "?"), str(row.get("samples", "-")), fmt(tr, "loss_mean" if "loss_mean" in tr else "Loss"),
                fmt(tr, "lambda"), *[fmt(row.get(k) or {}, "dice_mean") for k in keys], *((_epsilon(row),) if private else ()), mb,
            )  # fmt: skip
            mb = ""
    console.print(table)
    _print_participation(rounds)
    if (line := privacy_summary(metrics)) is not None:
        click.echo(line)
    last = [row for r in rounds[-1:] for row in r["sites"].values()]
    for split, label in (("val", "validation cases (they select the models)"), ("test", "test cases (never trained on, never used to select)")):
        final = {}
        for row in last:
            key = "val_final" if row.get("val_final") else "val_global"  # the final model, else the last one received
            final[row.get("name", "?")] = row.get(key if split == "val" else TEST_ROWS[key]) or {}
        final = {site: row for site, row in final.items() if row}
        if not final:
            continue
        classes = ordered_classes({c for row in final.values() for c in class_dice(row)}, metrics.get("classes"))
        dice_table = Table("site", *classes, "mean", title=f"final global model: Dice per class on each site's {label}")
        for site, row in sorted(final.items()):
            d = class_dice(row)
            dice_table.add_row(site, *[f"{d[c]:.3f}" if c in d else "" for c in classes], fmt(row, "dice_mean"))
        console.print(dice_table)
        which = "validation" if split == "val" else "test"
        click.echo(f"final global model: {which} cases: " + " | ".join(f"{k}: dice {v.get('dice_mean', float('nan')):.3f}" for k, v in sorted(final.items())))
    if rounds and not tested:
        click.echo("no test split in this run: the Dice above is on the validation cases that selected the model")
    if metrics.get("best_global"):
        b = metrics["best_global"]
        test = f", on test cases {b['test_score']:.3f}" if b.get("test_score") is not None else ""
        click.echo(f"best global model: round {b['model_round']} (selected on validation: mean Dice over classes across sites {b['score']:.3f}{test})")
    _print_run_footer(info)


def _print_fedsr_results(info: dict, metrics: dict) -> None:
    """FedSR: per round the sites' losses; then each site's personalised model on its labelled cases."""
    from coordinator.results import fedsr_scores

    rounds = metrics.get("rounds", [])
    table = Table("round", "site", "volumes", "L_reg", "L_seg", "MI seg", "f moved", "stage", "MB sent+received")
    fmt = lambda d, k, digits=3: f"{d[k]:.{digits}f}" if isinstance(d.get(k), (int, float)) else "-"  # noqa: E731
    for r in rounds:
        mb = f"{sum((r.get('bytes') or {}).values()) / 1e6:.2f}" if r.get("bytes") else "-"
        for _, row in sorted(r["sites"].items(), key=lambda kv: kv[1].get("name", kv[0])):
            tr = row.get("train", {})
            stage = "fine-tune" if tr.get("finetune") else "federated"
            table.add_row(str(r["round"]), row.get("name", "?"), fmt(tr, "volumes_training", 0), fmt(tr, "loss_registration"),
                          fmt(tr, "loss_segmentation"), fmt(tr, "mi_segmentation"), fmt(tr, "sa_shift"), stage, mb)  # fmt: skip
            mb = ""
    console.print(table)
    _print_participation(rounds)
    scores = fedsr_scores(metrics)
    if scores:
        who = "each site's own model (standalone)" if metrics.get("mode") == "standalone" else "personalised models (shared encoder + each site's decoders)"
        title = f"{who} on each site's labelled cases (never trained on)"
        out = Table("site", "round", "n", "S-Dice", "Jaccard", "HD95 mm", "ASD mm", "AVD %", "R-Dice", "NCC", "local NCC", title=title)
        for site, row in sorted(scores.items()):
            out.add_row(site, str(row["round"]), fmt(row, "eval_cases", 0), fmt(row, "eval_seg_dice"), fmt(row, "eval_seg_jaccard"),
                        fmt(row, "eval_seg_hd95_mm", 1), fmt(row, "eval_seg_asd_mm", 1), fmt(row, "eval_seg_avd_percent", 1),
                        fmt(row, "eval_reg_dice_mean"), fmt(row, "eval_reg_ncc"), fmt(row, "eval_reg_local_ncc"))  # fmt: skip
        console.print(out)
        classes = ordered_classes({k.split(".", 1)[1] for row in scores.values() for k in row if k.startswith("eval_seg_dice.")}, metrics.get("classes"))
        per = Table("site", *classes, title="segmentation Dice per structure (personalised models)")
        for site, row in sorted(scores.items()):
            per.add_row(site, *[fmt(row, f"eval_seg_dice.{c}") for c in classes])
        console.print(per)
        click.echo("S-Dice, HD95: segmentation by the site's model; R-Dice, NCC: the atlas registered by it (means over structures and cases)")
        if transductive := sorted(site for site, row in scores.items() if row.get("eval_trained_on_images")):
            click.echo(f"{', '.join(transductive)}: every case has labels, so the site trained on these cases' images (never their labels)")
    elif rounds:
        click.echo("no site scored a personalised model (sites without labelled cases report losses only)")
    _print_run_footer(info)


def _epsilon(row: dict) -> str:
    """A site row's epsilon so far ("-": no private steps reported; "n/a": central DP, which states none)."""
    privacy = row.get("privacy")
    if not isinstance(privacy, dict):
        return "-"
    return "n/a" if privacy.get("epsilon") is None else f"{privacy['epsilon']:.3g}"


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a stopped run is recorded as interrupted (resumable), not left "running"


def _foreground(home: str, grpc_host: str, grpc_port: int, public_host, spec, resume: bool, make_run_dir) -> None:
    from coordinator.engine import Federation  # deferred: start-up time (Fed-BioMed, torch)

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


@click.command()
@click.argument("spec_file", type=click.Path())
@home_option
@with_options(grpc_options)
@scale_option
def run(spec_file, home, grpc_host, grpc_port, public_host, scale) -> None:
    """Run SPEC_FILE in the foreground (this process hosts the Fed-BioMed server)."""
    s = load_spec(spec_file, scale)
    text = spec_text(spec_file, s, scale)
    _foreground(home, grpc_host, grpc_port, public_host, s, False, lambda: runs.new_run(Path(home), text, s.name, resolved=s.resolved_raw()))


@click.command()
@click.argument("run_id")
@home_option
@with_options(grpc_options)
@url_option
@token_option
def resume(run_id, home, grpc_host, grpc_port, public_host, url, token) -> None:
    """Continue an interrupted run from its last breakpoint (via --url: re-queue it on the service)."""
    if url:
        reply = call(url, "POST", f"/runs/{run_id}/resume", client_token(Path(home), token))
        click.echo(f"re-queued {reply['run_id']}")
        return
    run_dir = find_run(home, run_id)
    state = runs.read_state(run_dir)
    if state["status"] == "done":
        raise UserError(f"run {run_dir.name} is already done")
    if state["status"] == "running":
        runs.recover_stale(Path(home))
        if runs.read_state(run_dir)["status"] == "running":
            raise UserError(f"run {run_dir.name} is running in process {state.get('pid')}")
    s = spec_mod.load(runs.spec_file(run_dir))
    _foreground(home, grpc_host, grpc_port, public_host, s, True, lambda: run_dir)


@click.command()
@home_option
@url_option
@token_option
@click.option("--json", "as_json", is_flag=True)
def status(home, url, token, as_json) -> None:
    """List runs and their state."""
    if url:
        rows = call(url, "GET", "/runs", client_token(Path(home), token))["runs"]
    else:
        require_home(home)
        rows = runs.list_runs(Path(home))  # a run whose process died shows as interrupted (nothing is written)
        for row in rows:
            if row.get("process_gone"):
                log.info("run %s: its coordinator process is gone; shown as interrupted (`coordinator resume %s` continues it)", row["run_id"], row["run_id"])
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table("run", "status", "rounds", "error")
    for r in rows:
        table.add_row(r["run_id"], r["status"], f"{r['rounds_done']}/{r.get('rounds_planned') or '?'}", (r.get("error") or "")[:80])
    console.print(table if rows else "no runs yet")


@click.command()
@click.argument("run_id")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the metrics JSON.")
def results(run_id, home, as_json) -> None:
    """Per-round metrics of RUN_ID (id, id prefix or run directory)."""
    run_dir = find_run(home, run_id)
    if as_json:
        click.echo(json.dumps({**runs.summary(run_dir), "metrics": runs.read_metrics(run_dir)}, indent=2, default=str))
    else:
        _print_results(run_dir)
