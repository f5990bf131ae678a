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
    from pathlib import Path

    from crossaudit.steps import inversion_step

    models = [Path(a.path) for a in (suspect_model, witness_model, audit_data)]
    return inversion_step(Path(alignment.path), *models, device, Path(triggers.path))
