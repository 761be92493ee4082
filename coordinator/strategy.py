"""Node selection on stock Fed-BioMed: a seeded random sample of the sites each round.

Fed-BioMed's `DefaultStrategy` trains every node every round and weights the aggregate
by sample counts. `SampledSitesStrategy` samples ``clients_per_round`` of the K sites
(seeded by (seed, round): the same run draws the same sites, also after a resume) and
can weight the sampled sites uniformly (the data factory: every site's generator counts
the same, whatever its number of slices; segmentation runs with ``weights: equal``, the
ConDistFL paper's setting, where it samples every site). The draw is logged and kept in
`history`.
"""

from __future__ import annotations

from typing import Any

from fedbiomed.common.logger import logger
from fedbiomed.researcher.strategies.default_strategy import DefaultStrategy

from pipelines.sampling import sample_sites


class SampledSitesStrategy(DefaultStrategy):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Fed-BioMed strategy that trains a seeded sample of the sites each round.

    Args:
        clients_per_round: sites sampled per round (None: all of them).
        seed: seed of the draw (with the round number).
        uniform: weight the sampled sites equally instead of by sample count.
    """

    def __init__(self, clients_per_round: int | None = None, seed: int = 0, uniform: bool = False):
        super().__init__()
        self._parameters: dict[str, Any] = {"clients_per_round": clients_per_round, "seed": int(seed), "uniform": bool(uniform)}
        self.history: dict[int, list[str]] = {}

    def sample_nodes(self, from_nodes: list[str], round_i: int) -> list[str]:
        """Draw the round's sites and record the draw.

        Args:
            from_nodes: node ids of the experiment's sites.
            round_i: the round, from 0.

        Returns:
            The node ids that train this round.
        """
        p = self._parameters
        chosen = sample_sites(list(from_nodes), p["clients_per_round"], p["seed"], round_i)
        self._sampling_node_history[round_i] = list(chosen)
        self.history[round_i] = list(chosen)
        if len(chosen) < len(from_nodes):  # equal weights alone train every site: nothing drawn to log
            logger.info(f"[fedimg] round {round_i + 1}: sampled {len(chosen)} of {len(from_nodes)} sites: {', '.join(chosen)}")
        return chosen

    def refine(self, training_replies, round_i):
        """Fed-BioMed's aggregation inputs; the weights made uniform when ``uniform`` is set.

        Args:
            training_replies: the round's training replies.
            round_i: the round, from 0.

        Returns:
            ``(params, weights, total, factors)`` as `DefaultStrategy.refine` returns them.
        """
        params, weights, total, factors = super().refine(training_replies, round_i)
        if self._parameters["uniform"] and weights:
            weights = {nid: 1.0 / len(weights) for nid in weights}
        return params, weights, total, factors

    def save_state_breakpoint(self) -> dict[str, Any]:
        """The strategy's breakpoint state, with the draw history.

        Returns:
            Fed-BioMed's state plus ``history`` (round -> node ids).
        """
        state = super().save_state_breakpoint()
        state["history"] = {str(k): v for k, v in self.history.items()}
        return state

    def load_state_breakpoint(self, state: dict[str, Any]) -> None:
        """Restore the strategy and its draw history from a breakpoint.

        Args:
            state: what `save_state_breakpoint` returned.
        """
        super().load_state_breakpoint(state)
        self._parameters = {"clients_per_round": None, "seed": 0, "uniform": False, **(self._parameters or {})}
        self.history = {int(k): list(v) for k, v in (state.get("history") or {}).items()}
