"""The audit of two autoregressive language models: the same five stages, on text.

1. load: ONNX (token ids N x T in, logits N x T x V out) translated to torch and checked
   against ONNX Runtime on the audit prompts, plus each model's `tokenizer.json`; clean
   behaviour is next-word accuracy on the auditor's text and how often the two models
   predict the same next word;
2. features: hidden states after every layer norm, averaged over tokens;
3. CKA alignment between the two models' layers (too little: inconclusive);
4. trigger search (`paradigms.autoregressive`), each model as suspect with the other as
   witness, on half of the prompts;
5. sensitivity and verdict: on the other half, how often the trigger makes the suspect
   say the recovered continuation, before and after brief clean fine-tuning, and how often
   the witness says it too; the score is compared with the `lm` profile's threshold,
   calibrated on clean pairs only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crossaudit import REPORT_SCHEMA_VERSION, __version__
from crossaudit.audit import AuditConfig, AuditResult, Progress, StageClock
from crossaudit.cka import Alignment, align_layers
from crossaudit.data import read_text_data
from crossaudit.errors import AuditError, IncomparableModelsError
from crossaudit.models import load_model, parity_check
from crossaudit.paradigms.autoregressive import (
    LanguageModel,
    TextSearchConfig,
    effect,
    fine_tuned,
    prompts,
    search_trigger,
)
from crossaudit.tokenizer import load_tokenizer, tokenizer_path
from crossaudit.verdict import AuditReport, ModelReport, Thresholds, check_paradigm, load_thresholds, overall

FAMILY = "phrase"
MIN_NEXT_WORD_ACCURACY = 0.1
MIN_AGREEMENT = 0.3


def _load(uri: str, texts: list[str], device: str, max_bytes: int) -> tuple[LanguageModel, float | None]:
    loaded = load_model(uri, max_bytes)
    tokenizer = load_tokenizer(tokenizer_path(Path(uri)))
    module = loaded.module.to(device).requires_grad_(False).eval()
    tokens = np.array([tokenizer.encode(t) for t in texts], dtype=np.int64)
    return LanguageModel(module, tokenizer), parity_check(loaded, tokens, device, output_ndim=3)


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


def run_text_audit(
    suspect_uri: str,
    witness_uri: str,
    data_path: str,
    seed: int = 0,
    device: str = "cpu",
    config: AuditConfig | None = None,
    thresholds: Thresholds | None = None,
    progress: Progress = lambda message: None,
    search: TextSearchConfig | None = None,
) -> AuditResult:
    """Audit two language models, each with the other as witness; any error is inconclusive."""
    config = config or AuditConfig(paradigm="lm")
    search = search or TextSearchConfig()
    clock = StageClock(progress, config.limits.time_budget_s)
    uris = [suspect_uri, witness_uri]
    report = AuditReport(
        "inconclusive", [ModelReport(uri, "inconclusive") for uri in uris], None, None, clock.timings,
        __version__, seed, REPORT_SCHEMA_VERSION, paradigm="lm",
    )  # fmt: skip
    result = AuditResult(report)
    try:
        thresholds = thresholds or load_thresholds(paradigm="lm")
        check_paradigm(thresholds, "lm")
        torch.manual_seed(seed)
        with clock.stage("load"):
            texts = prompts(read_text_data(data_path, config.limits.max_audit_samples),
                            search.prompt_tokens + search.continuation)  # fmt: skip
            if len(texts) < 2 * search.prompts:
                raise AuditError(
                    f"column 'text': need {2 * search.prompts} rows of at least "
                    f"{search.prompt_tokens + search.continuation} words, found {len(texts)}"
                )
            loaded = [_load(uri, texts, device, config.limits.max_model_bytes) for uri in uris]
            models = [model for model, _ in loaded]
            words = [_next_words(model, texts) for model in models]
            accuracy = [float(np.mean(predicted == actual)) for predicted, actual in words]
            agreement = float(np.mean(words[0][0] == words[1][0]))
            for report_model, acc, (_, diff) in zip(report.models, accuracy, loaded, strict=True):
                report_model.clean_accuracy, report_model.parity_max_abs_diff = round(acc, 4), diff
            report.clean_agreement = round(agreement, 4)
            if min(accuracy) < MIN_NEXT_WORD_ACCURACY or agreement < MIN_AGREEMENT:
                raise IncomparableModelsError(
                    "language models too different on clean text to cross-examine: next-word accuracy "
                    f"{min(accuracy):.2f} (need {MIN_NEXT_WORD_ACCURACY}), "
                    f"agreement {agreement:.2f} (need {MIN_AGREEMENT})"
                )
        with clock.stage("features"):
            features = [_features(model, texts[: config.feature_samples]) for model in models]
        with clock.stage("cka_alignment"):
            alignment: Alignment = align_layers(*features)
            if alignment.cka < config.min_cka:
                raise IncomparableModelsError(f"no layer pair aligns: best CKA {alignment.cka:.3f} < {config.min_cka}")
        result.alignment = alignment
        report.alignment = alignment.summary()
        order = np.random.RandomState(seed).permutation(len(texts))
        heads = [" ".join(texts[i].split()[: search.prompt_tokens]) for i in order]
        inversion, held_out = heads[: search.prompts], heads[search.prompts :]
        with clock.stage("trigger_inversion"):
            found = [search_trigger(models[i], models[1 - i], inversion, search) for i in range(2)]
        with clock.stage("sensitivity_test"):
            tuned = [fine_tuned(model, texts, search, seed) for model in models]
            effects = [effect(found[i], models[i], models[1 - i], held_out, tuned[i]) for i in range(2)]
        with clock.stage("verdict"):
            threshold = thresholds.per_family[FAMILY]
            for report_model, trigger, measured in zip(report.models, found, effects, strict=True):
                backdoor = measured.score >= threshold
                report_model.verdict = "backdoor" if backdoor else "clean"
                report_model.score, report_model.threshold = round(measured.score, 4), threshold
                report_model.threshold_profile = thresholds.profile
                report_model.asr = round(measured.asr, 4)
                report_model.mask_l1 = float(len(trigger.trigger))
                report_model.sensitivity = round(measured.sensitivity, 4)
                report_model.trigger_family = FAMILY
                report_model.trigger_text = " ".join(trigger.trigger)
                report_model.target_text = " ".join(trigger.target)
    except AuditError as exc:
        report.error = str(exc)
    except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as exc:
        report.error = f"{type(exc).__name__} during the audit: {exc}"
    report.verdict = overall(report.models)
    return result
