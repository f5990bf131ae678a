"""Architectures the zoo never trains, exported the two ways torch offers, must translate
to torch with ONNX Runtime parity: providers' models will not look like ours.

The dynamo exporter is torch's default; its graphs differ from the TorchScript
exporter's (opset 18, `Shape` with start/end, `Expand` instead of `Tile`...).
"""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from crossaudit.errors import ModelLoadError, UnsupportedOpError
from crossaudit.modelio.loaders import load_model, parity_check


class SqueezeExcite(nn.Module):
    """MobileNet-style: depthwise conv, ReLU6, hard-swish, squeeze-and-excite gate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.norm = nn.BatchNorm2d(16)
        self.squeeze, self.excite, self.head = nn.Linear(16, 4), nn.Linear(4, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.hardswish(self.norm(self.depthwise(F.relu6(self.stem(x)))))
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3))))))
        x = x * gate[:, :, None, None]
        return self.head(F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1))


class GroupNormNet(nn.Module):
    """GroupNorm (exported as InstanceNormalization), SiLU, a 2 x 2 adaptive pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.adaptive_avg_pool2d(F.silu(self.norm(self.conv(x))), 2).flatten(1))


class TinyViT(nn.Module):
    """Patch embedding, class token, one transformer encoder layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.position = nn.Parameter(torch.randn(1, 17, 32))
        self.encoder = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.norm, self.head = nn.LayerNorm(32), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1) + self.position
        return self.head(self.norm(self.encoder(tokens))[:, 0])


class Upsampler(nn.Module):
    """Nearest and bilinear upsampling (ONNX Resize) inside a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(F.max_pool2d(self.conv(x), 4), scale_factor=2, mode="nearest")
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        return self.head(x.reshape(x.shape[0], -1))


class MobileNetV3Gate(nn.Module):
    """MobileNetV3's hard-sigmoid gate, PReLU (per channel and shared), a cosine head
    (F.normalize: ReduceL2)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16)
        self.squeeze, self.excite = nn.Linear(16, 4), nn.Linear(4, 16)
        self.channel_slope, self.shared_slope = nn.PReLU(16), nn.PReLU()
        self.prototypes = nn.Parameter(torch.randn(10, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_slope(self.norm(self.stem(x)))
        gate = F.hardsigmoid(self.excite(self.shared_slope(self.squeeze(x.mean((2, 3))))))
        features = F.normalize((x * gate[:, :, None, None]).mean((2, 3)), dim=1)
        return 10 * features @ F.normalize(self.prototypes, dim=1).t()


class InceptionStyle(nn.Module):
    """Parallel branches concatenated, a ceil-mode pool, a transposed convolution, and a
    local response norm (`test_local_response_norm_translates_from_either_exporter`)."""

    def __init__(self, norm: bool = False) -> None:
        super().__init__()
        self.one, self.three = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.norm = nn.LocalResponseNorm(3) if norm else nn.Identity()
        self.head = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(torch.cat([self.one(x), self.three(x)], 1)), 3, 2, padding=1, ceil_mode=True)
        return self.head(self.norm(F.relu(self.up(x))).amax((2, 3)))


class ActivationZoo(nn.Module):
    """Element-wise ops a provider's custom net may use: Mish, CELU, softsign, abs, log,
    reciprocal, elementwise max/min, min-reduction, an Lp pool (Abs, Sign, Pow)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        y = torch.maximum(y, -y.abs()) + torch.log1p(y.abs()) + torch.minimum(y, torch.zeros_like(y))
        y = F.mish(y) + F.celu(y, 0.5) + F.softsign(y) + torch.reciprocal(1 + y.abs())
        return self.head(y.amax((2, 3)) - y.amin((2, 3)) + F.lp_pool2d(y, 2, 6).mean((2, 3)))


class Bicubic(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=0.5, mode="bicubic").flatten(1)[:, :10]


IMAGES = np.random.RandomState(0).rand(32, 3, 32, 32).astype(np.float32)


