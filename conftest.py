"""Shared fixtures: a small real zoo on sklearn digits, trained once per test session.

`make test` runs the suite in parallel (pytest-xdist, one worker per core). Each worker
and every process it starts gets its share of the cores before torch is first imported:
on small models one thread runs nearly as fast as two, and workers with a full thread
pool each would oversubscribe the CPU and all slow down several times.
"""

from __future__ import annotations

import os

if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    _threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.update(OMP_NUM_THREADS=_threads, MKL_NUM_THREADS=_threads)

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class StageFolders:
    """Every stage's output for one clean digits pair, made by the library in-process."""

    suspect: Path
    witness: Path
    data: Path
    features: Path
    alignment: Path
    triggers: Path
    findings: Path
    uris: list[str]


@pytest.fixture(scope="session")
def stage_folders(digits_zoo: DigitsZoo, tmp_path_factory: pytest.TempPathFactory) -> StageFolders:
    from crossaudit import registry, steps

    root = tmp_path_factory.mktemp("stages")
    uris = [str(digits_zoo.clean_cnn), str(digits_zoo.clean_mlp)]
    inputs = [root / "suspect", root / "witness", root / "data"]
    registry.fetch_inputs(*uris, str(digits_zoo.audit_data), "", *inputs)
    outs = [root / name for name in ("features", "alignment", "triggers", "findings")]
    steps.extract_step(uris, *inputs, 0, "cpu", outs[0])
    steps.alignment_step(outs[0], outs[1])
    steps.inversion_step(outs[1], *inputs, "cpu", outs[2])
    steps.sensitivity_step(outs[2], *inputs, "cpu", outs[3])
    return StageFolders(*inputs, *outs, uris)


@pytest.fixture
def kfp_local(tmp_path: Path) -> Path:
    """kfp.local in this interpreter (the image's packages), outputs under tmp_path."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    return tmp_path / "kfp"


@pytest.fixture
def fetch_clean_pair(digits_zoo: DigitsZoo) -> Callable[[], Any]:
    """Inside a test pipeline (or alone): the feature_extraction task for the clean digits pair."""
    from components.feature_extraction.component import feature_extraction

    def fetch() -> Any:
        return feature_extraction(
            model_uri=str(digits_zoo.clean_cnn), peer_uri=str(digits_zoo.clean_mlp),
            audit_data_uri=str(digits_zoo.audit_data), tracking_uri="", seed=0, device="cpu",
        )  # fmt: skip

    return fetch
