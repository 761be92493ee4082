"""The site's side of trust: the coordinator fingerprints it pins, and its own client certificate.

Everything lives in ``<work_dir>/trust/`` (the node reads it there, also inside the container)::

    coordinator-pins   the coordinator certificate fingerprints this site accepts, one per line (mode 0600)
    site.key           the site's private key (mode 0600; it never leaves the site)
    site.csr           the certificate request the coordinator's operator signs
    site.crt           the certificate the coordinator issued (CN = node id, O = site name)
    status.json        what the node last saw: the coordinator certificate trusted, or refused

Enrolment: `request` (``site-agent enroll request``) writes the key and the CSR; the
coordinator's operator signs it (``coordinator sites enroll --csr``); `install`
(``site-agent enroll install``) checks the certificate against the key and the node id and
stores it with the pin. A node without these files does not start (`check_enrolled`), nor one
whose trust folder or pins file others may write (`check_permissions`; the folder is made 0700).
"""

from __future__ import annotations

import configparser
import contextlib
import datetime as _dt
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedimg_core import atomic
from fedimg_core.tls_pins import parse_pin
from site_agent.config import SiteConfig
from site_agent.errors import UserError

__all__ = [
    "EXPIRY_WARNING_DAYS",
    "RENEW_HINT",
    "TRUST_DIR_ENV",
    "TrustFiles",
    "add_pin",
    "certificate_validity",
    "check_enrolled",
    "check_permissions",
    "install",
    "node_id",
    "own_certificate_problem",
    "pins",
    "read_status",
    "remove_pin",
    "request",
    "summary",
    "write_status",
]

TRUST_DIR_ENV = "FEDIMG_TRUST_DIR"  # set for the node by site_agent.runtime.node_environment
EXPIRY_WARNING_DAYS = 30  # `site-agent doctor` warns this long before the site's certificate expires


class TrustFiles:
    """The paths of a trust folder (see the module docstring).

    Args:
        folder: the folder (``<work_dir>/trust``).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.dir = Path(folder)
        self.pins = self.dir / "coordinator-pins"
        self.key = self.dir / "site.key"
        self.csr = self.dir / "site.csr"
        self.cert = self.dir / "site.crt"
        self.status = self.dir / "status.json"

    @classmethod
    def of(cls, site: SiteConfig) -> TrustFiles:
        """The trust folder of a site.

        Args:
            site: the site.

        Returns:
            Its ``<work_dir>/trust`` files.
        """
        return cls(site.work_dir / "trust")


def node_id(site: SiteConfig) -> str:
    """The site's Fed-BioMed node id, read from the node's config file (no Fed-BioMed import).

    Args:
        site: the site.

    Returns:
        The id (``NODE_...``).

    Raises:
        UserError: no node was created (`site-agent init`).
    """
    ini = site.node_dir / "etc" / "config.ini"
    parser = configparser.ConfigParser()
    try:
        with open(ini, encoding="utf-8") as fh:
            parser.read_file(fh)
        return parser.get("default", "id")
    except (OSError, configparser.Error):
        raise UserError(f"{site.node_dir}: no Fed-BioMed node here; run `site-agent init` first") from None


def pins(files: TrustFiles) -> list[str]:
    """The coordinator fingerprints the site accepts.

    Args:
        files: the trust folder.

    Returns:
        The pins, normalised (none when the file is missing).

    Raises:
        UserError: a line is not a fingerprint.
    """
    try:
        lines = files.pins.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out: list[str] = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            pin = parse_pin(text)
        except UserError as exc:
            raise UserError(f"{files.pins}:{n}: {exc}") from None
        if pin not in out:
            out.append(pin)
    return out


def _make_dir(files: TrustFiles) -> None:
    """Create the trust folder, mode 0700 (an existing one is left as it is: `check_permissions` judges it)."""
    if not files.dir.is_dir():
        files.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(files.dir, 0o700)


def _write_pins(files: TrustFiles, values: list[str]) -> None:
    _make_dir(files)
    atomic.write_bytes(files.pins, "".join(f"{p}\n" for p in values).encode("utf-8"), mode=0o600)


def check_permissions(files: TrustFiles) -> None:
    """Refuse a trust folder or pins file that group or others may write: whoever can write
    the pins chooses which coordinator this site trusts.

    Args:
        files: the trust folder.

    Raises:
        UserError: one line naming the path, its mode and the fix.
    """
    for path in (files.dir, files.pins):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UserError(f"{path}: cannot read its permissions ({exc.strerror or exc})") from None
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UserError(
                f"{path} is writable by group or others (mode {mode:o}): they could pin another coordinator; "
                f"`chmod go-w {path}` (the folder 0700, the pins file 0600), then check its pins (`site-agent trust list`)"
            )


def certificate_validity(cert: x509.Certificate, now: _dt.datetime | None = None) -> tuple[str, str]:
    """Whether a certificate is valid now, and one line saying so with its dates.

    Args:
        cert: the certificate.
        now: the time to judge at (default: now, UTC).

    Returns:
        ``(state, line)``: state ``valid``, ``expiring`` (valid, expiring within
        `EXPIRY_WARNING_DAYS`), ``expired`` or ``not yet valid``.
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    start = cert.not_valid_before.replace(tzinfo=_dt.timezone.utc)
    end = cert.not_valid_after.replace(tzinfo=_dt.timezone.utc)
    dates = f"valid from {start.isoformat()} until {end.isoformat()}"
    if now < start:
        return "not yet valid", f"not yet valid ({dates}; is this machine's clock right?)"
    if now > end:
        return "expired", f"expired at {end.isoformat()} ({dates})"
    left = end - now
    if left < _dt.timedelta(days=EXPIRY_WARNING_DAYS):
        return "expiring", f"expires in {left.days} day(s), at {end.isoformat()} ({dates})"
    return "valid", dates


