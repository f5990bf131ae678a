"""The audit pipeline, compiled and run with kfp.local against a real MLflow. A pair that
goes through it to a verdict, a promotion and its artifacts is `make demo`'s path, checked
end to end in tests/test_demo.py."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from crossaudit.mlops import attestation, operator_config, promotion, registry
from pipelines.audit_pipeline import COMPILED, COMPILED_GPU, compile_pipeline, compiled
from pipelines.reaudit_pipeline import COMPILED as REAUDIT_COMPILED
from pipelines.reaudit_pipeline import compile_pipeline as compile_reaudit
from pipelines.runner import audit_version


def test_compiled_pipeline_yaml_is_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "audit_pipeline.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "run `python -m pipelines.audit_pipeline` and commit the YAML"


def test_component_image_is_named_at_compile_time(tmp_path):
    """A registry of the operator's own, without editing the code."""
    compiled_yaml = tmp_path / "audit_pipeline.yaml"
    env = {**os.environ, "CROSSAUDIT_IMAGE": "registry.example.com/ml/crossaudit:1.2.3"}
    code = f"import pathlib, pipelines.audit_pipeline as p; p.compile_pipeline(pathlib.Path({str(compiled_yaml)!r}))"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300, cwd=Path(__file__).parents[1])
    text = compiled_yaml.read_text()
    assert "image: registry.example.com/ml/crossaudit:1.2.3" in text and "ghcr.io/crossaudit/crossaudit:" not in text


@pytest.fixture
def task(mlflow_server, digits_zoo):
    """A registered model with its audit set and the digits threshold profile."""
    client = registry.client(mlflow_server)
    name = f"digits-{uuid.uuid4().hex[:8]}"
    registry.publish_audit_data(client, name, Path(digits_zoo.audit_data))
    operator_config.update_model(name, threshold_profile="digits")
    return client, name


def test_first_version_awaits_a_peer_and_is_not_promoted(task, mlflow_server, digits_zoo):
    client, name = task
    ref = registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    assert audit_version(ref.uri, mlflow_server).status == "awaiting-peer"
    assert promotion.check(client, ref.uri, attestation.public_key())[0] is False


@pytest.mark.slow
def test_failed_step_marks_the_version_error_and_never_promotes(task, mlflow_server, digits_zoo):
    client, name = task
    registry.register_version(client, name, digits_zoo.clean_cnn, "acme")
    ref = registry.register_version(client, name, digits_zoo.clean_mlp, "globex")
    published = operator_config.load().settings(name).audit_data
    operator_config.update_model(name, audit_data=operator_config.Pinned(published.uri, "0" * 64))
    assert audit_version(ref.uri, mlflow_server).status == "error"
    assert promotion.check(client, ref.uri, attestation.public_key())[0] is False
    assert client.get_model_version(name, ref.version).tags[registry.ERROR]


def compiled_tasks(path: Path) -> dict[str, dict]:
    """Every task of a compiled pipeline, nested DAGs included, by its component's executor:
    the task spec, the container and the Kubernetes pod settings (kfp-kubernetes)."""
    spec, *platform = yaml.safe_load_all(path.read_text())
    pods = platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if platform else {}
    tasks = {}

    def walk(dag: dict) -> None:
        for task in dag["tasks"].values():
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"])
            else:
                executor = component["executorLabel"]
                container = spec["deploymentSpec"]["executors"][executor]["container"]
                pod = pods.get(executor, {})
                tasks[executor.removeprefix("exec-")] = {"task": task, "container": container, "pod": pod}

    walk(spec["root"]["dag"])
    return tasks


AUDIT_YAMLS = [COMPILED, COMPILED_GPU]
REGISTRY_STEPS = {"feature-extraction", "gate", "mark-unfinished", "reaudit-promoted"}


@pytest.mark.parametrize("path", [*AUDIT_YAMLS, REAUDIT_COMPILED], ids=lambda p: p.name)
def test_steps_with_effects_outside_their_outputs_are_never_cached(path):
    tasks = compiled_tasks(path)
    cached = {name for name, t in tasks.items() if t["task"].get("cachingOptions", {}).get("enableCache")}
    assert tasks.keys() & REGISTRY_STEPS, "the registry steps are found in the compiled YAML"
    assert not cached & REGISTRY_STEPS, f"served from Kubeflow's cache, their MLflow effects would be skipped: {cached}"


def test_gpu_variant_and_reaudit_yaml_are_current(tmp_path):
    fresh = compile_pipeline(tmp_path / "gpu.yaml", gpu=True)
    assert fresh.read_text() == COMPILED_GPU.read_text(), "run `python -m pipelines.audit_pipeline`"
    fresh = compile_reaudit(tmp_path / "reaudit.yaml")
    assert fresh.read_text() == REAUDIT_COMPILED.read_text(), "run `python -m pipelines.reaudit_pipeline`"


@pytest.mark.parametrize("path", [*AUDIT_YAMLS, REAUDIT_COMPILED], ids=lambda p: p.name)
def test_only_registry_steps_hold_mlflow_credentials_and_only_the_gate_the_signing_key(path):
    for name, t in compiled_tasks(path).items():
        pod, env = t["pod"], {e["name"]: e["value"] for e in t["container"].get("env", [])}
        secrets_as_env = {s["secretName"] for s in pod.get("secretAsEnv", [])}
        secrets_as_volume = {s["secretName"]: s["mountPath"] for s in pod.get("secretAsVolume", [])}
        egress = pod["podMetadata"]["labels"]["crossaudit.io/egress"]
        if name in REGISTRY_STEPS:
            assert (secrets_as_env, egress) == ({"crossaudit-mlflow-credentials"}, "registry"), name
        else:
            assert (secrets_as_env, egress) == (set(), "artifacts"), f"{name} runs provider models: no MLflow"
        if name == "gate":
            assert secrets_as_volume == {"crossaudit-signing-key": "/var/run/crossaudit/signing-key"}
            assert env["CROSSAUDIT_SIGNING_KEY_FILE"] == "/var/run/crossaudit/signing-key/ed25519.pem"
        else:
            assert "crossaudit-signing-key" not in secrets_as_volume and "CROSSAUDIT_SIGNING_KEY_FILE" not in env


def test_gpu_variant_requests_a_gpu_for_the_compute_steps_only():
    for path, gpu in ((COMPILED, False), (COMPILED_GPU, True)):
        for name, t in compiled_tasks(path).items():
            accelerator = t["container"].get("resources", {}).get("accelerator", {})
            wants_gpu = gpu and name in {"trigger-inversion", "sensitivity-test"}
            assert (accelerator.get("resourceType"), accelerator.get("resourceCount")) == (
                ("nvidia.com/gpu", "1") if wants_gpu else (None, None)
            ), f"{path.name}: {name}"
            assert t["container"]["image"].endswith("crossaudit-gpu:0.1.0") == wants_gpu
    assert compiled("cuda") == COMPILED_GPU and compiled("cpu") == COMPILED
