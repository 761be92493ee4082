"""The coordinator's certificates: its TLS server certificate (what sites pin) and the site CA
that signs each enrolled site's client certificate, plus the enrolment records.

Layout under ``<home>/pki/`` (private keys mode 0600, every file written atomically)::

    server.key, server.crt   the gRPC server's key and self-signed certificate; CN and
                             subjectAltName = the public host sites dial, O = Fed-BioMed's
                             researcher id (nodes read it from the certificate)
    site-ca.key, site-ca.crt the CA that signs site client certificates (mutual TLS)
    sites/<site>.crt         each enrolled site's certificate as issued

and ``<home>/sites.json`` (mode 0600, file-locked read-modify-write)::

    {"version": 1, "sites": {"hospital-a": {"site", "node_id", "serial", "sha256", "enrolled", "revoked"}}}

The server certificate is never regenerated silently: sites pin its fingerprint, so a new
public host or key is an explicit `CoordinatorPKI.rotate` (``coordinator certificate
rotate``; the new certificate keeps the old names too). The site CA is created only when
neither of its files exists and no site is enrolled: every site certificate depends on it.
Enrolment: the site makes its key and a CSR (CN = its Fed-BioMed node id, O = its
site name; the key never leaves the site), `CoordinatorPKI.sign_csr` signs it, the site
installs the certificate. Revocation marks the record; the gRPC server re-reads the file
when it changes (`coordinator.fedbiomed_transport`).
"""

from __future__ import annotations

import builtins
import configparser
import contextlib
import datetime as _dt
import ipaddress
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from filelock import FileLock

from coordinator.site_tokens import check_site_name
from fedimg_core import atomic
from fedimg_core.errors import UserError
from fedimg_core.tls_pins import fingerprint

__all__ = [
    "NODE_ID_PATTERN",
    "SITES_FILE",
    "CoordinatorPKI",
    "SiteRecord",
    "SiteRegistry",
    "certificate_expiry",
    "clip",
    "make_key",
    "node_id_of",
    "site_of",
]

SITES_FILE = "sites.json"
NODE_ID_PATTERN = re.compile(r"NODE_[0-9a-fA-F-]{8,64}")  # Fed-BioMed 6.4.1: "NODE_" + uuid4; use with fullmatch
SERVER_DAYS = 3650
SITE_DAYS = 825
CA_DAYS = 3650
MIN_RSA_BITS = 2048
_CLAIM_CHARS = 80  # a claimed node id is the peer's text: clipped in refusal reasons and log lines


