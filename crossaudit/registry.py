"""MLflow: resolve registered versions, record audits, and gate the promotion alias.

Provider files come out of MLflow as *files* (`download_artifacts`), never through a
flavor's loader, so nothing a provider uploaded is unpickled. The gate is the only code
that sets the promotion alias, and only on a version whose latest audit passed; every
other outcome (failed, inconclusive, error, awaiting a peer) leaves production alone.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.store.entities.paged_list import PagedList
from mlflow.tracking import MlflowClient

from crossaudit.errors import AuditError
from crossaudit.paradigms import AUTO
from crossaudit.tokenizer import tokenizer_path

EXPERIMENT = "crossaudit"
PROVIDER_TAG = "provider"
AUDIT_DATA_TAG = "crossaudit.audit_data"
PROFILE_TAG = "crossaudit.threshold_profile"
THRESHOLDS_TAG = "crossaudit.thresholds"
PARADIGM_TAG = "crossaudit.paradigm"
HOLD_TAG = "crossaudit.hold_on_flagged_peer"
STATUS = "crossaudit.status"
VERDICT = "crossaudit.verdict"
SCORE = "crossaudit.score"
RUN_ID = "crossaudit.run_id"
AUDITED_AT = "crossaudit.audited_at"
PEERS = "crossaudit.peers"
ERROR = "crossaudit.error"
INCIDENT = "crossaudit.incident"
DEFAULT_ALIAS = "production"
FINAL = ("passed", "failed", "inconclusive")
STATUSES = ("pending", "running", "passed", "failed", "inconclusive", "awaiting-peer", "error")
_REMOTE = re.compile(r"^(models|runs|mlflow-artifacts|s3|gs|wasbs|https?):")
_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


class RegistryError(AuditError):
    """The registry could not answer: unknown model, bad URI, server down."""


@dataclass(frozen=True)
class VersionRef:
    name: str
    version: str

    @classmethod
    def of(cls, version: ModelVersion) -> VersionRef:
        return cls(version.name, str(version.version))

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def client(tracking_uri: str | None = None) -> MlflowClient:
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    return MlflowClient()


def resolve(mlflow_client: MlflowClient, uri: str) -> ModelVersion:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` to the registered version."""
    match = _MODELS_URI.match(uri)
    if match is None:
        raise RegistryError(f"{uri!r}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    try:
        if match["version"]:
            return mlflow_client.get_model_version(match["name"], match["version"])
        return mlflow_client.get_model_version_by_alias(match["name"], match["alias"])
    except MlflowException as exc:
        raise RegistryError(f"{uri}: {exc.message}") from exc


def peers_of(mlflow_client: MlflowClient, version: ModelVersion) -> list[ModelVersion]:
    """The latest version of every *other* provider of the same registered model."""
    if not version.tags.get(PROVIDER_TAG):
        raise RegistryError(f"models:/{version.name}/{version.version} has no {PROVIDER_TAG!r} tag")
    return _latest_of_other_providers(version, model_versions(mlflow_client, version.name))


def _latest_of_other_providers(version: ModelVersion, candidates: list[ModelVersion]) -> list[ModelVersion]:
    provider = version.tags.get(PROVIDER_TAG)
    latest: dict[str, ModelVersion] = {}
    for candidate in candidates:
        other = candidate.tags.get(PROVIDER_TAG)
        if candidate.name != version.name or not other or other == provider:
            continue
        if other not in latest or int(candidate.version) > int(latest[other].version):
            latest[other] = candidate
    return [latest[p] for p in sorted(latest)]


@dataclass(frozen=True)
class AuditSettings:
    """How a registered model's versions are audited, from the model's tags. The fields are
    named as the pipeline's parameters they become (`pipelines.runner.pipeline_arguments`)."""

    audit_data_uri: str
    threshold_profile: str  # empty: the paradigm's default profile
    thresholds_uri: str  # the model's own thresholds (`crossaudit calibrate --pair`); empty: the shipped ones
    paradigm: str  # `auto`: inferred from the models
    hold_on_flagged_peer: bool  # hold a version whose peer was judged backdoored (`gate.version_status`)


def audit_settings(mlflow_client: MlflowClient, name: str) -> AuditSettings:
    """The registered model's audit settings, read in one request, so that one audit's
    settings are one snapshot of the tags even while someone edits them.

    An audit set is required, and the hold setting must be "true" or "false": a misspelt
    safety setting must not silently read as off.
    """
    tags = mlflow_client.get_registered_model(name).tags
    if not tags.get(AUDIT_DATA_TAG):
        raise RegistryError(f"registered model {name!r} has no {AUDIT_DATA_TAG!r} tag pointing at its audit set")
    hold = tags.get(HOLD_TAG, "false").strip().lower()
    if hold not in ("true", "false"):
        raise RegistryError(f"registered model {name!r}: tag {HOLD_TAG!r} must be 'true' or 'false', not {hold!r}")
    return AuditSettings(
        audit_data_uri=tags[AUDIT_DATA_TAG],
        threshold_profile=tags.get(PROFILE_TAG, ""),
        thresholds_uri=tags.get(THRESHOLDS_TAG, ""),
        paradigm=tags.get(PARADIGM_TAG, AUTO),
        hold_on_flagged_peer=hold == "true",
    )


def materialize(uri: str, dest: Path) -> Path:
    """Copy a model or audit set (local path, `models:/`, `runs:/`, `mlflow-artifacts:/`)
    into `dest` as plain files and return the path the loaders should open."""
    dest.mkdir(parents=True, exist_ok=True)
    if not _REMOTE.match(uri):
        local = Path(uri.removeprefix("file://"))
        if not local.exists():
            raise RegistryError(f"{uri}: no such file or directory")
        target = dest / local.name
        if local.is_dir():
            shutil.copytree(local, target, dirs_exist_ok=True)
        else:
            shutil.copy2(local, target)
        return target
    staging = dest / ".download"
    try:
        downloaded = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(staging)))
    except (MlflowException, OSError) as exc:
        raise RegistryError(f"{uri}: could not download ({exc})") from exc
    target = dest / (downloaded.name if downloaded.is_file() else "model")
    downloaded.rename(target)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def local_models(uris: list[str], tracking_uri: str | None, dest: Path) -> list[str]:
    """What `crossaudit audit` opens: files and MLflow model directories as given, and
    MLflow URIs (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/...`) downloaded as
    files into `dest` first (MLflow's artifact download only, never a flavor loader)."""
    if tracking_uri:
        client(tracking_uri)
    return [
        str(materialize(uri, dest / f"model_{index}")) if _REMOTE.match(uri) else uri.removeprefix("file://")
        for index, uri in enumerate(uris)
    ]


