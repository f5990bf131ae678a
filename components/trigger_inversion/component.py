"""Stage 3: cross-examination trigger inversion in both directions."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def trigger_inversion(
    alignment: Input[Dataset],
    suspect_model: Input[Model],
    witness_model: Input[Model],
    audit_data: Input[Dataset],
    device: str,
    triggers: Output[Dataset],
) -> int:
    """Stage 3: cross-examination in both directions: the smallest trigger per family and
    target that flips one model while the other stays right, then both translations proved
    against ONNX Runtime with every candidate stamped."""
    from pathlib import Path

    from crossaudit.mlops.steps import inversion_step

    models = [Path(a.path) for a in (suspect_model, witness_model, audit_data)]
    return inversion_step(Path(alignment.path), *models, device, Path(triggers.path))
