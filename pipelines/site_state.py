"""What a site keeps between rounds of one run, in its own work folder (never sent anywhere).

Fed-BioMed rebuilds the training plan for every round, so anything a long-lived client
would keep in memory (optimizer moments, a path-length running mean, step counters) is
lost unless the plan stores it. One file per run and plan, written atomically; a file
that cannot be read (other format, other network) is ignored and training starts fresh.

The run id comes from the plan's arguments (the coordinator's), so it must be a plain name
(`is_plain_name`, checked by the plans' settings) and the store refuses any path that would
leave its root.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any


def is_plain_name(value: object) -> bool:
    """Whether `value` is a plain name usable as one file-name component: a non-empty string
    of letters, digits, ``-``, ``_`` and ``.``, not ``.`` or ``..`` (no separator, no way up)."""
    return (isinstance(value, str) and bool(value) and value not in (".", "..")
            and all(c.isalnum() or c in "-_." for c in value))  # fmt: skip


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

    def __init__(self, root: str | os.PathLike | None, run_id: str | None, name: str, folder: str = "optimizer-state"):
        self.path = None
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
        if self.path is None or not self.path.is_file():
            return None
        import torch  # here, not at the top: checking a spec (is_plain_name) must not load torch

        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except (RuntimeError, ValueError, KeyError, OSError, EOFError, pickle.UnpicklingError):
            return None

    def write(self, state: Any) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        import torch

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
