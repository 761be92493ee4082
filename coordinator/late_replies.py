"""Replies owed to a previous coordinator process: dropped with one log line, not a traceback.

Fed-BioMed 6.4.1, ``fedbiomed/transport/server.py``, ``ResearcherServicer.ReplyTask``: each
reply a node streams in is handed to the node's agent found with
``self._agent_store.get(node_id)``, which is None for a node that has not yet asked this
process for a task. After a coordinator restart a node reconnects and its sender re-sends the
reply it owed the previous process, often before its first task request: ``None.on_reply``
raises ``AttributeError`` and gRPC prints a traceback (twice for two sites). The reply
answers a request this process never sent, so nothing is lost by dropping it.

`install` wraps the agent store the servicer is given (``ResearcherServicer.__init__``)
so that its ``get`` returns, for an unknown node, an agent whose ``on_reply`` logs the drop.
The servicer's ``get`` is called by ``ReplyTask`` only; the server's own store (sending
requests, listing nodes) is untouched. A reply from a node already known to this process to
a request of the previous one is dropped by Fed-BioMed itself (``NodeAgent.on_reply``,
``fedbiomed/transport/node_agent.py``, a warning "reply from an unexpected request").
No Fed-BioMed file is changed.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["LateReplyStore", "install"]


class _DroppingAgent:
    """Stands in for the agent of a node unknown to this process: its replies are logged and dropped."""

    def __init__(self, node_id: str):
        self.node_id = node_id

    async def on_reply(self, message: dict[str, Any]) -> None:
        """Drop a reply (a message as a dict: ``request_id``, ``node_id``, ...) with one log line."""
        log.info(
            "dropped a reply of node %s to request %s: no request of this coordinator process (a reply owed to a previous one)",
            self.node_id,
            message.get("request_id") if isinstance(message, dict) else "?",
        )


class LateReplyStore:
    """A Fed-BioMed ``AgentStore`` whose ``get`` never answers None (see the module docstring).

    Args:
        store: the ``fedbiomed.transport.node_agent.AgentStore`` to wrap; every other
            attribute is the store's own.
    """

    def __init__(self, store: Any):
        self._store = store

    async def get(self, node_id: str) -> Any:
        """The node's agent, or one that drops its replies when this process does not know the node.

        Args:
            node_id: the id the reply names.

        Returns:
            A ``NodeAgent``, or a `_DroppingAgent`.
        """
        agent = await self._store.get(node_id)
        return agent if agent is not None else _DroppingAgent(node_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def install() -> None:
    """Make Fed-BioMed's researcher server drop replies to a previous process quietly (idempotent).

    Called by ``coordinator.engine.Federation`` before its server starts: the servicer takes
    its agent store when the server starts.
    """
    from fedbiomed.transport.server import ResearcherServicer

    init = ResearcherServicer.__init__
    if getattr(init, "fedimg_late_replies", False):
        return

    def __init__(self: Any, agent_store: Any, on_message: Any) -> None:
        init(self, LateReplyStore(agent_store), on_message)

    __init__.fedimg_late_replies = True  # type: ignore[attr-defined]
    ResearcherServicer.__init__ = __init__
