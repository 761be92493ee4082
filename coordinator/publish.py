"""`coordinator publish RUN`: a run's global model as a versioned model package in the registry.

The package (`pipelines.model_package`) carries the network config and weights
(safetensors), the label schema and the classes the model predicts, the preprocessing and
inference settings, a MONAI bundle view, a model card and provenance: run id, spec
checksum, method, rounds, the participating sites (names and Fed-BioMed node ids), and
per-class Dice of that model on the sites' validation and test cases (from the round
records) and on every out-of-federation set `coordinator evaluate` scored it on.

The registry validates kind ``model`` by loading the package exactly as a site does
(`validate_files`): checksums, plan arguments, strict weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from coordinator import registry as R
from coordinator import runs
from coordinator import spec as spec_mod
from coordinator.checkpoints import load_tensors
from coordinator.evaluate import trained_classes
from coordinator.results import case_dice
from fedimg_core import atomic
from fedimg_core.errors import UserError
from pipelines.model_package import PackageError, build_package_files, load_package, provenance_scores
from preprocessing.schema import parse_schema

log = logging.getLogger(__name__)

KIND = "model"
_ROUND = re.compile(r"^(?:round[ -]?)?(\d{1,6})$")

__all__ = ["KIND", "choose_checkpoint", "publish_model", "validate_files"]


def validate_files(files: Mapping[str, bytes]) -> None:
    """Refuse anything but a model package that loads (`pipelines.model_package.load_package`).

    Args:
        files: file name -> content.

    Raises:
        RegistryError: naming the file and the problem.
    """
    with tempfile.TemporaryDirectory(prefix="fedimg-model-check-") as tmp:
        for filename, data in files.items():
            (Path(tmp) / filename).write_bytes(data)
        try:
            load_package(tmp)
        except PackageError as exc:
            raise R.RegistryError(str(exc).replace(tmp + os.sep, "").replace(tmp, "package")) from None


R.register_validator(KIND, validate_files)


def choose_checkpoint(run_dir: Path, model: str, metrics: Mapping[str, Any]) -> tuple[Path, int, str]:
    """The checkpoint file of ``best``, ``last`` or ``round N`` (``N``, ``round N``, ``roundN``).

    Args:
        run_dir: the run.
        model: which global model.
        metrics: the run's metrics (the best model's round).

    Returns:
        (file, round, a label such as ``best global model (round 10)``).

    Raises:
        UserError: no such model in the run (the message lists what there is).
    """
    ckpt = run_dir / "checkpoints"
    rounds = sorted(int(p.stem.rsplit("_", 1)[1]) for p in ckpt.glob("global_round_*.pt"))
    have = f"it has rounds {rounds[0]}-{rounds[-1]}" if rounds else "it has no global checkpoints"
    choice = model.strip().lower()
    if choice == "best":
        best = metrics.get("best_global") or {}
        if not (ckpt / "best_global.pt").is_file() or "model_round" not in best:
            raise UserError(f"{run_dir.name}: no best global model (no site validated a round); publish --model last or --model round N ({have})")
        r = int(best["model_round"])
        return ckpt / "best_global.pt", r, f"best global model (round {r}, selected on the sites' validation cases)"
    if choice == "last":
        if not rounds:
            raise UserError(f"{run_dir.name}: {have}")
        return ckpt / f"global_round_{rounds[-1]:04d}.pt", rounds[-1], f"last global model (round {rounds[-1]})"
    m = _ROUND.match(choice)
    if not m:
        raise UserError(f"--model {model!r}: use best, last or round N")
    r = int(m.group(1))
    if r not in rounds:
        raise UserError(f"{run_dir.name}: no global model of round {r}; {have}")
    return ckpt / f"global_round_{r:04d}.pt", r, f"global model of round {r}"


def _round_scores(metrics: Mapping[str, Any], model_round: int, kind: str, order: Mapping[str, int]) -> dict[str, dict[str, float | int]]:
    """Per-class Dice (mean, n cases over all sites) of the global model of `model_round` on the sites' `kind` cases.

    The global model of round r is what the sites scored at the start of round r + 1
    (``<kind>_global``), or after the last round (``<kind>_final`` of round r)."""
    for rec in metrics.get("rounds") or []:
        for r, key in ((model_round + 1, f"{kind}_global"), (model_round, f"{kind}_final")):
            if rec.get("round") == r:
                rows = [row.get(key) or {} for row in (rec.get("sites") or {}).values()]
                if any(rows):
                    pooled: dict[str, list[float]] = {}
                    for row in rows:
                        for cls, values in case_dice(row).items():
                            pooled.setdefault(cls, []).extend(values)
                    return provenance_scores(pooled, order)
    return {}


def _out_of_federation(run_dir: Path, checkpoint: Path, order: Mapping[str, int]) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per-class Dice (mean, n) of this checkpoint in every evaluation record of the run."""
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for path in sorted((run_dir / "evaluations").glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for entry in (record.get("models") or {}).values():
            # the checkpoint's content when the record has it (a file of that name may have been replaced since); its path for older records
            same = entry.get("checkpoint_sha256") == digest if isinstance(entry, dict) and entry.get("checkpoint_sha256") else None
            if same is None:
                same = isinstance(entry, dict) and entry.get("checkpoint") == str(checkpoint.relative_to(run_dir))
            if same:
                pooled: dict[str, list[float]] = {}
                for case in entry.get("per_case") or []:
                    for cls, v in case.items():
                        if isinstance(v, (int, float)):
                            pooled.setdefault(cls, []).append(float(v))
                out[str(record.get("dataset", path.stem))] = provenance_scores(pooled, order)
    return out


def _sites(metrics: Mapping[str, Any]) -> list[dict[str, str]]:
    seen: dict[str, str] = {}
    for rec in metrics.get("rounds") or []:
        for node_id, row in (rec.get("sites") or {}).items():
            seen.setdefault(str(row.get("name", node_id)), str(node_id))
    return [{"name": n, "node_id": i} for n, i in sorted(seen.items())]


def publish_model(home: Path, run: str, model: str = "best", name: str | None = None, description: str = "", out: Path | None = None) -> dict:
    """Publish a run's global model as a new version of a model package.

    Args:
        home: the coordinator's home (its registry).
        run: the run (folder, id or unique id prefix).
        model: ``best``, ``last`` or ``round N``.
        name: the package name (default: the spec's name).
        description: one line for the model card and the bundle metadata.
        out: also write the package folder here (must not exist); None: the registry only.

    Returns:
        The registry record of the new version (``path``: its folder).

    Raises:
        UserError: a run that is not a segmentation run, a model it does not have, or a
            package the registry refuses.
    """
    run_dir = runs.find_run(Path(home), run)
    spec = spec_mod.load(runs.spec_file(run_dir))
    if spec.is_fedsr:  # its decoders never left the sites: what the coordinator holds is no model
        raise UserError(f"{run_dir.name}: a FedSR run's models are personal: each site keeps its own "
                        "(site-agent models personal; site-agent infer --model personal:RUN); nothing to publish")  # fmt: skip
    args = dict(spec.experiment_model_args())
    raw_schema = args.get("schema_definition")
    if not isinstance(raw_schema, dict):
        raise UserError(f"{run_dir.name}: plan {spec.plan} is not a segmentation plan; it has no segmentation model to publish")
    schema = parse_schema(raw_schema, f"{run_dir}/spec")
    metrics = runs.read_metrics(run_dir)
    checkpoint, model_round, label = choose_checkpoint(run_dir, model, metrics)
    if args.get("predict_classes") is None:
        trained = trained_classes(metrics, schema)
        if trained and len(trained) < schema.num_classes - 1:  # classes no site labels were never trained
            names = {v: k for k, v in schema.classes.items()}
            args["predict_classes"] = [names[c] for c in trained]
    spec_bytes = runs.spec_file(run_dir).read_bytes()
    state = runs.read_state(run_dir)
    provenance = {
        "run_id": run_dir.name,
        "spec_name": spec.name,
        "spec_sha256": hashlib.sha256(spec_bytes).hexdigest(),  # of the spec the run executed (the resolved copy when there is one)
        "spec_file": runs.spec_file(run_dir).name,
        "method": f"{spec.plan}, aggregator {args.get('aggregator', 'fedavg')}",
        "model": label,
        "model_round": model_round,
        "rounds": f"{len(metrics.get('rounds') or [])} of {metrics.get('rounds_planned', spec.rounds)}",
        "run_status": state.get("status"),
        "sites": [s["name"] for s in _sites(metrics)],
        "validation": _round_scores(metrics, model_round, "val", schema.classes),
        "test": _round_scores(metrics, model_round, "test", schema.classes),
        "out_of_federation": _out_of_federation(run_dir, checkpoint, schema.classes),
        "checkpoint_sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
    }
    package_name = name or spec.name
    try:
        state_dict = load_tensors(checkpoint)
        files = build_package_files(name=package_name, plan_args=args, state_dict=state_dict, provenance=provenance, description=description)
    except PackageError as exc:
        raise UserError(str(exc)) from None
    if out is not None and os.path.lexists(out):
        raise UserError(f"{out} already exists; give a new folder for --out")
    meta = {"run_id": run_dir.name, "model": label, "classes": [c for c in json.loads(files["package.json"])["classes"] if c != "background"]}
    record = R.Registry(Path(home)).publish(KIND, package_name, files, meta=meta)
    if out is not None:  # after the registry accepted it: a refused package leaves no folder behind
        write_folder(Path(out), files)
    record["path"] = str(R.Registry(Path(home)).path(KIND, package_name, record["version"]))
    log.info("published %s %s %s from %s (%s)", KIND, package_name, record["version"], run_dir.name, label)
    return record


def write_folder(out: Path, files: Mapping[str, bytes]) -> None:
    """Write a package's files into a new folder, atomically (`fedimg_core.atomic.publish_dir`).

    Args:
        out: the folder to create (must not exist).
        files: file name -> content.

    Raises:
        UserError: ``out`` exists.
    """
    if os.path.lexists(out):
        raise UserError(f"{out} already exists; give a new folder for --out")
    out.parent.mkdir(parents=True, exist_ok=True)

    def build(tmp: Path) -> None:
        for filename, data in files.items():
            (tmp / filename).write_bytes(data)

    atomic.publish_dir(out, build)
