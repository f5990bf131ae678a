"""The digest a verdict is signed for: every byte a deployment of the model can read.

A model is more than the graph the audit translates: an MLflow model directory also holds
`MLmodel` (whose `python_function` flavor is what `mlflow models serve` loads), a
tokenizer, external tensor data. A digest of the graph alone would let a provider change
any of those after a pass, so the digest covers the whole tree: each file's path relative
to the model and the sha256 of its bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from crossaudit.errors import ModelLoadError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_digest(path: Path) -> str:
    """sha256 over the sorted manifest `relative path NUL sha256` of every file at `path`
    (a file, or a directory and everything under it). Links are refused: what they point
    at is not part of the artifact."""
    root = path.parent if path.is_file() else path
    # A link to a directory is listed, so that it is refused rather than skipped.
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_symlink() or not p.is_dir())
    return files_digest(root, files)


def files_digest(root: Path, files: list[Path]) -> str:
    """The manifest digest of `artifact_digest` over these files, named relative to `root`."""
    manifest = hashlib.sha256()
    for item in files:
        if item.is_symlink() or not item.is_file():
            raise ModelLoadError(f"{item}: a model artifact holds only regular files")
        manifest.update(f"{item.relative_to(root).as_posix()}\0{file_sha256(item)}\n".encode())
    return manifest.hexdigest()
