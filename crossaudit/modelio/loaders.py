"""Load provider models without trusting them, and prove the torch view is faithful.

A model reaches the audit as a torch module with named *taps* (intermediate activations)
because every stage after loading needs gradients and features. Provider files are
hostile: ONNX is size-checked (the file and every tensor, external data included) and run
through the onnx checker; MLflow model directories are read through their `MLmodel` YAML
only (never through MLflow's loaders, which may unpickle). PyTorch's own formats (pt2
archives, pickled models) are refused: torch's loaders unpickle bytes the provider chose.
An ONNX model's torch translation must then reproduce ONNX Runtime on the audit data
(`parity_check`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import torch
import yaml
from torch import nn

from crossaudit.errors import AuditError, ModelLoadError, ParityError
from crossaudit.modelio import mlmodel
from crossaudit.modelio.onnx_graph import OnnxModule
from crossaudit.modelio.onnx_ops import MAX_TENSOR_ELEMENTS

DEFAULT_MAX_MODEL_BYTES = 512 * 1024 * 1024
PARITY_TOLERANCE = 1e-3


@dataclass
class LoadedModel:
    """A provider model as the audit sees it. `sha256` names the exact bytes audited: the
    ONNX graph with any external data inlined."""

    uri: str
    format: str
    module: nn.Module
    sha256: str
    onnx_bytes: bytes


def _check_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelLoadError(f"{path}: {size} bytes exceeds the model size limit of {max_bytes}")


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: its initializers, its nodes' tensor attributes
    (`Constant` values), and the same inside control-flow branches, which are translated too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            subgraphs = [attr.g] if attr.HasField("g") else []
            for subgraph in [*subgraphs, *attr.graphs]:
                yield from _tensors(subgraph)


def _check_external_data(model: onnx.ModelProto, base: Path) -> None:
    """External tensor files must live inside the model's own directory."""
    for tensor in _tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if not target.is_relative_to(base.resolve()) or not target.is_file():
            raise ModelLoadError(
                f"tensor {tensor.name!r} points at external data {location!r} outside the model directory or missing"
            )


def _stored_bytes(tensor: onnx.TensorProto, base: Path) -> int:
    """Bytes an external tensor brings in: its `length`, or the rest of its file, read from
    the file's size before anything is read."""
    entries = {e.key: e.value for e in tensor.external_data}
    try:
        offset, length = int(entries.get("offset", 0)), entries.get("length")
        available = (base / entries.get("location", "")).stat().st_size - offset
        return max(0, int(length)) if length is not None else max(0, available)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(
            f"tensor {tensor.name!r}: unreadable external data location, offset or length ({exc})"
        ) from exc


def _check_tensor_sizes(model: onnx.ModelProto, base: Path, max_bytes: int) -> None:
    """Each tensor within MAX_TENSOR_ELEMENTS, and all of them together, inline and
    external, within the model size limit: a small graph file may point at large files."""
    total = 0
    for tensor in _tensors(model.graph):
        elements = math.prod(max(int(d), 0) for d in tensor.dims)  # Python ints: no overflow to inf
        if elements > MAX_TENSOR_ELEMENTS:
            raise ModelLoadError(
                f"tensor {tensor.name!r} declares {elements:.0f} elements (limit {MAX_TENSOR_ELEMENTS})"
            )
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 1
        stored = _stored_bytes(tensor, base) if tensor.data_location == onnx.TensorProto.EXTERNAL else 0
        total += max(elements * itemsize, stored, len(tensor.raw_data))
        if total > max_bytes:
            raise ModelLoadError(
                f"the model's tensors hold more than {total} bytes, inline and external data together; "
                f"expected at most the model size limit of {max_bytes}"
            )