RENEW_HINT = (
    "enrol again: `site-agent enroll request`, send the .csr to the coordinator's operator (`coordinator sites enroll --csr FILE`), "
    "then `site-agent enroll install CERT`"
)


def own_certificate_problem(files: TrustFiles, now: _dt.datetime | None = None) -> str | None:
    """One line when the site's own certificate is outside its validity (the coordinator refuses it).

    Args:
        files: the trust folder.
        now: the time to judge at (default: now).

    Returns:
        The line, or None when it is valid (or expiring) or cannot be read.
    """
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    except (OSError, ValueError):
        return None
    state, line = certificate_validity(cert, now)
    if state in ("valid", "expiring"):
        return None
    return f"this site's certificate {files.cert} is {line}: the coordinator refuses it; {RENEW_HINT}"


def add_pin(files: TrustFiles, pin: str) -> list[str]:
    """Accept one more coordinator fingerprint (before a rotation; the node re-reads the file when it reconnects).

    Args:
        files: the trust folder.
        pin: the fingerprint, as `fedimg_core.tls_pins.parse_pin` accepts it.

    Returns:
        The pins now.
    """
    values = pins(files)
    new = parse_pin(pin)
    if new not in values:
        values.append(new)
        _write_pins(files, values)
    return values


def remove_pin(files: TrustFiles, pin: str) -> list[str]:
    """Stop accepting a coordinator fingerprint (after a rotation).

    Args:
        files: the trust folder.
        pin: the fingerprint.

    Returns:
        The pins now.

    Raises:
        UserError: not pinned, or the last pin (a site must trust one coordinator certificate).
    """
    values = pins(files)
    old = parse_pin(pin)
    if old not in values:
        raise UserError(f"{old} is not pinned in {files.pins} (pinned: {', '.join(values) or 'none'})")
    if len(values) == 1:
        raise UserError(f"{old} is the only pinned coordinator fingerprint; add the new one first (`site-agent trust add SHA256:...`)")
    values.remove(old)
    _write_pins(files, values)
    return values


