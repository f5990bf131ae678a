import json
from pathlib import Path

from kfp import dsl
from kfp.dsl import Dataset, Metrics

from components.cka_alignment.component import cka_alignment


def test_python_func_picks_the_best_aligned_layer_pair(stage_folders, tmp_path):
    metrics = Metrics(uri=str(tmp_path / "m"))
    cka_alignment.python_func(
        features=Dataset(uri=str(stage_folders.features)), alignment=Dataset(uri=str(tmp_path / "a")), metrics=metrics
    )
    record = json.loads((tmp_path / "a" / "alignment.json").read_text())
    assert record["cka"] == max(max(row) for row in record["matrix"]) == metrics.metadata["cka"]


def test_kfp_local_run(fetch_clean_pair, kfp_local):
    @dsl.pipeline
    def align_only() -> Dataset:
        fetched = fetch_clean_pair()
        return cka_alignment(features=fetched.outputs["features"]).outputs["alignment"]

    assert (Path(align_only().output.path) / "alignment.json").is_file()