def fetch_inputs(
    suspect_uri: str, witness_uri: str, data_uri: str, tracking_uri: str, suspect: Path, witness: Path, data: Path
) -> None:
    """Bring both models and the audit set out of MLflow (or the file system) as files.
    An empty `tracking_uri` keeps MLflow's own default (environment or local)."""
    if tracking_uri:
        client(tracking_uri)
    for uri, dest in ((suspect_uri, suspect), (witness_uri, witness), (data_uri, data)):
        materialize(uri, dest)


def set_status(mlflow_client: MlflowClient, version: VersionRef, status: str, **tags: str) -> None:
    """Write the audit tags on a version, `crossaudit.status` last: MLflow sets one tag per
    call, and whoever watches the status (a deploy script, the demo, the tests) must find
    the error, run or verdict it names already there when it changes."""
    if status not in STATUSES:
        raise ValueError(f"unknown audit status {status!r}")
    for key, value in {**tags, STATUS: status}.items():
        mlflow_client.set_model_version_tag(version.name, version.version, key, value)


def append_description(mlflow_client: MlflowClient, version: VersionRef, line: str) -> None:
    """Add one line to the version's description; the provider's text is kept."""
    current = mlflow_client.get_model_version(version.name, version.version).description or ""
    text = f"{current.rstrip()}\n\n{line}" if current.strip() else line
    mlflow_client.update_model_version(version.name, version.version, description=text)


def status_of(version: ModelVersion) -> str | None:
    return version.tags.get(STATUS)


def gate(mlflow_client: MlflowClient, version: VersionRef, alias: str = DEFAULT_ALIAS) -> bool:
    """Point `alias` at `version` when its latest audit passed; never away from a passed
    version to anything else. Returns whether the alias now points at `version`."""
    current = mlflow_client.get_model_version(version.name, version.version)
    if status_of(current) != "passed":
        return False
    try:
        holder = mlflow_client.get_model_version_by_alias(version.name, alias)
    except MlflowException:
        holder = None
    newer_passed = holder is not None and int(holder.version) > int(version.version) and status_of(holder) == "passed"
    if newer_passed:
        return False
    mlflow_client.set_registered_model_alias(version.name, alias, version.version)
    return True


