"""A run's ``checkpoints/`` folder: the global model of every round, the best global model,
and each site's last and best local model (torch state dicts, written atomically).

    checkpoints/global_round_NNNN.pt   the aggregated model after round NNNN (0: the initial one)
    checkpoints/latest.txt             the name of the newest global_round file
    checkpoints/best_global.pt         the best global model (`select_best`)
    checkpoints/local/<site>_last.pt   the model a site sent after its last local training
    checkpoints/local/<site>_best.pt   the site's local model with its best own validation Dice

Selection reads the validation rows only; the test rows of the selected model are recorded
beside its score (``test_score``) and never take part in the choice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from coordinator import runs
from coordinator.results import TEST_ROWS, selection_score
from fedimg_core import atomic

Params = Mapping[str, torch.Tensor]


def save_tensors(target: Path, params: Params) -> None:
    """Write a state dict to ``target`` atomically (a stop never leaves half a file).

    Args:
        target: the file; its folder is created.
        params: parameter name -> tensor.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save(dict(params), tmp)
    os.replace(tmp, target)


def load_tensors(source: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint written by `save_tensors`: plain tensors and plain data only.

    ``weights_only=True`` makes ``torch.load`` refuse any pickled callable or class, so a
    checkpoint file cannot run code when it is read.

    Args:
        source: the ``.pt`` file.

    Returns:
        Parameter name -> tensor, on the CPU.

    Raises:
        pickle.UnpicklingError: the file holds more than tensors and plain data.
    """
    return torch.load(source, map_location="cpu", weights_only=True)


def save_global(run_dir: Path, r: int, params: Params) -> None:
    """Keep the global model after round ``r`` and point ``latest.txt`` at it.

    Args:
        run_dir: the run directory.
        r: the round (0 for the initial model).
        params: the aggregated parameters.
    """
    target = Path(run_dir) / "checkpoints" / f"global_round_{r:04d}.pt"
    save_tensors(target, params)
    atomic.write_text(target.parent / "latest.txt", target.name + "\n")


def local_last(run_dir: Path, site_name: str) -> Path:
    """The file of a site's last local model.

    Args:
        run_dir: the run directory.
        site_name: the site's name (made a safe file name).

    Returns:
        ``<run>/checkpoints/local/<site>_last.pt``.
    """
    return Path(run_dir) / "checkpoints" / "local" / f"{runs.safe_name(site_name, 'site')}_last.pt"


def select_best(run_dir: Path, metrics: dict[str, Any], record: dict[str, Any], local: Mapping[str, Params], sites: Mapping[str, str]) -> None:
    """Update the best global model and each site's last and best local model after a round.

    Best global model: the highest mean Dice over all classes across sites on their validation
    cases (the global model of round r-1 is what the sites scored at the start of round r; the
    final model is scored after the last round); the same score on their test cases is kept as
    its ``test_score``. A model scored by fewer sites than have scored so far (one missed the
    round) is no candidate: its mean is over other cases (``metrics["scoring_sites"]``). Best local model per site: its own validation Dice (`select_best_local`).

    Args:
        run_dir: the run directory.
        metrics: the run's metrics; ``best_global`` and ``best_local`` are updated in place.
        record: the round's record (``round``, ``sites`` rows with ``val_global``/``val_final``/``val_local``
            and, when the sites have test cases, the matching ``test_*`` rows).
        local: node id -> the parameters the site sent this round.
        sites: node id -> site name.
    """
    ckpt = Path(run_dir) / "checkpoints"
    rows = list(record["sites"].values())
    for key, model_round in (("val_global", record["round"] - 1), ("val_final", record["round"])):
        scored = sorted(row.get("name", "") for row in rows if key in row)
        seen = set(metrics.get("scoring_sites") or []) | set(scored)
        metrics["scoring_sites"] = sorted(seen)
        if scored and set(scored) != seen:
            # a mean over fewer sites (one missed the round) is not comparable with the others: no candidate
            continue
        score = selection_score(rows, key)  # validation only: the test rows never choose
        best = metrics.get("best_global") or {}
        src = ckpt / f"global_round_{model_round:04d}.pt"
        if score is not None and score > best.get("score", -1.0) and src.is_file():
            metrics["best_global"] = {"model_round": model_round, "score": score, "test_score": selection_score(rows, TEST_ROWS[key])}
            save_tensors(ckpt / "best_global.pt", load_tensors(src))
    for nid, row in record["sites"].items():
        if nid in local:
            last = local_last(run_dir, sites.get(nid, nid))
            save_tensors(last, local[nid])
            select_best_local(metrics, nid, row, last, record["round"])


def select_best_local(metrics: dict[str, Any], nid: str, row: dict[str, Any], last: Path, r: int) -> None:
    """Copy a site's last local model to ``<site>_best.pt`` when its validation Dice is its best.

    The choice reads ``val_local`` only; the model's Dice on the site's test cases
    (``test_local``) is kept as its ``test_score`` (None without test cases).

    Args:
        metrics: the run's metrics; ``best_local[<site>]`` is updated in place.
        nid: the site's node id (its name when the row has none).
        row: the site's row of the round record (``name``, ``val_local``, ``test_local``).
        last: the file of the site's last local model.
        r: the round.
    """
    score = (row.get("val_local") or {}).get("dice_mean")
    best = metrics.setdefault("best_local", {})
    name = row.get("name", nid)
    if score is not None and score > best.get(name, {}).get("score", -1.0) and last.is_file():
        best[name] = {"round": r, "score": score, "test_score": (row.get("test_local") or {}).get("dice_mean")}
        save_tensors(last.with_name(f"{runs.safe_name(name, 'site')}_best.pt"), load_tensors(last))