def _export(module: nn.Module, path, dynamo: bool) -> None:
    example = (torch.from_numpy(IMAGES[:2]),)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(module, example, path, input_names=["input"], dynamo=True, dynamic_shapes={"x": {0: batch}})
    else:
        torch.onnx.export(module, example, path, input_names=["input"], dynamo=False, dynamic_axes={"input": {0: "n"}})


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize(
    "architecture", [SqueezeExcite, GroupNormNet, TinyViT, Upsampler, MobileNetV3Gate, InceptionStyle, ActivationZoo]
)
def test_foreign_architecture_translates_with_parity(architecture, dynamo, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    _export(architecture().eval(), path, dynamo)
    assert parity_check(load_model(str(path)), IMAGES) < 1e-3


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_local_response_norm_translates_from_either_exporter(dynamo, tmp_path):
    """Dynamo writes it as a 3-d average pool over channels; the TorchScript exporter as a
    reversed slice and an `If` on the input's rank."""
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    _export(InceptionStyle(norm=True).eval(), path, dynamo=dynamo)
    assert parity_check(load_model(str(path)), IMAGES) < 1e-3


def _if_model(path, threshold: float, then_op: str = "Relu") -> None:
    """`y = relu(x) * 2` when the graph's `threshold` is below one, else `x * w - 1` with
    `w` a weight of the else branch itself; both branches read `x` from the enclosing
    graph without listing it, as ONNX allows. (A condition computed from the batch would
    make one sample's output depend on the others: the translator refuses that.)"""
    then_branch = onnx.helper.make_graph(
        [onnx.helper.make_node(then_op, ["x"], ["r"]), onnx.helper.make_node("Mul", ["r", "two"], ["then_y"])],
        "then", [], [onnx.helper.make_tensor_value_info("then_y", onnx.TensorProto.FLOAT, None)],
    )  # fmt: skip
    else_branch = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "w"], ["wx"]), onnx.helper.make_node("Sub", ["wx", "one"], ["else_y"])],
        "else", [], [onnx.helper.make_tensor_value_info("else_y", onnx.TensorProto.FLOAT, None)],
        [_constant("w", np.random.RandomState(2).randn(3072).astype(np.float32))],
    )  # fmt: skip
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["input"], ["x"]),
         onnx.helper.make_node("Less", ["threshold", "one"], ["cond"]),
         onnx.helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "if", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3072])],
        [_constant(name, np.float32(v)) for name, v in (("threshold", threshold), ("two", 2), ("one", 1))],
    )  # fmt: skip
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)


@pytest.mark.parametrize("threshold", [0.0, 1e9], ids=["then", "else"])
def test_if_runs_the_branch_onnx_runtime_runs_and_passes_gradients(threshold, tmp_path):
    path = tmp_path / "if.onnx"
    _if_model(path, threshold)
    model = load_model(str(path))
    assert parity_check(model, IMAGES) < 1e-5
    x = torch.from_numpy(IMAGES[:4]).requires_grad_(True)
    model.module(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    branch_weights = [p for p in model.module.parameters() if p.shape == (3072,)]
    assert len(branch_weights) == 1  # the else branch's weight is a parameter the sensitivity stage can tune


def test_unsupported_op_inside_a_branch_is_named_at_load(tmp_path):
    path = tmp_path / "if.onnx"
    _if_model(path, 0.0, then_op="Hardmax")
    with pytest.raises(UnsupportedOpError, match=r"not supported.*: Hardmax"):
        load_model(str(path))


@pytest.mark.parametrize("size", [3, 5])
def test_onnx_lrn_node_matches_onnx_runtime(size, tmp_path):
    """An LRN node as other exporters write it (ONNX Runtime accepts odd windows only)."""
    node = onnx.helper.make_node("LRN", ["input"], ["logits"], size=size, alpha=0.5, beta=0.75, bias=2.0)
    graph = onnx.helper.make_graph(
        [node, onnx.helper.make_node("Flatten", ["logits"], ["flat"])], "lrn",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, ["n", 3072])],
    )  # fmt: skip
    path = tmp_path / "lrn.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    assert parity_check(load_model(str(path)), IMAGES) < 1e-5


