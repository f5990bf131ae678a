"""An identical witness is no witness: a pair that is one model twice is inconclusive in
the one-process audit, in the pipeline's stage 1 (carried to the gate) and in the text audit."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from test_cli import functional_copy

from crossaudit.errors import IdenticalModelsError
from crossaudit.method.witness import refuse_same_model


def test_independent_outputs_pass_and_equal_ones_are_refused():
    rng = np.random.RandomState(0)
    first = [rng.normal(size=(50, 10)), rng.normal(size=(64, 10))]
    other = [rng.normal(size=(50, 10)), rng.normal(size=(64, 10))]
    refuse_same_model(["a", "b"], ["1", "2"], [first, other])
    nearly = [part + 1e-6 for part in first]
    with pytest.raises(IdenticalModelsError, match="same function"):
        refuse_same_model(["a", "b"], ["1", "2"], [first, nearly])
    with pytest.raises(IdenticalModelsError, match="same model"):
        refuse_same_model(["a", "b"], ["1", "1"], [first, other])


def test_agreeing_on_the_audit_set_alone_is_not_the_same_function():
    """A copy that differs only off the audit set (on random inputs) is another model."""
    rng = np.random.RandomState(0)
    audit, noise = rng.normal(size=(50, 10)), rng.normal(size=(64, 10))
    refuse_same_model(["a", "b"], ["1", "2"], [[audit, noise], [audit, noise + 1.0]])


@pytest.mark.parametrize(("copy_kind", "message"), [("bytes", "is the same model as"), ("function", "same function")])
def test_stage_1_carries_a_copy_as_witness_to_the_gate_as_inconclusive(digits_zoo, tmp_path, copy_kind, message):
    from crossaudit.mlops import gate, steps
    from crossaudit.mlops.artifacts import read_pair

    folders = [tmp_path / name for name in ("suspect", "witness", "data")]
    for folder in folders:
        folder.mkdir()
    shutil.copy(digits_zoo.badnets_cnn, folders[0] / "model.onnx")
    if copy_kind == "bytes":
        shutil.copy(digits_zoo.badnets_cnn, folders[1] / "model.onnx")
    else:
        functional_copy(digits_zoo.badnets_cnn, folders[1] / "model.onnx")
    shutil.copy(digits_zoo.audit_data, folders[2] / "audit.parquet")
    out = tmp_path / "features"
    uris = ["models:/m/1", "models:/m/2"]
    assert steps.extract_step(uris, *folders, 0, "cpu", out) is None
    assert message in (read_pair(out).error or "")
    result = gate.pair_result(out, None, "")
    assert result.report.verdict == "inconclusive" and message in (result.report.error or "")


def test_the_text_audit_refuses_a_language_model_against_its_own_copy(tmp_path):
    from crossaudit.dev.zoo.language import (
        LanguageConfig,
        export_language_model,
        train_language_model,
        write_text_audit_set,
    )
    from crossaudit.method.audit import run_audit
    from crossaudit.method.stages import AuditConfig
    from crossaudit.paradigms import LM

    export_language_model(train_language_model(LanguageConfig(seed=7, steps=5)), tmp_path / "lm.onnx")
    shutil.copy(tmp_path / "lm.onnx", tmp_path / "copy.onnx")
    shutil.copy(tmp_path / "lm.tokenizer.json", tmp_path / "copy.tokenizer.json")
    write_text_audit_set(tmp_path / "text.parquet")
    result = run_audit(
        str(tmp_path / "lm.onnx"), str(tmp_path / "copy.onnx"), str(tmp_path / "text.parquet"),
        config=AuditConfig(paradigm=LM),
    )  # fmt: skip
    assert result.report.verdict == "inconclusive"
    assert "is the same model as" in (result.report.error or "")
