from pathlib import Path

from kfp.dsl import Dataset, Metrics, Model

from components.feature_extraction.component import feature_extraction
from crossaudit.mlops import registry


def _run(pair, tmp_path: Path, model_uri: str) -> tuple[dict[str, Path], Metrics]:
    outs = {name: tmp_path / name for name in ("suspect", "witness", "data", "features")}
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    feature_extraction.python_func(
        model_uri=model_uri, peer_uri=pair.witness, audit_data_uri=pair.audit_data_uri,
        audit_data_sha256=pair.audit_data_sha256, tracking_uri=pair.tracking_uri, seed=0, device="cpu",
        suspect_model=Model(uri=str(outs["suspect"])), witness_model=Model(uri=str(outs["witness"])),
        audit_data=Dataset(uri=str(outs["data"])), features=Dataset(uri=str(outs["features"])), metrics=metrics,
    )  # fmt: skip
    return outs, metrics


def test_python_func_writes_pair_record_and_features(registered_pair, tmp_path):
    outs, metrics = _run(registered_pair, tmp_path, registered_pair.suspect)
    assert {p.name for p in outs["features"].iterdir()} == {"pair.json", "features.npz", "features.json"}
    assert metrics.metadata["clean_agreement"] > 0.9


def test_unloadable_model_is_carried_as_an_error_not_a_crash(registered_pair, digits_zoo, tmp_path):
    """A provider that overwrites its registered model with garbage gets an inconclusive
    pair, not a crashed step."""
    client = registry.client(registered_pair.tracking_uri)
    name = registry.resolve(client, registered_pair.suspect).name
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not a model")
    client.log_model_artifact(client.get_model_version(name, ref.version).source.removeprefix("models:/"), str(broken))
    outs, _ = _run(registered_pair, tmp_path, ref.uri)
    assert "not a readable ONNX file" in (outs["features"] / "pair.json").read_text()


def test_kfp_local_run(fetch_clean_pair, kfp_local):
    task = fetch_clean_pair()
    assert (Path(task.outputs["features"].path) / "features.npz").is_file()
