"""A site node gives the memory a finished task freed back to the system.

A training round allocates hundreds of MB (volumes, activations, optimizer state) in many
small and medium blocks; when the task ends Python and torch free them, but glibc keeps the
freed pages in its heaps, so an idle node between rounds still holds what its last task
used (measured: 569 MB after start-up, 994 MB after a 2-round run). `start_trimmer` runs
``malloc_trim(0)`` on a daemon thread after every 10 s in which the node used less than a
tenth of a core (no task running): glibc returns every free page, also those in the middle of
its heaps. It costs a few milliseconds per call and never frees memory in use; during a task
it does nothing (the task would only fault the pages back in). On a C library without
``malloc_trim`` (musl, macOS) it does nothing at all.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from typing import Any

__all__ = ["TRIM_INTERVAL_S", "Trimmer", "start_trimmer", "trim"]

log = logging.getLogger(__name__)
TRIM_INTERVAL_S = 10.0
IDLE_CPU_SHARE = 0.1  # a node that used less than this share of one core over an interval runs no task: trim then


def _malloc_trim() -> Any | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim() -> bool:
    """Return the C heap's free pages to the system now.

    Returns:
        Whether glibc released any memory (False also where there is no ``malloc_trim``).
    """
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


class Trimmer(threading.Thread):
    """A daemon thread that trims the C heap every ``interval_s`` seconds until `stop`.

    Args:
        interval_s: seconds between two trims.
        malloc_trim: glibc's ``malloc_trim``.
    """

    def __init__(self, interval_s: float, malloc_trim: Any) -> None:
        super().__init__(name="fedimg-malloc-trim", daemon=True)
        self.interval_s = interval_s
        self._malloc_trim = malloc_trim
        self._stop_event = threading.Event()

    def run(self) -> None:
        """Trim after every quiet interval until stopped: never during a task, whose pages would only come back."""
        last = time.process_time()  # CPU seconds of every thread of the process
        while not self._stop_event.wait(self.interval_s):
            now = time.process_time()
            if (now - last) / self.interval_s < IDLE_CPU_SHARE:
                self._malloc_trim(0)
            last = now

    def stop(self) -> None:
        """End the thread after its current wait."""
        self._stop_event.set()


def start_trimmer(interval_s: float = TRIM_INTERVAL_S) -> Trimmer | None:
    """Trim the C heap every ``interval_s`` seconds on a daemon thread, for the life of the process (or until stopped).

    Args:
        interval_s: seconds between two trims.

    Returns:
        The running thread, or None where the C library has no ``malloc_trim``.
    """
    fn = _malloc_trim()
    if fn is None:
        log.debug("no malloc_trim in this C library: freed memory stays in the process's heap")
        return None
    thread = Trimmer(interval_s, fn)
    thread.start()
    return thread
