"""Property-based fuzzing of everything a provider or a stranger can hand us.

Each property: whatever the input, the named error (or a clean answer), never a crash, never
another exception type, and the CLI's exit code 2. Hypothesis runs derandomized, so a
failure reproduces.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from crossaudit.cli import app
from crossaudit.dev.receiver_process import served_in_thread
from crossaudit.errors import DataValidationError, ModelLoadError
from crossaudit.mlops.receiver import Receiver, ReceiverConfig
from crossaudit.mlops.webhook import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign
from crossaudit.modelio.data import read_audit_data
from crossaudit.modelio.loaders import load_model

FUZZ = settings(
    derandomize=True, deadline=None, max_examples=60,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
SECRET = "fuzz-secret-0123456789abcdef"


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """Work inside tmp_path, and prove nothing was written outside it (the repository)."""
    root = Path(__file__).resolve().parents[1]
    before = {p for p in root.iterdir()}
    previous = os.getcwd()
    os.chdir(tmp_path)
    yield tmp_path
    os.chdir(previous)
    assert {p for p in root.iterdir()} == before, "a hostile input made us write outside the working directory"


# -- audit data ------------------------------------------------------------------------


@FUZZ
@given(payload=st.binary(max_size=4096), suffix=st.sampled_from([".parquet", ".npz"]))
def test_arbitrary_bytes_as_audit_data_are_a_named_error(scratch, payload, suffix):
    path = scratch / f"data{suffix}"
    path.write_bytes(payload)
    with pytest.raises(DataValidationError):
        read_audit_data(path)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@FUZZ
@given(
    rows=st.integers(0, 40),
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    value=st.sampled_from([0.5, -1.0, 2.0, float("nan"), float("inf")]),
    label_type=st.sampled_from([pa.int64(), pa.int32(), pa.float64(), pa.string()]),
    column=st.sampled_from(["image", "label", "pixels"]),
)
def test_well_formed_parquet_with_wrong_contents_names_the_column(scratch, rows, shape, value, label_type, column):
    size = int(np.prod(shape))
    tensor = pa.fixed_shape_tensor(pa.float32(), shape)
    images = pa.ExtensionArray.from_storage(tensor, pa.array([[value] * size] * rows, pa.list_(pa.float32(), size)))
    labels = pa.array([str(i % 3) if label_type == pa.string() else i % 3 for i in range(rows)], label_type)
    names = ["image", "label"] if column != "pixels" else ["pixels", "label"]
    (scratch / "data.parquet").write_bytes(_parquet_bytes(pa.table([images, labels], names=names)))
    try:
        data = read_audit_data(scratch / "data.parquet")
    except DataValidationError as exc:
        assert "'image'" in str(exc) or "'label'" in str(exc)
        return
    assert data.x.shape[1:] == tuple(shape) and np.all((data.x >= 0) & (data.x <= 1))


@FUZZ
@given(dtype=st.sampled_from(["float32", "float64", "int64", "object"]), rank=st.integers(1, 5))
def test_npz_with_wrong_arrays_or_pickles_is_a_named_error(scratch, dtype, rank):
    x = np.zeros((30,) + (2,) * (rank - 1), dtype=dtype if dtype != "object" else object)
    y = np.arange(30) % 2
    np.savez(scratch / "data.npz", x=x, y=y)
    if dtype == "float32" and rank == 4:
        assert read_audit_data(scratch / "data.npz").x.shape == (30, 2, 2, 2)
        return
    with pytest.raises(DataValidationError, match=r"'x'|pickle"):
        read_audit_data(scratch / "data.npz")


# -- models ----------------------------------------------------------------------------


@FUZZ
@given(payload=st.binary(max_size=4096), suffix=st.sampled_from([".onnx", ".pt2"]))
def test_arbitrary_bytes_as_a_model_are_a_named_error(scratch, payload, suffix):
    path = scratch / f"model{suffix}"
    path.write_bytes(payload)
    with pytest.raises(ModelLoadError):
        load_model(str(path))


@FUZZ
@given(cut=st.floats(0.0, 0.999), flips=st.lists(st.tuples(st.floats(0, 0.999), st.integers(0, 255)), max_size=8))
def test_truncated_or_corrupted_onnx_never_crashes(scratch, digits_zoo, cut, flips):
    payload = bytearray(digits_zoo.clean_cnn.read_bytes())
    for where, value in flips:
        payload[int(where * len(payload))] = value
    path = scratch / "model.onnx"
    path.write_bytes(bytes(payload[: max(1, int(cut * len(payload)))] if cut > 0.5 else payload))
    with contextlib.suppress(ModelLoadError):  # loading a still-valid model is fine too
        load_model(str(path))


def _graph_holding(weight: onnx.TensorProto, holder: str) -> onnx.GraphProto:
    """`logits = image @ w` with `w` an initializer, a `Constant` node's value, or an
    initializer of an `If` branch (both branches read the graph's `image`)."""
    ends = (
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 4])],
    )
    matmul = onnx.helper.make_node("MatMul", ["image", "w"], ["logits"])
    if holder == "initializer":
        return onnx.helper.make_graph([matmul], "g", *ends, initializer=[weight])
    if holder == "constant":
        return onnx.helper.make_graph([onnx.helper.make_node("Constant", [], ["w"], value=weight), matmul], "g", *ends)
    out = [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None)]
    branch = onnx.helper.make_graph([matmul], "branch", [], out, initializer=[weight])
    other = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["image"], ["logits"])], "other", [], out)
    condition = onnx.numpy_helper.from_array(np.array(True), "c")
    node = onnx.helper.make_node("If", ["c"], ["logits"], then_branch=branch, else_branch=other)
    return onnx.helper.make_graph([node], "g", *ends, initializer=[condition])


