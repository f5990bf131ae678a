import numpy as np
import pytest
import torch

from crossaudit.cka import align_layers, debiased_linear_cka, linear_cka, minibatch_cka


@pytest.fixture
def xy() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(1337)
    x = rng.randn(100, 10)
    y = rng.randn(100, 10) + x
    return x, y


def test_reference_values(xy):
    x, y = xy
    assert float(linear_cka(x, y)) == pytest.approx(0.55761, abs=1e-5)
    assert float(debiased_linear_cka(x, y)) == pytest.approx(0.51346, abs=1e-5)


def test_invariant_to_orthogonal_transform_and_isotropic_scaling(xy):
    x, y = xy
    q, _ = np.linalg.qr(np.random.RandomState(0).randn(10, 10))
    for cka in (linear_cka, debiased_linear_cka):
        reference = float(cka(x, y))
        assert float(cka(x @ q, y)) == pytest.approx(reference, abs=1e-9)
        assert float(cka(3.7 * x, 0.2 * y)) == pytest.approx(reference, abs=1e-9)


def test_computed_in_float64(xy):
    x, y = xy
    assert linear_cka(x.astype(np.float32), y).dtype == torch.float64


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
