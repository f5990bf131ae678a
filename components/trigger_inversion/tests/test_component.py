import json
import shutil
from pathlib import Path

import pytest
from kfp import dsl
from kfp.dsl import Dataset, Model

from components.cka_alignment.component import cka_alignment
from components.trigger_inversion.component import trigger_inversion
from crossaudit.errors import AuditError


def test_python_func_recovers_triggers_for_both_directions(stage_folders, tmp_path):
    count = trigger_inversion.python_func(
        alignment=Dataset(uri=str(stage_folders.alignment)), suspect_model=Model(uri=str(stage_folders.suspect)),
        witness_model=Model(uri=str(stage_folders.witness)), audit_data=Dataset(uri=str(stage_folders.data)),
        device="cpu", triggers=Dataset(uri=str(tmp_path / "t")),
    )  # fmt: skip
    listing = json.loads((tmp_path / "t" / "triggers.json").read_text())["triggers"]
    assert count == len(listing) > 0 and {t["direction"] for t in listing} == {0, 1}


def test_a_model_swapped_after_stage_1_fails_the_step(stage_folders, digits_zoo, tmp_path):
    swapped = tmp_path / "suspect"
    swapped.mkdir()
    (original,) = stage_folders.suspect.iterdir()
    shutil.copy(digits_zoo.badnets_cnn, swapped / original.name)
    with pytest.raises(AuditError, match="the models changed between stages"):
        trigger_inversion.python_func(
            alignment=Dataset(uri=str(stage_folders.alignment)), suspect_model=Model(uri=str(swapped)),
            witness_model=Model(uri=str(stage_folders.witness)), audit_data=Dataset(uri=str(stage_folders.data)),
            device="cpu", triggers=Dataset(uri=str(tmp_path / "t")),
        )  # fmt: skip


def test_kfp_local_run(fetch_clean_pair, kfp_local):
    @dsl.pipeline
    def invert_only() -> Dataset:
        fetched = fetch_clean_pair()
        aligned = cka_alignment(features=fetched.outputs["features"])
        return trigger_inversion(
            alignment=aligned.outputs["alignment"], suspect_model=fetched.outputs["suspect_model"],
            witness_model=fetched.outputs["witness_model"], audit_data=fetched.outputs["audit_data"], device="cpu",
        ).outputs["triggers"]  # fmt: skip

    assert (Path(invert_only().output.path) / "triggers.npz").is_file()