@pytest.mark.parametrize("holder", ["initializer", "constant", "if branch"])
@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin", "missing.bin"])
def test_external_data_outside_the_model_directory_is_refused(scratch, location, holder):
    (scratch / "outside.bin").write_bytes(b"\0" * 64)
    inside = scratch / "model"
    inside.mkdir(exist_ok=True)
    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[4, 4])
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value=location)
    model = onnx.helper.make_model(_graph_holding(weight, holder), opset_imports=[onnx.helper.make_opsetid("", 18)])
    (inside / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model directory or missing"):
        load_model(str(inside / "m.onnx"))


@pytest.mark.parametrize("holder", ["initializer", "constant", "if branch"])
def test_absurd_tensor_shape_is_refused_wherever_the_tensor_sits(scratch, holder):
    huge = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    model = onnx.helper.make_model(_graph_holding(huge, holder), opset_imports=[onnx.helper.make_opsetid("", 18)])
    (scratch / "huge.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(ModelLoadError, match="declares"):
        load_model(str(scratch / "huge.onnx"))


@FUZZ
@given(member=st.sampled_from(["data.pkl", "archive/data.pkl", "x/byteorder", "archive/data/0"]),
       opcode=st.sampled_from([b"\x80\x02cos\nsystem\n", b"\x80\x04\x95", b"cposix\nsystem\n"]))  # fmt: skip
def test_pt2_archive_with_pickles_is_refused_unopened(scratch, member, opcode):
    path = scratch / "model.pt2"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, opcode + b"(S'touch pwned'\ntR.")
    with pytest.raises(ModelLoadError, match=r"pt2.*not accepted.*Export the model to ONNX"):
        load_model(str(path))
    assert not (scratch / "pwned").exists()


def _external_model(directory: Path, tensors: int, length: int | None = None, location: str = "w.bin") -> Path:
    """`logits = image @ (w0 + w1 + ...)`, every weight in external data: the graph file
    itself is a few hundred bytes whatever the weights weigh."""
    weights = []
    for i in range(tensors):
        weight = onnx.TensorProto(name=f"w{i}", data_type=onnx.TensorProto.FLOAT, dims=[4, 1024])
        weight.data_location = onnx.TensorProto.EXTERNAL
        weight.external_data.add(key="location", value=location)
        weight.external_data.add(key="offset", value=str(i * (length or 0)))
        if length is not None:
            weight.external_data.add(key="length", value=str(length))
        weights.append(weight)
    names = [w.name for w in weights]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Sum", names, ["w"]), onnx.helper.make_node("MatMul", ["image", "w"], ["logits"])],
        "g",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 1024])],
        initializer=weights,
    )
    path = directory / "m.onnx"
    path.write_bytes(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]).SerializeToString()
    )
    return path


