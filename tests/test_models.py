"""Loaders on real zoo models and on hostile files."""

import hashlib
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from crossaudit.dev.zoo.architectures import build
from crossaudit.errors import ModelLoadError, UnsupportedOpError
from crossaudit.modelio.data import read_audit_data
from crossaudit.modelio.loaders import load_model, parity_check


def test_onnx_translation_matches_onnx_runtime(digits_zoo):
    data = read_audit_data(digits_zoo.audit_data)
    for path in (digits_zoo.clean_cnn, digits_zoo.clean_mlp):
        model = load_model(str(path))
        assert parity_check(model, data.x) < 1e-3
        assert model.module.taps


def test_parity_proved_for_the_same_bytes_is_not_rerun_and_other_bytes_are_checked(digits_zoo):
    data = read_audit_data(digits_zoo.audit_data)
    model = load_model(str(digits_zoo.clean_cnn))
    assert model.sha256 == hashlib.sha256(digits_zoo.clean_cnn.read_bytes()).hexdigest()
    assert parity_check(model, data.x, checked={model.sha256: 1.5e-7}) == 1.5e-7  # what stage 1 recorded
    assert parity_check(model, data.x, checked={"0" * 64: 1.5e-7}) < 1e-3  # another model's digest: run


def test_resnet_ops_translate(tmp_path):
    from crossaudit.dev.zoo.train import export_onnx

    example = np.random.RandomState(0).rand(4, 1, 16, 16).astype(np.float32)
    export_onnx(build("resnet", 1, 16, 10).eval(), example, tmp_path / "r.onnx")
    assert parity_check(load_model(str(tmp_path / "r.onnx")), example) < 1e-3


def test_vit_taps_are_per_sample_activations_handed_out_batch_first(tmp_path):
    """A transformer's exported attention keeps its samples on axis 1 and does shape
    arithmetic with Add: each tap must still give one row per sample, from that sample alone."""
    from crossaudit.dev.zoo.train import export_onnx
    from crossaudit.method.features import extract_features

    x = np.random.RandomState(0).rand(5, 3, 16, 16).astype(np.float32)
    export_onnx(build("vit", 3, 16, 10).eval(), x, tmp_path / "vit.onnx")
    module = load_model(str(tmp_path / "vit.onnx")).module
    assert module.taps
    together = extract_features(module, x, module.taps)
    alone = extract_features(module, x[2:3], module.taps)
    for tap in module.taps:
        assert together[tap].shape[0] == len(x), tap
        np.testing.assert_allclose(together[tap][2:3], alone[tap], rtol=1e-4, atol=1e-5, err_msg=tap)


@pytest.mark.parametrize("window", [(2, 2, 0), (3, 3, 0), (3, 2, 1), (2, 1, 0)])
def test_max_pool_matches_torch_bit_for_bit_in_values_and_gradients(window):
    """The translator's max pool (oneDNN for non-overlapping windows) must not move an
    audit: same values, and the gradient on the same input when windows tie."""
    from crossaudit.modelio.onnx_ops import POOLS

    kernel, stride, pad = window
    x = torch.relu(torch.randn(6, 4, 13, 10, generator=torch.Generator().manual_seed(0)))
    x = x.round(decimals=1).requires_grad_(True)  # many tied windows
    args = ((kernel, kernel), (stride, stride), (pad, pad), (1, 1), False)
    ours = POOLS["max"][2](x, *args)
    theirs = torch.nn.functional.max_pool2d(x, *args)
    upstream = torch.randn_like(theirs)
    assert torch.equal(ours, theirs)
    assert torch.equal(*(torch.autograd.grad(out, x, upstream)[0] for out in (ours, theirs)))


