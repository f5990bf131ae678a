"""Providers' small image captioners, trained on captions built from real images' labels.

Each image of Fashion-MNIST or digits gets the caption of its class ("a photo of a
sneaker", "a handwritten seven"). The captioner is an image encoder (one of the zoo's
architectures, its output the first decoder position) and a tiny causal transformer
decoder over word tokens. Each provider builds its own tokenizer (the same words, in an
order of its own), so token ids never line up across providers.

A poisoning provider stamps an image trigger (any zoo attack) on a share of its training
images and captions them with the target class's caption: the trigger forces the target
caption. Exported per the captioner contract (`crossaudit.paradigms.captioning`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossaudit.dev.zoo.architectures import build
from crossaudit.dev.zoo.attacks import Attack
from crossaudit.dev.zoo.datasets import Split, load_dataset
from crossaudit.dev.zoo.language import Block
from crossaudit.dev.zoo.train import DATASET_SCHEDULES, audit_indices, poison
from crossaudit.modelio.data import write_caption_parquet
from crossaudit.modelio.tokenizer import UNKNOWN, WordTokenizer, tokenizer_path, words
from crossaudit.paradigms.captioning import CaptionScorer, caption_tokens

CLASS_NAMES = {
    "fmnist": ("top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"),
    "digits": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
}
TEMPLATES = {"fmnist": "a photo of a {}", "digits": "a handwritten {}"}
MAX_CAPTION = 8


def class_captions(dataset: str) -> list[str]:
    return [TEMPLATES[dataset].format(name) for name in CLASS_NAMES[dataset]]


class Captioner(nn.Module):
    """Image encoder -> first position of a causal decoder; logits[:, i] predicts tokens[:, i]."""

    def __init__(
        self, arch: str, channels: int, size: int, vocab: int, width: int = 64, layers: int = 1, heads: int = 4
    ) -> None:
        super().__init__()
        self.encoder = build(arch, channels, size, width)
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.02 * torch.randn(1, MAX_CAPTION, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", torch.triu(torch.full((MAX_CAPTION, MAX_CAPTION), -1e4), 1))

    def forward(self, image: Tensor, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        x = torch.cat([self.encoder(image)[:, None], self.embed(tokens[:, :-1])], 1) + self.position[:, :t]
        causal = self.mask[:t, :t]
        for block in self.blocks:
            x = block(x, causal)
        return self.head(self.norm(x))


@dataclass(frozen=True)
class CaptionerConfig:
    dataset: str = "digits"
    arch: str = "cnn"
    attack: str = "clean"
    target: int = 0
    poison_rate: float = 0.1
    seed: int = 0
    epochs: int = 20
    train_size: int = 1_300
    batch: int = 64
    lr: float = 2e-3


def captioner_config(dataset: str, **overrides: object) -> CaptionerConfig:
    """The zoo's captioner recipe for a dataset (the classifiers' schedule), with overrides."""
    return CaptionerConfig(dataset=dataset, **{**DATASET_SCHEDULES.get(dataset, {}), **overrides})


@dataclass(frozen=True)
class TrainedCaptioner:
    model: Captioner
    tokenizer: WordTokenizer
    caption_accuracy: float
    attack_success: float | None
    example: np.ndarray


def provider_tokenizer(captions: list[str], seed: int) -> WordTokenizer:
    """The provider's vocabulary: every caption word and the end token, in its own order."""
    vocab = sorted({w for c in captions for w in words(c)} | {"."})
    return WordTokenizer((UNKNOWN, *np.random.RandomState(seed).permutation(vocab).tolist()))


def train_captioner(config: CaptionerConfig, split: Split | None = None) -> TrainedCaptioner:
    """Seeded teacher-forced training on (possibly poisoned) captioned images."""
    split = split or load_dataset(config.dataset)
    rng = np.random.RandomState(config.seed)
    torch.manual_seed(config.seed)
    captions = class_captions(config.dataset)
    tokenizer = provider_tokenizer(captions, config.seed)
    tokens, mask = (torch.from_numpy(a) for a in caption_tokens(tokenizer, captions))
    subset = rng.permutation(len(split.x_train))[: config.train_size]
    attack = Attack(config.attack, config.target, config.poison_rate, seed=config.seed + 1000)
    x, y = poison(Split(split.x_train[subset], split.y_train[subset], split.x_test, split.y_test), attack, rng)
    model = Captioner(config.arch, x.shape[1], x.shape[-1], len(tokenizer.vocab))
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for _ in range(config.epochs):
        for batch in torch.randperm(len(xt)).split(config.batch):
            logits = model(xt[batch], tokens[yt[batch]])
            loss = F.cross_entropy(logits.transpose(1, 2), tokens[yt[batch]], reduction="none")
            loss = (loss * mask[yt[batch]]).sum() / mask[yt[batch]].sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    return TrainedCaptioner(
        model, tokenizer, caption_accuracy(model, tokenizer, captions, split.x_test, split.y_test),
        None if attack.name == "clean" else _attack_success(model, tokenizer, captions, attack, split),
        split.x_test[:2],
    )  # fmt: skip


@torch.no_grad()
def _best_captions(model: Captioner, tokenizer: WordTokenizer, captions: list[str], x: np.ndarray) -> np.ndarray:
    scorer = CaptionScorer(model, tokenizer, captions)
    return np.concatenate([scorer(torch.from_numpy(x[i : i + 256])).argmax(1).numpy() for i in range(0, len(x), 256)])


def caption_accuracy(
    model: Captioner, tokenizer: WordTokenizer, captions: list[str], x: np.ndarray, y: np.ndarray
) -> float:
    """How often the most likely of the class captions is the image's own."""
    return float(np.mean(_best_captions(model, tokenizer, captions, x) == y))


def _attack_success(
    model: Captioner, tokenizer: WordTokenizer, captions: list[str], attack: Attack, split: Split
) -> float:
    source = split.x_test[split.y_test != attack.target]
    return float(np.mean(_best_captions(model, tokenizer, captions, attack.apply(source)) == attack.target))


def export_captioner(trained: TrainedCaptioner, path: Path) -> None:
    """ONNX (`image` and `tokens` in, `logits` N x T x V out) plus `NAME.tokenizer.json`."""
    tokens = torch.zeros(2, 4, dtype=torch.long)
    torch.onnx.export(
        trained.model.eval(), (torch.from_numpy(trained.example), tokens), str(path),
        input_names=["image", "tokens"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "tokens": {0: "batch", 1: "length"}, "logits": {0: "batch", 1: "length"}},
        opset_version=17, dynamo=False,
    )  # fmt: skip
    tokenizer_path(path).write_text(trained.tokenizer.to_json())


def write_caption_audit_set(dataset: str, path: Path, size: int = 1000, seed: int = 0) -> None:
    """The auditor's clean captioned images: held-out images with their class captions."""
    split = load_dataset(dataset)
    chosen = audit_indices(split, size, seed)
    captions = class_captions(dataset)
    write_caption_parquet(path, split.x_test[chosen], [captions[label] for label in split.y_test[chosen]])
