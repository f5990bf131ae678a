"""A bounded burst of webhook deliveries against a real receiver on loopback.

1000 deliveries from 16 concurrent senders: genuine registrations, re-deliveries of the
same registrations under new ids, replays of already-sent ids, forged signatures and stale
timestamps, shuffled together. The receiver is the real one (HTTP, signature check, SQLite
queue, worker pool, reconciler against a real MLflow server) except that its audit is
`StubbedAuditReceiver.audit`, a fast real function that counts the versions it is asked to
audit: this burst measures the receiver, not the audit, and is the only place a stub runs.

`python -m benchmarks.webhook_load` writes docs/webhook_load.md; `tests/test_receiver_load.py`
runs the same burst and asserts that every genuine registration is audited exactly once.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests

from crossaudit.dev.receiver_process import served_in_thread, wait_for
from crossaudit.dev.tracking_server import local_server
from crossaudit.mlops import operator_config
from crossaudit.mlops.event_queue import Job
from crossaudit.mlops.receiver import Receiver, ReceiverConfig
from crossaudit.mlops.webhook import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

REPORT = Path("docs/webhook_load.md")
SECRET = "load-test-secret-0123456789"
MIX = {"genuine": 600, "redelivered": 150, "replayed": 100, "forged": 100, "stale": 50}
REPEATS = ("redelivered", "replayed")  # deliveries of a version some genuine delivery registered


class StubbedAuditReceiver(Receiver):
    """The real receiver with its audit replaced by a counter: for this load test only."""

    def __init__(self, config: ReceiverConfig) -> None:
        super().__init__(config)
        self.audited: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def audit(self, job: Job) -> tuple[str, str]:
        with self._count_lock:
            self.audited[job.uri] += 1
        return "done", "stubbed audit (load test)"


@dataclass
class Burst:
    answers: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    genuine: set[str] = field(default_factory=set)
    audited: Counter[str] = field(default_factory=Counter)
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    seconds: float = 0.0


def _delivery(name: str, version: int, delivery_id: str, stamp: int, secret: str) -> tuple[bytes, dict[str, str]]:
    data = {"name": name, "version": str(version), "source": "models:/m", "tags": {"provider": "acme"}}
    body = json.dumps({"entity": "model_version", "action": "created", "timestamp": "", "data": data}).encode()
    headers = {
        "Content-Type": "application/json", DELIVERY_ID_HEADER: delivery_id, TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: sign(secret, delivery_id, str(stamp), body),
    }  # fmt: skip
    return body, headers


def _plan(name: str, seed: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """(kind, body, headers) for every delivery of the burst, shuffled; a re-delivery or a
    replay always comes after the delivery it repeats."""
    rng = random.Random(seed)
    now = int(time.time())
    versions = rng.sample(range(1, MIX["genuine"] + 1), MIX["genuine"])
    first = [("genuine", *_delivery(name, v, str(uuid.uuid4()), now, SECRET)) for v in versions]
    later = [("redelivered", *_delivery(name, rng.choice(versions[:300]), str(uuid.uuid4()), now, SECRET))
             for _ in range(MIX["redelivered"])]  # fmt: skip
    later += [("forged", *_delivery(name, 10_000 + i, str(uuid.uuid4()), now, "not-the-secret-at-all"))
              for i in range(MIX["forged"])]  # fmt: skip
    later += [("stale", *_delivery(name, 20_000 + i, str(uuid.uuid4()), now - 3600, SECRET))
              for i in range(MIX["stale"])]  # fmt: skip
    rng.shuffle(later)
    replays = [("replayed", body, headers) for _, body, headers in rng.sample(first[:300], MIX["replayed"])]
    tail = later[150:] + replays
    rng.shuffle(tail)
    return first[:300] + later[:150] + first[300:] + tail


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_burst(tracking_uri: str, root: Path, seed: int = 0) -> Burst:
    """Serve a stubbed-audit receiver in this process and send it the whole burst."""
    name = f"burst-{uuid.uuid4().hex[:6]}"
    receiver = StubbedAuditReceiver(ReceiverConfig(tracking_uri, SECRET, root / "queue.db", workers=2))
    with served_in_thread(receiver) as url:
        burst = Burst(rss_before_mb=_rss_mb())
        plan = _plan(name, seed)
        burst.genuine = {f"models:/{name}/{v}" for v in range(1, MIX["genuine"] + 1)}
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=16))

        # A repeat goes out only once the delivery it repeats has been answered. Senders
        # take deliveries in order, but one can stall while the next fifteen go out, and a
        # re-delivery that overtook its original would be the one queued (the receiver is
        # right either way; the counts below would not say which kind was answered how).
        answered = {version: threading.Event() for version in range(1, MIX["genuine"] + 1)}

        def send(item: tuple[str, bytes, dict[str, str]]) -> tuple[str, str, float]:
            kind, body, headers = item
            version = int(json.loads(body)["data"]["version"])
            if kind in REPEATS:
                answered[version].wait(timeout=60)
            start = time.perf_counter()
            response = session.post(f"{url}/webhook", data=body, headers=headers, timeout=30)
            elapsed = (time.perf_counter() - start) * 1000
            if kind == "genuine":
                answered[version].set()
            ok = response.status_code == 200
            return kind, response.json().get("status", "error") if ok else str(response.status_code), elapsed

        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            for kind, answer, elapsed in pool.map(send, plan):
                burst.answers[f"{kind} -> {answer}"] += 1
                burst.latencies_ms.append(elapsed)
        wait_for(lambda: set(receiver.audited) >= burst.genuine, 120, "every genuine registration's audit")
        burst.seconds = time.perf_counter() - start
        time.sleep(1)  # anything audited twice would show up now
        burst.audited = Counter({uri: n for uri, n in receiver.audited.items() if uri.startswith(f"models:/{name}/")})
        burst.rss_after_mb = _rss_mb()
    return burst


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, local_server(Path(tmp) / "mlflow") as url:
        root = Path(tmp)
        os.environ.update(operator_config.bootstrap(root / "operator"))
        burst = run_burst(url, root)
    answers = "\n".join(f"| {k} | {v} |" for k, v in sorted(burst.answers.items()))
    twice = sum(1 for n in burst.audited.values() if n > 1)
    REPORT.write_text(f"""# Webhook burst against the receiver

Command: `make bench` (`python -m benchmarks.webhook_load`), {time.strftime("%Y-%m-%d")}, {platform.machine()},
Python {platform.python_version()}. {sum(MIX.values())} deliveries ({", ".join(f"{v} {k}" for k, v in MIX.items())}) from
16 concurrent senders to one receiver on loopback (2 audit workers, audits stubbed to a counter,
real MLflow server behind the reconciler).

| delivery -> answer | count |
|---|---|
{answers}

- Genuine registrations audited: {len(burst.audited)} of {len(burst.genuine)}; audited more than once: {twice}.
- Acknowledgement latency: p50 {statistics.median(burst.latencies_ms):.1f} ms, p99 {_percentile(burst.latencies_ms, 0.99):.1f} ms,
  max {max(burst.latencies_ms):.1f} ms (each answer follows a committed, fully synced SQLite write).
- Burst to last audit: {burst.seconds:.1f} s. Peak RSS of the process (receiver and senders): {burst.rss_before_mb:.0f} MB
  before, {burst.rss_after_mb:.0f} MB after.
""")  # noqa: E501
    print(REPORT.read_text())


if __name__ == "__main__":
    main()
