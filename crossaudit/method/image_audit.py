"""The image paradigms' audit (supervised, semi-supervised, self-supervised encoders,
captioners): each model loaded and proved against ONNX Runtime, its output turned into
the loss a trigger is optimised against (`paradigms`), the trigger search of
`inversion`, the held-out measurement under ONNX Runtime, and the calibrated verdict.
`ImageAudit` is this paradigm family's side of the audit interface (`stages.ParadigmAudit`),
which `audit.run_audit`, the pipeline steps and the gate run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from crossaudit.errors import (
    DataValidationError,
    IncomparableModelsError,
)
from crossaudit.limits import Limits
from crossaudit.method.cka import Alignment
from crossaudit.method.features import candidate_taps, extract_features
from crossaudit.method.inversion import Examination, Models, Trigger, cross_invert, exhaustive
from crossaudit.method.parallel import pipelined
from crossaudit.method.sensitivity import (
    AttackEffect,
    attack_effect,
    fine_tuned_copy,
)
from crossaudit.method.stages import AuditConfig
from crossaudit.method.verdict import (
    Finding,
    ModelReport,
    Thresholds,
    judge,
)
from crossaudit.method.witness import refuse_same_model
from crossaudit.mlops.artifacts import read_findings, read_triggers, write_findings, write_triggers
from crossaudit.modelio.data import AuditData, read_audit_data
from crossaudit.modelio.loaders import LoadedModel, load_model, logits_of, parity_check
from crossaudit.modelio.log_probabilities import LogProbabilities, are_probabilities
from crossaudit.modelio.runtime_parity import (
    AUDIT,
    NOISE,
    GraphInputs,
    RuntimeGraph,
    deployed,
    noise_inputs,
    prove_on_triggers,
)
from crossaudit.modelio.tokenizer import load_tokenizer, tokenizer_path
from crossaudit.paradigms import AUTO, CAPTIONER, image_paradigm
from crossaudit.paradigms.captioning import CaptionScorer, caption_tokens
from crossaudit.paradigms.embedding import prototype_head

log = logging.getLogger(__name__)
# Success rates are measured on held-out samples that both models get right: with fewer
# than this many, one sample moves a rate by over 2 points and a clean verdict would rest
# on noise, so the audit is inconclusive instead (an audit set of roughly 120 or more).
MIN_HELD_OUT = 50
# A captioner's parity check runs on this many images (each with its true caption).
PARITY_SAMPLES = 256
# A trigger moves a captioner's whole caption through its decoder, and the search gets
# there more slowly: on a zoo captioner no target had any success after 30 steps of the
# blend and warp search, and the planted target led after 90 (a search budget; the captioner
# thresholds are calibrated on clean pairs with it).
CAPTIONER_SEARCH_STEPS = 90
# Paradigms whose models a short screen of each model alone cannot flip, searched in full
# (`inversion.exhaustive`); their profiles are calibrated with that search.
EXHAUSTIVE_PARADIGMS = ("semi", "ssl", CAPTIONER)


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split into inversion and held-out indices."""
    rng = np.random.RandomState(seed)
    inversion, held_out = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        cut = round(len(members) * (1 - fraction))
        inversion.append(members[:cut])
        held_out.append(members[cut:])
    return np.concatenate(inversion), np.concatenate(held_out)


