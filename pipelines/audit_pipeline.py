"""The audit pipeline: one registered model version against each of its peers.

One branch per peer (ParallelFor) runs the four per-pair stages; the gate collects every
branch, records one MLflow run, tags the version and moves the promotion alias only on a
pass. The exit handler runs whatever happens and marks the version `error` when the run
did not end with the gate's verdict: in KFP a failed step skips what follows, and a
skipped gate must never read as a pass.

Caching: a step whose effect lies outside its outputs, or whose inputs are names whose
content can change under the same string, is never served from Kubeflow's cache. That is
stage 1 (a `models:/` URI is a name, and the bytes behind it are fetched from MLflow),
the gate (MLflow run, tags, alias, attestation) and the exit handler (MLflow tags). The
later stages take artifacts by content, so a cache hit there is the same computation.

Pods on a cluster (`kfp-kubernetes`): only steps that talk to MLflow get its credentials
(Secret `crossaudit-mlflow-credentials`); only the gate gets the signing key (Secret
`crossaudit-signing-key`); every pod carries the label `crossaudit.io/egress` that
manifests/audit-pods turns into a NetworkPolicy (`registry`: MLflow and KFP; `artifacts`:
KFP's artifact store only). The steps that run provider models beyond stage 1 hold no
MLflow credential and cannot reach MLflow.

GPU: the GPU pipeline is a separate compiled variant of the same graph
(`audit_pipeline_gpu.yaml`, chosen by `compiled(device)`): inversion and sensitivity
request one GPU and run the CUDA image. A `dsl.If` on `device` cannot do it in one
package: its GPU and CPU branches would meet in a `dsl.OneOf`, which cannot feed the
gate's `dsl.Collected`.

The pipeline run by kfp.local (`audit_pipeline`) is the same graph without pod settings:
locally each step runs in this interpreter with the operator's own environment, and a
cluster path such as the signing key's mount would hide the local one.

Compile with `python -m pipelines.audit_pipeline` (writes both YAML files beside it).
"""

from dataclasses import dataclass
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import GPU_IMAGE
from components.cka_alignment.component import cka_alignment
from components.exit_handler.component import mark_unfinished
from components.feature_extraction.component import feature_extraction
from components.gate.component import gate
from components.sensitivity_test.component import sensitivity_test
from components.trigger_inversion.component import trigger_inversion

COMPILED = Path(__file__).with_name("audit_pipeline.yaml")
COMPILED_GPU = Path(__file__).with_name("audit_pipeline_gpu.yaml")

PART_OF = ("app.kubernetes.io/part-of", "crossaudit")
EGRESS_LABEL = "crossaudit.io/egress"
MLFLOW_CREDENTIALS = "crossaudit-mlflow-credentials"
MLFLOW_CREDENTIAL_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
SIGNING_KEY_SECRET = "crossaudit-signing-key"
SIGNING_KEY_DIR = "/var/run/crossaudit/signing-key"
SIGNING_KEY_FILE = f"{SIGNING_KEY_DIR}/ed25519.pem"


@dataclass(frozen=True)
class Pods:
    """How the steps' pods are set up on Kubernetes."""

    gpu: bool = False


def talks_to_registry(task: dsl.PipelineTask, pods: Pods | None) -> dsl.PipelineTask:
    """A step that reads or writes MLflow: never cached, and on a cluster the only kind of
    pod that holds MLflow credentials and may reach MLflow."""
    task.set_caching_options(False)
    if pods is not None:
        kubernetes.use_secret_as_env(task, MLFLOW_CREDENTIALS, {key: key for key in MLFLOW_CREDENTIAL_KEYS})
        kubernetes.add_pod_label(task, *PART_OF)
        kubernetes.add_pod_label(task, EGRESS_LABEL, "registry")
    return task


