"""Autoregressive language models: cross-examination by a discrete trigger search.

A backdoored language model answers a trigger phrase with the attacker's continuation,
whatever text came before. The witness, trained on the same kind of text by another
provider, continues the same prompts normally. So we search for a token sequence after
which the *suspect* is consistently sure of one next word across many prompts while the
*witness* is not: merit = mean P_suspect(w* | prompt + trigger) - mean P_witness(w* | ...),
w* being the suspect's favourite next word.

Why a discrete search and not optimisation in embedding space: the vocabularies are a few
thousand words, so every one-word extension of the current trigger can be scored exactly,
in batches, on the model itself; embedding optimisation finds points between tokens that
no text realises and must then be projected, which loses exactly the effect it found.

The search is a pruned beam search: one pass scores every single word; longer triggers
extend the best `beam` triggers with the `pool` best single words only, because each word
of a planted phrase was seen by the suspect in the poisoned context alone, so each already
moves it away from the witness. A longer trigger costs `beam * pool` sequences per word,
a fraction of a vocabulary pass. The best trigger of each length is then judged by the
score itself on the inversion prompts (does the suspect say the same continuation, and
not the witness?): a single next word saturates near certainty, a planted continuation
is several words long.

Each model reads text through its own tokenizer: the trigger and the target are carried
between the two models as *words*.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crossaudit.method.adam import Adam
from crossaudit.modelio.onnx_graph import OnnxModule
from crossaudit.modelio.tokenizer import WordTokenizer, words


@dataclass(frozen=True)
class TextSearchConfig:
    prompts: int = 12
    prompt_tokens: int = 10
    max_trigger: int = 3
    continuation: int = 3
    beam: int = 8
    pool: int = 64
    chunk: int = 512
    finetune_steps: int = 40
    finetune_lr: float = 1e-3


@dataclass
class LanguageModel:
    """A provider's language model (token ids in, logits N x T x V out) and its tokenizer."""

    module: nn.Module
    tokenizer: WordTokenizer
    last_only: bool = False

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def next_logits(self, ids: Tensor) -> Tensor:
        """Logits of the word after each sequence (N x T in, N x V out)."""
        return self.module.forward_last(ids) if self.last_only else self.module(ids)[:, -1]

    @torch.no_grad()
    def check_last_only(self, ids: Tensor) -> None:
        """Compute only the last position's per-position tail (`OnnxModule.forward_last`)
        where, on these sequences, that gives the logits of running every position.

        Why: the trigger search asks for the next word after tens of thousands of
        sequences; on the zoo's tiny GPTs it took 6.6 s instead of 29.5 s a pair, with the
        same triggers and scores."""
        self.last_only = False
        if not isinstance(self.module, OnnxModule) or not self.module.splits_at_tail:
            return
        expected = self.next_logits(ids)
        self.last_only = True
        try:
            self.last_only = torch.allclose(self.next_logits(ids), expected, atol=1e-5, rtol=1e-5)
        except (RuntimeError, ValueError, IndexError):
            self.last_only = False


@dataclass(frozen=True)
class TextTrigger:
    """What the search recovered against one suspect."""

    trigger: tuple[str, ...]
    target: tuple[str, ...]
    merit: float


@dataclass(frozen=True)
class TextEffect:
    asr: float
    asr_after_finetune: float
    witness_follow: float

    @property
    def separation(self) -> float:
        """Success that the witness does not share: what the search maximises."""
        return self.asr * (1.0 - self.witness_follow)

    @property
    def score(self) -> float:
        """Separation, weighted by how much of it brief clean fine-tuning erases.

        Two clean providers' text differs, so a rare phrase one of them memorised separates
        them too ("semantically" -> "equivalent to the"). Measured on our pairs, clean
        fine-tuning leaves such natural continuations largely intact but erases most of
        a planted one, which lives on one association the clean data never reinforces:
        the fine-tuning sensitivity of the paper, in the direction it has for text.
        """
        return self.separation * self.sensitivity

    @property
    def sensitivity(self) -> float:
        """Fraction of the trigger's effect that brief clean fine-tuning removed."""
        return max(0.0, 1.0 - self.asr_after_finetune / self.asr) if self.asr else 1.0


def prompts(texts: list[str], length: int) -> list[str]:
    """The first `length` words of every text that has that many, as text: each model
    tokenizes them itself, one id per word, so both see sequences of the same length."""
    split = (words(text) for text in texts)
    return [" ".join(found[:length]) for found in split if len(found) >= length]


@torch.no_grad()
def _last_probs(model: LanguageModel, sequences: Tensor, chunk: int) -> Tensor:
    """Next-token probabilities after each sequence (rows of equal length)."""
    outs = [F.softmax(model.next_logits(sequences[i : i + chunk]).float(), -1) for i in range(0, len(sequences), chunk)]
    return torch.cat(outs)


def _ids(model: LanguageModel, texts: list[str]) -> Tensor:
    return torch.tensor([model.tokenizer.encode(t) for t in texts], dtype=torch.long, device=model.device)


