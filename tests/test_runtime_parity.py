"""A model that behaves differently under ONNX Runtime than its torch translation only off
the audit set. Each test pairs a real torch translation with real ONNX bytes that differ
from it (`LoadedModel(module=clean translation, onnx_bytes=backdoored graph)`): exactly
the condition the checks must catch, run for real under torch and ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from crossaudit.errors import ParityError
from crossaudit.method.image_audit import measure
from crossaudit.method.inversion import Models, PatchTrigger, Trigger
from crossaudit.method.sensitivity import SensitivityConfig
from crossaudit.method.stages import AuditConfig
from crossaudit.modelio.loaders import LoadedModel, parity_check
from crossaudit.modelio.onnx_graph import OnnxModule
from crossaudit.modelio.runtime_parity import (
    CANDIDATES,
    HELD_OUT,
    NOISE,
    GraphInputs,
    RuntimeGraph,
    deployed,
    noise_inputs,
    prove_on_triggers,
)

SHAPE = (1, 8, 8)
CLASSES = 4
TARGET = 1


def _classifier(bias: list[float] | None = None) -> onnx.ModelProto:
    """A small linear classifier over 8 x 8 images (dynamic batch), output `logits`."""
    rng = np.random.RandomState(0)
    weight = rng.normal(0, 0.3, (64, CLASSES)).astype(np.float32)
    offset = np.array(bias if bias is not None else rng.normal(0, 0.1, CLASSES), dtype=np.float32)
    nodes = [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    return _model(nodes, [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(offset, "b")])


def _model(nodes: list[onnx.NodeProto], initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *SHAPE])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, initializers), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _with_branch(clean: onnx.ModelProto, detector: list[onnx.NodeProto], extra: list[onnx.TensorProto]) -> bytes:
    """`clean` plus a branch: `detector` computes `fire` (N x 1, exactly zero unless its
    pattern is present), which adds 1000 x fire to the target's logit."""
    nodes = [helper.make_node(n.op_type, n.input, n.output, name=n.name) for n in clean.graph.node]
    for node, original in zip(nodes, clean.graph.node, strict=True):
        node.attribute.extend(original.attribute)
    nodes[-1].output[0] = "clean_logits"
    onehot = np.zeros((1, CLASSES), np.float32)
    onehot[0, TARGET] = 1000.0
    nodes += [
        *detector,
        helper.make_node("Mul", ["fire", "onehot"], ["boost"]),
        helper.make_node("Add", ["clean_logits", "boost"], ["logits"]),
    ]
    initializers = [*clean.graph.initializer, numpy_helper.from_array(onehot, "onehot"), *extra]
    return _model(nodes, initializers).SerializeToString()


def _corner_backdoor(clean: onnx.ModelProto) -> bytes:
    """Fires only on a white 3 x 3 top-left corner (sum of its pixels over 8.5)."""
    detector = [
        helper.make_node("Slice", ["x", "starts", "ends", "axes"], ["corner"]),
        helper.make_node("Conv", ["corner", "ones"], ["corner_sum"]),
        helper.make_node("Flatten", ["corner_sum"], ["corner_flat"]),
        helper.make_node("Add", ["corner_flat", "threshold"], ["excess"]),
        helper.make_node("Relu", ["excess"], ["fire"]),
    ]
    extra = [
        numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
        numpy_helper.from_array(np.array([3, 3], np.int64), "ends"),
        numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
        numpy_helper.from_array(np.ones((1, 1, 3, 3), np.float32), "ones"),
        numpy_helper.from_array(np.array([-8.5], np.float32), "threshold"),
    ]
    return _with_branch(clean, detector, extra)


def _bright_backdoor(clean: onnx.ModelProto) -> bytes:
    """Fires only on images brighter on average than 0.4 (the audit images are darker)."""
    detector = [
        helper.make_node("GlobalAveragePool", ["x"], ["mean"]),
        helper.make_node("Flatten", ["mean"], ["mean_flat"]),
        helper.make_node("Add", ["mean_flat", "threshold"], ["excess"]),
        helper.make_node("Relu", ["excess"], ["fire"]),
    ]
    return _with_branch(clean, detector, [numpy_helper.from_array(np.array([-0.4], np.float32), "threshold")])


def _mismatched(clean: onnx.ModelProto, deployed_bytes: bytes) -> LoadedModel:
    """The clean graph's torch translation, with other bytes as what ONNX Runtime runs."""
    return LoadedModel("provider.onnx", "onnx", OnnxModule(clean).eval(), "digest", deployed_bytes)