def test_external_data_counts_towards_the_model_size_limit(scratch):
    """Each 16 KiB weight is within the per-tensor limit; together they exceed the model's."""
    (scratch / "w.bin").write_bytes(np.random.RandomState(0).rand(8 * 4 * 1024).astype(np.float32).tobytes())
    path = _external_model(scratch, tensors=8, length=4 * 4 * 1024)
    assert path.stat().st_size < 1000
    assert load_model(str(path), max_bytes=200_000).format == "onnx"  # 128 KiB of weights: within
    with pytest.raises(ModelLoadError, match=r"tensors hold more than \d+ bytes.*model size limit of 100000"):
        load_model(str(path), max_bytes=100_000)


def test_external_data_file_larger_than_its_tensor_is_refused_unread(scratch):
    """A tensor without a `length` reads its file to the end: the file's size counts, taken
    from its stat, so a sparse 64 GiB file is refused in no time and no memory."""
    with open(scratch / "w.bin", "wb") as sparse:
        sparse.truncate(64 * 1024**3)
    path = _external_model(scratch, tensors=1, length=None)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="model size limit"):
        load_model(str(path))
    assert time.monotonic() - started < 5


def _peak_rss_growth(run) -> int:
    """Growth of this process's peak resident memory while `run` runs, in bytes (loose:
    only an allocation above the earlier peak shows)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


ZEROS = {"value": onnx.numpy_helper.from_array(np.zeros(1, np.int64))}
NEAREST = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
# Graphs that ask for a 2^28-element (1 GiB) float tensor from a few bytes: (nodes, constants).
HUGE = 1 << 28
HUGE_OUTPUTS = {
    "ConstantOfShape": ([("ConstantOfShape", ["shape"], ["big"], {})], {"shape": np.array([1 << 14, 1 << 14])}),
    "Tile": ([("Tile", ["image", "repeats"], ["big"], {})], {"repeats": np.array([1, HUGE])}),
    "Expand": ([("Unsqueeze", ["image", "zero"], ["row"], {}), ("Expand", ["row", "shape"], ["big"], {})],
               {"zero": np.array([0]), "shape": np.array([1 << 26, 1, 4])}),
    "Expand past int64": ([("Unsqueeze", ["image", "zero"], ["row"], {}), ("Expand", ["row", "shape"], ["big"], {})],
                          {"zero": np.array([0]), "shape": np.array([1 << 62, 1 << 62, 1, 4])}),
    "Resize": ([("Reshape", ["image", "square"], ["pixels"], {}),
                ("Resize", ["pixels", "", "scales"], ["big"], NEAREST)],
               {"square": np.array([-1, 1, 2, 2]), "scales": np.array([1, 1, 1 << 13, 1 << 13], np.float32)}),
    "Range": ([("Range", ["start", "limit", "delta"], ["big"], {})],
              {"start": np.float32(0), "limit": np.float32(HUGE), "delta": np.float32(1)}),
    "Pad": ([("Pad", ["image", "pads"], ["big"], {})], {"pads": np.array([0, 0, 0, HUGE])}),
    "Gather": ([("Tile", ["image", "wide"], ["data"], {}), ("ConstantOfShape", ["count"], ["indices"], ZEROS),
                ("Gather", ["data", "indices"], ["big"], {"axis": 0})],
               {"wide": np.array([1, 1 << 10]), "count": np.array([1 << 16])}),
    "broadcast Add": ([("Tile", ["image", "wide"], ["long"], {}), ("Reshape", ["long", "column"], ["a"], {}),
                       ("Reshape", ["long", "row"], ["b"], {}), ("Add", ["a", "b"], ["big"], {})],
                      {"wide": np.array([1, 1 << 12]), "column": np.array([-1, 1]), "row": np.array([1, -1])}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(HUGE_OUTPUTS))
def test_runtime_sized_output_is_bounded_before_allocation(scratch, case):
    nodes, constants = HUGE_OUTPUTS[case]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op, inputs, outputs, **attrs) for op, inputs, outputs, attrs in nodes]
        + [onnx.helper.make_node("ReduceMean", ["big"], ["mean"], keepdims=0),
           onnx.helper.make_node("Add", ["image", "mean"], ["logits"])],
        case,
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in constants.items()],
    )  # fmt: skip
    path = scratch / "huge.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)

    def run() -> None:  # the loader's own trial runs meet the huge tensor first
        with pytest.raises(ModelLoadError, match=r"would make a tensor of shape .* expected at most \d+ elements"):
            load_model(str(path))

    assert _peak_rss_growth(run) < 256 * 1024**2


def test_cli_turns_every_hostile_file_into_exit_2(scratch, digits_zoo):
    (scratch / "junk.onnx").write_bytes(os.urandom(2048))
    (scratch / "junk.parquet").write_bytes(os.urandom(2048))
    runner = CliRunner()
    for model, data in (("junk.onnx", str(digits_zoo.audit_data)), (str(digits_zoo.clean_cnn), "junk.parquet")):
        result = runner.invoke(app, ["audit", model, str(digits_zoo.clean_mlp), "--data", data])
        assert result.exit_code == 2, result.output


# -- the receiver's HTTP API -----------------------------------------------------------


@pytest.fixture(scope="module")
def receiver_url(mlflow_server, tmp_path_factory) -> str:
    """A real receiver over HTTP with no audit workers: the fuzz only reaches the front door."""
    config = ReceiverConfig(mlflow_server, SECRET, tmp_path_factory.mktemp("fuzz") / "queue.db", workers=0)
    with served_in_thread(Receiver(config)) as url:
        yield url


header_text = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=80)  # what HTTP can carry


@FUZZ
@given(body=st.binary(max_size=2048), delivery=header_text, stamp=header_text, signature=header_text)
def test_unsigned_or_forged_requests_get_401_and_nothing_else(receiver_url, body, delivery, stamp, signature):
    headers = {DELIVERY_ID_HEADER: delivery, TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: signature}
    response = requests.post(f"{receiver_url}/webhook", data=body, headers=headers, timeout=10)
    assert response.status_code == 401 and "error" in response.json()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
events = st.fixed_dictionaries({
    "entity": st.sampled_from(["model_version", "model_version_tag", "model_version_alias", "registered_model"]),
    "action": st.sampled_from(["created", "set", "deleted"]),
    "data": st.dictionaries(st.sampled_from(["name", "version", "key", "value", "alias"]), json_values, max_size=5),
})  # fmt: skip


@FUZZ
@given(payload=st.one_of(json_values, events))
def test_signed_payloads_of_any_shape_are_answered_never_crash(receiver_url, payload):
    body = json.dumps(payload).encode()
    delivery, stamp = str(uuid.uuid4()), str(int(time.time()))
    headers = {
        DELIVERY_ID_HEADER: delivery,
        TIMESTAMP_HEADER: stamp,
        SIGNATURE_HEADER: sign(SECRET, delivery, stamp, body),
    }
    response = requests.post(f"{receiver_url}/webhook", data=body, headers=headers, timeout=10)
    well_formed = isinstance(payload, dict) and isinstance(payload.get("data"), dict) and "entity" in payload
    assert response.status_code == (200 if well_formed else 401), response.text
    if well_formed:
        assert response.json()["status"] in ("queued", "ignored")
