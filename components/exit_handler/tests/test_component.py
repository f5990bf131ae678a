"""The exit handler in a failing pipeline is exercised in tests/test_pipeline.py."""

import uuid
from types import SimpleNamespace

from components.exit_handler.component import mark_unfinished
from crossaudit.mlops import registry


def _status(state: str, message: str = "") -> SimpleNamespace:
    return SimpleNamespace(state=state, error_message=message)


def test_failed_run_marks_the_version_error(mlflow_server, digits_zoo):
    client = registry.client(mlflow_server)
    ref = registry.register_version(client, f"exit-{uuid.uuid4().hex[:8]}", digits_zoo.clean_cnn, "acme")
    registry.set_status(client, ref, "running")
    assert mark_unfinished.python_func(ref.uri, mlflow_server, _status("FAILED", "step crashed")) == "error"
    assert client.get_model_version(ref.name, ref.version).tags[registry.ERROR] == "step crashed"


def test_succeeded_run_without_a_verdict_is_still_an_error(mlflow_server, digits_zoo):
    client = registry.client(mlflow_server)
    ref = registry.register_version(client, f"exit-{uuid.uuid4().hex[:8]}", digits_zoo.clean_cnn, "acme")
    registry.set_status(client, ref, "running")
    assert mark_unfinished.python_func(ref.uri, mlflow_server, _status("SUCCEEDED")) == "error"
    registry.set_status(client, ref, "failed")
    assert mark_unfinished.python_func(ref.uri, mlflow_server, _status("SUCCEEDED")) == "failed"
