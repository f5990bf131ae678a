"""What a provider with registry rights can write decides nothing: each test is an attack
that a provider able to register versions (and so to tag them, alias them and log
artifacts) can mount, against a real MLflow server."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest
import requests

from crossaudit.dev.receiver_process import served_in_thread
from crossaudit.mlops import attestation, operator_config, promotion, registry
from crossaudit.mlops.receiver import Receiver, ReceiverConfig, audit_environment, jobs_for
from crossaudit.mlops.webhook import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Delivery, sign, verify
from crossaudit.modelio.digest import file_sha256

SECRET = "trust-secret-0123456789abcdef"


@pytest.fixture
def client(mlflow_server):
    return registry.client(mlflow_server)


def _name() -> str:
    return f"trust-{uuid.uuid4().hex[:8]}"


def _passed(client, ref: registry.VersionRef) -> bool:
    return promotion.check(client, ref.uri, attestation.public_key())[0]


def test_a_status_tag_written_by_the_provider_is_not_a_pass(client, digits_zoo):
    name = _name()
    ref = registry.register_version(client, name, digits_zoo.badnets_cnn, "acme")
    registry.set_status(client, ref, "passed")
    client.set_registered_model_alias(name, "production", ref.version)

    assert not _passed(client, ref)
    incident = promotion.guard_alias(client, name, attestation.public_key(), "production")
    assert incident and "no attestation" in incident
    assert name not in [held.name for held in registry.promoted_versions(client)]
    restored = promotion.restore_forged_statuses(
        client, [client.get_model_version(name, ref.version)], attestation.public_key()
    )
    assert restored == [ref] and registry.status_of(client.get_model_version(name, ref.version)) == "error"


def test_an_attestation_copied_from_another_version_does_not_verify(sign_verdict, client, digits_zoo):
    name = _name()
    genuine = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    forged = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    sign_verdict(client, genuine, "passed")
    copied = client.get_model_version(name, genuine.version).tags[registry.ATTESTATION]
    registry.set_status(client, forged, "passed", **{registry.ATTESTATION: copied})
    assert _passed(client, genuine) and not _passed(client, forged)


def test_an_older_pass_put_back_over_a_newer_failure_does_not_verify(sign_verdict, client, digits_zoo):
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme")
    sign_verdict(client, ref, "passed")
    old = client.get_model_version(ref.name, ref.version).tags[registry.ATTESTATION]
    time.sleep(0.01)
    sign_verdict(client, ref, "failed")
    registry.set_status(client, ref, "passed", **{registry.ATTESTATION: old})
    assert not _passed(client, ref)
    assert "not the newest verdict" in promotion.check(client, ref.uri, attestation.public_key())[1]


def test_model_bytes_replaced_after_the_audit_are_not_a_pass(sign_verdict, client, digits_zoo, tmp_path):
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme")
    sign_verdict(client, ref, "passed")
    assert _passed(client, ref)
    source = client.get_model_version(ref.name, ref.version).source
    swapped = tmp_path / "model.onnx"
    swapped.write_bytes(Path(digits_zoo.badnets_cnn).read_bytes())
    client.log_model_artifact(source.removeprefix("models:/"), str(swapped))  # the provider owns its logged model
    passed, line = promotion.check(client, ref.uri, attestation.public_key())
    assert not passed and "bytes changed" in line


def test_an_attestation_under_another_key_does_not_verify(client, digits_zoo, tmp_path):
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme")
    attestation.generate(tmp_path / "k.pem", tmp_path / "k.pub")
    own = promotion.model_digest(ref)
    promotion.record_verdict(client, ref, "passed", own, None, attestation.signing_key(str(tmp_path / "k.pem")))
    passed, line = promotion.check(client, ref.uri, attestation.public_key())
    assert not passed and "does not verify" in line


def test_every_sweep_guards_every_alias_holder_without_any_webhook(
    sign_verdict, client, mlflow_server, digits_zoo, tmp_path
):
    name = _name()
    good = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    sign_verdict(client, good, "passed")
    bad = registry.register_version(client, name, digits_zoo.badnets_cnn, "globex")
    sign_verdict(client, bad, "failed")
    client.set_registered_model_alias(name, "production", bad.version)  # the alias webhook is lost

    receiver = Receiver(ReceiverConfig(mlflow_server, SECRET, tmp_path / "queue.db"))
    try:
        receiver.reconcile()
    finally:
        receiver.queue.close()
    assert registry.resolve(client, f"models:/{name}@production").version == good.version
    assert "signed verdict is failed" in client.get_model_version(name, bad.version).tags[registry.INCIDENT]


def test_audit_data_and_thresholds_come_only_from_crossaudits_experiment_with_pinned_bytes(
    client, digits_zoo, tmp_path
):
    secret_file = tmp_path / "auditor-secret.txt"
    secret_file.write_text("the auditor's own file")
    with pytest.raises(registry.RegistryError, match="runs:/RUN_ID/PATH"):
        registry.fetch_pinned(str(secret_file), file_sha256(secret_file), tmp_path / "a")
    with pytest.raises(registry.RegistryError, match="runs:/RUN_ID/PATH"):
        registry.fetch_pinned(f"file://{secret_file}", file_sha256(secret_file), tmp_path / "b")

    provider_run = client.create_run(
        client.get_experiment_by_name(operator_config.provider_experiment("acme")).experiment_id
    )
    client.log_artifact(provider_run.info.run_id, str(digits_zoo.audit_data))
    planted = f"runs:/{provider_run.info.run_id}/{Path(digits_zoo.audit_data).name}"
    with pytest.raises(registry.RegistryError, match="operator artifacts live in 'crossaudit'"):
        registry.fetch_pinned(planted, file_sha256(Path(digits_zoo.audit_data)), tmp_path / "c")

    name = _name()
    pinned = registry.publish_audit_data(client, name, Path(digits_zoo.audit_data))
    assert registry.fetch_pinned(pinned.uri, pinned.sha256, tmp_path / "d").is_file()
    with pytest.raises(registry.RegistryError, match="pins"):
        registry.fetch_pinned(pinned.uri, "0" * 64, tmp_path / "e")


def test_settings_tags_on_the_registered_model_change_nothing(client, digits_zoo):
    name = _name()
    registry.publish_audit_data(client, name, Path(digits_zoo.audit_data))
    before = registry.audit_settings(operator_config.load(), name)
    for key, value in {
        "crossaudit.thresholds": "runs:/0123456789abcdef0123456789abcdef/lax.json",
        "crossaudit.audit_data": "/etc/passwd",
        "crossaudit.threshold_profile": "lax",
        "crossaudit.hold_on_flagged_peer": "false",
    }.items():
        client.set_registered_model_tag(name, key, value)
    assert registry.audit_settings(operator_config.load(), name) == before


def test_the_gate_cannot_give_a_verdict_without_the_signing_key(stage_folders, mlflow_server, monkeypatch, tmp_path):
    from crossaudit.mlops.gate import gate_step

    monkeypatch.delenv(attestation.SIGNING_KEY_ENV)
    with pytest.raises(attestation.AttestationError, match=attestation.SIGNING_KEY_ENV):
        gate_step("models:/x/1", mlflow_server, stage_folders.data, [stage_folders.findings], "production", "", "",
                  "", False, tmp_path)  # fmt: skip


def _delivery(event: str, data: dict) -> Delivery:
    return Delivery(str(uuid.uuid4()), int(time.time()), event, data)


def test_tags_a_provider_writes_queue_no_audits():
    """A provider can set any tag value any number of times: none of them queues an audit,
    so the queue cannot be flooded through tags. A claimed pass queues the guard."""
    for value in (f"rival-{i}" for i in range(50)):
        tag = {"name": "m", "version": "1", "key": registry.PROVIDER_TAG, "value": value}
        assert jobs_for(_delivery("model_version_tag.set", tag), "production", time.time()) == []
    claimed = {"name": "m", "version": "1", "key": registry.STATUS, "value": "passed"}
    assert [job.kind for job in jobs_for(_delivery("model_version_tag.set", claimed), "production", time.time())] == [
        "guard"
    ]


def test_a_signed_deeply_nested_body_is_rejected_not_a_server_error():
    body = ("[" * 100_000 + "]" * 100_000).encode()
    stamp, delivery = str(int(time.time())), "nested"
    headers = {
        DELIVERY_ID_HEADER: delivery,
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(SECRET, delivery, stamp, body),
    }
    with pytest.raises(Exception, match="not an MLflow webhook payload"):
        verify(SECRET, headers, body, time.time(), 300)


def test_the_job_listing_needs_the_operators_token(mlflow_server, tmp_path):
    token = "operator-token-0123456789"
    receiver = Receiver(ReceiverConfig(mlflow_server, SECRET, tmp_path / "queue.db", admin_token=token))
    with served_in_thread(receiver) as url:
        assert requests.get(f"{url}/jobs", timeout=10).status_code == 401
        assert requests.get(f"{url}/jobs", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        allowed = requests.get(f"{url}/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert allowed.status_code == 200 and isinstance(allowed.json(), list)
        assert set(requests.get(f"{url}/healthz", timeout=10).json()) == {"status", "jobs"}


def test_audits_run_with_no_secret_in_their_environment(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSAUDIT_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mlflow-token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-key")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-password")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    receiver = Receiver(ReceiverConfig(mlflow_server, SECRET, tmp_path / "queue.db"))
    try:
        environment = receiver._audit_env()
    finally:
        receiver.queue.close()
    assert SECRET not in json.dumps(environment)
    assert not {"CROSSAUDIT_WEBHOOK_SECRET", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                "AWS_SECRET_ACCESS_KEY"} & set(environment)  # fmt: skip
    assert environment["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0", "MLflow's settings pass, its credentials do not"
    assert environment["PATH"] and environment[operator_config.CONFIG_ENV]
    assert audit_environment({"CROSSAUDIT_WEBHOOK_SECRET_FILE": "/s", "HOME": "/h"}) == {"HOME": "/h"}


@pytest.mark.parametrize(
    "text",
    [
        "models: {m: {audit_data: {uri: x, sha256: short}}}",
        "models: {m: {thresholds: {uri: x, sha256: " + "0" * 64 + "}}}",
        "models: {m: {audit_data: {uri: x, sha256: " + "0" * 64 + "}, typo: 1}}",
        "providers: {groups: {a: b}}",
        "provider: {}",
    ],
)
def test_a_malformed_operator_configuration_is_a_named_error(text):
    with pytest.raises(operator_config.ConfigError):
        operator_config.parse(text)


def test_the_operator_publishes_and_pins_an_audit_set_from_the_cli(mlflow_server, digits_zoo, tmp_path):
    import subprocess
    import sys

    config, name = tmp_path / "config.yaml", _name()
    command = [sys.executable, "-m", "crossaudit", "publish", name, "--tracking-uri", mlflow_server,
               "--config", str(config), "--audit-data", str(digits_zoo.audit_data)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pinned = operator_config.load(config).settings(name).audit_data
    assert pinned.sha256 == file_sha256(Path(digits_zoo.audit_data))
    registry.client(mlflow_server)
    assert registry.fetch_pinned(pinned.uri, pinned.sha256, tmp_path / "fetched").is_file()


def test_keygen_never_replaces_a_signing_key(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "crossaudit", "keygen", "--private", str(tmp_path / "k.pem"),
               "--public", str(tmp_path / "k.pub")]  # fmt: skip
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == 0
    key = (tmp_path / "k.pem").read_bytes()
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0, "the signing key is readable by its owner only"
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "refusing" in again.stderr and (tmp_path / "k.pem").read_bytes() == key


def test_the_signed_digest_covers_every_file_a_deployment_reads(sign_verdict, client, digits_zoo, tmp_path):
    """Rewriting MLmodel (what `mlflow models serve` follows) or adding a file to the model
    after a pass, without touching the audited graph, is no longer that pass."""
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme")
    sign_verdict(client, ref, "passed")
    evil = tmp_path / "evil.onnx"
    evil.write_bytes(Path(digits_zoo.badnets_cnn).read_bytes())
    source = client.get_model_version(ref.name, ref.version).source
    client.log_model_artifact(source.removeprefix("models:/"), str(evil))
    passed, line = promotion.check(client, ref.uri, attestation.public_key())
    assert not passed and "bytes changed" in line


def test_an_error_marked_without_the_key_still_ends_an_earlier_pass(sign_verdict, client, digits_zoo):
    """On a cluster the receiver and the exit handler hold only the public key: their
    `error` must still outrank the version's earlier signed pass, whatever tags the
    provider puts back."""
    ref = registry.register_version(client, _name(), digits_zoo.clean_cnn, "acme")
    sign_verdict(client, ref, "passed")
    saved = client.get_model_version(ref.name, ref.version).tags[registry.ATTESTATION]
    time.sleep(0.01)
    promotion.mark_error(client, ref, "re-audit past its time budget", None)
    registry.set_status(client, ref, "passed", **{registry.ATTESTATION: saved})
    passed, line = promotion.check(client, ref.uri, attestation.public_key())
    assert not passed and "ended in error" in line


def test_one_broken_model_does_not_stop_the_sweep_for_the_others(
    sign_verdict, client, mlflow_server, digits_zoo, tmp_path
):
    """A provider that breaks its own MLmodel, or names its model with a quote, must not
    keep the guard from every other model's alias."""
    broken = registry.register_version(client, f"{_name()}'s", digits_zoo.clean_cnn, "acme")
    sign_verdict(client, broken, "passed")
    client.set_registered_model_alias(broken.name, "production", broken.version)
    model_id = client.get_model_version(broken.name, broken.version).source.removeprefix("models:/")
    mlmodel = tmp_path / "MLmodel"
    mlmodel.write_text("flavors:\n  onnx: not-a-mapping\n")
    client.log_model_artifact(model_id, str(mlmodel))
    victim = registry.register_version(client, _name(), digits_zoo.badnets_cnn, "globex")
    client.set_registered_model_alias(victim.name, "production", victim.version)

    receiver = Receiver(ReceiverConfig(mlflow_server, SECRET, tmp_path / "queue.db"))
    try:
        receiver.reconcile()
    finally:
        receiver.queue.close()
    held = {ref.name for ref in registry.promoted_versions(client)}
    assert broken.name not in held and victim.name not in held


