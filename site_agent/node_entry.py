"""The site's node entry: ``python -m site_agent.node_entry --config ROOT --node-args JSON``.

It installs the node-side transport settings, then runs Fed-BioMed's single-process node
(``fedbiomed.node.node_pm``) as ``__main__`` with the same arguments. This is the one module
where the site extends Fed-BioMed's transport; it mirrors ``fedbiomed/transport/client.py`` of
Fed-BioMed 6.4.1, where ``GrpcClient.__init__`` builds ``Channels(researcher)`` by its
module-global name and ``Channels._create`` makes each channel with
``grpc.ssl_channel_credentials(<the server certificate fetched unverified>)``.

Two of its classes are extended (`install` swaps the module-global names they are built by):
``GrpcClient._connect`` (`PinnedConnect`) connects only to a coordinator presenting a pinned
certificate and takes the researcher id from that certificate alone; ``Channels._create``
(`PinnedChannels`) builds each channel: the certificate the coordinator presents is fetched
again (with the site's client certificate) and handed to gRPC as the only root only when its
SHA-256 is one of the site's pins (``<work_dir>/trust/coordinator-pins``, re-read at every
connection); the channel also presents the site's certificate and key (mutual TLS). Any other
certificate is never trusted: the channel gets a root that verifies nothing, so every
handshake fails, one log line says why and ``trust/status.json`` records it for
``site-agent status`` and ``doctor``. The pins are on disk, so this holds across restarts.
A pinned certificate that is outside its validity, or not valid for the host the site dials, is
refused the same way, with that reason (gRPC would fail the handshake anyway); a site
certificate outside its validity is logged and recorded too (the coordinator refuses it).
"""

from __future__ import annotations

import datetime as _dt
import inspect
import os
import runpy
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any, cast

import grpc  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedimg_core.tls_pins import fingerprint, short
from site_agent import trust
from site_agent.connectivity import _name_matches, certificate_names
from site_agent.errors import UserError
from site_agent.node_memory import start_trimmer

__all__ = ["FEDBIOMED_VERSION", "PinnedChannels", "check_upstream", "fetch_certificate", "install", "main"]

FEDBIOMED_VERSION = "6.4.1"  # the version whose client.py this module mirrors


def check_upstream() -> None:
    """Fail loudly when Fed-BioMed's client code this module mirrors is not what it was.

    Raises:
        RuntimeError: another Fed-BioMed version, or the mirrored code changed shape.
    """
    import fedbiomed
    from fedbiomed.transport import client

    if str(fedbiomed.__version__).lstrip("v") != FEDBIOMED_VERSION:
        raise RuntimeError(f"site_agent.node_entry mirrors Fed-BioMed {FEDBIOMED_VERSION}; installed: {fedbiomed.__version__}")
    if "Channels(researcher)" not in inspect.getsource(client.GrpcClient.__init__):
        raise RuntimeError("Fed-BioMed's GrpcClient no longer builds Channels(researcher): review site_agent.node_entry")
    from fedbiomed.transport import controller

    if "GrpcClient(" not in inspect.getsource(controller.GrpcAsyncTaskController.start) or "self._id is None" not in inspect.getsource(
        client.GrpcClient._connect
    ):
        raise RuntimeError("Fed-BioMed's GrpcController/GrpcClient._connect changed: review site_agent.node_entry")
    create = inspect.getsource(client.Channels._create)
    if "ssl_channel_credentials" not in create or "_create_channel" not in create:
        raise RuntimeError("Fed-BioMed's Channels._create changed: review site_agent.node_entry")


