"""The re-audit pipeline, run on a schedule: audit again every promoted version.

One task lists the versions holding the promotion alias and starts the audit pipeline for
each (on a cluster: as child runs through `kfp_host`, the in-cluster KFP API); each audit's
gate takes the alias away from a version that no longer passes. `crossaudit schedule`
makes this a Kubeflow recurring run; `crossaudit serve` runs the same re-audits from its
own scheduler.

Compile with `python -m pipelines.reaudit_pipeline` (writes reaudit_pipeline.yaml beside it).
"""

from pathlib import Path

from kfp import compiler, dsl

from components.reaudit.component import reaudit_promoted

COMPILED = Path(__file__).with_name("reaudit_pipeline.yaml")


@dsl.pipeline(name="crossaudit-reaudit", description="Re-audit every version that holds the promotion alias")
def reaudit_pipeline(
    tracking_uri: str,
    kfp_host: str = "",
    promotion_alias: str = "production",
    seed: int = 0,
    device: str = "cpu",
):
    reaudit_promoted(
        tracking_uri=tracking_uri, promotion_alias=promotion_alias, kfp_host=kfp_host, seed=seed, device=device
    )


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(reaudit_pipeline, str(path))
    return path


if __name__ == "__main__":
    print(compile_pipeline())
