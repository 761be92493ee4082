"""What a site keeps between rounds of one run, in its own work folder (never sent anywhere).

Fed-BioMed rebuilds the training plan for every round, so anything a long-lived client
would keep in memory (optimizer moments, a path-length running mean, step counters) is
lost unless the plan stores it. One file per run and plan, written atomically; a file
that cannot be read (other format, other network) is ignored and training starts fresh.

The run id comes from the plan's arguments (the coordinator's), so it must be a plain name
(`fedimg_core.config_types.is_plain_name`, checked by the plans' settings) and the store refuses any path that would
leave its root.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from fedimg_core.config_types import is_plain_name

__all__ = ["SiteStateStore", "is_plain_name", "round_seed"]


class SiteStateStore:
    """One state file ``<root>/<folder>/<run_id>-<name>.pt`` (no file when root or run_id is empty).

    Args:
        root: the site's cache folder.
        run_id: the run, a plain name (`is_plain_name`).
        name: what is stored (plan class, ``domain-key``), a plain name.
        folder: the sub-folder of `root`, a plain name.

    Raises:
        ValueError: `run_id`, `name` or `folder` is not a plain name, or the path would not
            lie under `root` (a link pointing elsewhere).
    """

    def __init__(self, root: str | os.PathLike[str] | None, run_id: str | None, name: str, folder: str = "optimizer-state"):
        self.path: Path | None = None
        if not (root and run_id):
            return
        for what, value in (("run id", run_id), ("name", name), ("folder", folder)):
            if not is_plain_name(value):
                raise ValueError(f"site state: {what} {value!r} is not a plain name (letters, digits, '-', '_', '.')")
        base = Path(root).resolve()
        path = (base / folder / f"{run_id}-{name}.pt").resolve()
        if not path.is_relative_to(base):  # a link inside root must not lead out of it
            raise ValueError(f"site state: {path} is not under {base}")
        self.path = path

    def read(self) -> Any | None:
        """The stored state (plain tensors and containers only: ``weights_only``).

        Returns:
            The state, or None without a file or when the file cannot be read as one.
        """
        if self.path is None or not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError):
            return None

    def write(self, state: Any) -> None:
        """Store `state` atomically (a temporary file, then a rename); nothing without a path.

        Args:
            state: what `torch.save` can write with ``weights_only`` loading in mind (tensors, dicts, numbers).
        """
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def round_seed(base: int | None, round_index: int, site: str) -> int:
    """A torch seed for one site's round: reproducible for a run's seed, different for every round and site.

    Fed-BioMed seeds torch with the same ``random_seed`` at the start of every round on every
    site, which would replay the same latent vectors, patches, augmentations and data order
    each round, and the same at every site.

    Args:
        base: the experiment's ``random_seed`` (None: none given).
        round_index: 0-based round of the run.
        site: the node id.

    Returns:
        A non-negative 63-bit seed.
    """
    digest = hashlib.sha256(f"fedimg:{base}:{round_index}:{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
