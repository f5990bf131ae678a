"""The audit's compute stages 1-4 as separate steps, one per pipeline component, joined by files.

Each step is the same library call `run_audit` makes in one process (`prepare_pair`,
`pair_features`, ...), with its inputs read from and its outputs written to folders
(see `artifacts`). A KFP component is a thin shell over one of these functions, so the
pipeline and the CLI give one pair one answer. A pair that cannot be audited (bad model,
parity failure at any stage, a witness that is the suspect itself, incomparable models)
is written down as an error and carried to the gate (`crossaudit.gate`), which makes it
`inconclusive`; anything else raises, the component fails, and the pipeline's exit
handler marks the version `error`.

This module imports neither MLflow nor matplotlib: every component process pays for its
imports, and those two were most of the pipeline's start-up beyond the audit itself.
"""

from __future__ import annotations

import logging
from pathlib import Path

from crossaudit.artifacts import (
    PairRecord,
    carry,
    only_entry,
    read_alignment,
    read_features,
    read_pair,
    read_text_triggers,
    read_triggers,
    write_alignment,
    write_features,
    write_findings,
    write_pair,
    write_text_effects,
    write_text_triggers,
    write_triggers,
)
from crossaudit.audit import (
    Pair,
    pair_features,
    pair_findings,
    pair_triggers,
    prepare_pair,
)
from crossaudit.data import is_text_data
from crossaudit.digest import artifact_digest
from crossaudit.errors import AuditError, ParityError
from crossaudit.paradigms import AUTO, LM
from crossaudit.paradigms.autoregressive import TextSearchConfig
from crossaudit.stages import AuditConfig, pair_alignment
from crossaudit.text_audit import TextPair, prepare_text_pair, text_effects, text_features, text_triggers
from crossaudit.verdict import ModelReport

log = logging.getLogger(__name__)


def _pair(record: PairRecord, suspect: Path, witness: Path, data: Path, device: str) -> Pair:
    """The pair rebuilt from the fetched folders, reported under the URIs it came from."""
    entries = [str(only_entry(folder)) for folder in (suspect, witness, data)]
    config = AuditConfig(paradigm=record.paradigm)
    pair = prepare_pair(entries[:2], entries[2], record.seed, device, config, record.checked())
    _as_recorded(record, pair.reports)
    return pair


def _as_recorded(record: PairRecord, reports: list[ModelReport]) -> None:
    """Report the rebuilt models under the URIs they came from. A later stage must audit
    the bytes stage 1 checked: a model artifact changed between stages fails the step
    (and the exit handler marks the version `error`)."""
    found = [r.sha256 for r in reports]
    if record.model_sha256 is not None and found != record.model_sha256:
        raise AuditError(f"the models changed between stages: sha256 {found} where stage 1 saw {record.model_sha256}")
    for report, uri in zip(reports, record.uris, strict=True):
        report.uri = uri


def _text_pair(record: PairRecord, suspect: Path, witness: Path, data: Path, device: str) -> TextPair:
    """The language-model pair rebuilt from the fetched folders (each model directory
    holds its `tokenizer.json`), reported under the URIs it came from."""
    entries = [str(only_entry(folder)) for folder in (suspect, witness, data)]
    pair = prepare_text_pair(
        entries[:2], entries[2], record.seed, device, AuditConfig(paradigm=LM), TextSearchConfig(), record.checked()
    )
    _as_recorded(record, pair.reports)
    return pair


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
        pair: Pair | TextPair
        if paradigm == LM or (paradigm == AUTO and is_text_data(only_entry(data))):
            record.paradigm = LM
            pair = _text_pair(record, suspect, witness, data, device)
            features = text_features(pair, AuditConfig())
        else:
            pair = _pair(record, suspect, witness, data, device)
            record.paradigm = pair.paradigm
            features = pair_features(pair, AuditConfig())
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


def _proved(record: PairRecord, pair: Pair | TextPair, out: Path) -> None:
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
        if record.paradigm == LM:
            text_pair = _text_pair(record, suspect, witness, data, device)
            found = text_triggers(text_pair, TextSearchConfig())
            write_text_triggers(found, out)
            _proved(record, text_pair, out)
            return len(found)
        pair = _pair(record, suspect, witness, data, device)
        triggers = pair_triggers(pair, read_alignment(out), AuditConfig(), record.seed).triggers
    except ParityError as exc:
        return _failed_parity(record, exc, out)
    write_triggers(triggers, tuple(pair.data.x.shape[1:]), pair.num_classes, out)
    _proved(record, pair, out)
    return sum(len(found) for found in triggers)


def sensitivity_step(triggers: Path, suspect: Path, witness: Path, data: Path, device: str, out: Path) -> int:
    """Stage 4. Returns how many findings were measured (under ONNX Runtime; 0 when a
    translation failed its parity check on the triggered held-out data)."""
    record = _resume(triggers, out)
    if record is None:
        return 0
    try:
        if record.paradigm == LM:
            text_pair = _text_pair(record, suspect, witness, data, device)
            effects = text_effects(text_pair, read_text_triggers(out), TextSearchConfig(), record.seed)
            write_text_effects(effects, out)
            _proved(record, text_pair, out)
            return len(effects)
        pair = _pair(record, suspect, witness, data, device)
        found = read_triggers(out, device)
        findings = pair_findings(pair, read_alignment(out), found, AuditConfig(), record.seed)
    except ParityError as exc:
        return _failed_parity(record, exc, out)
    write_findings(findings, out)
    _proved(record, pair, out)
    return sum(len(f) for f in findings)
