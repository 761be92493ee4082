"""Node selection and quorum on stock Fed-BioMed: a seeded sample of the sites each round, and
rounds that survive failing sites.

Fed-BioMed's `DefaultStrategy` trains every node every round, fails the round when one node
does not answer (FB408) or answers with an error (FB402), and weights the aggregate by
sample counts. `SampledSitesStrategy` samples ``clients_per_round`` of the K sites (seeded
by (seed, round): the same run draws the same sites, also after a resume), aggregates the
sites that answered successfully, weights renormalised over them (by sample count, or
uniformly: the data factory, and segmentation runs with ``weights: equal``), and raises
`QuorumNotMet` before anything is aggregated when fewer than ``min_per_round`` sites, or not
every sampled ``mandatory`` site, answered. The draw is logged and kept in `history`.

`round_policies` are the request policies that end a round's wait: the deadline
(``round_timeout_s``, Fed-BioMed's `StopOnTimeout`) and `LostStaysLost`.
"""

from __future__ import annotations

from typing import Any

from fedbiomed.common.exceptions import FedbiomedStrategyError
from fedbiomed.common.logger import logger
from fedbiomed.researcher.requests import RequestPolicy, StopOnTimeout
from fedbiomed.researcher.requests._status import PolicyStatus, RequestStatus
from fedbiomed.researcher.strategies.default_strategy import DefaultStrategy

from pipelines.sampling import sample_sites


class QuorumNotMet(FedbiomedStrategyError):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Too few sites answered a round (or a mandatory one did not): nothing is aggregated.

    Args:
        round_i: the round, from 0.
        answered: node ids whose updates arrived.
        sampled: node ids the round asked.
        min_per_round: the updates the round needed.
        mandatory_missing: mandatory node ids that did not answer.
    """

    def __init__(self, round_i: int, answered: list[str], sampled: list[str], min_per_round: int, mandatory_missing: list[str]):
        self.round_i = round_i
        self.answered = list(answered)
        self.sampled = list(sampled)
        self.min_per_round = min_per_round
        self.mandatory_missing = list(mandatory_missing)
        missing = [n for n in sampled if n not in answered]
        super().__init__(
            f"round {round_i + 1}: {len(answered)} of {len(sampled)} sites answered (min_per_round {min_per_round}"
            + (f", mandatory not answering: {', '.join(mandatory_missing)}" if mandatory_missing else "")
            + f"); missing: {', '.join(missing) or 'none'}"
        )


class LostStaysLost(RequestPolicy):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """A request whose site was declared disconnected is over, even if the site connects again.

    Fed-BioMed counts a request as finished while its node is disconnected, and as pending again
    once the node reconnects; but a message sent while the node was disconnected was dropped,
    and a restarted process never answers its predecessor's request, so the round would wait
    for nothing (until its deadline, or for ever without one). This policy ends the wait when
    every request has finished or was once seen disconnected (Fed-BioMed's `Request.has_finished`
    marks it ``DISCONNECT``, and only a reply changes that).
    """

    def continue_(self, requests: list[Any]) -> PolicyStatus:
        """Keep waiting while a request is pending and its site was never seen disconnected.

        Args:
            requests: the federated request's requests.

        Returns:
            ``CONTINUE``, or ``COMPLETED`` when nothing is left to wait for.
        """
        for request in requests:
            if not request.has_finished() and not (request.status == RequestStatus.DISCONNECT and request.reply is None and request.error is None):
                return self.keep()
        return self.completed()


def round_policies(timeout_s: float | None) -> list[Any]:
    """The request policies of a training round (`coordinator.fedbiomed_hooks.RoundOutcomes` adds them).

    Args:
        timeout_s: the round's deadline in seconds (None: none).

    Returns:
        `LostStaysLost`, and Fed-BioMed's `StopOnTimeout` for the deadline.
    """
    policies: list[Any] = [LostStaysLost()]
    if timeout_s:
        policies.append(StopOnTimeout(int(timeout_s)))
    return policies


class SampledSitesStrategy(DefaultStrategy):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Fed-BioMed strategy that trains a seeded sample of the sites each round.

    Args:
        clients_per_round: sites sampled per round (None: all of them).
        seed: seed of the draw (with the round number).
        uniform: weight the sampled sites equally instead of by sample count.
        min_per_round: successful updates a round needs (None: every sampled site's, Fed-BioMed's rule).
        mandatory: node ids that must answer whenever they are sampled.
    """

    def __init__(self, clients_per_round: int | None = None, seed: int = 0, uniform: bool = False,
                 min_per_round: int | None = None, mandatory: list[str] | None = None):  # fmt: skip
        super().__init__()
        self._parameters: dict[str, Any] = {"clients_per_round": clients_per_round, "seed": int(seed), "uniform": bool(uniform)}
        self.set_quorum(min_per_round, mandatory)
        self.history: dict[int, list[str]] = {}

    def set_quorum(self, min_per_round: int | None, mandatory: list[str] | None = None) -> None:
        """Set what a round needs to be aggregated (also on a strategy restored from a breakpoint).

        Args:
            min_per_round: successful updates a round needs (None: every sampled site's).
            mandatory: node ids that must answer whenever they are sampled.
        """
        self._parameters["min_per_round"] = None if min_per_round is None else int(min_per_round)
        self._parameters["mandatory"] = list(mandatory or [])

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
        """Fed-BioMed's aggregation inputs from the sites that answered successfully.

        A site that did not answer, or answered unsuccessfully or without its sample count, is
        left out; the weights are renormalised over the others (uniform when ``uniform`` is set,
        else by sample count).

        Args:
            training_replies: the round's training replies (node id -> reply dict).
            round_i: the round, from 0.

        Returns:
            ``(params, weights, total, factors)`` as `DefaultStrategy.refine` returns them.

        Raises:
            QuorumNotMet: fewer than ``min_per_round`` sites answered, or a sampled mandatory one did not.
        """
        sampled = list(self._sampling_node_history.get(round_i) or training_replies)
        answered = {nid: reply for nid, reply in training_replies.items() if reply.get("success") is True and reply.get("sample_size") is not None}
        for nid, reply in training_replies.items():
            if nid not in answered:
                logger.warning(f"[fedimg] round {round_i + 1}: {nid} left out: " + (reply.get("msg") or "its reply has no sample_size"))
        p = self._parameters
        need = len(sampled) if p.get("min_per_round") is None else p["min_per_round"]
        mandatory_missing = [nid for nid in p.get("mandatory") or [] if nid in sampled and nid not in answered]
        if len(answered) < need or mandatory_missing or not answered:
            raise QuorumNotMet(round_i, list(answered), sampled, need, mandatory_missing)
        self._success_node_history[round_i] = list(answered)
        params = {nid: reply["params"] for nid, reply in answered.items()}
        factors = {nid: reply.get("encryption_factor") for nid, reply in answered.items()}
        sizes = {nid: reply["sample_size"] for nid, reply in answered.items()}
        total = sum(sizes.values())
        if p["uniform"] or total == 0:
            weights = {nid: 1.0 / len(answered) for nid in answered}
        else:
            weights = {nid: size / total for nid, size in sizes.items()}
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
        self._parameters = {"clients_per_round": None, "seed": 0, "uniform": False, "min_per_round": None, "mandatory": [], **(self._parameters or {})}
        self.history = {int(k): list(v) for k, v in (state.get("history") or {}).items()}