class WithPrediction(nn.Module):
    """A serving-style export: logits first, then the predicted class (`ArgMax`, an op the
    audit never needs) and the probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.net = GroupNormNet()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.net(x)
        return logits, logits.argmax(1), logits.softmax(1)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_outputs_after_the_logits_are_not_translated(dynamo, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    _export(WithPrediction().eval(), path, dynamo)
    assert "ArgMax" in {node.op_type for node in onnx.load(path).graph.node}
    model = load_model(str(path))
    assert "ArgMax" not in {op for op, *_ in model.module.nodes}
    assert parity_check(model, IMAGES) < 1e-3


@pytest.mark.filterwarnings("ignore")
def test_resize_mode_we_cannot_reproduce_is_refused_not_approximated(tmp_path):
    path = tmp_path / "bicubic.onnx"
    _export(Bicubic().eval(), path, dynamo=False)
    with pytest.raises(UnsupportedOpError, match="Resize mode cubic"):
        parity_check(load_model(str(path)), IMAGES)


@pytest.mark.filterwarnings("ignore")
def test_fixed_batch_export_is_refused_with_how_to_export(tmp_path):
    """torch.onnx.export without dynamic axes fixes the batch at the example's size."""
    path = tmp_path / "fixed.onnx"
    torch.onnx.export(GroupNormNet().eval(), (torch.from_numpy(IMAGES[:1]),), path, input_names=["input"], dynamo=False)
    with pytest.raises(ModelLoadError, match=r"fixed batch size of 1.*dynamic_axes"):
        load_model(str(path))


class ChannelsLast(nn.Module):
    """A Keras-style model: N x H x W x C in, permuted inside."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x.permute(0, 3, 1, 2)).mean((2, 3)))


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(
    ("model", "example", "message"),
    [
        (
            ChannelsLast(),
            IMAGES[:2].transpose(0, 2, 3, 1),
            r"shape \['n', 32, 32, 3\]; the audit data is \[32, 3, 32, 32\]",
        ),
        (GroupNormNet().double(), IMAGES[:2].astype(np.float64), "takes float64.*export the model in float32"),
    ],
    ids=["channels-last", "float64"],
)
def test_model_that_cannot_take_the_audit_images_is_refused_in_one_line(model, example, message, tmp_path):
    """ONNX Runtime's own complaints span many lines or name a kernel, not the cause."""
    path = tmp_path / "model.onnx"
    example = (torch.from_numpy(np.ascontiguousarray(example)),)
    torch.onnx.export(
        model.eval(), example, path, input_names=["input"], dynamo=False, dynamic_axes={"input": {0: "n"}}
    )
    with pytest.raises(ModelLoadError, match=message) as refused:
        parity_check(load_model(str(path)), IMAGES)
    assert "\n" not in str(refused.value)


def test_softmax_classifier_is_audited_on_its_log_probabilities(digits_zoo, tmp_path):
    """A provider exporting probabilities instead of logits gets the same audit: every
    stage sees log-probabilities, which are the logits up to a per-sample constant, so
    cross-entropy (what the inversion and fine-tuning push with) is unchanged."""
    from crossaudit.method.image_audit import _scored
    from crossaudit.modelio.data import read_audit_data
    from crossaudit.modelio.log_probabilities import LogProbabilities

    graph = onnx.load(str(digits_zoo.badnets_cnn))
    logits = graph.graph.output[0].name
    graph.graph.node.append(onnx.helper.make_node("Softmax", [logits], ["probabilities"], axis=1))
    graph.graph.output[0].name = "probabilities"
    path = tmp_path / "softmax.onnx"
    onnx.save(graph, path)
    data = read_audit_data(str(digits_zoo.audit_data))
    original = load_model(str(digits_zoo.badnets_cnn)).module
    module, outputs, paradigm = _scored(load_model(str(path)).module, str(path), data, "auto", "cpu")
    assert isinstance(module, LogProbabilities) and paradigm == "supervised"
    x, y = torch.from_numpy(data.x[:64]), torch.from_numpy(data.y[:64])
    with torch.no_grad():
        expected = F.log_softmax(original(x), 1)
        assert torch.allclose(module(x), expected, atol=1e-4)
        assert F.cross_entropy(module(x), y).item() == pytest.approx(F.cross_entropy(original(x), y).item(), abs=1e-4)
    plain, plain_outputs, _ = _scored(original, str(digits_zoo.badnets_cnn), data, "auto", "cpu")
    assert not isinstance(plain, LogProbabilities)  # logits are audited as they are
    assert (outputs.argmax(1) == plain_outputs.argmax(1)).all()


