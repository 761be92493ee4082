"""Site side of the coordinator's artifact registry: pull published weights, push our own.

HTTP through httpx (redirects are not followed, so the token goes to `url` only). A pull lands in ``<dest>/<kind>/<name>/<version>/`` (by default
``<work_dir>/models/registry``) with the artifact's record as ``artifact.json``::

    client = RegistryClient.from_site_config(site_agent.config.load())
    folder = client.pull("factory", "abdomen-gan")             # the latest version
    record = client.push("segmentation-branch", "hospital-a-liver", {"branch.pt": data, "branch.json": cfg})

The token comes from $FEDIMG_SITE_TOKEN or the config's ``registry.token_file``. The
transport is in `site_agent.registry_transport`, the verified pull in
`site_agent.registry_pull` and the per-command staging (`StagedPulls`) in
`site_agent.registry_staging`; this module adds the push and re-exports them. Whatever is in
the registry folder, a file whose loading runs code still loads only with the site's
approval of its sha256 (`pipelines.artifact_approval`).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Mapping

from fedimg_core.registry_wire import ALLOWED_SUFFIXES, KINDS, MAX_PUSH_BYTES, RECORD_FILE, SHA256_HEADER, TOKEN_ENV
from fedimg_core.registry_wire import FILENAME as _FILENAME
from site_agent.registry_pull import RegistryReader
from site_agent.registry_staging import STAGING_PREFIX, StagedPulls
from site_agent.registry_transport import RegistryClientError, check_kind, check_name, read_token

__all__ = [
    "ALLOWED_SUFFIXES",
    "KINDS",
    "MAX_PUSH_BYTES",
    "RECORD_FILE",
    "SHA256_HEADER",
    "STAGING_PREFIX",
    "TOKEN_ENV",
    "RegistryClient",
    "RegistryClientError",
    "StagedPulls",
    "read_token",
]


class RegistryClient(RegistryReader):
    """Pull from and push to the registry at `url` with a site token.

    Args:
        url: the registry's ``http(s)://host:port``.
        token: this site's token.
        work_dir: the site's work folder (``pull`` then defaults to its registry folder).
        timeout: seconds for each request.

    Raises:
        RegistryClientError: a bad URL or no token.
    """

    @classmethod
    def from_site_config(cls, cfg, env: Mapping[str, str] | None = None, timeout: float = 60.0) -> "RegistryClient":
        """From a loaded ``SiteConfig`` (its ``registry`` section; the token from
        $FEDIMG_SITE_TOKEN or ``registry.token_file``).

        Args:
            cfg: the site config.
            env: the environment to read the token from (default: this process's).
            timeout: seconds for each request.

        Returns:
            The client (pulls go to ``<work_dir>/models/registry``).

        Raises:
            RegistryClientError: no registry section, or no token.
        """
        reg = getattr(cfg, "registry", None)
        where = str(cfg.path) if getattr(cfg, "path", None) else "the site config"
        if reg is None:
            raise RegistryClientError(f"{where}: no registry section; add `registry: {{url: http://<coordinator>:8750, token_file: /abs/path}}`")
        return cls(reg.url, read_token(reg.token_file, env), work_dir=cfg.work_dir, timeout=timeout)

    def send_evaluation(self, name: str, version: str, aggregate: Mapping) -> dict:
        """Send this site's aggregate evaluation of a published model (`site_agent.evaluate_model.aggregate`).

        Args:
            name: the model package's name.
            version: its version (``vNNNN``).
            aggregate: per-class summaries and counts (the coordinator refuses anything else).

        Returns:
            What the coordinator stored.
        """
        check_name(name)
        try:
            body = json.dumps(dict(aggregate), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise RegistryClientError(f"model {name} {version}: the evaluation is not JSON-serialisable ({exc})") from None
        return self._json("POST", f"/registry/model/{name}/{version}/evaluations", body, what=f"evaluation of model {name} {version}")

    def push(self, kind: str, name: str, files: Mapping[str, bytes], meta: Mapping | None = None) -> dict:
        """Push a new version of ``<kind>/<name>`` (file name -> bytes); return its record.

        The coordinator validates everything and records this site as ``published_by``.

        Args:
            kind: the artifact's kind.
            name: its name.
            files: file name -> bytes.
            meta: the record's ``meta`` (JSON).

        Returns:
            The new version's record.
        """
        check_kind(kind)
        check_name(name)
        if not isinstance(files, Mapping) or not files:
            raise RegistryClientError(f"{kind} {name}: nothing to push (no files)")
        encoded = {}
        for filename, data in files.items():
            if not isinstance(filename, str) or not _FILENAME.match(filename) or filename.startswith(".") or filename == RECORD_FILE:
                raise RegistryClientError(f"{kind} {name}: file name {filename!r} is not allowed (a plain name)")
            if not filename.endswith(ALLOWED_SUFFIXES):
                raise RegistryClientError(
                    f"{filename}: only weights and configs can be pushed ({', '.join(ALLOWED_SUFFIXES)}); images, volumes and other data never leave a site"
                )
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise RegistryClientError(f"{filename}: content must be bytes, got {type(data).__name__}")
            encoded[filename] = base64.b64encode(bytes(data)).decode("ascii")
        try:
            body = json.dumps({"files": encoded, "meta": dict(meta or {})}, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise RegistryClientError(f"{kind} {name}: meta must be JSON-serialisable ({exc})") from None
        if len(body) > MAX_PUSH_BYTES:
            raise RegistryClientError(f"{kind} {name}: push of {len(body)} bytes (base64 included) is over the registry's limit of {MAX_PUSH_BYTES}")
        record = self._json("POST", f"/registry/{kind}/{name}", body, what=f"push of {kind} {name}")
        if record.get("kind") != kind or record.get("name") != name or not isinstance(record.get("files"), dict):
            raise RegistryClientError(f"{kind} {name}: the registry answered the push with something that is not its record")
        for filename, data in files.items():
            entry = record["files"].get(filename) or {}
            if entry.get("sha256") != hashlib.sha256(bytes(data)).hexdigest():
                raise RegistryClientError(f"{kind} {name} {record.get('version')}: {filename}: the registry recorded another checksum than was sent")
        return record
