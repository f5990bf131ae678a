import numpy as np
import pytest
import torch

from crossaudit.method.cka import align_layers, debiased_linear_cka, minibatch_cka


@pytest.fixture
def xy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(1337)
    x = rng.randn(100, 10)
    y = rng.randn(100, 10) + x
    return x, y


def test_reference_values(xy):
    x, y = xy
    assert float(debiased_linear_cka(x, y)) == pytest.approx(0.51346, abs=1e-5)


def test_invariant_to_orthogonal_transform_and_isotropic_scaling(xy):
    x, y = xy
    q, _ = np.linalg.qr(np.random.RandomState(0).randn(10, 10))
    reference = float(debiased_linear_cka(x, y))
    assert float(debiased_linear_cka(x @ q, y)) == pytest.approx(reference, abs=1e-9)
    assert float(debiased_linear_cka(3.7 * x, 0.2 * y)) == pytest.approx(reference, abs=1e-9)


def test_computed_in_float64(xy):
    x, y = xy
    assert debiased_linear_cka(x.astype(np.float32), y).dtype == torch.float64


def test_minibatch_cka_is_differentiable():
    x = torch.randn(16, 8, requires_grad=True)
    y = torch.randn(16, 5)
    minibatch_cka(x, y).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_alignment_picks_the_matching_layer():
    rng = np.random.RandomState(0)
    base = rng.randn(200, 12)
    suspect = {"a": rng.randn(200, 12), "b": base}
    witness = {"c": base @ np.linalg.qr(rng.randn(12, 12))[0], "d": rng.randn(200, 7)}
    alignment = align_layers(suspect, witness)
    assert (alignment.suspect_tap, alignment.witness_tap) == ("b", "c")
    assert alignment.cka == pytest.approx(1.0, abs=1e-6)
    assert alignment.matrix.shape == (2, 2)


def test_similarity_is_the_lower_of_the_two_directions_and_symmetric():
    """A model whose every layer resembles one layer of the other is not thereby alike:
    the other's unmatched layers count too, whichever model is the suspect."""
    rng = np.random.RandomState(0)
    shared, own = rng.randn(300, 10), rng.randn(300, 10)
    small = {"s": shared}
    large = {"l1": shared, "l2": own}
    one_way = align_layers(small, large)
    other_way = align_layers(large, small)
    # small -> large: its one layer has a perfect match (1.0); large -> small: l1 matches, l2 does not.
    assert one_way.similarity == pytest.approx(other_way.similarity)
    assert one_way.similarity == pytest.approx((1.0 + float(debiased_linear_cka(own, shared))) / 2, abs=1e-6)
    assert align_layers(large, large).similarity == pytest.approx(1.0, abs=1e-6)
