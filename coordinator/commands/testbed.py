"""`coordinator testbed`: a coordinator and N site nodes on loopback, running one spec."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from coordinator import spec as spec_mod
from coordinator.commands.common import scale_option, spec_text
from preprocessing.schema import load_schema


@click.command()
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
@click.option(
    "--body",
    default="abdomen",
    show_default=True,
    type=click.Choice(["abdomen", "chest"]),
    help="abdomen: CT/MR phantoms (the main job); chest: radiograph sites after the ConDistFL paper's 2D setting (site i: its own "
    "CR/DX machine, labelling left lung, right lung, heart or pneumothorax), running coordinator/examples/chest_condistfl.yaml "
    "unless --spec is given (--phases, --modalities, --classes and --oof-phase are for abdomen sites).",
)
@click.option("--classes", default=None, help="Classes every site labels, comma-separated (default: organ group i at site i).")  # fmt: skip
@click.option(
    "--cases",
    default="10",  # coordinator.testbed.DEMO_CASES_PER_SITE (not imported here: start-up time)
    show_default=True,
    help="Cases per site, comma-separated, cycled over the sites (e.g. 10: more held-out cases per site; 4,8: sites of unequal size).",
)
@scale_option
@click.option("--device", default="auto", show_default=True, help="Every site's device setting: auto (a GPU when torch sees one), cpu, cuda or cuda:N.")
def testbed(n_sites, rounds, spec_file, workdir, port, no_approve, oof_phase, phases, modalities, body, classes, cases, scale, device) -> None:
    """Start a coordinator and N site nodes on loopback, run a spec, tear everything down."""
    from coordinator import testbed as tb  # deferred: start-up time (the site agent, Fed-BioMed)
    from fedimg_testing.phantom import PHASES

    text = None
    if spec_file:
        scaled = spec_mod.load(spec_file, scale=scale)  # its warnings are printed by the run itself
        text = spec_text(spec_file, scaled, scale)
    wd = Path(workdir) if workdir else Path(".testbed") / time.strftime("%Y%m%d-%H%M%S")
    phase_list = [p.strip() for p in phases.split(",") if p.strip()]
    bad = [p for p in phase_list if p not in PHASES]
    if bad or not phase_list:
        raise click.BadParameter(f"unknown phase(s) {bad or phases!r}; known: {', '.join(PHASES)}", param_hint="--phases")
    mods = [m.strip().upper() for m in modalities.split(",") if m.strip()]
    if not mods or set(mods) - {"CT", "MR"}:
        raise click.BadParameter(f"must be CT and/or MR, comma-separated (got {modalities!r})", param_hint="--modalities")
    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    if class_list:
        unknown = [c for c in class_list if c not in load_schema().classes or c == "background"]
        if unknown:
            raise click.BadParameter(f"not foreground classes of the built-in schema: {', '.join(unknown)}", param_hint="--classes")
    try:
        case_counts = [int(c) for c in cases.split(",") if c.strip()]
    except ValueError:
        case_counts = []
    if not case_counts or min(case_counts) < 1:
        raise click.BadParameter(f"must be integers >= 1, comma-separated (got {cases!r})", param_hint="--cases")
    if body == "chest" and class_list:
        raise click.BadParameter("chest sites each label their own structure (site i: left lung, right lung, heart, pneumothorax)", param_hint="--classes")
    code = tb.run(wd, n_sites, spec_text=text, rounds=rounds, port=port, auto_approve=not no_approve,
                  oof_phase=None if oof_phase == "none" or body == "chest" else oof_phase, phases=phase_list, modalities=mods,
                  classes=class_list, cases=case_counts, device=device, body=body)  # fmt: skip
    if code != 0:
        sys.exit(code)