# The contract's input element types: float32 images, int64 tokens (language models, captioners).
INPUT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The inputs the audit feeds: graph inputs that are not weights."""
    weights = {init.name for init in model.graph.initializer}
    return [graph_input for graph_input in model.graph.input if graph_input.name not in weights]


def _check_input_types(model: onnx.ModelProto, uri: str) -> None:
    """The contract's inputs are float32 images or int64 tokens. A float64 graph cannot be
    fed: say so and how to export, before the translator refuses its float64 values."""
    for graph_input in _graph_inputs(model):
        kind = graph_input.type.tensor_type.elem_type
        if kind not in INPUT_TYPES:
            try:
                name = str(onnx.helper.tensor_dtype_to_np_dtype(kind))
            except (KeyError, ValueError):
                name = f"ONNX element type {kind}"
            raise ModelLoadError(
                f"{uri}: input {graph_input.name!r} takes {name}; the model contract takes float32 images "
                "(or int64 tokens): export the model in float32"
            )


def _check_batch(model: onnx.ModelProto, uri: str) -> None:
    """A fixed batch (torch.onnx.export without dynamic axes, which bakes the batch size into
    reshapes too) cannot be fed: say how to export, rather than fail later with ONNX
    Runtime's dimension errors."""
    for graph_input in _graph_inputs(model):
        dims = graph_input.type.tensor_type.shape.dim
        if dims and dims[0].dim_value > 0:
            raise ModelLoadError(
                f"{uri}: input {graph_input.name!r} has a fixed batch size of {dims[0].dim_value}; the model "
                "contract needs a dynamic batch dimension (export with dynamic_axes={'input': {0: 'batch'}} "
                "or dynamic_shapes)"
            )


# The first bytes of what a renamed PyTorch file holds: a pickle (protocol 2 or later starts
# with PROTO, 0x80) or torch.save's zip archive (and pt2's).
_PICKLE, _ZIP = b"\x80", b"PK\x03\x04"


def _looks_like(path: Path) -> str:
    """What a file that is not ONNX seems to be, when its first bytes say: a pickle or a
    torch archive renamed .onnx gets the same refusal, and the same way out, as its own name."""
    with path.open("rb") as stream:
        head = stream.read(4)
    if head.startswith(_PICKLE) or head == _ZIP:
        return f"; its bytes are a pickle or a PyTorch archive, not ONNX. {mlmodel.PYTORCH_REFUSED}"
    return ""


def load_onnx(path: Path, uri: str, max_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> LoadedModel:
    """ONNX file -> checked proto -> torch translation."""
    _check_size(path, max_bytes)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise ModelLoadError(f"{uri}: not a readable ONNX file ({type(exc).__name__}){_looks_like(path)}") from exc
    _check_external_data(model, path.parent)
    _check_tensor_sizes(model, path.parent, max_bytes)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{uri}: ONNX checker rejected the model: {exc}") from exc
    _check_input_types(model, uri)
    try:
        module = OnnxModule(model)
    except AuditError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{uri}: could not translate the ONNX graph: {exc}") from exc
    _check_batch(model, uri)
    serialized = model.SerializeToString()
    return LoadedModel(uri, "onnx", module.eval(), hashlib.sha256(serialized).hexdigest(), serialized)


def _load_mlflow_dir(path: Path, uri: str, max_bytes: int) -> LoadedModel:
    """MLflow model directory: follow the flavor's file, never MLflow's (pickling) loaders."""
    try:
        spec = yaml.safe_load((path / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"{uri}: unreadable MLmodel file ({exc})") from exc
    data = mlmodel.onnx_file(spec, uri)
    mlmodel.check_environment(path, uri)
    return load_onnx(_inside(path, data), uri, max_bytes)


def _inside(base: Path, relative: str) -> Path:
    target = (base / relative).resolve()
    if not target.is_relative_to(base.resolve()):
        raise ModelLoadError(f"{relative!r} escapes the model directory {base}")
    return target


def load_model(uri: str, max_bytes: int = DEFAULT_MAX_MODEL_BYTES) -> LoadedModel:
    """The one model loader: ONNX file or MLflow model directory (onnx flavor)."""
    path = Path(uri)
    if not path.exists():
        raise ModelLoadError(f"{uri}: no such file or directory")
    if path.is_dir():
        if not (path / "MLmodel").is_file():
            raise ModelLoadError(f"{uri}: directory without an MLmodel file")
        return _load_mlflow_dir(path, uri, max_bytes)
    if path.suffix in (".pt2", ".pt", ".pth", ".pkl", ".ckpt"):
        raise ModelLoadError(f"{uri}: {mlmodel.PYTORCH_REFUSED}")
    if path.suffix == ".onnx":
        return load_onnx(path, uri, max_bytes)
    raise ModelLoadError(f"{uri}: unknown model format (expected .onnx or an MLflow model dir)")


@torch.no_grad()
def logits_of(
    module: nn.Module, x: np.ndarray | tuple[np.ndarray, ...], device: str = "cpu", batch: int = 256
) -> np.ndarray:
    """Batched float32 outputs of a torch module; `x` is its input, or a tuple of inputs
    with a common first (batch) dimension."""
    inputs = x if isinstance(x, tuple) else (x,)
    outs = [
        module(*(torch.from_numpy(part[i : i + batch]).to(device) for part in inputs)).float().cpu().numpy()
        for i in range(0, len(inputs[0]), batch)
    ]
    return np.concatenate(outs)


# ONNX Runtime's names of the element types the audit feeds.
ORT_TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.int64): "tensor(int64)"}


