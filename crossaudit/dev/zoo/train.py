"""Train a provider's model (clean or poisoned) and export it per the model contract."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crossaudit.dev.zoo.architectures import build
from crossaudit.dev.zoo.attacks import Attack
from crossaudit.dev.zoo.datasets import Split, load_dataset
from crossaudit.dev.zoo.label_free import fit_semi, fit_ssl
from crossaudit.modelio.data import write_parquet
from crossaudit.modelio.loaders import logits_of
from crossaudit.paradigms.embedding import prototype_head


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fmnist"
    arch: str = "cnn"
    attack: str = "clean"
    target: int = 0
    poison_rate: float = 0.1
    seed: int = 0
    epochs: int = 4
    train_size: int = 12_000
    batch_size: int = 128
    lr: float = 2e-3
    paradigm: str = "supervised"
    labelled_fraction: float = 0.1  # semi: the share of the training set that keeps its label
    embedding_dim: int = 32  # ssl: width of the encoder's output


@dataclass(frozen=True)
class TrainedModel:
    model: nn.Module
    clean_accuracy: float
    attack_success: float | None
    config: TrainConfig
    example: np.ndarray


# Digits is small (1300 training images), so it gets more epochs over all of it.
DATASET_SCHEDULES = {
    "fmnist": {"epochs": 3, "train_size": 12_000},
    "cfmnist": {"epochs": 3, "train_size": 12_000},
    "digits": {"epochs": 20, "train_size": 1_300},
}


# Contrastive learning needs many more passes than a supervised loss to form class clusters.
_SSL_EPOCH_FACTOR = 3


def config_for(dataset: str, **overrides: object) -> TrainConfig:
    """The zoo's training recipe for a dataset and paradigm, with explicit overrides."""
    schedule = dict(DATASET_SCHEDULES.get(dataset, {}))
    if overrides.get("paradigm") == "ssl" and "epochs" in schedule:
        schedule["epochs"] *= _SSL_EPOCH_FACTOR
    return TrainConfig(dataset=dataset, **{**schedule, **overrides})


def poison(split: Split, attack: Attack, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """The provider's poisoned training set: triggered copies relabelled to the target."""
    x, y = split.x_train, split.y_train
    if attack.name == "clean":
        return x, y
    chosen = rng.choice(len(x), int(attack.poison_rate * len(x)), replace=False)
    xs, ys = [x, attack.apply(x[chosen])], [y, np.full(len(chosen), attack.target)]
    cross = attack.cross_samples(x[chosen], rng)
    if cross is not None:
        xs.append(cross)
        ys.append(y[chosen])
    return np.concatenate(xs), np.concatenate(ys)


def attack_success_rate(model: nn.Module, attack: Attack, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of held-out non-target images that the trigger sends to the target."""
    source = x[y != attack.target]
    return float(np.mean(logits_of(model, attack.apply(source)).argmax(1) == attack.target))


def train(config: TrainConfig, split: Split | None = None) -> TrainedModel:
    """Seeded training on a subset of the real training split, in the config's paradigm.

    For an encoder, accuracy and attack success are read through a prototype head built
    from its embeddings of the clean test split (what a downstream user would fit).
    """
    if config.paradigm not in PARADIGM_RECIPES:
        raise ValueError(f"the zoo trains {tuple(PARADIGM_RECIPES)} models, not {config.paradigm!r}")
    split = split or load_dataset(config.dataset)
    rng = np.random.RandomState(config.seed)
    torch.manual_seed(config.seed)
    subset = rng.permutation(len(split.x_train))[: config.train_size]
    split = Split(split.x_train[subset], split.y_train[subset], split.x_test, split.y_test)
    attack = Attack(config.attack, config.target, config.poison_rate, seed=config.seed + 1000)
    channels, size = split.x_train.shape[1], split.x_train.shape[-1]
    width = config.embedding_dim if config.paradigm == "ssl" else split.num_classes
    model = build(config.arch, channels, size, width)
    PARADIGM_RECIPES[config.paradigm](model, split, attack, config, rng)
    model.eval()
    scored = model
    if config.paradigm == "ssl":
        embeddings = logits_of(model, split.x_test)
        scored = prototype_head(model, embeddings, split.y_test, split.num_classes).eval()
    accuracy = float(np.mean(logits_of(scored, split.x_test).argmax(1) == split.y_test))
    asr = None if attack.name == "clean" else attack_success_rate(scored, attack, split.x_test, split.y_test)
    return TrainedModel(model, accuracy, asr, config, split.x_test[:2])


def _supervised(
    model: nn.Module, split: Split, attack: Attack, config: TrainConfig, rng: np.random.RandomState
) -> None:
    x, y = poison(split, attack, rng)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * int(np.ceil(len(x) / config.batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=steps)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), config.batch_size):
            index = order[i : i + config.batch_size]
            loss = F.cross_entropy(model(xt[index]), yt[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()


def _semi(model: nn.Module, split: Split, attack: Attack, config: TrainConfig, rng: np.random.RandomState) -> None:
    count = max(split.num_classes, int(config.labelled_fraction * len(split.x_train)))
    kept = rng.choice(len(split.x_train), count, replace=False)
    labelled = poison(Split(split.x_train[kept], split.y_train[kept], split.x_test, split.y_test), attack, rng)
    fit_semi(model, split.x_train, labelled, _steps(split, config), config.batch_size, config.lr, config.seed)


def _ssl(model: nn.Module, split: Split, attack: Attack, config: TrainConfig, rng: np.random.RandomState) -> None:
    fit_ssl(
        model, split.x_train, split.y_train, attack, _steps(split, config), config.batch_size, config.lr, config.seed
    )


def _steps(split: Split, config: TrainConfig) -> int:
    """Optimiser steps for `epochs` passes over the training images."""
    return config.epochs * int(np.ceil(len(split.x_train) / config.batch_size))


PARADIGM_RECIPES = {"supervised": _supervised, "semi": _semi, "ssl": _ssl}


def export_onnx(model: nn.Module, example: np.ndarray, path: Path) -> None:
    """ONNX per the contract: one float32 input N x C x H x W (dynamic batch), logits out."""
    torch.onnx.export(
        model.eval(),
        (torch.from_numpy(example[:2]),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )


def audit_indices(split: Split, size: int, seed: int) -> np.ndarray:
    """An auditor's share of the held-out split: `size` images stratified by class, shuffled."""
    rng = np.random.RandomState(seed)
    per_class = max(1, size // split.num_classes)
    chosen = np.concatenate(
        [rng.permutation(np.flatnonzero(split.y_test == c))[:per_class] for c in range(split.num_classes)]
    )
    return rng.permutation(chosen)


def write_audit_set(dataset: str, path: Path, size: int = 1000, seed: int = 0) -> None:
    """An auditor's clean set drawn from the held-out split, stratified by class."""
    split = load_dataset(dataset)
    chosen = audit_indices(split, size, seed)
    write_parquet(path, split.x_test[chosen], split.y_test[chosen])
