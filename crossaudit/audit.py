"""The audit: the five stages chained, symmetric in the two models, failing closed.

This is the one audit function that the CLI, the pipeline components and the receiver
run, so one pair of models gets one answer whichever way the audit is started.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from crossaudit import REPORT_SCHEMA_VERSION, __version__
from crossaudit.cka import Alignment, align_layers
from crossaudit.data import AuditData, read_audit_data
from crossaudit.errors import AuditError, IncomparableModelsError
from crossaudit.features import candidate_taps, extract_features
from crossaudit.inversion import InversionConfig, Models, Trigger, cross_invert
from crossaudit.models import LoadedModel, load_model, logits_of, parity_check
from crossaudit.sensitivity import (
    AttackEffect,
    SensitivityConfig,
    attack_effect,
    fine_tuned_copy,
)
from crossaudit.verdict import (
    AuditReport,
    Finding,
    ModelReport,
    Thresholds,
    judge,
    load_thresholds,
    overall,
)

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class AuditConfig:
    inversion: InversionConfig = field(default_factory=InversionConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    use_sensitivity: bool = True
    holdout_fraction: float = 0.5
    feature_samples: int = 500
    min_accuracy: float = 0.5
    min_agreement: float = 0.6
    min_cka: float = 0.2


@dataclass
class AuditResult:
    """The report plus the recovered triggers and the CKA matrix, for pictures."""

    report: AuditReport
    alignment: Alignment | None = None
    triggers: dict[int, list[Trigger]] = field(default_factory=dict)
    data: AuditData | None = None


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
    triggers: list[list[Trigger]],
    inversion_set: tuple[Tensor, Tensor],
    held_out: tuple[Tensor, Tensor],
    config: AuditConfig,
    seed: int,
) -> list[list[Finding]]:
    """Stage 4 and the findings: held-out effect before and after fine-tuning each suspect,
    paired with the peer's trigger for the same family and target."""
    effects: list[dict[tuple[str, int], tuple[Trigger, AttackEffect, AttackEffect]]] = []
    for models, found in zip(directions, triggers, strict=True):
        tuned = (
            fine_tuned_copy(models.suspect, *inversion_set, config.sensitivity, seed)
            if config.use_sensitivity
            else models.suspect
        )
        effects.append(
            {
                (t.family_name, t.target): (
                    t,
                    attack_effect(t, models.suspect, models.witness, *held_out),
                    attack_effect(t, tuned, models.witness, *held_out),
                )
                for t in found
            }
        )
    findings: list[list[Finding]] = []
    for index, mine in enumerate(effects):
        peer = effects[1 - index]
        findings.append([])
        for key, (trigger, before, after) in mine.items():
            peer_trigger, peer_before, peer_after = peer[key]
            findings[-1].append(
                Finding(
                    family=trigger.family_name,
                    target=trigger.target,
                    mask_l1=trigger.mask_l1,
                    footprint=trigger.footprint,
                    asr=before.suspect_flip,
                    witness_flip=before.witness_flip,
                    witness_kept=before.witness_kept,
                    asr_after_finetune=after.suspect_flip,
                    peer_footprint=peer_trigger.footprint,
                    peer_effective_asr=min(peer_before.suspect_flip, peer_after.suspect_flip)
                    * peer_before.witness_kept,
                )
            )
    return findings


class _Clock:
    def __init__(self, progress: Progress) -> None:
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(f"{name}...")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)


def _load_checked(uri: str, data: AuditData, device: str) -> tuple[LoadedModel, float | None]:
    model = load_model(uri)
    diff = parity_check(model, data.x, device)
    model.module.to(device).requires_grad_(False).eval()
    return model, diff


