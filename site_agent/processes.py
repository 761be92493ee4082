"""Process helpers the site agent and its testbeds share: is a pid alive, signal a process group,
and tie a child to its parent's life (Linux)."""

from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path
from typing import Callable


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (a zombie child of ours is reaped).

    Args:
        pid: a process id.

    Returns:
        True when it runs (or exists but is not ours to signal).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return True


def parent_death_signal(parent_pid: int, sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn asking Linux to send `sig` to the child when its parent dies.

    Args:
        parent_pid: the parent's pid (a child whose parent is already gone signals itself).
        sig: the signal to receive.

    Returns:
        The function to pass as ``preexec_fn``.
    """

    def _set() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return _set


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group `pid` leads (our children start their own session), else the process.

    Args:
        pid: the process (a gone or foreign process is ignored).
        sig: the signal.
    """
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