def _unverifiable_root() -> bytes:
    """A CA certificate nothing is signed by: a channel given it as its only root trusts no server."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedimg: coordinator certificate not pinned")])
    now = _dt.datetime.now(_dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def fetch_certificate(host: str, port: int, client_cert: Path | None = None, client_key: Path | None = None, timeout: float = 3.0) -> bytes:
    """The certificate a TLS server presents, not verified (the caller checks its fingerprint).

    Args:
        host: the server's host.
        port: its port.
        client_cert: a client certificate to present (servers that require one).
        client_key: its key.
        timeout: seconds for the connection and handshake.

    Returns:
        The certificate, PEM.

    Raises:
        OSError: no connection or no handshake.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # nothing is trusted here: the fingerprint decides
    if client_cert is not None and client_key is not None:
        ctx.load_cert_chain(str(client_cert), str(client_key))
    with socket.create_connection((host, port), timeout=timeout) as sock, ctx.wrap_socket(sock, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise OSError("the server presented no certificate")
    return ssl.DER_cert_to_PEM_cert(der).encode("ascii")


def _log(level: str, line: str) -> None:
    from fedbiomed.common.logger import logger

    getattr(logger, level)(line)


class PinnedChannels:
    """Mixin over Fed-BioMed's ``Channels`` (see the module docstring); `install` builds the class.

    Class attributes set by `install`: ``files`` (the trust folder), ``_root_never``.
    """

    files: trust.TrustFiles
    _root_never: bytes = b""
    _last: tuple[str, str] | None = None
    _researcher: Any

    @staticmethod
    def server_problem(host: str, pem: bytes | str) -> str | None:
        """Why a pinned coordinator certificate cannot work now: outside its validity, or not for ``host``.

        Args:
            host: the host this site dials (``coordinator.host`` in site.yaml).
            pem: the certificate (PEM).

        Returns:
            One line, or None when it is valid now for ``host``.
        """
        text = pem.decode("ascii") if isinstance(pem, bytes) else pem
        try:
            cert = x509.load_pem_x509_certificate(text.encode("ascii"))
            names = certificate_names(text)
        except ValueError as exc:
            return f"the coordinator's certificate cannot be read ({exc})"
        state, line = trust.certificate_validity(cert)
        if state in ("expired", "not yet valid"):
            return (
                f"the coordinator's certificate {short(fingerprint(text))} (pinned) is {line}: ask the coordinator's operator to rotate it "
                "(`coordinator certificate rotate`), then pin the new fingerprint (`site-agent trust add SHA256:...`)"
            )
        if not _name_matches(host, names):
            return (
                f"the coordinator's certificate {short(fingerprint(text))} (pinned) is for {', '.join(names) or 'no name'}, not the host this "
                f"site dials {host!r}: update coordinator.host in site.yaml to one of those names (`site-agent init --force ...` or edit "
                f"the file, then restart the node), or ask the coordinator's operator to rotate its certificate for {host!r}"
            )
        return None

    @classmethod
    def judge(cls, host: str, port: int, seen: bytes | str | None) -> bytes | None:
        """Whether a coordinator certificate is pinned; records and logs a change of verdict.

        Args:
            host: the coordinator's host.
            port: its port.
            seen: the certificate it presented (PEM), or None when none could be read.

        Returns:
            The certificate (PEM bytes) when pinned, else None.
        """
        try:
            allowed = trust.pins(cls.files)
        except UserError as exc:
            allowed = []
            _log("error", str(exc))
        got = fingerprint(seen) if seen else None
        if got is not None and seen is not None and got in allowed:
            problem = cls.server_problem(host, seen)
            if problem is not None:
                cls._record("refused", got, problem)
                return None
            own = trust.own_certificate_problem(cls.files)
            if own is not None:  # the coordinator refuses it: say so, instead of "trusted"
                cls._record("refused", got, own)
            else:
                cls._record("trusted", got, f"coordinator {host}:{port} presents the pinned certificate {short(got)}")
            return seen if isinstance(seen, bytes) else str(seen).encode("ascii")
        line = (
            f"coordinator certificate {got or 'unavailable'} at {host}:{port} is not the pinned "
            f"{' or '.join(allowed) or '(no pin)'}; refusing to connect (if the coordinator rotated its certificate, "
            "add its new fingerprint: `site-agent trust add SHA256:...`)"
        )
        cls._record("refused", got, line)
        return None

    @classmethod
    def _record(cls, state: str, seen: str | None, line: str) -> None:
        if cls._last != (state, line):  # one line per change, not one per reconnection attempt (a line names what it judged)
            cls._last = (state, line)
            _log("error" if state == "refused" else "info", line)
            trust.write_status(cls.files, state, seen, line)

    @classmethod
    def fetch(cls, host: str, port: int) -> bytes | None:
        """The certificate the coordinator presents now, fetched with the site's certificate.

        Args:
            host: the coordinator's host.
            port: its port.

        Returns:
            The PEM, or None when no handshake completed.
        """
        try:
            return fetch_certificate(host, port, cls.files.cert, cls.files.key)
        except OSError:
            return None

    def _pinned_root(self) -> bytes:
        """The server certificate to trust, when it is pinned; else a root that verifies nothing."""
        host, port = self._researcher.host, int(self._researcher.port)
        seen = self.fetch(host, port) or self._researcher.certificate
        return self.judge(host, port, seen) or type(self)._root_never

    def _create(self) -> Any:
        """A channel that trusts only a pinned coordinator certificate and presents the site's certificate."""
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self._pinned_root(),
            private_key=self.files.key.read_bytes(),
            certificate_chain=self.files.cert.read_bytes(),
        )
        return self._create_channel(port=self._researcher.port, host=self._researcher.host, certificate=credentials)  # type: ignore[attr-defined]