def measure(
    directions: list[Models],
    as_deployed: list[nn.Module],
    triggers: list[list[Trigger]],
    inversion_set: tuple[Tensor, Tensor],
    held_out: tuple[Tensor, Tensor],
    config: AuditConfig,
    seed: int,
) -> list[list[Finding]]:
    """Stage 4 and the findings: held-out effect before and after fine-tuning each suspect,
    paired with the peer's trigger for the same family and target.

    `as_deployed[i]` is model i (the suspect of direction i) as the user runs it, under ONNX
    Runtime (`runtime_parity.deployed`): the attack success a finding reports is what the
    deployed model does, and every triggered held-out input is proved against the torch
    translation the search used (a ParityError otherwise). Only the fine-tuned copy, which
    exists in torch alone, runs in torch. Both suspects are fine-tuned side by side, and each
    trigger's effect is measured as soon as its suspect's copy is ready, on whichever core
    is free (`parallel.pipelined`); no measurement depends on another's result."""

    def effects(index: int, tuned: nn.Module) -> list[Callable[[], AttackEffect]]:
        suspect, witness = as_deployed[index], as_deployed[1 - index]
        return [partial(attack_effect, t, suspect, tuned, witness, *held_out) for t in triggers[index]]

    tuning = [partial(fine_tuned_copy, d.suspect, *inversion_set, config.sensitivity, seed) for d in directions]
    measured = pipelined(tuning, effects)
    effects_by_key = [
        {(t.family_name, t.target): (t, effect) for t, effect in zip(mine, found, strict=True)}
        for mine, found in zip(triggers, measured, strict=True)
    ]

    def effective(effect: AttackEffect) -> float:
        """Success the witness does not share."""
        return effect.suspect_flip * effect.witness_kept

    findings: list[list[Finding]] = []
    for index, mine in enumerate(effects_by_key):
        peer = effects_by_key[1 - index]
        findings.append([])
        for key, (trigger, effect) in mine.items():
            peer_trigger, peer_effect = peer[key]
            findings[-1].append(
                Finding(
                    family=trigger.family_name,
                    target=trigger.target,
                    mask_l1=trigger.mask_l1,
                    footprint=trigger.footprint,
                    asr=effect.suspect_flip,
                    witness_flip=effect.witness_flip,
                    witness_kept=effect.witness_kept,
                    asr_after_finetune=effect.suspect_flip_after_finetune,
                    effective_asr=effective(effect),
                    peer_footprint=peer_trigger.footprint,
                    peer_effective_asr=effective(peer_effect),
                    footprint_scale=trigger.scale,
                    peer_footprint_scale=peer_trigger.scale,
                )
            )
    return findings


@dataclass
class Pair:
    """Two loaded, parity-checked, comparable models and the audit data split between
    inversion and held-out samples (both models right on every kept sample).

    Every stage starts from a Pair: the pipeline components rebuild it in their own
    process from the same files and seed, and check that the models are the bytes
    stage 1 proved (`steps`).
    """

    modules: list[nn.Module]
    reports: list[ModelReport]
    data: AuditData
    agreement: float
    inversion_idx: np.ndarray
    held_idx: np.ndarray
    device: str
    paradigm: str
    num_classes: int  # targets to search: every class both models score, audited or not
    graphs: list[RuntimeGraph]  # each model under ONNX Runtime, proved against its translation
    feeds: list[GraphInputs]  # how audit images become each graph's inputs

    def tensors(self, index: np.ndarray) -> tuple[Tensor, Tensor]:
        return (
            torch.from_numpy(self.data.x[index]).to(self.device),
            torch.from_numpy(self.data.y[index]).to(self.device),
        )

    def directions(self, alignment: Alignment) -> list[Models]:
        """Each model as suspect, the other as its witness."""
        return [
            Models(self.modules[0], self.modules[1], alignment.suspect_tap, alignment.witness_tap),
            Models(self.modules[1], self.modules[0], alignment.witness_tap, alignment.suspect_tap),
        ]

    def deployed(self) -> list[nn.Module]:
        """Each scored model with ONNX Runtime in place of its translation (`runtime_parity`)."""
        return [deployed(module, graph) for module, graph in zip(self.modules, self.graphs, strict=True)]

    def parity_checks(self) -> list[dict[str, float]]:
        """Per model, the input sets its translation was proved on and the largest difference."""
        return [dict(graph.checks) for graph in self.graphs]


