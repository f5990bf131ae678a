"""The zoo's model cache: a config trains once; a rerun, or a cut-short entry, trains no more than it must."""

import shutil

from crossaudit.dev.zoo import cache
from crossaudit.dev.zoo.datasets import load_dataset
from crossaudit.dev.zoo.train import config_for
from crossaudit.modelio.loaders import load_model, parity_check


def test_a_config_trains_once_and_its_model_is_reused(tmp_path, monkeypatch):
    """On the MobileNet-style family, whose grouped convolutions and ReLU6 the translator
    must also match ONNX Runtime on (`load_model` proves it)."""
    config = config_for("digits", arch="mobilenet", seed=7, epochs=1)
    first = cache.trained(config, tmp_path)
    assert first.path.is_file() and 0.0 <= first.clean_accuracy <= 1.0 and first.attack_success is None
    images = load_dataset("digits").x_test[:64]
    assert parity_check(load_model(str(first.path)), images) < 1e-3
    calls = []
    monkeypatch.setattr(cache, "train", lambda *args: calls.append(args))
    again = cache.trained(config, tmp_path)
    assert again == first and calls == []
    assert cache.config_key(config) != cache.config_key(config_for("digits", arch="mobilenet", seed=8, epochs=1))


def test_an_entry_cut_short_is_trained_again(tmp_path):
    config = config_for("digits", arch="mlp", seed=7, epochs=1)
    first = cache.trained(config, tmp_path)
    (first.path.parent / "model.json").unlink()  # an entry without its record is no entry
    assert cache.cached(config, tmp_path) is None
    again = cache.trained(config, tmp_path)
    assert again.path == first.path and cache.cached(config, tmp_path) == again
    shutil.rmtree(first.path.parent)
    assert cache.cached(config, tmp_path) is None
