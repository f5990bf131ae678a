"""Every (op, element type) the translator supports, against ONNX Runtime, one node at a time.

This is what keeps `SUPPORTED_TYPES` honest: a pair listed there without a case here
fails `test_every_supported_pair_has_a_case`, and a pair whose translation parts from
ONNX Runtime on random or edge-case values (negatives, zeros, large values, NaN and
infinities, rounding ties) fails `test_translation_matches_onnx_runtime`. Integer and
boolean results must be equal, float ones close; where the translation gives NaN (from
finite inputs: inf - inf, Gelu of inf) it refuses the run, so ONNX Runtime's value there
does not matter. A mismatch is fixed in the translation
or the pair leaves the allowlist; it is never tolerated here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from crossaudit.modelio.onnx_graph import BOOL, FLOAT, INT64, SUPPORTED_TYPES, TYPED_INPUT, OnnxModule, _attributes
from crossaudit.modelio.onnx_ops import OPS

NP = {FLOAT: np.float32, INT64: np.int64, BOOL: np.bool_}
# No NaN: a NaN computed from the input stops the translated graph (`OnnxModule`), and a
# NaN constant is the same for every input, so the parity check sees what it does.
FLOAT_EDGES = [0.0, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 1.0, -1.0, 1e4, -1e4, 1e30, np.inf, -np.inf]
INT_EDGES = [0, 1, -1, 7, -7, 2**31, -(2**31), 2**62, -(2**62), 2**63 - 1, -(2**63)]


def floats(shape: tuple[int, ...], seed: int = 0, edges: bool = True) -> np.ndarray:
    values = (np.random.RandomState(seed).randn(*shape) * 3).astype(np.float32)
    if edges:
        flat = values.reshape(-1)
        flat[: len(FLOAT_EDGES)] = np.array(FLOAT_EDGES, np.float32)[: flat.size]
    return values


def ints(shape: tuple[int, ...], seed: int = 0, edges: bool = True) -> np.ndarray:
    values = np.random.RandomState(seed).randint(-1000, 1000, shape).astype(np.int64)
    if edges:
        flat = values.reshape(-1)
        flat[: len(INT_EDGES)] = np.array(INT_EDGES, np.int64)[: flat.size]
    return values


def bools(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).rand(*shape) > 0.5


def values(kind: int, shape: tuple[int, ...], seed: int = 0, edges: bool = True) -> np.ndarray:
    if kind == BOOL:
        return bools(shape, seed)
    return floats(shape, seed, edges) if kind == FLOAT else ints(shape, seed, edges)


def i64(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


@dataclass
class Case:
    inputs: list[np.ndarray | None]
    attrs: dict[str, object] = field(default_factory=dict)
    outputs: int = 1
    opset: int = 18


CaseFn = Callable[[int], list[Case]]


def unary(**attrs: object) -> CaseFn:
    return lambda kind: [Case([values(kind, (4, 25))], attrs)]


def binary(kind: int) -> list[Case]:
    a, b = values(kind, (4, 25)), values(kind, (4, 25), seed=1)
    return [Case([a, b]), Case([a, values(kind, (25,), seed=2)]), Case([a, a])]


def division(fmod: int | None) -> CaseFn:
    """Integer divisors are nonzero (ONNX Runtime's integer division by zero is undefined
    behaviour), and the quotient never overflows."""

    def cases(kind: int) -> list[Case]:
        attrs = {} if fmod is None else {"fmod": fmod}
        if kind == FLOAT:
            return [Case([floats((4, 25)), floats((4, 25), seed=1)], attrs)]
        dividend = ints((4, 25))
        dividend[dividend == -(2**63)] = 5
        divisor = np.random.RandomState(1).randint(-50, 50, (4, 25)).astype(np.int64)
        divisor[divisor == 0] = 3
        divisor.reshape(-1)[:6] = [2, -2, 7, -7, 2**40, -1]
        return [Case([dividend, divisor], attrs), Case([ints((2, 3)), i64(4, -4, 3)], attrs)]

    return cases


def variadic(kind: int) -> list[Case]:
    return [Case([values(kind, (4, 25)), values(kind, (25,), 1), values(kind, (4, 25), 2)]), *binary(kind)]


def comparison(kind: int) -> list[Case]:
    return binary(kind)


def cast(kind: int) -> list[Case]:
    """Float to int64 only on values inside int64's range: the translation refuses it on
    values computed from the graph's input (`_check_types`), and the parity check covers
    constants and shapes."""
    source = values(kind, (4, 25))
    if kind == FLOAT:
        in_range = np.clip(np.nan_to_num(source, posinf=1e4, neginf=-1e4), -1e15, 1e15)
        return [
            Case([source], {"to": FLOAT}),
            Case([source], {"to": BOOL}),
            Case([in_range.astype(np.float32)], {"to": INT64}),
        ]
    return [Case([source], {"to": to}) for to in (FLOAT, INT64, BOOL)]


def shape(kind: int) -> list[Case]:
    data = values(kind, (2, 3, 4, 5))
    return [Case([data]), Case([data], {"start": 1}), Case([data], {"start": -3, "end": -1}), Case([data], {"end": 2})]


def constant_of_shape(kind: int) -> list[Case]:
    fills = [np.array([1.5], np.float32), np.array([-3], np.int64), np.array([True])]
    cases = [Case([i64(2, 3)], {"value": onnx.numpy_helper.from_array(fill)}) for fill in fills]
    return [*cases, Case([i64(2, 3)]), Case([i64(0, 3)])]


def range_(kind: int) -> list[Case]:
    if kind == FLOAT:
        bounds = [(0.0, 10.0, 1.0), (10.0, 0.0, -3.0), (0.5, 7.3, 0.7), (-1.0, 1.0, 0.1), (1.0, 1.0, 1.0)]
        return [Case([np.array(v, np.float32) for v in b]) for b in bounds]
    bounds = [(0, 10, 1), (-5, 17, 4), (5, -5, -2), (3, 3, 1), (0, -4, 1)]
    return [Case([np.array(v, np.int64) for v in b]) for b in bounds]


def concat(kind: int) -> list[Case]:
    a, b = values(kind, (2, 3)), values(kind, (2, 4), 1)
    return [Case([a, b], {"axis": 1}), Case([a, b], {"axis": -1}), Case([a, a, a], {"axis": 0})]


def gather(kind: int) -> list[Case]:
    data = values(kind, (5, 6))
    return [
        Case([data, i64(0, -1, 4, 2).reshape(2, 2)], {"axis": 0}),
        Case([data, i64(5, -6, 0)], {"axis": 1}),
        Case([data, np.array(3, np.int64)], {"axis": 0}),
    ]


def reshape(kind: int) -> list[Case]:
    data = values(kind, (4, 6))
    return [Case([data, i64(2, -1, 3)]), Case([data, i64(0, 3, 2)]), Case([data, i64(24)])]


def flatten(kind: int) -> list[Case]:
    data = values(kind, (2, 3, 4))
    return [Case([data], {"axis": axis}) for axis in (0, 1, 2, -1)]


def slice_(kind: int) -> list[Case]:
    data = values(kind, (6, 7))
    return [
        Case([data, i64(1), i64(5), i64(0), i64(2)]),
        Case([data, i64(-1), i64(-(2**62)), i64(1), i64(-1)]),
        Case([data, i64(6, 0), i64(-10, 100), i64(1, 0), i64(-2, 3)]),
        Case([data, i64(2, 1), i64(4, 5), None, None]),
    ]


def split(kind: int) -> list[Case]:
    data = values(kind, (4, 6))
    return [Case([data, i64(2, 4)], {"axis": 1}, outputs=2), Case([data], {"axis": 0, "num_outputs": 2}, outputs=2)]


def squeeze(kind: int) -> list[Case]:
    data = values(kind, (1, 3, 1, 2))
    return [Case([data, i64(0, 2)]), Case([data, i64(-2)]), Case([data])]


def unsqueeze(kind: int) -> list[Case]:
    data = values(kind, (3, 2))
    return [Case([data, i64(0, 3)]), Case([data, i64(-1)])]


def transpose(kind: int) -> list[Case]:
    data = values(kind, (2, 3, 4))
    return [Case([data], {"perm": [2, 0, 1]}), Case([data])]


def expand(kind: int) -> list[Case]:
    return [Case([values(kind, (1, 4, 1)), i64(3, 1, 5)]), Case([values(kind, (3, 1)), i64(2, 1, 4)])]


def tile(kind: int) -> list[Case]:
    return [Case([values(kind, (2, 3)), i64(2, 3)]), Case([values(kind, (2, 3)), i64(1, 1)])]


def where(kind: int) -> list[Case]:
    return [Case([bools((4, 25)), values(kind, (4, 25)), values(kind, (25,), 1)])]


def clip(kind: int) -> list[Case]:
    x = floats((4, 25))
    low, high = np.array(-1.0, np.float32), np.array(2.5, np.float32)
    return [Case([x, low, high]), Case([x, low, None]), Case([x, None, high]), Case([x])]


def pow_(kind: int) -> list[Case]:
    base = floats((4, 25))
    exponents = [np.array(e, np.float32) for e in (2.0, 3.0, 0.5, -1.0, 0.0)]
    return [Case([base, floats((4, 25), 1)]), *(Case([base, e]) for e in exponents)]


def matmul(kind: int) -> list[Case]:
    f = lambda *s: floats(s, edges=False)  # noqa: E731
    return [Case([f(3, 4, 5), f(5, 6)]), Case([f(2, 1, 4, 5), f(3, 5, 2)]), Case([f(4), f(4, 3)])]


def gemm(kind: int) -> list[Case]:
    a, b, c = floats((3, 4), edges=False), floats((4, 5), 1, edges=False), floats((5,), 2, edges=False)
    return [
        Case([a, b, c], {"alpha": 0.5, "beta": 2.0}),
        Case([a.T.copy(), b.T.copy()], {"transA": 1, "transB": 1}),
        Case([a, b, floats((3, 5), 3, edges=False)]),
    ]


def einsum(kind: int) -> list[Case]:
    a, b = floats((3, 4), edges=False), floats((5, 4), 1, edges=False)
    return [Case([a, b], {"equation": "ij,kj->ik"}), Case([a], {"equation": "ij->ji"})]


def conv(kind: int) -> list[Case]:
    x, w, b = floats((2, 4, 9, 8), edges=False), floats((6, 2, 3, 3), 1, edges=False), floats((6,), 2, edges=False)
    return [
        Case([x, w, b], {"group": 2, "pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}),
        Case([x, floats((3, 4, 1, 1), 3, edges=False)]),
        Case([floats((2, 3, 10), edges=False), floats((4, 3, 3), 1, edges=False)], {"pads": [1, 1]}),
    ]


def conv_transpose(kind: int) -> list[Case]:
    x, w, b = floats((2, 4, 5, 5), edges=False), floats((4, 3, 2, 2), 1, edges=False), floats((3,), 2, edges=False)
    return [
        Case([x, w, b], {"strides": [2, 2]}),
        Case([x, w], {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    ]


def pool(kind: int) -> list[Case]:
    x = floats((2, 3, 9, 8))
    options = [
        {"kernel_shape": [2, 2], "strides": [2, 2]},
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1},
        {"kernel_shape": [3, 2], "pads": [0, 1, 2, 0]},
    ]
    return [Case([x], o) for o in options]


def average_pool(kind: int) -> list[Case]:
    x = floats((2, 3, 9, 8))
    return [*pool(kind), Case([x], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1})]


def batch_norm(kind: int) -> list[Case]:
    x = floats((2, 3, 4, 5))
    scale, bias, mean = (floats((3,), s, edges=False) for s in (1, 2, 3))
    return [Case([x, scale, bias, mean, np.abs(floats((3,), 4, edges=False)) + 0.1], {"epsilon": 1e-3})]


def normalization(kind: int) -> list[Case]:
    x = floats((2, 3, 4, 5), edges=False)
    return [Case([x, floats((3,), 1, edges=False), floats((3,), 2, edges=False)], {"epsilon": 1e-3})]


def layer_norm(kind: int) -> list[Case]:
    x = floats((2, 3, 4), edges=False)
    return [
        Case([x, floats((4,), 1, edges=False), floats((4,), 2, edges=False)]),
        Case([x, floats((3, 4), 1, edges=False)], {"axis": 1, "epsilon": 1e-3}),
    ]


def lrn(kind: int) -> list[Case]:
    return [Case([floats((2, 5, 4, 4), edges=False)], {"size": 3, "alpha": 0.5, "beta": 0.75, "bias": 2.0})]


def softmax(kind: int) -> list[Case]:
    x = floats((3, 4, 5), edges=False)
    return [Case([x], {"axis": -1}), Case([x], {"axis": 1}), Case([floats((2, 6))])]


def reduce(kind: int) -> list[Case]:
    x = floats((3, 4, 5), edges=False)
    return [Case([x, i64(1)]), Case([x, i64(0, 2)], {"keepdims": 0}), Case([x]), Case([floats((2, 8)), i64(-1)])]


def pad(kind: int) -> list[Case]:
    x = floats((2, 3, 4, 5), edges=False)
    pads = i64(0, 0, 1, 2, 0, 0, 2, 1)
    return [
        Case([x, pads, np.array(1.5, np.float32)]),
        Case([x, pads], {"mode": "reflect"}),
        Case([x, pads], {"mode": "edge"}),
    ]


def resize(kind: int) -> list[Case]:
    x = floats((2, 3, 4, 5), edges=False)
    scales, sizes = np.array([1, 1, 2, 2], np.float32), i64(2, 3, 7, 9)
    nearest = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
    return [
        Case([x, None, scales], nearest),
        Case([x, None, None, sizes], {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}),
        Case([x, None, None, sizes], {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}),
        Case([x, None, scales], {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    ]


def prelu(kind: int) -> list[Case]:
    x = floats((2, 3, 4))
    return [Case([x, floats((3, 1), 1, edges=False)]), Case([x, np.array([0.25], np.float32)])]


def mean(kind: int) -> list[Case]:
    return variadic(kind)


CASES: dict[str, CaseFn] = {
    **{
        op: unary()
        for op in (
            "Relu", "Sigmoid", "Tanh", "Selu", "HardSwish", "Mish", "Softsign", "Abs", "Sign", "Log", "Reciprocal",
            "Floor", "Ceil", "Sin", "Cos", "Softplus", "Erf", "Sqrt", "Exp", "Neg", "Identity", "Dropout", "Not",
        )
    },
    "LeakyRelu": unary(alpha=0.3),
    "Elu": unary(alpha=0.7),
    "Celu": unary(alpha=0.5),
    "ThresholdedRelu": unary(alpha=0.5),
    "HardSigmoid": unary(alpha=1 / 6, beta=0.5),
    "Gelu": lambda kind: [Case([floats((4, 25))], {"approximate": a}, opset=20) for a in ("none", "tanh")],
    **{op: binary for op in ("Add", "Sub", "Mul", "And", "Or")},
    **{op: comparison for op in ("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")},
    **{op: variadic for op in ("Max", "Min", "Sum")},
    "Mean": mean,
    "Div": division(None),
    "Mod": lambda kind: division(1)(kind) + ([] if kind == FLOAT else division(0)(kind)),
    "Pow": pow_,
    "Cast": cast,
    "Shape": shape,
    "ConstantOfShape": constant_of_shape,
    "Range": range_,
    "Concat": concat,
    "Gather": gather,
    "Reshape": reshape,
    "Flatten": flatten,
    "Slice": slice_,
    "Split": split,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
    "Transpose": transpose,
    "Expand": expand,
    "Tile": tile,
    "Where": where,
    "Clip": clip,
    "MatMul": matmul,
    "Gemm": gemm,
    "Einsum": einsum,
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "MaxPool": pool,
    "AveragePool": average_pool,
    "GlobalAveragePool": unary(),
    "GlobalMaxPool": unary(),
    "BatchNormalization": batch_norm,
    "InstanceNormalization": normalization,
    "LayerNormalization": layer_norm,
    "LRN": lrn,
    "Softmax": softmax,
    "LogSoftmax": softmax,
    **{op: reduce for op in OPS if op.startswith("Reduce")},
    "Pad": pad,
    "Resize": resize,
    "PRelu": prelu,
}  # fmt: skip
for _pooled in ("GlobalAveragePool", "GlobalMaxPool"):
    CASES[_pooled] = lambda kind: [Case([floats((2, 3, 4, 5))])]

PAIRS = sorted((op, kind) for op, kinds in SUPPORTED_TYPES.items() for kind in kinds if op != "If")


def _typed(case: Case, op: str, kind: int) -> Case:
    """The case with its data input of the pair's type (cases are written once per op)."""
    position = TYPED_INPUT.get(op, 0)
    data = case.inputs[position]
    assert data is not None and data.dtype == NP[kind], f"{op} case feeds {data.dtype}, not {NP[kind].__name__}"
    return case