def _unlike_outputs(uris: list[str], paradigms: list[str], widths: list[int], classes: int) -> str:
    """Why two models read as different kinds, in terms of what each returned: under `auto`
    an output as wide as the audit set's classes (and mostly right) is a classifier's
    logits, any other width an encoder's embedding."""
    seen = "; ".join(
        f"{uri} returns {width} values per input ({'classifier logits' if kind != 'ssl' else 'read as an embedding'})"
        for uri, width, kind in zip(uris, widths, paradigms, strict=True)
    )
    return (
        f"the two models do not answer the same question: {seen}, for an audit set of {classes} classes. "
        "Two providers' models of one task must both be classifiers of its classes, or both encoders "
        "(--paradigm ssl); pass --paradigm when auto cannot tell"
    )


def prepare_pair(
    uris: list[str],
    data_path: str,
    seed: int,
    device: str,
    config: AuditConfig,
    checked: Mapping[str, float | None] | None = None,
) -> Pair:
    """Load both models, prove their torch view matches ONNX Runtime on the audit data and
    on random inputs (unless `checked` says an earlier stage proved these exact bytes:
    `parity_check`), give them the paradigm's scores, and refuse a pair that is one model
    twice (`witness`) or too different on clean data to cross-examine."""
    data = read_audit_data(data_path, config.limits.max_audit_samples, config.limits.max_audit_bytes)
    captioners = _captioner_audit(config.paradigm, data)
    modules, reports, labels, paradigms, widths = [], [], [], [], []
    graphs, feeds, outputs = [], [], []
    for uri in uris:
        model = load_model(uri, config.limits.max_model_bytes)
        model.module.to(device).requires_grad_(False).eval()
        if captioners:
            module, diff, feed = _captioner_scorer(model, data, device, checked)
            logits, paradigm = logits_of(module, data.x, device), CAPTIONER
        else:
            diff = parity_check(model, data.x, device, checked=checked)
            module, logits, paradigm = _scored(model.module, uri, data, config.paradigm, device)
            feed = GraphInputs()
        graph = RuntimeGraph(model, device)
        if diff is not None:
            graph.checks[AUDIT] = diff
        noise = noise_inputs(feed.of(data.x[:1], data.y[:1]), feed.vocab, seed)
        proven = checked is not None and model.sha256 in checked
        outputs.append([logits, logits_of(model.module, noise, device) if proven else graph.prove(NOISE, noise)])
        graphs.append(graph)
        feeds.append(feed)
        modules.append(module)
        paradigms.append(paradigm)
        reports.append(
            ModelReport(
                uri,
                "inconclusive",
                clean_accuracy=round(float(np.mean(logits.argmax(1) == data.y)), 4),
                parity_max_abs_diff=diff,
                sha256=model.sha256,
            )
        )
        labels.append(logits.argmax(1))
        widths.append(logits.shape[1])
    refuse_same_model(uris, [r.sha256 or "" for r in reports], outputs)
    if paradigms[0] != paradigms[1]:
        raw_widths = [int(noise_outputs.shape[-1]) for _, noise_outputs in outputs]
        raise IncomparableModelsError(_unlike_outputs(uris, paradigms, raw_widths, data.num_classes))
    agreement = float(np.mean(labels[0] == labels[1]))
    weakest = min(r.clean_accuracy or 0.0 for r in reports)
    if weakest < config.min_accuracy or agreement < config.min_agreement:
        raise IncomparableModelsError(
            f"models too different on clean data to cross-examine: accuracy {weakest:.2f} "
            f"(need {config.min_accuracy}), agreement {agreement:.2f} (need {config.min_agreement})"
        )
    both_right = (labels[0] == data.y) & (labels[1] == data.y)
    inversion_idx, held_idx = _split(data.y, config.holdout_fraction, seed)
    inversion_idx, held_idx = inversion_idx[both_right[inversion_idx]], held_idx[both_right[held_idx]]
    if len(held_idx) < MIN_HELD_OUT:
        raise DataValidationError(
            f"audit data too small: {len(held_idx)} held-out samples that both models classify correctly, "
            f"need {MIN_HELD_OUT} to measure a trigger's success (audit with hundreds of labelled samples)"
        )
    return Pair(
        modules, reports, data, round(agreement, 4), inversion_idx, held_idx, device, paradigms[0], min(widths),
        graphs, feeds,
    )  # fmt: skip