class PinnedConnect:
    """Mixin over Fed-BioMed's ``GrpcClient``: its ``_connect`` (a copy of Fed-BioMed 6.4.1's, in
    fedbiomed/transport/client.py) takes the researcher id from a pinned certificate only, and does
    not connect to a coordinator whose certificate is not pinned (it retries every 2 s, as
    Fed-BioMed does while the server is down)."""

    _researcher: Any
    _channels: Any
    _id: str | None
    channels_class: type[PinnedChannels]

    async def _connect(self) -> None:
        """Wait for a coordinator presenting a pinned certificate, then connect the channels."""
        import asyncio

        from fedbiomed.common.logger import logger
        from fedbiomed.transport import client

        host, port = self._researcher.host, self._researcher.port
        while True:
            time_before = time.perf_counter()
            if client.is_server_alive(host, port):
                pem = self.channels_class.judge(host, int(port), self.channels_class.fetch(host, int(port)))
                if pem is not None:
                    self._researcher.certificate = pem
                    if self._id is None:
                        try:
                            cert = x509.load_pem_x509_certificate(pem)
                            self._id = str(cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value)
                        except (ValueError, IndexError):
                            pass
                    await self._channels.connect()
                    logger.info(f"Successfully connected to researcher server at {host}:{port}", extra={"is_security": True})
                    return
            await asyncio.sleep(max(0, client.GRPC_CLIENT_CONN_RETRY_TIMEOUT - time.perf_counter() + time_before))


def install(folder: str | os.PathLike[str]) -> type:
    """Make Fed-BioMed's node trust only pinned coordinators and present the site's certificate.

    Replaces two module-global names: ``fedbiomed.transport.client.Channels`` (read by
    ``GrpcClient.__init__``) and ``fedbiomed.transport.controller.GrpcClient`` (read by
    ``GrpcController`` when it starts a client).

    Args:
        folder: the site's trust folder.

    Returns:
        The ``Channels`` subclass now in ``fedbiomed.transport.client``.

    Raises:
        UserError: the site is not enrolled (no key, certificate or pin), or its trust folder or
            pins file is writable by group or others.
    """
    from fedbiomed.transport import client, controller

    check_upstream()
    files = trust.TrustFiles(folder)
    missing = [p.name for p in (files.key, files.cert, files.pins) if not p.is_file()]
    if missing or not trust.pins(files):
        raise UserError(f"{files.dir}: not enrolled ({', '.join(missing) or 'no pin'}); see `site-agent enroll --help`")
    trust.check_permissions(files)
    channels = cast(
        "type[PinnedChannels]",
        type("PinnedChannels", (PinnedChannels, _original(client.Channels)), {"files": files, "_root_never": _unverifiable_root(), "_last": None}),
    )
    own = trust.own_certificate_problem(files)
    if own is not None:  # started anyway: the coordinator decides (this machine's clock may be wrong)
        channels._record("refused", None, own)
    client.Channels = channels  # GrpcClient.__init__ reads this module-global name
    controller.GrpcClient = type("PinnedGrpcClient", (PinnedConnect, _original(controller.GrpcClient)), {"channels_class": channels})
    return channels


def _original(cls: type) -> type:
    """Fed-BioMed's class behind one of ours (install twice in one process: tests)."""
    return next(c for c in cls.__mro__ if c.__module__.startswith("fedbiomed."))


def main() -> None:
    """Install the transport settings from ``$FEDIMG_TRUST_DIR``, then run Fed-BioMed's node with this process's arguments."""
    folder = os.environ.get(trust.TRUST_DIR_ENV)
    if not folder:
        sys.exit(f"site_agent.node_entry: ${trust.TRUST_DIR_ENV} is not set (start the node with `site-agent start`)")
    try:
        install(folder)
    except UserError as exc:
        sys.exit(f"site_agent.node_entry: {exc}")
    start_trimmer()  # a finished round's freed memory goes back to the system (site_agent.node_memory)
    sys.argv = ["fedbiomed.node.node_pm", *sys.argv[1:]]
    runpy.run_module("fedbiomed.node.node_pm", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