def _constant(name: str, value) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(value), name)


# Ops other exporters and hand-built graphs use, each on the flattened image `x` (N x 3072)
# with constants, ending in a float N x K output `y`: (nodes, constants, opset).
OP_CASES = {
    "tile_range": (
        [("Tile", ["x", "repeats"], ["tiled"], {}), ("Range", ["zero", "limit", "one"], ["ramp"], {}),
         ("Mul", ["tiled", "ramp"], ["y"], {})],
        [("repeats", np.array([1, 2])), ("zero", np.float32(0)), ("limit", np.float32(6144)), ("one", np.float32(1))],
    ),
    "comparisons_and_logic": (
        [("Greater", ["x", "low"], ["above"], {}), ("Less", ["x", "high"], ["below"], {}),
         ("And", ["above", "below"], ["inside"], {}), ("LessOrEqual", ["x", "low"], ["le"], {}),
         ("GreaterOrEqual", ["x", "high"], ["ge"], {}), ("Or", ["le", "ge"], ["outside"], {}),
         ("Not", ["outside"], ["kept"], {}), ("Where", ["inside", "x", "low"], ["a"], {}),
         ("Where", ["kept", "a", "high"], ["y"], {})],
        [("low", np.float32(0.3)), ("high", np.float32(0.7))],
    ),
    "variadic": (
        [("Sum", ["x", "x", "low"], ["s"], {}), ("Mean", ["s", "x", "low"], ["m"], {}),
         ("Max", ["m", "x", "low"], ["hi"], {}), ("Min", ["hi", "x"], ["y"], {})],
        [("low", np.float32(0.3))],
    ),
    "reductions": (
        [("Mul", ["x", "scale"], ["small"], {}), ("ReduceL1", ["small", "axes"], ["l1"], {}),
         ("ReduceSumSquare", ["small", "axes"], ["l2sq"], {}), ("ReduceLogSumExp", ["small", "axes"], ["lse"], {}),
         ("ReduceMin", ["small", "axes"], ["low"], {}), ("Concat", ["l1", "l2sq", "lse", "low"], ["y"], {"axis": 1})],
        [("axes", np.array([1])), ("scale", np.float32(1 / 3072))],
    ),
    "elementwise": (
        [("ThresholdedRelu", ["x"], ["t"], {"alpha": 0.5}), ("Sin", ["t"], ["s"], {}), ("Cos", ["s"], ["c"], {}),
         ("Mul", ["x", "ten"], ["x10"], {}), ("Floor", ["x10"], ["f"], {}), ("Ceil", ["x10"], ["e"], {}),
         ("Sub", ["f", "ten"], ["shifted"], {}), ("Sign", ["shifted"], ["g"], {}), ("Sum", ["c", "e", "g"], ["y"], {})],
        [("ten", np.float32(10))],
    ),
    "strided_slices": (
        [("Slice", ["x", "last", "before_first", "axis", "back"], ["reversed"], {}),
         ("Slice", ["x", "five", "big", "axis", "three"], ["every_third"], {}),
         ("Slice", ["x", "big", "ten", "axis", "back_two"], ["every_other_back"], {}),
         ("Concat", ["reversed", "every_third", "every_other_back"], ["y"], {"axis": 1})],
        [("last", np.array([-1])), ("before_first", np.array([-(2**62)])), ("axis", np.array([1])),
         ("back", np.array([-1])), ("five", np.array([5])), ("big", np.array([3000])), ("three", np.array([3])),
         ("ten", np.array([10])), ("back_two", np.array([-2]))],
    ),
    "einsum": (
        [("Einsum", ["x", "weights"], ["y"], {"equation": "nd,kd->nk"})],
        [("weights", np.random.RandomState(1).randn(10, 3072).astype(np.float32))],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_onnx_op_matches_onnx_runtime(case, tmp_path):
    nodes, constants = OP_CASES[case]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["input"], ["x"])]
        + [onnx.helper.make_node(op, inputs, outputs, **attrs) for op, inputs, outputs, attrs in nodes],
        case,
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["n", 3, 32, 32])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", "k"])],
        [_constant(name, value) for name, value in constants],
    )
    path = tmp_path / f"{case}.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)
    assert parity_check(load_model(str(path)), IMAGES) < 1e-4
