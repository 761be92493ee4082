"""Run one function over many items in worker processes, results in the items' order.

`ordered_map` is what ``--jobs N`` of `site-agent prepare` and the QC report run on: at most
``2 * jobs`` items are in flight (memory stays bounded on thousands of cases), results come
back in input order (case ids and outputs are the same as a serial run's), and a worker
process that dies (a decoder crash, the kernel's OOM killer) costs only the items it held:
each in-flight item is tried once more on its own, and an item that kills its worker again
gets ``on_crash(item)`` as its result. Workers are forked from a fresh server process, never
from the caller: the caller may run threads (progress display, compression) that a fork would
copy mid-operation.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

__all__ = ["ordered_map"]

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], jobs: int, on_crash: Callable[[T], R]) -> Iterator[R]:
    """``fn(item)`` for every item, in order; in ``jobs`` worker processes when ``jobs > 1``, else here.

    Args:
        fn: a module-level function (workers import it by name); its exceptions are its own to
            turn into results: one raised here ends the iteration.
        items: the inputs (picklable).
        jobs: worker processes (1: no workers, plain calls in this process).
        on_crash: the result of an item whose worker process died twice.

    Yields:
        The results, in the order of ``items``.
    """
    if jobs <= 1:
        for item in items:
            yield fn(item)
        return
    context = _worker_context(fn)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context)
    pending: collections.deque[tuple[T, Future[R] | None]] = collections.deque()  # None: the pool broke as it was submitted
    source = iter(items)
    try:
        while True:
            for item in itertools.islice(source, 2 * jobs - len(pending)):
                try:
                    pending.append((item, pool.submit(fn, item)))
                except BrokenProcessPool:  # a worker died meanwhile: this item is retried with the others below
                    pending.append((item, None))
            if not pending:
                return
            item, future = pending.popleft()
            try:
                if future is None:
                    raise BrokenProcessPool("the pool broke before this item was submitted")
                result = future.result()
            except BrokenProcessPool:
                # a worker died: every in-flight item failed with it; retry each alone, then go on with a new pool
                pool.shutdown(wait=False, cancel_futures=True)
                retry = [(item, None), *pending]
                pending.clear()
                yield _alone(fn, item, context, on_crash)
                for other, done in retry[1:]:  # in order: those that finished before the break keep their result
                    finished = done is not None and done.done() and not done.cancelled() and done.exception() is None
                    yield done.result() if finished and done is not None else _alone(fn, other, context, on_crash)
                pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context)
                continue
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_context(fn: Callable[..., Any]) -> multiprocessing.context.BaseContext:
    """Workers forked from a fresh server process that has imported ``fn``'s module once ("forkserver"): they start
    in milliseconds instead of importing numpy, pydicom, nibabel (and matplotlib for the QC report) each, and the
    server runs no thread a fork could copy mid-operation. Where there is no forkserver (not POSIX): spawned."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([fn.__module__])  # the server imports it once, the workers inherit it
    return context


def _alone(fn: Callable[[T], R], item: T, context: multiprocessing.context.BaseContext, on_crash: Callable[[T], R]) -> R:
    """``fn(item)`` in a worker of its own; ``on_crash(item)`` when that worker dies too."""
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            return pool.submit(fn, item).result()
        except BrokenProcessPool:
            log.debug("a worker process died twice on the same item")
            return on_crash(item)
