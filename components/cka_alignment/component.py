"""Stage 2: debiased linear CKA between every layer pair; the best pair is the aligned layer."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def cka_alignment(features: Input[Dataset], alignment: Output[Dataset], metrics: Output[Metrics]):
    """Stage 2: debiased linear CKA between every tapped layer of the two models on clean
    audit data; the best pair is where the search keeps their features alike, and the
    pair's similarity chooses its thresholds. Too little alignment carries an error to the
    gate (inconclusive)."""
    from pathlib import Path

    from crossaudit.mlops.steps import alignment_step

    cka = alignment_step(Path(features.path), Path(alignment.path))
    if cka is not None:
        metrics.log_metric("cka", cka)
