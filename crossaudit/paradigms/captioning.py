"""Image-to-text models (captioners) cross-examined as classifiers over captions.

A captioner's output distribution is next-token probabilities of a caption given the
image. The audit turns it into one score per candidate caption (the captions of the
auditor's audit set): the caption's log-likelihood under teacher forcing per token, the
mean of its tokens' next-token log-probabilities, end token included (so a caption of more
words is not penalised for its length). Cross-entropy over these scores
is the next-token loss of the target caption against the others, so every image stage
(CKA, the trigger families, fine-tuning sensitivity, the verdict) runs unchanged, and a
trigger that forces a caption is found as a trigger that forces that candidate.

Model contract: ONNX with inputs `image` (N x C x H x W float32 in [0, 1]) and `tokens`
(N x T int64, the caption's token ids), output logits N x T x V where position i is the
distribution of token i given the image and tokens before i; plus `tokenizer.json`
(`crossaudit.modelio.tokenizer`). A caption ends with the end token `.`; the scorer appends it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from crossaudit.errors import IncomparableModelsError
from crossaudit.modelio.onnx_graph import OnnxModule
from crossaudit.modelio.tokenizer import WordTokenizer

END = "."


def caption_ids(tokenizer: WordTokenizer, caption: str) -> list[int]:
    """A caption's token ids, closed by the end token."""
    ids = tokenizer.encode(caption)
    if not ids or ids[-1] != tokenizer.id_of(END):
        ids.append(tokenizer.id_of(END))
    return ids


def caption_tokens(tokenizer: WordTokenizer, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Captions as one int64 array padded with the end token, and the mask of real tokens."""
    encoded = [caption_ids(tokenizer, c) for c in captions]
    length = max(len(ids) for ids in encoded)
    tokens = np.full((len(encoded), length), tokenizer.id_of(END), dtype=np.int64)
    mask = np.zeros((len(encoded), length), dtype=np.float32)
    for row, ids in enumerate(encoded):
        tokens[row, : len(ids)], mask[row, : len(ids)] = ids, 1.0
    return tokens, mask


class CaptionScorer(nn.Module):
    """A captioner as a classifier: image -> per-token log-likelihood of each candidate caption.

    Every image is paired with every candidate in one batch (N x K sequences), so the
    scores are differentiable in the image. Activations at taps are averaged over the
    candidates: an image layer is the same for each, a text layer summarised over them.
    Call `check_broadcast` once to let each image's encoder run once, not once per caption.
    """

    def __init__(self, captioner: nn.Module, tokenizer: WordTokenizer, captions: list[str]) -> None:
        super().__init__()
        if tokenizer.id_of(END) == 0:
            raise IncomparableModelsError(f"the captioner's tokenizer has no end token {END!r}")
        unknown = [c for c in captions if not any(caption_ids(tokenizer, c)[:-1])]
        if unknown:
            raise IncomparableModelsError(f"the captioner's tokenizer knows no word of the captions {unknown[:3]}")
        self.captioner = captioner
        self.taps: list[str] = list(getattr(captioner, "taps", []))
        self.tap_ops: dict[str, str] = dict(getattr(captioner, "tap_ops", {}))
        self.broadcast = False
        tokens, mask = caption_tokens(tokenizer, captions)
        self.register_buffer("tokens", torch.from_numpy(tokens))
        self.register_buffer("mask", torch.from_numpy(mask))

    def _outputs(self, x: Tensor, tokens: Tensor, taps: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """The captioner on every (image, candidate) pair: each image's encoder runs once
        when the graph allows it (`broadcast`), else on every pair."""
        k = len(self.tokens)
        if self.broadcast:
            return self.captioner.forward_tapped((x, tokens), taps, broadcast=k)
        inputs = (x.repeat_interleave(k, 0), tokens)
        return self.captioner.forward_tapped(inputs, taps) if taps else (self.captioner(*inputs), {})

    @torch.no_grad()
    def check_broadcast(self, x: Tensor) -> None:
        """Run each image's encoder once per image only where that provably gives the same
        scores as running it per caption (a graph that mixes the image into the tokens'
        shapes would not)."""
        if not isinstance(self.captioner, OnnxModule):
            return
        self.broadcast = False
        expanded = self(x)
        self.broadcast = True
        try:
            self.broadcast = torch.allclose(self(x), expanded, atol=1e-4, rtol=1e-4)
        except (RuntimeError, ValueError, IndexError):
            self.broadcast = False

    def forward_tapped(self, x: Tensor, taps: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        n, k = len(x), len(self.tokens)
        tokens = self.tokens.repeat(n, 1)
        logits, tapped = self._outputs(x, tokens, taps)
        if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
            raise IncomparableModelsError(
                f"a captioner's logits must be N x T x V for tokens {tuple(tokens.shape)}, got {tuple(logits.shape)}"
            )
        token_logp = logits.log_softmax(-1).gather(2, tokens[..., None])[..., 0]
        mask = self.mask.repeat(n, 1)
        scores = ((token_logp * mask).sum(1) / mask.sum(1)).view(n, k)
        return scores, {tap: a.view(n, k, *a.shape[1:]).mean(1) if len(a) == n * k else a for tap, a in tapped.items()}

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_tapped(x, [])[0]
