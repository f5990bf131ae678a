"""Exit handler: a pipeline that did not finish cleanly marks the version `error`."""

from kfp import dsl

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def mark_unfinished(model_uri: str, tracking_uri: str, status: dsl.PipelineTaskFinalStatus) -> str:
    from crossaudit.promotion import close_audit

    return close_audit(model_uri, tracking_uri, status.state, status.error_message or "")
