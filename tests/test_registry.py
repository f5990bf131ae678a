"""The MLflow side against a real tracking server: URIs, pairing, tags, the alias gate."""

import uuid
from pathlib import Path

import pytest

from crossaudit.mlops import attestation, operator_config, promotion, registry
from crossaudit.modelio.loaders import load_model


@pytest.fixture
def client(mlflow_server):
    return registry.client(mlflow_server)


def _name() -> str:
    return f"task-{uuid.uuid4().hex[:8]}"


def test_models_uri_by_version_and_alias_resolve_to_the_same_version(client, digits_zoo):
    name = _name()
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    client.set_registered_model_alias(name, "staging", ref.version)
    assert registry.resolve(client, ref.uri).version == ref.version
    assert registry.resolve(client, f"models:/{name}@staging").version == ref.version


@pytest.mark.parametrize("uri", ["models:/", "runs:/abc/model", "models:/x/y/z", "models:/a@"])
def test_malformed_models_uri_is_a_clear_error(client, uri):
    with pytest.raises(registry.RegistryError, match="expected models:/NAME/VERSION"):
        registry.resolve(client, uri)


def test_unknown_version_is_a_registry_error(client):
    with pytest.raises(registry.RegistryError, match="models:/nobody-registered-this/3"):
        registry.resolve(client, "models:/nobody-registered-this/3")


def test_registered_version_downloads_as_files_and_loads_without_mlflow_loaders(client, digits_zoo, tmp_path):
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme")
    path = registry.materialize(ref.uri, tmp_path)
    assert (path / "MLmodel").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert load_model(str(path)).format == "onnx"


def test_peers_are_the_latest_version_of_every_other_provider(client, digits_zoo):
    name = _name()
    a1 = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    b1 = registry.register_version(client, name, digits_zoo.clean_mlp, "globex")
    b2 = registry.register_version(client, name, digits_zoo.clean_mlp, "globex")
    c1 = registry.register_version(client, name, digits_zoo.clean_cnn, "initech")
    peers = registry.peers_of(client, registry.resolve(client, a1.uri), operator_config.load())
    assert [(p.tags["provider"], p.version) for p in peers] == [("globex", b2.version), ("initech", c1.version)]
    assert b1.version not in [p.version for p in peers]


def test_provider_comes_from_the_operators_configuration_not_the_tag(client, digits_zoo):
    """Tagging a new version with a rival's name must not make the provider's own earlier
    delivery its witness: the label is checked against the configuration and refused."""
    name = _name()
    registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    second = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    client.set_model_version_tag(name, second.version, registry.PROVIDER_TAG, "globex")
    with pytest.raises(registry.RegistryError, match="delivered by 'acme'"):
        registry.peers_of(client, registry.resolve(client, second.uri), operator_config.load())
    client.delete_model_version_tag(name, second.version, registry.PROVIDER_TAG)
    assert registry.peers_of(client, registry.resolve(client, second.uri), operator_config.load()) == []


def test_version_from_an_unknown_experiment_cannot_be_paired(client, digits_zoo):
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "stranger")
    with pytest.raises(registry.RegistryError, match="no provider the operator's configuration knows"):
        registry.peers_of(client, registry.resolve(client, ref.uri), operator_config.load())


def test_gate_promotes_only_a_signed_pass_and_never_moves_alias_off_a_newer_pass(sign_verdict, client, digits_zoo):
    name = _name()
    key = attestation.public_key()
    old, new, bad = (registry.register_version(client, name, digits_zoo.clean_cnn, p) for p in ("a", "b", "c"))
    sign_verdict(client, bad, "failed")
    assert promotion.gate(client, bad, key, "production") is False
    sign_verdict(client, new, "passed")
    assert promotion.gate(client, new, key, "production") is True
    sign_verdict(client, old, "passed")
    assert promotion.gate(client, old, key, "production") is False, "an older pass must not take a newer one's alias"
    assert registry.resolve(client, f"models:/{name}@production").version == new.version


