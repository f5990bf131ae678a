"""Webhook-to-pipeline-start latency of `crossaudit serve` (target: <= 2 s).

A real MLflow server and a real receiver on loopback, the webhook installed as a user
would. Versions of one digits model are registered one at a time, alternating two
providers, so each (after the first) starts an audit pipeline against the other
provider's latest version; the next registration waits until that audit ended, so every
sample sees an idle receiver. Times, all on this machine's clock, from the version's
creation in MLflow (`creation_timestamp`):
- queued: the receiver verified the webhook and committed its job (then it answered);
- launched: a worker claimed the job and started the audit process;
- running: the version's `crossaudit.status` became `running`, which the pipeline runner
  writes just before it starts the pipeline (observed by polling every 50 ms).
Writes docs/webhook_latency.md.
"""

import os
import platform
import secrets
import statistics
import tempfile
import time
from pathlib import Path

from crossaudit import __version__
from crossaudit.dev.receiver_process import ReceiverProcess, wait_for
from crossaudit.dev.tracking_server import local_server
from crossaudit.dev.zoo.datasets import load_dataset
from crossaudit.dev.zoo.train import config_for, export_onnx, train, write_audit_set
from crossaudit.mlops import operator_config, registry
from crossaudit.mlops.webhook import install

REPORT = Path("docs/webhook_latency.md")
SAMPLES = 5
NAME = "latency"


def _job(receiver: ReceiverProcess, version: str) -> dict | None:
    return next((j for j in receiver.jobs() if j["key"] == f"audit:{NAME}/{version}"), None)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.update(operator_config.bootstrap(root / "operator"))
        split = load_dataset("digits")
        write_audit_set("digits", root / "audit.parquet")
        models = {}
        for provider, seed in (("acme", 31), ("globex", 32)):
            models[provider] = root / f"{provider}.onnx"
            trained = train(config_for("digits", arch="cnn", seed=seed), split)
            export_onnx(trained.model, trained.example, models[provider])
        secret = secrets.token_urlsafe(32)
        with local_server(root / "mlflow") as url:
            client = registry.client(url)
            operator_config.onboard(client, ("acme", "globex"))
            receiver = ReceiverProcess(url, secret, root / "queue.db", root / "receiver.log")
            try:
                install(client, f"{receiver.url}/webhook", secret)
                registry.publish_audit_data(client, NAME, root / "audit.parquet")
                rows = []
                for index in range(SAMPLES + 1):
                    provider = ("acme", "globex")[index % 2]
                    ref = registry.register_version(client, NAME, models[provider], provider)
                    created = client.get_model_version(NAME, ref.version).creation_timestamp / 1000
                    status = wait_for(
                        lambda r=ref: registry.status_of(client.get_model_version(r.name, r.version)), 60,
                        f"{ref.uri} to be picked up", every_s=0.05,
                    )  # fmt: skip
                    running_at = time.time()
                    job = wait_for(lambda r=ref: _job(receiver, r.version), 30, f"the job of {ref.uri}")
                    wait_for(lambda r=ref: (_job(receiver, r.version) or {}).get("state") == "done", 600, "the audit")
                    if index == 0:
                        continue  # the first version has no peer: no pipeline to start
                    assert status == "running", f"{ref.uri}: first status seen was {status}"
                    rows.append((job["created_at"] - created, job["started_at"] - created, running_at - created))
            finally:
                receiver.stop()
    medians = [statistics.median(column) for column in zip(*rows, strict=True)]
    worst = [max(column) for column in zip(*rows, strict=True)]
    verdict = "met" if worst[2] <= 2.0 else "NOT met"
    lines = "\n".join(f"| {i + 1} | {q:.3f} | {s:.3f} | {r:.3f} |" for i, (q, s, r) in enumerate(rows))
    REPORT.write_text(f"""# Webhook-to-pipeline-start latency

Command: `make bench` (`python -m benchmarks.webhook_latency`). Measured {time.strftime("%Y-%m-%d")} on
{platform.machine()}, Python {platform.python_version()}, crossaudit {__version__}: a real MLflow server
(SQLite) and `crossaudit serve` on loopback, webhook installed with `crossaudit.mlops.webhook.install`.
{SAMPLES} registrations, each starting one audit pipeline on an idle receiver. Seconds from
the version's creation in MLflow to:

| sample | queued (webhook verified, committed, answered) | audit process launched | status `running` |
|---|---|---|---|
{lines}
| **median** | {medians[0]:.3f} | {medians[1]:.3f} | {medians[2]:.3f} |
| **worst** | {worst[0]:.3f} | {worst[1]:.3f} | {worst[2]:.3f} |

Target: pipeline start within 2 s of the registration, every sample: **{verdict}**.
Between launch and `running` the audit process starts Python and imports MLflow and KFP
(not torch: the CLI imports it only for `crossaudit audit`), then reads the version, its
peers and the audit set's URI from MLflow.
""")
    print(REPORT.read_text())


if __name__ == "__main__":
    main()
