"""Translate an ONNX graph into a differentiable torch module.

Why our own translator: trigger inversion needs gradients through the provider's model,
and ONNX Runtime gives none. The maintained converter (onnx2torch) imports torchvision,
which does not run on our machines, so we interpret the graph node by node with torch
ops. The op set covers what ordinary CNNs, ResNet-style nets, MLPs, MobileNet-style nets
(V3's hard-sigmoid gates included), PReLU and cosine-head nets, GroupNorm nets, small
vision transformers, Inception-style nets, transposed convolutions and upsampling layers
export to, with either of torch's exporters (`tests/test_foreign_models.py`), plus the
element-wise, logic and reduction ops other exporters write; any other op, or an op mode we
cannot reproduce exactly, raises `UnsupportedOpError` when the model is loaded (the
parity check runs every node), never during an audit.

A graph may behave differently under ONNX Runtime only where the translation differs from
it, so what is translated is held to what was checked against ONNX Runtime: ops of the
default ONNX domain only, each on the element types of `SUPPORTED_TYPES` (types from ONNX's
strict inference), no integer arithmetic on values computed from the input, no NaN computed
from the input, every tensor a runtime value sizes bounded by MAX_TENSOR_ELEMENTS, and each
sample's output computed from that sample alone (`_check_per_sample`): the audit evaluates
batches, a deployment may serve one request at a time.
Float initializers become `nn.Parameter`s so the sensitivity stage can fine-tune a copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from crossaudit.errors import ModelLoadError, ParityError, UnsupportedOpError
from crossaudit.modelio.onnx_ops import (
    BROADCASTING_OPS,
    OPS,
    TAP_OPS,
    Attrs,
    _axes,
    _broadcast_shapes,
    _check_output_size,
    _text,
)

# An image or token model has one input; a captioner two (the image and the caption tokens).
MAX_INPUTS = 2

Node = tuple[str, list[str], list[str], Attrs]

# Ops that act on each position of a sequence alone, whatever the others hold: element-wise
# ones, and those acting on the last axis with weights shared by every position (see
# `_per_position`). A transformer runs only these after its last attention: the residual
# sum, layer norm, MLP and vocabulary head.
ELEMENTWISE_UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "HardSwish", "HardSigmoid", "Mish",
        "Softsign", "Softplus", "Abs", "Sign", "Log", "Reciprocal", "Floor", "Ceil", "Sin", "Cos", "Erf", "Sqrt",
        "Exp", "Neg", "Identity", "Dropout",
    }
)  # fmt: skip
ELEMENTWISE_BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow"})

# Ops the module runs itself rather than through OPS: constants, and control flow.
STRUCTURAL_OPS = frozenset({"Constant", "If"})

FLOAT, INT64, BOOL = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
# Element types a value of a translated graph may have.
VALUE_TYPES = frozenset({FLOAT, INT64, BOOL})
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})

# The (op, element type) pairs the translation supports. An op's element type is that of
# its data input (input 0; Where's input 1). Every pair is checked against ONNX Runtime on
# random and edge-case values by `tests/test_onnx_semantics.py`: a pair that is not, or an
# op whose semantics differ for a type (integer division truncates, a float quotient does
# not), would let a graph compute one thing under ONNX Runtime and another in the audit.
# Integer and boolean pairs cover shape arithmetic, token models and masks.
INTEGER_AND_FLOAT_OPS = (
    "Add", "Sub", "Mul", "Div", "Max", "Min", "Neg", "Abs", "Equal", "Less", "LessOrEqual", "Greater",
    "GreaterOrEqual", "Where", "Concat", "Gather", "Reshape", "Flatten", "Slice", "Split", "Squeeze", "Unsqueeze",
    "Transpose", "Expand", "Tile", "Range",
)  # fmt: skip
SUPPORTED_TYPES: dict[str, frozenset[int]] = {
    **{op: frozenset({FLOAT}) for op in OPS},
    **{op: frozenset({FLOAT, INT64}) for op in INTEGER_AND_FLOAT_OPS},
    "Mod": frozenset({FLOAT, INT64}),
    "Not": frozenset({BOOL}),
    "And": frozenset({BOOL}),
    "Or": frozenset({BOOL}),
    "Cast": frozenset({FLOAT, INT64, BOOL}),
    "Identity": frozenset({FLOAT, INT64, BOOL}),
    "Shape": frozenset({FLOAT, INT64, BOOL}),
    "ConstantOfShape": frozenset({INT64}),
    "If": frozenset({BOOL}),
}
TYPED_INPUT = {"Where": 1}
# Inputs of a fixed element type (shapes, axes, indices, a condition, scales); every other
# input has the op's element type.
FIXED_INPUT_TYPES: dict[str, dict[int, int]] = {
    **{op: {1: INT64} for op in ("Reshape", "Gather", "Squeeze", "Unsqueeze", "Tile", "Expand", "Split")},
    **{op: {1: INT64} for op in OPS if op.startswith("Reduce")},
    "Slice": dict.fromkeys(range(1, 5), INT64),
    "Pad": {1: INT64, 3: INT64},
    "Resize": {1: FLOAT, 2: FLOAT, 3: INT64},
    "Where": {0: BOOL},
}
# Ops that only move, select or compare integers. Integers computed from a graph input may
# feed only these: integer arithmetic on input data is where a translation and ONNX
# Runtime can part (overflow, division by zero, rounding) on inputs the audit never sees.
INTEGER_DATA_OPS = frozenset(
    {
        "Gather", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice", "Split",
        "Identity", "Shape", "Expand", "Tile", "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual",
        "Where", "Cast", "Max", "Min",
    }
)  # fmt: skip


def _type_name(kind: int | None) -> str:
    return "unknown" if kind is None else onnx.TensorProto.DataType.Name(kind).lower()


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [g for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def _check_domains(model: onnx.ModelProto) -> None:
    """Only the default ONNX domain has a translation checked against ONNX Runtime: a
    custom domain, an ONNX Runtime contrib op or a model-local function could compute
    anything under ONNX Runtime."""
    if model.functions:
        names = ", ".join(f"{f.domain}.{f.name}" for f in model.functions)
        raise UnsupportedOpError(f"model-local functions are not supported (found {names}); inline them on export")

    def walk(graph: onnx.GraphProto) -> None:
        if graph.sparse_initializer:
            raise UnsupportedOpError(f"graph {graph.name!r} holds sparse initializers; expected dense ones")
        for node in graph.node:
            if node.domain not in DEFAULT_DOMAINS:
                raise UnsupportedOpError(
                    f"node {node.name or node.op_type!r} is {node.domain}.{node.op_type}; expected ops of the "
                    "default ONNX domain only"
                )
            for subgraph in _subgraphs(node):
                walk(subgraph)

    walk(model.graph)


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type of every value in the graph and its branches, from ONNX's strict
    type inference (the types ONNX Runtime runs with)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # onnx raises InferenceError, ValidationError and others
        raise UnsupportedOpError(f"ONNX type inference rejected the graph: {exc}") from exc
    types: dict[str, int] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                types[value.name] = value.type.tensor_type.elem_type
        types.update((init.name, init.data_type) for init in graph.initializer)
        for node in graph.node:
            for subgraph in _subgraphs(node):
                collect(subgraph)

    collect(inferred.graph)
    return types


def _check_types(nodes: list[Node], types: dict[str, int], from_input: set[str]) -> None:
    """Refuse any node outside SUPPORTED_TYPES, and integer arithmetic on values computed
    from the graph's inputs (`INTEGER_DATA_OPS`). `from_input` holds the values computed
    from the inputs' contents (a `Shape` reads only their shape) and grows as nodes are read."""
    for op, inputs, outputs, attrs in nodes:
        present = [(position, name) for position, name in enumerate(inputs) if name]
        for name in [name for _, name in present] + [name for name in outputs if name]:
            if types.get(name) not in VALUE_TYPES:
                raise UnsupportedOpError(
                    f"{op} value {name!r} has element type {_type_name(types.get(name))}; expected float, int64 "
                    "or bool (a value whose type cannot be inferred is refused)"
                )
        if op == "Constant":
            continue
        kind = types[inputs[TYPED_INPUT.get(op, 0)]]
        if kind not in SUPPORTED_TYPES.get(op, frozenset()):
            allowed = ", ".join(sorted(_type_name(k) for k in SUPPORTED_TYPES.get(op, frozenset())))
            raise UnsupportedOpError(f"{op} on {_type_name(kind)} is not supported (supported: {allowed or 'none'})")
        fixed = FIXED_INPUT_TYPES.get(op, {})
        for position, name in present:
            if types[name] != fixed.get(position, kind):
                raise UnsupportedOpError(
                    f"{op} input {position} ({name!r}) is {_type_name(types[name])}; expected "
                    f"{_type_name(fixed.get(position, kind))}"
                )
        read = [name for _, name in present] + (sorted(_captured_by_if(attrs)) if op == "If" else [])
        computed = [name for name in read if name in from_input]
        integers = [name for name in computed if types[name] == INT64]
        if integers and op not in INTEGER_DATA_OPS:
            raise UnsupportedOpError(
                f"{op} computes with integers derived from the graph input ({', '.join(integers)}); integer "
                "arithmetic on input data is not translated: expected it on shapes and constants only"
            )
        if op == "Cast" and computed and kind == FLOAT and int(attrs["to"]) == INT64:
            raise UnsupportedOpError(
                f"Cast of {inputs[0]!r}, derived from the graph input, from float to int64 is not translated "
                "(rounding and out-of-range values differ between runtimes): expected float values"
            )
        if op == "If":
            for key in ("then_branch", "else_branch"):
                _check_types(attrs[key].nodes, types, from_input)
        if computed and op != "Shape":
            from_input.update(name for name in outputs if name)


