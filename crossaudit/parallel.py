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

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def side_by_side(jobs: list[Callable[[], T]]) -> list[T]:
    """Every job's result, in order; the jobs run at the same time, the threads split between them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // len(jobs)))
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            futures = [pool.submit(job) for job in jobs]
            return [future.result() for future in futures]
    finally:
        torch.set_num_threads(threads)
