"""Certificate fingerprints (``SHA256:<64 hex>``): how a site pins its coordinator's TLS certificate.

The coordinator prints its fingerprint (``coordinator fingerprint``); the operator reads it to the
site's staff out of band; the site stores it (``site-agent init --coordinator-fingerprint``) and its
node refuses any other certificate. Both sides compute it here, over the certificate's DER bytes.
"""

from __future__ import annotations

import hashlib
import re
import ssl

from fedimg_core.errors import UserError

__all__ = ["PIN_PREFIX", "fingerprint", "parse_pin", "short"]

PIN_PREFIX = "SHA256:"
_HEX = re.compile(r"[0-9a-f]{64}")  # fullmatch


def _der(cert: bytes | str) -> bytes:
    if isinstance(cert, str):
        cert = cert.encode("ascii")
    if cert.lstrip().startswith(b"-----BEGIN"):
        return ssl.PEM_cert_to_DER_cert(cert.decode("ascii"))
    return cert


def fingerprint(cert: bytes | str) -> str:
    """The fingerprint of a certificate.

    Args:
        cert: the certificate, PEM (str or bytes) or DER (bytes).

    Returns:
        ``SHA256:`` and the lowercase hex SHA-256 of its DER encoding.

    Raises:
        ValueError: ``cert`` is PEM text that does not hold a certificate.
    """
    return PIN_PREFIX + hashlib.sha256(_der(cert)).hexdigest()


def parse_pin(text: str) -> str:
    """A fingerprint as typed by a person, normalised.

    Accepts ``SHA256:<hex>`` (case-insensitive prefix) or bare hex, with or without ``:``
    between byte pairs (as ``openssl x509 -fingerprint -sha256`` prints it).

    Args:
        text: the fingerprint.

    Returns:
        ``SHA256:<64 lowercase hex>``.

    Raises:
        UserError: not a SHA-256 fingerprint.
    """
    raw = (text or "").strip()
    body = raw[len(PIN_PREFIX) :] if raw.upper().startswith(PIN_PREFIX) else raw
    body = body.replace(":", "").replace(" ", "").lower()
    if not _HEX.fullmatch(body):
        raise UserError(f"{raw!r} is not a certificate fingerprint: expected SHA256: and 64 hex digits, as `coordinator fingerprint` prints it")
    return PIN_PREFIX + body


def short(pin: str) -> str:
    """A fingerprint shortened for a log line (``SHA256:ab12cd34ef56..``).

    Args:
        pin: a ``SHA256:<hex>`` fingerprint.

    Returns:
        Its first 12 hex digits followed by ``..``.
    """
    return pin[: len(PIN_PREFIX) + 12] + ".."
