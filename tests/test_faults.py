"""Faults while an audit runs: each ends in a retry or a non-passing status, never a promotion.

(A receiver killed with work queued, and a pipeline step that crashes, are in
test_receiver.py and test_pipeline.py.)
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from crossaudit.dev.receiver_process import ReceiverProcess, wait_for
from crossaudit.dev.tracking_server import free_port, local_server
from crossaudit.mlops import operator_config, registry
from crossaudit.mlops.event_queue import ENDED
from crossaudit.mlops.webhook import install
from pipelines.runner import audit_version

SECRET = "fault-secret-0123456789abcdef"
pytestmark = pytest.mark.slow


def _task(client, digits_zoo, onboard) -> str:
    """A registered model with its audit set published and pinned by the operator, on a
    server whose test providers are onboarded."""
    onboard(client.tracking_uri)
    name = f"fault-{uuid.uuid4().hex[:6]}"
    registry.publish_audit_data(client, name, Path(digits_zoo.audit_data))
    operator_config.update_model(name, threshold_profile="digits")
    return name


def _status(client, name: str, version: str) -> str | None:
    return registry.status_of(client.get_model_version(name, version))


def _mine(receiver: ReceiverProcess, name: str, version: str) -> list[dict]:
    return [j for j in receiver.jobs() if j["key"] == f"audit:{name}/{version}"]


def _processes_naming(text: str) -> list[int]:
    """Live processes whose command line holds `text` (an audit's model name)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # gone while we looked
            continue
    return found


def _receiver(url: str, tmp_path: Path, *options: str) -> ReceiverProcess:
    receiver = ReceiverProcess(url, SECRET, tmp_path / "queue.db", tmp_path / "receiver.log", *options)
    install(registry.client(url), f"{receiver.url}/webhook", SECRET)
    return receiver


def test_audit_past_its_time_budget_is_error_and_no_late_verdict_follows(digits_zoo, onboard, tmp_path):
    with local_server(tmp_path / "mlflow") as url:
        client = registry.client(url)
        name = _task(client, digits_zoo, onboard)
        receiver = _receiver(url, tmp_path, "--audit-timeout", "4")
        try:
            first = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
            wait_for(lambda: _status(client, name, first.version) in ("awaiting-peer", "error"), 60, "first audit")
            second = registry.register_version(client, name, digits_zoo.badnets_cnn, "globex")
            wait_for(lambda: _status(client, name, second.version) == "error", 60, "the time budget")
            tags = client.get_model_version(name, second.version).tags
            assert "time budget of 4s" in tags[registry.ERROR]
            # No late verdict can follow: the job has ended, and no process of the killed
            # pipeline (the audit-version process, a component's executor) lives on.
            wait_for(lambda: [j for j in _mine(receiver, name, second.version) if j["state"] in ENDED], 30, "job end")
            wait_for(lambda: not _processes_naming(name), 30, "the killed audit's processes to end")
            assert _status(client, name, second.version) == "error"
            assert registry.promoted_versions(client) == []
        finally:
            receiver.stop()


def test_mlflow_down_mid_audit_is_retried_until_the_audit_ends(digits_zoo, onboard, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast while MLflow is down
    port = free_port()
    store = tmp_path / "mlflow"
    with local_server(store, port) as url:
        client = registry.client(url)
        name = _task(client, digits_zoo, onboard)
        receiver = _receiver(url, tmp_path, "--retry-delay", "5", "--max-attempts", "6")
        first = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
        wait_for(lambda: _status(client, name, first.version) == "awaiting-peer", 60, "first audit")
        second = registry.register_version(client, name, digits_zoo.clean_mlp, "globex")
        wait_for(lambda: _status(client, name, second.version) == "running", 60, "the second audit to start")
    # MLflow is down now, mid-audit: the audit cannot finish; its job must wait for a retry.

    def retrying() -> bool:
        mine = _mine(receiver, name, second.version)
        return bool(mine) and mine[0]["state"] == "queued" and mine[0]["attempts"] >= 1

    try:
        wait_for(retrying, 120, "the failed attempt to be queued for a retry")
        with local_server(store, port):
            wait_for(lambda: _status(client, name, second.version) == "passed", 300, "the retried audit")
            job = wait_for(
                lambda: [j for j in _mine(receiver, name, second.version) if j["state"] == "done"], 60, "job"
            )
            assert job[0]["attempts"] >= 2
    finally:
        receiver.stop()


def test_broken_artifact_store_ends_in_error_not_a_promotion(digits_zoo, onboard, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the upload fails at once instead of after backoff
    with local_server(tmp_path / "mlflow") as url:
        client = registry.client(url)
        name = _task(client, digits_zoo, onboard)
        registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
        clean = registry.register_version(client, name, digits_zoo.clean_mlp, "globex")
        experiment = client.get_experiment_by_name(registry.EXPERIMENT) or client.get_experiment(
            client.create_experiment(registry.EXPERIMENT)
        )
        blocked = tmp_path / "mlflow" / "mlartifacts" / experiment.experiment_id
        blocked.parent.mkdir(parents=True, exist_ok=True)
        # Neither readable nor writable, even as root: the pinned audit set cannot be fetched
        # and no audit run could store its artifacts.
        shutil.rmtree(blocked, ignore_errors=True)
        blocked.write_text("not a directory")

        submission = audit_version(clean.uri, url)

        assert submission.status == "error"
        assert client.get_model_version(name, clean.version).tags[registry.ERROR]
        assert registry.promoted_versions(client) == []
        assert os.path.isfile(blocked)
