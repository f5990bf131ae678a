"""The re-audit pipeline, run on a schedule: audit again every promoted version.

One task lists the versions holding the promotion alias and starts the audit pipeline for
each (on a cluster: as child runs through `kfp_host`, the in-cluster KFP API); each audit's
gate takes the alias away from a version that no longer passes. `crossaudit schedule`
makes this a Kubeflow recurring run; on a cluster that is the one scheduler, and the
receiver runs with its own scheduler off.

The task reads and writes MLflow (status tags), so it is never cached: a cached re-audit
would audit nothing. It holds the MLflow credentials and reads the operator's
configuration (peers and audit settings) from the ConfigMap `crossaudit-operator-config`.

Compile with `python -m pipelines.reaudit_pipeline` (writes reaudit_pipeline.yaml beside it).
"""

from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.reaudit.component import reaudit_promoted
from pipelines.audit_pipeline import Pods, talks_to_registry

COMPILED = Path(__file__).with_name("reaudit_pipeline.yaml")
OPERATOR_CONFIG = "crossaudit-operator-config"
OPERATOR_CONFIG_DIR = "/etc/crossaudit"


@dsl.pipeline(name="crossaudit-reaudit", description="Re-audit every version that holds the promotion alias")
def reaudit_pipeline(
    tracking_uri: str,
    kfp_host: str = "",
    promotion_alias: str = "production",
    seed: int = 0,
    device: str = "cpu",
):
    task = reaudit_promoted(
        tracking_uri=tracking_uri, promotion_alias=promotion_alias, kfp_host=kfp_host, seed=seed, device=device
    )
    talks_to_registry(task, Pods())
    kubernetes.use_config_map_as_volume(task, OPERATOR_CONFIG, mount_path=OPERATOR_CONFIG_DIR)
    task.set_env_variable("CROSSAUDIT_CONFIG", f"{OPERATOR_CONFIG_DIR}/config.yaml")


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(reaudit_pipeline, str(path))
    return path


if __name__ == "__main__":
    print(compile_pipeline())
