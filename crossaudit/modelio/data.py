"""The auditor's clean labelled set: Parquet (`arrow.fixed_shape_tensor`) or npz.

Every check names the column and what was expected, because the person fixing the file
is rarely the person who wrote the reader.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crossaudit.errors import DataValidationError

DEFAULT_MAX_SAMPLES = 20_000
# The most bytes an audit set may hold once decoded (and on disk): 3,000 ImageNet-sized images.
DEFAULT_MAX_AUDIT_BYTES = 2 * 1024**3
MAX_TEXT_CHARS = 10_000
# Bytes per value of Parquet's physical types; variable-length ones count their offsets here
# and their bytes through the column's uncompressed size.
PARQUET_VALUE_BYTES = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8, "BYTE_ARRAY": 4}


@dataclass(frozen=True)
class AuditData:
    """Images N x C x H x W in [0, 1] (float32) and integer labels N. For a captioner's
    audit set the labels index `captions`, the distinct captions in sorted order."""

    x: np.ndarray
    y: np.ndarray
    captions: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1

    @property
    def input_shape(self) -> str:
        """One input's shape as thresholds record it (`verdict.Domain`), "CxHxW"."""
        return "x".join(str(size) for size in self.x.shape[1:])


def write_parquet(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write an audit set in the Parquet contract."""
    tensor_type = pa.fixed_shape_tensor(pa.float32(), list(x.shape[1:]))
    storage = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), int(np.prod(x.shape[1:])))
    image = pa.ExtensionArray.from_storage(tensor_type, storage)
    table = pa.table({"image": image, "label": pa.array(y.astype(np.int64))})
    pq.write_table(table, path)


def write_caption_parquet(path: Path, x: np.ndarray, captions: list[str]) -> None:
    """Write a captioner's audit set: `image` as in the Parquet contract, `caption` strings."""
    write_parquet(path, x, np.zeros(len(x), dtype=np.int64))
    table = _read_table(path).drop_columns(["label"]).append_column("caption", pa.array(captions, pa.string()))
    pq.write_table(table, path)


MAX_CAPTIONS = 200


def _strings(table: pa.Table, name: str) -> list[str]:
    """A column of strings without nulls, each at most MAX_TEXT_CHARS long."""
    column = table.column(name)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataValidationError(f"column {name!r} must hold strings, got {column.type}")
    if column.null_count:
        raise DataValidationError(f"column {name!r} has {column.null_count} null rows")
    texts = column.to_pylist()
    if max((len(t) for t in texts), default=0) > MAX_TEXT_CHARS:
        raise DataValidationError(f"column {name!r}: rows must be at most {MAX_TEXT_CHARS} characters")
    return texts


def _caption_labels(table: pa.Table) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels of a captioner's audit set: the index of each row's caption among the
    distinct captions, which are the candidates the captioner is examined over."""
    texts = _strings(table, "caption")
    captions, labels = np.unique(np.array(texts, dtype=object), return_inverse=True)
    if len(captions) > MAX_CAPTIONS:
        raise DataValidationError(
            f"column 'caption': {len(captions)} distinct captions exceed {MAX_CAPTIONS}; the audit examines a "
            "captioner over a closed set of captions, each shared by several images"
        )
    return labels.astype(np.int64), tuple(str(c) for c in captions)


def _check_file_size(path: Path, max_bytes: int) -> None:
    size = path.stat().st_size
    if size > max_bytes:
        raise DataValidationError(f"{path}: {size} bytes exceed the audit-set size limit of {max_bytes}")


def _check_parquet_metadata(path: Path, metadata: pq.FileMetaData, max_samples: int, max_bytes: int) -> None:
    """Rows and decoded size from the footer, before any data is read: a small file of
    compressed or dictionary-encoded columns can decode to gigabytes."""
    if metadata.num_rows > max_samples:
        raise DataValidationError(
            f"{path}: {metadata.num_rows} rows exceed the audit-set limit of {max_samples} samples"
        )
    decoded = 0
    for group in (metadata.row_group(i) for i in range(metadata.num_row_groups)):
        for column in (group.column(j) for j in range(group.num_columns)):
            width = PARQUET_VALUE_BYTES.get(column.physical_type, 0)
            decoded += max(column.total_uncompressed_size, 0) + column.num_values * width
    if decoded > max_bytes:
        raise DataValidationError(
            f"{path}: its columns declare {decoded} bytes once decoded; expected at most {max_bytes}"
        )


def _read_table(
    path: Path, max_samples: int = DEFAULT_MAX_SAMPLES, max_bytes: int = DEFAULT_MAX_AUDIT_BYTES
) -> pa.Table:
    """The whole Parquet file, once its size and footer are within the limits. Read through
    `ParquetFile`, not `pq.read_table`: that goes through pyarrow.dataset, which imports
    pandas, 0.25 s in every fresh process (each pipeline component, each CLI run) for
    nothing the audit uses."""
    _check_file_size(path, max_bytes)
    try:
        with pq.ParquetFile(path) as parquet:
            _check_parquet_metadata(path, parquet.metadata, max_samples, max_bytes)
            return parquet.read()
    except (pa.ArrowException, OSError) as exc:
        raise DataValidationError(f"{path}: not a readable Parquet file ({exc})") from exc


def _read_parquet(
    path: Path, max_samples: int, max_bytes: int
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    table = _read_table(path, max_samples, max_bytes)
    target = "caption" if "caption" in table.column_names and "label" not in table.column_names else "label"
    for column in ("image", target):
        if column not in table.column_names:
            raise DataValidationError(f"column {column!r} is missing (found {table.column_names})")
    image = table.column("image")
    if not isinstance(image.type, pa.FixedShapeTensorType):
        raise DataValidationError(
            f"column 'image' must be arrow.fixed_shape_tensor<float32, [C,H,W]>, got {image.type}"
        )
    if image.type.value_type != pa.float32():
        raise DataValidationError(f"column 'image' must hold float32 values, got {image.type.value_type}")
    if len(image.type.shape) != 3:
        raise DataValidationError(f"column 'image' must have shape [C, H, W], got {list(image.type.shape)}")
    if image.null_count:
        raise DataValidationError(f"column 'image' has {image.null_count} null rows")
    x = np.array(image.combine_chunks().to_numpy_ndarray(), dtype=np.float32, copy=True)
    if target == "caption":
        return x, *_caption_labels(table)
    label = table.column("label")
    if label.type != pa.int64():
        raise DataValidationError(f"column 'label' must be int64, got {label.type}")
    if label.null_count:
        raise DataValidationError(f"column 'label' has {label.null_count} null rows")
    return x, np.array(label.to_pylist(), dtype=np.int64), None  # to_numpy would import pandas (see _read_table)


def _check_npz_members(path: Path, max_samples: int, max_bytes: int) -> None:
    """The archive's declared sizes and the arrays' headers, before any array is read:
    a deflated member of zeros can expand a thousandfold."""
    _check_file_size(path, max_bytes)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            declared = sum(info.file_size for info in members)
            if declared > max_bytes:
                raise DataValidationError(
                    f"{path}: its arrays declare {declared} bytes once decompressed; expected at most {max_bytes}"
                )
            for info in (m for m in members if m.filename in ("x.npy", "y.npy")):
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, _ = read_header(member)
                if shape and shape[0] > max_samples:
                    name = info.filename.removesuffix(".npy")
                    raise DataValidationError(
                        f"array {name!r}: {shape[0]} samples exceed the audit-set limit of {max_samples}"
                    )
    except DataValidationError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataValidationError(f"{path}: not a readable npz file without pickles ({exc})") from exc


def _read_npz(path: Path, max_samples: int, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    _check_npz_members(path, max_samples, max_bytes)
    try:
        with np.load(path, allow_pickle=False) as archive:
            for column in ("x", "y"):
                if column not in archive.files:
                    raise DataValidationError(f"array {column!r} is missing (found {archive.files})")
            x, y = archive["x"], archive["y"]
    except DataValidationError:
        raise
    except (ValueError, OSError, EOFError) as exc:
        raise DataValidationError(f"{path}: not a readable npz file without pickles ({exc})") from exc
    if x.dtype != np.float32:
        raise DataValidationError(f"array 'x' must be float32, got {x.dtype}")
    if x.ndim != 4:
        raise DataValidationError(f"array 'x' must be N x C x H x W, got shape {x.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataValidationError(f"array 'y' must hold integers, got {y.dtype}")
    return x, y.astype(np.int64)


def validate(
    x: np.ndarray,
    y: np.ndarray,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    names: tuple[str, str] = ("image", "label"),
    captions: tuple[str, ...] | None = None,
) -> AuditData:
    """Content checks shared by every format; `names` are the columns as the file calls them."""
    image, label = names
    if len(x) != len(y):
        raise DataValidationError(f"column {image!r} has {len(x)} rows but {label!r} has {len(y)}")
    if len(x) < 20:
        raise DataValidationError(f"column {image!r}: at least 20 samples needed, got {len(x)}")
    if len(x) > max_samples:
        raise DataValidationError(f"column {image!r}: {len(x)} samples exceed the audit-set limit of {max_samples}")
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        raise DataValidationError(f"column {image!r}: values must be finite and in [0, 1]")
    if y.min() < 0:
        raise DataValidationError(f"column {label!r}: labels must be >= 0, got {int(y.min())}")
    if len(np.unique(y)) < 2:
        raise DataValidationError(f"column {label!r}: at least two classes needed")
    return AuditData(x, y, captions)


def check_audit_path(path: str | Path) -> Path:
    """The audit set's path, once it names a file (before anything heavy is imported)."""
    path = Path(path)
    if path.is_dir():
        raise DataValidationError(f"{path}: a directory; --data takes one audit set file (.parquet or .npz)")
    if not path.is_file():
        raise DataValidationError(f"{path}: no such audit data file")
    return path


def read_audit_data(
    path: str | Path, max_samples: int = DEFAULT_MAX_SAMPLES, max_bytes: int = DEFAULT_MAX_AUDIT_BYTES
) -> AuditData:
    """The one reader of audit data, by file suffix. Rows and sizes are checked against
    `max_samples` and `max_bytes` before the data is read."""
    path = check_audit_path(path)
    if path.suffix == ".parquet":
        x, y, captions = _read_parquet(path, max_samples, max_bytes)
        return validate(x, y, max_samples, ("image", "caption" if captions else "label"), captions)
    if path.suffix == ".npz":
        return validate(*_read_npz(path, max_samples, max_bytes), max_samples, names=("x", "y"))
    raise DataValidationError(f"{path}: expected a .parquet or .npz audit set")


def write_text_parquet(path: Path, texts: list[str]) -> None:
    """Write a language-model audit set: one `text` column (string)."""
    pq.write_table(pa.table({"text": pa.array(texts, pa.string())}), path)


def is_text_data(path: str | Path) -> bool:
    """A Parquet audit set with a `text` column (a language model's), read from its schema only."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".parquet":
        return False
    try:
        return "text" in pq.read_schema(path).names
    except (pa.ArrowException, OSError):
        return False


def read_text_data(
    path: str | Path, max_samples: int = DEFAULT_MAX_SAMPLES, max_bytes: int = DEFAULT_MAX_AUDIT_BYTES
) -> list[str]:
    """The auditor's clean text for a language-model audit: Parquet with a `text` column."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".parquet":
        raise DataValidationError(f"{path}: a language-model audit set is a .parquet file with a 'text' column")
    table = _read_table(path, max_samples, max_bytes)
    if "text" not in table.column_names:
        raise DataValidationError(f"column 'text' is missing (found {table.column_names})")
    texts = _strings(table, "text")
    if not 20 <= len(texts) <= max_samples:
        raise DataValidationError(f"column 'text': between 20 and {max_samples} rows needed, got {len(texts)}")
    return texts
