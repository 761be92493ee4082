"""Each site's training / validation / test split, a pure function of the split seed and the case ids.

Prepared datasets number their cases (``case_0000``, ``case_0001``...; `site-agent prepare`
keeps a case's number when it re-converts it and gives new cases new numbers). Case number ``k``
falls in block ``k // B``; each block of ``B`` consecutive numbers holds exactly the shares
(``B`` is the smallest block in which every share is a whole number of cases, e.g. 5 for 0.2 /
0.2), arranged by a permutation seeded by (split seed, block). So:

- a case's split depends only on its own number and the split seed: the same case is in the
  same split in every run and every method (the spec's training seed does not move it), and
  adding or removing other cases never moves it;
- every full block has the exact shares: a site of 4 cases with validation 0.25 and test 0.25
  has 2 training, 1 validation and 1 test case (only the last, partly filled block can deviate;
  a site with fewer cases than a block that would train on none trains on its highest number).

Case ids of another form (datasets written elsewhere) fall back to hashing: ``u`` from
sha256(seed, id) in [0, 1), test when ``u < test``, validation when ``u < test + validation``,
else training. Small sites are repaired: training is never left empty, and (from
``MIN_CASES_FOR_HELD_OUT`` cases) a positive share whose split got no case takes one; the case that
moves is the one nearest that split's interval, taken from training when training keeps a case,
else from another split that keeps one. Pure Python: no torch, no Fed-BioMed.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "MIN_CASES_FOR_HELD_OUT",
    "SPLITS",
    "SplitIndices",
    "SplitSettings",
    "assign_splits",
    "block_layout",
    "case_unit",
    "split_indices",
]

SPLITS = ("training", "validation", "test")
MIN_CASES_FOR_HELD_OUT = 3  # hashed ids: below this a site keeps an empty held-out split rather than train on one case
MAX_BLOCK = 100  # shares that fit no smaller block are rounded to whole cases per 100
_NUMBERED = re.compile(r"^case_(\d{1,9})$")


@dataclass(frozen=True)
class SplitSettings:
    """The shares of a site's cases held out, and the seed of the assignment.

    Attributes:
        validation: share of cases that score models for selection (best global, best local).
        test: share of cases that score the selected models only (never training or selection).
        seed: the split seed; independent of the training seed so that seeds vary training, not the split.
    """

    validation: float = 0.2
    test: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("validation", "test"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"split.{name}: must be a number in [0, 1) (got {value!r})")
        if self.validation + self.test >= 1.0:
            raise ValueError(f"split: validation + test must be below 1 so that some cases train (got {self.validation + self.test:g})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"split.seed: must be an integer >= 0 (got {self.seed!r})")

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> SplitSettings:
        """Settings from the ``split`` mapping the coordinator sends (missing keys: defaults).

        Args:
            raw: ``{"validation": ..., "test": ..., "seed": ...}`` or None.

        Returns:
            The settings.

        Raises:
            ValueError: an unknown key or a value out of range.
        """
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {"validation", "test", "seed"})
        if unknown:
            raise ValueError(f"split: unknown key(s) {', '.join(unknown)} (known: validation, test, seed)")
        return cls(**raw)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the plain mapping a spec, model_args and metrics.json hold."""
        return asdict(self)


@dataclass(frozen=True)
class SplitIndices:
    """Positions of a dataset's cases in each split, in dataset order."""

    training: list[int]
    validation: list[int]
    test: list[int]

    def counts(self) -> dict[str, int]:
        """Cases per split: ``{"training": n, "validation": n, "test": n}``."""
        return {name: len(getattr(self, name)) for name in SPLITS}


