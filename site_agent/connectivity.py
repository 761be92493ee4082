"""Is the site's node connected to the coordinator, and if not, why not.

Fed-BioMed reports no connection state, so the evidence is the node's own TCP connections, its log and a
probe from here; why each: docs/design/site-boundary.md.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509

from fedimg_core.tls_pins import fingerprint
from site_agent.trust import tail_lines

# Fed-BioMed's console format: "2026-12-05 00:56:33,610 fedbiomed INFO - message"
_FBM_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ fedbiomed (\w+) - (.*)$")
# gRPC core (C++) log lines: "E1205 00:57:50.237199    6693 ssl_transport_security.cc:2801] message"
_GRPC_LINE = re.compile(r"^([EW])(\d\d)(\d\d) (\d\d:\d\d:\d\d)\.\d+\s+\d+\s+\S+\] (.*)$")
_CONTACT = ("Task received by task manager", "Received request", "approval request")
_ERROR_WORDS = ("researcher", "server", "connect", "grpc", "certificate", "ssl", "tls", "remote party")
STARTUP_GRACE_S = 20.0  # a fresh node takes ~12 s to connect (measured on loopback)


@dataclass
class Probe:
    """A TCP connection (and TLS handshake) from this machine to the coordinator's port."""

    reachable: bool
    detail: str
    errno_name: str = ""  # refused | timeout | dns | unreachable | other
    cert_names: list[str] | None = None  # names the coordinator's certificate is valid for
    cert_matches: bool | None = None
    cert_fingerprint: str | None = None  # SHA256:<hex> of the certificate it presents (what sites pin)


@dataclass
class LogSummary:
    """What the node's console log says since its last start.

    Args:
        started: when the node process last started.
        last_contact: the last message the node got from the coordinator.
        last_error: ``"<time>: <message>"`` of the last connection error since the start.
    """

    started: str | None = None  # when the node process last started
    last_contact: str | None = None  # the last message the node got from the coordinator
    last_error: str | None = None  # "time: message" of the last connection error since the start


@dataclass
class Connectivity:
    """What `site-agent status` reports about the node's link to the coordinator."""

    coordinator: str
    connected: bool | None  # None: cannot tell (no process to inspect)
    evidence: str
    reachable: bool
    reach_detail: str
    node_started: str | None
    last_contact: str | None
    last_error: str | None
    hint: str | None

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (``status --json``).

        Returns:
            Its fields by name.
        """
        return asdict(self)


def _classify(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):
        return "dns"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if getattr(exc, "errno", None) in (101, 113):  # ENETUNREACH, EHOSTUNREACH
        return "unreachable"
    return "other"


def certificate_names(pem: str) -> list[str]:
    """The names a server certificate is valid for: its subjectAltName entries, or its CN
    when it has none (how gRPC checks a host name against it).

    Args:
        pem: the certificate, PEM-encoded.

    Returns:
        The DNS names and IP addresses it names.
    """
    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)] + [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        if names:
            return names
    except x509.ExtensionNotFound:
        pass
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]


def _name_matches(host: str, names: list[str]) -> bool:
    host = host.lower().rstrip(".")
    for n in (x.lower().rstrip(".") for x in names):
        if n == host or (n.startswith("*.") and host.count(".") == n.count(".") and host.endswith(n[1:])):
            return True
    return False


def probe(host: str, port: int, timeout: float = 3.0, tls: bool = True) -> Probe:
    """Connect to ``host:port`` from here; with ``tls``, also fetch its certificate and check
    that it is valid for ``host`` (the node checks the same).

    Args:
        host: the coordinator's host name or address, as in the site config.
        port: the coordinator's Fed-BioMed (gRPC) port.
        timeout: seconds for the connection and the handshake each.
        tls: fetch and check the certificate too.

    Returns:
        A ``Probe``; it never raises for network errors.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        kind = _classify(exc)
        text = {"dns": "host name does not resolve", "timeout": f"no answer within {timeout:g} s"}.get(kind, exc.strerror or str(exc))
        return Probe(False, f"{host}:{port}: {text}", kind)
    result = Probe(True, f"{host}:{port} accepts connections")
    if tls:
        try:
            pem = ssl.get_server_certificate((host, port), timeout=timeout)
            result.cert_names = certificate_names(pem)
            result.cert_fingerprint = fingerprint(pem)
            result.cert_matches = _name_matches(host, result.cert_names)
        except (OSError, ssl.SSLError, ValueError) as exc:
            result.detail += f"; no TLS certificate could be read ({type(exc).__name__}): is this the coordinator's gRPC port?"
            result.cert_matches = False
            result.cert_names = []
    return result


