"""Stage 4: held-out attack success of every trigger, before and after brief fine-tuning."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def sensitivity_test(
    triggers: Input[Dataset],
    suspect_model: Input[Model],
    witness_model: Input[Model],
    audit_data: Input[Dataset],
    device: str,
    findings: Output[Dataset],
) -> int:
    """Stage 4: each recovered trigger's held-out success under ONNX Runtime, with the witness
    kept, before and after brief clean fine-tuning of the suspect; every triggered input is
    proved against the torch translation the search used."""
    from pathlib import Path

    from crossaudit.mlops.steps import sensitivity_step

    models = [Path(a.path) for a in (suspect_model, witness_model, audit_data)]
    return sensitivity_step(Path(triggers.path), *models, device, Path(findings.path))
