"""Independent torch jobs side by side, each on its share of torch's threads.

Why: a small model's optimisation step cannot keep two cores busy (one torch thread ran an
audit nearly as fast as two), so two independent jobs finish sooner side by side, one
thread each, than one after the other with both threads. The audit runs its two
directions' trigger searches this way (`inversion`), and Neural Cleanse its classes
(`baselines.neural_cleanse`), so that the detection benchmark's wall times for both
detectors come from the same use of the cores. Jobs of unequal size leave a core idle
once the smaller is done, which is why that benchmark reports CPU seconds too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
U = TypeVar("U")


@contextmanager
def _workers(count: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of `count` workers, torch's threads split between them while it lasts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // count))
    try:
        with ThreadPoolExecutor(count) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def side_by_side(jobs: list[Callable[[], T]]) -> list[T]:
    """Every job's result, in order; the jobs run at the same time, the threads split between them."""
    with _workers(len(jobs)) as pool:
        futures = [pool.submit(job) for job in jobs]
        return [future.result() for future in futures]


def pipelined(first: list[Callable[[], T]], then: Callable[[int, T], list[Callable[[], U]]]) -> list[list[U]]:
    """The results of each first job's follow-ups (`then(index, its result)`), in order.

    Why: side by side, jobs of unequal size leave a core idle (a ResNet's fine-tuning
    beside a small CNN's). Here every job shares one pool of `len(first)` workers, and a
    first job's follow-ups are queued as soon as it is done, so the worker a short job
    frees takes up the long one's follow-ups. Each job is computed as it would be alone.
    """
    with _workers(len(first)) as pool:
        started = {pool.submit(job): index for index, job in enumerate(first)}
        followed: list[list[Future[U]]] = [[] for _ in first]
        for done in as_completed(started):
            index = started[done]
            followed[index] = [pool.submit(job) for job in then(index, done.result())]
        return [[future.result() for future in futures] for futures in followed]