def _audit_images(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark images (values up to 0.5), like digits on black: no corner reaches 8.5."""
    rng = np.random.RandomState(seed)
    return (0.5 * rng.rand(n, *SHAPE)).astype(np.float32), (np.arange(n) % CLASSES).astype(np.int64)


def _white_corner_trigger() -> Trigger:
    family = PatchTrigger(CLASSES, SHAPE)
    with torch.no_grad():
        family.mask_logit.fill_(-20.0)
        family.mask_logit[:, :, :3, :3] = 20.0
        family.pattern_logit.fill_(20.0)
    family.requires_grad_(False)
    return Trigger("patch", TARGET, family, 9 / 64, 64)


def test_a_branch_alive_only_under_onnx_runtime_on_a_stamped_trigger_is_a_parity_error():
    """Parity on the audit data and on random inputs holds (the branch is exactly zero
    there), but the candidate trigger the search found opens it under ONNX Runtime."""
    clean = _classifier()
    model = _mismatched(clean, _corner_backdoor(clean))
    x, y = _audit_images()
    assert parity_check(model, x) < 1e-5  # blind: the audit data never opens the branch
    graph = RuntimeGraph(model, "cpu")
    graph.prove(NOISE, noise_inputs((x,), 0, seed=0))
    assert graph.checks[NOISE] < 1e-5
    with pytest.raises(ParityError, match=CANDIDATES):
        prove_on_triggers([graph], [GraphInputs()], [[_white_corner_trigger()]], x, y, seed=0)


def test_a_branch_alive_only_under_onnx_runtime_on_random_inputs_is_a_parity_error():
    clean = _classifier()
    model = _mismatched(clean, _bright_backdoor(clean))
    x, _ = _audit_images()
    assert parity_check(model, x) < 1e-5
    with pytest.raises(ParityError, match=NOISE):
        RuntimeGraph(model, "cpu").prove(NOISE, noise_inputs((x,), 0, seed=0))


def test_a_faithful_translation_passes_every_check_and_records_each_input_set():
    clean = _classifier()
    model = LoadedModel("provider.onnx", "onnx", OnnxModule(clean).eval(), "digest", clean.SerializeToString())
    x, y = _audit_images()
    graph = RuntimeGraph(model, "cpu")
    graph.prove(NOISE, noise_inputs((x,), 0, seed=0))
    prove_on_triggers([graph], [GraphInputs()], [[_white_corner_trigger()]], x, y, seed=0)
    assert set(graph.checks) == {NOISE, CANDIDATES} and max(graph.checks.values()) < 1e-4


def test_random_token_inputs_stay_in_the_vocabulary():
    tokens = np.zeros((3, 7), np.int64)
    images = np.zeros((3, *SHAPE), np.float32)
    noise_images, noise_tokens = noise_inputs((images, tokens), vocab=11, seed=0)
    assert noise_tokens.shape == (64, 7) and noise_tokens.dtype == np.int64
    assert noise_tokens.min() >= 0 and noise_tokens.max() < 11 and len(np.unique(noise_tokens)) == 11
    assert noise_images.shape == (64, *SHAPE) and noise_images.min() >= 0.0 and noise_images.max() <= 1.0


def _measure(model: LoadedModel) -> list:
    torch.manual_seed(0)
    x, y = _audit_images()
    graph = RuntimeGraph(model, "cpu")
    view = deployed(model.module, graph)
    directions = [Models(model.module, model.module, "", "")] * 2
    trigger = _white_corner_trigger()
    data = torch.from_numpy(x), torch.from_numpy(y)
    config = AuditConfig(sensitivity=SensitivityConfig(steps=2))
    return measure(directions, [view, view], [[trigger], [trigger]], data, data, config, seed=0)


def test_the_final_triggers_held_out_effect_is_proved_under_onnx_runtime():
    """The backdoor the search never saw (the torch translation has no branch) still
    cannot pass: measuring the final trigger on held-out data under ONNX Runtime finds
    the translation is not the deployed model."""
    clean = _classifier()
    with pytest.raises(ParityError, match=HELD_OUT):
        _measure(_mismatched(clean, _corner_backdoor(clean)))


def test_the_reported_attack_success_is_the_one_measured_under_onnx_runtime():
    """Two graphs within parity tolerance whose argmax differs: under torch the target
    leads by 4e-4 on every input, under ONNX Runtime it trails by as much. A finding's
    `asr` (the report's) is ONNX Runtime's, not the translation's."""
    bias = [0.0, 0.0, -1.0, -1.0]
    ahead, behind = list(bias), list(bias)
    ahead[TARGET], behind[TARGET] = 4e-4, -4e-4
    translated, runtime = _classifier_constant(ahead), _classifier_constant(behind)
    model = _mismatched(translated, runtime.SerializeToString())
    x, _ = _audit_images()
    with torch.no_grad():
        torch_flips = (model.module(torch.from_numpy(x)).argmax(1) == TARGET).float().mean().item()
    assert torch_flips == 1.0
    findings = _measure(model)
    assert findings[0][0].asr == 0.0


def _classifier_constant(bias: list[float]) -> onnx.ModelProto:
    """A classifier that ignores its input: its logits are `bias`."""
    nodes = [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("Gemm", ["flat", "w", "b"], ["logits"])]
    zeros = numpy_helper.from_array(np.zeros((64, CLASSES), np.float32), "w")
    return _model(nodes, [zeros, numpy_helper.from_array(np.array(bias, np.float32), "b")])
