"""The registry client's transport: the site token, one authenticated request, the registry's refusals in words.

HTTP through httpx with the system's CA store; redirects are not followed, so the token goes
to ``registry.url`` only, and it is never printed or logged. `RegistryTransport` is the base of
`site_agent.registry_client.RegistryClient`; the verified pull is in `site_agent.registry_pull`.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import urllib.parse
from pathlib import Path
from typing import Iterator, Mapping

import httpx

from fedimg_core.errors import UserError
from fedimg_core.registry_wire import KINDS, TOKEN_ENV
from fedimg_core.registry_wire import NAME as _NAME
from pipelines.terminal_text import escape_controls

__all__ = ["RegistryClientError", "RegistryTransport", "check_kind", "check_name", "read_token"]


class RegistryClientError(UserError):
    """A pull or push failed; the message names the artifact or file and what to do."""


def check_kind(kind: str) -> str:
    """Refuse an artifact kind the registry does not know.

    Args:
        kind: the kind asked for.

    Returns:
        ``kind``.

    Raises:
        RegistryClientError: naming the kinds there are.
    """
    if kind not in KINDS:
        raise RegistryClientError(f"unknown artifact kind {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def check_name(name: str) -> str:
    """Refuse an artifact name the registry would refuse (it becomes a folder here).

    Args:
        name: the name asked for.

    Returns:
        ``name``.

    Raises:
        RegistryClientError: saying which names are allowed.
    """
    if not isinstance(name, str) or not _NAME.match(name) or name.startswith("."):
        raise RegistryClientError(f"artifact name {name!r} is not allowed: 1-64 letters, digits, '_', '.' or '-', not starting with '.'")
    return name


def read_token(token_file: str | os.PathLike | None, env: Mapping[str, str] | None = None) -> str:
    """The site token: $FEDIMG_SITE_TOKEN, else the first line of `token_file`.

    Args:
        token_file: the config's ``registry.token_file``, if any.
        env: the environment to read (default: this process's).

    Returns:
        The token (never printed or logged).

    Raises:
        RegistryClientError: no token, a file that cannot be read, or one that does not hold the
            token alone on one line.
    """
    env = os.environ if env is None else env
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip()
    if token_file is None:
        raise RegistryClientError(
            f"no site token: set registry.token_file in the site config or ${TOKEN_ENV} "
            "(the coordinator's operator issues one with `coordinator site-token issue <site>`)"
        )
    path = Path(token_file)
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise RegistryClientError(f"{path}: cannot read the site token ({exc.strerror or exc})") from None
    if not token or len(token.split()) != 1:
        raise RegistryClientError(f"{path}: expected the site token alone on one line")
    return token


class RegistryTransport:
    """Requests to the registry at `url` with a site token (the base of `RegistryClient`).

    Args:
        url: the registry's ``http(s)://host:port``.
        token: this site's token.
        work_dir: the site's work folder (``pull`` then defaults to its registry folder).
        timeout: seconds for each request.

    Raises:
        RegistryClientError: a bad URL or no token.
    """

    def __init__(self, url: str, token: str, work_dir: str | os.PathLike | None = None, timeout: float = 60.0):
        parts = urllib.parse.urlsplit(url or "")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise RegistryClientError(f"registry URL must be http:// or https:// with a host (got {url!r})")
        if not token:
            raise RegistryClientError("no site token given")
        self.url = url.rstrip("/")
        self._token = token  # never printed: not in repr, messages or logs
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = None  # made on first use

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    @contextlib.contextmanager
    def _open(self, method: str, path: str, body: bytes | None = None, what: str = "", query: dict | None = None) -> Iterator[httpx.Response]:
        """One request, its response streamed (the body is read by the caller).

        Raises:
            RegistryClientError: the registry cannot be reached, or answers with anything but 2xx
                (a redirect included: it is not followed, so the token never goes elsewhere).
        """
        quoted = "/".join(urllib.parse.quote(p, safe="") for p in path.split("/"))
        if query:
            quoted += "?" + urllib.parse.urlencode(query)
        # identity: the bytes hashed are the file's bytes, never a decoded transfer encoding.
        headers = {"Authorization": f"Bearer {self._token}", "Accept-Encoding": "identity"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        what = what or path
        # The system's CA store (as urllib used), not certifi's: a site may trust its own CA.
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        client = httpx.Client(timeout=self.timeout, follow_redirects=False, verify=self._ssl)
        try:
            try:
                resp = client.send(client.build_request(method, self.url + quoted, content=body, headers=headers), stream=True)
            except (httpx.TransportError, OSError) as exc:
                raise RegistryClientError(
                    f"cannot reach the registry at {self.url} ({exc or type(exc).__name__}); is the coordinator running and registry.url right?"
                ) from None
            try:
                if not 200 <= resp.status_code < 300:
                    try:
                        detail = json.loads(resp.read() or b"{}").get("error") or resp.reason_phrase
                    except (ValueError, AttributeError, OSError, httpx.HTTPError):
                        detail = resp.reason_phrase
                    if resp.is_redirect:
                        target = escape_controls(resp.headers.get("location", "?")[:200])
                        raise RegistryClientError(
                            f"the registry at {self.url} refused {what} ({resp.status_code}): it answered with a redirect to {target}; "
                            "redirects are not followed, so the site token goes only to registry.url: set registry.url to the final address"
                        )
                    raise self._refusal(resp.status_code, str(detail), what)
                yield resp
            finally:
                resp.close()
        finally:
            client.close()

    def _refusal(self, code: int, detail: str, what: str) -> RegistryClientError:
        if code == 401:
            return RegistryClientError(
                f"the registry at {self.url} refused this site's token (401: {detail}); ask the coordinator's operator "
                f"for a new one (`coordinator site-token issue <site>`) and put it in registry.token_file or ${TOKEN_ENV}"
            )
        if code == 403:
            return RegistryClientError(f"the registry at {self.url} forbids this ({what}): {detail}")
        if code == 404:
            return RegistryClientError(f"not in the registry at {self.url}: {what}: {detail}")
        if code == 413:
            return RegistryClientError(f"the registry at {self.url} refused {what} as too large: {detail}")
        if code >= 500:
            return RegistryClientError(f"the registry at {self.url} failed on {what} ({code}): {detail}")
        return RegistryClientError(f"the registry at {self.url} refused {what} ({code}): {detail}")

    def _json(self, method: str, path: str, body: bytes | None = None, what: str = "", query: dict | None = None) -> dict:
        with self._open(method, path, body, what, query) as resp:
            try:
                raw = resp.read()
            except (OSError, httpx.HTTPError) as exc:
                raise RegistryClientError(f"the registry at {self.url}: answer to {what or path} cut short ({exc})") from None
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            raise RegistryClientError(f"the registry at {self.url} answered {path} with something that is not JSON") from None
        if not isinstance(doc, dict):
            raise RegistryClientError(f"the registry at {self.url} answered {path} with unexpected JSON")
        return doc
