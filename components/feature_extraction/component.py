"""Stage 1: fetch both models and the audit set, check them, extract pooled features."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def feature_extraction(
    model_uri: str,
    peer_uri: str,
    audit_data_uri: str,
    audit_data_sha256: str,
    tracking_uri: str,
    seed: int,
    device: str,
    suspect_model: Output[Model],
    witness_model: Output[Model],
    audit_data: Output[Dataset],
    features: Output[Dataset],
    metrics: Output[Metrics],
    paradigm: str = "auto",
):
    """Stage 1: fetch both models and the audit set pinned by sha256 (files, never through an
    MLflow flavor's loader), translate each model and prove it against ONNX Runtime, refuse a
    witness that is the suspect itself, and extract pooled clean features at every tap. A
    pair that cannot be audited is carried to the gate as an error (inconclusive)."""
    from pathlib import Path

    from crossaudit.mlops.registry import fetch_inputs
    from crossaudit.mlops.steps import extract_step

    folders = [Path(a.path) for a in (suspect_model, witness_model, audit_data)]
    fetch_inputs(model_uri, peer_uri, audit_data_uri, audit_data_sha256, tracking_uri, *folders)
    agreement = extract_step([model_uri, peer_uri], *folders, seed, device, Path(features.path), paradigm)
    if agreement is not None:
        metrics.log_metric("clean_agreement", agreement)