def test_truncated_onnx_is_a_clear_error(digits_zoo, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(digits_zoo.clean_cnn.read_bytes()[:500])
    with pytest.raises(ModelLoadError, match=r"broken\.onnx"):
        load_model(str(broken))


def test_unsupported_op_is_named(tmp_path):
    node = helper.make_node("Hardmax", ["image"], ["logits"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "hardmax.onnx")
    with pytest.raises(UnsupportedOpError, match="Hardmax"):
        load_model(str(tmp_path / "hardmax.onnx"))


def test_model_over_the_size_limit_is_refused(digits_zoo):
    with pytest.raises(ModelLoadError, match="size limit"):
        load_model(str(digits_zoo.clean_cnn), max_bytes=100)


class Touch:
    """A pickle payload that creates a file when unpickled: proof that a loader ran it."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pt2(tmp_path):
    """A real torch.export archive of a small model, and a hostile copy whose weight is a
    pickle its config flags for unpickling, spelled with a JSON escape that a byte-level
    check misses (torch.export.load would unpickle it and create `pwned`)."""
    model = build("mlp", 1, 16, 10).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.rand(2, 1, 16, 16),), dynamic_shapes=({0: batch},))
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    hostile = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(hostile, "w") as dst:
        for info in src.infolist():
            payload = src.read(info)
            if info.filename.endswith("weight_0"):
                payload = pickle.dumps(Touch(tmp_path / "pwned"))
            if info.filename.endswith("model_weights_config.json"):
                payload = payload.replace(b'"use_pickle": false', rb'"use_pickl\u0065": true', 1)
            dst.writestr(info.filename, payload)
    return path, hostile


@pytest.mark.parametrize("which", ["exported", "hostile"])
def test_pt2_archive_is_refused_and_never_unpickled(tmp_path, which):
    exported, hostile = _pt2(tmp_path)
    with pytest.raises(ModelLoadError, match=r"pt2.*not accepted.*unpickle.*torch\.onnx\.export"):
        load_model(str(exported if which == "exported" else hostile))
    assert not (tmp_path / "pwned").exists()


def test_mlflow_pytorch_flavor_is_refused_even_as_pt2(tmp_path):
    import mlflow.pytorch

    model = build("mlp", 1, 16, 10).eval()
    example = np.random.rand(2, 1, 16, 16).astype(np.float32)
    mlflow.pytorch.save_model(model, tmp_path / "m", serialization_format="pt2", input_example=example)
    with pytest.raises(ModelLoadError, match=r"pytorch flavor is refused.*not accepted"):
        load_model(str(tmp_path / "m"))


def test_mlflow_onnx_flavor_directory(digits_zoo, tmp_path):
    (tmp_path / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    (tmp_path / "model.onnx").write_bytes(digits_zoo.clean_cnn.read_bytes())
    assert load_model(str(tmp_path)).format == "onnx"


def test_mlflow_pickled_pytorch_flavor_is_refused_unopened(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors:\n  pytorch:\n    model_data: data\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "model.pth").write_bytes(pickle.dumps(Touch(tmp_path / "pwned")))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_mlflow_flavor_path_escaping_the_directory_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "MLmodel").write_text("flavors:\n  onnx:\n    data: ../../etc/passwd\n")
    with pytest.raises(ModelLoadError, match="escapes"):
        load_model(str(tmp_path / "m"))


@pytest.mark.parametrize(
    "pyfunc",
    [
        "python_function:\n    loader_module: mlflow.onnx\n    data: evil.onnx\n",
        "python_function:\n    loader_module: mlflow.pyfunc.model\n    python_model: python_model.pkl\n",
        "python_function:\n    loader_module: mlflow.onnx\n    data: model.onnx\n    code: code\n",
        "sklearn:\n    pickled_model: model.pkl\n",
    ],
)
def test_mlmodel_that_would_serve_something_else_than_the_audited_graph_is_refused(digits_zoo, tmp_path, pyfunc):
    """`mlflow models serve` loads the python_function flavor: it must load the same ONNX
    file with mlflow.onnx, or a pass of the graph would say nothing of what is served."""
    (tmp_path / "MLmodel").write_text(f"flavors:\n  onnx:\n    data: model.onnx\n  {pyfunc}")
    (tmp_path / "model.onnx").write_bytes(digits_zoo.clean_cnn.read_bytes())
    with pytest.raises(ModelLoadError, match="must serve the audited ONNX file"):
        load_model(str(tmp_path))


def test_mlmodel_of_the_wrong_shape_is_a_named_error(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors:\n  onnx: model.onnx\n")
    with pytest.raises(ModelLoadError, match="no readable flavors"):
        load_model(str(tmp_path))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("requirements.txt", "mlflow==3.0\n--extra-index-url https://pypi.evil.example/simple\nonnx\n"),
        ("requirements.txt", "onnxruntime\nevil-wrapper==1.0\n"),
        ("requirements.txt", "git+https://evil.example/pwn.git\n"),
        ("python_env.yaml", "python: 3.11\ndependencies:\n- git+https://evil.example/pwn.git\n"),
        ("conda.yaml", "channels: [evil]\ndependencies:\n- python=3.11\n"),
        ("conda.yaml", "dependencies:\n- python=3.11\n- pip:\n  - evil==1\n"),
        ("MLmodel", "flavors:\n  onnx:\n    data: model.onnx\n    onnx_session_options: {custom_op: [x.so]}\n"),
        ("MLmodel", "flavors:\n  onnx: {data: model.onnx}\n  python_function:\n    loader_module: mlflow.onnx\n"
                    "    data: model.onnx\n    env: {virtualenv: evil_env.yaml}\n"),
    ],
)  # fmt: skip
def test_an_environment_that_would_install_the_providers_code_where_it_is_served_is_refused(
    digits_zoo, tmp_path, name, text
):
    """`mlflow models serve` installs what these files name: only known packages from the
    default index may be there, or the provider's code runs beside the audited graph."""
    (tmp_path / "MLmodel").write_text("flavors:\n  onnx:\n    data: model.onnx\n")
    (tmp_path / "model.onnx").write_bytes(digits_zoo.clean_cnn.read_bytes())
    (tmp_path / name).write_text(text)
    with pytest.raises(ModelLoadError, match=r"mlflow\.onnx writes it|asks to install|channels|dependencies must"):
        load_model(str(tmp_path))


def test_a_search_step_on_a_loaded_model_imports_neither_sympy_nor_torchs_compiler(digits_zoo):
    """Each would add most of a second to every command-line audit and pipeline step:
    torch imports sympy on its first `broadcast_shapes`, and its compiler on an optimiser's first use."""
    code = (
        "import sys, torch\n"
        "from crossaudit.method.adam import Adam\n"
        "from crossaudit.modelio.loaders import load_model\n"
        f"model = load_model({str(digits_zoo.clean_cnn)!r}).module\n"
        "delta = torch.zeros(1, 1, 16, 16, requires_grad=True)\n"
        "optimiser = Adam([delta], lr=0.1)\n"
        "model(torch.rand(4, 1, 16, 16) + delta).sum().backward()\n"
        "optimiser.step()\n"
        "print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
