"""Run directories: one per submitted spec, the single source of truth about a run.

    <home>/runs/<run_id>/
        spec.yaml              the spec exactly as submitted
        spec.resolved.yaml     the same with its label schema inlined (what resume and serve read)
        state.json             status (queued|running|done|failed|interrupted), timestamps, error
        metrics.json           per-round metrics (sites, samples, losses, validation, update norm)
        checkpoints/           aggregated global parameters per round (torch state dicts)
        evaluations/           `coordinator evaluate` results, one JSON per dataset
        report/                `coordinator report`
        run.log                the run's log: plain text, our own lines plus the warnings and
                               errors of Fed-BioMed and the sites (see RunLogFilter)
        fedbiomed/             Fed-BioMed's experimentation folder: breakpoint_NNNN/ (what
                               `coordinator resume` continues from), the sites' replies
                               (params_*.mpk), the plan source (model_*.py), its tensorboard
                               folder (runs/); standalone/<site>/ holds one per site in standalone mode

Runs made before the fedbiomed/ folder existed keep Fed-BioMed's files at the top of the run
directory; they still open, and resume there (`latest_breakpoint` looks in both places).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from datetime import datetime
from pathlib import Path

import psutil
import yaml

from coordinator.run_metrics import RunMetrics
from fedimg_core import atomic
from fedimg_core.config import validate_config
from fedimg_core.errors import ConfigError, UserError

STATUSES = ("queued", "running", "done", "failed", "interrupted")
FEDBIOMED_FOLDER = "fedbiomed"  # Fed-BioMed's experimentation folder inside a run directory


def runs_dir(home: Path) -> Path:
    """The folder holding a coordinator home's run directories.

    Args:
        home: the coordinator home.

    Returns:
        ``<home>/runs``.
    """
    return Path(home) / "runs"


def new_run(home: Path, spec_text: str, spec_name: str, resolved: dict | None = None) -> Path:
    """Create a queued run directory holding the spec text (and `resolved`, the spec with
    files it names inlined); return its path."""
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{spec_name}-{secrets.token_hex(2)}"
    run_dir = runs_dir(home) / run_id
    run_dir.mkdir(parents=True)
    atomic.write_text(run_dir / "spec.yaml", spec_text)
    if resolved is not None:
        atomic.write_text(run_dir / "spec.resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    write_state(run_dir, {"run_id": run_id, "name": spec_name, "status": "queued", "created": _now()})
    return run_dir


def safe_name(name: str, fallback: str = "item") -> str:
    """A site or dataset name as a plain file name (letters, digits, - _ . kept)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or fallback


def spec_file(run_dir: Path) -> Path:
    """The spec a run executes: the resolved copy when there is one."""
    resolved = Path(run_dir) / "spec.resolved.yaml"
    return resolved if resolved.is_file() else Path(run_dir) / "spec.yaml"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read_state(run_dir: Path) -> dict:
    """Read a run's ``state.json`` (status, timestamps, error).

    Args:
        run_dir: the run directory.

    Returns:
        The state record.

    Raises:
        UserError: the folder has no readable ``state.json`` (not a run directory).
    """
    try:
        return json.loads((Path(run_dir) / "state.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{run_dir}: not a run directory (no readable state.json)") from None


def write_state(run_dir: Path, state: dict) -> None:
    """Write a run's ``state.json`` atomically.

    Args:
        run_dir: the run directory.
        state: the whole state record.
    """
    atomic.write_json(Path(run_dir) / "state.json", state)


def update_state(run_dir: Path, **changes) -> dict:
    """Change some fields of a run's state and write it back.

    Args:
        run_dir: the run directory.
        changes: the fields to set.

    Returns:
        The updated state record.

    Raises:
        UserError: the run has no readable state.
    """
    state = read_state(run_dir)
    state.update(changes)
    write_state(run_dir, state)
    return state


def mark(run_dir: Path, status: str, **extra) -> dict:
    """Set a run's status and stamp when it started or finished.

    Args:
        run_dir: the run directory.
        status: one of ``STATUSES``.
        extra: more state fields to set (``started``/``finished`` default to now).

    Returns:
        The updated state record.
    """
    assert status in STATUSES
    stamp = {"running": "started", "done": "finished", "failed": "finished", "interrupted": "finished"}.get(status)
    if stamp:
        extra.setdefault(stamp, _now())
    return update_state(run_dir, status=status, **extra)


def load_metrics(run_dir: Path) -> RunMetrics:
    """The run's ``metrics.json`` through its model (`RunMetrics`); an empty one without the file.

    Args:
        run_dir: the run directory.

    Returns:
        The metrics.

    Raises:
        ConfigError: (a UserError) the file is not JSON or does not fit the model; the message names the file and key path.
    """
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return RunMetrics(rounds=[])
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})", file=str(path)) from None
    return validate_config(RunMetrics, data, where=str(path))


