"""`coordinator evaluate|report`: score a run's models out of federation, write its report."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

import click
from rich.progress import Progress
from rich.table import Table

from coordinator import runs
from coordinator.commands.common import console, find_run, home_option, log
from fedimg_core.logs import show_progress, stderr_console
from fedimg_core.progress import PROGRESS_EVERY_S, ProgressLines


@click.command()
@click.argument("run_id")
@click.option("--data", "dataset", required=True, type=click.Path(), help="A prepared dataset (site-agent prepare) that took no part in training.")
@click.option("--merge-lesions", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="Score lesions as their organ (auto: when the dataset labels an organ but not its lesions).")  # fmt: skip
@click.option("--overlays", type=click.IntRange(min=0), default=3, show_default=True,
              help="Draw the best global model on this many cases (the first ones; 0: none): report/overlays/oof_case<j>.png.")  # fmt: skip
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print the evaluation record as JSON.")
def evaluate(run_id, dataset, merge_lesions, overlays, home, as_json) -> None:
    """Score RUN_ID's best global model and best local models on an out-of-federation dataset."""
    from coordinator.evaluate import evaluate_run  # deferred: start-up time (torch, MONAI)

    run_dir = find_run(home, run_id)
    if not sys.stderr.isatty():  # a log file or a pipe: plain progress lines (log records), at most every PROGRESS_EVERY_S
        record = evaluate_run(run_dir, Path(dataset), merge_lesions=merge_lesions, progress=_plain_progress(log.info), overlays=overlays)
    else:  # a bar on the console the log lines use: they scroll above it (--quiet: no bar)
        with Progress(console=stderr_console(), transient=True, disable=not show_progress()) as bar:
            task = bar.add_task("evaluating", total=None)

            def progress(model, done, total):
                bar.update(task, description=f"{model}" if model == "preprocessing" else f"scoring {model}", completed=done, total=total)

            record = evaluate_run(run_dir, Path(dataset), merge_lesions=merge_lesions, progress=progress, overlays=overlays)
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    _print_evaluation(record)


def _plain_progress(say: Callable[[str], None], every_s: float = PROGRESS_EVERY_S, clock: Callable[[], float] | None = None) -> Callable[[str, int, int], None]:
    """A progress callback printing plain lines (`fedimg_core.progress.ProgressLines`): each
    step's first and last case, and at most one line every `every_s` seconds between."""
    lines = ProgressLines(say, unit="cases", every_s=every_s, clock=clock)

    def progress(step: str, done: int, total: int) -> None:
        lines(step if step == "preprocessing" else f"scoring {step}", done, total)

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
    if record.get("overlays"):  # paths relative to the run directory; `coordinator report` shows them
        click.echo(f"overlays (in the run directory): {', '.join(e['path'] for e in record['overlays'])}")


@click.command()
@click.argument("run_id")
@home_option
def report(run_id, home) -> None:
    """Write RUN_ID's report (Dice tables, boxplots, learning curves, cost): report/index.html."""
    from coordinator import factory  # (deferred, as above)
    from coordinator.report import write_report

    run_dir = find_run(home, run_id)
    factory_run = runs.read_metrics(run_dir).get("plan") == "data_factory"
    path = factory.write_report(run_dir) if factory_run else write_report(run_dir, log=logging.getLogger("coordinator.report").info)
    click.echo(f"report: {path}")
