"""Researcher-side client of the coordinator's HTTP API (stdlib only)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from fedimg_core.errors import UserError


def call(url: str, method: str, path: str, token: str | None, body: bytes | None = None, timeout: float = 30.0) -> dict:
    """Call the coordinator's HTTP API and return its JSON answer.

    Args:
        url: the API's base URL.
        method: ``GET`` or ``POST``.
        path: the route, e.g. ``/runs``.
        token: the researcher API token (sent as a bearer token), or None.
        body: a request body (a spec's YAML), or None.
        timeout: seconds to wait for the answer.

    Returns:
        The decoded JSON reply (an empty dict for an empty body).

    Raises:
        UserError: the coordinator refused (with its error message) or cannot be reached.
    """
    req = urllib.request.Request(url.rstrip("/") + path, data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/yaml")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("error", exc.reason)
        except ValueError:
            detail = exc.reason
        raise UserError(f"coordinator at {url} refused: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot reach the coordinator at {url} ({reason}); is `coordinator serve` running?") from None


def client_token(home: Path, token: str | None) -> str:
    """The researcher's API token: --token / $FEDIMG_API_TOKEN, else <home>/api-token if readable.

    Never creates one: a client that invents a token only gets a confusing 401.
    """
    if token:
        return token
    if os.environ.get("FEDIMG_API_TOKEN"):
        return os.environ["FEDIMG_API_TOKEN"]
    path = Path(home) / "api-token"
    try:
        return path.read_text().strip()
    except OSError:
        raise UserError(f"no API token: pass --token or set FEDIMG_API_TOKEN (the coordinator keeps it in {path} on its host)") from None
