"""The kustomize manifests, rendered with `kubectl kustomize` and validated offline.

The schemas are the Kubernetes API's own OpenAPI types as generated into the official
Python client (`kubernetes.client.models`): every field must exist in its type, every
value must have the type's shape, and every required field must be there (the client's
deserializer enforces those). No cluster is contacted.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client as k8s

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str}

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (for kustomize) is not installed")


def render(kustomization: Path) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(kustomization)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def schema_errors(value: object, type_name: str, path: str) -> list[str]:
    """Where `value` does not fit the Kubernetes type `type_name` (unknown fields, wrong shapes)."""
    if type_name == "object":
        return []
    if type_name in PRIMITIVES:
        wanted = PRIMITIVES[type_name]
        ok = isinstance(value, wanted) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {type(value).__name__}"]
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, match[1], f"{path}[{i}]")]
    if match := re.fullmatch(r"dict\(str, (.+)\)", type_name):
        if not isinstance(value, dict):
            return [f"{path}: expected a map"]
        return [e for key, item in value.items() for e in schema_errors(item, match[1], f"{path}.{key}")]
    model = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object"]
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: not a field of {type_name}")
        else:
            errors.extend(schema_errors(item, model.openapi_types[fields[key]], f"{path}.{key}"))
    return errors


def validate(doc: dict) -> list[str]:
    type_name = f"{doc['apiVersion'].split('/')[-1].capitalize()}{doc['kind']}"
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    errors = schema_errors(doc, type_name, where)
    try:
        k8s.ApiClient()._ApiClient__deserialize(doc, type_name)  # required fields, enums
    except (ValueError, TypeError) as exc:
        errors.append(f"{where}: {exc}")
    return errors


@pytest.fixture(scope="module", params=["base", "overlays/gpu"])
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(MANIFESTS / request.param)


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    _, docs = rendered
    assert {d["kind"] for d in docs} >= {
        "Deployment", "Service", "Secret", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
        "PersistentVolumeClaim", "Job",
    }  # fmt: skip
    errors = [e for doc in docs for e in validate(doc)]
    assert errors == []


def test_an_unknown_field_is_caught():
    deployment = by_kind(render(MANIFESTS / "base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy: not a field of V1Container" in e for e in validate(deployment))


def test_receiver_is_wired_to_its_config_secret_account_and_service(rendered):
    _, docs = rendered
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    config = by_kind(docs, "ConfigMap")["data"]
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(container["args"])))
    assert referenced <= set(config), "every $(VAR) in the receiver's args comes from the ConfigMap"
    assert "CROSSAUDIT_WEBHOOK_SECRET" in by_kind(docs, "Secret")["stringData"]
    assert pod["spec"]["serviceAccountName"] == by_kind(docs, "ServiceAccount")["metadata"]["name"]
    binding = by_kind(docs, "RoleBinding")
    assert binding["subjects"][0]["name"] == pod["spec"]["serviceAccountName"]
    assert binding["roleRef"]["name"] == by_kind(docs, "Role")["metadata"]["name"]
    service = by_kind(docs, "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_gpu_overlay_runs_audits_on_a_gpu_in_the_receiver(rendered):
    name, docs = rendered
    container = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    device = by_kind(docs, "ConfigMap")["data"]["DEVICE"]
    submits = "--kfp-host=$(KFP_HOST)" in container["args"]
    if name == "base":
        assert (device, submits, container["image"]) == ("cpu", True, "ghcr.io/crossaudit/crossaudit:0.1.0")
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    else:
        assert (device, submits, container["image"]) == ("cuda", False, "ghcr.io/crossaudit/crossaudit-gpu:0.1.0")
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