def _addresses(host: str, port: int) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError:
        return set()
    out: set[str] = set()
    for *_, addr in infos:
        ip = str(addr[0])
        out.add(ip)
        if ":" not in ip:
            out.add(f"::ffff:{ip}")  # an IPv4 peer seen on a dual-stack socket
    return out


def _established(pid: int, addresses: set[str], port: int) -> set[tuple[tuple[Any, ...], tuple[Any, ...]]] | None:
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)  # `fedbiomed node start` runs the node in a child
        conns: set[tuple[tuple[Any, ...], tuple[Any, ...]]] = set()
        for p in procs:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port and c.raddr.ip in addresses:
                    conns.add((tuple(c.laddr), tuple(c.raddr)))
        return conns
    except (psutil.NoSuchProcess, psutil.AccessDenied, PermissionError):
        return None


def node_connected(pid: int, host: str, port: int, interval: float = 0.7) -> bool | None:
    """Whether node process ``pid`` holds a lasting connection to the coordinator: the same
    established TCP connection in two samples ``interval`` seconds apart (a node failing its
    TLS handshake reconnects every ~2 s, each time on a new port).

    Args:
        pid: the node's process id (its children count too).
        host: the coordinator's host, as in the site config.
        port: its gRPC port.
        interval: seconds between the two samples.

    Returns:
        True or False; None when the process cannot be inspected.
    """
    addresses = _addresses(host, port)
    first = _established(pid, addresses, port)
    if first is None:
        return None
    if not first:
        return False
    time.sleep(interval)
    second = _established(pid, addresses, port)
    return None if second is None else bool(first & second)


def parse_node_log(lines: list[str], year: int | None = None) -> LogSummary:
    """Start time, last contact and last connection error from the node's console log
    (the process runtime's ``node.log``, or the container's log); only lines after the last
    start count.

    Args:
        lines: the end of the log.
        year: the year of gRPC's lines, which carry none (default: this year).

    Returns:
        What the log says.
    """
    year = year or datetime.now().year
    out = LogSummary()
    for line in lines:
        line = line.rstrip("\n")
        m = _FBM_LINE.match(line)
        if m:
            when, level, msg = m.groups()
            if msg.startswith("Launching node"):
                out = LogSummary(started=when)
            elif any(k in msg for k in _CONTACT):
                out.last_contact = when
            elif level in ("ERROR", "CRITICAL", "WARNING") and any(w in msg.lower() for w in _ERROR_WORDS):
                out.last_error = f"{when}: {_shorten(msg)}"
            continue
        g = _GRPC_LINE.match(line)
        if g:
            _, month, day, clock, msg = g.groups()
            out.last_error = f"{year}-{month}-{day} {clock}: gRPC: {_shorten(msg)}"
    return out


def last_contact_from_audit(path: Path | None, tail_bytes: int = 1 << 20) -> str | None:
    """Time (UTC) of the last message the node received from the coordinator, from the
    node's security audit log (Fed-BioMed writes one JSON record per line, among them
    ``message_received_from_researcher``).

    Args:
        path: the node's ``log/security_audit.log`` (None: no log).
        tail_bytes: how much of the end of the log to read.

    Returns:
        The record's timestamp; None when there is none or no such log.
    """
    if path is None:
        return None
    lines = tail_lines(path, tail_bytes)
    if lines is None:
        return None
    for line in reversed(lines):
        if "message_received_from_researcher" not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("operation") == "message_received_from_researcher" and isinstance(rec.get("timestamp"), str):
            return rec["timestamp"]
    return None


def _shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _age_s(started: str | None) -> float | None:
    if not started:
        return None
    try:
        return time.time() - datetime.strptime(started, "%Y-%m-%d %H:%M:%S").timestamp()
    except ValueError:
        return None