@dataclass(frozen=True)
class Branch:
    """One branch of an `If`: nodes run in the enclosing graph's scope (a branch may read any
    value computed before the `If`), and the values it hands back as the `If`'s outputs."""

    nodes: list[Node]
    outputs: list[str]

    def captured(self) -> set[str]:
        """Enclosing-scope values the branch reads: used for data-flow analysis, since an
        ONNX `If` does not list them among its inputs."""
        made: set[str] = set()
        read: set[str] = set()
        for op, inputs, outputs, attrs in self.nodes:
            read.update(i for i in inputs if i not in made)
            if op == "If":
                read.update(_captured_by_if(attrs) - made)
            made.update(outputs)
        return read | (set(self.outputs) - made)


def _captured_by_if(attrs: Attrs) -> set[str]:
    return {name for key in ("then_branch", "else_branch") for name in attrs[key].captured()}


def _op_types(nodes: list[Node]) -> set[str]:
    """Every op type among `nodes` and inside their `If` branches."""
    found: set[str] = set()
    for op, _, _, attrs in nodes:
        found.add(op)
        if op == "If":
            for key in ("then_branch", "else_branch"):
                found |= _op_types(attrs[key].nodes)
    return found


def _needed(nodes: list[Node], output: str) -> list[Node]:
    """The nodes `output` depends on, in graph order. A provider's graph may compute more
    than the logits we audit (an argmax, probabilities as a second output); what only
    those need is never run, so an op there cannot stop the audit."""
    needed = {output}
    kept: list[Node] = []
    for node in reversed(nodes):
        op, inputs, outputs, attrs = node
        if needed.intersection(outputs):
            kept.append(node)
            needed.update(inputs)
            if op == "If":
                needed.update(_captured_by_if(attrs))
    return kept[::-1]


