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
    from pathlib import Path

    from crossaudit.registry import fetch_inputs
    from crossaudit.steps import extract_step

    folders = [Path(a.path) for a in (suspect_model, witness_model, audit_data)]
    fetch_inputs(model_uri, peer_uri, audit_data_uri, audit_data_sha256, tracking_uri, *folders)
    agreement = extract_step([model_uri, peer_uri], *folders, seed, device, Path(features.path), paradigm)
    if agreement is not None:
        metrics.log_metric("clean_agreement", agreement)