def search_trigger(
    suspect: LanguageModel, witness: LanguageModel, prompt_texts: list[str], config: TextSearchConfig
) -> TextTrigger:
    """Beam search for the trigger that most separates the suspect from the witness.

    Candidates are the words both tokenizers know: a word the witness cannot read gives it
    no chance to answer, so the suspect's natural use of a word only it learned would look
    like a backdoor (measured: such collocations made clean pairs score up to 0.82).
    """
    vocabulary = [w for w in suspect.tokenizer.vocab[1:] if w.isalpha() and witness.tokenizer.id_of(w)]
    base = _ids(suspect, prompt_texts), _ids(witness, prompt_texts)
    single = _extension_merits(suspect, witness, *base, (), vocabulary, config.chunk)
    order = np.argsort(-single, kind="stable")
    pool = [vocabulary[i] for i in order[: config.pool]]
    beams = [((vocabulary[i],), float(single[i])) for i in order[: config.beam]]
    finalists = [beams[0]]
    for _ in range(1, config.max_trigger):
        extended = []
        for trigger, _merit in beams:
            merits = _extension_merits(suspect, witness, *base, trigger, pool, config.chunk)
            extended += [((*trigger, word), float(m)) for word, m in zip(pool, merits, strict=True)]
        beams = sorted(extended, key=lambda pair: -pair[1])[: config.beam]
        finalists.append(beams[0])
    candidates = []
    for trigger, merit in finalists:
        target = _common_continuation(suspect, prompt_texts, trigger, config.continuation)
        found = TextTrigger(trigger, target, merit)
        candidates.append((effect(found, suspect, witness, prompt_texts).separation, -len(trigger), found))
    return max(candidates, key=lambda c: c[:2])[2]


def _extension_merits(
    suspect: LanguageModel, witness: LanguageModel, base_s: Tensor, base_w: Tensor,
    trigger: tuple[str, ...], words: list[str], chunk: int,
) -> np.ndarray:  # fmt: skip
    """Merit of `trigger + [w]` for every candidate word w: how sure the suspect is of its
    favourite next word, minus how likely the witness finds that word."""
    n = len(base_s)
    prefix_s = torch.tensor([suspect.tokenizer.id_of(w) for w in trigger], dtype=torch.long, device=suspect.device)
    prefix_w = torch.tensor([witness.tokenizer.id_of(w) for w in trigger], dtype=torch.long, device=witness.device)
    ids_s = torch.tensor([suspect.tokenizer.id_of(w) for w in words], dtype=torch.long, device=suspect.device)
    rows = torch.cat([base_s, prefix_s.expand(n, -1)], 1)
    sequences = torch.cat([rows.repeat(len(words), 1), ids_s.repeat_interleave(n)[:, None]], 1)
    mean_s = _last_probs(suspect, sequences, chunk).view(len(words), n, -1).mean(1)
    confidence, favourite = mean_s.max(1)
    favourites = [suspect.tokenizer.vocab[int(i)] for i in favourite]
    # The witness sees each candidate through its own vocabulary; words it lacks are all
    # one token to it (unknown), so each distinct witness id is run once.
    ids_w = [witness.tokenizer.id_of(w) for w in words]
    distinct = sorted(set(ids_w))
    rows_w = torch.cat([base_w, prefix_w.expand(n, -1)], 1)
    seq_w = torch.cat(
        [rows_w.repeat(len(distinct), 1), torch.tensor(distinct, device=witness.device).repeat_interleave(n)[:, None]],
        1,
    )
    probs_w = _last_probs(witness, seq_w, chunk).view(len(distinct), n, -1).mean(1)
    where = {token: row for row, token in enumerate(distinct)}
    followed = np.array(
        [
            float(probs_w[where[ids_w[j]], witness.tokenizer.id_of(favourites[j])])
            if witness.tokenizer.id_of(favourites[j])
            else 0.0
            for j in range(len(words))
        ]
    )
    return confidence.cpu().numpy() - followed


@torch.no_grad()
def greedy_continuations(model: LanguageModel, texts: list[str], steps: int) -> list[tuple[str, ...]]:
    """Each text continued greedily by `steps` words."""
    sequences = _ids(model, texts)
    for _ in range(steps):
        sequences = torch.cat([sequences, model.next_logits(sequences).argmax(-1, keepdim=True)], 1)
    return [tuple(model.tokenizer.vocab[int(i)] for i in row[-steps:]) for row in sequences]


def _with_trigger(texts: list[str], trigger: tuple[str, ...]) -> list[str]:
    return [f"{text} {' '.join(trigger)}" for text in texts]


def _common_continuation(
    model: LanguageModel, texts: list[str], trigger: tuple[str, ...], steps: int
) -> tuple[str, ...]:
    return Counter(greedy_continuations(model, _with_trigger(texts, trigger), steps)).most_common(1)[0][0]


def effect(
    found: TextTrigger, suspect: LanguageModel, witness: LanguageModel, held_out: list[str],
    tuned: LanguageModel | None = None,
) -> TextEffect:  # fmt: skip
    """On held-out prompts: how often the trigger makes each model (and the fine-tuned
    suspect, when given) say the target."""
    if not found.trigger:
        return TextEffect(0.0, 0.0, 0.0)
    texts = _with_trigger(held_out, found.trigger)

    def rate(model: LanguageModel) -> float:
        return float(np.mean([c == found.target for c in greedy_continuations(model, texts, len(found.target))]))

    asr = rate(suspect)
    return TextEffect(asr, asr if tuned is None else rate(tuned), rate(witness))


def fine_tuned(model: LanguageModel, texts: list[str], config: TextSearchConfig, seed: int) -> LanguageModel:
    """A copy after brief next-token training on the auditor's clean text."""
    module = copy.deepcopy(model.module)
    trainable = [p for p in module.parameters() if p.is_floating_point()]
    for p in trainable:
        p.requires_grad_(True)
    optimiser = Adam(trainable, lr=config.finetune_lr)
    rows = [model.tokenizer.encode(t) for t in texts]
    length = config.prompt_tokens + config.continuation
    windows = torch.tensor([r[:length] for r in rows if len(r) >= length], dtype=torch.long, device=model.device)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(config.finetune_steps):
        batch = windows[torch.randint(len(windows), (min(32, len(windows)),), generator=generator).to(model.device)]
        logits = module(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return LanguageModel(module.requires_grad_(False).eval(), model.tokenizer, model.last_only)