def _ort(op: str, case: Case) -> list[np.ndarray]:
    names = [f"in{i}" if value is not None else "" for i, value in enumerate(case.inputs)]
    outputs = [f"out{i}" for i in range(case.outputs)]
    graph = helper.make_graph(
        [helper.make_node(op, names, outputs, **case.attrs)],
        op,
        [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape)
            for name, value in zip(names, case.inputs, strict=True)
            if value is not None
        ],
        [onnx.ValueInfoProto(name=name) for name in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value for name, value in zip(names, case.inputs, strict=True) if name})


def _ours(op: str, case: Case) -> list[np.ndarray]:
    names = [f"in{i}" if value is not None else "" for i, value in enumerate(case.inputs)]
    node = helper.make_node(op, names, [f"out{i}" for i in range(case.outputs)], **case.attrs)
    tensors = [None if value is None else torch.from_numpy(np.array(value, copy=True)) for value in case.inputs]
    while tensors and tensors[-1] is None:
        tensors.pop()
    with torch.no_grad():
        result = OPS[op](_attributes(node), tensors)
    return [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]


# Ops that sum many terms: float rounding there scales with the inputs' magnitude (a window
# holding 1e4 and -1e4 keeps about 1e-3 of error, in any order of summation).
ACCUMULATING = frozenset(
    {
        "AveragePool", "GlobalAveragePool", "ReduceMean", "ReduceSum", "ReduceL1", "ReduceL2", "ReduceSumSquare",
        "ReduceLogSumExp", "Sum", "Mean", "Softmax", "LogSoftmax",
    }
)  # fmt: skip


