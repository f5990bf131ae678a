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
from crossaudit.models import load_model, parity_check


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
@pytest.mark.parametrize("architecture", [SqueezeExcite, GroupNormNet, TinyViT, Upsampler])
def test_foreign_architecture_translates_with_parity(architecture, dynamo, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.onnx"
    _export(architecture().eval(), path, dynamo)
    assert parity_check(load_model(str(path)), IMAGES) < 1e-3


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


def test_softmax_classifier_is_audited_on_its_log_probabilities(digits_zoo, tmp_path):
    """A provider exporting probabilities instead of logits gets the same audit: every
    stage sees log-probabilities, which are the logits up to a per-sample constant, so
    cross-entropy (what the inversion and fine-tuning push with) is unchanged."""
    from crossaudit.audit import _scored
    from crossaudit.data import read_audit_data
    from crossaudit.log_probabilities import LogProbabilities

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
