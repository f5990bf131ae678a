"""MLflow: resolve registered versions, record audits, and gate the promotion alias.

Provider files come out of MLflow as *files* (`download_artifacts`), never through a
flavor's loader, so nothing a provider uploaded is unpickled. The gate is the only code
that sets the promotion alias, and only on a version whose latest audit passed; every
other outcome (failed, inconclusive, error, awaiting a peer) leaves production alone.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
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
from crossaudit.mlops import operator_config
from crossaudit.mlops.operator_config import OperatorConfig, Pinned
from crossaudit.modelio.digest import file_sha256
from crossaudit.modelio.tokenizer import tokenizer_path
from crossaudit.paradigms import AUTO

EXPERIMENT = "crossaudit"
PROVIDER_TAG = "provider"  # a label for people; who delivered a version is the operator's configuration's word
STATUS = "crossaudit.status"
VERDICT = "crossaudit.verdict"
SCORE = "crossaudit.score"
RUN_ID = "crossaudit.run_id"
AUDITED_AT = "crossaudit.audited_at"
PEERS = "crossaudit.peers"
ERROR = "crossaudit.error"
INCIDENT = "crossaudit.incident"
ATTESTATION = "crossaudit.attestation"
MODEL_VERSION_TAG = "crossaudit.model_version"  # on every audit run: the version it judged
DEFAULT_ALIAS = "production"
FINAL = ("passed", "failed", "inconclusive")
STATUSES = ("pending", "running", "passed", "failed", "inconclusive", "awaiting-peer", "error")
_REMOTE = re.compile(r"^(models|runs|mlflow-artifacts|s3|gs|wasbs|https?):")
_LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[0-9a-f]{32})/(?P<path>[\w./-]+)$")
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


# MLflow's own HTTP defaults (7 retries with exponential backoff, a 120 s timeout) make a
# command against a server that is down wait about four minutes before it says anything.
# Unless the operator set them, a server gets a few seconds to answer and two retries.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}  # fmt: skip
REACH_TIMEOUT_S = 5.0


def client(tracking_uri: str | None = None) -> MlflowClient:
    """A client of the tracking server, once it answers: a server that cannot be reached is
    a one-line error naming it, in seconds, not a retry loop (`HTTP_DEFAULTS`)."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
    _check_reachable(mlflow.get_tracking_uri())
    return MlflowClient()


def _check_reachable(tracking_uri: str) -> None:
    """Raise ConnectionError (an OSError, as every caller already treats an unreachable
    service) when an HTTP tracking server does not answer its health check. Only a server
    that cannot be reached at all counts: an HTTP error is an answer, and a TLS failure is
    for MLflow's own client to judge with its certificate settings."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(tracking_uri)
    # Without any user and password in the URI: /health needs none, and a message may not show them.
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname or ""
    server = parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")).geturl()
    try:
        with urllib.request.urlopen(f"{server.rstrip('/')}/health", timeout=REACH_TIMEOUT_S):
            return
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return
        raise ConnectionError(f"MLflow server {server} cannot be reached: {reason}") from exc


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


class ProviderResolver:
    """Who delivered each version, by the operator's configuration: the MLflow user who
    registered it, else the ID of the experiment its model was logged in. A `provider`
    tag that names someone else is refused, so a label cannot mislead a person either."""

    def __init__(self, mlflow_client: MlflowClient, config: OperatorConfig) -> None:
        self.client, self.config = mlflow_client, config

    def _logged_in(self, version: ModelVersion) -> str | None:
        """The ID of the experiment the version's model was logged in: its logged model's
        (the source `models:/m-...`) and its run's, which must agree. A source that is
        neither that logged model nor inside the run's artifacts names no experiment."""
        source, experiments = str(version.source), set()
        logged = _LOGGED_MODEL_URI.match(source)
        if logged:
            experiments.add(self.client.get_logged_model(logged["model_id"]).experiment_id)
        if version.run_id:
            run = self.client.get_run(version.run_id)
            if not logged and not source.startswith(run.info.artifact_uri.rstrip("/") + "/"):
                return None
            experiments.add(run.info.experiment_id)
        return experiments.pop() if len(experiments) == 1 else None

    def provider(self, version: ModelVersion) -> str:
        where = f"models:/{version.name}/{version.version}"
        try:
            provider = self.config.users.get(version.user_id or "")
            experiment = None if provider else self._logged_in(version)
        except MlflowException as exc:
            raise RegistryError(f"{where}: could not look up who delivered it: {exc.message}") from exc
        provider = provider or self.config.experiments.get(experiment or "")
        if provider is None:
            raise RegistryError(
                f"{where}: delivered by no provider the operator's configuration knows "
                f"(user {version.user_id or 'unknown'!r}, experiment id {experiment or 'unknown'!r})"
            )
        label = version.tags.get(PROVIDER_TAG)
        if label and label != provider:
            raise RegistryError(f"{where}: tagged {PROVIDER_TAG}={label!r}, but it was delivered by {provider!r}")
        return provider

    def known(self, version: ModelVersion) -> str | None:
        """The provider, or None when it cannot be told (such a version is nobody's peer)."""
        try:
            return self.provider(version)
        except RegistryError:
            return None