def read_metrics(run_dir: Path) -> dict:
    """The run's ``metrics.json`` as a dict, read through `RunMetrics` (see `load_metrics`)."""
    return load_metrics(run_dir).to_json_dict()


def write_metrics(run_dir: Path, metrics: dict | RunMetrics) -> None:
    """Write ``metrics.json`` through `RunMetrics` (a value of the wrong type fails here, not in a later reader)."""
    atomic.write_json(Path(run_dir) / "metrics.json", RunMetrics.of(metrics).to_json_dict())


def fedbiomed_dir(run_dir: Path) -> Path:
    """Where Fed-BioMed keeps its files for a run (its experimentation folder).

    Args:
        run_dir: the run directory.

    Returns:
        ``<run_dir>/fedbiomed`` (it may not exist yet, or ever, for a run of the old layout).
    """
    return Path(run_dir) / FEDBIOMED_FOLDER


def latest_breakpoint(run_dir: Path) -> Path | None:
    """The newest complete Fed-BioMed breakpoint of a run, in either layout.

    Breakpoints are in ``<run>/fedbiomed/``, or at the top of runs made before that folder
    existed. Fed-BioMed creates the folder first and writes its state JSON last, not
    atomically: a stop while it saves leaves a folder that cannot be loaded, so such folders
    are skipped.

    Args:
        run_dir: the run directory.

    Returns:
        The breakpoint folder (``.../breakpoint_NNNN``), or None if the run has none. Its
        parent is Fed-BioMed's experimentation folder, whose parent its experiments dir.
    """
    found = [p for base in (fedbiomed_dir(run_dir), Path(run_dir)) for p in base.glob("breakpoint_*")
             if re.fullmatch(r"breakpoint_\d+", p.name) and p.is_dir()]  # fmt: skip
    found.sort(key=lambda p: int(p.name.split("_")[1]))
    for folder in reversed(found):
        try:
            state = json.loads((folder / f"{folder.name}.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and "round_current" in state:
            return folder
    return None


def find_run(home: Path, run: str) -> Path:
    """A run by directory path, full id, or unique id prefix."""
    p = Path(run)
    if (p / "state.json").is_file():
        return p
    base = runs_dir(home)
    if (base / run / "state.json").is_file():
        return base / run
    matches = [d for d in base.glob(f"{run}*") if (d / "state.json").is_file()] if base.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise UserError(f"no run {run!r} in {base}")
    raise UserError(f"run {run!r} is ambiguous: {', '.join(m.name for m in matches)}")


def list_runs(home: Path) -> list[dict]:
    """Summaries of a home's runs, oldest first (folders without a state are skipped).

    Args:
        home: the coordinator home.

    Returns:
        One `summary` per run directory.
    """
    base = runs_dir(home)
    out = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if (d / "state.json").is_file():
            out.append(summary(d))
    return out


def summary(run_dir: Path) -> dict:
    """A run's state with its progress: rounds done and planned, its folder, its last round.

    Args:
        run_dir: the run directory.

    Returns:
        The state record (as `shown_state` shows it) plus ``rounds_done``, ``rounds_planned``, ``run_dir`` and ``last_round``.

    Raises:
        UserError: the run has no readable state.
    """
    state = shown_state(read_state(run_dir))
    metrics = read_metrics(run_dir)
    rounds = metrics.get("rounds", [])
    return {
        **state,
        "rounds_done": len(rounds),
        "rounds_planned": metrics.get("rounds_planned"),
        "run_dir": str(Path(run_dir).resolve()),
        "last_round": rounds[-1] if rounds else None,
    }


_PID_START_SLACK_S = 5.0  # a run's process starts before the run; stamps have one-second resolution


def _started_epoch(state: dict) -> float | None:
    """When the run last started (its ``started`` stamp), in seconds since the epoch; None if unknown."""
    try:
        return datetime.strptime(str(state.get("started")), "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except ValueError:
        return None


def run_process_alive(state: dict, own_pid_alive: bool = True) -> bool:
    """Whether the process recorded in a ``running`` run's state still runs it.

    The recorded ``pid`` must exist, not be a zombie, and have started no later than the run
    (its ``started`` stamp, with a few seconds of slack): a process started after the run is
    another one that was given the same pid.

    Args:
        state: the run's state record (``pid``, ``started``).
        own_pid_alive: what to answer when the pid is this process's own (False at the start of
            `coordinator serve`, before it runs anything: a previous process had that pid).

    Returns:
        True while the run's process is alive (also when it cannot be inspected).
    """
    try:
        pid = int(state.get("pid") or 0)
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    if pid == os.getpid() and not own_pid_alive:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # access denied: assume it is the run's process
        return True
    started = _started_epoch(state)
    return started is None or created <= started + _PID_START_SLACK_S


def shown_state(state: dict) -> dict:
    """A state as read-only commands show it: a ``running`` run whose process is gone is ``interrupted``.

    Nothing is written (the file belongs to the process running the run, or to the next
    `coordinator serve`, which records the change).

    Args:
        state: the run's state record.

    Returns:
        The record, or a copy with ``status: interrupted``, ``process_gone: true`` and an error saying why.
    """
    if state.get("status") != "running" or run_process_alive(state):
        return state
    return {**state, "status": "interrupted", "process_gone": True,
            "error": f"the coordinator process running it (pid {state.get('pid')}) is gone"}  # fmt: skip


def recover_stale(home: Path) -> list[str]:
    """Record runs left ``running`` by a process that died as ``interrupted`` (resumable).

    Called by the processes that run runs (`coordinator serve` at start, `coordinator resume`),
    never by read-only commands (they show such runs as interrupted: `shown_state`). A run
    recorded with this process's own pid is stale too (a previous process had the pid).

    Args:
        home: the coordinator home.

    Returns:
        The ids of the runs marked interrupted.
    """
    stale = []
    base = runs_dir(home)
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if not (d / "state.json").is_file():
            continue
        try:
            state = read_state(d)
        except UserError:
            continue
        if state.get("status") == "running" and not run_process_alive(state, own_pid_alive=False):
            mark(d, "interrupted", error="the coordinator stopped during the run")
            stale.append(state.get("run_id", d.name))
    return stale


# -- run.log ---------------------------------------------------------------------------------

OWN_PREFIX = "[fedimg]"  # what the coordinator itself logs into run.log
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
# A site's log line as Fed-BioMed's researcher relays it (Requests._log_message): the site's
# level, node id and message, bold-faced and spread over lines with tabs, then a dashed rule.
_RELAYED = re.compile(r"^\s*(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*\n\s*NODE\s+(\S+)\s*\n\s*MESSAGE:\s?(.*?)\s*(?:-{13,})?\s*$", re.S)
_KEPT_LEVELS = ("WARNING", "ERROR", "CRITICAL")
# Fed-BioMed INFO lines worth keeping: a few per round, saying who took part and what was saved.
_KEPT_INFO = ("Sampled nodes in round", "Nodes that successfully reply in round", "breakpoint number",
              "Training plan has been approved by the node",
              # a site's answer to a round that ended without it (deadline, lost connection): dropped by Fed-BioMed
              "Received late reply", "Received a reply from a stopped request")  # fmt: skip


def plain_text(text: str) -> str:
    """``text`` without ANSI escape sequences (colours, bold)."""
    return _ANSI.sub("", text)


def _run_log_line(record: logging.LogRecord, keep_info: bool) -> str | None:
    """The run.log text of a log record, or None to leave it out."""
    msg = plain_text(record.getMessage())
    if msg.startswith(OWN_PREFIX):
        return msg
    relayed = _RELAYED.match(msg)
    if relayed:
        level, node, text = relayed.groups()
        if level not in _KEPT_LEVELS and not keep_info:
            return None
        return f"site {node}: {level}: " + "\n    ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    if record.levelno < logging.WARNING and not keep_info and not msg.startswith(_KEPT_INFO):
        return None  # Fed-BioMed's per-iteration progress and request chatter
    lines = [line.strip() for line in msg.splitlines() if line.strip(" \t-")]
    return " ".join(lines)


class RunLogFilter(logging.Filter):
    """What run.log keeps: the coordinator's own lines ("[fedimg] ..."), and the warnings and
    errors of Fed-BioMed and of the sites. Fed-BioMed's INFO records (each site's per-iteration
    progress relayed to the researcher, request bookkeeping: thousands of lines for a tiny
    run) are left out unless ``keep_info`` (env FEDIMG_RUN_LOG=all), and a Fed-BioMed line
    repeated within ``repeat_s`` seconds (its approval poll warns every second per site) is
    written once."""

    def __init__(self, keep_info: bool = False, repeat_s: float = 60.0):
        super().__init__()
        self.keep_info = keep_info
        self.repeat_s = repeat_s
        self._last_written: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep a record for ``run.log``, or drop it (Fed-BioMed noise, repeats within ``repeat_s``).

        Args:
            record: the log record.

        Returns:
            True to write it.
        """
        line = _run_log_line(record, self.keep_info)
        if line is None:
            return False
        if line.startswith(OWN_PREFIX):
            return True
        last = self._last_written.get(line)
        if last is not None and record.created - last < self.repeat_s:
            return False
        if len(self._last_written) > 1000:  # bounded memory over a long run
            self._last_written.clear()
        self._last_written[line] = record.created
        return True


class RunLogFormatter(logging.Formatter):
    """Plain text: time, level, the record's message without colour codes, one line per
    record (continuation lines of a site's message indented)."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Format a record as one plain line (a logged traceback follows it as plain text).

        Args:
            record: the log record.

        Returns:
            The text written to ``run.log``.
        """
        line = _run_log_line(record, True)
        fields = {**record.__dict__, "msg": line if line is not None else "", "args": None, "exc_info": None, "exc_text": None}
        if line is not None and line.startswith(OWN_PREFIX) and record.levelno == logging.WARNING:
            # The engine logs its own lines at WARNING only to pass Fed-BioMed's console level.
            fields["levelname"] = "INFO"
        copy = logging.makeLogRecord(fields)
        text = super().format(copy)
        if record.exc_info:  # a traceback logged with the record: kept, as plain text
            text += "\n" + plain_text(self.formatException(record.exc_info))
        return text


def run_log_handler(run_dir: Path) -> logging.Handler:
    """The handler that appends to ``<run_dir>/run.log`` (plain text, filtered as RunLogFilter)."""
    keep_info = os.environ.get("FEDIMG_RUN_LOG", "").lower() == "all"
    handler = logging.FileHandler(Path(run_dir) / "run.log", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.addFilter(RunLogFilter(keep_info))
    handler.setFormatter(RunLogFormatter())
    return handler
