"""Stage 5: verdict over every peer, the audit run in MLflow, version tags, promotion gate."""

from kfp import dsl
from kfp.dsl import HTML, Dataset, Input, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def gate(
    model_uri: str,
    tracking_uri: str,
    promotion_alias: str,
    threshold_profile: str,
    thresholds_uri: str,
    thresholds_sha256: str,
    audit_data: Input[list[Dataset]],
    pair_results: Input[list[Dataset]],
    report: Output[HTML],
    hold_on_flagged_peer: bool = False,
) -> str:
    """Stage 5: judge the version in every peer's audit with the calibrated thresholds, record
    the audit run in MLflow (report, trigger pictures, CKA heatmap), sign the verdict for the
    audited bytes, tag the version, and set the promotion alias only on a signed pass."""
    import shutil
    import tempfile
    from pathlib import Path

    from crossaudit.mlops.gate import gate_step

    with tempfile.TemporaryDirectory() as out:
        status = gate_step(
            model_uri,
            tracking_uri,
            Path(audit_data[0].path),
            [Path(a.path) for a in pair_results],
            promotion_alias,
            threshold_profile,
            thresholds_uri,
            thresholds_sha256,
            hold_on_flagged_peer,
            Path(out),
        )
        shutil.copy(Path(out) / "peer_1" / "report.html", report.path)
    return status