def peers_of(mlflow_client: MlflowClient, version: ModelVersion, config: OperatorConfig) -> list[ModelVersion]:
    """The latest version of every *other* provider of the same registered model."""
    resolver = ProviderResolver(mlflow_client, config)
    return _latest_of_other_providers(
        resolver.provider(version), resolver, model_versions(mlflow_client, version.name), version.name
    )


def _latest_of_other_providers(
    provider: str, resolver: ProviderResolver, candidates: list[ModelVersion], name: str
) -> list[ModelVersion]:
    latest: dict[str, ModelVersion] = {}
    for candidate in candidates:
        other = resolver.known(candidate) if candidate.name == name else None
        if not other or other == provider:
            continue
        if other not in latest or int(candidate.version) > int(latest[other].version):
            latest[other] = candidate
    return [latest[p] for p in sorted(latest)]


@dataclass(frozen=True)
class AuditSettings:
    """How a registered model's versions are audited, from the operator's configuration.
    The fields are named as the pipeline's parameters they become
    (`pipelines.runner.pipeline_arguments`)."""

    audit_data_uri: str
    audit_data_sha256: str
    threshold_profile: str  # empty: the paradigm's default profile
    thresholds_uri: str  # the model's own thresholds (`crossaudit calibrate --pair`); empty: the shipped ones
    thresholds_sha256: str
    paradigm: str  # `auto`: inferred from the models
    hold_on_flagged_peer: bool  # hold a version whose peer was judged backdoored (`gate.version_status`)


def audit_settings(config: OperatorConfig, name: str) -> AuditSettings:
    """The registered model's audit settings. Its tags are not read: a provider can write them."""
    settings = config.settings(name)
    thresholds = settings.thresholds
    return AuditSettings(
        audit_data_uri=settings.audit_data.uri,
        audit_data_sha256=settings.audit_data.sha256,
        threshold_profile=settings.threshold_profile,
        thresholds_uri=thresholds.uri if thresholds else "",
        thresholds_sha256=thresholds.sha256 if thresholds else "",
        paradigm=settings.paradigm or AUTO,
        hold_on_flagged_peer=settings.hold_on_flagged_peer,
    )


def fetch_pinned(uri: str, sha256: str, dest: Path) -> Path:
    """An operator's artifact (audit set, thresholds) as a file in `dest`: only a run
    artifact of crossaudit's own experiment, and only with the bytes the operator pinned.
    A local path would let whoever names it copy the auditor's own files into the audit."""
    match = _RUNS_URI.match(uri)
    if match is None or ".." in match["path"].split("/"):
        raise RegistryError(f"{uri!r}: audit data and thresholds must be runs:/RUN_ID/PATH artifacts")
    mlflow_client = MlflowClient()
    try:
        run = mlflow_client.get_run(match["run_id"])
        experiment = mlflow_client.get_experiment(run.info.experiment_id).name
    except MlflowException as exc:
        raise RegistryError(f"{uri}: {exc.message}") from exc
    if experiment != EXPERIMENT:
        raise RegistryError(f"{uri}: a run of experiment {experiment!r}; operator artifacts live in {EXPERIMENT!r}")
    target = materialize(uri, dest)
    found = file_sha256(target) if target.is_file() else "a directory"
    if found != sha256:
        raise RegistryError(f"{uri}: sha256 {found} where the operator's configuration pins {sha256}")
    return target


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
    suspect_uri: str,
    witness_uri: str,
    data_uri: str,
    data_sha256: str,
    tracking_uri: str,
    suspect: Path,
    witness: Path,
    data: Path,
) -> None:
    """Bring both registered versions and the operator's pinned audit set out of MLflow as
    files. An empty `tracking_uri` keeps MLflow's own default (environment or local)."""
    if tracking_uri:
        client(tracking_uri)
    for uri, dest in ((suspect_uri, suspect), (witness_uri, witness)):
        if not _MODELS_URI.match(uri):
            raise RegistryError(f"{uri!r}: the pipeline audits registered versions (models:/NAME/VERSION)")
        materialize(uri, dest)
    fetch_pinned(data_uri, data_sha256, data)


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


