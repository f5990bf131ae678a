"""The audit pipeline, compiled and run end to end with kfp.local against a real MLflow."""

import uuid
from pathlib import Path

import pytest

from crossaudit import registry
from crossaudit.audit import run_audit
from crossaudit.verdict import load_thresholds
from pipelines.audit_pipeline import COMPILED, compile_pipeline
from pipelines.runner import audit_version


def test_compiled_pipeline_yaml_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "audit_pipeline.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "run `python -m pipelines.audit_pipeline` and commit the YAML"


@pytest.fixture
def task(mlflow_server, digits_zoo):
    """A registered model with its audit set and the digits threshold profile."""
    client = registry.client(mlflow_server)
    name = f"digits-{uuid.uuid4().hex[:8]}"
    registry.publish_audit_data(client, name, Path(digits_zoo.audit_data))
    client.set_registered_model_tag(name, registry.PROFILE_TAG, "digits")
    return client, name


def test_first_version_awaits_a_peer_and_is_not_promoted(task, mlflow_server, digits_zoo):
    client, name = task
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    assert audit_version(ref.uri, mlflow_server).status == "awaiting-peer"
    assert registry.check(client, ref.uri)[0] is False


@pytest.mark.slow
def test_pipeline_fails_the_backdoored_version_and_promotes_the_clean_one(task, mlflow_server, digits_zoo):
    client, name = task
    clean = registry.register_version(client, name, digits_zoo.clean_cnn, "acme", "Acme's model.")
    poisoned = registry.register_version(client, name, digits_zoo.badnets_cnn, "globex")

    assert audit_version(poisoned.uri, mlflow_server).status == "failed"
    assert audit_version(clean.uri, mlflow_server).status == "passed"

    assert registry.resolve(client, f"models:/{name}@production").version == clean.version
    tags = client.get_model_version(name, poisoned.version).tags
    assert tags[registry.VERDICT] == "backdoor" and tags[registry.PEERS] == clean.uri
    assert client.get_model_version(name, clean.version).description.startswith("Acme's model.")
    artifacts = {f.path for f in client.list_artifacts(tags[registry.RUN_ID], "peer_1")}
    assert {"peer_1/report.html", "peer_1/report.json", "peer_1/cka_heatmap.png"} <= artifacts
    assert "peer_1/trigger_model_1.png" in artifacts

    direct = run_audit(str(digits_zoo.badnets_cnn), str(digits_zoo.clean_cnn), str(digits_zoo.audit_data),
                       thresholds=load_thresholds("digits"))  # fmt: skip
    assert float(tags[registry.SCORE]) == pytest.approx(direct.report.models[0].score, abs=1e-4), (
        "the pipeline and the library must give one pair one answer"
    )


@pytest.mark.slow
def test_failed_step_marks_the_version_error_and_never_promotes(task, mlflow_server, digits_zoo):
    client, name = task
    registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "globex")
    client.set_registered_model_tag(name, registry.AUDIT_DATA_TAG, "runs:/0123456789abcdef/missing.parquet")
    assert audit_version(ref.uri, mlflow_server).status == "error"
    assert registry.check(client, ref.uri)[0] is False
    assert client.get_model_version(name, ref.version).tags[registry.ERROR]
