"""The audit pipeline: one registered model version against each of its peers.

One branch per peer (ParallelFor) runs the four per-pair stages; the gate collects every
branch, records one MLflow run, tags the version and moves the promotion alias only on a
pass. The exit handler runs whatever happens and marks the version `error` when the run
did not end with the gate's verdict: in KFP a failed step skips what follows, and a
skipped gate must never read as a pass.

Compile with `python -m pipelines.audit_pipeline` (writes audit_pipeline.yaml beside it).
"""

from pathlib import Path

from kfp import compiler, dsl

from components.cka_alignment.component import cka_alignment
from components.exit_handler.component import mark_unfinished
from components.feature_extraction.component import feature_extraction
from components.gate.component import gate
from components.sensitivity_test.component import sensitivity_test
from components.trigger_inversion.component import trigger_inversion

COMPILED = Path(__file__).with_name("audit_pipeline.yaml")


@dsl.pipeline(name="crossaudit-audit", description="Cross-examination backdoor audit of one model version")
def audit_pipeline(
    model_uri: str,
    peer_uris: list,
    audit_data_uri: str,
    tracking_uri: str,
    seed: int = 0,
    device: str = "cpu",
    promotion_alias: str = "production",
    threshold_profile: str = "",
    thresholds_uri: str = "",
    paradigm: str = "auto",
    hold_on_flagged_peer: bool = False,
):
    on_exit = mark_unfinished(model_uri=model_uri, tracking_uri=tracking_uri)
    with dsl.ExitHandler(on_exit, name="audit"):
        with dsl.ParallelFor(peer_uris, name="peers") as peer_uri:
            fetched = feature_extraction(
                model_uri=model_uri, peer_uri=peer_uri, audit_data_uri=audit_data_uri,
                tracking_uri=tracking_uri, seed=seed, device=device, paradigm=paradigm,
            )  # fmt: skip
            aligned = cka_alignment(features=fetched.outputs["features"])
            models = {
                "suspect_model": fetched.outputs["suspect_model"],
                "witness_model": fetched.outputs["witness_model"],
                "audit_data": fetched.outputs["audit_data"],
            }
            inverted = trigger_inversion(alignment=aligned.outputs["alignment"], device=device, **models)
            measured = sensitivity_test(triggers=inverted.outputs["triggers"], device=device, **models)
        gate(
            model_uri=model_uri, tracking_uri=tracking_uri, promotion_alias=promotion_alias,
            threshold_profile=threshold_profile, thresholds_uri=thresholds_uri,
            hold_on_flagged_peer=hold_on_flagged_peer, audit_data=dsl.Collected(fetched.outputs["audit_data"]),
            pair_results=dsl.Collected(measured.outputs["findings"]),
        )  # fmt: skip


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(audit_pipeline, str(path))
    return path


if __name__ == "__main__":
    print(compile_pipeline())
