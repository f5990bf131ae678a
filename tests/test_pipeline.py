"""The audit pipeline, compiled and run with kfp.local against a real MLflow. A pair that
goes through it to a verdict, a promotion and its artifacts is `make demo`'s path, checked
end to end in tests/test_demo.py."""

import uuid
from pathlib import Path

import pytest

from crossaudit import registry
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
def test_failed_step_marks_the_version_error_and_never_promotes(task, mlflow_server, digits_zoo):
    client, name = task
    registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "globex")
    client.set_registered_model_tag(name, registry.AUDIT_DATA_TAG, "runs:/0123456789abcdef/missing.parquet")
    assert audit_version(ref.uri, mlflow_server).status == "error"
    assert registry.check(client, ref.uri)[0] is False
    assert client.get_model_version(name, ref.version).tags[registry.ERROR]