def case_unit(case_id: str, seed: int) -> float:
    """The case's position in [0, 1): the first 8 bytes of sha256 over the seed and the case id.

    Args:
        case_id: the prepared dataset's case id.
        seed: the split seed.

    Returns:
        A number in [0, 1), uniform over case ids.
    """
    digest = hashlib.sha256(f"fedimg-split\0{int(seed)}\0{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _interval(split: str, settings: SplitSettings) -> tuple[float, float]:
    lo = {"test": 0.0, "validation": settings.test, "training": settings.test + settings.validation}[split]
    hi = {"test": settings.test, "validation": settings.test + settings.validation, "training": 1.0}[split]
    return lo, hi


def _distance(u: float, interval: tuple[float, float]) -> float:
    lo, hi = interval
    return max(lo - u, u - hi, 0.0)


def block_layout(settings: SplitSettings) -> list[str]:
    """One block of the numbered-case scheme, before its seeded permutation.

    Args:
        settings: the shares.

    Returns:
        ``B`` split names: ``round(B * share)`` test and validation entries, the rest training.
    """
    size = next(
        (b for b in range(1, MAX_BLOCK + 1) if all(abs(b * x - round(b * x)) < 1e-9 for x in (settings.validation, settings.test))),
        MAX_BLOCK,
    )
    n_test, n_val = round(size * settings.test), round(size * settings.validation)
    return ["test"] * n_test + ["validation"] * n_val + ["training"] * (size - n_test - n_val)


def _numbered_splits(numbers: Mapping[str, int], settings: SplitSettings) -> dict[str, str]:
    layout = block_layout(settings)
    size = len(layout)
    blocks: dict[int, list[str]] = {}
    out = {}
    for case, k in numbers.items():
        block = k // size
        if block not in blocks:
            blocks[block] = random.Random(f"fedimg-split-block:{settings.seed}:{block}").sample(layout, size)
        out[case] = blocks[block][k % size]
    return out


def assign_splits(case_ids: Sequence[str], settings: SplitSettings) -> dict[str, str]:
    """Each case's split: ``"training"``, ``"validation"`` or ``"test"``.

    Numbered ids (``case_NNNN``, all of them) use the block scheme, other ids the hashed one
    (see the module docstring).

    Args:
        case_ids: the site's case ids (distinct).
        settings: shares and seed.

    Returns:
        case id -> split name.

    Raises:
        ValueError: duplicate case ids.
    """
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("case ids must be distinct")
    matches = {c: _NUMBERED.match(c) for c in case_ids}
    numbers = {c: int(m.group(1)) for c, m in matches.items() if m}
    if case_ids and len(numbers) == len(case_ids) and len(set(numbers.values())) == len(numbers):
        out = _numbered_splits(numbers, settings)
        if "training" not in out.values():  # a site smaller than one block: it still trains, on its highest number
            out[max(numbers, key=lambda c: numbers[c])] = "training"
        return out
    return _hashed_splits(case_ids, settings)


def _hashed_splits(case_ids: Sequence[str], settings: SplitSettings) -> dict[str, str]:
    units = {c: case_unit(c, settings.seed) for c in case_ids}
    out: dict[str, str] = {}
    for case, u in units.items():
        out[case] = next(name for name in ("test", "validation", "training") if u < _interval(name, settings)[1])

    def members(split: str) -> list[str]:
        return [c for c in case_ids if out[c] == split]

    def move_into(split: str) -> None:
        # a case whose split keeps another one: from training first, else from the other splits
        for pool in (("training",), ("test", "validation")):
            donors = [c for c in case_ids if out[c] in pool and out[c] != split and len(members(out[c])) > 1]
            if donors:
                target = _interval(split, settings)
                out[min(donors, key=lambda c: (_distance(units[c], target), c))] = split
                return

    if case_ids and not members("training"):
        move_into("training")
        if not members("training"):  # one case per held-out split: training still comes first
            target = _interval("training", settings)
            out[min(case_ids, key=lambda c: (_distance(units[c], target), c))] = "training"
    if len(case_ids) >= MIN_CASES_FOR_HELD_OUT:
        for split in ("test", "validation"):
            if getattr(settings, split) > 0 and not members(split):
                move_into(split)
    return out


def split_indices(case_ids: Sequence[str], settings: SplitSettings) -> SplitIndices:
    """`assign_splits` as positions into ``case_ids`` (the dataset's order).

    Args:
        case_ids: the dataset's case ids, in its item order.
        settings: shares and seed.

    Returns:
        The positions of each split.
    """
    assigned = assign_splits(case_ids, settings)
    by_split: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, case in enumerate(case_ids):
        by_split[assigned[case]].append(i)
    return SplitIndices(**by_split)
