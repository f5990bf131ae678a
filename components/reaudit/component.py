"""Re-audit: every version holding the promotion alias goes through the audit pipeline again."""

from kfp import dsl

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def reaudit_promoted(tracking_uri: str, promotion_alias: str, kfp_host: str, seed: int, device: str) -> str:
    import json

    from pipelines.runner import reaudit_promoted as run

    return json.dumps(run(tracking_uri, promotion_alias, kfp_host or None, seed, device))