def run_audit(
    suspect_uri: str,
    witness_uri: str,
    data_path: str,
    seed: int = 0,
    device: str = "cpu",
    config: AuditConfig | None = None,
    thresholds: Thresholds | None = None,
    progress: Progress = lambda message: None,
) -> AuditResult:
    """Audit both models, each with the other as witness. Any error reads as inconclusive."""
    config = config or AuditConfig()
    clock = _Clock(progress)
    uris = [suspect_uri, witness_uri]
    reports = [ModelReport(uri, "inconclusive") for uri in uris]
    result = AuditResult(
        AuditReport(
            "inconclusive", reports, None, None, clock.timings, __version__, seed,
            REPORT_SCHEMA_VERSION,
        )
    )  # fmt: skip
    try:
        thresholds = thresholds or load_thresholds()
        torch.manual_seed(seed)
        with clock.stage("load"):
            data = read_audit_data(data_path)
            result.data = data
            loaded = [_load_checked(uri, data, device) for uri in uris]
        for report, (_, diff) in zip(reports, loaded, strict=True):
            report.parity_max_abs_diff = diff
        modules = [model.module for model, _ in loaded]
        _run_stages(modules, data, seed, device, config, thresholds, clock, result)
    except AuditError as exc:
        result.report.error = str(exc)
        log.info("audit inconclusive: %s", exc)
    except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as exc:
        result.report.error = f"{type(exc).__name__} during the audit: {exc}"
        log.exception("audit failed")
    result.report.verdict = overall(result.report.models)
    return result


def _run_stages(
    modules: list[nn.Module],
    data: AuditData,
    seed: int,
    device: str,
    config: AuditConfig,
    thresholds: Thresholds,
    clock: _Clock,
    result: AuditResult,
) -> None:
    reports = result.report.models
    predictions = [logits_of(m, data.x, device) for m in modules]
    for report, logits in zip(reports, predictions, strict=True):
        if logits.ndim != 2 or logits.shape[1] < data.num_classes:
            raise IncomparableModelsError(
                f"{report.uri}: expected logits N x K with K >= {data.num_classes} classes in "
                f"the audit data, got {logits.shape}"
            )
        report.clean_accuracy = round(float(np.mean(logits.argmax(1) == data.y)), 4)
    labels = [p.argmax(1) for p in predictions]
    agreement = float(np.mean(labels[0] == labels[1]))
    result.report.clean_agreement = round(agreement, 4)
    weakest = min(r.clean_accuracy or 0.0 for r in reports)
    if weakest < config.min_accuracy or agreement < config.min_agreement:
        raise IncomparableModelsError(
            f"models too different on clean data to cross-examine: accuracy {weakest:.2f} "
            f"(need {config.min_accuracy}), agreement {agreement:.2f} (need {config.min_agreement})"
        )
    both_right = (labels[0] == data.y) & (labels[1] == data.y)
    inversion_idx, held_idx = _split(data.y, config.holdout_fraction, seed)
    inversion_idx = inversion_idx[both_right[inversion_idx]]
    held_idx = held_idx[both_right[held_idx]]

    def tensors(index: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(data.x[index]).to(device), torch.from_numpy(data.y[index]).to(device)

    with clock.stage("features"):
        sample = inversion_idx[: config.feature_samples]
        features = [extract_features(m, data.x[sample], candidate_taps(m), device) for m in modules]
    with clock.stage("cka_alignment"):
        alignment = align_layers(*features)
    result.alignment = alignment
    result.report.alignment = {
        "suspect_layer": alignment.suspect_tap,
        "witness_layer": alignment.witness_tap,
        "cka": round(alignment.cka, 4),
    }
    if alignment.cka < config.min_cka:
        raise IncomparableModelsError(f"no layer pair aligns: best CKA {alignment.cka:.3f} < {config.min_cka}")
    directions = [
        Models(modules[0], modules[1], alignment.suspect_tap, alignment.witness_tap),
        Models(modules[1], modules[0], alignment.witness_tap, alignment.suspect_tap),
    ]
    inversion_set, held_out = tensors(inversion_idx), tensors(held_idx)
    with clock.stage("trigger_inversion"):
        triggers = cross_invert(directions, *inversion_set, data.num_classes, config.inversion, seed)
    with clock.stage("sensitivity_test"):
        findings = measure(directions, triggers, inversion_set, held_out, config, seed)
    with clock.stage("verdict"):
        for index, report in enumerate(reports):
            judged = judge(report.uri, findings[index], thresholds)
            judged.clean_accuracy = report.clean_accuracy
            judged.parity_max_abs_diff = report.parity_max_abs_diff
            reports[index] = judged
            result.triggers[index] = triggers[index]
