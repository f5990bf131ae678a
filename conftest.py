"""Shared fixtures: a small real zoo on sklearn digits, trained once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from crossaudit.zoo.datasets import load_dataset
from crossaudit.zoo.train import config_for, export_onnx, train, write_audit_set


@dataclass(frozen=True)
class DigitsZoo:
    audit_data: Path
    clean_cnn: Path
    clean_mlp: Path
    badnets_cnn: Path
    badnets_target: int


@pytest.fixture(scope="session")
def digits_zoo(tmp_path_factory: pytest.TempPathFactory) -> DigitsZoo:
    root = tmp_path_factory.mktemp("zoo")
    split = load_dataset("digits")
    write_audit_set("digits", root / "audit.parquet")
    specs = {
        "clean_cnn": config_for("digits", arch="cnn", seed=21),
        "clean_mlp": config_for("digits", arch="mlp", seed=23),
        "badnets_cnn": config_for("digits", arch="cnn", attack="badnets", target=3, seed=22),
    }
    paths = {}
    for name, config in specs.items():
        trained = train(config, split)
        paths[name] = root / f"{name}.onnx"
        export_onnx(trained.model, trained.example, paths[name])
    return DigitsZoo(root / "audit.parquet", badnets_target=3, **paths)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite, loopback) for the whole session."""
    from crossaudit.tracking_server import local_server

    with local_server(tmp_path_factory.mktemp("mlflow")) as url:
        yield url
