"""What a site keeps between rounds of one run, in its own work folder (never sent anywhere).

Fed-BioMed rebuilds the training plan for every round, so anything a long-lived client
would keep in memory (optimizer moments, a path-length running mean, step counters) is
lost unless the plan stores it. One file per run and plan, written atomically; a file
that cannot be read (other format, other network) is ignored and training starts fresh.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch


class SiteStateStore:
    def __init__(self, root: str | os.PathLike | None, run_id: str | None, name: str, folder: str = "optimizer-state"):
        self.path = Path(root) / folder / f"{run_id}-{name}.pt" if root and run_id else None

    def read(self) -> Any | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError):
            return None

    def write(self, state: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)


def round_seed(base: int | None, round_index: int, site: str) -> int:
    """A torch seed for one site's round: reproducible for a run's seed, different for every
    round and every site. Fed-BioMed seeds torch with the same ``random_seed`` at the start
    of every round on every site, which would replay the same latent vectors, patches,
    augmentations and data order each round, and the same at every site."""
    import hashlib

    digest = hashlib.sha256(f"fedimg:{base}:{round_index}:{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
