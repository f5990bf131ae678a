"""Exit handler: a pipeline that did not finish cleanly marks the version `error`."""

from kfp import dsl

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def mark_unfinished(model_uri: str, tracking_uri: str, status: dsl.PipelineTaskFinalStatus) -> str:
    """Exit handler: a pipeline run that ended without the gate's verdict marks the version
    `error` and takes the promotion alias from it: a version that could not be audited is
    never promoted."""
    from crossaudit.mlops.promotion import close_audit

    return close_audit(model_uri, tracking_uri, status.state, status.error_message or "")
