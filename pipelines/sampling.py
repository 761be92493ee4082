"""Which sites train in a round: a seeded draw shared by the Fed-BioMed strategy
(`coordinator.strategy`) and the in-process factory simulation (no FL imports)."""

from __future__ import annotations

import random


def sample_sites(node_ids: list[str], k: int | None, seed: int, round_i: int) -> list[str]:
    """The sites a round trains: ``k`` of ``node_ids``, drawn with a seed of (seed, round).

    Args:
        node_ids: every site of the federation.
        k: how many sites train per round (None, or at least their number: all of them).
        seed: the run's seed.
        round_i: the round, so a resumed run draws the same sites again.

    Returns:
        The sampled node ids, sorted.
    """
    nodes = sorted(node_ids)
    if k is None or k >= len(nodes):
        return nodes
    return sorted(random.Random(f"fedimg-sampling:{seed}:{round_i}").sample(nodes, k))
