"""The re-audit task against its own real MLflow server (it audits every promoted version there)."""

import json
import uuid
from pathlib import Path

import pytest

from components.reaudit.component import reaudit_promoted
from crossaudit import registry
from crossaudit.tracking_server import local_server


@pytest.mark.slow
def test_a_promoted_version_that_fails_its_reaudit_loses_the_alias(digits_zoo, tmp_path):
    with local_server(tmp_path / "mlflow") as url:
        client = registry.client(url)
        name = f"reaudit-{uuid.uuid4().hex[:6]}"
        registry.publish_audit_data(client, name, Path(digits_zoo.audit_data))
        client.set_registered_model_tag(name, registry.PROFILE_TAG, "digits")
        registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
        poisoned = registry.register_version(client, name, digits_zoo.badnets_cnn, "globex")
        client.set_registered_model_alias(name, "production", poisoned.version)  # promoted before any audit

        statuses = json.loads(reaudit_promoted.python_func(url, "production", "", 0, "cpu"))

        assert statuses == {poisoned.uri: "failed"}
        assert registry.promoted_versions(client) == []
