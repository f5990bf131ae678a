"""The receiver's durable queue: SQLite, written before a webhook is acknowledged.

Two tables. `deliveries` remembers every accepted delivery id, so a replayed or
re-delivered webhook finds its id taken and starts nothing. `jobs` holds the work, one row
per *key*: an audit's key is its version (plus what made it due again: a new peer, a
scheduled tick), so the same version is audited once however many events name it. A job
is `queued`, `running`, then `done`, `dropped` (nothing to do: the version is gone) or
`failed` (retries spent). Jobs left `running` by a receiver that died are queued again on
start, so nothing accepted is lost.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    sent_at INTEGER NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    source TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    outcome TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, kind, not_before);
"""
STATES = ("queued", "running", "done", "dropped", "failed")
ENDED = STATES[2:]  # a job in one of these is never run again


class ReplayedDeliveryError(Exception):
    """The delivery id was accepted before."""


@dataclass(frozen=True)
class Job:
    id: int
    key: str
    kind: str
    name: str
    version: str
    source: str
    attempts: int
    created_at: float

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class NewJob:
    """Work to queue: `key` makes it idempotent (the same key is queued once, ever)."""

    key: str
    kind: str
    name: str
    version: str
    source: str
    not_before: float = 0.0  # seconds since the epoch before which the job is not run


class EventQueue:
    """One SQLite file, one connection guarded by a lock (the receiver's threads share it);
    WAL with full sync, so a committed row survives a killed process."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def accept(self, delivery_id: str, event: str, sent_at: int, jobs: list[NewJob]) -> int:
        """Record a delivery and its jobs in one transaction. Raises `ReplayedDeliveryError` for
        an id seen before; returns how many jobs were new (an already-queued key is not)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO deliveries (delivery_id, event, sent_at, received_at) VALUES (?, ?, ?, ?)",
                    (delivery_id, event, sent_at, time.time()),
                )
            except sqlite3.IntegrityError as exc:
                self._db.execute("ROLLBACK")
                raise ReplayedDeliveryError(delivery_id) from exc
            added = self._insert(jobs)
            self._db.execute("COMMIT")
        return added

    def enqueue(self, jobs: list[NewJob]) -> int:
        """Queue jobs that no delivery carried (reconciliation, schedule, peers)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            added = self._insert(jobs)
            self._db.execute("COMMIT")
        return added

    def _insert(self, jobs: list[NewJob]) -> int:
        added = 0
        for job in jobs:
            cursor = self._db.execute(
                "INSERT OR IGNORE INTO jobs (key, kind, name, version, source, not_before, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.key, job.kind, job.name, job.version, job.source, job.not_before, time.time()),
            )
            added += cursor.rowcount
        return added

    def forget_deliveries(self, older_than: float) -> None:
        """Drop delivery ids too old to matter: their timestamps would be rejected as stale."""
        with self._lock:
            self._db.execute("DELETE FROM deliveries WHERE sent_at < ?", (older_than,))

    def recover(self) -> int:
        """Queue again the jobs a dead receiver left running; returns how many."""
        with self._lock:
            return self._db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount

    def claim(self, kinds: tuple[str, ...]) -> Job | None:
        """The oldest due queued job of these kinds, now marked running (or None)."""
        marks = ",".join("?" * len(kinds))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute(
                f"SELECT id, key, kind, name, version, source, attempts, created_at FROM jobs "
                f"WHERE state = 'queued' AND kind IN ({marks}) AND not_before <= ? ORDER BY id LIMIT 1",
                (*kinds, time.time()),
            ).fetchone()
            if row is None:
                self._db.execute("COMMIT")
                return None
            self._db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, started_at = ? WHERE id = ?",
                (time.time(), row[0]),
            )
            self._db.execute("COMMIT")
        job = Job(*row)
        return Job(job.id, job.key, job.kind, job.name, job.version, job.source, job.attempts + 1, job.created_at)

    def finish(self, job: Job, state: str, outcome: str) -> None:
        if state not in ENDED:
            raise ValueError(f"a job finishes done, dropped or failed, not {state!r}")
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, outcome = ?, finished_at = ? WHERE id = ?",
                (state, outcome[:2000], time.time(), job.id),
            )

    def retry(self, job: Job, delay_s: float, outcome: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = 'queued', not_before = ?, outcome = ? WHERE id = ?",
                (time.time() + delay_s, outcome[:2000], job.id),
            )

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | dict(rows)

    def jobs(self) -> list[dict[str, object]]:
        """Every job, oldest first (for `/jobs`, the tests and the latency report)."""
        with self._lock:
            cursor = self._db.execute(
                "SELECT id, key, kind, name, version, source, state, attempts, created_at, started_at, "
                "finished_at, outcome FROM jobs ORDER BY id"
            )
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
