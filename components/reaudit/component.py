"""Re-audit: every version holding the promotion alias goes through the audit pipeline again."""

from kfp import dsl

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def reaudit_promoted(tracking_uri: str, promotion_alias: str, kfp_host: str, seed: int, device: str) -> str:
    """Audit again every version holding the promotion alias; returns each version's status
    as JSON (on a cluster, `running`: its audit is a run of its own). A holder without a
    verified signed pass loses the alias before anything runs (the alias guard); a version
    that fails its audit loses it (the gate).

    Each audit is `crossaudit audit-version`, the command the receiver runs, in a process
    of its own: a component does not import the pipelines built from the components."""
    import json
    import subprocess
    import sys

    from crossaudit.mlops import attestation, promotion, registry

    client = registry.client(tracking_uri)
    promotion.guard_every_alias(client, attestation.public_key(), promotion_alias)
    statuses = {}
    for ref in registry.promoted_versions(client, promotion_alias):
        command = [
            sys.executable, "-m", "crossaudit", "audit-version", ref.uri, "--tracking-uri", tracking_uri,
            "--seed", str(seed), "--device", device, "--alias", promotion_alias,
        ]  # fmt: skip
        subprocess.run(command + (["--kfp-host", kfp_host] if kfp_host else []), check=False)
        version = client.get_model_version(ref.name, ref.version)
        statuses[ref.uri] = registry.status_of(version) or "error"
    return json.dumps(statuses)