def test_revoke_takes_the_alias_only_from_its_holder(sign_verdict, client, digits_zoo):
    name = _name()
    holder, other = (registry.register_version(client, name, digits_zoo.clean_cnn, p) for p in ("a", "b"))
    sign_verdict(client, holder, "passed")
    assert promotion.gate(client, holder, attestation.public_key(), "production")
    assert promotion.revoke(client, other, "production") is False
    assert promotion.revoke(client, holder, "production") is True
    with pytest.raises(registry.RegistryError):
        registry.resolve(client, f"models:/{name}@production")


@pytest.mark.parametrize("status", ["failed", "inconclusive", "error", None])
def test_check_passes_only_signed_passes(sign_verdict, client, digits_zoo, status):
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme")
    key = attestation.public_key()
    if status:
        sign_verdict(client, ref, status)
    passed, line = promotion.check(client, ref.uri, key)
    assert passed is False and (status or "no attestation") in line
    sign_verdict(client, ref, "passed")
    assert promotion.check(client, ref.uri, key)[0] is True


def test_description_keeps_the_providers_text(client, digits_zoo):
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme", "Provider notes.")
    registry.append_description(client, ref, "**crossaudit: passed**")
    text = client.get_model_version(ref.name, ref.version).description
    assert text.startswith("Provider notes.") and text.endswith("**crossaudit: passed**")


def test_dead_tracking_server_is_a_clear_error():
    """Named at once, as every caller treats an unreachable service (an OSError)."""
    with pytest.raises(ConnectionError, match=r"MLflow server http://127.0.0.1:9 cannot be reached"):
        registry.client("http://127.0.0.1:9")


def test_missing_local_audit_data_is_a_registry_error(tmp_path):
    with pytest.raises(registry.RegistryError, match="no such file"):
        registry.materialize(str(tmp_path / "gone.parquet"), tmp_path / "dest")


def test_audit_settings_come_from_the_operators_configuration(client, digits_zoo, operator):
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme")
    with pytest.raises(operator_config.ConfigError, match="no audit settings"):
        registry.audit_settings(operator_config.load(), ref.name)
    pinned = registry.publish_audit_data(client, ref.name, Path(digits_zoo.audit_data), operator)
    expected = registry.AuditSettings(pinned.uri, pinned.sha256, "", "", "", "auto", False)
    assert registry.audit_settings(operator_config.load(), ref.name) == expected


def test_check_command_exit_codes_for_deploy_scripts(sign_verdict, client, mlflow_server, digits_zoo):
    import subprocess
    import sys

    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme")

    def check(uri: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "crossaudit", "check", uri, "--tracking-uri", mlflow_server]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    sign_verdict(client, ref, "failed")
    assert check(ref.uri).returncode == 1
    sign_verdict(client, ref, "passed")
    assert promotion.gate(client, ref, attestation.public_key(), "production")
    done = check(f"models:/{ref.name}@production")
    assert done.returncode == 0 and "passed" in done.stdout
    assert check("models:/no-such-model@production").returncode == 2


@pytest.mark.slow
def test_cli_audits_models_named_by_mlflow_uris_and_reports_them_as_given(client, mlflow_server, digits_zoo, tmp_path):
    """DESIGN's model contract: a model may be a models:/ URI. The CLI downloads both
    (by version and by alias) and the report names them as the user wrote them."""
    import json
    import subprocess
    import sys

    name = _name()
    cnn = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    mlp = registry.register_version(client, name, digits_zoo.clean_mlp, "globex")
    client.set_registered_model_alias(name, "candidate", mlp.version)
    uris = [cnn.uri, f"models:/{name}@candidate"]
    command = [sys.executable, "-m", "crossaudit", "audit", *uris, "--data", str(digits_zoo.audit_data), "--json",
               "--profile", "digits", "--tracking-uri", mlflow_server]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert [m["uri"] for m in report["models"]] == uris
    delivered = [load_model(path).sha256 for path in registry.local_models([cnn.uri, mlp.uri], mlflow_server, tmp_path)]
    assert [m["sha256"] for m in report["models"]] == delivered, "each URI resolved to the version it names"
    unknown = subprocess.run(
        [sys.executable, "-m", "crossaudit", "audit", f"models:/{name}/99", uris[0], "--data",
         str(digits_zoo.audit_data), "--tracking-uri", mlflow_server],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert unknown.returncode == 2 and f"models:/{name}/99" in unknown.stderr
