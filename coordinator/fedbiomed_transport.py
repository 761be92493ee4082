"""Fed-BioMed's gRPC server with mutual TLS: only enrolled, unrevoked sites get anything.

This is the one module where the coordinator extends Fed-BioMed's transport. It mirrors
``fedbiomed/transport/server.py`` of Fed-BioMed 6.4.1:

- `EnrolledGrpcServer` subclasses ``GrpcServer``; ``_GrpcAsyncServer.start`` builds its
  ``grpc.aio.server`` and servicer inline, so `EnrolledGrpcServer._start_async` is a copy of it
  with two changes: server credentials that require a client certificate signed by the site CA
  (``require_client_auth=True``: a client without one never completes the handshake), and the
  `EnrolledServicer` below. The server options are copied unchanged from that file.
- `EnrolledServicer` subclasses ``ResearcherServicer``: ``GetTaskUnary``, ``ReplyTask`` and
  ``Feedback`` first check the peer's certificate against ``<home>/sites.json``
  (`coordinator.pki.SiteRegistry`, re-read when it changes: revocation needs no restart) and
  that the node id the message claims is the certificate's CN; otherwise the call is aborted
  with PERMISSION_DENIED and one log line names the peer and the reason (at most one line a
  minute per peer address, certificate and kind of refusal: the claimed node id, the peer's own
  text, does not make a new line). A reply without a node id is refused the same way;
  one reassembled larger than `MAX_REPLY_BYTES` is aborted with RESOURCE_EXHAUSTED.

`install` points ``fedbiomed.researcher.requests._requests.GrpcServer`` (the name
``Requests.__init__`` constructs) at `EnrolledGrpcServer`. `check_upstream` fails loudly when
the Fed-BioMed code this mirrors changed (tests call it).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, AsyncIterator

import grpc  # type: ignore[import-untyped]
from fedbiomed.common.constants import MessageType
from fedbiomed.common.logger import logger as fbm_logger
from fedbiomed.common.message import FeedbackMessage, Message, TaskRequest
from fedbiomed.common.serializer import Serializer
from fedbiomed.transport import server as fbm_server
from fedbiomed.transport.node_agent import AgentStore
from fedbiomed.transport.protocols import researcher_pb2_grpc
from fedbiomed.transport.protocols.researcher_pb2 import Empty

from coordinator.pki import SiteRegistry, clip
from fedimg_core.tls_pins import fingerprint

__all__ = ["FEDBIOMED_VERSION", "MAX_REPLY_BYTES", "EnrolledGrpcServer", "EnrolledServicer", "check_upstream", "install", "peer_certificate"]

FEDBIOMED_VERSION = "6.4.1"  # the version whose server.py this module mirrors
log = logging.getLogger("coordinator.trust")
_LOG_EVERY_S = 60.0  # one line per refused peer, certificate and kind of refusal per minute: a refused node polls every few seconds
_LOG_KEYS = 1000  # peers remembered for that rate limit (least recently refused forgotten first)
# A reply is sent in chunks and reassembled in memory before it is read. Fed-BioMed caps each
# gRPC message at 100 MiB but not their number; model updates of the networks this project
# trains are far below 1 GiB, so a larger reply is a broken or hostile site, not a model.
MAX_REPLY_BYTES = 1 << 30


def check_upstream() -> None:
    """Fail loudly when Fed-BioMed's server code this module mirrors is not what it was.

    Raises:
        RuntimeError: another Fed-BioMed version, or the mirrored methods changed shape.
    """
    import fedbiomed

    if str(fedbiomed.__version__).lstrip("v") != FEDBIOMED_VERSION:
        raise RuntimeError(f"coordinator.fedbiomed_transport mirrors Fed-BioMed {FEDBIOMED_VERSION}; installed: {fedbiomed.__version__}")
    start = inspect.getsource(fbm_server._GrpcAsyncServer.start)
    for needle in ("grpc.aio.server(", "ResearcherServicer(", "grpc.ssl_server_credentials(", "add_secure_port(", "wait_for_termination"):
        if needle not in start:
            raise RuntimeError(f"Fed-BioMed's _GrpcAsyncServer.start changed ({needle!r} missing): review coordinator.fedbiomed_transport")
    if "asyncio.run(super().start())" not in inspect.getsource(fbm_server.GrpcServer._run):
        raise RuntimeError("Fed-BioMed's GrpcServer._run changed: review coordinator.fedbiomed_transport")
    from fedbiomed.researcher.requests import _requests

    if getattr(_requests, "GrpcServer", None) not in (fbm_server.GrpcServer, EnrolledGrpcServer):
        raise RuntimeError("fedbiomed.researcher.requests._requests no longer constructs GrpcServer by that name")


def peer_certificate(context: Any) -> bytes | None:
    """The PEM certificate the peer presented, from the call's auth context.

    Args:
        context: the gRPC servicer context.

    Returns:
        The PEM bytes, or None (no client certificate).
    """
    values = list(context.auth_context().get("x509_pem_cert") or [])
    return bytes(values[0]) if values else None


class EnrolledServicer(fbm_server.ResearcherServicer):  # type: ignore[misc]  # Fed-BioMed ships no types
    """``ResearcherServicer`` that serves enrolled, unrevoked sites only (module docstring).

    Args:
        agent_store: as Fed-BioMed's.
        on_message: as Fed-BioMed's.
        registry: the enrolled sites.
    """

    def __init__(self, agent_store: AgentStore, on_message: Any, registry: SiteRegistry) -> None:
        super().__init__(agent_store=agent_store, on_message=on_message)
        self._registry = registry
        self._logged: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def _refuse_line(self, context: Any, who: str, sha: str, kind: str, reason: str) -> None:
        """Log one refusal, at most once a minute per peer address, certificate and kind (bounded: `_LOG_KEYS`)."""
        peer = str(context.peer())
        key = (peer.rsplit(":", 1)[0], sha, kind)  # without the port: every reconnection has a new one
        now = time.monotonic()
        if now - self._logged.get(key, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._logged[key] = now
            self._logged.move_to_end(key)
            while len(self._logged) > _LOG_KEYS:
                self._logged.popitem(last=False)
            line = f"refused {peer} ({who}): {reason}"
            log.warning("%s", line)
            fbm_logger.warning(line)

    async def _check(self, context: Any, node_id: object, claim_required: bool = False) -> bool:
        """Whether the peer's certificate is enrolled, not revoked, and names ``node_id``; else abort the call.

        Args:
            context: the call's context.
            node_id: the node id the message claims (None with ``claim_required`` False: not checked).
            claim_required: refuse a message whose node id is missing or not a string.

        Returns:
            True when allowed (otherwise the call is aborted: ``context.abort`` raises).
        """
        pem = peer_certificate(context)
        if pem is None:  # require_client_auth makes this unreachable; kept as a second lock
            reason, told, who, sha, kind = "no client certificate", "", "unknown", "", "no certificate"
        else:
            sha = fingerprint(pem)
            told = ""
            if claim_required and not isinstance(node_id, str):
                record, reason, kind = None, f"the message claims no node id (got {clip(node_id)})", "no claim"
            else:
                try:
                    record, reason = self._registry.authorize(sha, node_id if isinstance(node_id, str) else None)
                except Exception as exc:  # noqa: BLE001 - an unreadable sites.json refuses everyone
                    record, reason = None, f"enrolled sites unreadable ({exc})"
                    told = "the coordinator cannot read its enrolled sites now"  # the detail is for its log only
                kind = "unreadable" if told else "not enrolled" if record is None else "revoked" if record.revoked else "claim"
            who = f"site {record.site}" if record else f"certificate {sha[:19]}.."
            if not reason:
                return True
        self._refuse_line(context, who, sha, kind, reason)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"not an enrolled site: {told or reason}")
        return False  # abort raises; not reached

    async def GetTaskUnary(self, request: Any, context: Any) -> AsyncIterator[Any]:
        """Fed-BioMed's task long-poll, for enrolled sites whose certificate names the node id they claim.

        Args:
            request: the task request.
            context: the call's context.

        Yields:
            The task's chunks, as Fed-BioMed's servicer yields them.
        """
        claimed = TaskRequest.from_proto(request).get_dict().get("node")
        if not await self._check(context, claimed, claim_required=True):
            return
        inner = super().GetTaskUnary(request, context)
        try:
            async for chunk in inner:
                # the long poll may have waited for minutes: a site revoked meanwhile gets nothing
                if not await self._check(context, claimed, claim_required=True):
                    return
                yield chunk
        finally:
            await inner.aclose()  # Fed-BioMed re-queues an interrupted task on GeneratorExit

    async def ReplyTask(self, request_iterator: Any, unused_context: Any) -> Any:
        """Replies from a site; mirrors Fed-BioMed's ``ResearcherServicer.ReplyTask``, with every
        reply's ``node_id`` checked against the certificate (a reply without one is refused) and
        a reply reassembled larger than `MAX_REPLY_BYTES` aborted (RESOURCE_EXHAUSTED).

        Args:
            request_iterator: the reply's chunks.
            unused_context: the call's context.

        Returns:
            ``Empty``.
        """
        context = unused_context
        if not await self._check(context, None):
            return Empty()
        reply = b""
        async for answer in request_iterator:
            if len(reply) + len(answer.bytes_) > MAX_REPLY_BYTES:
                line = f"aborted a reply from {context.peer()}: over {MAX_REPLY_BYTES} bytes reassembled"
                log.warning("%s", line)
                fbm_logger.warning(line)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"reply larger than {MAX_REPLY_BYTES} bytes")
                return Empty()  # abort raises; not reached
            reply += answer.bytes_
            if answer.size != answer.iteration:
                continue
            message = Serializer.loads(reply)
            claimed = message.get("node_id") if isinstance(message, dict) else None
            if not await self._check(context, claimed, claim_required=True):
                return Empty()
            fbm_logger.debug(
                "[WIRE][N->S][RX] node=%s req=%s type=%s bytes=%d",
                message.get("node_id"),
                message.get("request_id"),
                Message.from_dict(message).__class__.__name__,
                len(reply),
            )
            node = await self._agent_store.get(message["node_id"])
            await node.on_reply(message)
            reply = b""
        return Empty()

    async def Feedback(self, request: Any, unused_context: Any) -> Any:
        """Logs and scalars from a site, for enrolled sites whose certificate names the node id they claim.

        Args:
            request: the feedback message.
            unused_context: the call's context.

        Returns:
            ``Empty``.
        """
        one_of = request.WhichOneof("feedback_type")
        param = FeedbackMessage.from_proto(request).get_param(one_of)
        claimed = param.get("node_id") if isinstance(param, dict) else getattr(param, "node_id", None)
        if not await self._check(unused_context, claimed, claim_required=True):
            return Empty()
        self._on_message(param, MessageType.convert(one_of))
        return Empty()


class EnrolledGrpcServer(fbm_server.GrpcServer):  # type: ignore[misc]  # Fed-BioMed ships no types
    """Fed-BioMed's ``GrpcServer`` with mutual TLS against the site CA (module docstring).

    Set `site_ca_pem` and `registry` (class attributes, by `install`) before ``Requests``
    constructs it; Fed-BioMed passes the other arguments.
    """

    site_ca_pem: bytes | None = None
    registry: SiteRegistry | None = None

    def _run(self) -> None:
        """Runs the asyncio server (Fed-BioMed's ``GrpcServer._run``, with our start)."""
        try:
            asyncio.run(self._start_async())
        except Exception as e:  # noqa: BLE001 - as Fed-BioMed's: the thread logs and ends
            fbm_logger.error(f"Researcher gRPC server has stopped. Please try to restart: {e}")

    async def _start_async(self) -> None:
        """Copy of Fed-BioMed 6.4.1's ``_GrpcAsyncServer.start`` (fedbiomed/transport/server.py):
        same server options; client certificates required; `EnrolledServicer`."""
        if self.site_ca_pem is None or self.registry is None:
            raise RuntimeError("EnrolledGrpcServer: install() was not called (no site CA)")
        retry = fbm_server.GRPC_CLIENT_CONN_RETRY_TIMEOUT
        task_timeout = fbm_server.GRPC_CLIENT_TASK_REQUEST_TIMEOUT
        self._server = grpc.aio.server(
            options=[  # copied from Fed-BioMed 6.4.1 fedbiomed/transport/server.py, _GrpcAsyncServer.start
                ("grpc.max_send_message_length", 100 * 1024 * 1024),
                ("grpc.max_receive_message_length", 100 * 1024 * 1024),
                ("grpc.keepalive_time_ms", 30 * retry * 1000),
                ("grpc.keepalive_timeout_ms", 2 * 1000),
                ("grpc.http2.min_ping_interval_without_data_ms", 0.9 * retry * 1000),
                ("grpc.max_connection_idle_ms", (task_timeout + 2) * 1000),
                ("grpc.max_connection_age_ms", (task_timeout + 5) * 1000),
                ("grpc.max_connection_age_grace_ms", 2 * 1000),
                ("grpc.http2.max_pings_without_data", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_ping_strikes", 100),
                ("grpc.so_reuseport", 0),
            ]
        )
        self._loop = asyncio.get_running_loop()
        self._agent_store = AgentStore(
            loop=self._loop,
            on_forward=self._on_forward,
            node_disconnection_timeout=self._config.getint("server", "node_disconnection_timeout"),
        )
        researcher_pb2_grpc.add_ResearcherServiceServicer_to_server(
            EnrolledServicer(agent_store=self._agent_store, on_message=self._on_message, registry=self.registry),
            server=self._server,
        )
        server_credentials = grpc.ssl_server_credentials(
            ((self._ssl.private_key, self._ssl.certificate),),
            root_certificates=self.site_ca_pem,
            require_client_auth=True,
        )
        self._server.add_secure_port(self._host + ":" + str(self._port), server_credentials)
        await self._server.start()
        self._is_started.set()
        await self._server.wait_for_termination()


def install(home: str | Path) -> None:
    """Make Fed-BioMed's ``Requests`` build `EnrolledGrpcServer` for this coordinator home.

    ``Requests.__init__`` constructs ``GrpcServer(...)`` by its module-global name in
    ``fedbiomed.researcher.requests._requests``; that one name is replaced, nothing else.

    Args:
        home: the coordinator home (its ``pki/site-ca.crt`` and ``sites.json``).
    """
    from fedbiomed.researcher.requests import _requests

    from coordinator.pki import CoordinatorPKI

    check_upstream()
    pki = CoordinatorPKI(home)
    EnrolledGrpcServer.site_ca_pem = pki.site_ca_pem()
    EnrolledGrpcServer.registry = pki.sites
    _requests.GrpcServer = EnrolledGrpcServer