def make_key() -> ec.EllipticCurvePrivateKey:
    """A new private key (ECDSA P-256, what gRPC's TLS stack handles everywhere).

    Returns:
        The key.
    """
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (stored mode 0600).

    Args:
        key: the key.

    Returns:
        The PEM bytes.
    """
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _name_attr(cert: x509.Certificate | x509.CertificateSigningRequest, oid: x509.ObjectIdentifier) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(oid)
    return str(attrs[0].value) if attrs else None


def node_id_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> str | None:
    """The node id a site certificate or CSR names (its CN).

    Args:
        cert: the certificate or CSR.

    Returns:
        The CN, or None without one.
    """
    return _name_attr(cert, NameOID.COMMON_NAME)


def site_of(cert: x509.Certificate | x509.CertificateSigningRequest) -> str | None:
    """The site name a site certificate or CSR names (its O).

    Args:
        cert: the certificate or CSR.

    Returns:
        The O, or None without one.
    """
    return _name_attr(cert, NameOID.ORGANIZATION_NAME)


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def clip(text: object, limit: int = _CLAIM_CHARS) -> str:
    """A peer-supplied value for a log line or a refusal reason: its ``repr``, at most ``limit`` characters.

    Args:
        text: the value.
        limit: the most characters kept.

    Returns:
        ``repr(text)``, cut to ``limit`` characters with ``..`` when longer.
    """
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 2] + ".."


def certificate_expiry(cert: x509.Certificate) -> _dt.datetime:
    """When a certificate stops being valid.

    Args:
        cert: the certificate.

    Returns:
        Its notAfter, in UTC.
    """
    return cert.not_valid_after.replace(tzinfo=_dt.timezone.utc)


def _check_csr_key(csr: x509.CertificateSigningRequest) -> None:
    """Refuse a request whose key is not EC P-256 (what `site-agent enroll request` makes) or RSA of 2048 bits or more."""
    key = csr.public_key()
    wanted = f"the coordinator accepts EC P-256 (what `site-agent enroll request` makes) or RSA of {MIN_RSA_BITS} bits or more"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise UserError(f"the certificate request's key is EC {key.curve.name}; {wanted}")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise UserError(f"the certificate request's key is RSA of {key.key_size} bits; {wanted}")
    else:
        raise UserError(f"the certificate request's key is {type(key).__name__.lstrip('_')}; {wanted}")


@dataclass
class SiteRecord:
    """One enrolled site, as ``sites.json`` keeps it.

    Args:
        site: the site's name (the certificate's O).
        node_id: its Fed-BioMed node id (the certificate's CN; what its messages must claim).
        serial: the certificate's serial number, hex.
        sha256: the certificate's fingerprint (``SHA256:<hex>``).
        enrolled: when it was signed (ISO 8601, UTC).
        revoked: when it was revoked, or None.
    """

    site: str
    node_id: str
    serial: str
    sha256: str
    enrolled: str
    revoked: str | None = None


class SiteRegistry:
    """The enrolled sites of a coordinator home (``<home>/sites.json``).

    Args:
        home: the coordinator home.
    """

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home)
        self.path = self.home / SITES_FILE
        self._cache: tuple[tuple[int, int] | None, dict[str, SiteRecord]] = (None, {})

    def _read(self) -> dict[str, SiteRecord]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the enrolled sites ({exc.strerror or exc})") from None
        try:
            raw = json.loads(text)
            return {name: SiteRecord(**entry) for name, entry in raw["sites"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise UserError(f"{self.path}: not an enrolled-sites file ({type(exc).__name__}: {exc}); restore it from a backup") from None

    def _write(self, sites: dict[str, SiteRecord]) -> None:
        data = json.dumps({"version": 1, "sites": {k: asdict(v) for k, v in sorted(sites.items())}}, indent=2) + "\n"
        atomic.write_bytes(self.path, data.encode("utf-8"), mode=0o600)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.home.mkdir(parents=True, exist_ok=True)
        with FileLock(self.home / ".sites.lock"):
            yield

    def records(self) -> dict[str, SiteRecord]:
        """Every site record, re-read only when the file changed (the gRPC server calls this per request).

        Returns:
            site name -> record.

        Raises:
            UserError: the file cannot be read or parsed.
        """
        try:
            st = self.path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp is None:
            return {}
        if self._cache[0] != stamp:
            self._cache = (stamp, self._read())
        return self._cache[1]

    def list(self) -> builtins.list[SiteRecord]:
        """The records, sorted by site name.

        Returns:
            The records (revoked ones included).
        """
        return [r for _, r in sorted(self._read().items())]

    def put(self, record: SiteRecord, replace: bool = False) -> SiteRecord | None:
        """Store a site's record (a new enrolment replaces the site's previous certificate).

        Args:
            record: the record.
            replace: allow replacing an enrolled, unrevoked site whose node id differs (another
                node taking the site's name: ``coordinator sites enroll --replace``).

        Returns:
            The record it replaced, if any.

        Raises:
            UserError: another site, not revoked, holds the same node id; or the site is
                enrolled, not revoked, with another node id and ``replace`` is False.
        """
        with self._lock():
            sites = self._read()
            for other in sites.values():
                if other.site != record.site and other.node_id == record.node_id and other.revoked is None:
                    raise UserError(f"node id {record.node_id} is already enrolled as site {other.site!r}; revoke it first")
            previous = sites.get(record.site)
            if previous is not None and previous.revoked is None and previous.node_id != record.node_id and not replace:
                raise UserError(
                    f"site {record.site!r} is enrolled with node {previous.node_id}, this request is from node {record.node_id}: "
                    f"if that node now is site {record.site}, enrol again with `coordinator sites enroll --replace` (the old "
                    f"certificate stops working), else check which site sent the request"
                )
            sites[record.site] = record
            self._write(sites)
        return previous

    def revoke(self, site: str) -> SiteRecord:
        """Revoke a site: from now on its certificate opens nothing (no restart needed).

        Args:
            site: the site's name.

        Returns:
            The revoked record.

        Raises:
            UserError: no such site.
        """
        check_site_name(site)
        with self._lock():
            sites = self._read()
            if site not in sites:
                raise UserError(f"site {site!r} is not enrolled in {self.path} (enrolled: {', '.join(sorted(sites)) or 'none'})")
            if sites[site].revoked is None:
                sites[site].revoked = _now().replace(microsecond=0).isoformat()
                self._write(sites)
            return sites[site]

    def authorize(self, sha256: str, node_id: str | None) -> tuple[SiteRecord | None, str]:
        """Whether a client certificate may act, and as which node.

        Args:
            sha256: the fingerprint of the certificate the client presented.
            node_id: the node id the client's message claims (None: not checked).

        Returns:
            ``(record, "")`` when allowed, else ``(None or the record, reason)``.
        """
        found = next((r for r in self.records().values() if r.sha256 == sha256), None)
        if found is None:
            return None, "certificate not enrolled (or replaced by a newer enrolment)"
        if found.revoked is not None:
            return found, f"site {found.site} was revoked at {found.revoked}"
        if node_id is not None and node_id != found.node_id:
            return found, f"site {found.site} (node {found.node_id}) claims node id {clip(node_id)}"
        return found, ""


class CoordinatorPKI:
    """The coordinator's server certificate and site CA (see the module docstring).

    Args:
        home: the coordinator home.
    """

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home)
        self.dir = self.home / "pki"
        self.server_key = self.dir / "server.key"
        self.server_cert = self.dir / "server.crt"
        self.ca_key = self.dir / "site-ca.key"
        self.ca_cert = self.dir / "site-ca.crt"
        self.sites = SiteRegistry(self.home)
        self.replaced: SiteRecord | None = None  # the record the last `sign_csr` replaced, if any

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(self.dir / ".pki.lock"):
            yield

    # -- reading --------------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the server certificate and the site CA exist.

        Returns:
            True when all four files are there.
        """
        return all(p.is_file() for p in (self.server_key, self.server_cert, self.ca_key, self.ca_cert))

    def certificate(self) -> x509.Certificate:
        """The server certificate.

        Returns:
            The certificate.

        Raises:
            UserError: it does not exist or cannot be read.
        """
        try:
            return x509.load_pem_x509_certificate(self.server_cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.server_cert}: no readable server certificate ({exc}); run `coordinator fingerprint --home {self.home}`") from None

    def fingerprint(self) -> str:
        """The server certificate's fingerprint, what sites pin.

        Returns:
            ``SHA256:<hex>``.
        """
        return fingerprint(self.server_cert.read_bytes())

    def server_names(self) -> list[str]:
        """The names the server certificate is valid for (its subjectAltName entries).

        Returns:
            DNS names and IP addresses, in the certificate's order (the newest public host first).
        """
        try:
            san = self.certificate().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return []
        return [str(n.value) for n in san if isinstance(n, (x509.DNSName, x509.IPAddress))]

    def researcher_id(self) -> str:
        """The Fed-BioMed researcher id the server certificate carries (its O).

        Returns:
            The id; nodes check that every request comes from it.
        """
        rid = site_of(self.certificate())
        if not rid:
            raise UserError(f"{self.server_cert}: the certificate carries no researcher id (O); rotate it")
        return rid

    # -- creating -------------------------------------------------------------------------

    def _existing_researcher_id(self) -> str:
        """The researcher id of an existing Fed-BioMed researcher component in this home, else a new one."""
        ini = self.home / "researcher" / "etc" / "config.ini"
        parser = configparser.ConfigParser()
        with contextlib.suppress(OSError, configparser.Error):
            parser.read(ini)
            rid = parser.get("default", "id", fallback="")
            if rid:
                return rid
        return f"RESEARCHER_{uuid.uuid4()}"

    def ensure(self, public_host: str | None = None) -> bool:
        """Create what is missing (site CA, server certificate for ``public_host``); never replace.

        Args:
            public_host: the name sites dial (default when creating: ``localhost``).

        Returns:
            True when the server certificate was created now.

        Raises:
            UserError: the server certificate exists but is not valid for ``public_host``
                (a changed host is an explicit rotation: every site pins the certificate).
        """
        with self._lock():
            self._ensure_ca()
            created = False
            if not (self.server_key.is_file() and self.server_cert.is_file()):
                self._write_server([public_host or "localhost"], self._existing_researcher_id())
                created = True
        if public_host and not created and public_host.lower() not in [n.lower() for n in self.server_names()]:
            raise UserError(
                f"the server certificate in {self.server_cert} is for {', '.join(self.server_names()) or 'no name'}, not {public_host!r}; "
                f"sites pin it, so a new public host is a rotation: `coordinator certificate rotate --home {self.home} --public-host "
                f"{public_host}` (the new certificate keeps the current names too), add the new fingerprint at every site "
                "(`site-agent trust add`), restart the coordinator, then remove the old pin at every site (docs/guide/security.md)"
            )
        return created

    def _ensure_ca(self) -> None:
        """Create the site CA when neither of its files exists and no site is enrolled; refuse to replace half of one."""
        have_key, have_cert = self.ca_key.is_file(), self.ca_cert.is_file()
        if have_key and have_cert:
            return
        if have_key or have_cert:
            missing, present = (self.ca_cert, self.ca_key) if have_key else (self.ca_key, self.ca_cert)
            raise UserError(
                f"{missing} is missing (but {present.name} is there): every enrolled site's certificate depends on the site CA; "
                f"restore {missing.name} from a backup (with no site enrolled, remove {present} too to make a new site CA)"
            )
        enrolled = [r.site for r in self.sites.list() if r.revoked is None]
        if enrolled:
            raise UserError(
                f"{self.ca_key} and {self.ca_cert.name} are missing: every enrolled site's certificate ({len(enrolled)} site(s): "
                f"{', '.join(enrolled[:5])}{', ...' if len(enrolled) > 5 else ''}) depends on them; restore them from a backup, or "
                f"`coordinator sites revoke SITE --home {self.home}` each site and enrol every site again (a new site CA is made then)"
            )
        self._write_ca()

    def rotate(self, public_host: str | None = None, keep_names: bool = True) -> str:
        """Replace the server key and certificate (same researcher id; the site CA is kept).

        Args:
            public_host: the name sites dial (default: the current certificate's first name);
                it becomes the certificate's CN and first subjectAltName.
            keep_names: also keep the current certificate's names in the new one's
                subjectAltName, so sites still dialling an old name keep working while they
                change (``coordinator certificate rotate --drop-old-names``: False).

        Returns:
            The new fingerprint.
        """
        self.ensure()
        previous = self.server_names()
        host = public_host or (previous or ["localhost"])[0]
        names = [host] + ([n for n in previous if n.lower() != host.lower()] if keep_names else [])
        rid = self.researcher_id()
        with self._lock():
            self._write_server(names, rid)
        return self.fingerprint()

    def _write_ca(self) -> None:
        key = make_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedimg site CA"), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedimg")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        atomic.write_bytes(self.ca_key, key_pem(key), mode=0o600)
        atomic.write_bytes(self.ca_cert, cert.public_bytes(serialization.Encoding.PEM))

    def _write_server(self, hosts: list[str], researcher_id: str) -> None:
        key = make_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]), x509.NameAttribute(NameOID.ORGANIZATION_NAME, researcher_id)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=SERVER_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256())
        )
        # key first: a reader that sees the new certificate also finds its key
        atomic.write_bytes(self.server_key, key_pem(key), mode=0o600)
        atomic.write_bytes(self.server_cert, cert.public_bytes(serialization.Encoding.PEM))

    # -- enrolment ------------------------------------------------------------------------

    def sign_csr(self, csr_pem: bytes, site: str | None = None, replace: bool = False) -> tuple[bytes, SiteRecord]:
        """Sign a site's certificate request with the site CA and record the enrolment.

        The record it replaced (the site's previous enrolment), if any, is left in `replaced`.

        Args:
            csr_pem: the CSR (PEM) the site wrote (`site-agent enroll request`).
            site: the site's name; must equal the CSR's O when given (default: the CSR's O).
            replace: allow replacing an enrolled, unrevoked site whose node id differs
                (`SiteRegistry.put`).

        Returns:
            The certificate (PEM) and its record in ``sites.json``.

        Raises:
            UserError: not a CSR, a bad signature, a key that is not EC P-256 or RSA of 2048
                bits or more, a CN that is not a Fed-BioMed node id, a bad or mismatching site
                name, a node id enrolled under another site, or the site enrolled with another
                node id (without ``replace``).
        """
        self.replaced = None
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise UserError("not a PEM certificate request (the .csr file `site-agent enroll request` writes)") from None
        if not csr.is_signature_valid:
            raise UserError("the certificate request's signature does not verify")
        node_id = node_id_of(csr) or ""
        if not NODE_ID_PATTERN.fullmatch(node_id):
            raise UserError(f"the certificate request's CN must be the site's Fed-BioMed node id (NODE_...), got {node_id!r}")
        named = site_of(csr)
        if site is not None and named is not None and site != named:
            raise UserError(f"the certificate request is from site {named!r}, not {site!r}")
        site_name = check_site_name(site or named)
        _check_csr_key(csr)
        self.ensure()
        ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        now = _now()
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id), x509.NameAttribute(NameOID.ORGANIZATION_NAME, site_name)]))
            .issuer_name(ca_cert.subject)
            .public_key(csr.public_key())
            .serial_number(serial)
            .not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=SITE_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        pem = cert.public_bytes(serialization.Encoding.PEM)
        record = SiteRecord(site_name, node_id, f"{serial:x}", fingerprint(pem), now.replace(microsecond=0).isoformat())
        self.replaced = self.sites.put(record, replace=replace)
        atomic.write_bytes(self.dir / "sites" / f"{site_name}.crt", pem)
        return pem, record

    def site_expiry(self, record: SiteRecord) -> _dt.datetime | None:
        """When an enrolled site's certificate expires, from the copy kept at enrolment (``pki/sites/<site>.crt``).

        Args:
            record: the site's record.

        Returns:
            Its notAfter (UTC), or None when the kept copy is missing or is not the recorded certificate.
        """
        try:
            pem = (self.dir / "sites" / f"{record.site}.crt").read_bytes()
            if fingerprint(pem) != record.sha256:
                return None
            return certificate_expiry(x509.load_pem_x509_certificate(pem))
        except (OSError, ValueError):
            return None

    def site_ca_pem(self) -> bytes:
        """The site CA certificate (the server verifies client certificates against it).

        Returns:
            The PEM bytes.
        """
        return self.ca_cert.read_bytes()

    def status(self) -> dict[str, Any]:
        """What ``coordinator fingerprint --json`` prints.

        Returns:
            ``fingerprint``, ``names``, ``researcher_id``, ``certificate``.
        """
        return {"fingerprint": self.fingerprint(), "names": self.server_names(), "researcher_id": self.researcher_id(), "certificate": str(self.server_cert)}