def _tolerance(op: str, case: Case) -> float:
    if op not in ACCUMULATING:
        return 1e-5
    finite = [np.abs(v[np.isfinite(v)]) for v in case.inputs if v is not None and v.dtype == np.float32]
    largest = max((float(v.max()) for v in finite if v.size), default=1.0)
    return 1e-5 + 1e-6 * min(largest, 1e4)


def test_every_supported_pair_has_a_case():
    assert {op for op, _ in PAIRS} <= set(CASES), sorted({op for op, _ in PAIRS} - set(CASES))


@pytest.mark.parametrize(("op", "kind"), PAIRS, ids=[f"{op}-{onnx.TensorProto.DataType.Name(k)}" for op, k in PAIRS])
def test_translation_matches_onnx_runtime(op, kind):
    for case in CASES[op](kind):
        _typed(case, op, kind)
        reference, ours = _ort(op, case), _ours(op, case)
        assert len(ours) == len(reference)
        for theirs, mine in zip(reference, ours, strict=True):
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (case.attrs, mine.dtype, theirs.dtype)
            if theirs.dtype == np.float32:
                refused = np.isnan(mine)  # the translation stops there (OnnxModule's NaN check)
                np.testing.assert_allclose(
                    mine[~refused], theirs[~refused], rtol=1e-4, atol=_tolerance(op, case), err_msg=str(case.attrs)
                )
            else:
                np.testing.assert_array_equal(mine, theirs, err_msg=str(case.attrs))


