"""The promotion alias and the verdicts that decide it.

Only a version with a passing attestation that crossaudit itself signed for that
version's bytes may hold the promotion alias (`crossaudit.attestation`). The gate signs;
the gate, the alias guard, `crossaudit check` and the re-audits verify
(`verify_version`). The status tags stay for people and the MLflow UI, and the sweep
puts them back when someone else rewrites them (`restore_forged_statuses`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from crossaudit.mlops import attestation, registry
from crossaudit.mlops.attestation import Attestation, AttestationError
from crossaudit.mlops.registry import VersionRef
from crossaudit.modelio.digest import artifact_digest

log = logging.getLogger(__name__)
_STORE_SEARCH = 200
UNSIGNED_STATUS = "crossaudit.unsigned_status"  # on a store run: a status written without the key


@dataclass(frozen=True)
class Verified:
    """What a version's attestation proves: `passed` only for a valid, current, passing
    attestation of these bytes; `reason` says why not."""

    passed: bool
    status: str
    reason: str
    attestation: Attestation | None = None


def _store_runs(mlflow_client: MlflowClient, ref: VersionRef) -> list:
    """The runs of crossaudit's experiment about `ref`: its audits and its error marks."""
    experiment = mlflow_client.get_experiment_by_name(registry.EXPERIMENT)
    if experiment is None:
        return []
    return mlflow_client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{registry.MODEL_VERSION_TAG}` = {registry.quoted(ref.uri)}",
        max_results=_STORE_SEARCH,
        order_by=["attributes.start_time DESC"],
    )


def _unsigned_error_after(runs: list, signed_at: float) -> bool:
    """Whether crossaudit's store `runs` hold an `error` marked without the key (the
    receiver and the exit handler on a cluster hold only the public key) after the signed
    verdict of `signed_at`. Such a mark can only take a pass away, so it needs no signature."""
    return any(run.data.tags.get(UNSIGNED_STATUS) == "error" and run.info.start_time / 1000 > signed_at for run in runs)


def stored_attestation(runs: list, ref: VersionRef, key: Ed25519PublicKey) -> Attestation | None:
    """The newest attestation of `ref` that crossaudit's own store `runs` (of its
    experiment, `_store_runs`) hold and its key signed. Tags on those runs that do not
    verify are ignored: only signed ones count, and the newest signed one is the verdict,
    so a restored older pass never outranks a later failure."""
    newest = None
    for run in runs:
        try:
            found = attestation.verify(key, run.data.tags.get(registry.ATTESTATION))
        except AttestationError:
            continue
        if (found.name, found.version) == (ref.name, ref.version) and (
            newest is None or found.signed_at > newest.signed_at
        ):
            newest = found
    return newest


def model_digest(ref: VersionRef) -> str:
    """The digest of the version's whole model artifact as MLflow serves it now."""
    with tempfile.TemporaryDirectory(prefix="crossaudit-verify-") as scratch:
        return artifact_digest(registry.materialize(ref.uri, Path(scratch)))


def verify_version(
    mlflow_client: MlflowClient, version: ModelVersion, key: Ed25519PublicKey, check_bytes: bool = True
) -> Verified:
    """Whether `version` holds a passing verdict crossaudit signed, is the newest in its
    store, and (with `check_bytes`) names the bytes the registry serves for it now."""
    ref = VersionRef.of(version)
    try:
        claimed = attestation.verify(key, version.tags.get(registry.ATTESTATION))
    except AttestationError as exc:
        return Verified(False, "unattested", str(exc))
    if (claimed.name, claimed.version) != (ref.name, ref.version):
        return Verified(False, "unattested", f"attestation is for models:/{claimed.name}/{claimed.version}")
    runs = _store_runs(mlflow_client, ref)
    stored = stored_attestation(runs, ref, key)
    if stored != claimed:
        return Verified(False, "unattested", "attestation is not the newest verdict in crossaudit's store", stored)
    if not claimed.passed:
        return Verified(False, claimed.status, f"signed verdict is {claimed.status}", claimed)
    if _unsigned_error_after(runs, claimed.signed_at):
        return Verified(False, "error", "a later audit of this version ended in error", claimed)
    if check_bytes:
        try:
            digest = model_digest(ref)
        except Exception as exc:  # whatever the provider's artifact does to the download, it is no pass
            return Verified(False, "unattested", f"the model cannot be checked against its attestation: {exc}")
        if digest != claimed.model_sha256:
            return Verified(False, "unattested", f"the model's bytes changed since its audit (sha256 {digest})")
    return Verified(True, "passed", "signed verdict: passed", claimed)


def _store_run(mlflow_client: MlflowClient, ref: VersionRef, status: str, **tags: str) -> str:
    """A run of its own in crossaudit's store for a status no audit run carries."""
    run_id = mlflow_client.create_run(
        registry.audit_experiment_id(mlflow_client),
        tags={"mlflow.runName": f"{status} {ref.name} v{ref.version}", registry.MODEL_VERSION_TAG: ref.uri, **tags},
    ).info.run_id
    mlflow_client.set_terminated(run_id, "FINISHED")
    return run_id


def record_verdict(
    mlflow_client: MlflowClient,
    ref: VersionRef,
    status: str,
    model_sha256: str,
    run_id: str | None,
    key: Ed25519PrivateKey,
    **tags: str,
) -> Attestation:
    """Sign `status` for the version's bytes and write it to crossaudit's store (the audit
    run, or a run of its own) and the version's tags, `crossaudit.status` last."""
    run_id = run_id or _store_run(mlflow_client, ref, status)
    signed = attestation.create(ref.name, ref.version, model_sha256, status, run_id)
    text = attestation.sign(key, signed)
    mlflow_client.set_tag(run_id, registry.ATTESTATION, text)
    registry.set_status(mlflow_client, ref, status, **tags, **{registry.ATTESTATION: text})
    return signed


def optional_signing_key() -> Ed25519PrivateKey | None:
    """The signing key when this process was given one (the gate, the exit handler, the
    receiver); an error note written without it is not signed."""
    try:
        return attestation.signing_key()
    except AttestationError:
        return None


def mark_error(mlflow_client: MlflowClient, ref: VersionRef, reason: str, key: Ed25519PrivateKey | None) -> None:
    """The version says `error`, and so does crossaudit's store: signed with the key, or as
    an unsigned mark without it; either way an earlier pass of the version no longer
    verifies (`verify_version`), whatever tags the provider puts back."""
    tags = {registry.ERROR: reason[:4000], registry.AUDITED_AT: registry.now()}
    if key is not None:
        record_verdict(mlflow_client, ref, "error", "", None, key, **tags)
        return
    _store_run(mlflow_client, ref, "error", **{UNSIGNED_STATUS: "error"})
    registry.set_status(mlflow_client, ref, "error", **tags)
    with contextlib.suppress(MlflowException):  # none to remove
        mlflow_client.delete_model_version_tag(ref.name, ref.version, registry.ATTESTATION)


def _holder(mlflow_client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def gate(mlflow_client: MlflowClient, ref: VersionRef, key: Ed25519PublicKey, alias: str) -> bool:
    """Point `alias` at `ref` when its signed verdict passed; never away from a newer
    verified pass. Returns whether the alias now points at `ref`."""
    current = mlflow_client.get_model_version(ref.name, ref.version)
    if not verify_version(mlflow_client, current, key).passed:
        return False
    holder = _holder(mlflow_client, ref.name, alias)
    newer = holder is not None and int(holder.version) > int(ref.version)
    if newer and verify_version(mlflow_client, holder, key).passed:
        return False
    mlflow_client.set_registered_model_alias(ref.name, alias, ref.version)
    return True


def revoke(mlflow_client: MlflowClient, ref: VersionRef, alias: str) -> bool:
    """Take `alias` off `ref` when it holds it (a re-audit that did not pass)."""
    holder = _holder(mlflow_client, ref.name, alias)
    if holder is None or holder.version != ref.version:
        return False
    mlflow_client.delete_registered_model_alias(ref.name, alias)
    return True


def _newest_verified(mlflow_client: MlflowClient, name: str, key: Ed25519PublicKey, skip: str) -> ModelVersion | None:
    candidates = [
        v for v in registry.model_versions(mlflow_client, name)
        if v.version != skip and v.tags.get(registry.ATTESTATION)
    ]  # fmt: skip
    for candidate in sorted(candidates, key=lambda v: int(v.version), reverse=True):
        if verify_version(mlflow_client, candidate, key).passed:
            return candidate
    return None


def guard_alias(mlflow_client: MlflowClient, name: str, key: Ed25519PublicKey, alias: str) -> str | None:
    """The alias guard: when `alias` of model `name` points at a version without a valid
    passing attestation for its bytes, take it off, give it back to the newest version
    that has one (if any), and record the incident on the offending version (the tag
    last, so that its presence means the alias is restored and the description written).
    Returns the incident, or None when the holder verified (or there is none)."""
    holder = _holder(mlflow_client, name, alias)
    if holder is None:
        return None
    verified = verify_version(mlflow_client, holder, key)
    if verified.passed:
        return None
    mlflow_client.delete_registered_model_alias(name, alias)
    restored = _newest_verified(mlflow_client, name, key, holder.version)
    if restored is not None:
        mlflow_client.set_registered_model_alias(name, alias, restored.version)
    back = f"; restored to version {restored.version}" if restored else "; no verified version to restore"
    incident = (
        f"{registry.now()}: alias {alias!r} on a version without a passing verdict ({verified.reason}): removed{back}"
    )
    ref = VersionRef.of(holder)
    registry.append_description(mlflow_client, ref, f"**crossaudit incident:** {incident}")
    mlflow_client.set_model_version_tag(ref.name, ref.version, registry.INCIDENT, incident)
    return incident


def guard_every_alias(mlflow_client: MlflowClient, key: Ed25519PublicKey, alias: str) -> list[str]:
    """The guard over every registered model that holds `alias`: what every sweep and every
    start runs, so a lost alias webhook never leaves an unverified version promoted."""
    incidents = []
    for ref in registry.promoted_versions(mlflow_client, alias):
        try:
            incident = guard_alias(mlflow_client, ref.name, key, alias)
        except Exception:  # one model's registry entry, however broken, must not stop the sweep for the others
            log.exception("alias guard on %s could not run", ref.uri)
            continue
        if incident:
            log.warning("alias guard on %s: %s", ref.uri, incident)
            incidents.append(incident)
    return incidents


def restore_forged_statuses(
    mlflow_client: MlflowClient, versions: list[ModelVersion], key: Ed25519PublicKey
) -> list[VersionRef]:
    """Versions whose `crossaudit.status` reads passed without a current signed pass (a tag
    someone else wrote): set the status back to what crossaudit signed, or `error`, and
    record it, so the MLflow UI never shows a pass the gate did not give."""
    restored = []
    for version in versions:
        if registry.status_of(version) != "passed":
            continue
        try:
            verified = verify_version(mlflow_client, version, key, check_bytes=False)
        except Exception:  # one version that cannot be looked up must not stop the others
            log.exception("could not verify models:/%s/%s", version.name, version.version)
            continue
        if verified.passed:
            continue
        ref = VersionRef.of(version)
        signed = verified.attestation.status if verified.attestation else "error"
        incident = f"{registry.now()}: status 'passed' without crossaudit's signed verdict ({verified.reason})"
        registry.set_status(mlflow_client, ref, signed, **{registry.INCIDENT: incident})
        restored.append(ref)
    return restored


def check(mlflow_client: MlflowClient, uri: str, key: Ed25519PublicKey) -> tuple[bool, str]:
    """Whether the version behind `uri` holds a valid passing verdict for its bytes, and a
    line saying so (with the audit run the verdict names)."""
    version = registry.resolve(mlflow_client, uri)
    verified = verify_version(mlflow_client, version, key)
    run = f" (audit run {verified.attestation.run_id})" if verified.attestation else ""
    return verified.passed, f"{uri} -> version {version.version}: {verified.status}: {verified.reason}{run}"


def close_audit(model_uri: str, tracking_uri: str, state: str, message: str) -> str:
    """The pipeline's exit handler: a run that ended without the gate's final word marks
    the version `error` (fail closed: a missing result never reads as passed)."""
    mlflow_client = registry.client(tracking_uri)
    version = registry.resolve(mlflow_client, model_uri)
    status = registry.status_of(version)
    if state == "SUCCEEDED" and status in registry.FINAL:
        return status
    reason = message or f"audit pipeline ended {state} without a verdict"
    mark_error(mlflow_client, VersionRef.of(version), reason, optional_signing_key())
    return "error"
