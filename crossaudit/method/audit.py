"""The audit: the five stages chained, symmetric in the two models, failing closed.

`run_audit` is the one audit the CLI and the calibration run, and the pipeline's steps and
gate run the same stages of the same implementation one component at a time (`steps`,
`gate`), so one pair of models gets one answer whichever way the audit is started. Which
implementation of the stages a pair gets (`stages.ParadigmAudit`) is decided here, once,
from the paradigm asked for and the audit data (`auditor_for`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from crossaudit import REPORT_SCHEMA_VERSION, __version__
from crossaudit.errors import AuditError
from crossaudit.method.image_audit import ImageAudit
from crossaudit.method.stages import (
    AuditConfig,
    AuditResult,
    ParadigmAudit,
    PreparedPair,
    Progress,
    StageClock,
    pair_alignment,
)
from crossaudit.method.text_audit import TextAudit
from crossaudit.method.verdict import (
    AuditReport,
    ModelReport,
    Provenance,
    Thresholds,
    check_paradigm,
    load_thresholds,
    overall,
    unfamiliar,
)
from crossaudit.modelio.data import is_text_data
from crossaudit.modelio.digest import artifact_digest, file_sha256, files_digest
from crossaudit.modelio.tokenizer import tokenizer_path
from crossaudit.paradigms import AUTO, LM

log = logging.getLogger(__name__)


def auditor_for(paradigm: str, data_path: str | Path | None = None) -> ParadigmAudit:
    """The stages' implementation for a paradigm: language models (asked for, or text
    audit data under `auto`) take the text audit; every image paradigm the image audit,
    which tells them apart from the models' outputs."""
    text = paradigm == LM or (paradigm == AUTO and data_path is not None and is_text_data(data_path))
    return TextAudit() if text else ImageAudit()


def _model_digest(path: Path) -> str | None:
    """What a model given as `path` is, by its bytes: a file's sha256 (with a tokenizer
    beside it, the digest over both, since the audit reads both), a directory's digest over
    its files; None for what is neither, or holds a link."""
    try:
        if path.is_dir():
            return artifact_digest(path)
        sidecar = tokenizer_path(path)
        return files_digest(path.parent, [path, sidecar]) if sidecar.is_file() else file_sha256(path)
    except (OSError, AuditError):
        return None


def _data_digest(path: Path) -> str | None:
    """The audit set's sha256; None when there is no such file."""
    return file_sha256(path) if path.is_file() else None


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
    """Audit both models, each with the other as witness. Any error reads as inconclusive.
    Without `thresholds`, the default profile of the pair's paradigm judges it."""
    config = config or AuditConfig()
    clock = StageClock(progress, config.limits.time_budget_s)
    uris = [suspect_uri, witness_uri]
    report = AuditReport(
        "inconclusive", [ModelReport(uri, "inconclusive") for uri in uris], None, None, clock.timings,
        __version__, seed, REPORT_SCHEMA_VERSION,
    )  # fmt: skip
    result = AuditResult(report)
    report.provenance = Provenance(data_path, _data_digest(Path(data_path)), [_model_digest(Path(uri)) for uri in uris])
    pair: PreparedPair | None = None
    try:
        auditor = auditor_for(config.paradigm, data_path)
        torch.manual_seed(seed)
        with clock.stage("load"):
            pair = auditor.prepare(uris, data_path, seed, device, config)
        report.paradigm = pair.paradigm
        thresholds = thresholds or load_thresholds(paradigm=pair.paradigm)
        check_paradigm(thresholds, pair.paradigm)
        report.provenance.judged_by(thresholds)
        result.data = pair.data
        report.models = list(pair.reports)
        report.clean_agreement = pair.agreement
        with clock.stage("features"):
            features = auditor.features(pair, config)
        with clock.stage("cka_alignment"):
            result.alignment = pair_alignment(features, config)
        report.alignment = result.alignment.summary()
        with clock.stage("trigger_inversion"):
            found = auditor.triggers(pair, result.alignment, config, seed)
        with clock.stage("sensitivity_test"):
            measured = auditor.measure(pair, result.alignment, found, config, seed)
        for loaded, checks in zip(pair.reports, pair.parity_checks(), strict=True):
            loaded.parity_checks = checks
        with clock.stage("verdict"):
            report.models = auditor.judge(pair.reports, measured, thresholds, result.alignment, pair.data)
            report.calibration_warning = unfamiliar(
                thresholds, report.models, result.alignment.similarity,
                pair.data.input_shape if pair.data else None, pair.data.num_classes if pair.data else None,
            )  # fmt: skip
        result.triggers, result.screens = auditor.recovered(found)
    except AuditError as exc:
        report.error = str(exc)
        log.info("audit inconclusive: %s", exc)
    except (RuntimeError, ValueError, IndexError, KeyError, TypeError, ArithmeticError, AttributeError) as exc:
        report.error = f"{type(exc).__name__} during the audit: {exc}"
        log.exception("audit failed")
    if pair is not None and report.error is not None:
        for model_report, checks in zip(report.models, pair.parity_checks(), strict=True):
            model_report.parity_checks = checks
    report.verdict = overall(report.models)
    return result
