import json
from pathlib import Path

import pytest
from kfp import dsl
from kfp.dsl import Dataset, Model

from components.cka_alignment.component import cka_alignment
from components.sensitivity_test.component import sensitivity_test
from components.trigger_inversion.component import trigger_inversion


def test_python_func_measures_every_trigger_before_and_after_fine_tuning(stage_folders, tmp_path):
    count = sensitivity_test.python_func(
        triggers=Dataset(uri=str(stage_folders.triggers)), suspect_model=Model(uri=str(stage_folders.suspect)),
        witness_model=Model(uri=str(stage_folders.witness)), audit_data=Dataset(uri=str(stage_folders.data)),
        device="cpu", findings=Dataset(uri=str(tmp_path / "f")),
    )  # fmt: skip
    findings = json.loads((tmp_path / "f" / "findings.json").read_text())
    assert count == sum(len(f) for f in findings) > 0
    assert all(0.0 <= f["asr_after_finetune"] <= 1.0 for found in findings for f in found)
    # An image classifier's fine-tuned success is evidence, not scored: what counts is the
    # held-out success the witness does not share.
    assert all(f["effective_asr"] == pytest.approx(f["asr"] * f["witness_kept"]) for found in findings for f in found)


def test_kfp_local_run(fetch_clean_pair, kfp_local):
    @dsl.pipeline
    def measure_only() -> Dataset:
        fetched = fetch_clean_pair()
        models = {k: fetched.outputs[k] for k in ("suspect_model", "witness_model", "audit_data")}
        aligned = cka_alignment(features=fetched.outputs["features"])
        inverted = trigger_inversion(alignment=aligned.outputs["alignment"], device="cpu", **models)
        return sensitivity_test(triggers=inverted.outputs["triggers"], device="cpu", **models).outputs["findings"]

    assert (Path(measure_only().output.path) / "findings.json").is_file()