def _captioner_audit(requested: str, data: AuditData) -> bool:
    """Whether the pair is audited as captioners: asked for, or implied by a `caption` column."""
    if requested == CAPTIONER and data.captions is None:
        raise DataValidationError("a captioner audit needs audit data with 'image' and 'caption' columns")
    if data.captions is not None and requested not in (CAPTIONER, AUTO):
        raise DataValidationError(f"audit data with a 'caption' column is for captioners, not {requested!r} models")
    return data.captions is not None


def _captioner_scorer(
    model: LoadedModel, data: AuditData, device: str, checked: Mapping[str, float | None] | None
) -> tuple[nn.Module, float | None, GraphInputs]:
    """A captioner (ONNX plus its tokenizer) as a scorer of the audit set's captions, its
    translation checked against ONNX Runtime on images paired with their true captions
    (the inputs every later check feeds it too)."""
    tokenizer = load_tokenizer(tokenizer_path(Path(model.uri)))
    captions = list(data.captions or ())
    tokens, _ = caption_tokens(tokenizer, captions)
    sample = np.arange(min(len(data.x), PARITY_SAMPLES))
    diff = parity_check(model, (data.x[sample], tokens[data.y[sample]]), device, output_ndim=3, checked=checked)
    scorer = CaptionScorer(model.module, tokenizer, captions).to(device)
    scorer.check_broadcast(torch.from_numpy(data.x[:8]).to(device))
    return scorer, diff, GraphInputs(tokens, len(tokenizer.vocab))


def _scored(
    module: nn.Module, uri: str, data: AuditData, requested: str, device: str
) -> tuple[nn.Module, np.ndarray, str]:
    """The module the stages attack (an encoder gets its prototype head, a softmax
    classifier is read as log-probabilities), its class scores on the audit data, and its
    paradigm."""
    outputs = logits_of(module, data.x, device)
    if outputs.ndim != 2:
        raise IncomparableModelsError(f"{uri}: expected an output N x K, got {outputs.shape}")
    width = outputs.shape[1]
    scored = data.y < width  # the samples whose label this output could name
    accuracy = float(np.mean(outputs[scored].argmax(1) == data.y[scored])) if scored.any() else 0.0
    try:
        paradigm = image_paradigm(requested, width, data.num_classes, accuracy)
    except ValueError as exc:
        raise IncomparableModelsError(f"{uri}: {exc}") from exc
    if paradigm != "ssl" and width < data.num_classes:
        raise IncomparableModelsError(
            f"{uri}: expected logits N x K with K >= {data.num_classes} classes in the audit data, got {outputs.shape}"
        )
    if paradigm == "ssl":
        module = prototype_head(module, outputs, data.y, data.num_classes).to(device)
        return module, logits_of(module, data.x, device), paradigm
    if are_probabilities(outputs):  # every stage (and each pipeline stage's load) reads them as logits
        return LogProbabilities(module), LogProbabilities.of(torch.from_numpy(outputs)).numpy(), paradigm
    return module, outputs, paradigm


def pair_features(pair: Pair, config: AuditConfig) -> list[dict[str, np.ndarray]]:
    """Stage 1 on the pair: pooled clean features of both models at their candidate taps."""
    sample = pair.inversion_idx[: config.feature_samples]
    return [extract_features(m, pair.data.x[sample], candidate_taps(m), pair.device) for m in pair.modules]


def pair_triggers(pair: Pair, alignment: Alignment, config: AuditConfig, seed: int) -> Examination:
    """Stage 3: cross-examination in both directions, then both models' translations
    proved against ONNX Runtime on the audit images with every candidate stamped."""
    torch.manual_seed(seed)
    x, y = pair.tensors(pair.inversion_idx)
    inversion = config.inversion
    if pair.paradigm in EXHAUSTIVE_PARADIGMS:
        steps = CAPTIONER_SEARCH_STEPS if pair.paradigm == CAPTIONER else exhaustive(inversion).search_steps
        inversion = exhaustive(inversion, steps)
    found = cross_invert(pair.directions(alignment), x, y, pair.num_classes, inversion, seed)
    prove_on_triggers(pair.graphs, pair.feeds, found.triggers, pair.data.x, pair.data.y, seed)
    return found


