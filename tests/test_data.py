"""Audit data: every validation error names the column and what was expected."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crossaudit.data import read_audit_data, write_parquet
from crossaudit.errors import DataValidationError


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
