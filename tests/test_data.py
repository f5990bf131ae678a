"""Audit data: every validation error names the column and what was expected."""

import resource
import zipfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossaudit.errors import DataValidationError
from crossaudit.modelio.data import read_audit_data, write_parquet


def _images(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(0)
    return rng.rand(n, 1, 8, 8).astype(np.float32), np.arange(n, dtype=np.int64) % 4


def test_parquet_round_trip(tmp_path):
    x, y = _images()
    write_parquet(tmp_path / "a.parquet", x, y)
    data = read_audit_data(tmp_path / "a.parquet")
    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)
    assert data.num_classes == 4


def test_npz_round_trip(tmp_path):
    x, y = _images()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    assert read_audit_data(tmp_path / "a.npz").x.shape == (40, 1, 8, 8)


def test_missing_label_column_is_named(tmp_path):
    x, _ = _images()
    pq.write_table(pa.table({"image": pa.array(list(x.reshape(40, -1)))}), tmp_path / "a.parquet")
    with pytest.raises(DataValidationError, match="'label' is missing"):
        read_audit_data(tmp_path / "a.parquet")


def test_image_that_is_not_a_fixed_shape_tensor_is_named(tmp_path):
    x, y = _images()
    table = pa.table({"image": pa.array(list(x.reshape(40, -1))), "label": pa.array(y)})
    pq.write_table(table, tmp_path / "a.parquet")
    with pytest.raises(DataValidationError, match=r"'image' must be arrow\.fixed_shape_tensor"):
        read_audit_data(tmp_path / "a.parquet")


def test_values_out_of_range_are_named(tmp_path):
    x, y = _images()
    write_parquet(tmp_path / "a.parquet", x * 255, y)
    with pytest.raises(DataValidationError, match=r"'image': values must be finite and in \[0, 1\]"):
        read_audit_data(tmp_path / "a.parquet")


def test_wrong_label_type_is_named(tmp_path):
    x, y = _images()
    write_parquet(tmp_path / "a.parquet", x, y)
    table = pq.read_table(tmp_path / "a.parquet")
    table = table.set_column(1, "label", pa.array(y.astype(np.float64)))
    pq.write_table(table, tmp_path / "b.parquet")
    with pytest.raises(DataValidationError, match="'label' must be int64, got double"):
        read_audit_data(tmp_path / "b.parquet")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.array([object()], dtype=object), y=np.zeros(1))
    with pytest.raises(DataValidationError, match="without pickles"):
        read_audit_data(tmp_path / "a.npz")


def test_npz_wrong_shape_is_named(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((40, 64), np.float32), y=np.zeros(40, np.int64))
    with pytest.raises(DataValidationError, match=r"array 'x' must be N x C x H x W"):
        read_audit_data(tmp_path / "a.npz")


def _peak_rss_growth(run) -> int:
    """Growth of this process's peak resident memory while `run` runs, in bytes (loose:
    only an allocation above the earlier peak shows)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024


def _compressible_parquet(path, groups: int, rows: int = 1000) -> None:
    """`groups` x `rows` all-zero 3 x 32 x 32 images, written a row group at a time: a file
    of a few hundred KiB that decodes to 12 KiB per row."""
    x = np.zeros((rows, 3, 32, 32), np.float32)
    tensor_type = pa.fixed_shape_tensor(pa.float32(), [3, 32, 32])
    storage = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 3 * 32 * 32)
    table = pa.table(
        {"image": pa.ExtensionArray.from_storage(tensor_type, storage), "label": pa.array(np.arange(rows))}
    )
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        for _ in range(groups):
            writer.write_table(table)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"max_bytes": 1_000_000_000}, r"30000 rows exceed the audit-set limit of 20000"),
        ({"max_samples": 40_000, "max_bytes": 100_000_000}, r"declare \d+ bytes once decoded; expected at most"),
    ],
    ids=["rows", "decoded bytes"],
)
def test_parquet_that_decodes_past_the_limits_is_refused_before_reading(tmp_path, limits, message):
    path = tmp_path / "bomb.parquet"
    _compressible_parquet(path, groups=30)  # 368 MB once decoded
    assert path.stat().st_size < 2_000_000

    def read() -> None:
        with pytest.raises(DataValidationError, match=message):
            read_audit_data(path, **limits)

    assert _peak_rss_growth(read) < 64 * 1024**2


def _compressible_npz(path, samples: int) -> None:
    """An npz whose `x` is `samples` all-zero 1 x 32 x 32 images, deflated as it is written."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            header = {"descr": "<f4", "fortran_order": False, "shape": (samples, 1, 32, 32)}
            np.lib.format.write_array_header_1_0(member, header)
            chunk = bytes(4 * 32 * 32 * 1000)
            for _ in range(samples // 1000):
                member.write(chunk)
        with archive.open("y.npy", "w") as member:
            np.lib.format.write_array(member, np.arange(samples) % 2)


@pytest.mark.parametrize(
    ("limits", "message"),
    [({"max_bytes": 1_000_000_000}, r"array 'x': 25000 samples exceed the audit-set limit of 20000"),
     ({"max_samples": 40_000, "max_bytes": 50_000_000}, r"declare \d+ bytes once decompressed")],
    ids=["rows", "decompressed bytes"],
)  # fmt: skip
def test_npz_that_expands_past_the_limits_is_refused_before_loading(tmp_path, limits, message):
    path = tmp_path / "bomb.npz"
    _compressible_npz(path, 25_000)  # 102 MB once decompressed
    assert path.stat().st_size < 1_000_000

    def read() -> None:
        with pytest.raises(DataValidationError, match=message):
            read_audit_data(path, **limits)

    assert _peak_rss_growth(read) < 32 * 1024**2
