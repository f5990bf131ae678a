"""`crossaudit serve` as a child process on loopback: the embedded receiver of `make demo`
and of the tests.

It runs in its own process group, so stopping it (or killing it, as a node failure would)
takes the audits it started with it; its queue file outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from crossaudit.dev.tracking_server import free_port
from crossaudit.errors import AuditError
from crossaudit.mlops.event_queue import ENDED
from crossaudit.mlops.receiver import ADMIN_TOKEN_ENV, Receiver
from crossaudit.mlops.webhook import SECRET_ENV

STARTUP_SECONDS = 60
T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, every_s: float = 0.5) -> T:
    """Poll `condition` until it returns something truthy; `AuditError` naming `what` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AuditError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children first found, then theirs)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


@contextmanager
def served_in_thread(receiver: Receiver) -> Iterator[str]:
    """`receiver` served by uvicorn on a free loopback port in a thread of this process (for
    measuring or fuzzing the receiver itself); yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(receiver.app(), host="127.0.0.1", port=free_port(), log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, STARTUP_SECONDS, "the in-process receiver")
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class ReceiverProcess:
    def __init__(self, tracking_uri: str, secret: str, queue: Path, log: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.admin_token = secrets.token_urlsafe(24)
        token_file = queue.with_name(f"{queue.name}.admin-token")
        token_file.write_text(self.admin_token)
        command = [
            sys.executable, "-m", "crossaudit", "serve", "--tracking-uri", tracking_uri, "--queue", str(queue),
            "--port", str(self.port), *options,
        ]  # fmt: skip
        environment = {**os.environ, SECRET_ENV: secret, ADMIN_TOKEN_ENV: str(token_file)}
        with log.open("ab") as sink:
            self.process = subprocess.Popen(
                command, stdout=sink, stderr=subprocess.STDOUT, env=environment, start_new_session=True
            )
        wait_for(self._healthy, STARTUP_SECONDS, f"the receiver on {self.url} (see {log})")

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AuditError(f"receiver exited {self.process.returncode}; see {self.log}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def jobs(self) -> list[dict]:
        """Every job in the receiver's queue, as its `GET /jobs` lists them."""
        request = urllib.request.Request(f"{self.url}/jobs", headers={"Authorization": f"Bearer {self.admin_token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def busy(self) -> bool:
        """Whether any job is queued or running: a version's status tag is written before
        its gate moves the alias, so only an idle receiver has finished with the registry."""
        return any(job["state"] not in ENDED for job in self.jobs())

    def finished_audits(self, name: str) -> list[dict]:
        """The registered model's audit jobs once every one has ended (else empty): what to
        wait for before counting how many audits a model's registrations set off."""
        audits = [job for job in self.jobs() if job["kind"] == "audit" and job["name"] == name]
        return [] if any(job["state"] not in ENDED for job in audits) else audits

    def kill(self) -> None:
        """SIGKILL to the receiver and every process under it (its audits run in their own
        process groups): no shutdown code runs, as when a node or container dies."""
        doomed = _descendants(self.process.pid)
        os.killpg(self.process.pid, signal.SIGKILL)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
