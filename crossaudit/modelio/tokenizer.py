"""Word-level tokenizer files for language models: JSON, never code.

A provider's language model comes with `tokenizer.json` ({"kind": "words", "vocab": [...]}):
the vocabulary in id order, lower-cased words and the punctuation marks `.` and `,`; id 0
is `<unk>`. It is hostile input like the model, so it is size-limited and validated, and
a malformed file is a named error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from crossaudit.errors import ModelLoadError

UNKNOWN = "<unk>"
MAX_TOKENIZER_BYTES = 16 * 1024 * 1024
_WORD = re.compile(r"[a-z]+|[.,]")


def words(text: str) -> list[str]:
    """The tokenizer's view of text: lower-cased words and `.` `,`; everything else is a break."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class WordTokenizer:
    vocab: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", {word: index for index, word in enumerate(self.vocab)})

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(word, 0) for word in words(text)]

    def id_of(self, word: str) -> int:
        return self._ids.get(word, 0)

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.vocab[i] if 0 <= i < len(self.vocab) else UNKNOWN for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": "words", "vocab": list(self.vocab)})


def load_tokenizer(path: Path) -> WordTokenizer:
    if not path.is_file():
        raise ModelLoadError(f"{path}: no tokenizer file (language models and captioners need theirs beside them)")
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise ModelLoadError(f"{path}: tokenizer larger than {MAX_TOKENIZER_BYTES} bytes")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: tokenizer is not JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("kind") != "words":
        raise ModelLoadError(f"{path}: tokenizer must be an object with 'kind': 'words'")
    vocab = raw.get("vocab")
    if not isinstance(vocab, list) or len(vocab) < 2 or not all(isinstance(w, str) for w in vocab):
        raise ModelLoadError(f"{path}: tokenizer 'vocab' must be a list of at least two strings")
    if vocab[0] != UNKNOWN or len(set(vocab)) != len(vocab):
        raise ModelLoadError(f"{path}: tokenizer 'vocab' must start with {UNKNOWN!r} and hold no duplicates")
    return WordTokenizer(tuple(vocab))


def tokenizer_path(model_path: Path) -> Path:
    """Where a model's tokenizer lives: `tokenizer.json` inside a model directory, else
    `NAME.tokenizer.json` beside the file `NAME.onnx`."""
    if model_path.is_dir():
        return model_path / "tokenizer.json"
    return model_path.with_suffix(".tokenizer.json")
