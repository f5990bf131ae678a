"""The re-audit task against its own real MLflow server (it audits every promoted version there)."""

import json
import uuid
from pathlib import Path

import pytest

from components.reaudit.component import reaudit_promoted
from crossaudit.dev.tracking_server import local_server
from crossaudit.mlops import attestation, operator_config, promotion, registry


@pytest.mark.slow
def test_a_promoted_version_that_fails_its_reaudit_loses_the_alias(digits_zoo, onboard, sign_verdict, tmp_path):
    with local_server(tmp_path / "mlflow") as url:
        client = registry.client(url)
        onboard(url)
        name = f"reaudit-{uuid.uuid4().hex[:6]}"
        registry.publish_audit_data(client, name, Path(digits_zoo.audit_data))
        operator_config.update_model(name, threshold_profile="digits")
        registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
        poisoned = registry.register_version(client, name, digits_zoo.badnets_cnn, "globex")
        # An earlier audit passed it (say, under laxer thresholds) and the gate promoted it.
        sign_verdict(client, poisoned, "passed")
        assert promotion.gate(client, poisoned, attestation.public_key(), "production")

        statuses = json.loads(reaudit_promoted.python_func(url, "production", "", 0, "cpu"))

        assert statuses == {poisoned.uri: "failed"}
        assert registry.promoted_versions(client) == []


def test_an_alias_holder_without_a_signed_pass_loses_it_before_any_reaudit(digits_zoo, onboard, tmp_path):
    with local_server(tmp_path / "mlflow") as url:
        client = registry.client(url)
        onboard(url)
        name = f"reaudit-{uuid.uuid4().hex[:6]}"
        ref = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
        registry.set_status(client, ref, "passed")  # what a provider with tag rights can write
        client.set_registered_model_alias(name, "production", ref.version)

        assert json.loads(reaudit_promoted.python_func(url, "production", "", 0, "cpu")) == {}
        assert registry.promoted_versions(client) == []
