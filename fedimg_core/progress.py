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

    Each stage (its label) says its first step, then at most one line every ``every_s`` seconds,
    then its last step (``done == total``) with the time it took. The time left is extrapolated
    from the stage's pace so far.

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
        self._started: dict[str, float] = {}
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
        if label in self._finished:  # its last step was said (a caller may repeat it)
            return
        now = self.clock()
        started = self._started.setdefault(label, now)
        last = self._last.get(label)
        finished = total is not None and done >= total
        if last is not None and not finished and now - last < self.every_s:
            return
        self._last[label] = now
        line = f"{label}: {done}/{total}" if total is not None else f"{label}: {done}"
        if self.unit:
            line += f" {self.unit}"
        elapsed = now - started
        if finished:
            self._finished.add(label)
            if elapsed > 0:
                line += f", {_duration(elapsed)}"
        elif total is not None and done > 0 and elapsed > 0:
            line += f", {_duration(elapsed)}, about {_duration(elapsed / done * (total - done))} left"
        if detail:
            line += f" ({detail})"
        self.say(line)
