"""Shared fixtures: a small real zoo on sklearn digits, trained once per test session.

`make test` runs the suite in parallel (pytest-xdist, one worker per core). Each worker
and every process it starts gets its share of the cores before torch is first imported:
on small models one thread runs nearly as fast as two, and workers with a full thread
pool each would oversubscribe the CPU and all slow down several times. Trained zoos are
built once per run in a folder the workers share (`shared_folder`), not once per worker.
"""

from __future__ import annotations

import os

if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    _threads = str(max(1, (os.cpu_count() or 1) // workers))
    os.environ.update(OMP_NUM_THREADS=_threads, MKL_NUM_THREADS=_threads)

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

from crossaudit.dev.zoo.datasets import load_dataset
from crossaudit.dev.zoo.train import config_for, export_onnx, train, write_audit_set


@dataclass(frozen=True)
class DigitsZoo:
    audit_data: Path
    clean_cnn: Path
    clean_mlp: Path
    badnets_cnn: Path
    badnets_target: int


# Fixtures that train a zoo or start a service: a test that uses one is in the slow tier,
# which `make check` (the fast tier) leaves out and `make test` runs.
HEAVY_FIXTURES = {"digits_zoo", "stage_folders", "mlflow_server", "registered_pair", "kfp_local", "onboard"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need a heavy fixture are slow; slow tests first (in collection order):
    a parallel run then ends on short tests rather than waiting on one worker's long one."""
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@contextmanager
def _shared_folder(factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder for something costly to make, and whether it still needs making. Under
    xdist all workers of this run share it: the first fills it while the others wait on
    its lock, then find it complete (a fill that raised leaves it for the next to retry).
    Without xdist it is a fresh private folder."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield factory.mktemp(name), True
        return
    root = factory.getbasetemp().parent / name  # the run's folder, above each worker's own
    complete = root / ".complete"
    with FileLock(f"{root}.lock"):
        root.mkdir(exist_ok=True)
        yield root, not complete.exists()
        complete.touch()


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], AbstractContextManager]:
    """`with shared_folder(name) as (root, empty):` fill `root` when `empty` (`_shared_folder`)."""
    return functools.partial(_shared_folder, tmp_path_factory)


@pytest.fixture(scope="session")
def digits_zoo(shared_folder: Callable[[str], AbstractContextManager]) -> DigitsZoo:
    specs = {
        "clean_cnn": config_for("digits", arch="cnn", seed=21),
        "clean_mlp": config_for("digits", arch="mlp", seed=23),
        "badnets_cnn": config_for("digits", arch="cnn", attack="badnets", target=3, seed=22),
    }
    with shared_folder("zoo") as (root, empty):
        if empty:
            split = load_dataset("digits")
            write_audit_set("digits", root / "audit.parquet")
            for name, config in specs.items():
                trained = train(config, split)
                export_onnx(trained.model, trained.example, root / f"{name}.onnx")
    return DigitsZoo(root / "audit.parquet", badnets_target=3, **{name: root / f"{name}.onnx" for name in specs})


# Every provider name the tests deliver as; each logs its deliveries in its own experiment.
TEST_PROVIDERS = ("acme", "globex", "initech", "a", "b", "c")


def _onboard_test_providers(tracking_uri: str) -> None:
    """The operator's part on a new MLflow server: each test provider's experiment, mapped
    by ID. Servers started the same way give them the same IDs, so one configuration
    serves every server of a test process."""
    from crossaudit.mlops import operator_config, registry

    operator_config.onboard(registry.client(tracking_uri), TEST_PROVIDERS)


@pytest.fixture(scope="session")
def onboard() -> Callable[[str], None]:
    """For tests with an MLflow server of their own: onboard the test providers on it."""
    return _onboard_test_providers


@pytest.fixture(scope="session")
def sign_verdict() -> Callable[..., Any]:
    """`sign_verdict(client, ref, status)`: what the gate records once an audit of `ref`
    ended with `status`, a pass signed for the bytes the registry serves now."""
    from crossaudit.mlops import attestation, promotion

    def sign(client: Any, ref: Any, status: str) -> Any:
        digest = promotion.model_digest(ref) if status == "passed" else ""
        return promotion.record_verdict(client, ref, status, digest, None, attestation.signing_key())

    return sign


@pytest.fixture(scope="session", autouse=True)
def operator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The operator's part, once per test process: crossaudit's key pair and a
    configuration (providers are added by `onboard_test_providers`, models as their audit
    sets are published). The environment names them, so receivers and audits started by the tests
    use them too. Yields the configuration file."""
    from crossaudit.mlops import operator_config

    with operator_config.local_operator(tmp_path_factory.mktemp("operator")) as config:
        yield config


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking server (SQLite, loopback) for the whole session."""
    from crossaudit.dev.tracking_server import local_server

    with local_server(tmp_path_factory.mktemp("mlflow")) as url:
        _onboard_test_providers(url)
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
def stage_folders(digits_zoo: DigitsZoo, shared_folder: Callable[[str], AbstractContextManager]) -> StageFolders:
    from crossaudit.mlops import registry, steps

    uris = [str(digits_zoo.clean_cnn), str(digits_zoo.clean_mlp)]
    with shared_folder("stages") as (root, empty):
        inputs = [root / "suspect", root / "witness", root / "data"]
        outs = [root / name for name in ("features", "alignment", "triggers", "findings")]
        if empty:
            for uri, folder in zip([*uris, str(digits_zoo.audit_data)], inputs, strict=True):
                registry.materialize(uri, folder)
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


@dataclass(frozen=True)
class RegisteredPair:
    """The clean digits pair registered by two providers, with the operator's pinned audit set."""

    tracking_uri: str
    suspect: str
    witness: str
    audit_data_uri: str
    audit_data_sha256: str


@pytest.fixture(scope="session")
def registered_pair(mlflow_server: str, digits_zoo: DigitsZoo) -> RegisteredPair:
    import uuid

    from crossaudit.mlops import registry

    client = registry.client(mlflow_server)
    name = f"pair-{uuid.uuid4().hex[:8]}"
    pinned = registry.publish_audit_data(client, name, digits_zoo.audit_data)
    suspect = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    witness = registry.register_version(client, name, digits_zoo.clean_mlp, "globex")
    return RegisteredPair(mlflow_server, suspect.uri, witness.uri, pinned.uri, pinned.sha256)


@pytest.fixture
def fetch_clean_pair(registered_pair: RegisteredPair) -> Callable[[], Any]:
    """Inside a test pipeline (or alone): the feature_extraction task for the clean digits pair."""
    from components.feature_extraction.component import feature_extraction

    def fetch() -> Any:
        return feature_extraction(
            model_uri=registered_pair.suspect, peer_uri=registered_pair.witness,
            audit_data_uri=registered_pair.audit_data_uri, audit_data_sha256=registered_pair.audit_data_sha256,
            tracking_uri=registered_pair.tracking_uri, seed=0, device="cpu",
        )  # fmt: skip

    return fetch
