"""Start the audit pipeline for one registered version: locally (`kfp.local`) or on a cluster.

This is what `crossaudit audit-version` and the webhook receiver call. It pairs the
version with its peers (the latest version of every other provider), marks it `running`,
and either runs the pipeline in this machine's Python (SubprocessRunner) or submits the
compiled IR to Kubeflow Pipelines. A version with no peer yet is `awaiting-peer`.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass

from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from crossaudit.mlops import operator_config, registry
from crossaudit.mlops.schedule import Cron
from pipelines.audit_pipeline import audit_pipeline, compiled


@dataclass(frozen=True)
class Submission:
    version: registry.VersionRef
    peers: list[str]
    status: str
    kfp_run_id: str | None = None


def pipeline_arguments(
    mlflow_client: MlflowClient, version: ModelVersion, tracking_uri: str, seed: int, device: str, alias: str
) -> dict[str, object]:
    """The pipeline's parameters for one version: its peers and settings by the operator's
    configuration (CROSSAUDIT_CONFIG), never by tags a provider can write."""
    config = operator_config.load()
    peers = [registry.VersionRef.of(p).uri for p in registry.peers_of(mlflow_client, version, config)]
    return {
        "model_uri": registry.VersionRef.of(version).uri, "peer_uris": peers,
        "tracking_uri": tracking_uri, "seed": seed, "device": device, "promotion_alias": alias,
        **asdict(registry.audit_settings(config, version.name)),
    }  # fmt: skip


def kfp_client(host: str):  # kfp is imported only when a cluster is used
    """A Kubeflow Pipelines client that authenticates with the pod's projected service
    account token when one is mounted (multi-user Kubeflow), and anonymously otherwise."""
    import os

    import kfp
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH, ServiceAccountTokenVolumeCredentials

    token_path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV, "") or KF_PIPELINES_SA_TOKEN_PATH
    credentials = ServiceAccountTokenVolumeCredentials(token_path) if os.path.isfile(token_path) else None
    return kfp.Client(host=host, credentials=credentials)


def audit_version(
    uri: str,
    tracking_uri: str,
    kfp_host: str | None = None,
    seed: int = 0,
    device: str = "cpu",
    alias: str = registry.DEFAULT_ALIAS,
) -> Submission:
    """Audit `uri` (models:/NAME/VERSION or @ALIAS) against its peers; see module docstring."""
    mlflow_client = registry.client(tracking_uri)
    version = registry.resolve(mlflow_client, uri)
    ref = registry.VersionRef.of(version)
    arguments = pipeline_arguments(mlflow_client, version, tracking_uri, seed, device, alias)
    if not arguments["peer_uris"]:
        registry.set_status(mlflow_client, ref, "awaiting-peer", **{registry.AUDITED_AT: registry.now()})
        return Submission(ref, [], "awaiting-peer")
    registry.set_status(mlflow_client, ref, "running")
    if kfp_host:
        run = kfp_client(kfp_host).create_run_from_pipeline_package(
            str(compiled(device)), arguments=arguments, run_name=f"crossaudit {ref.name} v{ref.version}"
        )
        return Submission(ref, arguments["peer_uris"], "running", run.run_id)
    from kfp import local

    # kfp.local warns that the components name a non-Python base image; locally they run
    # in this interpreter, which has exactly the packages that image is built from.
    warnings.filterwarnings("ignore", message=".*non-Python base image", category=RuntimeWarning)
    with tempfile.TemporaryDirectory(prefix="crossaudit-kfp-") as root:
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=root, raise_on_error=False)
        audit_pipeline(**arguments)
    finished = mlflow_client.get_model_version(ref.name, ref.version)
    return Submission(ref, arguments["peer_uris"], registry.status_of(finished) or "error")


def schedule_reaudits(
    kfp_host: str, cron: str, tracking_uri: str, alias: str = registry.DEFAULT_ALIAS, device: str = "cpu"
) -> str:
    """Create the Kubeflow recurring run of the re-audit pipeline; returns its id. The
    re-audit task submits its child audits to the same KFP API (`kfp_host`), on `device`."""
    from pipelines.reaudit_pipeline import COMPILED as REAUDIT

    client = kfp_client(kfp_host)
    experiment = client.create_experiment("crossaudit")
    recurring = client.create_recurring_run(
        experiment.experiment_id, "crossaudit-reaudit", description=f"re-audit every {alias!r} version: {cron}",
        cron_expression=Cron.parse(cron).kubeflow(), pipeline_package_path=str(REAUDIT), no_catchup=True,
        params={"tracking_uri": tracking_uri, "kfp_host": kfp_host, "promotion_alias": alias, "device": device},
    )  # fmt: skip
    return recurring.recurring_run_id
