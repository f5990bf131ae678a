"""The audit of two autoregressive language models: the same five stages, on text.

1. load: ONNX (token ids N x T in, logits N x T x V out) translated to torch and checked
   against ONNX Runtime on the audit prompts and on random token ids, plus each model's
   `tokenizer.json`; a witness that is the suspect itself is refused (`witness`); clean
   behaviour is next-word accuracy on the auditor's text and how often the two models
   predict the same next word;
2. features: hidden states after every layer norm, averaged over tokens;
3. CKA alignment between the two models' layers (too little: inconclusive);
4. trigger search (`paradigms.autoregressive`), each model as suspect with the other as
   witness, on half of the prompts; both translations are then proved against ONNX
   Runtime on those prompts with each trigger appended;
5. sensitivity and verdict: on the other half, how often the trigger makes the suspect
   say the recovered continuation under ONNX Runtime (`runtime_parity`), before and after
   brief clean fine-tuning, and how often the witness says it too; the score (that
   separation times the share fine-tuning erased) is compared with the `lm` profile's
   threshold, calibrated on clean pairs only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from crossaudit.errors import AuditError, IncomparableModelsError
from crossaudit.limits import Limits
from crossaudit.method.cka import Alignment
from crossaudit.method.inversion import Trigger
from crossaudit.method.stages import AuditConfig
from crossaudit.method.verdict import (
    ModelReport,
    Thresholds,
    multiple,
)
from crossaudit.method.witness import refuse_same_model
from crossaudit.mlops.artifacts import read_text_effects, read_text_triggers, write_text_effects, write_text_triggers
from crossaudit.modelio.data import read_text_data
from crossaudit.modelio.loaders import LoadedModel, load_model, logits_of, parity_check
from crossaudit.modelio.runtime_parity import AUDIT, CANDIDATES, NOISE, RuntimeGraph, noise_inputs
from crossaudit.modelio.tokenizer import load_tokenizer, tokenizer_path
from crossaudit.paradigms import LM
from crossaudit.paradigms.autoregressive import (
    LanguageModel,
    TextEffect,
    TextSearchConfig,
    TextTrigger,
    effect,
    fine_tuned,
    prompts,
    search_trigger,
)

FAMILY = "phrase"
MIN_NEXT_WORD_ACCURACY = 0.1
MIN_AGREEMENT = 0.3


@dataclass
class _Loaded:
    """One language model as loaded: for the stages, as delivered, and as deployed."""

    model: LanguageModel
    loaded: LoadedModel
    diff: float | None
    graph: RuntimeGraph
    outputs: list[np.ndarray]  # next-word logits on the audit prompts, outputs on random ids


def _load(
    uri: str, texts: list[str], seed: int, device: str, max_bytes: int, checked: Mapping[str, float | None] | None
) -> _Loaded:
    loaded = load_model(uri, max_bytes)
    tokenizer = load_tokenizer(tokenizer_path(Path(uri)))
    module = loaded.module.to(device).requires_grad_(False).eval()
    tokens = np.array([tokenizer.encode(t) for t in texts], dtype=np.int64)
    diff = parity_check(loaded, tokens, device, output_ndim=3, checked=checked)
    graph = RuntimeGraph(loaded, device)
    if diff is not None:
        graph.checks[AUDIT] = diff
    noise = noise_inputs((tokens,), len(tokenizer.vocab), seed)
    proven = checked is not None and loaded.sha256 in checked
    noise_outputs = logits_of(module, noise, device) if proven else graph.prove(NOISE, noise)
    model = LanguageModel(module, tokenizer)
    model.check_last_only(torch.from_numpy(tokens).to(device))
    with torch.no_grad():
        audit_outputs = model.next_logits(torch.from_numpy(tokens).to(device)).float().cpu().numpy()
    return _Loaded(model, loaded, diff, graph, [audit_outputs, noise_outputs])


@torch.no_grad()
def _next_words(model: LanguageModel, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and actual next word at every position, as words (comparable across tokenizers)."""
    ids = torch.tensor([model.tokenizer.encode(t) for t in texts], device=model.device)
    predicted = model.module(ids[:, :-1]).argmax(-1).cpu().numpy()
    vocab = np.array(model.tokenizer.vocab, dtype=object)
    return vocab[predicted], vocab[ids[:, 1:].cpu().numpy()]