def _per_position(node: Node, fixed: Callable[[str], tuple[int, ...] | None]) -> bool:
    """Whether `node` computes each position from that position alone. `fixed` gives the
    shape of a weight or constant, None for a value computed from the input; a weight
    must not vary along the positions (at most one axis, the features)."""
    op, inputs, outputs, attrs = node
    shapes = [fixed(name) for name in inputs]
    if len(outputs) != 1 or None not in shapes:
        return False
    if op in ELEMENTWISE_BINARY:
        return all(shape is None or len(shape) <= 1 for shape in shapes)
    if shapes[0] is not None:
        return False
    if op in ELEMENTWISE_UNARY:
        return len(inputs) == 1
    if op == "MatMul":
        return len(inputs) == 2 and shapes[1] is not None and len(shapes[1]) == 2
    if op == "LayerNormalization":
        return int(attrs.get("axis", -1)) == -1 and all(shape is not None and len(shape) == 1 for shape in shapes[1:])
    return False


def _per_position_tail(nodes: list[Node], output: str, fixed: Callable[[str], tuple[int, ...] | None]) -> list[int]:
    """Indices of the nodes at the graph's end that compute each position from that
    position alone, and whose results only such nodes (or the output) read."""
    readers: dict[str, list[int]] = {}
    for index, (_, inputs, _, _) in enumerate(nodes):
        for name in inputs:
            readers.setdefault(name, []).append(index)
    tail: set[int] = set()
    for index in reversed(range(len(nodes))):
        name = nodes[index][2][0] if nodes[index][2] else ""
        read_by = readers.get(name, [])
        feeds_tail = name == output or (read_by and all(r in tail for r in read_by))
        if feeds_tail and _per_position(nodes[index], fixed):
            tail.add(index)
    return sorted(tail)


def _attributes(node: onnx.NodeProto) -> Attrs:
    attrs: Attrs = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        attrs[attr.name] = value
    return attrs


# -- one sample's output must not depend on the rest of its batch -----------------------
#
# The audit evaluates a model on batches; a deployment serving single requests runs it on
# batches of one. A graph that reduces over the batch axis, or computes with the batch size
# itself, can therefore behave one way under audit and another when deployed (a backdoor
# gated on "the batch holds one sample"). The translator refuses any graph in which
# information flows across samples: each value is given a batch layout (which axis indexes
# the samples) by op rules that admit only per-sample computation, and the batch size read
# from a shape may only size tensors, never enter the data.
#
# The rules need every value's shape, so the graph is run on zeros at two batch sizes
# (`TRIAL_BATCHES`); a shape that varies between them anywhere but on the batch axis, or
# a layout that differs, is refused as well.

TRIAL_BATCHES = (2, 3)
# Candidate sizes for an input dimension the graph leaves open (a token model's length, an
# image model's free height and width): the first at which the graph runs is used.
TRIAL_DIMS = (3, 16, 32, 64, 224)


@dataclass(frozen=True)
class Layout:
    """Axis `axis` of a value indexes the samples of its batch: it has size
    outer * batch * inner, and sample i occupies indices [o * batch * inner + i * inner,
    ... + inner) for each o (exporters merge the batch with heads or positions). Each
    sample's slice depends only on that sample and on values the same for every sample."""

    axis: int
    inner: int


@dataclass(frozen=True)
class Flow:
    """What a value carries across samples: its batch layout (None: nothing per sample),
    and, for an integer value, which elements hold the batch size (None: none)."""

    layout: Layout | None = None
    size: Tensor | None = None


STATIC = Flow()
ELEMENTWISE_OPS = ELEMENTWISE_UNARY | {"ThresholdedRelu", "Not", "Cast"}
BROADCAST_FLOW_OPS = BROADCASTING_OPS | {"Clip", "Sum", "Mean", "Max", "Min"}
# Ops that act on each index of axis 0 alone (images: N x C x spatial).
PER_ROW_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
        "BatchNormalization", "InstanceNormalization", "LRN", "Resize", "Pad",
    }
)  # fmt: skip
RESHAPING_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})
# Inputs that only size or place the output (a shape, slice bounds, output sizes): where
# the batch size may be read.
SIZE_ARGUMENTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}),
    "Expand": frozenset({1}),
    "ConstantOfShape": frozenset({0}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Resize": frozenset({3}),
    "Tile": frozenset({1}),
}
# Inputs that must hold the same for every sample: weights, statistics, axes, pads, scales.
PARAMETER_INPUTS: dict[str, frozenset[int]] = {
    **{op: frozenset({1, 2}) for op in ("Conv", "ConvTranspose", "InstanceNormalization", "LayerNormalization")},
    **{op: frozenset({1}) for op in OPS if op.startswith("Reduce")},
    **{op: frozenset({1}) for op in ("Split", "Squeeze", "Unsqueeze")},
    "BatchNormalization": frozenset({1, 2, 3, 4}),
    "Pad": frozenset({1, 2, 3}),
    "Resize": frozenset({1, 2, 3}),
    "Range": frozenset({0, 1, 2}),
    **SIZE_ARGUMENTS,
}
# Ops that may compute with the batch size as shape arithmetic (the input positions that
# carry it through): moving, selecting and multiplying shape elements, and comparing them
# with a negative constant (the TorchScript exporter's `expand(-1)`), all with results
# that size tensors only.
SIZE_OPS: dict[str, frozenset[int] | None] = {
    "Gather": frozenset({0}),
    "Slice": frozenset({0}),
    "Squeeze": frozenset({0}),
    "Unsqueeze": frozenset({0}),
    "Reshape": frozenset({0}),
    "Identity": frozenset({0}),
    "Cast": frozenset({0}),
    "Transpose": frozenset({0}),
    "Expand": frozenset({0}),
    "Tile": frozenset({0}),
    "Where": frozenset({1, 2}),
    "Concat": None,
    "Mul": None,
    "Equal": None,
}


class _MixingError(Exception):
    """A rule's refusal, before the node is named."""


def _axis(axis: int, rank: int) -> int:
    return axis % max(rank, 1)


