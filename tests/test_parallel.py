import threading
import time

from crossaudit.method.parallel import pipelined


def test_pipelined_hands_a_short_jobs_follow_ups_to_the_worker_it_frees():
    """While the long first job runs, the short one's follow-ups run on the other worker;
    every result comes back in its job's place."""
    long_done = threading.Event()
    overlapped = []

    def first(index: int) -> int:
        if index == 0:
            time.sleep(0.3)
            long_done.set()
        return index * 10

    def then(index: int, result: int) -> list:
        def follow(k: int) -> tuple[int, int]:
            if index == 1:
                overlapped.append(not long_done.is_set())
            return result, k

        return [lambda k=k: follow(k) for k in range(3)]

    results = pipelined([lambda: first(0), lambda: first(1)], then)
    assert results == [[(0, 0), (0, 1), (0, 2)], [(10, 0), (10, 1), (10, 2)]]
    assert overlapped and all(overlapped)