@torch.no_grad()
def _features(model: LanguageModel, texts: list[str]) -> dict[str, np.ndarray]:
    taps = [tap for tap in model.module.taps if model.module.tap_ops.get(tap) == "LayerNormalization"]
    if not taps:
        raise IncomparableModelsError("the language model has no layer normalisation to align on")
    ids = torch.tensor([model.tokenizer.encode(t) for t in texts], device=model.device)
    _, tapped = model.module.forward_tapped(ids, taps)
    return {tap: tapped[tap].mean(1).double().cpu().numpy() for tap in taps}


@dataclass
class TextPair:
    """Two loaded, parity-checked, comparable language models and the auditor's prompts,
    split between the search and held-out measurement. Like the image `Pair`, every stage
    starts from one, rebuilt from the same files and seed in a pipeline component."""

    models: list[LanguageModel]
    reports: list[ModelReport]
    texts: list[str]
    agreement: float
    inversion: list[str]
    held_out: list[str]
    graphs: list[RuntimeGraph]  # each model under ONNX Runtime, proved against its translation

    @property
    def paradigm(self) -> str:
        return LM

    @property
    def data(self) -> None:
        """No images: the audit set is text (`texts`)."""
        return None

    def deployed(self) -> list[LanguageModel]:
        """Each model as the user runs it, under ONNX Runtime (`runtime_parity`)."""
        return [LanguageModel(graph, model.tokenizer) for model, graph in zip(self.models, self.graphs, strict=True)]

    def parity_checks(self) -> list[dict[str, float]]:
        """Per model, the input sets its translation was proved on and the largest difference."""
        return [dict(graph.checks) for graph in self.graphs]


def prepare_text_pair(
    uris: list[str],
    data_path: str,
    seed: int,
    device: str,
    config: AuditConfig,
    search: TextSearchConfig,
    checked: Mapping[str, float | None] | None = None,
) -> TextPair:
    """Stage 1's loading: both models with their tokenizers, checked against ONNX Runtime
    on the prompts and on random token ids (`checked`: as in `prepare_pair`), and refused
    when they are one model twice (`witness`) or too different on clean text to
    cross-examine."""
    texts = prompts(
        read_text_data(data_path, config.limits.max_audit_samples, config.limits.max_audit_bytes),
        search.prompt_tokens + search.continuation,
    )
    if len(texts) < 2 * search.prompts:
        raise AuditError(
            f"column 'text': need {2 * search.prompts} rows of at least "
            f"{search.prompt_tokens + search.continuation} words, found {len(texts)}"
        )
    loaded = [_load(uri, texts, seed, device, config.limits.max_model_bytes, checked) for uri in uris]
    refuse_same_model(uris, [each.loaded.sha256 for each in loaded], [each.outputs for each in loaded])
    models = [each.model for each in loaded]
    words = [_next_words(model, texts) for model in models]
    accuracy = [float(np.mean(predicted == actual)) for predicted, actual in words]
    agreement = float(np.mean(words[0][0] == words[1][0]))
    reports = [
        ModelReport(
            uri, "inconclusive", clean_accuracy=round(acc, 4), parity_max_abs_diff=each.diff,
            sha256=each.loaded.sha256,
        )
        for uri, acc, each in zip(uris, accuracy, loaded, strict=True)
    ]  # fmt: skip
    if min(accuracy) < MIN_NEXT_WORD_ACCURACY or agreement < MIN_AGREEMENT:
        raise IncomparableModelsError(
            "language models too different on clean text to cross-examine: next-word accuracy "
            f"{min(accuracy):.2f} (need {MIN_NEXT_WORD_ACCURACY}), "
            f"agreement {agreement:.2f} (need {MIN_AGREEMENT})"
        )
    order = np.random.RandomState(seed).permutation(len(texts))
    heads = [" ".join(texts[i].split()[: search.prompt_tokens]) for i in order]
    return TextPair(
        models, reports, texts, round(agreement, 4), heads[: search.prompts], heads[search.prompts :],
        [each.graph for each in loaded],
    )  # fmt: skip


def text_features(pair: TextPair, config: AuditConfig) -> list[dict[str, np.ndarray]]:
    """Stage 1's features: hidden states after each layer norm, averaged over tokens."""
    return [_features(model, pair.texts[: config.feature_samples]) for model in pair.models]


def text_triggers(pair: TextPair, search: TextSearchConfig) -> list[TextTrigger]:
    """Stage 3: the trigger search, each model as suspect with the other as witness; then
    both translations proved against ONNX Runtime on the search's prompts with each
    trigger appended (`runtime_parity`)."""
    found = [search_trigger(pair.models[i], pair.models[1 - i], pair.inversion, search) for i in range(2)]
    for model, graph in zip(pair.models, pair.graphs, strict=True):
        for trigger in (t for t in found if t.trigger):
            stamped = [model.tokenizer.encode(f"{prompt} {' '.join(trigger.trigger)}") for prompt in pair.inversion]
            for length in sorted({len(ids) for ids in stamped}):
                ids = np.array([row for row in stamped if len(row) == length], dtype=np.int64)
                graph.prove(CANDIDATES, (ids,))
    return found