def _restride(layout: Layout, before: Sequence[int], after: Sequence[int], batch: int) -> Layout:
    """The batch's layout after a reshape (row-major order is kept): the axis whose stride
    range holds the batch's, or a refusal where the batch would be split over axes."""
    stride = layout.inner * math.prod(before[layout.axis + 1 :])
    for axis in range(len(after)):
        below = math.prod(after[axis + 1 :])
        if below and stride % below == 0 and (below * after[axis]) % (stride * batch) == 0:
            return Layout(axis, stride // below)
    raise _MixingError(f"it reshapes {list(before)} to {list(after)}, spreading the batch over several axes")


def _aligned(layouts: Sequence[tuple[Layout, int]], rank: int) -> Layout | None:
    """The output layout of inputs broadcast together (each with its rank)."""
    found = {Layout(layout.axis + rank - own, layout.inner) for layout, own in layouts}
    if len(found) > 1:
        raise _MixingError("its inputs hold the batch on different axes")
    return found.pop() if found else None


def _mask(value: Tensor, flow: Flow) -> Tensor:
    return flow.size.long() if flow.size is not None else torch.zeros(value.shape, dtype=torch.long)


def _size_flow(op: str, attrs: Attrs, args: list[Tensor | None], flows: list[Flow]) -> list[Flow]:
    """Shape arithmetic on values holding the batch size: which elements of the results hold it."""
    carriers = SIZE_OPS.get(op, frozenset())
    positions = range(len(args)) if carriers is None else carriers
    if op not in SIZE_OPS or any(flow.layout for flow in flows):
        raise _MixingError("it computes with the batch size as data")
    if any(flows[i].size is not None for i in range(len(args)) if i not in positions):
        raise _MixingError("it computes with the batch size as data")
    if op == "Cast" and int(attrs["to"]) != INT64:
        raise _MixingError("it casts the batch size to a data type")
    masks = [
        _mask(v, f) if i in positions and v is not None else v for i, (v, f) in enumerate(zip(args, flows, strict=True))
    ]
    if op == "Mul":
        held = (masks[0] + masks[1]) > 0
    elif op == "Equal":
        shape = _broadcast_shapes(args[0].shape, args[1].shape)
        a, b = (t.expand(shape) for t in args[:2])
        ma, mb = (m.expand(shape) > 0 for m in masks[:2])
        # A product of dimensions and non-negative factors never equals a negative constant.
        decided = (ma & ~mb & (a >= 0) & (b < 0)) | (mb & ~ma & (b >= 0) & (a < 0))
        held = (ma | mb) & ~decided
    else:
        result = OPS[op](attrs, masks)
        held = (result[0] if isinstance(result, tuple) else result) > 0
        if isinstance(result, tuple):
            return [Flow(size=(r > 0) if bool((r > 0).any()) else None) for r in result]
    return [Flow(size=held if bool(held.any()) else None)]


def _flow(
    op: str, attrs: Attrs, args: list[Tensor | None], flows: list[Flow], results: Sequence[Tensor], batch: int
) -> list[Flow]:
    """The flows of a node's outputs from its inputs' (`Flow`), or `_MixingError` where
    the node would mix samples or read the batch size as data."""
    count = len(results)
    sizing = SIZE_ARGUMENTS.get(op, frozenset())
    for position in PARAMETER_INPUTS.get(op, frozenset()):
        if position < len(flows) and flows[position].layout is not None:
            raise _MixingError(f"its input {position} (a weight, shape or bound) differs between samples")
    if op == "Shape":  # reads the shape alone: a shape vector's length is fixed
        layout = flows[0].layout
        rank = args[0].dim()
        start, end = int(attrs.get("start", 0)), attrs.get("end")
        held = torch.zeros(rank, dtype=torch.bool)
        if layout is not None:
            held[layout.axis] = True
        held = held[start : None if end is None else int(end)]
        return [Flow(size=held if bool(held.any()) else None)]
    if any(flow.size is not None for i, flow in enumerate(flows) if i not in sizing):
        return _size_flow(op, attrs, args, flows)
    layouts = [(i, flow.layout) for i, flow in enumerate(flows) if flow.layout is not None]
    sized = [i for i in sizing if i < len(flows) and flows[i].size is not None]
    if op in ("ConstantOfShape", "Expand", "Tile") and sized and (op == "ConstantOfShape" or flows[0].layout is None):
        held = flows[sized[0]].size
        rank = results[0].dim()
        axes = [rank - len(held) + i for i in range(len(held)) if bool(held[i])]
        if len(axes) != 1 or results[0].shape[axes[0]] % batch:
            raise _MixingError("it sizes a tensor by the batch size on several axes")
        return [Flow(Layout(axes[0], results[0].shape[axes[0]] // batch))]
    if not layouts:
        if sized and op != "Reshape":
            raise _MixingError("it selects from a value the same for every sample by the batch size")
        return [STATIC] * count
    rank = results[0].dim()
    if op in ELEMENTWISE_OPS:
        return [Flow(flows[0].layout)]
    if op in BROADCAST_FLOW_OPS:
        return [Flow(_aligned([(layout, args[i].dim()) for i, layout in layouts], rank))]
    first = flows[0].layout
    if first is None:
        return [Flow(_gathered_or_multiplied(op, attrs, args, layouts, rank))]
    if op in PER_ROW_OPS:
        if first.axis != 0 or results[0].shape[0] != args[0].shape[0]:
            raise _MixingError("it acts across the batch axis")
        if sized and any(flows[sized[0]].size.tolist()[1:]):
            raise _MixingError("it resizes by the batch size")
        return [Flow(first)]
    if op in ("Softmax", "LogSoftmax", "LayerNormalization"):
        if first.axis >= _axis(int(attrs.get("axis", -1)), args[0].dim()):
            raise _MixingError("it normalizes over the batch axis")
        return [Flow(first)]
    if op.startswith("Reduce"):
        axes = [_axis(a, args[0].dim()) for a in _axes(attrs, args)] or list(range(args[0].dim()))
        if first.axis in axes:
            raise _MixingError("it reduces over the batch axis")
        shift = 0 if attrs.get("keepdims", 1) else sum(a < first.axis for a in axes)
        return [Flow(Layout(first.axis - shift, first.inner))]
    if op in RESHAPING_OPS:
        if op == "Squeeze" and not _axes(attrs, args):
            raise _MixingError("it squeezes every axis of size 1, the batch axis too when it holds one sample")
        return [Flow(_restride(first, args[0].shape, results[0].shape, batch))]
    if op == "Transpose":
        perm = [int(v) for v in attrs.get("perm", reversed(range(args[0].dim())))]
        return [Flow(Layout(perm.index(first.axis), first.inner))]
    if op in ("Concat", "Split"):
        if _axis(int(attrs.get("axis", 0)), args[0].dim()) == first.axis:
            raise _MixingError("it joins or splits along the batch axis")
        if op == "Concat" and len(layouts) != sum(t is not None for t in args):
            raise _MixingError("it joins per-sample values with values the same for every sample")
        return [Flow(_aligned([(layout, rank) for _, layout in layouts], rank))] * count
    if op == "Slice":
        if any(i > 2 for i in sized):
            raise _MixingError("its axes or steps depend on the batch size")
        axes = args[3].tolist() if len(args) > 3 and args[3] is not None else list(range(len(args[1])))
        steps = args[4].tolist() if len(args) > 4 and args[4] is not None else [1] * len(axes)
        for position, (axis, step) in enumerate(zip(axes, steps, strict=True)):
            bounded = any(flows[i].size is not None and bool(flows[i].size.reshape(-1)[position]) for i in sized)
            on_batch = _axis(axis, args[0].dim()) == first.axis
            if on_batch and (step != 1 or results[0].shape[first.axis] != args[0].shape[first.axis]):
                raise _MixingError("it selects samples of the batch")
            if bounded and not on_batch:
                raise _MixingError("its bounds depend on the batch size")
        return [Flow(first)]
    if op == "Expand":
        axis = first.axis + rank - args[0].dim()
        if results[0].shape[axis] != args[0].shape[first.axis] or (
            sized and [i for i, held in enumerate(flows[1].size.tolist()) if held] != [axis - rank + len(args[1])]
        ):
            raise _MixingError("it broadcasts along the batch axis")
        return [Flow(Layout(axis, first.inner))]
    if op == "Tile":
        if sized or int(args[1][first.axis]) != 1:
            raise _MixingError("it repeats along the batch axis")
        return [Flow(first)]
    return [Flow(_gathered_or_multiplied(op, attrs, args, layouts, rank))]


def _gathered_or_multiplied(
    op: str, attrs: Attrs, args: list[Tensor | None], layouts: list[tuple[int, Layout]], rank: int
) -> Layout:
    """Output layout of a lookup or a matrix product: the batch must stay on an axis that is
    neither indexed nor summed over, and on one axis of the output only."""
    if len(layouts) > 1 and op not in ("MatMul", "Einsum", "Gemm"):
        raise _MixingError("it combines per-sample values along different axes")
    if op == "Gather":
        (position, layout), axis = layouts[0], _axis(int(attrs.get("axis", 0)), args[0].dim())
        if position == 0:
            if layout.axis == axis:
                raise _MixingError("it picks samples of the batch")
            return Layout(layout.axis if layout.axis < axis else layout.axis + args[1].dim() - 1, layout.inner)
        return Layout(axis + layout.axis, layout.inner)
    if op == "MatMul":
        return _matmul_layout(args, layouts, rank)
    if op == "Gemm":
        found: set[Layout] = set()
        for position, layout in layouts:
            if position == 2:
                found.add(Layout(layout.axis + 2 - args[2].dim(), layout.inner))
                continue
            kept = (1 if attrs.get("transA", 0) else 0) if position == 0 else (0 if attrs.get("transB", 0) else 1)
            if layout.axis != kept:
                raise _MixingError("it sums over the batch axis")
            found.add(Layout(position, layout.inner))
        if len(found) > 1:
            raise _MixingError("its inputs hold the batch on different axes")
        return found.pop()
    if op == "Einsum":
        return _einsum_layout(attrs, args, layouts)
    raise _MixingError("it is not known to keep samples apart")


def _matmul_layout(args: list[Tensor | None], layouts: list[tuple[int, Layout]], rank: int) -> Layout:
    found: set[Layout] = set()
    for position, layout in layouts:
        own = args[position].dim()
        other = args[1 - position].dim()
        contracted = own - 1 if position == 0 else (own - 2 if own > 1 else 0)
        if layout.axis == contracted:
            raise _MixingError("it sums over the batch axis")
        if own == 1 or other == 1:
            axis = layout.axis if position == 0 or own == 1 else layout.axis - (layout.axis == own - 1)
        else:
            axis = layout.axis + rank - own
        if own > 1 and other > 1 and layout.axis >= own - 2 and len(layouts) > 1:
            raise _MixingError("both factors hold the batch, on different axes")
        found.add(Layout(axis, layout.inner))
    if len(found) > 1:
        raise _MixingError("both factors hold the batch, on different axes")
    return found.pop()


def _einsum_layout(attrs: Attrs, args: list[Tensor | None], layouts: list[tuple[int, Layout]]) -> Layout:
    equation = _text(attrs["equation"], "").replace(" ", "")
    inputs, output = equation.split("->")
    labels = inputs.split(",")
    letters = {labels[position][layout.axis] for position, layout in layouts}
    inner = {layout.inner for _, layout in layouts}
    if len(letters) != 1 or len(inner) != 1:
        raise _MixingError("its operands hold the batch on different axes")
    letter = letters.pop()
    holders = {position for position, names in enumerate(labels) if letter in names}
    batched = {position for position, _ in layouts}
    if letter not in output or holders != batched or any(labels[p].count(letter) != 1 for p in holders):
        raise _MixingError("it sums over or repeats the batch axis")
    return Layout(output.index(letter), inner.pop())


def _check_flow(results: Sequence[Tensor | None], flows: Sequence[Flow], batches: Sequence[int]) -> None:
    """Every trial batch gives the same layout and batch-size elements, and shapes that vary
    with the batch size on the batch axis only, in proportion to it."""
    first = flows[0]
    for flow in flows[1:]:
        same_size = (first.size is None) == (flow.size is None) and (
            first.size is None or torch.equal(first.size, flow.size)
        )
        if flow.layout != first.layout or not same_size:
            raise _MixingError("what it carries across samples depends on the batch size")
    if any(result is None for result in results):
        return
    shapes = [list(result.shape) for result in results]
    layout = first.layout
    if layout is not None:
        outers = set()
        for shape, batch in zip(shapes, batches, strict=True):
            if layout.axis >= len(shape) or shape[layout.axis] % (batch * layout.inner):
                raise _MixingError("its batch axis is not a multiple of the batch size")
            outers.add(shape[layout.axis] // (batch * layout.inner))
            shape[layout.axis] = 0
        if len(outers) > 1:
            raise _MixingError("its batch axis grows faster than the batch")
    if any(shape != shapes[0] for shape in shapes[1:]):
        raise _MixingError("its shape depends on the batch size off the batch axis")


def _trial_inputs(graph: onnx.GraphProto, names: Sequence[str], batch: int, free: int) -> list[Tensor]:
    """Zeros of each graph input's declared shape, `batch` samples, `free` for open dimensions."""
    declared = {value.name: value.type.tensor_type for value in graph.input}
    feeds = []
    for name in names:
        kind = declared[name]
        dims = [d.dim_value if d.dim_value > 0 else free for d in kind.shape.dim]
        if not dims:
            raise _MixingError("its input has no declared rank")
        dims[0] = batch
        dtype = torch.int64 if kind.elem_type == INT64 else torch.float32
        feeds.append(torch.zeros(dims, dtype=dtype))
    return feeds


def _check_per_sample(
    nodes: list[Node], graph: onnx.GraphProto, names: Sequence[str], weights: dict[str, Tensor]
) -> dict[str, int]:
    """Refuse a graph whose output for one sample could depend on the other samples of its
    batch or on the batch size (see `Flow`): the audit sees batches, a deployment may
    serve one request at a time.

    Returns the float values that hold exactly one slice per sample, each with the axis
    that indexes the samples: the only values an activation tap can be pooled from (a
    transformer's sequence-first attention values hold the batch on axis 1; shape
    arithmetic and values merging the batch with heads hold no sample on its own)."""
    failure: Exception | None = None
    declared = {value.name: value.type.tensor_type.shape.dim for value in graph.input}
    open_dims = any(d.dim_value <= 0 for name in names for d in list(declared[name])[1:])
    for free in TRIAL_DIMS if open_dims else TRIAL_DIMS[:1]:
        try:
            feeds = [_trial_inputs(graph, names, batch, free) for batch in TRIAL_BATCHES]
        except _MixingError as exc:
            raise UnsupportedOpError(f"graph input {exc}: cannot check that samples are kept apart") from exc
        scopes: list[dict[str, Tensor | None]] = [
            {**weights, **dict(zip(names, run, strict=True)), "": None} for run in feeds
        ]
        flows: list[dict[str, Flow]] = [{**dict.fromkeys(names, Flow(Layout(0, 1))), "": STATIC} for _ in TRIAL_BATCHES]
        try:
            with torch.no_grad():
                _trace(nodes, scopes, flows)
        except (UnsupportedOpError, ModelLoadError):
            raise
        except Exception as exc:  # a trial shape the graph does not take: try the next
            failure = exc
            continue
        return {
            name: flow.layout.axis
            for name, flow in flows[0].items()
            if flow.layout is not None
            and flow.layout.inner == 1
            and isinstance(value := scopes[0].get(name), Tensor)
            and value.is_floating_point()
            and value.shape[flow.layout.axis] == TRIAL_BATCHES[0]
        }
    raise UnsupportedOpError(
        f"the graph did not run on zeros at batch sizes {list(TRIAL_BATCHES)} ({failure}): cannot check that its "
        "output for one sample does not depend on the rest of the batch"
    )


def _trace(nodes: list[Node], scopes: list[dict[str, Tensor | None]], flows: list[dict[str, Flow]]) -> None:
    for op, inputs, outputs, attrs in nodes:
        if op == "Constant":
            for scope, flow in zip(scopes, flows, strict=True):
                scope[outputs[0]] = torch.as_tensor(np.array(attrs.get("value")))
                flow[outputs[0]] = STATIC
            continue
        name = f"{op} node {outputs[0]!r}"
        try:
            if op == "If":
                _trace_if(inputs, outputs, attrs, scopes, flows)
                continue
            found = []
            for scope, flow, batch in zip(scopes, flows, TRIAL_BATCHES, strict=True):
                args = [scope[i] for i in inputs]
                _check_output_size(op, attrs, args)
                result = OPS[op](attrs, args)
                results = result if isinstance(result, tuple) else (result,)
                found.append((results, _flow(op, attrs, args, [flow.get(i, STATIC) for i in inputs], results, batch)))
                scope.update(zip(outputs, results, strict=False))
            for index, output in enumerate(outputs):
                if not output or index >= len(found[0][0]):
                    continue
                each = [run[1][min(index, len(run[1]) - 1)] for run in found]
                _check_flow([run[0][index] for run in found], each, TRIAL_BATCHES)
                for flow, one in zip(flows, each, strict=True):
                    flow[output] = one
        except _MixingError as exc:
            raise UnsupportedOpError(
                f"{name}: {exc}, so a sample's output would depend on the batch it is evaluated in (the audit "
                "evaluates batches, a deployment may run one sample at a time); expected each sample computed alone"
            ) from exc


def _trace_if(
    inputs: list[str],
    outputs: list[str],
    attrs: Attrs,
    scopes: list[dict[str, Tensor | None]],
    flows: list[dict[str, Flow]],
) -> None:
    """An `If` whose condition is the same for every sample and batch size: trace the branch taken."""
    if any(flow.get(inputs[0], STATIC).layout or flow.get(inputs[0], STATIC).size is not None for flow in flows):
        raise _MixingError("its condition depends on the samples or the batch size")
    taken = {bool(scope[inputs[0]]) for scope in scopes}
    branch: Branch = attrs["then_branch" if taken.pop() else "else_branch"]
    inner = [dict(scope) for scope in scopes]
    inner_flows = [dict(flow) for flow in flows]
    _trace(branch.nodes, inner, inner_flows)
    for scope, flow, in_scope, in_flow in zip(scopes, flows, inner, inner_flows, strict=True):
        for output, source in zip(outputs, branch.outputs, strict=False):
            scope[output], flow[output] = in_scope[source], in_flow.get(source, STATIC)


NAN_FROM_INPUT = (
    "the graph computed NaN from its input; expected finite values: torch and ONNX Runtime treat NaN "
    "differently (max pooling, max and min reductions, comparisons, sign), so the translation cannot stand "
    "in for the model on these inputs"
)


def _release_after(nodes: list[Node], keep: str) -> list[tuple[str, ...]]:
    """Per node, the values that no later node reads (all but `keep`): a run drops them once
    the node has run, so that a forward pass holds what is still to be read rather than
    every value it made (a transformer's attention values dominate its memory otherwise)."""
    last: dict[str, int] = {}
    for index, (op, inputs, outputs, attrs) in enumerate(nodes):
        for name in (*outputs, *inputs, *(_captured_by_if(attrs) if op == "If" else ())):
            last[name] = index
    release: list[list[str]] = [[] for _ in nodes]
    for name, index in last.items():
        if name and name != keep:
            release[index].append(name)
    return [tuple(names) for names in release]


class OnnxModule(nn.Module):
    """Runs an ONNX graph with torch ops; `forward_tapped` also returns chosen activations.

    An `If` runs the branch its condition picks, as ONNX Runtime does, so gradients flow
    through the branch taken (exporters write one where a shape decides the computation,
    e.g. the TorchScript exporter's local response norm).

    A run in which a value computed from the input holds a NaN raises `ParityError`: the
    two runtimes' ops agree on finite values (`tests/test_onnx_semantics.py`) but not on
    NaN, so a graph could otherwise hide a branch behind one.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        _check_domains(model)
        types = _element_types(model)
        graph = model.graph
        self.params = nn.ParameterDict()
        self._keys: dict[str, str] = {}
        self.output_name = graph.output[0].name
        self.nodes = _needed(self._translate(graph), self.output_name)
        unsupported = sorted(_op_types(self.nodes) - set(OPS) - STRUCTURAL_OPS)
        if unsupported:
            raise UnsupportedOpError(
                f"ONNX ops not supported by crossaudit's torch translation: {', '.join(unsupported)}"
            )
        initializer_names = {init.name for init in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializer_names]
        if not 1 <= len(self.input_names) <= MAX_INPUTS:
            raise ModelLoadError(f"expected 1 to {MAX_INPUTS} graph inputs, found {len(self.input_names)}")
        from_input = set(self.input_names)
        _check_types(self.nodes, types, from_input)
        self._from_input = frozenset(from_input)
        weights = {name: self.params[key].detach() for name, key in self._keys.items()}
        sample_axes = _check_per_sample(self.nodes, graph, self.input_names, weights)
        self.taps = [
            outputs[0]
            for op, _, outputs, _ in self.nodes
            if op in TAP_OPS and outputs[0] != self.output_name and outputs[0] in sample_axes
        ]
        # Taps are handed out batch first, whatever axis the graph keeps its samples on.
        self._tap_axes = {name: sample_axes[name] for name in self.taps if sample_axes[name] != 0}
        self.tap_ops = {outputs[0]: op for op, _, outputs, _ in self.nodes if outputs and outputs[0] in self.taps}
        self._first_only = self._first_input_only() if len(self.input_names) > 1 else set()
        self._prefix, self._tail, self._frontier = self._split_at_tail()
        self._release = _release_after(self.nodes, self.output_name)

    def _split_at_tail(self) -> tuple[list[Node], list[Node], list[str]]:
        """The graph as the nodes before its per-position tail (`_per_position_tail`), the
        tail, and the values the tail reads from before it (the frontier)."""
        constants = {
            outputs[0]: np.shape(attrs.get("value")) for op, _, outputs, attrs in self.nodes if op == "Constant"
        }

        def fixed(name: str) -> tuple[int, ...] | None:
            if name in self._keys:
                return tuple(self.params[self._keys[name]].shape)
            return constants.get(name)

        tail = set(_per_position_tail(self.nodes, self.output_name, fixed)) if len(self.input_names) == 1 else set()
        made = {out for i in tail for out in self.nodes[i][2]}
        read = {name for i in tail for name in self.nodes[i][1]}
        frontier = sorted(name for name in read if name not in made and fixed(name) is None)
        nodes = list(enumerate(self.nodes))
        return [n for i, n in nodes if i not in tail], [n for i, n in nodes if i in tail], frontier

    @property
    def splits_at_tail(self) -> bool:
        """Whether `forward_last` computes less than `forward`."""
        return bool(self._tail)

    def _translate(self, graph: onnx.GraphProto) -> list[Node]:
        """A graph's nodes, its initializers registered as parameters (float ones trainable)
        and its `If` branches translated the same way."""
        for init in graph.initializer:
            key = f"t{len(self._keys)}"
            self._keys[init.name] = key
            tensor = torch.from_numpy(np.array(numpy_helper.to_array(init), copy=True))
            self.params[key] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        nodes: list[Node] = []
        for node in graph.node:
            attrs = _attributes(node)
            if node.op_type == "If":
                for key in ("then_branch", "else_branch"):
                    branch = attrs[key]
                    attrs[key] = Branch(self._translate(branch), [o.name for o in branch.output])
            inputs = [] if node.op_type == "Constant" else list(node.input)
            nodes.append((node.op_type, inputs, list(node.output), attrs))
        return nodes

    def _first_input_only(self) -> set[str]:
        """Values computed from the first graph input alone (with weights and constants):
        for a captioner, everything its image encoder computes before meeting the tokens."""
        origins: dict[str, frozenset[int]] = {name: frozenset({i}) for i, name in enumerate(self.input_names)}
        for op, inputs, outputs, attrs in self.nodes:
            read = [*inputs, *(_captured_by_if(attrs) if op == "If" else ())]
            found = frozenset().union(*(origins.get(name, frozenset()) for name in read))
            origins.update(dict.fromkeys(outputs, found))
        return {name for name, found in origins.items() if found == {0}}

    def _run(
        self,
        feeds: tuple[Tensor, ...],
        want: frozenset[str],
        broadcast: int = 1,
        last_only: bool = False,
        exact: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if len(feeds) != len(self.input_names):
            raise ModelLoadError(f"the graph takes inputs {self.input_names}, given {len(feeds)}")
        env: dict[str, Tensor | None] = {**dict(zip(self.input_names, feeds, strict=True)), "": None}
        for name, key in self._keys.items():
            env[name] = self.params[key]
        first_only = self._first_only if broadcast > 1 else set()
        repeated: dict[str, Tensor] = {}

        def grown(name: str, value: Tensor | None) -> Tensor | None:
            """A first-input activation repeated row by row where it meets the other inputs;
            shape and index tensors (integers) pass unchanged."""
            if value is None or name not in first_only or not value.is_floating_point() or value.dim() == 0:
                return value
            if name not in repeated:
                repeated[name] = value.repeat_interleave(broadcast, 0)
            return repeated[name]

        tapped: dict[str, Tensor] = {}
        device = feeds[0].device
        sums: list[Tensor] = []

        def watch(names: Sequence[str], values: Sequence[Tensor | None]) -> None:
            """Sum each float value computed from the input: one reduction per value, where
            an exact NaN test per value cost a tenth of an audit, and no value is held for
            later. A NaN makes its sum NaN, and so do both infinities or an overflow of both
            signs; a run with a NaN sum is repeated `exact`ly, testing every value."""
            for name, value in zip(names, values, strict=False):
                if name in self._from_input and value is not None and value.is_floating_point():
                    detached = value.detach()
                    if exact and bool(torch.isnan(detached).any()):
                        raise ParityError(NAN_FROM_INPUT)
                    sums.append(detached.sum())

        watch(self.input_names, feeds)

        def execute(
            nodes: list[Node], scope: dict[str, Tensor | None], release: Sequence[tuple[str, ...]] = ()
        ) -> None:
            for index, (op, inputs, outputs, attrs) in enumerate(nodes):
                if op == "Constant":
                    scope[outputs[0]] = torch.as_tensor(np.array(attrs.get("value")), device=device)
                    continue
                args = [scope[i] for i in inputs]
                if first_only and outputs[0] not in first_only:
                    args = [grown(name, value) for name, value in zip(inputs, args, strict=True)]
                if op == "If":
                    branch: Branch = attrs["then_branch" if bool(args[0]) else "else_branch"]
                    inner = dict(scope)
                    execute(branch.nodes, inner)
                    results = tuple(inner[name] for name in branch.outputs)
                else:
                    _check_output_size(op, attrs, args)
                    result = OPS[op](attrs, args)
                    results = result if isinstance(result, tuple) else (result,)
                scope.update(zip(outputs, results, strict=False))
                watch(outputs, results)
                if outputs[0] in want:
                    tapped[outputs[0]] = results[0].movedim(self._tap_axes.get(outputs[0], 0), 0)
                for name in release[index] if release else ():
                    scope.pop(name, None)

        if last_only:
            execute(self._prefix, env)
            for name in self._frontier:
                value = env[name]
                if value is None or value.dim() < 3:
                    raise ValueError(f"{name} is not N x T x features: no position to keep")
                env[name] = value[:, -1:]
            execute(self._tail, env)
        else:
            execute(self.nodes, env, self._release)
        if not exact and sums and bool(torch.stack(sums).isnan().any()):
            return self._run(feeds, want, broadcast, last_only, exact=True)
        return env[self.output_name], tapped

    def forward(self, *inputs: Tensor) -> Tensor:
        return self._run(inputs, frozenset())[0]

    def forward_last(self, x: Tensor) -> Tensor:
        """The output at the last position of a sequence model (N x T in, N x V out),
        computing the graph's per-position tail for that position only.

        Why: a language model's vocabulary head and last MLP are most of its work, and a
        search for the next word needs them at one position of every sequence. The split is
        found from op types and weight shapes alone, so use it only where it was checked
        to give `forward(x)[:, -1]` (`paradigms.autoregressive.LanguageModel`).
        """
        return self._run((x,), frozenset(), last_only=True)[0][:, -1]

    def forward_tapped(
        self, x: Tensor | tuple[Tensor, ...], taps: Sequence[str], broadcast: int = 1
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Output and activations at `taps`; `x` is the input, or a tuple in graph-input
        order for a graph of several inputs (a captioner's image and tokens).

        With `broadcast` k, the first input holds one row per k rows of the others: what
        is computed from it alone runs once per row and is repeated where it meets the
        others (a captioner's image encoder runs once per image, not once per caption).
        Activations from the first input alone are returned unrepeated.
        """
        return self._run(x if isinstance(x, tuple) else (x,), frozenset(taps), broadcast)