def revoke(mlflow_client: MlflowClient, version: VersionRef, alias: str = DEFAULT_ALIAS) -> bool:
    """Take `alias` off `version` when it holds it (a re-audit that did not pass).
    Returns whether it was removed."""
    try:
        holder = mlflow_client.get_model_version_by_alias(version.name, alias)
    except MlflowException:
        return False
    if holder.version != version.version:
        return False
    mlflow_client.delete_registered_model_alias(version.name, alias)
    return True


def guard_alias(mlflow_client: MlflowClient, version: VersionRef, alias: str = DEFAULT_ALIAS) -> str | None:
    """The alias guard: when `alias` points at `version` and that version has not passed,
    take the alias off, give it back to the newest passed version (if any), and tag and
    describe the incident on the offending version (the tag last, so that its presence
    means the alias is restored and the description written). Returns the incident, or None when
    there was nothing to undo (the alias moved on since, or the version passed)."""
    try:
        holder = mlflow_client.get_model_version_by_alias(version.name, alias)
    except MlflowException:
        return None
    if holder.version != version.version or status_of(holder) == "passed":
        return None
    mlflow_client.delete_registered_model_alias(version.name, alias)
    passed = [
        v for v in mlflow_client.search_model_versions(f"name='{version.name}'")
        if status_of(v) == "passed" and v.version != version.version
    ]  # fmt: skip
    restored = max(passed, key=lambda v: int(v.version), default=None)
    if restored is not None:
        mlflow_client.set_registered_model_alias(version.name, alias, restored.version)
    back = f"; restored to version {restored.version}" if restored else "; no passed version to restore"
    status = status_of(holder) or "none"
    incident = f"{now()}: alias {alias!r} set on a version whose audit status is {status}: removed{back}"
    append_description(mlflow_client, version, f"**crossaudit incident:** {incident}")
    # The tag goes last: a watcher that sees it sees the whole incident handled.
    mlflow_client.set_model_version_tag(version.name, version.version, INCIDENT, incident)
    return incident


def promoted_versions(mlflow_client: MlflowClient, alias: str = DEFAULT_ALIAS) -> list[VersionRef]:
    """Every version that holds `alias`, one per registered model (for re-audits)."""
    return [
        VersionRef(model.name, str(model.aliases[alias]))
        for model in _all(mlflow_client.search_registered_models)
        if alias in model.aliases
    ]


def model_versions(mlflow_client: MlflowClient, name: str | None = None) -> list[ModelVersion]:
    """Every version of registered model `name` (of every model when None), all pages."""
    return _all(functools.partial(mlflow_client.search_model_versions, f"name='{name}'" if name else None))


def unaudited_versions(versions: list[ModelVersion]) -> list[VersionRef]:
    """Versions a provider delivered (they carry the provider tag) with no audit status:
    what a lost webhook leaves behind."""
    return [VersionRef.of(v) for v in versions if v.tags.get(PROVIDER_TAG) and not status_of(v)]


def waiting_for_peers(versions: list[ModelVersion]) -> list[tuple[VersionRef, str]]:
    """Of `versions` (all those of the models concerned), the ones still `awaiting-peer`
    whose model now holds another provider's version, each with the newest such version:
    audit them again (keyed by that peer, so once per peer)."""
    due = []
    for version in versions:
        if status_of(version) != "awaiting-peer":
            continue
        peers = _latest_of_other_providers(version, versions)
        if peers:
            due.append((VersionRef.of(version), str(max(int(p.version) for p in peers))))
    return due