def test_a_provider_writing_the_alias_in_a_loop_queues_a_bounded_number_of_guards():
    """At most one guard per version per window of arrival, each run only once its window
    has closed: it sees every write of its window, so a second write right after the guard
    ran still meets a guard (its own window's)."""
    from crossaudit.mlops.receiver import GUARD_WINDOW_S

    start, alias = 1_800_000_000.0, {"name": "m", "version": "1", "alias": "production"}
    jobs = [
        job
        for tenth in range(1000)  # a write every 0.1 s for 100 s
        for job in jobs_for(Delivery(str(uuid.uuid4()), int(start), "model_version_alias.created", alias),
                            "production", start + tenth / 10)
    ]  # fmt: skip
    windows = {job.key: job.not_before for job in jobs}
    assert len(windows) <= 100 / GUARD_WINDOW_S + 1
    arrivals = [start + tenth / 10 for tenth in range(1000)]
    assert all(any(arrival < due <= arrival + GUARD_WINDOW_S for due in windows.values()) for arrival in arrivals)


def test_providers_are_mapped_by_experiment_id_so_names_can_be_neither_squatted_nor_renamed(client, digits_zoo):
    """A provider can rename its own experiment to the name a newcomer's experiment will
    have, or create that experiment first: neither makes its delivery the newcomer's."""
    config = operator_config.config_path()
    newcomer = f"newcomer-{uuid.uuid4().hex[:6]}"
    acme = client.get_experiment_by_name(operator_config.provider_experiment("acme"))
    client.rename_experiment(acme.experiment_id, operator_config.provider_experiment(newcomer))
    try:
        name = _name()
        ref = registry.register_version(client, name, digits_zoo.clean_cnn, newcomer)  # logged in acme's experiment
        with pytest.raises(registry.RegistryError, match="delivered by 'acme'"):
            registry.peers_of(client, registry.resolve(client, ref.uri), operator_config.load())
        client.delete_model_version_tag(name, ref.version, registry.PROVIDER_TAG)
        resolver = registry.ProviderResolver(client, operator_config.load())
        assert resolver.provider(registry.resolve(client, ref.uri)) == "acme"
        with pytest.raises(operator_config.ConfigError, match="someone else created it"):
            operator_config.onboard(client, [newcomer], config)
    finally:
        client.rename_experiment(acme.experiment_id, operator_config.provider_experiment("acme"))