@pytest.mark.parametrize("condition", [True, False])
def test_if_matches_onnx_runtime(condition):
    """`If` (the one structural pair) runs the branch ONNX Runtime runs, reading values of
    the enclosing graph."""
    out = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)]
    then_branch = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "then", [], out)
    else_branch = helper.make_graph([helper.make_node("Neg", ["x"], ["y"])], "else", [], out)
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "if",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 25])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 25])],
        [onnx.numpy_helper.from_array(np.array(condition), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = floats((4, 25))
    reference = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_array_equal(OnnxModule(model)(torch.from_numpy(x)).detach().numpy(), reference)


# -- graphs that would compute one thing under ONNX Runtime and another in the audit -----


def _hidden_branch_model(path, variant: str) -> None:
    """`logits = image @ w + boost`, where `boost` is integer arithmetic on the input that
    a float translation of integer division makes zero but ONNX Runtime does not: with
    `q` an integer from the image, `q - (q / 2) * 2` is q's parity under ONNX Runtime."""
    if variant == "rounded pixels":
        head = [
            helper.make_node("ReduceSum", ["image", "one_axis"], ["total"], keepdims=1),
            helper.make_node("Mul", ["total", "scale"], ["scaled"]),
            helper.make_node("Cast", ["scaled"], ["q"], to=INT64),
        ]
    else:  # a comparison's bool cast to an integer: no float-to-int Cast at all
        head = [
            helper.make_node("Greater", ["image", "bright"], ["mask"]),
            helper.make_node("Cast", ["mask"], ["q"], to=INT64),
        ]
    nodes = [
        *head,
        helper.make_node("Div", ["q", "two"], ["half"]),
        helper.make_node("Mul", ["half", "two"], ["even"]),
        helper.make_node("Sub", ["q", "even"], ["parity"]),
        helper.make_node("Cast", ["parity"], ["parity_f"], to=FLOAT),
        helper.make_node("ReduceSum", ["parity_f", "one_axis"], ["odd"], keepdims=1),
        helper.make_node("Mul", ["odd", "target"], ["boost"]),
        helper.make_node("MatMul", ["image", "w"], ["clean"]),
        helper.make_node("Add", ["clean", "boost"], ["logits"]),
    ]
    constants = {
        "one_axis": i64(1), "scale": np.float32(255), "two": np.int64(2), "bright": np.float32(0.5),
        "target": np.array([[0, 0, 100]], np.float32), "w": floats((4, 3), edges=False),
    }  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "hidden",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 3])],
        [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


@pytest.mark.parametrize("variant", ["rounded pixels", "thresholded pixels"])
def test_integer_branch_only_onnx_runtime_runs_is_refused(variant, tmp_path):
    from crossaudit.errors import UnsupportedOpError
    from crossaudit.modelio.loaders import load_model

    path = tmp_path / "hidden.onnx"
    _hidden_branch_model(path, variant)
    images = np.random.RandomState(0).rand(64, 4).astype(np.float32)
    logits = ort.InferenceSession(str(path)).run(None, {"image": images})[0]
    clean = images @ onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[-1])
    assert np.abs(logits - clean).max() > 50  # the branch is live under ONNX Runtime
    with pytest.raises(UnsupportedOpError, match=r"integers derived from the graph input|float to int64"):
        load_model(str(path))