def request(site: SiteConfig) -> Path:
    """Write the site's private key (if it has none) and a certificate request for the coordinator.

    Args:
        site: the site (its node must exist: the request names the node id).

    Returns:
        The CSR's path (the file to send to the coordinator's operator).

    Raises:
        UserError: no node yet.
    """
    files = TrustFiles.of(site)
    nid = node_id(site)
    _make_dir(files)
    key: ec.EllipticCurvePrivateKey
    if files.key.is_file():
        loaded = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise UserError(f"{files.key}: not an EC private key; remove it and run `site-agent enroll request` again")
        key = loaded
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        atomic.write_bytes(files.key, pem, mode=0o600)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, nid), x509.NameAttribute(NameOID.ORGANIZATION_NAME, site.site_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    atomic.write_bytes(files.csr, csr.public_bytes(serialization.Encoding.PEM))
    return files.csr


def install(site: SiteConfig, cert_pem: bytes, pin: str | None = None) -> dict[str, Any]:
    """Install the certificate the coordinator issued, and (optionally) pin the coordinator.

    Args:
        site: the site.
        cert_pem: the certificate (PEM).
        pin: the coordinator's fingerprint, as read out of band (`coordinator fingerprint`);
            required when the site pins none yet.

    Returns:
        ``site``, ``node_id``, ``certificate``, ``pins``.

    Raises:
        UserError: not a certificate, not for this site's key or node id, or no pin at all.
    """
    files = TrustFiles.of(site)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise UserError("not a PEM certificate (the .crt file `coordinator sites enroll` writes)") from None
    if not files.key.is_file():
        raise UserError(f"{files.key}: no site key; run `site-agent enroll request` first")
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise UserError(f"the certificate is not for this site's key ({files.key}); was it issued for another site's request?")
    nid = node_id(site)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cn or cn[0].value != nid:
        raise UserError(f"the certificate names node {cn[0].value if cn else None!r}, this site's node is {nid}")
    if pin is not None:
        add_pin(files, pin)
    if not pins(files):
        raise UserError(
            "no coordinator fingerprint pinned: pass --coordinator-fingerprint SHA256:... (ask the coordinator's operator: `coordinator fingerprint`)"
        )
    atomic.write_bytes(files.cert, cert_pem)
    return {"site": site.site_name, "node_id": nid, "certificate": str(files.cert), "pins": pins(files)}


def check_enrolled(site: SiteConfig, permissions: bool = True) -> TrustFiles:
    """Refuse to go on without the site's key, certificate and a coordinator pin.

    Args:
        site: the site.
        permissions: also refuse a trust folder or pins file others may write (`check_permissions`).

    Returns:
        Its trust files.

    Raises:
        UserError: one line saying what is missing (or unsafe) and how to enrol.
    """
    files = TrustFiles.of(site)
    missing = [p.name for p in (files.key, files.cert, files.pins) if not p.is_file()]
    if missing or not pins(files):
        what = ", ".join(missing) or f"a fingerprint in {files.pins.name}"
        raise UserError(
            f"site {site.site_name} is not enrolled ({what} missing in {files.dir}): run `site-agent enroll request`, send the .csr to "
            "the coordinator's operator (`coordinator sites enroll --csr FILE`), then `site-agent enroll install CERT "
            "--coordinator-fingerprint SHA256:...` (docs/guide/security.md)"
        )
    if permissions:
        check_permissions(files)
    return files


def write_status(files: TrustFiles, state: str, seen: str | None, message: str) -> None:
    """Record what the node last saw of the coordinator's certificate (the node calls this).

    Args:
        files: the trust folder.
        state: ``trusted`` or ``refused``.
        seen: the fingerprint the coordinator presented.
        message: one line for `site-agent status` and `doctor`.
    """
    record = {"state": state, "seen": seen, "message": message, "time": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()}
    with contextlib.suppress(OSError):  # a read-only work folder must not stop the node
        _make_dir(files)
        atomic.write_bytes(files.status, (json.dumps(record) + "\n").encode("utf-8"))


def read_status(files: TrustFiles) -> dict[str, Any] | None:
    """What the node last recorded (`write_status`).

    Args:
        files: the trust folder.

    Returns:
        The record, or None when there is none (or it is unreadable).
    """
    try:
        raw = json.loads(files.status.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


_DENIED = re.compile(r'PERMISSION_DENIED\s*details = "([^"]*)"')


def tail_lines(path: str | os.PathLike[str], tail_bytes: int) -> list[str] | None:
    """The lines of the last ``tail_bytes`` of a log file (the node's logs grow without bound).

    Args:
        path: the file.
        tail_bytes: how much of its end to read.

    Returns:
        The lines (the first may be cut), or None when the file cannot be read.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - tail_bytes))
            return fh.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None


def coordinator_refusal(audit_log: Path, tail_bytes: int = 1 << 20) -> dict[str, str] | None:
    """The last time the coordinator refused this site (revoked, not enrolled), from the node's
    security audit log (Fed-BioMed logs failed calls there, not on the console).

    Args:
        audit_log: the node's ``log/security_audit.log``.
        tail_bytes: how much of the file's end to read.

    Returns:
        ``{"time", "reason"}``, or None when the end of the log holds no refusal.
    """
    lines = tail_lines(audit_log, tail_bytes)
    if lines is None:
        return None
    for line in reversed(lines):
        if "PERMISSION_DENIED" not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        found = _DENIED.search(str(entry.get("message", "")))
        if found:
            return {"time": str(entry.get("timestamp", "?")), "reason": found.group(1)}
    return None


def summary(site: SiteConfig) -> dict[str, Any]:
    """The site's trust state for `site-agent status` / `doctor` / `trust list`.

    Args:
        site: the site.

    Returns:
        ``enrolled`` (bool), ``pins``, ``certificate`` (``subject``, ``not_before``, ``not_after``,
        ``validity``: `certificate_validity`'s state, ``validity_line``; or None), ``last`` (the
        node's last record, or None), ``refused_by_coordinator`` (the coordinator's last refusal of
        this site after the node last connected, `coordinator_refusal`, or None), ``problem`` (a
        line, or None), ``unsafe`` (`check_permissions`' line, or None).
    """
    files = TrustFiles.of(site)
    last = read_status(files)
    refusal = coordinator_refusal(site.node_dir / "log" / "security_audit.log")
    if refusal and last and last.get("time", "") > refusal["time"].replace("Z", "+00:00"):
        refusal = None  # older than the node's last connection
    out: dict[str, Any] = {
        "enrolled": False,
        "pins": [],
        "certificate": None,
        "last": last,
        "refused_by_coordinator": refusal,
        "problem": None,
        "unsafe": None,
    }
    try:
        check_permissions(files)
    except UserError as exc:
        out["unsafe"] = str(exc)
    try:
        out["pins"] = pins(files)
        check_enrolled(site, permissions=False)
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        state, line = certificate_validity(cert)
        out["certificate"] = {
            "subject": cert.subject.rfc4514_string(),
            "not_before": cert.not_valid_before.replace(tzinfo=_dt.timezone.utc).isoformat(),
            "not_after": cert.not_valid_after.replace(tzinfo=_dt.timezone.utc).isoformat(),
            "validity": state,
            "validity_line": line,
        }
        out["enrolled"] = True
    except (UserError, ValueError, OSError) as exc:
        out["problem"] = str(exc)
    return out
