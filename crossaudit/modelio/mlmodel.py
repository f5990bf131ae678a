"""What an MLflow model directory may hold for its audit to speak for its deployment.

`mlflow models serve` and `build-docker` do not load the graph the audit judged: they
follow MLmodel's `python_function` flavor, and install the Python environment the
directory names (requirements.txt, python_env.yaml, conda.yaml). A provider that writes
those files would run its own code where the model is served, whatever the audit said of
the graph. So a directory is accepted only as `mlflow.onnx` writes it: the `onnx` and
`python_function` flavors, the latter loading the same file with `mlflow.onnx`, no code,
no ONNX Runtime session options (they can load custom-op libraries), and environment
files that install named, known packages from the default index only. The signed digest
then covers every file (`digest.artifact_digest`), so none changes after the audit.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from crossaudit.errors import ModelLoadError

PYTORCH_REFUSED = (
    "PyTorch archives (pt2) and pickled PyTorch models are not accepted: torch's loaders can unpickle bytes "
    "the provider chose, which runs the provider's code. Export the model to ONNX instead, e.g. "
    "torch.onnx.export(model, (example,), 'model.onnx', dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},))"
)
SERVED_PACKAGES = frozenset({"mlflow", "mlflow-skinny", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "protobuf"})
BUILD_PACKAGES = frozenset({"pip", "setuptools", "wheel"})
EXECUTION_PROVIDERS = frozenset({"CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider"})
_ONNX_KEYS = {"code", "data", "onnx_session_options", "onnx_version", "providers"}
_PYFUNC_KEYS = {"code", "data", "env", "loader_module", "python_version"}
_DEFAULT_ENV = {"conda": "conda.yaml", "virtualenv": "python_env.yaml"}
_REQUIREMENT = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:(?:==|<=|>=|<|>|~=|!=)\s*[A-Za-z0-9.*+!]+\s*)?$")


def _refuse(uri: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"{uri}: MLmodel must serve the audited ONNX file as mlflow.onnx writes it: {why}")


def onnx_file(spec: object, uri: str) -> str:
    """The ONNX file MLmodel `spec` serves, once its flavors are those `mlflow.onnx` writes."""
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    if not isinstance(flavors, dict) or not all(isinstance(v, dict) for v in flavors.values()):
        raise ModelLoadError(f"{uri}: MLmodel has no readable flavors")
    if "pytorch" in flavors:
        raise ModelLoadError(f"{uri}: an MLflow pytorch flavor is refused. {PYTORCH_REFUSED}")
    if "onnx" not in flavors:
        raise ModelLoadError(f"{uri}: MLmodel has no onnx flavor (found {sorted(flavors)})")
    onnx_flavor = flavors["onnx"]
    data = onnx_flavor.get("data", "model.onnx")
    pyfunc = flavors.get("python_function", {"loader_module": "mlflow.onnx", "data": data})
    if not isinstance(data, str):
        raise _refuse(uri, "the onnx flavor's data is not a file name")
    if set(flavors) - {"onnx", "python_function"}:
        raise _refuse(uri, f"flavors onnx and python_function only, found {sorted(flavors)}")
    if set(onnx_flavor) - _ONNX_KEYS or set(pyfunc) - _PYFUNC_KEYS:
        raise _refuse(
            uri, f"unknown flavor settings {sorted((set(onnx_flavor) - _ONNX_KEYS) | (set(pyfunc) - _PYFUNC_KEYS))}"
        )
    if pyfunc.get("loader_module") != "mlflow.onnx" or pyfunc.get("data") != data:
        raise _refuse(uri, f"python_function must load {data!r} with mlflow.onnx")
    if onnx_flavor.get("code") or pyfunc.get("code") or onnx_flavor.get("onnx_session_options"):
        raise _refuse(uri, "no code and no ONNX Runtime session options")
    providers = onnx_flavor.get("providers") or []
    if not isinstance(providers, list) or not set(providers) <= EXECUTION_PROVIDERS:
        raise _refuse(uri, f"execution providers among {sorted(EXECUTION_PROVIDERS)}")
    if pyfunc.get("env", _DEFAULT_ENV) != _DEFAULT_ENV:
        raise _refuse(uri, f"python_function's env must be {_DEFAULT_ENV}")
    return data


def _requirements(lines: list[object], uri: str, where: str, allowed: frozenset[str]) -> None:
    for line in lines:
        text = str(line).split("#", 1)[0].strip()
        match = _REQUIREMENT.match(text)
        if text and (match is None or match["name"].lower().replace("_", "-") not in allowed):
            raise ModelLoadError(
                f"{uri}: {where} asks to install {text!r}; a served ONNX model needs only {sorted(allowed)}, "
                "named and from the default index (no options, URLs or files)"
            )


def check_environment(path: Path, uri: str) -> None:
    """The environment files `mlflow models serve` would install, held to known packages."""
    requirements = path / "requirements.txt"
    if requirements.is_file():
        _requirements(requirements.read_text().splitlines(), uri, "requirements.txt", SERVED_PACKAGES)
    for name, reader in (("python_env.yaml", _python_env), ("conda.yaml", _conda_env)):
        if (path / name).is_file():
            try:
                document = yaml.safe_load((path / name).read_text())
            except yaml.YAMLError as exc:
                raise ModelLoadError(f"{uri}: unreadable {name} ({exc})") from exc
            if not isinstance(document, dict):
                raise ModelLoadError(f"{uri}: {name} is not a mapping")
            reader(document, uri)


def _python_env(document: dict, uri: str) -> None:
    if (document.get("dependencies") or []) not in ([], ["-r requirements.txt"]):
        raise ModelLoadError(f"{uri}: python_env.yaml's dependencies must be '-r requirements.txt'")
    _requirements(document.get("build_dependencies") or [], uri, "python_env.yaml", BUILD_PACKAGES)


def _conda_env(document: dict, uri: str) -> None:
    if not set(document.get("channels") or []) <= {"conda-forge", "defaults"}:
        raise ModelLoadError(f"{uri}: conda.yaml may use the conda-forge and defaults channels only")
    for dependency in document.get("dependencies") or []:
        if isinstance(dependency, dict) and set(dependency) == {"pip"} and isinstance(dependency["pip"], list):
            _requirements(dependency["pip"], uri, "conda.yaml", SERVED_PACKAGES)
        elif not (
            isinstance(dependency, str) and re.match(r"^(python|pip)\s*(?:[=<>!~]=?\s*[0-9.*]+\s*)*$", dependency)
        ):
            raise ModelLoadError(f"{uri}: conda.yaml asks to install {dependency!r}; only python, pip and pip packages")
