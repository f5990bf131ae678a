"""An identical witness is no witness.

Cross-examination looks for a trigger that flips the suspect while the witness keeps the
true label. Against a copy of itself, no such trigger exists: every backdoor the suspect
holds, its witness holds too, and the pair would pass as clean. So a pair whose models
are the same bytes, or compute the same function, is refused before any stage runs. The
same function is judged on the audit set and on random inputs (`runtime_parity.noise_inputs`):
a re-serialised copy, one with renamed nodes or an added identity op, are different
bytes but give the same outputs everywhere, while two providers' independently trained
models differ by far more than `IDENTITY_TOLERANCE` on random inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crossaudit.errors import IdenticalModelsError

# Outputs this close (relative to their scale) on every input count as one function:
# a thousand times the tolerance that float reordering in a translation needs, and far
# below how much two independently trained models differ on inputs they never saw.
IDENTITY_TOLERANCE = 1e-2


def same_outputs(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two models' outputs on the same inputs are equal within `IDENTITY_TOLERANCE`."""
    if first.shape != second.shape:
        return False
    if not first.size:
        return True
    scale = max(1.0, float(np.max(np.abs(first))), float(np.max(np.abs(second))))
    diff = float(np.max(np.abs(first.astype(np.float64) - second.astype(np.float64))))
    return bool(np.isfinite(diff) and diff <= IDENTITY_TOLERANCE * scale)


def refuse_same_model(uris: Sequence[str], digests: Sequence[str], outputs: Sequence[Sequence[np.ndarray]]) -> None:
    """Raise IdenticalModelsError when the two models are one. `outputs[i]` holds model
    i's outputs on each input set both models were given (the audit set, random inputs)."""
    first, second = uris
    if digests[0] == digests[1]:
        raise IdenticalModelsError(
            f"{second} is the same model as {first} (sha256 {digests[0][:16]}...): a model cannot witness "
            "against itself; audit it against another provider's model"
        )
    if all(same_outputs(a, b) for a, b in zip(outputs[0], outputs[1], strict=True)):
        raise IdenticalModelsError(
            f"{second} computes the same function as {first} (outputs within {IDENTITY_TOLERANCE:g} of each other "
            "on every audit sample and on random inputs) though their bytes differ: a copy cannot witness against "
            "its original; audit it against another provider's model"
        )
