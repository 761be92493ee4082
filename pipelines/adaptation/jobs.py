"""A resumable adaptation job's folder: configuration, checkpoints, metrics, outputs.

Layout (one folder per job, ``<site work_dir>/adapt/<job>/`` when run by site-agent)::

    job.json          kind, the resolved configuration and its sha256, status, step, times
    checkpoint.pt     the latest training state (networks, optimizers, RNG, step), atomic
    metrics.jsonl     one JSON line per logged step (losses only; no image content)
    model.pt          the finished job's model (what `site-agent infer` loads)
    branch/           a source job's published segmentation branch (branch.pt, branch.json)
    report/           index.html + PNGs

A job started again with the same configuration continues from its checkpoint; with a
different configuration it is refused (nothing trained is overwritten) unless the caller
asks for a restart, which first moves the old folder aside as ``<job>.replaced-<time>``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedimg_core import atomic
from fedimg_core.errors import FedimgError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class JobError(FedimgError, ValueError):
    """A job cannot start or continue; the message names the folder and the problem."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def config_digest(config: Mapping[str, Any]) -> str:
    """sha256 of a job configuration (canonical JSON): what tells a resumable job from another.

    Args:
        config: the job's resolved configuration (JSON-able; other values are written with ``str``).

    Returns:
        The hex digest.
    """
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    """The torch and Python random states, for a checkpoint.

    Returns:
        ``{"torch": <byte tensor>, "python": <random.getstate()>}``.
    """
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the random states `rng_state` saved.

    Args:
        state: what `rng_state` returned (read back from a checkpoint).
    """
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def tensor_blob(obj: Any) -> bytes:
    """``obj`` as `torch.save` writes it, in memory (for an atomic write).

    Args:
        obj: tensors, or containers of them.

    Returns:
        The bytes of the torch file.
    """
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class JobDir:
    """One job's folder. ``open`` checks it against the configuration and says whether to resume; every write is atomic.

    Args:
        root: the job folder (its name is the job name: 1-64 of ``A-Z a-z 0-9 _ . -``).
        kind: ``"source"`` or ``"target"``.
        config: the job's resolved configuration (JSON-able); its digest tells a resumable job from another.

    Raises:
        JobError: the folder name is not a job name.
    """

    def __init__(self, root: str | Path, kind: str, config: dict[str, Any]) -> None:
        self.root = Path(root)
        if not _NAME.match(self.root.name):
            raise JobError(f"{self.root}: a job name is 1-64 of A-Z a-z 0-9 _ . - (got {self.root.name!r})")
        self.kind = kind
        self.config = config
        self.digest = config_digest(config)

    # -- paths ----------------------------------------------------------------------------

    @property
    def record_file(self) -> Path:
        """job.json: kind, configuration and its sha256, status, step, times."""
        return self.root / "job.json"

    @property
    def checkpoint_file(self) -> Path:
        """checkpoint.pt: the latest training state."""
        return self.root / "checkpoint.pt"

    @property
    def metrics_file(self) -> Path:
        """metrics.jsonl: one JSON line per logged step."""
        return self.root / "metrics.jsonl"

    @property
    def model_file(self) -> Path:
        """model.pt: the finished job's model."""
        return self.root / "model.pt"

    @property
    def report_dir(self) -> Path:
        """report/: the job's HTML report and figures."""
        return self.root / "report"

    # -- lifecycle --------------------------------------------------------------------------

    def record(self) -> dict[str, Any] | None:
        """The job record (job.json).

        Returns:
            The record, or None before the job first started.

        Raises:
            JobError: job.json is unreadable.
        """
        try:
            record: dict[str, Any] = json.loads(self.record_file.read_text())
            return record
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise JobError(f"{self.record_file}: unreadable ({exc}); move the folder aside or use another job name") from None

    def open(self, restart: bool = False) -> bool:
        """Prepare the folder and say whether to resume.

        Args:
            restart: move an existing folder aside (renamed ``<job>.replaced-<time>``, not
                deleted) and start afresh.

        Returns:
            True when a checkpoint of this configuration exists (resume).

        Raises:
            JobError: the folder holds another configuration or kind, or a finished job
                (and ``restart`` is False).
        """
        old = self.record()
        if old is None and restart and self.root.exists():  # leftovers without a record: keep them aside too
            os.replace(self.root, self.root.with_name(f"{self.root.name}.replaced-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"))
        if old is not None:
            same = old.get("kind") == self.kind and old.get("config_sha256") == self.digest
            if restart:
                aside = self.root.with_name(f"{self.root.name}.replaced-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
                os.replace(self.root, aside)
                old = None
            elif not same:
                changed = sorted(k for k in set(old.get("config", {})) | set(self.config) if old.get("config", {}).get(k) != self.config.get(k))
                raise JobError(
                    f"{self.root}: holds a {old.get('kind')} job with another configuration (differs in: {', '.join(changed) or 'kind'}); "
                    "use another job name, or restart it (the old folder is kept aside)"
                )
            elif old.get("status") == "done":
                raise JobError(f"{self.root}: this job is already done (model in {self.model_file.name}); restart it to train again")
        self.root.mkdir(parents=True, exist_ok=True)
        resume = old is not None and self.checkpoint_file.is_file()
        created = old.get("created") if old else _now()
        self.write_record(status="running", step=(old or {}).get("step", 0) if resume else 0, created=created, error=None)
        if not resume and self.metrics_file.exists():
            self.metrics_file.unlink()  # metrics of a run that never checkpointed
        return resume

    def write_record(self, **fields: Any) -> None:
        """Update job.json with ``fields`` (atomically), keeping kind, configuration and digest.

        Args:
            **fields: record entries to set (``status``, ``step``, ...).
        """
        current = self.record() or {}
        current.update({"kind": self.kind, "config": self.config, "config_sha256": self.digest, "updated": _now(), **fields})
        atomic.write_json(self.record_file, current)

    # -- state ------------------------------------------------------------------------------

    def save_checkpoint(self, state: Mapping[str, Any], step: int) -> None:
        """Write the training state of ``step`` atomically and record the step.

        Args:
            state: tensors and plain values (weights-only loadable).
            step: the number of steps done.
        """
        atomic.write_bytes(self.checkpoint_file, tensor_blob({**state, "step": step, "config_sha256": self.digest}))
        self.write_record(step=step)

    def load_checkpoint(self) -> dict[str, Any]:
        """The saved training state.

        Returns:
            What `save_checkpoint` wrote, with ``step`` and ``config_sha256``.

        Raises:
            JobError: the checkpoint is unreadable or was written by another configuration.
        """
        try:
            state = torch.load(self.checkpoint_file, map_location="cpu", weights_only=True)
        except Exception as exc:  # our own file: a torn write is impossible (atomic), corruption is not
            raise JobError(f"{self.checkpoint_file}: unreadable ({exc}); restart the job") from None
        if state.get("config_sha256") != self.digest:
            raise JobError(f"{self.checkpoint_file}: written by another configuration; restart the job")
        return dict(state)

    def log_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one row to metrics.jsonl.

        Args:
            row: the step and its losses (JSON-able).
        """
        with open(self.metrics_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        """Every logged row (a line cut by a crash is skipped).

        Returns:
            The rows, in the order logged.
        """
        if not self.metrics_file.is_file():
            return []
        rows: list[dict[str, Any]] = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
        return rows

    def truncate_metrics(self, step: int) -> None:
        """Drop metric rows after ``step`` (logged after the checkpoint a resume restarts from).

        Args:
            step: the checkpoint's step.
        """
        rows = [r for r in self.metrics() if r.get("step", 0) <= step]
        atomic.write_text(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def finish(self, **fields: Any) -> None:
        """Mark the job done.

        Args:
            **fields: further record entries (the summary).
        """
        self.write_record(status="done", finished=_now(), **fields)

    def fail(self, error: str) -> None:
        """Mark the job failed.

        Args:
            error: the message recorded.
        """
        self.write_record(status="failed", error=error)