def promoted_versions(mlflow_client: MlflowClient, alias: str = DEFAULT_ALIAS) -> list[VersionRef]:
    """Every version that holds `alias`, one per registered model (for re-audits)."""
    return [
        VersionRef(model.name, str(model.aliases[alias]))
        for model in _all(mlflow_client.search_registered_models)
        if alias in model.aliases
    ]


def quoted(value: str) -> str:
    """`value` as a string literal of MLflow's search filters, which have no escape: a
    name holding both quote characters cannot be searched for, and is refused."""
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise RegistryError(f"{value!r}: a name with both quote characters cannot be searched for in MLflow")


def model_versions(mlflow_client: MlflowClient, name: str | None = None) -> list[ModelVersion]:
    """Every version of registered model `name` (of every model when None), all pages."""
    return _all(functools.partial(mlflow_client.search_model_versions, f"name={quoted(name)}" if name else None))


def unaudited_versions(versions: list[ModelVersion]) -> list[VersionRef]:
    """Versions with no audit status: what a lost webhook leaves behind. Every registered
    version is a delivery; one whose provider cannot be told ends `error` when audited."""
    return [VersionRef.of(v) for v in versions if not status_of(v)]


def waiting_for_peers(
    mlflow_client: MlflowClient, versions: list[ModelVersion], config: OperatorConfig
) -> list[tuple[VersionRef, str]]:
    """Of `versions` (all those of the models concerned), the ones still `awaiting-peer`
    whose model now holds another provider's version, each with the newest such version:
    audit them again (keyed by that peer, so once per peer)."""
    due = []
    resolver = ProviderResolver(mlflow_client, config)
    for version in versions:
        provider = resolver.known(version) if status_of(version) == "awaiting-peer" else None
        if provider is None:
            continue
        peers = _latest_of_other_providers(provider, resolver, versions, version.name)
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


def audit_experiment_id(mlflow_client: MlflowClient) -> str:
    """crossaudit's own experiment (its store of audit runs and verdicts), created on first use."""
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    return experiment.experiment_id if experiment else mlflow_client.create_experiment(EXPERIMENT)


def record_run(
    mlflow_client: MlflowClient,
    version: VersionRef,
    params: dict[str, str],
    metrics: dict[str, float],
    artifacts: Path,
) -> str:
    """One MLflow run in experiment `crossaudit` per audit of a version; returns its id."""
    run = mlflow_client.create_run(
        audit_experiment_id(mlflow_client),
        tags={"mlflow.runName": f"audit {version.name} v{version.version}", MODEL_VERSION_TAG: version.uri},
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
    """What a provider does: log an ONNX model in its own experiment (`operator_config.provider_experiment`),
    register it under `name`, and label it with its name. The operator's configuration
    maps that experiment to the provider. A tokenizer beside the model (a language model's
    or captioner's `NAME.tokenizer.json`) goes into the model as `tokenizer.json`.
    """
    import onnx

    mlflow.set_experiment(operator_config.provider_experiment(provider))
    with mlflow.start_run(run_name=f"{provider} delivery"):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_path)), name="model", save_as_external_data=False)
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


def publish_audit_data(mlflow_client: MlflowClient, name: str, path: Path, config_path: Path | None = None) -> Pinned:
    """What the operator does: store its audit set in crossaudit's experiment and pin it,
    by sha256, as model `name`'s audit set in the operator's configuration."""
    pinned = _publish(mlflow_client, name, path, "audit set")
    operator_config.update_model(name, config_path, audit_data=pinned)
    return pinned


def publish_thresholds(mlflow_client: MlflowClient, name: str, path: Path, config_path: Path | None = None) -> Pinned:
    """Store a thresholds file calibrated on the task's own clean pairs (`crossaudit
    calibrate --pair`) and pin it as model `name`'s thresholds: the gate then judges every
    audit of the model with it."""
    pinned = _publish(mlflow_client, name, path, "thresholds")
    operator_config.update_model(name, config_path, thresholds=pinned)
    return pinned


def _publish(mlflow_client: MlflowClient, name: str, path: Path, what: str) -> Pinned:
    mlflow.set_experiment(EXPERIMENT)
    with mlflow.start_run(run_name=f"{what} for {name}") as run:
        mlflow.log_artifact(str(path))
    try:
        mlflow_client.get_registered_model(name)
    except MlflowException:
        mlflow_client.create_registered_model(name)
    return Pinned(f"runs:/{run.info.run_id}/{path.name}", file_sha256(path))


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
