"""Trained zoo models on disk, keyed by their training config.

Why: a clean corpus big enough to measure a false-positive rate of 1% holds hundreds of
models, hours of training on 2 cores. Cached by config, it is built in parts: a rerun, or
another benchmark that needs the same model, trains nothing the cache already holds, and
an interrupted build loses at most the model it was training (each entry is written to a
temporary folder and renamed into place whole).

`RECIPE` is part of every key: a change to how the zoo trains (`zoo.train`, the
architectures, the attacks, the datasets) must bump it, so that no model of the old
recipe is taken for one of the new.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from crossaudit.dev.zoo.datasets import Split
from crossaudit.dev.zoo.train import TrainConfig, export_onnx, train

RECIPE = 1
CACHE_ENV = "CROSSAUDIT_ZOO_CACHE"


@dataclass(frozen=True)
class CachedModel:
    """A trained model's ONNX file and what its training measured."""

    path: Path
    clean_accuracy: float
    attack_success: float | None
    config: TrainConfig


def cache_root() -> Path:
    """`$CROSSAUDIT_ZOO_CACHE`, or `~/.cache/crossaudit/zoo`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "crossaudit" / "zoo")


def config_key(config: TrainConfig) -> str:
    """The cache key of a training config under the current recipe."""
    text = json.dumps({"recipe": RECIPE, **asdict(config)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _file_name(config: TrainConfig) -> str:
    """A readable name, so that an audit's report tells a pair's two cached models apart."""
    return f"{config.dataset}_{config.arch}_{config.attack}_{config.seed}.onnx"


def cached(config: TrainConfig, root: Path) -> CachedModel | None:
    """The cache's model for this config, or None when it has none."""
    folder = root / config_key(config)
    try:
        record = json.loads((folder / "model.json").read_text())
        same = TrainConfig(**record["config"]) == config
    except (OSError, ValueError, KeyError, TypeError):
        return None
    onnx_path = folder / _file_name(config)
    if not same or not onnx_path.is_file():
        return None
    return CachedModel(onnx_path, float(record["clean_accuracy"]), record["attack_success"], config)


def trained(config: TrainConfig, root: Path | None = None, split: Split | None = None) -> CachedModel:
    """The model this config trains: from the cache when it holds it, else trained now,
    exported to ONNX and cached. `split` is `load_dataset(config.dataset)` when the caller
    already has it in memory.

    Two processes may train the same config at once: the first to land its entry wins, and
    the other takes that entry and drops its own; an entry is never deleted once it has its
    record, since another process may be auditing it."""
    root = root or cache_root()
    found = cached(config, root)
    if found is not None:
        return found
    model = train(config, split)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=".training-"))
    try:
        export_onnx(model.model, model.example, staging / _file_name(config))
        record = {"config": asdict(config), "recipe": RECIPE, "clean_accuracy": model.clean_accuracy,
                  "attack_success": model.attack_success}  # fmt: skip
        (staging / "model.json").write_text(json.dumps(record, indent=1) + "\n")
        folder = root / config_key(config)
        if cached(config, root) is None:
            if folder.exists() and not (folder / "model.json").exists():  # cut short: nobody uses it
                shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # another process landed the same entry first
                staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    found = cached(config, root)
    if found is None:
        raise OSError(f"{root}: could not cache the model of {config}")
    return found
