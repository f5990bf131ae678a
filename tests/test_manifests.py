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

from crossaudit.mlops import operator_config
from pipelines.audit_pipeline import COMPILED, COMPILED_GPU
from pipelines.reaudit_pipeline import COMPILED as REAUDIT_COMPILED
from pipelines.reaudit_pipeline import OPERATOR_CONFIG

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
RECEIVER_KUSTOMIZATIONS = ["base", "overlays/gpu", "overlays/kubeflow-profile"]
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


@pytest.fixture(scope="module", params=RECEIVER_KUSTOMIZATIONS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(MANIFESTS / request.param)


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def pod_spec(docs: list[dict], kind: str) -> dict:
    return by_kind(docs, kind)["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def mounts_of(container: dict, spec: dict) -> dict[str, dict]:
    """Mount path -> (the mount, its volume)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    return {m["mountPath"]: {**m, "volume": volumes[m["name"]]} for m in container.get("volumeMounts", [])}


def test_every_object_validates_against_the_kubernetes_schemas(rendered):
    _, docs = rendered
    assert {d["kind"] for d in docs} >= {
        "Deployment", "Service", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "Job", "NetworkPolicy",
    }  # fmt: skip
    errors = [e for doc in docs for e in validate(doc)]
    assert errors == []


def test_pipeline_namespace_objects_validate():
    docs = render(MANIFESTS / "pipeline-namespace")
    assert {d["metadata"]["namespace"] for d in docs} == {"kubeflow"}
    assert [e for doc in docs for e in validate(doc)] == []


def test_an_unknown_field_is_caught():
    deployment = by_kind(render(MANIFESTS / "base"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy: not a field of V1Container" in e for e in validate(deployment))


def test_receiver_is_wired_to_its_config_account_and_service(rendered):
    _, docs = rendered
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    config = by_kind(docs, "ConfigMap", "crossaudit-config")["data"]
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(container["args"])))
    assert referenced <= set(config), "every $(VAR) in the receiver's args comes from the ConfigMap"
    assert pod["spec"]["serviceAccountName"] == by_kind(docs, "ServiceAccount")["metadata"]["name"]
    service = by_kind(docs, "Service")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"


def test_no_secret_is_shipped_so_an_apply_never_wipes_one_set_by_hand(rendered):
    _, docs = rendered
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"] == []


def test_secrets_are_read_only_files_and_a_missing_one_is_a_pending_pod(rendered):
    _, docs = rendered
    spec = pod_spec(docs, "Deployment")
    container = spec["containers"][0]
    env, mounts = env_of(container), mounts_of(container, spec)
    assert "CROSSAUDIT_WEBHOOK_SECRET" not in env
    assert not [f for f in container.get("envFrom", []) if f.get("secretRef", {}).get("name") == "crossaudit-webhook"]
    secret_file = Path(env["CROSSAUDIT_WEBHOOK_SECRET_FILE"])
    mount = mounts[str(secret_file.parent)]
    assert mount["readOnly"] is True
    assert mount["volume"]["secret"] == {"secretName": "crossaudit-webhook", "optional": False, "defaultMode": 0o440}
    public_key = mounts[str(Path(env["CROSSAUDIT_PUBLIC_KEY_FILE"]).parent)]
    assert public_key["readOnly"] is True and public_key["volume"]["configMap"]["optional"] is False
    assert "crossaudit-signing-key" not in yaml.safe_dump(docs), "the private key is the gate's alone"


def test_mlflow_is_https_with_credentials_from_a_secret(rendered):
    _, docs = rendered
    config = by_kind(docs, "ConfigMap", "crossaudit-config")["data"]
    assert config["MLFLOW_TRACKING_URI"].startswith("https://")
    container = pod_spec(docs, "Deployment")["containers"][0]
    refs = [f["secretRef"] for f in container["envFrom"] if "secretRef" in f]
    assert refs == [{"name": "crossaudit-mlflow-credentials", "optional": False}]
    job = pod_spec(docs, "Job")["containers"][0]
    assert not [f for f in job.get("envFrom", []) if "secretRef" in f], "creating a recurring run needs no MLflow"


def test_operator_config_is_mounted_read_only_and_parses(rendered):
    _, docs = rendered
    spec = pod_spec(docs, "Deployment")
    container = spec["containers"][0]
    path = Path(env_of(container)["CROSSAUDIT_CONFIG"])
    mount = mounts_of(container, spec)[str(path.parent)]
    assert mount["readOnly"] is True and mount["volume"]["configMap"]["name"] == OPERATOR_CONFIG
    config = by_kind(docs, "ConfigMap", OPERATOR_CONFIG)["data"][path.name]
    assert operator_config.parse(config).models, "the example configures at least one model"


def test_pods_mount_no_kubernetes_api_token(rendered):
    name, docs = rendered
    assert by_kind(docs, "ServiceAccount")["automountServiceAccountToken"] is False
    for kind in ("Deployment", "Job"):
        spec = pod_spec(docs, kind)
        assert spec["automountServiceAccountToken"] is False, kind
        tokens = [
            source["serviceAccountToken"]
            for volume in spec["volumes"]
            for source in volume.get("projected", {}).get("sources", [])
            if "serviceAccountToken" in source
        ]
        assert tokens == ([] if name != "overlays/kubeflow-profile" else [
            {"audience": "pipelines.kubeflow.org", "expirationSeconds": 7200, "path": "token"}
        ]), kind  # fmt: skip


def test_receiver_and_job_run_read_only_non_root_with_no_capabilities(rendered):
    _, docs = rendered
    for kind in ("Deployment", "Job"):
        spec = pod_spec(docs, kind)
        container = spec["containers"][0]
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True and context["runAsNonRoot"] is True, kind
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}, kind
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, kind
        assert spec["securityContext"]["runAsNonRoot"] is True, kind
        assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), kind
        assert {"cpu", "memory"} <= container["resources"]["limits"].keys(), kind
        assert "emptyDir" in mounts_of(container, spec)["/tmp"]["volume"], kind


def test_one_reaudit_scheduler_per_deployment(rendered):
    _, docs = rendered
    args = pod_spec(docs, "Deployment")["containers"][0]["args"]
    assert "--no-schedule" in args and not [a for a in args if a.startswith("--cron")]
    assert pod_spec(docs, "Job")["containers"][0]["command"] == ["crossaudit", "schedule"]


def test_gpu_overlay_submits_audits_to_kubeflow_and_gives_the_receiver_no_gpu(rendered):
    name, docs = rendered
    spec = pod_spec(docs, "Deployment")
    container = spec["containers"][0]
    device = by_kind(docs, "ConfigMap", "crossaudit-config")["data"]["DEVICE"]
    assert "--kfp-host=$(KFP_HOST)" in container["args"], "provider models never run in the receiver"
    assert device == ("cuda" if name == "overlays/gpu" else "cpu")
    assert (
        "--device=$(DEVICE)" in container["args"]
        and "--device=$(DEVICE)" in pod_spec(docs, "Job")["containers"][0]["args"]
    )
    assert container["image"] == "ghcr.io/crossaudit/crossaudit:0.1.0"
    assert "nvidia.com/gpu" not in yaml.safe_dump(spec)


def egress_peers(policy: dict) -> list[tuple[str, dict, list]]:
    """(namespace, pod selector, ports) for every egress rule's peer."""
    return [
        (peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"], peer.get("podSelector", {}),
         rule.get("ports", []))
        for rule in policy["spec"].get("egress", [])
        for peer in rule["to"]
    ]  # fmt: skip


DNS = ("kube-system", {"matchLabels": {"k8s-app": "kube-dns"}}, [
    {"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}
])  # fmt: skip
KFP_API = ("kubeflow", {"matchLabels": {"app": "ml-pipeline"}}, [{"protocol": "TCP", "port": 8888}])


def test_receiver_network_policy(rendered):
    _, docs = rendered
    deny = by_kind(docs, "NetworkPolicy", "crossaudit-default-deny")["spec"]
    assert deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny and "egress" not in deny
    assert deny["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "crossaudit"}}
    pod_labels = by_kind(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert deny["podSelector"]["matchLabels"].items() <= pod_labels.items()
    policy = by_kind(docs, "NetworkPolicy", "crossaudit-receiver")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8765}]
    (source,) = ingress["from"]
    assert source["namespaceSelector"]["matchExpressions"][0]["values"] == ["mlflow", "ingress-nginx", "istio-system"]
    assert egress_peers(policy) == [DNS, ("mlflow", {}, []), KFP_API]
    job_labels = by_kind(docs, "Job")["spec"]["template"]["metadata"]["labels"]
    job_policy = by_kind(docs, "NetworkPolicy", "crossaudit-reaudit-schedule")
    assert job_policy["spec"]["podSelector"]["matchLabels"].items() <= job_labels.items()
    assert egress_peers(job_policy) == [DNS, KFP_API]


def pipeline_pod_labels() -> set[tuple[str, str]]:
    """Every (key, value) pod label the compiled pipelines put on their pods."""
    labels = set()
    for path in (COMPILED, COMPILED_GPU, REAUDIT_COMPILED):
        _, platform = yaml.safe_load_all(path.read_text())
        for executor in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values():
            labels |= set(executor["podMetadata"]["labels"].items())
    return labels


@pytest.mark.parametrize("kustomization", ["pipeline-namespace", "overlays/kubeflow-profile"])
def test_audit_pods_reach_only_what_their_step_needs(kustomization):
    docs = render(MANIFESTS / kustomization)
    registry = by_kind(docs, "NetworkPolicy", "crossaudit-audit-registry")
    artifacts = by_kind(docs, "NetworkPolicy", "crossaudit-audit-artifacts")
    for policy in (registry, artifacts):
        assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in policy["spec"]
    assert egress_peers(registry) == [DNS, ("mlflow", {}, []), ("kubeflow", {}, [])]
    assert egress_peers(artifacts) == [DNS, ("kubeflow", {}, [])], "steps running provider models never reach MLflow"
    selected = {next(iter(p["spec"]["podSelector"]["matchLabels"].items())) for p in (registry, artifacts)}
    egress_labels = {label for label in pipeline_pod_labels() if label[0] == "crossaudit.io/egress"}
    assert egress_labels == selected, "every pipeline pod is held by one of the audit policies"
    assert ("app.kubernetes.io/part-of", "crossaudit") in pipeline_pod_labels()
    assert by_kind(docs, "ConfigMap", OPERATOR_CONFIG), "the re-audit task mounts the operator's configuration"


def test_kubeflow_profile_overlay_authorises_the_kfp_api_in_the_profile_namespace():
    docs = render(MANIFESTS / "overlays/kubeflow-profile")
    assert "Namespace" not in {d["kind"] for d in docs}, "the Profile controller owns the namespace"
    assert {d["metadata"]["namespace"] for d in docs} == {"crossaudit"}
    binding = by_kind(docs, "RoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kubeflow-pipelines-edit"
    }  # fmt: skip
    account = by_kind(docs, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]  # fmt: skip
    for kind in ("Deployment", "Job"):
        spec = pod_spec(docs, kind)
        container = spec["containers"][0]
        mounts = mounts_of(container, spec)
        token = Path(env_of(container)["KF_PIPELINES_SA_TOKEN_PATH"])
        assert mounts[str(token.parent)]["readOnly"] is True, kind
        namespace = mounts["/var/run/secrets/kubernetes.io/serviceaccount"]["volume"]["projected"]["sources"]
        assert namespace == [{"downwardAPI": {"items": [
            {"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}
        ]}}], "kfp.Client reads its profile namespace there; no API token is mounted with it"  # fmt: skip
    istio = by_kind(docs, "NetworkPolicy", "crossaudit-istio")
    assert istio["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "crossaudit"}}


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_images_name_their_base_by_digest(dockerfile):
    text = (ROOT / "images" / dockerfile).read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms, "the Dockerfile has a FROM line"
    for image in froms:
        if match := re.fullmatch(r"\$\{(\w+)\}", image):
            declared = [line for line in lines if re.fullmatch(rf"ARG {match[1]}(=.*)?", line)]
            assert declared, f"{image} is declared"
            defaults = [line.split("=", 1)[1] for line in declared if "=" in line]
            assert all(DIGEST.search(d) for d in defaults), f"{image}'s default is pinned by digest"
            assert f'case "${{{match[1]}}}" in *@sha256:{"?" * 64})' in text, "the build refuses a tag"
        else:
            assert DIGEST.search(image), f"{image} is pinned by digest"


def test_gpu_image_installs_onnxruntime_gpu_at_a_pinned_version():
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )  # fmt: skip
    assert re.fullmatch(r"\d+\.\d+\.\d+", pins["onnxruntime-gpu"])
    installs = [line for line in (ROOT / "images" / "Dockerfile.gpu").read_text().splitlines() if "pip install" in line]
    extras = [line for line in installs if "'.[" in line]
    assert extras == [line for line in extras if "gpu]'" in line and "-c /tmp/gpu-constraints.txt" in line] != []
    assert not [line for line in installs if "cpu" in line.split("'.[")[-1]], "never both runtimes"


def test_cpu_image_installs_torchs_cpu_build_and_the_cpu_runtime():
    """torch's PyPI wheel is the multi-GB CUDA build; its CPU index has the same version."""
    text = (ROOT / "images" / "Dockerfile").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in text
    assert "'.[serve,cpu]'" in text