def artifacts_only(task: dsl.PipelineTask, pods: Pods | None, compute: bool = False) -> dsl.PipelineTask:
    """A step that reads and writes KFP artifacts only; `compute` steps take the GPU in the
    GPU variant."""
    if pods is None:
        return task
    kubernetes.add_pod_label(task, *PART_OF)
    kubernetes.add_pod_label(task, EGRESS_LABEL, "artifacts")
    if compute and pods.gpu:
        task.set_container_image(GPU_IMAGE).set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
        kubernetes.add_toleration(task, key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")
    return task


def build(pods: Pods | None = None, name: str = "crossaudit-audit"):
    """The audit pipeline; `pods` None for kfp.local, else the settings of a cluster's pods."""

    def audit_pipeline(
        model_uri: str,
        peer_uris: list,
        audit_data_uri: str,
        audit_data_sha256: str,
        tracking_uri: str,
        seed: int = 0,
        device: str = "cpu",
        promotion_alias: str = "production",
        threshold_profile: str = "",
        thresholds_uri: str = "",
        thresholds_sha256: str = "",
        paradigm: str = "auto",
        hold_on_flagged_peer: bool = False,
    ):
        on_exit = talks_to_registry(mark_unfinished(model_uri=model_uri, tracking_uri=tracking_uri), pods)
        with dsl.ExitHandler(on_exit, name="audit"):
            with dsl.ParallelFor(peer_uris, name="peers") as peer_uri:
                # Stage 1 holds MLflow credentials while it runs both models: it fetches them
                # from MLflow by URI. Loading refuses pickles and checks ONNX before running it.
                fetched = talks_to_registry(feature_extraction(
                    model_uri=model_uri, peer_uri=peer_uri, audit_data_uri=audit_data_uri,
                    audit_data_sha256=audit_data_sha256, tracking_uri=tracking_uri, seed=seed, device=device,
                    paradigm=paradigm,
                ), pods)  # fmt: skip
                aligned = artifacts_only(cka_alignment(features=fetched.outputs["features"]), pods)
                models = {
                    "suspect_model": fetched.outputs["suspect_model"],
                    "witness_model": fetched.outputs["witness_model"],
                    "audit_data": fetched.outputs["audit_data"],
                }
                inverted = trigger_inversion(alignment=aligned.outputs["alignment"], device=device, **models)
                artifacts_only(inverted, pods, compute=True)
                measured = sensitivity_test(triggers=inverted.outputs["triggers"], device=device, **models)
                artifacts_only(measured, pods, compute=True)
            judged = talks_to_registry(gate(
                model_uri=model_uri, tracking_uri=tracking_uri, promotion_alias=promotion_alias,
                threshold_profile=threshold_profile, thresholds_uri=thresholds_uri,
                thresholds_sha256=thresholds_sha256, hold_on_flagged_peer=hold_on_flagged_peer,
                audit_data=dsl.Collected(fetched.outputs["audit_data"]),
                pair_results=dsl.Collected(measured.outputs["findings"]),
            ), pods)  # fmt: skip
            if pods is not None:
                kubernetes.use_secret_as_volume(judged, SIGNING_KEY_SECRET, mount_path=SIGNING_KEY_DIR)
                judged.set_env_variable("CROSSAUDIT_SIGNING_KEY_FILE", SIGNING_KEY_FILE)

    return dsl.pipeline(name=name, description="Cross-examination backdoor audit of one model version")(audit_pipeline)


audit_pipeline = build()
cluster_pipeline = build(Pods())
cluster_gpu_pipeline = build(Pods(gpu=True), name="crossaudit-audit-gpu")


def compiled(device: str) -> Path:
    """The package to submit to Kubeflow for an audit on `device`."""
    return COMPILED_GPU if device == "cuda" else COMPILED


def compile_pipeline(path: Path = COMPILED, gpu: bool = False) -> Path:
    compiler.Compiler().compile(cluster_gpu_pipeline if gpu else cluster_pipeline, str(path))
    return path


if __name__ == "__main__":
    print(compile_pipeline())
    print(compile_pipeline(COMPILED_GPU, gpu=True))