def hint_for(host: str, port: int, pr: Probe, connected: bool | None, log: LogSummary, config_path: str = "the site config",
             refused: str | None = None) -> str | None:  # fmt: skip
    """What to check or do when the node is not connected.

    Args:
        host: the coordinator's host, as in the site config.
        port: its gRPC port.
        pr: the probe from this machine.
        connected: whether the node holds a connection (None: cannot tell).
        log: what the node's log says.
        config_path: the site config, named in the hint.
        refused: the node's line when it refused the coordinator's certificate (not pinned).

    Returns:
        One or two sentences; None when connected or when nothing can be pointed at.
    """
    if connected:
        return None
    if refused and pr.reachable and "(pinned)" in refused:  # the pinned certificate, refused for its dates or host: the line says what to do
        return refused
    if refused and pr.reachable:
        return (f"{refused}. Check the fingerprint with the coordinator's operator (`coordinator fingerprint`): if they "
                "rotated the certificate, `site-agent trust add SHA256:...`; if not, something else answers at this address")  # fmt: skip
    where = f"coordinator.host/port in {config_path}"
    if not pr.reachable:
        return {
            "refused": f"nothing listens at {host}:{port}: is the coordinator running (`coordinator serve` or a `coordinator run`)? "
            f"Is {port} its gRPC port (default 50051)? Check {where}",
            "dns": f"{host!r} does not resolve from this machine: fix {where}, or the site's DNS / /etc/hosts",
            "timeout": f"{host}:{port} does not answer: a firewall or proxy drops the traffic; outbound TCP from this machine to "
            f"{host}:{port} must be allowed (the site needs no inbound port)",
            "unreachable": f"no network route to {host}: check the machine's network and {where}",
        }.get(pr.errno_name, f"check {where} and the network between this machine and the coordinator")
    if pr.cert_matches is False:
        names = ", ".join(pr.cert_names or []) or "no readable certificate"
        return (f"the coordinator's TLS certificate is for {names}, but this site dials {host!r}: set coordinator.host to one "
                f"of those names in {config_path} (or start the coordinator with --public-host {host}), then restart the "
                "node (`site-agent stop && site-agent start`)")  # fmt: skip
    if connected is None:
        return None  # the coordinator answers and the node cannot be inspected: nothing to point at
    age = _age_s(log.started)
    if age is not None and age < STARTUP_GRACE_S:
        return f"the node started {age:.0f} s ago and connects within ~15 s: run `site-agent status` again"
    return ("the coordinator answers but the node holds no connection: read `site-agent logs` (a coordinator that "
            "refuses this site's certificate, e.g. after `coordinator sites revoke`, shows there), then restart the node "
            "(`site-agent stop && site-agent start`)")  # fmt: skip


def assess(host: str, port: int, pid: int | None, log_lines: list[str], audit_log: Path | None = None, config_path: str = "the site config",
           refused: str | None = None) -> Connectivity:  # fmt: skip
    """Everything `site-agent status` says about the link to the coordinator.

    Args:
        host: coordinator host from the site config.
        port: coordinator gRPC port from the site config.
        pid: the running node's process id, or None (docker runtime, node not running).
        log_lines: the end of the node's console log.
        audit_log: the node's ``log/security_audit.log`` (last message from the coordinator).
        config_path: named in hints.
        refused: the node's line when it refused the coordinator's certificate (`site_agent.trust.read_status`).

    Returns:
        A ``Connectivity``.
    """
    log = parse_node_log(log_lines)
    log.last_contact = last_contact_from_audit(audit_log) or log.last_contact
    connected = node_connected(pid, host, port) if pid else None
    if pid is None:
        evidence = "no node process to inspect from here (docker runtime): see the last contact and error below"
    elif connected:
        evidence = "the node holds an open connection to the coordinator"
    elif connected is False:
        evidence = "the node holds no lasting connection to the coordinator"
    else:
        evidence = "the node process cannot be inspected (permissions)"
    # a connected node needs no probe; otherwise the probe tells the causes apart
    pr = Probe(True, f"{host}:{port}: the node is connected") if connected else probe(host, port)
    return Connectivity(
        coordinator=f"{host}:{port}", connected=connected, evidence=evidence, reachable=pr.reachable, reach_detail=pr.detail,
        node_started=log.started, last_contact=log.last_contact, last_error=log.last_error,
        hint=hint_for(host, port, pr, connected, log, config_path, refused),
    )  # fmt: skip