def _all(search: Callable[..., PagedList]) -> list:
    """Every page of an MLflow search."""
    items, token = [], None
    while True:
        page = search(max_results=1000, page_token=token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def check(mlflow_client: MlflowClient, uri: str) -> tuple[bool, str]:
    """Whether the version behind `uri` passed its audit, and a line saying so."""
    version = resolve(mlflow_client, uri)
    status = status_of(version) or "never audited"
    return status == "passed", f"{uri} -> version {version.version}: {status}"


def record_run(
    mlflow_client: MlflowClient,
    version: VersionRef,
    params: dict[str, str],
    metrics: dict[str, float],
    artifacts: Path,
) -> str:
    """One MLflow run in experiment `crossaudit` per audit of a version; returns its id."""
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else mlflow_client.create_experiment(EXPERIMENT)
    run = mlflow_client.create_run(
        experiment_id,
        tags={"mlflow.runName": f"audit {version.name} v{version.version}", "crossaudit.model_version": version.uri},
    )
    run_id = run.info.run_id
    try:
        stamp = int(time.time() * 1000)
        mlflow_client.log_batch(  # one request, not one per value
            run_id,
            metrics=[Metric(key, value, stamp, 0) for key, value in metrics.items()],
            params=[Param(key, value) for key, value in params.items()],
        )
        mlflow_client.log_artifacts(run_id, str(artifacts))
    except Exception:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    mlflow_client.set_terminated(run_id, "FINISHED")
    return run_id


def run_link(mlflow_client: MlflowClient, run_id: str) -> str:
    """The audit run's page in the MLflow UI, relative to the UI itself, so the link in a
    version's description still works behind another host name, port or proxy."""
    run = mlflow_client.get_run(run_id)
    return f"#/experiments/{run.info.experiment_id}/runs/{run_id}"


def register_version(
    mlflow_client: MlflowClient, name: str, onnx_path: Path, provider: str, description: str = ""
) -> VersionRef:
    """What a provider does: log an ONNX model, register it under `name`, tag its provider.

    The version is created with its `provider` tag in one call, so an audit triggered by
    the registration always knows who sent it. A tokenizer beside the model (a language
    model's or captioner's `NAME.tokenizer.json`) goes into the model as `tokenizer.json`.
    """
    import onnx

    mlflow.set_experiment(f"{name}-providers")
    with mlflow.start_run(run_name=f"{provider} delivery"):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model")
    if tokenizer_path(onnx_path).is_file():
        with tempfile.TemporaryDirectory() as staging:
            shutil.copy2(tokenizer_path(onnx_path), Path(staging) / "tokenizer.json")
            mlflow_client.log_model_artifact(info.model_id, str(Path(staging) / "tokenizer.json"))
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        mlflow_client.create_registered_model(name)
    version = mlflow_client.create_model_version(
        name, info.model_uri, run_id=info.run_id, tags={PROVIDER_TAG: provider}, description=description,
        model_id=info.model_id,
    )  # fmt: skip
    return VersionRef(name, str(version.version))


def publish_audit_data(mlflow_client: MlflowClient, name: str, path: Path) -> str:
    """Store the auditor's set as a run artifact and point the registered model at it."""
    return _publish(mlflow_client, name, path, AUDIT_DATA_TAG, "audit set")


def publish_thresholds(mlflow_client: MlflowClient, name: str, path: Path) -> str:
    """Store a thresholds file calibrated on the task's own clean pairs (`crossaudit
    calibrate --pair`) as a run artifact and point the registered model at it: the gate
    then judges every audit of the model with it (its single profile, or the one the
    `crossaudit.threshold_profile` tag names)."""
    return _publish(mlflow_client, name, path, THRESHOLDS_TAG, "thresholds")


def _publish(mlflow_client: MlflowClient, name: str, path: Path, tag: str, what: str) -> str:
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"{what} for {name}") as run:
        mlflow.log_artifact(str(path))
    uri = f"runs:/{run.info.run_id}/{path.name}"
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        mlflow_client.create_registered_model(name)
    mlflow_client.set_registered_model_tag(name, tag, uri)
    return uri


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def close_audit(model_uri: str, tracking_uri: str, state: str, message: str) -> str:
    """The pipeline's exit handler: a run that ended without the gate's final word marks
    the version `error` (fail closed: a missing result never reads as passed)."""
    mlflow_client = client(tracking_uri)
    version = resolve(mlflow_client, model_uri)
    status = status_of(version)
    if state == "SUCCEEDED" and status in FINAL:
        return status
    reason = message or f"audit pipeline ended {state} without a verdict"
    set_status(
        mlflow_client, VersionRef.of(version), "error",
        **{ERROR: reason[:4000], AUDITED_AT: now()},
    )  # fmt: skip
    return "error"
