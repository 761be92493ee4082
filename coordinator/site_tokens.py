"""Site tokens: what a site presents to the coordinator's registry (pull and push).

One token per site, issued by the coordinator's operator (``coordinator site-token issue``)
and shown once. The coordinator keeps only its SHA-256 and the time it was issued, in
``<home>/site-tokens.json`` (mode 0600, written atomically)::

    {"version": 1,
     "sites": {"hospital-a": {"sha256": "<hex of sha256(token)>", "created": "2025-01-01T12:00:00+00:00"}}}

Issuing again for a site replaces its token (the old one stops working at once); revoking
removes it. The file is re-read on every check, so a running server sees changes
immediately. Site tokens only open the ``/registry`` routes, never the researcher API.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime as _dt
import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

from filelock import FileLock

from fedimg_core import atomic
from fedimg_core.errors import UserError

TOKENS_FILE = "site-tokens.json"
_SITE_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # as site_agent.config's site_name; fullmatch: no trailing newline
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_site_name(site: object) -> str:
    """A valid site name, returned as given.

    Args:
        site: the name to check.

    Returns:
        ``site``.

    Raises:
        UserError: not 1-63 of a-z 0-9 _ - starting with a letter or digit.
    """
    if not isinstance(site, str) or not _SITE_RE.fullmatch(site):
        raise UserError(f"site name must be 1-63 of a-z 0-9 _ - starting with a letter or digit (got {site!r})")
    return site


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class SiteTokens:
    """The site tokens of a coordinator home (see the module docstring)."""

    def __init__(self, home: str | os.PathLike):
        self.home = Path(home)
        self.path = self.home / TOKENS_FILE

    # ------------------------------------------------------------------ storage

    def _read(self) -> dict[str, dict]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise UserError(f"{self.path}: cannot read the site tokens ({exc.strerror or exc})") from None
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise UserError(f"{self.path}: not valid JSON ({exc}); fix or remove it and issue the site tokens again") from None
        sites = raw.get("sites") if isinstance(raw, dict) else None
        if not isinstance(sites, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and _HEX64.fullmatch(v["sha256"]) for v in sites.values()
        ):
            raise UserError(f"{self.path}: not a site-token file (expected {{'sites': {{site: {{sha256, created}}}}}})")
        return sites

    def _write(self, sites: dict[str, dict]) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        data = json.dumps({"version": 1, "sites": sites}, indent=2, sort_keys=True) + "\n"
        atomic.write_bytes(self.path, data.encode("utf-8"), mode=0o600)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialises read-modify-write of the file across processes (`filelock`: flock on Unix)."""
        self.home.mkdir(parents=True, exist_ok=True)
        with FileLock(self.home / ".site-tokens.lock"):
            yield

    # ------------------------------------------------------------------ operations

    def issue(self, site: str) -> str:
        """A new token for `site` (replacing its previous one); only its hash is stored."""
        check_site_name(site)
        token = secrets.token_urlsafe(32)
        created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
        with self._lock():
            sites = self._read()
            sites[site] = {"sha256": _digest(token), "created": created}
            self._write(sites)
        return token

    def revoke(self, site: str) -> None:
        """Remove `site`'s token; UserError when it has none."""
        check_site_name(site)
        with self._lock():
            sites = self._read()
            if site not in sites:
                known = ", ".join(sorted(sites)) or "none"
                raise UserError(f"site {site!r} has no token in {self.path} (sites with a token: {known})")
            del sites[site]
            self._write(sites)

    def verify(self, token: str | None) -> str | None:
        """The site whose token this is, or None. Compares digests in constant time against
        every stored one (no early exit)."""
        if not token or not isinstance(token, str):
            return None
        given = _digest(token).encode()
        found = None
        for site, entry in self._read().items():
            if hmac.compare_digest(given, entry["sha256"].encode()):
                found = site
        return found

    def list(self) -> builtins.list[dict]:
        """``[{site, created}]``, sorted by site; never the hashes."""
        return [{"site": s, "created": e.get("created")} for s, e in sorted(self._read().items())]