class GraphInput(Protocol):
    """ONNX Runtime's view of a graph input (`InferenceSession.get_inputs`)."""

    name: str
    shape: list[int | str | None]
    type: str


def _check_inputs(uri: str, declared: Sequence[GraphInput], inputs: tuple[np.ndarray, ...]) -> None:
    """The graph's declared inputs against what the audit feeds, in one line each: ONNX
    Runtime's own complaint (a channels-last model, a float64 graph) spans many lines."""
    for node, part in zip(declared, inputs, strict=True):
        name, shape, kind = node.name, list(node.shape), node.type
        fed = ORT_TYPES.get(part.dtype, str(part.dtype))
        if kind != fed:
            raise ModelLoadError(f"{uri}: input {name!r} takes {kind}; the audit feeds {fed} (images are float32)")
        fixed = [(axis, dim) for axis, dim in enumerate(shape[1:], 1) if isinstance(dim, int)]
        if len(shape) != part.ndim or any(part.shape[axis] != dim for axis, dim in fixed):
            raise ModelLoadError(
                f"{uri}: input {name!r} has shape {shape}; the audit data is {list(part.shape)} "
                "(image models take N x C x H x W, channels first)"
            )


def parity_check(
    model: LoadedModel,
    x: np.ndarray | tuple[np.ndarray, ...],
    device: str = "cpu",
    output_ndim: int = 2,
    checked: Mapping[str, float | None] | None = None,
) -> float | None:
    """Max |torch - ONNX Runtime| on the audit data; raises ParityError beyond tolerance.

    `x` is the model's input, or a tuple in graph-input order (a captioner's images and
    caption tokens). `output_ndim` is the contract's output rank: 2 for logits N x K
    (images), 3 for a language model's or captioner's N x T x V.

    The translation runs first: it bounds every tensor a runtime value sizes, so a graph
    asking for a huge one is refused before ONNX Runtime is asked to allocate it.

    `checked` maps the digests of models an earlier stage of the same audit already
    proved on this audit data to their max difference: the same bytes translate to the
    same torch module, so a pipeline stage that loads them again is not re-run under
    ONNX Runtime (about 0.5 s of every stage's start).
    """
    inputs = x if isinstance(x, tuple) else (x,)
    if checked and model.sha256 in checked:
        return checked[model.sha256]
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    failure: Exception | None = None
    try:
        ours = logits_of(model.module, inputs, device)
    except AuditError:
        raise
    except Exception as exc:  # inputs the graph cannot take: ONNX Runtime's declared inputs say why
        failure = exc
    try:
        session = ort.InferenceSession(model.onnx_bytes, providers=providers)
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise ParityError(f"{model.uri}: the graph takes inputs {names}; this paradigm gives {len(inputs)}")
        _check_inputs(model.uri, session.get_inputs(), inputs)
        if failure is not None:
            raise failure
        reference = np.concatenate(
            [
                session.run(None, {name: part[i : i + 256] for name, part in zip(names, inputs, strict=True)})[0]
                for i in range(0, len(inputs[0]), 256)
            ]
        )
    except AuditError:
        raise
    except Exception as exc:
        raise ParityError(f"{model.uri}: could not run the model on the audit data: {exc}") from exc
    if reference.shape != ours.shape or reference.ndim != output_ndim:
        expected = {2: "N x K", 3: "N x T x V"}[output_ndim]
        raise ParityError(
            f"{model.uri}: expected logits {expected}, ONNX Runtime gave {reference.shape}, torch gave {ours.shape}"
        )
    diff = float(np.max(np.abs(reference - ours)))
    scale = max(1.0, float(np.max(np.abs(reference))))
    if not np.isfinite(diff) or diff > PARITY_TOLERANCE * scale:
        raise ParityError(f"{model.uri}: torch translation differs from ONNX Runtime by {diff:.3g}")
    return diff
