"""A local MLflow tracking server (SQLite, loopback, free port): the embedded default.

`make demo` and the tests use the real server, not a file store, so the registry, tags,
aliases, webhooks and artifact uploads go through the same REST API a team's server exposes.

Webhook settings (see README, "Automation"): MLflow only delivers to public `https` URLs
unless told otherwise, so this loopback server allows `http` and private addresses; it
keeps webhook secrets encrypted under a key stored beside its database (without one, MLflow
makes a new key per process and cannot read its secrets after a restart); and it caches
the webhook list for 1 s instead of 60 s, so a webhook installed just now sees the next
registration.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from crossaudit.errors import AuditError

STARTUP_SECONDS = 90


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def webhook_settings(root: Path) -> dict[str, str]:
    """The environment a loopback MLflow server needs to deliver webhooks to a local receiver."""
    key_file = root / "webhook-secret-encryption.key"
    if not key_file.exists():
        key_file.write_bytes(base64.urlsafe_b64encode(secrets.token_bytes(32)))
        key_file.chmod(0o600)
    return {
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key_file.read_text(),
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",
    }


@contextmanager
def local_server(root: Path, port: int | None = None) -> Iterator[str]:
    """Run `mlflow server` on loopback with its store under `root`; yields its URL."""
    root.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "mlflow-server.log").open("ab")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{(root / 'mlflow.db').resolve()}",
            "--artifacts-destination", str((root / "mlartifacts").resolve()),
        ],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **webhook_settings(root)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AuditError(f"MLflow server did not start on {url}; see {root / 'mlflow-server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
