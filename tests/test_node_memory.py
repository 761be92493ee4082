"""Issue 27, part 3: a node gives back the memory a finished task freed (`site_agent.node_memory`).

glibc keeps freed medium-sized blocks in its heap; the probe frees 190 MB of them behind a
block still in use (so the heap's top cannot shrink) and checks the process's resident set
before and after a trim. benchmarks/node_memory.py measures real nodes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from site_agent.node_memory import Trimmer, start_trimmer

PROBE = textwrap.dedent(
    """
    import psutil, sys
    from site_agent.node_memory import trim
    proc = psutil.Process()
    blocks = [bytearray(64 * 1024) for _ in range(3000)]  # below glibc's mmap threshold: heap blocks
    pinned = bytearray(1024)  # allocated after them: the heap's top stays in use
    for block in blocks:
        block[::4096] = bytes(len(block[::4096]))  # touch every page
    del blocks
    freed = proc.memory_info().rss
    released = trim()
    print(freed, proc.memory_info().rss, released)
    """
)


def test_a_trim_returns_freed_heap_pages_to_the_system():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True).stdout.split()
    freed, trimmed, released = int(out[0]), int(out[1]), out[2] == "True"
    assert released and freed - trimmed > 150 * 2**20  # the 190 MB the process had freed but glibc kept


def test_the_trimmer_trims_only_while_the_process_is_idle():
    calls = []
    thread = Trimmer(0.05, calls.append)
    thread.start()
    time.sleep(0.3)  # idle: a trim after each quiet interval
    idle_calls = len(calls)
    busy_until = time.monotonic() + 0.4
    while time.monotonic() < busy_until:  # a task: this process uses a whole core
        sum(range(1000))
    during = len(calls) - idle_calls
    thread.stop()
    thread.join(timeout=5)
    assert idle_calls >= 3 and during <= 1 and not thread.is_alive()  # at most the interval the task began in


def test_the_node_starts_a_daemon_trimmer():
    thread = start_trimmer(interval_s=60)
    assert thread is not None and thread.daemon and thread.is_alive()
    thread.stop()
    thread.join(timeout=5)
