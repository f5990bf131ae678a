"""The audit's compute stages 1-4 as separate steps, one per pipeline component, joined by files.

Each step is the stage `run_audit` runs in one process, by the same implementation of the
pair's paradigm (`stages.ParadigmAudit`), with its inputs read from and its outputs
written to folders (see `artifacts`). A KFP component is a thin shell over one of these functions, so the
pipeline and the CLI give one pair one answer. A pair that cannot be audited (bad model,
parity failure at any stage, a witness that is the suspect itself, incomparable models)
is written down as an error and carried to the gate (`crossaudit.mlops.gate`), which makes it
`inconclusive`; anything else raises, the component fails, and the pipeline's exit
handler marks the version `error`.

This module imports neither MLflow nor matplotlib: every component process pays for its
imports, and those two were most of the pipeline's start-up beyond the audit itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from crossaudit.errors import AuditError, ParityError
from crossaudit.method.audit import auditor_for
from crossaudit.method.stages import AuditConfig, ParadigmAudit, PreparedPair, pair_alignment
from crossaudit.method.verdict import ModelReport
from crossaudit.mlops.artifacts import (
    PairRecord,
    carry,
    only_entry,
    read_alignment,
    read_features,
    read_pair,
    write_alignment,
    write_features,
    write_pair,
)
from crossaudit.modelio.digest import artifact_digest
from crossaudit.paradigms import AUTO

log = logging.getLogger(__name__)


def _rebuilt(
    record: PairRecord, suspect: Path, witness: Path, data: Path, device: str, paradigm: str | None = None
) -> tuple[ParadigmAudit, PreparedPair]:
    """The pair rebuilt from the fetched folders by its paradigm's audit (`paradigm` at
    stage 1, which resolves `auto`; the recorded one after), reported under the URIs it
    came from."""
    entries = [str(only_entry(folder)) for folder in (suspect, witness, data)]
    paradigm = paradigm or record.paradigm
    auditor = auditor_for(paradigm, entries[2])
    pair = auditor.prepare(
        entries[:2], entries[2], record.seed, device, AuditConfig(paradigm=paradigm), record.checked()
    )
    _as_recorded(record, pair.reports)
    return auditor, pair


def _as_recorded(record: PairRecord, reports: list[ModelReport]) -> None:
    """Report the rebuilt models under the URIs they came from. A later stage must audit
    the bytes stage 1 checked: a model artifact changed between stages fails the step
    (and the exit handler marks the version `error`)."""
    found = [r.sha256 for r in reports]
    if record.model_sha256 is not None and found != record.model_sha256:
        raise AuditError(f"the models changed between stages: sha256 {found} where stage 1 saw {record.model_sha256}")
    for report, uri in zip(reports, record.uris, strict=True):
        report.uri = uri


def _resume(upstream: Path, out: Path) -> PairRecord | None:
    """Start a stage from its upstream's files; None when the pair already carries an error."""
    carry(upstream, out)
    record = read_pair(out)
    return None if record.error else record


def extract_step(
    uris: list[str], suspect: Path, witness: Path, data: Path, seed: int, device: str, out: Path, paradigm: str = AUTO
) -> float | None:
    """Stage 1. Returns the clean agreement, or None when the pair cannot be audited.
    The paradigm it resolves (`auto` infers it) is the one every later stage uses."""
    record = PairRecord(uris, [None, None], [None, None], None, seed, paradigm=paradigm)
    try:
        record.artifact_sha256 = [artifact_digest(only_entry(folder)) for folder in (suspect, witness)]
        auditor, pair = _rebuilt(record, suspect, witness, data, device, paradigm)
        record.paradigm = pair.paradigm
        features = auditor.features(pair, AuditConfig())
        record.clean_accuracy = [r.clean_accuracy for r in pair.reports]
        record.parity_max_abs_diff = [r.parity_max_abs_diff for r in pair.reports]
        record.model_sha256 = [r.sha256 for r in pair.reports]
        record.clean_agreement = pair.agreement
        record.add_parity_checks(pair.parity_checks())
        write_pair(record, out)
        write_features(features, out)
    except AuditError as exc:
        record.error = str(exc)
        write_pair(record, out)
    return record.clean_agreement


def alignment_step(features: Path, out: Path) -> float | None:
    """Stage 2. Returns the best CKA, or None when the pair carries an error."""
    record = _resume(features, out)
    if record is None:
        return None
    try:
        alignment = pair_alignment(read_features(features), AuditConfig())
    except AuditError as exc:
        record.error = str(exc)
        write_pair(record, out)
        return None
    write_alignment(alignment, out)
    return alignment.cka


def _proved(record: PairRecord, pair: PreparedPair, out: Path) -> None:
    """Record what this stage proved against ONNX Runtime."""
    record.add_parity_checks(pair.parity_checks())
    write_pair(record, out)


def _failed_parity(record: PairRecord, exc: ParityError, out: Path) -> int:
    """A translation that is not the deployed model beyond the audit set: carried to the
    gate as an error (inconclusive), as stage 1 carries one on the audit set."""
    record.error = str(exc)
    write_pair(record, out)
    return 0


def inversion_step(alignment: Path, suspect: Path, witness: Path, data: Path, device: str, out: Path) -> int:
    """Stage 3. Returns how many triggers were recovered (0 when a translation failed its
    parity check on the stamped candidates)."""
    record = _resume(alignment, out)
    if record is None:
        return 0
    try:
        auditor, pair = _rebuilt(record, suspect, witness, data, device)
        found = auditor.triggers(pair, read_alignment(out), AuditConfig(), record.seed)
    except ParityError as exc:
        return _failed_parity(record, exc, out)
    recovered = auditor.write_triggers(found, pair, out)
    _proved(record, pair, out)
    return recovered


def sensitivity_step(triggers: Path, suspect: Path, witness: Path, data: Path, device: str, out: Path) -> int:
    """Stage 4. Returns how many findings were measured (under ONNX Runtime; 0 when a
    translation failed its parity check on the triggered held-out data)."""
    record = _resume(triggers, out)
    if record is None:
        return 0
    try:
        auditor, pair = _rebuilt(record, suspect, witness, data, device)
        found = auditor.read_triggers(out, device)
        measured = auditor.measure(pair, read_alignment(out), found, AuditConfig(), record.seed)
    except ParityError as exc:
        return _failed_parity(record, exc, out)
    count = auditor.write_measured(measured, out)
    _proved(record, pair, out)
    return count
