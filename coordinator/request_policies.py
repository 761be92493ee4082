"""The request policies that end a training round's wait (added by `coordinator.fedbiomed_hooks.RoundOutcomes`).

Fed-BioMed's training job waits until every site answers or is declared disconnected, with no
deadline. `round_policies` adds the deadline (``round_timeout_s``, Fed-BioMed's `StopOnTimeout`)
and `LostStaysLost`.

Import this module only once the researcher's environment is set (`coordinator.engine.Federation`
does): Fed-BioMed's ``fedbiomed.researcher.requests`` creates its researcher component on import.
"""

from __future__ import annotations

from typing import Any

from fedbiomed.researcher.requests import RequestPolicy, StopOnTimeout
from fedbiomed.researcher.requests._status import PolicyStatus, RequestStatus

__all__ = ["LostStaysLost", "round_policies"]


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
