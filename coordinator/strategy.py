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

With secure aggregation (``secure``, or any reply that came encrypted) every sampled site must
answer: each site's masks cancel only in the sum of all the sampled sites' updates, so the
remaining ones cannot be aggregated (Fed-BioMed's LOM and Joye-Libert tolerate no dropout);
the round raises `QuorumNotMet` instead, whatever ``min_per_round`` says.

The request policies that end a round's wait are in `coordinator.request_policies`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedbiomed.common.exceptions import FedbiomedStrategyError
from fedbiomed.common.logger import logger
from fedbiomed.researcher.strategies.default_strategy import DefaultStrategy

from pipelines.sampling import sample_sites
from pipelines.wire import WireChecksumError, decode_params, is_encoded


class QuorumNotMet(FedbiomedStrategyError):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Too few sites answered a round (or a mandatory one did not): nothing is aggregated.

    Args:
        round_i: the round, from 0.
        answered: node ids whose updates arrived.
        sampled: node ids the round asked.
        min_per_round: the updates the round needed.
        mandatory_missing: mandatory node ids that did not answer.
        secure: the round was securely aggregated (every sampled site was needed).
    """

    def __init__(self, round_i: int, answered: list[str], sampled: list[str], min_per_round: int, mandatory_missing: list[str],
                 secure: bool = False):  # fmt: skip
        self.secure = secure
        self.round_i = round_i
        self.answered = list(answered)
        self.sampled = list(sampled)
        self.min_per_round = min_per_round
        self.mandatory_missing = list(mandatory_missing)
        missing = [n for n in sampled if n not in answered]
        super().__init__(
            f"round {round_i + 1}: {len(answered)} of {len(sampled)} sites answered ("
            + ("secure aggregation needs every sampled site" if secure else f"min_per_round {min_per_round}")
            + (f", mandatory not answering: {', '.join(mandatory_missing)}" if mandatory_missing else "")
            + f"); missing: {', '.join(missing) or 'none'}"
        )


class SampledSitesStrategy(DefaultStrategy):  # type: ignore[misc]  # Fed-BioMed ships no types: its classes are Any
    """Fed-BioMed strategy that trains a seeded sample of the sites each round.

    Args:
        clients_per_round: sites sampled per round (None: all of them).
        seed: seed of the draw (with the round number).
        uniform: weight the sampled sites equally instead of by sample count.
        min_per_round: successful updates a round needs (None: every sampled site's, Fed-BioMed's rule).
        mandatory: node ids that must answer whenever they are sampled.
        secure: the experiment aggregates securely: every sampled site must answer (``min_per_round`` is moot).
    """

    def __init__(self, clients_per_round: int | None = None, seed: int = 0, uniform: bool = False,
                 min_per_round: int | None = None, mandatory: list[str] | None = None, secure: bool = False):  # fmt: skip
        super().__init__()
        self._parameters: dict[str, Any] = {"clients_per_round": clients_per_round, "seed": int(seed), "uniform": bool(uniform), "secure": bool(secure)}
        self.set_quorum(min_per_round, mandatory)
        self.history: dict[int, list[str]] = {}
        self.rejected: dict[int, dict[str, str]] = {}  # round -> node id -> why its update was not used (it failed its check)

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
            QuorumNotMet: fewer than ``min_per_round`` sites answered, or a sampled mandatory one did
                not, or (secure aggregation) any sampled site did not.
        """
        sampled = list(self._sampling_node_history.get(round_i) or training_replies)
        answered = {nid: reply for nid, reply in training_replies.items() if reply.get("success") is True and reply.get("sample_size") is not None}
        for nid, reply in training_replies.items():
            if nid not in answered:
                logger.warning(f"[fedimg] round {round_i + 1}: {nid} left out: " + (reply.get("msg") or "its reply has no sample_size"))
        received = self._decoded_updates(answered, round_i)
        answered = {nid: reply for nid, reply in answered.items() if nid in received}
        p = self._parameters
        # masked updates: the masks cancel only in the sum over every sampled site
        secure = bool(p.get("secure")) or any(reply.get("encrypted") for reply in training_replies.values())
        need = len(sampled) if p.get("min_per_round") is None or secure else p["min_per_round"]
        mandatory_missing = [nid for nid in p.get("mandatory") or [] if nid in sampled and nid not in answered]
        if len(answered) < need or mandatory_missing or not answered or (secure and set(sampled) - set(answered)):
            raise QuorumNotMet(round_i, list(answered), sampled, need, mandatory_missing, secure=secure)
        self._success_node_history[round_i] = list(answered)
        params = {nid: received[nid] for nid in answered}
        factors = {nid: reply.get("encryption_factor") for nid, reply in answered.items()}
        sizes = {nid: reply["sample_size"] for nid, reply in answered.items()}
        total = sum(sizes.values())
        if p["uniform"] or total == 0:
            weights = {nid: 1.0 / len(answered) for nid in answered}
        else:
            weights = {nid: size / total for nid, size in sizes.items()}
        return params, weights, total, factors

    def require_wire_form(self, required: bool) -> None:
        """Leave out a plain-tensor update (set when the experiment's sites send the wire form: `pipelines.plans.transfer`).

        Args:
            required: True for an experiment with ``transfer`` in its model arguments.
        """
        self._wire_required = bool(required)

    def _decoded_updates(self, answered: dict[str, Any], round_i: int) -> dict[str, Any]:
        """Each answering site's update as float32 tensors, checked against the digest it was sent with
        (`pipelines.wire`); an update that fails its check (or, where the wire form is required, comes without
        it) is left out of the round and recorded in `rejected`. Secure aggregation's masked vectors pass as they are."""
        out: dict[str, Any] = {}
        for nid, reply in answered.items():
            params = reply["params"]
            if not isinstance(params, Mapping):
                out[nid] = params
                continue
            try:
                if getattr(self, "_wire_required", False) and not is_encoded(params):
                    raise WireChecksumError("plain tensors where this experiment's sites send a checked buffer")
                out[nid] = decode_params(params)
            except WireChecksumError as exc:
                reason = f"its update failed its check ({exc})"
                logger.warning(f"[fedimg] round {round_i + 1}: {nid} left out: {reason}")
                if not hasattr(self, "rejected"):  # a strategy Fed-BioMed restored from a breakpoint
                    self.rejected = {}
                self.rejected.setdefault(round_i, {})[nid] = reason
        return out

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
        self._parameters = {"clients_per_round": None, "seed": 0, "uniform": False, "min_per_round": None, "mandatory": [], "secure": False,
                            **(self._parameters or {})}  # fmt: skip
        self.history = {int(k): list(v) for k, v in (state.get("history") or {}).items()}