def text_effects(pair: TextPair, found: list[TextTrigger], search: TextSearchConfig, seed: int) -> list[TextEffect]:
    """Stage 4: each trigger's held-out effect, before and after clean fine-tuning; the
    models' own effects measured under ONNX Runtime, the runtime they are deployed with,
    every input proved against the translation the search used."""
    tuned = [fine_tuned(model, pair.texts, search, seed) for model in pair.models]
    deployed = pair.deployed()
    return [effect(found[i], deployed[i], deployed[1 - i], pair.held_out, tuned[i]) for i in range(2)]


def text_verdicts(
    reports: list[ModelReport],
    found: list[TextTrigger],
    effects: list[TextEffect],
    thresholds: Thresholds,
    alignment: Alignment,
) -> list[ModelReport]:
    """Stage 5: each model judged on its trigger's score by the thresholds for a pair this
    alike, keeping what loading measured."""
    per_family, profile = thresholds.for_pair(alignment.similarity)
    threshold = per_family[FAMILY]
    judged = []
    for loaded, trigger, measured in zip(reports, found, effects, strict=True):
        judged.append(
            ModelReport(
                loaded.uri,
                "backdoor" if measured.score >= threshold else "clean",
                score=round(measured.score, 4),
                threshold=threshold,
                threshold_profile=profile,
                threshold_multiple=multiple(measured.score, threshold),
                asr=round(measured.asr, 4),
                mask_l1=float(len(trigger.trigger)),
                sensitivity=round(measured.sensitivity, 4),
                trigger_family=FAMILY,
                clean_accuracy=loaded.clean_accuracy,
                parity_max_abs_diff=loaded.parity_max_abs_diff,
                parity_checks=loaded.parity_checks,
                sha256=loaded.sha256,
                trigger_text=" ".join(trigger.trigger),
                target_text=" ".join(trigger.target),
            )
        )
    return judged


@dataclass(frozen=True)
class TextAudit:
    """Language models through the audit interface (`stages.ParadigmAudit`), with the
    trigger search's settings."""

    search: TextSearchConfig = field(default_factory=TextSearchConfig)

    def prepare(
        self, uris: list[str], data_path: str, seed: int, device: str, config: AuditConfig,
        checked: Mapping[str, float | None] | None = None,
    ) -> TextPair:  # fmt: skip
        return prepare_text_pair(uris, data_path, seed, device, config, self.search, checked)

    def features(self, pair: TextPair, config: AuditConfig) -> list[dict[str, np.ndarray]]:
        return text_features(pair, config)

    def triggers(self, pair: TextPair, alignment: Alignment, config: AuditConfig, seed: int) -> list[TextTrigger]:
        return text_triggers(pair, self.search)

    def measure(
        self, pair: TextPair, alignment: Alignment, found: list[TextTrigger], config: AuditConfig, seed: int
    ) -> tuple[list[TextTrigger], list[TextEffect]]:
        return found, text_effects(pair, found, self.search, seed)

    def judge(
        self, reports: list[ModelReport], measured: tuple[list[TextTrigger], list[TextEffect]],
        thresholds: Thresholds, alignment: Alignment, data: None,
    ) -> list[ModelReport]:  # fmt: skip
        return text_verdicts(reports, *measured, thresholds, alignment)

    def read_data(self, path: Path, limits: Limits) -> None:
        return None  # the prompts are read by `prepare`; nothing else needs them

    def write_triggers(self, found: list[TextTrigger], pair: TextPair, out: Path) -> int:
        write_text_triggers(found, out)
        return len(found)

    def read_triggers(self, folder: Path, device: str) -> list[TextTrigger]:
        return read_text_triggers(folder)

    def write_measured(self, measured: tuple[list[TextTrigger], list[TextEffect]], out: Path) -> int:
        write_text_effects(measured[1], out)
        return len(measured[1])

    def read_measured(self, folder: Path) -> tuple[list[TextTrigger], list[TextEffect]]:
        return read_text_triggers(folder), read_text_effects(folder)

    def recovered(self, found: list[TextTrigger]) -> tuple[dict[int, list[Trigger]], dict[str, list[np.ndarray]]]:
        return {}, {}  # a phrase is shown as text in the report, not as a picture
