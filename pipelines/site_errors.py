"""Errors a site reports to the coordinator: an error code and allowlisted fields only, never exception text.

The plans wrap their entry points with `site_boundary`: the full failure goes to the site's own log under an
incident id and leaves as a `SiteError` built from a fixed code and checked fields. Why and what it looks like:
docs/design/site-boundary.md. Imports no site-agent code: plans import it on a node.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TextIO, TypeVar

from pipelines.artifact_approval import ArtifactNotApproved

__all__ = ["CODES", "FIELDS", "SiteError", "in_researcher_process", "mark_researcher_process", "sanitize", "site_boundary", "site_logger"]

P = ParamSpec("P")
R = TypeVar("R")

# The only text that leaves a site in an error: these codes, and these fields if they match.
CODES = {
    "artifact_not_approved": "the site refused an executable artifact it has not approved (its staff review it with `site-agent artifacts show SHA`)",
    "key_config": "the data-factory key configuration cannot be used at this site",
    "dataset": "the site's dataset does not fit the experiment",
    "device": "the site cannot train where or how the experiment asks (device.gpu: required at a site without a GPU, a precision its device lacks, or a GPU the site's torch does not see)",
    "out_of_memory": "the site ran out of memory",
    "site_error": "the plan failed at the site",
}
FIELDS = {
    "stage": re.compile(r"^(init|data|training|testing)$"),
    "kind": re.compile(r"^(torchscript|pickle)$"),
    "status": re.compile(r"^(pending|rejected|no_store)$"),
    "sha256": re.compile(r"^[0-9a-f]{64}$"),
    "incident": re.compile(r"^[0-9a-f]{8}$"),
}
_PREFIX = "fedimg site error"

_log = logging.getLogger("fedimg.site")


class _Stderr(logging.StreamHandler[TextIO]):
    """Writes to the current ``sys.stderr`` (the node's log file; replaced under test capture)."""

    @property  # the current sys.stderr, where the base class keeps the stream it was given
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def site_logger() -> logging.Logger:
    """The site-local logger: to stderr (the node's log file), never to Fed-BioMed's handlers."""
    if not _log.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s fedimg.site %(levelname)s - %(message)s"))
        _log.addHandler(handler)
        _log.setLevel(logging.INFO)
        _log.propagate = False  # Fed-BioMed's remote handler sits on its own logger; keep it that way
    return _log


class SiteError(RuntimeError):
    """What a site may report about a failure: `code` and allowlisted, format-checked `fields`.

    Args:
        code: one of `CODES` (anything else becomes ``site_error``).
        **fields: candidate fields; those not in `FIELDS`, or not matching its pattern, are dropped.
    """

    def __init__(self, code: str, **fields: Any):
        self.code = code if code in CODES else "site_error"
        self.fields = {k: str(v) for k, v in fields.items() if k in FIELDS and FIELDS[k].match(str(v))}
        detail = " ".join(f"{k}={v}" for k, v in self.fields.items())
        super().__init__(f"{_PREFIX} {self.code} [{detail}]: {CODES[self.code]}; details are in the site's log (site-agent logs)")


def _classify(exc: BaseException) -> tuple[str, dict[str, Any]]:
    """Error code and candidate fields for an exception, by its type (never its text)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # the refusal may arrive wrapped by another error
        seen.add(id(e))
        if isinstance(e, ArtifactNotApproved):
            # sha256 and status only for content the requester named by its sha256: otherwise
            # they would tell the coordinator which files the site holds and what they hash to
            disclosed = {"sha256": e.sha256, "status": e.status} if getattr(e, "disclose", False) else {}
            return "artifact_not_approved", {"kind": e.kind, **disclosed}
        e = e.__cause__ or e.__context__
    names = {c.__name__ for c in type(exc).__mro__}
    if "KeyConfigError" in names:
        return "key_config", {}
    if names & {"DatasetError", "DatasetSchemaError"}:
        return "dataset", {}
    if "DeviceError" in names:
        return "device", {}
    if isinstance(exc, MemoryError):
        return "out_of_memory", {}
    return "site_error", {}


def sanitize(exc: BaseException, stage: str) -> SiteError:
    """Log `exc` in full to the site's log and return the `SiteError` to raise instead.

    Args:
        exc: the failure (a `SiteError` is returned as it is).
        stage: ``init``, ``data``, ``training`` or ``testing``.

    Returns:
        The error to report: a code and allowlisted fields, with a new incident id that the log line carries too.
    """
    if isinstance(exc, SiteError):
        return exc
    incident = secrets.token_hex(4)
    code, fields = _classify(exc)
    site_logger().error("incident %s (%s, stage %s): the plan failed; this text stays at the site", incident, code, stage,
                        exc_info=(type(exc), exc, exc.__traceback__))  # fmt: skip
    return SiteError(code, stage=stage, incident=incident, **fields)


_RESEARCHER_PROCESS = False  # set only by `mark_researcher_process` (coordinator code)


def mark_researcher_process() -> None:
    """Mark this process as the coordinator's (Fed-BioMed's researcher side).

    The coordinator also runs a plan's `post_init`: there the researcher's own error text is
    theirs to see, so `site_boundary` lets it through. Everywhere else (a node, a site-agent
    job, a test) errors are sanitised: that is the default, and nothing a site receives
    (plan arguments, environment) can change it; only coordinator code calls this.

    Raises:
        RuntimeError: called in a Fed-BioMed node process.
    """
    global _RESEARCHER_PROCESS
    if "fedbiomed.node.node" in sys.modules or "fedbiomed.node.round" in sys.modules:
        raise RuntimeError("mark_researcher_process: this is a Fed-BioMed node process; its errors stay sanitised")
    _RESEARCHER_PROCESS = True


def in_researcher_process() -> bool:
    """Whether `mark_researcher_process` marked this process as the coordinator's.

    Returns:
        True only in the coordinator's process.
    """
    return _RESEARCHER_PROCESS


def site_boundary(stage: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate an entry point Fed-BioMed calls: any exception leaves it as a `SiteError`.

    Args:
        stage: ``init``, ``data``, ``training`` or ``testing`` (reported with the error).

    Returns:
        The decorator (in the coordinator's process, see `mark_researcher_process`, errors pass unchanged).

    Raises:
        ValueError: an unknown stage.
    """
    if not FIELDS["stage"].match(stage):
        raise ValueError(f"unknown stage {stage!r}")

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def inner(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every failure is reported the same way
                if in_researcher_process():
                    raise
                raise sanitize(exc, stage) from None

        return inner

    return wrap
