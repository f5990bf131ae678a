"""The ONNX ops crossaudit translates, one torch function each (`OPS`), and the size bounds
they check before they allocate.

Each function takes a node's attributes and its input tensors and returns what ONNX
Runtime returns for them: `tests/test_onnx_semantics.py` checks every (op, element type)
pair the translator accepts against ONNX Runtime. The graph around them, what it may
contain and how a model runs, is `onnx_graph`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor

from crossaudit.errors import ModelLoadError, UnsupportedOpError

Attrs = dict[str, object]
OpFn = Callable[[Attrs, list[Tensor | None]], Tensor | tuple[Tensor, ...]]


# The most elements any one tensor may hold, stored in the file or computed while running.
MAX_TENSOR_ELEMENTS = 128 * 1024 * 1024


def _bounded(op: str, shape: Sequence[int]) -> tuple[int, ...]:
    """`shape`, checked before anything of that shape is allocated: an output whose size
    a runtime value decides (a shape tensor, repeats, scales, a range's bounds) could
    otherwise ask for more memory than the machine has."""
    dims = tuple(int(d) for d in shape)
    elements = math.prod(max(d, 0) for d in dims)
    if elements > MAX_TENSOR_ELEMENTS:
        raise ModelLoadError(
            f"{op} would make a tensor of shape {list(dims)} ({elements} elements); "
            f"expected at most {MAX_TENSOR_ELEMENTS} elements"
        )
    return dims


# Node outputs worth comparing across models: activations, pooling and residual sums.
TAP_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Gelu", "HardSwish", "Mish",
        "Softplus", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool",
        "GlobalMaxPool", "Add", "LayerNormalization",
    }
)  # fmt: skip


def _pads_nd(pads: Sequence[int]) -> list[int]:
    """ONNX pads (all begins, then all ends) -> F.pad order (last axis first, begin/end)."""
    half = len(pads) // 2
    torch_pads: list[int] = []
    for axis in reversed(range(half)):
        torch_pads += [pads[axis], pads[axis + half]]
    return torch_pads


def _text(value: object, default: str) -> str:
    """A string attribute (ONNX gives bytes), or `default` when the node leaves it out."""
    if value is None:
        return default
    return value.decode() if isinstance(value, bytes) else str(value)


CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
TRANSPOSED_CONVS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _explicit_pads(op: str, a: Attrs, spatial: int) -> list[int]:
    """A node's pads; `auto_pad` (computed from runtime shapes) is refused by name."""
    if _text(a.get("auto_pad"), "NOTSET") != "NOTSET":
        raise UnsupportedOpError(f"{op} with auto_pad is not supported; export with explicit pads")
    if spatial not in CONVS:
        raise UnsupportedOpError(f"{op} over {spatial} spatial axes is not supported")
    return list(a.get("pads", [0] * 2 * spatial))


def _conv_options(a: Attrs, spatial: int, pads: list[int]) -> dict[str, object]:
    """What Conv and ConvTranspose share: strides, symmetric padding, dilations, groups."""
    return {
        "stride": tuple(a.get("strides", [1] * spatial)),
        "padding": tuple(pads[:spatial]),
        "dilation": tuple(a.get("dilations", [1] * spatial)),
        "groups": int(a.get("group", 1)),
    }


def _conv(a: Attrs, x: list[Tensor | None]) -> Tensor:
    inp, w, b = x[0], x[1], x[2] if len(x) > 2 else None
    spatial = w.dim() - 2
    pads = _explicit_pads("Conv", a, spatial)
    if pads[:spatial] != pads[spatial:]:
        inp, pads = F.pad(inp, _pads_nd(pads)), [0] * 2 * spatial
    return CONVS[spatial](inp, w, b, **_conv_options(a, spatial, pads))


def _conv_transpose(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """Transposed convolution (decoders, learned upsampling); an `output_shape` attribute
    or uneven pads are refused rather than guessed."""
    inp, w, b = x[0], x[1], x[2] if len(x) > 2 else None
    spatial = w.dim() - 2
    pads = _explicit_pads("ConvTranspose", a, spatial)
    if "output_shape" in a or pads[:spatial] != pads[spatial:]:
        raise UnsupportedOpError("ConvTranspose with output_shape or uneven pads is not supported")
    output_padding = tuple(a.get("output_padding", [0] * spatial))
    return TRANSPOSED_CONVS[spatial](inp, w, b, output_padding=output_padding, **_conv_options(a, spatial, pads))


def _max_pool2d(
    x: Tensor, kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
    dilation: tuple[int, ...], ceil: bool,
) -> Tensor:  # fmt: skip
    """`F.max_pool2d`, through oneDNN for the common non-overlapping window on CPU.

    Why: torch's CPU max pool with indices (what autograd needs) was a third of a trigger
    inversion step on a small CNN; oneDNN's runs that step about 20% faster, and without
    autograd torch's kernel took ten times oneDNN's with both layout conversions. Only
    windows that do not overlap take this path: there every input gets its gradient from
    at most one output, so values *and* gradients are bitwise those of `F.max_pool2d`
    (ties go to the same first maximum), and audits and calibrated scores do not move.
    Overlapping windows sum gradients in a different order, so they stay on torch's own kernel.
    """
    plain = not any(padding) and set(dilation) == {1} and not ceil and kernel == stride
    onednn = x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
    if plain and onednn:
        return torch.mkldnn_max_pool2d(x.to_mkldnn(), list(kernel), list(stride)).to_dense()
    return F.max_pool2d(x, kernel, stride, padding, dilation, ceil)


POOLS = {
    "max": {1: F.max_pool1d, 2: _max_pool2d, 3: F.max_pool3d},
    "avg": {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d},
}


def _pool(kind: str) -> OpFn:
    """Max or average pooling over 1 to 3 spatial axes (torch's local response norm
    exports a 3-d average pool over channels)."""

    def pool(a: Attrs, x: list[Tensor | None]) -> Tensor:
        inp = x[0]
        kernel = tuple(a["kernel_shape"])
        spatial = len(kernel)
        pads = _explicit_pads(f"{kind} pooling", a, spatial)
        stride = tuple(a.get("strides", [1] * spatial))
        ceil = bool(a.get("ceil_mode", 0))
        include_pad = bool(a.get("count_include_pad", 0))
        if pads[:spatial] != pads[spatial:]:
            if kind == "avg" and not include_pad:
                # Uneven pads made explicit would count as elements: average over the real ones only.
                real = F.pad(torch.ones_like(inp[:1, :1]), _pads_nd(pads))
                inp = F.pad(inp, _pads_nd(pads))
                pooled, count = (POOLS["avg"][spatial](t, kernel, stride, 0, ceil, True) for t in (inp, real))
                return pooled / count
            fill = -math.inf if kind == "max" else 0.0
            inp, pads = F.pad(inp, _pads_nd(pads), value=fill), [0] * 2 * spatial
        padding = tuple(pads[:spatial])
        if kind == "max":
            dilation = tuple(a.get("dilations", [1] * spatial))
            return POOLS[kind][spatial](inp, kernel, stride, padding, dilation, ceil)
        return POOLS[kind][spatial](inp, kernel, stride, padding, ceil, include_pad)

    return pool


def _gemm(a: Attrs, x: list[Tensor | None]) -> Tensor:
    left = x[0].t() if a.get("transA", 0) else x[0]
    right = x[1].t() if a.get("transB", 0) else x[1]
    out = float(a.get("alpha", 1.0)) * (left @ right)
    if len(x) > 2 and x[2] is not None:
        out = out + float(a.get("beta", 1.0)) * x[2]
    return out


def _batchnorm(a: Attrs, x: list[Tensor | None]) -> Tensor:
    inp, scale, bias, mean, var = x[:5]
    return F.batch_norm(inp, mean, var, scale, bias, False, 0.0, float(a.get("epsilon", 1e-5)))


def _flatten(a: Attrs, x: list[Tensor | None]) -> Tensor:
    axis = int(a.get("axis", 1)) % max(x[0].dim(), 1)
    return x[0].reshape(int(np.prod(x[0].shape[:axis])), -1)


def _reshape(a: Attrs, x: list[Tensor | None]) -> Tensor:
    shape = [int(v) for v in x[1].tolist()]
    if not a.get("allowzero", 0):
        shape = [x[0].shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x[0].reshape(shape)


def _pad(a: Attrs, x: list[Tensor | None]) -> Tensor:
    mode = _text(a.get("mode"), "constant")
    pads = [int(v) for v in x[1].tolist()] if len(x) > 1 else list(a["pads"])
    value = float(x[2].item()) if len(x) > 2 and x[2] is not None else 0.0
    _bounded("Pad", [size + pads[axis] + pads[axis + x[0].dim()] for axis, size in enumerate(x[0].shape)])
    torch_pads = _pads_nd(pads)
    while len(torch_pads) > 2 and torch_pads[-2:] == [0, 0]:
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return F.pad(x[0], torch_pads, value=value)
    return F.pad(x[0], torch_pads, mode={"reflect": "reflect", "edge": "replicate"}[mode])


def _clip(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """A missing bound is the type's extreme finite value, as ONNX says: infinities clip to it."""
    finite = torch.finfo(x[0].dtype)
    low = x[1] if len(x) > 1 and x[1] is not None else float(a.get("min", finite.min))
    high = x[2] if len(x) > 2 and x[2] is not None else float(a.get("max", finite.max))
    return torch.clamp(x[0], *(torch.as_tensor(v, dtype=x[0].dtype, device=x[0].device) for v in (low, high)))


def _axes(a: Attrs, x: list[Tensor | None]) -> list[int]:
    if len(x) > 1 and x[1] is not None:
        return [int(v) for v in x[1].tolist()]
    return list(a.get("axes", []))


def _unsqueeze(a: Attrs, x: list[Tensor | None]) -> Tensor:
    out = x[0]
    for axis in sorted(v % (out.dim() + len(_axes(a, x))) for v in _axes(a, x)):
        out = out.unsqueeze(axis)
    return out


def _squeeze(a: Attrs, x: list[Tensor | None]) -> Tensor:
    axes = _axes(a, x)
    if not axes:
        return x[0].squeeze()
    return x[0].squeeze(tuple(v % x[0].dim() for v in axes))


def _gather(a: Attrs, x: list[Tensor | None]) -> Tensor:
    axis = int(a.get("axis", 0)) % x[0].dim()
    _bounded("Gather", (*x[0].shape[:axis], *x[1].shape, *x[0].shape[axis + 1 :]))
    index = x[1].reshape(-1).long() % x[0].shape[axis]
    return torch.index_select(x[0], axis, index).reshape((*x[0].shape[:axis], *x[1].shape, *x[0].shape[axis + 1 :]))


def _layer_norm(a: Attrs, x: list[Tensor | None]) -> Tensor:
    axis = int(a.get("axis", -1)) % x[0].dim()
    shape = x[0].shape[axis:]
    return F.layer_norm(x[0], shape, x[1], x[2] if len(x) > 2 else None, float(a.get("epsilon", 1e-5)))


def _slice(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """ONNX Slice, any step: bounds clamped as the spec says (a negative step counts down
    from `start`, as the TorchScript exporter writes a reversal)."""
    starts, ends = x[1].tolist(), x[2].tolist()
    axes = x[3].tolist() if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = x[4].tolist() if len(x) > 4 and x[4] is not None else [1] * len(starts)
    out = x[0]
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        size = out.shape[axis]
        start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
        if step > 0:
            chosen = range(min(max(start, 0), size), min(max(end, 0), size), step)
        else:
            chosen = range(min(max(start, 0), size - 1), min(max(end, -1), size - 1), step)
        if step == 1:
            out = out.narrow(axis, chosen.start, len(chosen))
        else:
            out = out.index_select(axis, torch.tensor(chosen, dtype=torch.long, device=out.device))
    return out


def _split(a: Attrs, x: list[Tensor | None]) -> tuple[Tensor, ...]:
    axis = int(a.get("axis", 0))
    if len(x) > 1 and x[1] is not None:
        return torch.split(x[0], [int(v) for v in x[1].tolist()], axis)
    parts = int(a["num_outputs"])
    return torch.chunk(x[0], parts, axis)


def _softmax(log: bool) -> OpFn:
    def softmax(a: Attrs, x: list[Tensor | None]) -> Tensor:
        axis = int(a.get("axis", -1))
        return F.log_softmax(x[0], axis) if log else F.softmax(x[0], axis)

    return softmax


def _cast(a: Attrs, x: list[Tensor | None]) -> Tensor:
    to = int(a["to"])
    dtypes = {
        onnx.TensorProto.FLOAT: torch.float32,
        onnx.TensorProto.INT64: torch.int64,
        onnx.TensorProto.BOOL: torch.bool,
    }
    if to not in dtypes:
        raise UnsupportedOpError(f"Cast to ONNX type {to} is not supported")
    return x[0].to(dtypes[to])


def _shape(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """The input's shape, or the part of it between `start` and `end` (opset 15)."""
    dims = list(x[0].shape)
    end = a.get("end")
    return torch.tensor(dims[int(a.get("start", 0)) : None if end is None else int(end)], dtype=torch.int64)


def _instance_norm(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """What GroupNorm and InstanceNorm export to (GroupNorm with a reshape around it)."""
    return F.instance_norm(x[0], weight=x[1], bias=x[2], eps=float(a.get("epsilon", 1e-5)))


def _broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """The shape `shapes` broadcast to, as `torch.broadcast_shapes` gives it.

    Why not torch's: its first call imports torch's symbolic-shape machinery (sympy, about
    0.4 s), which every model load would pay for arithmetic on a few tuples. In Python's
    integers, so that a hostile shape too large for int64 still reaches `_bounded`.
    """
    rank = max((len(shape) for shape in shapes), default=0)
    padded = [(1,) * (rank - len(shape)) + tuple(int(size) for size in shape) for shape in shapes]
    out = []
    for sizes in zip(*padded, strict=True):
        others = {size for size in sizes if size != 1}
        if len(others) > 1:
            raise RuntimeError(f"shapes {[list(shape) for shape in shapes]} do not broadcast together")
        out.append(others.pop() if others else 1)
    return tuple(out)


def _expand(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """ONNX Expand broadcasts both ways: a 1 in the target shape keeps the input's size."""
    shape = _broadcast_shapes(x[0].shape, tuple(int(v) for v in x[1].tolist()))
    return x[0].expand(_bounded("Expand", shape))


def _tile(a: Attrs, x: list[Tensor | None]) -> Tensor:
    repeats = [int(v) for v in x[1].tolist()]
    _bounded("Tile", [size * times for size, times in zip(x[0].shape, repeats, strict=True)])
    return x[0].repeat(*repeats)


def _constant_of_shape(a: Attrs, x: list[Tensor | None]) -> Tensor:
    value = torch.as_tensor(np.array(a.get("value", np.zeros(1, np.float32))).reshape(-1)[0])
    shape = _bounded("ConstantOfShape", x[0].tolist())
    return torch.full(shape, value.item(), dtype=value.dtype, device=x[0].device)


def _div(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """Integer division truncates towards zero, as ONNX Runtime's does; torch's `/` would
    give a float quotient."""
    if x[0].is_floating_point():
        return x[0] / x[1]
    return torch.div(x[0], x[1], rounding_mode="trunc")


def _mod(a: Attrs, x: list[Tensor | None]) -> Tensor:
    return torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1])


def _reduce(reduce: Callable[..., Tensor]) -> OpFn:
    def run(a: Attrs, x: list[Tensor | None]) -> Tensor:
        axes = _axes(a, x) or list(range(x[0].dim()))
        return reduce(x[0], dim=axes, keepdim=bool(a.get("keepdims", 1)))

    return run


def _variadic(combine: Callable[[Tensor, Tensor], Tensor]) -> OpFn:
    """Max, Min and Sum: any number of inputs, broadcast together."""

    def run(a: Attrs, x: list[Tensor | None]) -> Tensor:
        return functools.reduce(combine, [t for t in x if t is not None])

    return run


_sum = _variadic(torch.add)


def _mean(a: Attrs, x: list[Tensor | None]) -> Tensor:
    return _sum(a, x) / sum(t is not None for t in x)


def _prelu(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """Leaky ReLU with a learned slope, broadcast to the input (per channel as torch exports it)."""
    return torch.where(x[0] >= 0, x[0], x[1] * x[0])


def _hard_sigmoid(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """max(0, min(1, alpha x + beta)); torch's hardsigmoid exports alpha 1/6 (MobileNetV3's gates)."""
    return torch.clamp(float(a.get("alpha", 0.2)) * x[0] + float(a.get("beta", 0.5)), 0.0, 1.0)


def _local_response_norm(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """ONNX LRN is torch's local response norm for the odd windows ONNX Runtime accepts."""
    size = int(a["size"])
    return F.local_response_norm(
        x[0], size, float(a.get("alpha", 1e-4)), float(a.get("beta", 0.75)), float(a.get("bias", 1.0))
    )


def _range(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """ONNX Range: max(ceil((limit - start) / delta), 0) elements, so bounds that run
    against the step give an empty tensor (torch.arange raises)."""
    start, limit, delta = (t.item() for t in x[:3])
    if delta == 0:
        raise ModelLoadError("Range with a delta of 0: expected a nonzero step")
    count = -(-(limit - start) // delta) if isinstance(delta, int) else math.ceil((limit - start) / delta)
    _bounded("Range", [max(count, 0)])
    if count <= 0:
        return torch.empty(0, dtype=x[0].dtype, device=x[0].device)
    return torch.arange(start, limit, delta, dtype=x[0].dtype, device=x[0].device)


# Resize: ONNX coordinate modes that F.interpolate reproduces, per interpolation mode.
RESIZE_MODES = {
    ("nearest", "asymmetric"): {"mode": "nearest"},
    ("linear", "half_pixel"): {"mode": "bilinear", "align_corners": False},
    ("linear", "pytorch_half_pixel"): {"mode": "bilinear", "align_corners": False},
    ("linear", "align_corners"): {"mode": "bilinear", "align_corners": True},
}


def _resize(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """Resize of an image (N x C x H x W) by scales or sizes, in the modes torch's own
    upsampling exports to; any other mode is refused rather than approximated."""
    mode = _text(a.get("mode"), "nearest")
    coordinates = _text(a.get("coordinate_transformation_mode"), "half_pixel")
    nearest = _text(a.get("nearest_mode"), "round_prefer_floor")
    options = RESIZE_MODES.get((mode, coordinates))
    if x[0].dim() != 4 or options is None or (mode == "nearest" and nearest != "floor"):
        raise UnsupportedOpError(
            f"Resize mode {mode}/{coordinates}/{nearest} on a {x[0].dim()}-d input is not supported"
        )
    sizes = x[3] if len(x) > 3 and x[3] is not None and x[3].numel() else None
    if sizes is not None:
        size = _bounded("Resize", [*x[0].shape[:2], *(int(v) for v in sizes.tolist()[-2:])])[2:]
        return F.interpolate(x[0], size=size, **options)
    scales = tuple(float(v) for v in x[2].tolist()[-2:])
    _bounded("Resize", [*x[0].shape[:2], *(math.floor(n * s) for n, s in zip(x[0].shape[2:], scales, strict=True))])
    return F.interpolate(x[0], scale_factor=scales, **options)


def _einsum(a: Attrs, x: list[Tensor | None]) -> Tensor:
    """Einsum with an explicit output and no ellipsis, whose output size is known before
    it is computed (an outer product of two long vectors would be quadratic)."""
    equation = _text(a["equation"], "").replace(" ", "")
    operands = [t for t in x if t is not None]
    if "->" not in equation or "." in equation:
        raise UnsupportedOpError(f"Einsum {equation!r} without an explicit output or with an ellipsis is not supported")
    inputs, output = equation.split("->")
    sizes = {
        letter: size
        for labels, t in zip(inputs.split(","), operands, strict=True)
        for letter, size in zip(labels, t.shape, strict=True)
    }
    _bounded("Einsum", [sizes.get(letter, 1) for letter in output])
    return torch.einsum(equation, *operands)


# Ops whose inputs broadcast together: the output can be far larger than any input.
BROADCASTING_OPS = frozenset(
    {
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "PRelu", "Where", "Equal", "Less", "LessOrEqual", "Greater",
        "GreaterOrEqual", "And", "Or", "Max", "Min", "Sum", "Mean",
    }
)  # fmt: skip


def _check_output_size(op: str, a: Attrs, args: list[Tensor | None]) -> None:
    """Bound the outputs of broadcasting ops and matrix products before computing them."""
    shapes = [tuple(t.shape) for t in args if t is not None]
    if op in BROADCASTING_OPS:
        _bounded(op, _broadcast_shapes(*shapes))
    elif op == "MatMul" and len(shapes[0]) >= 2 and len(shapes[1]) >= 2:
        left, right = shapes[:2]
        _bounded(op, (*_broadcast_shapes(left[:-2], right[:-2]), left[-2], right[-1]))
    elif op == "Gemm":
        left, right = shapes[:2]
        _bounded(op, (left[1] if a.get("transA", 0) else left[0], right[0] if a.get("transB", 0) else right[1]))


OPS: dict[str, OpFn] = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": lambda a, x: x[0] @ x[1],
    "Relu": lambda a, x: F.relu(x[0]),
    "LeakyRelu": lambda a, x: F.leaky_relu(x[0], float(a.get("alpha", 0.01))),
    "Sigmoid": lambda a, x: torch.sigmoid(x[0]),
    "Tanh": lambda a, x: torch.tanh(x[0]),
    "Elu": lambda a, x: F.elu(x[0], float(a.get("alpha", 1.0))),
    "Selu": lambda a, x: F.selu(x[0]),
    "Gelu": lambda a, x: F.gelu(x[0], approximate=_text(a.get("approximate"), "none")),
    "HardSwish": lambda a, x: F.hardswish(x[0]),
    "HardSigmoid": _hard_sigmoid,
    "PRelu": _prelu,
    "Mish": lambda a, x: F.mish(x[0]),
    "Celu": lambda a, x: F.celu(x[0], float(a.get("alpha", 1.0))),
    "ThresholdedRelu": lambda a, x: x[0] * (x[0] > float(a.get("alpha", 1.0))),
    "Softsign": lambda a, x: F.softsign(x[0]),
    "Abs": lambda a, x: x[0].abs(),
    "Sign": lambda a, x: torch.sign(x[0]),
    "Log": lambda a, x: torch.log(x[0]),
    "Reciprocal": lambda a, x: torch.reciprocal(x[0]),
    "Floor": lambda a, x: torch.floor(x[0]),
    "Ceil": lambda a, x: torch.ceil(x[0]),
    "Sin": lambda a, x: torch.sin(x[0]),
    "Cos": lambda a, x: torch.cos(x[0]),
    "Softplus": lambda a, x: F.softplus(x[0]),
    "Erf": lambda a, x: torch.erf(x[0]),
    "Sqrt": lambda a, x: torch.sqrt(x[0]),
    "Exp": lambda a, x: torch.exp(x[0]),
    "Neg": lambda a, x: -x[0],
    "Pow": lambda a, x: torch.pow(x[0], x[1]),
    "Clip": _clip,
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "GlobalAveragePool": lambda a, x: x[0].mean(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "GlobalMaxPool": lambda a, x: x[0].amax(dim=tuple(range(2, x[0].dim())), keepdim=True),
    "BatchNormalization": _batchnorm,
    "LRN": _local_response_norm,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Transpose": lambda a, x: x[0].permute(*a.get("perm", reversed(range(x[0].dim())))),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Add": lambda a, x: x[0] + x[1],
    "Sub": lambda a, x: x[0] - x[1],
    "Mul": lambda a, x: x[0] * x[1],
    "Div": _div,
    "Concat": lambda a, x: torch.cat([t for t in x if t is not None], int(a["axis"])),
    "Pad": _pad,
    "Softmax": _softmax(log=False),
    "LogSoftmax": _softmax(log=True),
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "ReduceMin": _reduce(torch.amin),
    "ReduceL1": _reduce(lambda t, dim, keepdim: t.abs().sum(dim=dim, keepdim=keepdim)),
    "ReduceL2": _reduce(lambda t, dim, keepdim: torch.linalg.vector_norm(t, 2, dim=dim, keepdim=keepdim)),
    "ReduceSumSquare": _reduce(lambda t, dim, keepdim: t.pow(2).sum(dim=dim, keepdim=keepdim)),
    "ReduceLogSumExp": _reduce(torch.logsumexp),
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _sum,
    "Mean": _mean,
    "InstanceNormalization": _instance_norm,
    "Resize": _resize,
    "Expand": _expand,
    "ConstantOfShape": _constant_of_shape,
    "Where": lambda a, x: torch.where(x[0], x[1], x[2]),
    "Equal": lambda a, x: torch.eq(x[0], x[1]),
    "Less": lambda a, x: torch.lt(x[0], x[1]),
    "LessOrEqual": lambda a, x: torch.le(x[0], x[1]),
    "Greater": lambda a, x: torch.gt(x[0], x[1]),
    "GreaterOrEqual": lambda a, x: torch.ge(x[0], x[1]),
    "Not": lambda a, x: torch.logical_not(x[0]),
    "And": lambda a, x: torch.logical_and(x[0], x[1]),
    "Or": lambda a, x: torch.logical_or(x[0], x[1]),
    "Tile": _tile,
    "Range": _range,
    "Einsum": _einsum,
    "Mod": _mod,
    "Identity": lambda a, x: x[0],
    "Dropout": lambda a, x: x[0],
    "Shape": _shape,
    "Gather": _gather,
    "LayerNormalization": _layer_norm,
    "Slice": _slice,
    "Split": _split,
    "Cast": _cast,
}
