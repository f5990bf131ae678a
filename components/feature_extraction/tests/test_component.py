from pathlib import Path

from kfp.dsl import Dataset, Metrics, Model

from components.feature_extraction.component import feature_extraction


def test_python_func_writes_pair_record_and_features(digits_zoo, tmp_path):
    outs = {name: tmp_path / name for name in ("suspect", "witness", "data", "features")}
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    feature_extraction.python_func(
        model_uri=str(digits_zoo.clean_cnn), peer_uri=str(digits_zoo.clean_mlp),
        audit_data_uri=str(digits_zoo.audit_data), tracking_uri="", seed=0, device="cpu",
        suspect_model=Model(uri=str(outs["suspect"])), witness_model=Model(uri=str(outs["witness"])),
        audit_data=Dataset(uri=str(outs["data"])), features=Dataset(uri=str(outs["features"])), metrics=metrics,
    )  # fmt: skip
    assert {p.name for p in outs["features"].iterdir()} == {"pair.json", "features.npz", "features.json"}
    assert metrics.metadata["clean_agreement"] > 0.9


def test_unloadable_model_is_carried_as_an_error_not_a_crash(digits_zoo, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    feature_extraction.python_func(
        model_uri=str(broken), peer_uri=str(digits_zoo.clean_mlp), audit_data_uri=str(digits_zoo.audit_data),
        tracking_uri="", seed=0, device="cpu", suspect_model=Model(uri=str(tmp_path / "s")),
        witness_model=Model(uri=str(tmp_path / "w")), audit_data=Dataset(uri=str(tmp_path / "d")),
        features=Dataset(uri=str(tmp_path / "f")), metrics=Metrics(uri=str(tmp_path / "m")),
    )  # fmt: skip
    assert "broken.onnx" in (tmp_path / "f" / "pair.json").read_text()


def test_kfp_local_run(fetch_clean_pair, kfp_local):
    task = fetch_clean_pair()
    assert (Path(task.outputs["features"].path) / "features.npz").is_file()