def pair_findings(
    pair: Pair, alignment: Alignment, triggers: list[list[Trigger]], config: AuditConfig, seed: int
) -> list[list[Finding]]:
    """Stage 4: held-out effects before and after fine-tuning, paired with the peer's,
    measured under ONNX Runtime (`measure`)."""
    torch.manual_seed(seed)
    return measure(
        pair.directions(alignment), pair.deployed(), triggers, pair.tensors(pair.inversion_idx),
        pair.tensors(pair.held_idx), config, seed,
    )  # fmt: skip


def pair_verdicts(
    reports: list[ModelReport],
    findings: list[list[Finding]],
    thresholds: Thresholds,
    alignment: Alignment,
    captions: tuple[str, ...] | None = None,
) -> list[ModelReport]:
    """Stage 5: each model judged on its own findings by the thresholds for a pair this
    alike, keeping what loading measured; a captioner's target is also named by its caption."""
    judged = []
    for report, found in zip(reports, findings, strict=True):
        verdict = judge(report.uri, found, thresholds, alignment.similarity)
        verdict.clean_accuracy = report.clean_accuracy
        verdict.parity_max_abs_diff = report.parity_max_abs_diff
        verdict.parity_checks = report.parity_checks
        verdict.sha256 = report.sha256
        if captions is not None and verdict.target is not None:
            verdict.target_text = captions[verdict.target]
        judged.append(verdict)
    return judged


@dataclass(frozen=True)
class ImageAudit:
    """The image paradigms through the audit interface (`stages.ParadigmAudit`)."""

    def prepare(
        self, uris: list[str], data_path: str, seed: int, device: str, config: AuditConfig,
        checked: Mapping[str, float | None] | None = None,
    ) -> Pair:  # fmt: skip
        return prepare_pair(uris, data_path, seed, device, config, checked)

    def features(self, pair: Pair, config: AuditConfig) -> list[dict[str, np.ndarray]]:
        return pair_features(pair, config)

    def triggers(self, pair: Pair, alignment: Alignment, config: AuditConfig, seed: int) -> Examination:
        return pair_triggers(pair, alignment, config, seed)

    def measure(
        self, pair: Pair, alignment: Alignment, found: Examination, config: AuditConfig, seed: int
    ) -> list[list[Finding]]:
        return pair_findings(pair, alignment, found.triggers, config, seed)

    def judge(
        self, reports: list[ModelReport], measured: list[list[Finding]], thresholds: Thresholds,
        alignment: Alignment, data: AuditData | None,
    ) -> list[ModelReport]:  # fmt: skip
        return pair_verdicts(reports, measured, thresholds, alignment, data.captions if data else None)

    def read_data(self, path: Path, limits: Limits) -> AuditData:
        return read_audit_data(path, limits.max_audit_samples, limits.max_audit_bytes)

    def write_triggers(self, found: Examination, pair: Pair, out: Path) -> int:
        write_triggers(found.triggers, tuple(pair.data.x.shape[1:]), pair.num_classes, out)
        return sum(len(triggers) for triggers in found.triggers)

    def read_triggers(self, folder: Path, device: str) -> Examination:
        return Examination(read_triggers(folder, device), {})

    def write_measured(self, measured: list[list[Finding]], out: Path) -> int:
        write_findings(measured, out)
        return sum(len(findings) for findings in measured)

    def read_measured(self, folder: Path) -> list[list[Finding]]:
        return read_findings(folder)

    def recovered(self, found: Examination) -> tuple[dict[int, list[Trigger]], dict[str, list[np.ndarray]]]:
        return dict(enumerate(found.triggers)), found.screens