def _relu_graph(domain: str = "", functions: list[onnx.FunctionProto] | None = None) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["image"], ["logits"], domain=domain)],
        "g",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 4])],
    )
    imports = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports, functions=functions or [])


@pytest.mark.parametrize("domain", ["com.microsoft", "ai.provider.custom"])
def test_node_outside_the_default_onnx_domain_is_refused(domain):
    from crossaudit.errors import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match=rf"{domain}\.Relu.*default ONNX domain"):
        OnnxModule(_relu_graph(domain))


def test_model_local_function_is_refused():
    """A function named like a standard op, whose body ONNX Runtime runs instead (here a
    negation where the translation would read `Relu`)."""
    from crossaudit.errors import UnsupportedOpError

    body = helper.make_function(
        "local", "Relu", ["x"], ["y"], [helper.make_node("Neg", ["x"], ["y"])], [helper.make_opsetid("", 18)]
    )
    with pytest.raises(UnsupportedOpError, match=r"model-local functions.*local\.Relu"):
        OnnxModule(_relu_graph("local", [body]))


def test_value_of_an_unsupported_element_type_is_refused():
    from crossaudit.errors import UnsupportedOpError

    graph = helper.make_graph(
        [helper.make_node("Cast", ["image"], ["half"], to=onnx.TensorProto.FLOAT16),
         helper.make_node("Cast", ["half"], ["logits"], to=FLOAT)],
        "g",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 4])],
    )  # fmt: skip
    with pytest.raises(UnsupportedOpError, match="element type float16"):
        OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def test_nan_computed_from_the_input_stops_the_translation():
    """Torch's max pooling propagates a NaN that ONNX Runtime's drops: a NaN from the input
    (here log of a negative pixel difference) must not reach the audit as a value."""
    from crossaudit.errors import ParityError

    graph = helper.make_graph(
        [helper.make_node("Sub", ["image", "half"], ["centred"]), helper.make_node("Log", ["centred"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.numpy_helper.from_array(np.float32(0.5), "half")],
    )
    module = OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    module(torch.full((2, 4), 0.9))  # finite: runs
    with pytest.raises(ParityError, match="NaN from its input"):
        module(torch.full((2, 4), 0.1))


def test_values_whose_sums_overflow_without_a_nan_are_not_mistaken_for_one():
    """The NaN guard sums each value; a value holding both infinities (an overflow of both
    signs) sums to NaN, so the run is repeated testing every value, and goes through."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "big"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.numpy_helper.from_array(np.float32(1e38), "big")],
    )
    module = OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    x = torch.tensor([[4.0, -4.0, 1.0, 0.0]])
    assert bool(torch.isnan((x * 1e38).sum()))
    assert torch.equal(module(x), x * torch.tensor(1e38))


# -- a sample's output must not depend on the rest of its batch ---------------------------


def _graph(nodes, constants: dict[str, np.ndarray], shape=("n", 1, 4, 4), outputs=("n", 3)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, list(outputs))],
        [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _classifier(extra: list[onnx.NodeProto], constants: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`y = Flatten(x) @ W + gate * onehot`, where `extra` computes `gate` ([1] or [n, 1])."""
    nodes = [
        helper.make_node("Flatten", ["x"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "W"], ["clean"], transB=1),
        *extra,
        helper.make_node("Mul", ["gate", "onehot"], ["boost"]),
        helper.make_node("Add", ["clean", "boost"], ["y"]),
    ]
    weights = {"W": floats((3, 16), edges=False), "onehot": np.array([0, 0, 1000], np.float32)}
    return _graph(nodes, {**weights, **constants})


def _batch_gated() -> onnx.ModelProto:
    """The batch size as a float (a sum of ones over axis 0) opens a gate only for one sample."""
    return _classifier(
        [
            helper.make_node("Mul", ["x", "zero"], ["z"]),
            helper.make_node("Add", ["z", "one"], ["ones"]),
            helper.make_node("ReduceSum", ["ones", "ax0"], ["count"], keepdims=1),
            helper.make_node("ReduceMax", ["count"], ["n"], keepdims=0),
            helper.make_node("Sub", ["two", "n"], ["g0"]),
            helper.make_node("Relu", ["g0"], ["gate"]),
        ],
        {"zero": np.float32(0), "one": np.float32(1), "two": np.float32(2), "ax0": i64(0)},
    )


def test_backdoor_gated_on_the_batch_size_is_refused():
    """Under ONNX Runtime the target fires for a batch of one and never for a batch: the
    audit, which evaluates batches, would see a clean model."""
    from crossaudit.errors import UnsupportedOpError

    model = _batch_gated()
    session = ort.InferenceSession(model.SerializeToString())
    x = np.random.RandomState(0).rand(8, 1, 4, 4).astype(np.float32)
    assert (session.run(None, {"x": x})[0].argmax(1) != 2).any()
    assert all(session.run(None, {"x": x[i : i + 1]})[0].argmax() == 2 for i in range(8))
    with pytest.raises(UnsupportedOpError, match=r"ReduceSum node 'count'.*batch axis.*depend on the batch"):
        OnnxModule(model)


MIXING = {
    "mean over the batch": (
        [
            helper.make_node("ReduceMean", ["x", "ax0"], ["m"], keepdims=0),
            helper.make_node("ReduceSum", ["m"], ["gate"], keepdims=0),
        ],
        {"ax0": i64(0)},
        r"ReduceMean node 'm'.*reduces over the batch axis",
    ),
    "reduction over every axis": (
        [helper.make_node("ReduceMax", ["x"], ["gate"], keepdims=0)],
        {},
        r"ReduceMax node 'gate'.*reduces over the batch axis",
    ),
    "softmax over the batch": (
        [
            helper.make_node("Flatten", ["x"], ["rows"], axis=1),
            helper.make_node("Softmax", ["rows"], ["share"], axis=0),
            helper.make_node("ReduceSum", ["share", "ax1"], ["gate"], keepdims=1),
        ],
        {"ax1": i64(1)},
        r"Softmax node 'share'.*normalizes over the batch axis",
    ),
    "batch size cast to a float": (
        [
            helper.make_node("Shape", ["x"], ["dims"]),
            helper.make_node("Gather", ["dims", "zero_index"], ["n_int"], axis=0),
            helper.make_node("Cast", ["n_int"], ["n"], to=FLOAT),
            helper.make_node("Sub", ["two", "n"], ["g0"]),
            helper.make_node("Relu", ["g0"], ["gate"]),
        ],
        {"zero_index": np.int64(0), "two": np.float32(2)},
        r"Cast node 'n'.*batch size",
    ),
    "ones sized by the batch": (
        [
            helper.make_node("Shape", ["x"], ["dims"]),
            helper.make_node(
                "ConstantOfShape", ["dims"], ["ones"], value=onnx.numpy_helper.from_array(np.ones(1, np.float32))
            ),
            helper.make_node("ReduceSum", ["ones", "ax0"], ["count"], keepdims=0),
            helper.make_node("ReduceMax", ["count"], ["n"], keepdims=0),
            helper.make_node("Sub", ["two", "n"], ["g0"]),
            helper.make_node("Relu", ["g0"], ["gate"]),
        ],
        {"ax0": i64(0), "two": np.float32(2)},
        r"ReduceSum node 'count'.*reduces over the batch axis",
    ),
    "batch size compared with one": (
        [
            helper.make_node("Shape", ["x"], ["dims"], end=1),
            helper.make_node("Equal", ["dims", "one"], ["single"]),
            helper.make_node("Cast", ["single"], ["gate"], to=FLOAT),
        ],
        {"one": i64(1)},
        r"Cast node 'gate'.*batch size",
    ),
    "transpose then a product over the batch": (
        [
            helper.make_node("Flatten", ["x"], ["rows"], axis=1),
            helper.make_node("Transpose", ["rows"], ["columns"], perm=[1, 0]),
            helper.make_node("MatMul", ["columns", "rows"], ["gram"]),
            helper.make_node("ReduceSum", ["gram"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["gate"]),
        ],
        {"zero": np.float32(0)},
        r"MatMul node 'gram'.*sums over the batch axis",
    ),
    "one sample's pixels for every sample": (
        [
            helper.make_node("Gather", ["x", "zero_index"], ["first"], axis=0),
            helper.make_node("ReduceSum", ["first"], ["gate"], keepdims=0),
        ],
        {"zero_index": np.int64(0)},
        r"Gather node 'first'.*picks samples",
    ),
    "reversed batch": (
        [
            helper.make_node("Slice", ["x", "last", "before_first", "ax0", "back"], ["reversed"]),
            helper.make_node("Sub", ["x", "reversed"], ["d"]),
            helper.make_node("ReduceSum", ["d", "ax123"], ["g0"], keepdims=0),
            helper.make_node("Unsqueeze", ["g0", "ax1"], ["gate"]),
        ],
        {
            "last": i64(-1),
            "before_first": i64(-(2**62)),
            "ax0": i64(0),
            "back": i64(-1),
            "ax123": i64(1, 2, 3),
            "ax1": i64(1),
        },
        r"Slice node 'reversed'.*selects samples",
    ),
    "batch folded into the features": (
        [
            helper.make_node("Reshape", ["x", "one_row"], ["all"]),
            helper.make_node("ReduceSum", ["all", "ax1"], ["gate"], keepdims=0),
        ],
        {"one_row": i64(1, -1), "ax1": i64(1)},
        r"ReduceSum node 'gate'.*reduces over the batch axis",
    ),
}


@pytest.mark.parametrize("variant", sorted(MIXING))
def test_information_across_the_batch_is_refused(variant):
    from crossaudit.errors import UnsupportedOpError

    extra, constants, message = MIXING[variant]
    with pytest.raises(UnsupportedOpError, match=message):
        OnnxModule(_classifier(extra, constants))


def test_per_sample_graphs_with_batch_sized_reshapes_load():
    """A CNN stem, a reshape to (batch, tokens, heads, width) read from the input's shape,
    attention within each sample, a class token expanded to the batch and a head: every
    sample computed alone, so the translation loads and agrees with ONNX Runtime on any
    batch size."""
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),  # n x 4 x 4 x 4
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Shape", ["x"], ["dims"]),
        helper.make_node("Slice", ["dims", "zero", "one"], ["n"]),
        helper.make_node("Concat", ["n", "tokens_heads_width"], ["target"], axis=0),
        helper.make_node("Reshape", ["r", "target"], ["q"]),  # n x 4 tokens x 2 heads x 8
        helper.make_node("Transpose", ["q"], ["qh"], perm=[0, 2, 1, 3]),  # n x 2 x 4 x 8
        helper.make_node("Transpose", ["q"], ["kh"], perm=[0, 2, 3, 1]),  # n x 2 x 8 x 4
        helper.make_node("MatMul", ["qh", "kh"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attention"], axis=-1),
        helper.make_node("MatMul", ["attention", "qh"], ["mixed"]),
        helper.make_node("Transpose", ["mixed"], ["back"], perm=[0, 2, 1, 3]),
        helper.make_node("Concat", ["n", "tokens_width"], ["flat"], axis=0),
        helper.make_node("Reshape", ["back", "flat"], ["seq"]),  # n x 4 x 16
        helper.make_node("Concat", ["n", "cls_dims"], ["cls_shape"], axis=0),
        helper.make_node("Expand", ["cls", "cls_shape"], ["cls_n"]),  # n x 1 x 16
        helper.make_node("Concat", ["cls_n", "seq"], ["with_cls"], axis=1),
        helper.make_node("LayerNormalization", ["with_cls", "scale", "bias"], ["normed"], axis=-1),
        helper.make_node("ReduceMean", ["normed", "ax1"], ["pooled"], keepdims=0),
        helper.make_node("Gemm", ["pooled", "W"], ["y"], transB=1),
    ]
    constants = {
        "k": floats((4, 1, 3, 3), edges=False), "zero": i64(0), "one": i64(1), "tokens_heads_width": i64(4, 2, 8),
        "tokens_width": i64(4, 16), "cls_dims": i64(1, 16), "cls": floats((1, 1, 16), 1, edges=False),
        "scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32), "ax1": i64(1),
        "W": floats((3, 16), 2, edges=False),
    }  # fmt: skip
    model = _graph(nodes, constants)
    module = OnnxModule(model)
    session = ort.InferenceSession(model.SerializeToString())
    x = np.random.RandomState(0).rand(5, 1, 4, 4).astype(np.float32)
    batched = module(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(batched, session.run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)
    alone = np.concatenate([module(torch.from_numpy(x[i : i + 1])).detach().numpy() for i in range(5)])
    np.testing.assert_allclose(alone, batched, rtol=1e-5, atol=1e-5)
