"""The gate's kfp.local run is the whole pipeline: tests/test_demo.py and tests/test_pipeline.py."""

import shutil
import uuid
from pathlib import Path

from kfp.dsl import HTML, Dataset

from components.gate.component import gate
from crossaudit.mlops import operator_config, promotion, registry
from crossaudit.mlops.artifacts import read_pair, write_pair


def audited(findings: Path, ref: registry.VersionRef, tmp_path: Path) -> Path:
    """The stage folders' findings as if stage 1 had fetched `ref`: the gate signs its
    verdict for the artifact digest stage 1 recorded, and each registration's artifact
    (its MLmodel names the run) has its own."""
    copy = tmp_path / "findings"
    shutil.copytree(findings, copy)
    record = read_pair(copy)
    record.artifact_sha256 = [promotion.model_digest(ref), (record.artifact_sha256 or ["", ""])[1]]
    write_pair(record, copy)
    return copy


def test_python_func_records_the_audit_and_promotes_a_clean_version(stage_folders, mlflow_server, digits_zoo, tmp_path):
    client = registry.client(mlflow_server)
    name = f"gate-{uuid.uuid4().hex[:8]}"
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    findings = audited(stage_folders.findings, ref, tmp_path)
    status = gate.python_func(
        model_uri=ref.uri, tracking_uri=mlflow_server, promotion_alias="production", threshold_profile="any",
        thresholds_uri="", thresholds_sha256="",
        audit_data=[Dataset(uri=str(stage_folders.data))], pair_results=[Dataset(uri=str(findings))],
        report=HTML(uri=str(tmp_path / "report.html")),
    )  # fmt: skip
    tags = client.get_model_version(name, ref.version).tags
    assert status == tags[registry.STATUS] == "passed"
    assert registry.resolve(client, f"models:/{name}@production").version == ref.version
    assert "crossaudit" in (tmp_path / "report.html").read_text()


def test_the_registered_models_own_thresholds_judge_and_travel_with_the_audit_run(
    stage_folders, mlflow_server, digits_zoo, tmp_path
):
    """A thresholds file published for the registered model (here one whose thresholds any
    finding reaches) decides the verdict, and the audit run keeps the file it was judged by."""
    import json

    client = registry.client(mlflow_server)
    name = f"gate-own-{uuid.uuid4().hex[:8]}"
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    strict = tmp_path / "strict.json"
    reachable = dict.fromkeys(("patch", "blend", "warp"), 1e-9)
    profile = {"per_family": reachable, "clean_pairs": 1, "paradigm": "supervised"}
    strict.write_text(json.dumps({"calibrated_by": "hand, for this test", "profiles": {"strict": profile}}))
    registry.publish_audit_data(client, name, digits_zoo.audit_data)
    pinned = registry.publish_thresholds(client, name, strict)
    assert registry.audit_settings(operator_config.load(), name).thresholds_uri == pinned.uri
    status = gate.python_func(
        model_uri=ref.uri, tracking_uri=mlflow_server, promotion_alias="production", threshold_profile="",
        thresholds_uri=pinned.uri, thresholds_sha256=pinned.sha256, audit_data=[Dataset(uri=str(stage_folders.data))],
        pair_results=[Dataset(uri=str(stage_folders.findings))], report=HTML(uri=str(tmp_path / "report.html")),
    )  # fmt: skip
    tags = client.get_model_version(name, ref.version).tags
    assert status == tags[registry.STATUS] == "failed"
    kept = {a.path for a in client.list_artifacts(tags[registry.RUN_ID], "thresholds")}
    assert kept == {"thresholds/strict.json"}


def test_a_clean_version_whose_peer_was_flagged_is_held_when_the_registered_model_asks(
    stage_folders, mlflow_server, digits_zoo, tmp_path
):
    """Thresholds between the two models' scores flag the peer only. With the registered
    model's `hold_on_flagged_peer` setting the clean version is held (inconclusive,
    not promoted, the description naming the peer); without it, it passes."""
    import json

    import pytest

    from crossaudit.mlops.gate import pair_result

    def best(model) -> dict[str, float]:
        families = ("patch", "blend", "warp")
        return {family: max(f.score for f in model.findings if f.family == family) for family in families}

    version, peer = (best(m) for m in pair_result(stage_folders.findings, None, "any").report.models)
    family = max(peer, key=lambda f: peer[f] - version[f])
    assert peer[family] > version[family], "the stage folders' peer must out-score the version in some family"
    between = {f: max(version[f], peer[f]) + 1.0 for f in peer} | {family: (version[family] + peer[family]) / 2}
    profile = {"per_family": between, "clean_pairs": 1, "paradigm": "supervised"}
    path = tmp_path / "between.json"
    path.write_text(json.dumps({"calibrated_by": "hand, for this test", "profiles": {"between": profile}}))

    client = registry.client(mlflow_server)
    name = f"gate-hold-{uuid.uuid4().hex[:8]}"
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    registry.publish_audit_data(client, name, digits_zoo.audit_data)
    pinned = registry.publish_thresholds(client, name, path)
    operator_config.update_model(name, hold_on_flagged_peer=True)
    findings = audited(stage_folders.findings, ref, tmp_path)

    def run(hold: bool) -> str:
        return gate.python_func(
            model_uri=ref.uri, tracking_uri=mlflow_server, promotion_alias="production", threshold_profile="",
            thresholds_uri=pinned.uri, thresholds_sha256=pinned.sha256, hold_on_flagged_peer=hold,
            audit_data=[Dataset(uri=str(stage_folders.data))], pair_results=[Dataset(uri=str(findings))],
            report=HTML(uri=str(tmp_path / "report.html")),
        )  # fmt: skip

    assert run(registry.audit_settings(operator_config.load(), name).hold_on_flagged_peer) == "inconclusive"
    held = client.get_model_version(name, ref.version)
    assert held.tags[registry.VERDICT] == "clean" and "production" not in held.aliases
    assert f"held: peer {stage_folders.uris[1]} was judged backdoored" in held.description
    assert run(False) == "passed"
    assert registry.resolve(client, f"models:/{name}@production").version == ref.version

    misspelt = (
        f"models:\n  {name}:\n    audit_data: {{uri: x, sha256: {'0' * 64}}}\n    hold_on_flagged_peer: yes-ish\n"
    )
    with pytest.raises(operator_config.ConfigError, match="expected true or false"):
        operator_config.parse(misspelt)
