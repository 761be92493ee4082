"""Progress of long commands where no bar can be drawn (a log file, a pipe, a service's journal):
plain lines, the first and last step of each stage and at most one every few seconds between."""

from __future__ import annotations

import time
from typing import Callable

PROGRESS_EVERY_S = 10.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressLines:
    """Progress as plain lines: ``"converting cases: 12/40 cases, 31 s, about 1 min 13 s left"``.

    Each stage (its label) says its first report, then at most one line every ``every_s`` seconds,
    then its last step (``done == total``) with the time since its first report. The time left
    is extrapolated from the pace of the steps done since the first report. A stage reported
    again after its last step (its count lower) starts afresh.

    Args:
        say: where a line goes (e.g. a logger's ``info``).
        unit: what is counted (``"cases"``); empty for bare numbers.
        every_s: the least time between two lines of one stage, except its last.
        clock: monotonic seconds (default ``time.monotonic``; tests pass their own).
    """

    def __init__(self, say: Callable[[str], None], unit: str = "cases", every_s: float = PROGRESS_EVERY_S,
                 clock: Callable[[], float] | None = None) -> None:  # fmt: skip
        self.say, self.unit, self.every_s = say, unit, every_s
        self.clock = clock or time.monotonic
        self._started: dict[str, tuple[float, int]] = {}  # label -> (time, steps done) of its first report
        self._last: dict[str, float] = {}
        self._finished: set[str] = set()

    def __call__(self, label: str, done: int, total: int | None, detail: str = "") -> None:
        """Report that ``done`` of ``total`` steps of stage ``label`` are done.

        Args:
            label: the stage, as the user reads it (``"converting cases"``).
            done: steps done so far.
            total: all steps of the stage; None when not known yet.
            detail: a short note after the count (the current input's name).
        """
        now = self.clock()
        if label in self._finished:
            if total is None or done >= total:  # its last step was said (a caller may repeat it)
                return
            self._finished.discard(label)  # the stage starts again (a second pass, a next model)
            self._started.pop(label, None)
            self._last.pop(label, None)
        started, done_at_start = self._started.setdefault(label, (now, done))
        last = self._last.get(label)
        finished = total is not None and done >= total
        if last is not None and not finished and now - last < self.every_s:
            return
        self._last[label] = now
        line = f"{label}: {done}/{total}" if total is not None else f"{label}: {done}"
        if self.unit:
            line += f" {self.unit}"
        elapsed = now - started  # since the first report: the pace of the steps done after it
        if finished:
            self._finished.add(label)
            if elapsed > 0:
                line += f", {_duration(elapsed)}"
        elif total is not None and done > done_at_start and elapsed > 0:
            line += f", {_duration(elapsed)}, about {_duration(elapsed / (done - done_at_start) * (total - done))} left"
        if detail:
            line += f" ({detail})"
        self.say(line)
