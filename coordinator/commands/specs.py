"""`coordinator validate` and `coordinator schema`: check a spec, print the JSON Schemas."""

from __future__ import annotations

import json

import click

from coordinator import spec as spec_mod
from coordinator.commands.common import load_spec, scale_option
from fedimg_core.site_config import site_json_schema


@click.command()
@click.argument("spec_file", type=click.Path())
@scale_option
def validate(spec_file, scale) -> None:
    """Check SPEC_FILE and print what it will run.

    Lists every problem at once (file, key, what is allowed) and warns about legal but
    risky values (no validation split, very few updates, an unusual learning rate)."""
    s = load_spec(spec_file, scale)
    sel = f"tags {s.site_tags}" + (f" among nodes {s.site_ids}" if s.site_ids else "")
    held_out = f"held out per site: validation {s.split['validation']:g}, test {s.split['test']:g} (split seed {s.split['seed']})"
    weights = f"weights {s.weights}" if s.mode == "federated" else "no aggregation"
    if s.validate_every > 1:
        held_out += f", models scored every {s.validate_every} rounds"
    if s.is_fedsr:
        held_out = "evaluation: each site's labelled cases (never trained on), by its personalised model"
    device = f"; gpu {s.device['gpu']}, precision {s.device['precision']}" if s.device != {"gpu": "optional", "precision": "auto"} else ""
    if s.dp is not None:
        device += f"; dp {s.dp['type']} (sigma {s.dp['sigma']:g}, clip {s.dp['clip']:g}, epsilon at delta {s.dp['delta']:g})"
    click.echo(
        f"ok: {s.name}: plan {s.plan} ({s.mode}), {s.rounds} rounds x {s.local_steps} steps, sites with {sel} (>= {s.min_sites}); {held_out}; {weights}{device}"
    )


SCHEMAS = {"spec": spec_mod.spec_json_schema, "site": site_json_schema}


@click.command()
@click.argument("which", type=click.Choice(sorted(SCHEMAS)))
def schema(which) -> None:
    """Print the JSON Schema of an experiment spec or a site config.

    Editors check a YAML file against it as you type: save it (docs/schemas/ holds both)
    and put `# yaml-language-server: $schema=<its path or URL>` on the file's first line."""
    click.echo(json.dumps(SCHEMAS[which](), indent=2, ensure_ascii=False))
