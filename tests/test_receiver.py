"""`crossaudit serve` as a real process, fed by a real MLflow server's webhooks on loopback.

The receiver runs as `python -m crossaudit serve` in its own process group
(`ReceiverProcess`, as in `make demo`), so a test can kill it and the audits it started
the way a node failure would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from crossaudit.dev.receiver_process import ReceiverProcess, wait_for
from crossaudit.dev.tracking_server import local_server
from crossaudit.mlops import operator_config, registry
from crossaudit.mlops.webhook import DELIVERY_ID_HEADER, SECRET_ENV, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

SECRET = "test-secret-0123456789abcdef"


def post(url: str, event: str, data: dict, delivery_id: str | None = None, timestamp: int | None = None,
         secret: str = SECRET) -> requests.Response:  # fmt: skip
    """A delivery exactly as MLflow sends it (signed unless `secret` is wrong)."""
    entity, action = event.rsplit(".", 1)
    body = json.dumps({"entity": entity, "action": action, "timestamp": "2026-11-25T00:00:00Z", "data": data})
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "Content-Type": "application/json", DELIVERY_ID_HEADER: delivery_id, TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(secret, delivery_id, stamp, body.encode()),
    }  # fmt: skip
    return requests.post(f"{url}/webhook", data=body.encode(), headers=headers, timeout=10)


@pytest.fixture(scope="module")
def hooked_mlflow(tmp_path_factory: pytest.TempPathFactory, onboard: Callable[[str], None]) -> Iterator[str]:
    """Its own MLflow server: the receiver reconciles every version it holds."""
    with local_server(tmp_path_factory.mktemp("hooked-mlflow")) as url:
        onboard(url)
        yield url


@pytest.fixture
def start_receiver(hooked_mlflow: str, tmp_path: Path) -> Iterator[Callable[..., ReceiverProcess]]:
    started: list[ReceiverProcess] = []

    def start(workers: int = 2) -> ReceiverProcess:
        receiver = ReceiverProcess(
            hooked_mlflow, SECRET, tmp_path / "queue.db", tmp_path / "receiver.log",
            "--workers", str(workers), "--reconcile-every", "3",
        )  # fmt: skip
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


def _ghost() -> dict:
    return {"name": f"ghost-{uuid.uuid4().hex[:6]}", "version": "1", "source": "models:/m-1", "tags": {}}


def test_forged_signature_is_rejected(start_receiver):
    receiver = start_receiver()
    response = post(receiver.url, "model_version.created", _ghost(), secret="not-the-secret-at-all")
    assert response.status_code == 401 and "signature" in response.json()["error"]
    assert receiver.jobs() == []


def test_stale_timestamp_is_rejected(start_receiver):
    receiver = start_receiver()
    response = post(receiver.url, "model_version.created", _ghost(), timestamp=int(time.time()) - 3600)
    assert response.status_code == 401 and "tolerance" in response.json()["error"]
    unsigned = requests.post(f"{receiver.url}/webhook", json={"entity": "model_version"}, timeout=10)
    assert unsigned.status_code == 401
    assert receiver.jobs() == []


def test_oversized_body_is_refused_before_it_is_read_whole(start_receiver):
    receiver = start_receiver()
    response = requests.post(f"{receiver.url}/webhook", data=b"x" * (2 << 20), timeout=30)
    assert response.status_code == 413
    assert receiver.jobs() == []


def test_replayed_and_duplicate_deliveries_start_one_audit(start_receiver):
    receiver = start_receiver()
    ghost = _ghost()
    first = post(receiver.url, "model_version.created", ghost, delivery_id="delivery-1")
    replay = post(receiver.url, "model_version.created", ghost, delivery_id="delivery-1")
    duplicate = post(receiver.url, "model_version.created", ghost, delivery_id="delivery-2")
    assert first.json() == {"status": "queued", "jobs": 1}
    assert replay.json()["status"] == "duplicate"
    assert duplicate.json() == {"status": "ignored", "jobs": 0}
    ran = wait_for(lambda: [j for j in receiver.jobs() if j["state"] not in ("queued", "running")], 30, "the job")
    assert len(receiver.jobs()) == 1
    assert ran[0]["state"] == "dropped" and "no such version" in ran[0]["outcome"]


def test_events_that_ask_for_nothing_queue_nothing(start_receiver):
    receiver = start_receiver()
    tag = {"name": "m", "version": "1", "key": registry.STATUS, "value": "running"}
    other_alias = {"name": "m", "alias": "staging", "version": "1"}
    assert post(receiver.url, "model_version_tag.set", tag).json()["status"] == "ignored"
    assert post(receiver.url, "model_version_alias.created", other_alias).json()["status"] == "ignored"
    assert receiver.jobs() == []


def _task(client, digits_zoo, prefix: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    registry.publish_audit_data(client, name, Path(digits_zoo.audit_data))
    operator_config.update_model(name, threshold_profile="digits")
    return name


def _status(client, name: str, version: str) -> str | None:
    return registry.status_of(client.get_model_version(name, version))


def test_webhook_install_command_registers_the_receiver_and_its_test_delivery_is_accepted(
    start_receiver, hooked_mlflow
):
    """`crossaudit webhook install` as an operator runs it. What a registration then sets off
    (audits, gate, alias guard) is `make demo`'s path, checked in tests/test_demo.py."""
    receiver = start_receiver()
    command = [sys.executable, "-m", "crossaudit", "webhook", "install", "--url", f"{receiver.url}/webhook",
               "--tracking-uri", hooked_mlflow]  # fmt: skip
    wrong = subprocess.run(command, env={**os.environ, SECRET_ENV: "another-secret-0123456789abcdef"},
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert wrong.returncode == 1 and "test delivery FAILED" in wrong.stdout, "a secret the receiver does not share"
    installed = subprocess.run(command, env={**os.environ, SECRET_ENV: SECRET}, capture_output=True, text=True,
                               timeout=60)  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "test delivery ok (HTTP 200)" in installed.stdout

    # MLflow's test delivery names a version that does not exist: its job is dropped, no audit runs.
    jobs = wait_for(lambda: receiver.finished_audits("example_model"), 30, "the test delivery's job")
    assert [j["state"] for j in jobs] == ["dropped"]


@pytest.mark.slow
def test_lost_webhooks_and_a_killed_receiver_still_end_in_one_audit_each(start_receiver, hooked_mlflow, digits_zoo):
    client = registry.client(hooked_mlflow)
    name = _task(client, digits_zoo, "lost")
    # Registered while no receiver runs: their webhooks are lost.
    first = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    second = registry.register_version(client, name, digits_zoo.clean_mlp, "globex")

    receiver = start_receiver(workers=1)
    wait_for(
        lambda: "running" in {_status(client, name, v.version) for v in (first, second)},
        120, "reconciliation did not start an audit",
    )  # fmt: skip
    queued = [j for j in receiver.jobs() if j["name"] == name]
    assert {j["source"] for j in queued} == {"reconcile"} and {j["state"] for j in queued} == {"running", "queued"}
    receiver.kill()

    receiver = start_receiver(workers=1)
    for version in (first.version, second.version):
        wait_for(lambda v=version: _status(client, name, v) == "passed", 300, f"version {version} not audited")
    finished = wait_for(lambda: receiver.finished_audits(name), 60, "audit jobs did not finish")
    assert sorted((j["version"], j["state"]) for j in finished) == [(first.version, "done"), (second.version, "done")]
    runs = client.search_runs(
        [client.get_experiment_by_name(registry.EXPERIMENT).experiment_id],
        f"tags.`crossaudit.model_version` LIKE 'models:/{name}/%'",
    )
    assert len(runs) == 2, "each version's audit recorded once"


def test_scheduled_tick_queues_a_reaudit_of_each_promoted_version_once(hooked_mlflow, digits_zoo, tmp_path):
    from datetime import UTC, datetime

    from crossaudit.mlops.receiver import Receiver, ReceiverConfig

    client = registry.client(hooked_mlflow)
    name = _task(client, digits_zoo, "promoted")
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    client.set_registered_model_alias(name, "production", ref.version)
    receiver = Receiver(ReceiverConfig(hooked_mlflow, SECRET, tmp_path / "queue.db"))
    tick = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
    assert receiver.reaudit_promoted(tick) >= 1
    assert receiver.reaudit_promoted(tick) == 0, "one re-audit per version per tick"
    mine = [j for j in receiver.queue.jobs() if j["name"] == name]
    assert [(j["key"], j["source"]) for j in mine] == [
        (f"audit:{name}/{ref.version}:reaudit:2026-11-30T03:00", "schedule")
    ]
    receiver.queue.close()
