"""The audit as separate steps, one per pipeline component, joined by files.

Each step is the same library call `run_audit` makes in one process (`prepare_pair`,
`pair_features`, ...), with its inputs read from and its outputs written to folders
(see `artifacts`). A KFP component is a thin shell over one of these functions, so the
pipeline and the CLI give one pair one answer. A pair that cannot be audited (bad model,
parity failure, incomparable models) is written down as an error and carried to the gate,
which makes it `inconclusive`; anything else raises, the component fails, and the
pipeline's exit handler marks the version `error`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from crossaudit import REPORT_SCHEMA_VERSION, __version__, registry
from crossaudit.artifacts import (
    PairRecord,
    carry,
    read_alignment,
    read_features,
    read_findings,
    read_pair,
    read_text_effects,
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
    AuditConfig,
    AuditResult,
    Pair,
    pair_alignment,
    pair_features,
    pair_findings,
    pair_triggers,
    pair_verdicts,
    prepare_pair,
)
from crossaudit.data import AuditData, is_text_data, read_audit_data
from crossaudit.errors import AuditError
from crossaudit.paradigms import AUTO, LM
from crossaudit.paradigms.autoregressive import TextSearchConfig
from crossaudit.report import write_outputs
from crossaudit.text_audit import TextPair, prepare_text_pair, text_effects, text_features, text_triggers, text_verdicts
from crossaudit.verdict import AuditReport, ModelReport, load_thresholds, overall

log = logging.getLogger(__name__)


def _pair(record: PairRecord, suspect: Path, witness: Path, data: Path, device: str) -> Pair:
    """The pair rebuilt from the fetched folders, reported under the URIs it came from."""
    entries = [str(_only_entry(folder)) for folder in (suspect, witness, data)]
    pair = prepare_pair(entries[:2], entries[2], record.seed, device, AuditConfig(paradigm=record.paradigm))
    for report, uri in zip(pair.reports, record.uris, strict=True):
        report.uri = uri
    return pair


def _text_pair(record: PairRecord, suspect: Path, witness: Path, data: Path, device: str) -> TextPair:
    """The language-model pair rebuilt from the fetched folders (each model directory
    holds its `tokenizer.json`), reported under the URIs it came from."""
    entries = [str(_only_entry(folder)) for folder in (suspect, witness, data)]
    pair = prepare_text_pair(entries[:2], entries[2], record.seed, device, AuditConfig(paradigm=LM), TextSearchConfig())
    for report, uri in zip(pair.reports, record.uris, strict=True):
        report.uri = uri
    return pair


def fetch_inputs(
    suspect_uri: str, witness_uri: str, data_uri: str, tracking_uri: str, suspect: Path, witness: Path, data: Path
) -> None:
    """Bring both models and the audit set out of MLflow (or the file system) as files.
    An empty `tracking_uri` keeps MLflow's own default (environment or local)."""
    if tracking_uri:
        registry.client(tracking_uri)
    for uri, dest in ((suspect_uri, suspect), (witness_uri, witness), (data_uri, data)):
        registry.materialize(uri, dest)


def _only_entry(folder: Path) -> Path:
    """The model or data file a `materialize` put into its folder."""
    entries = sorted(folder.iterdir())
    if len(entries) != 1:
        raise AuditError(f"{folder}: expected one model or data entry, found {len(entries)}")
    return entries[0]


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
        pair: Pair | TextPair
        if paradigm == LM or (paradigm == AUTO and is_text_data(_only_entry(data))):
            record.paradigm = LM
            pair = _text_pair(record, suspect, witness, data, device)
            features = text_features(pair, AuditConfig())
        else:
            pair = _pair(record, suspect, witness, data, device)
            record.paradigm = pair.paradigm
            features = pair_features(pair, AuditConfig())
        record.clean_accuracy = [r.clean_accuracy for r in pair.reports]
        record.parity_max_abs_diff = [r.parity_max_abs_diff for r in pair.reports]
        record.clean_agreement = pair.agreement
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


def inversion_step(alignment: Path, suspect: Path, witness: Path, data: Path, device: str, out: Path) -> int:
    """Stage 3. Returns how many triggers were recovered."""
    record = _resume(alignment, out)
    if record is None:
        return 0
    if record.paradigm == LM:
        found = text_triggers(_text_pair(record, suspect, witness, data, device), TextSearchConfig())
        write_text_triggers(found, out)
        return len(found)
    pair = _pair(record, suspect, witness, data, device)
    triggers = pair_triggers(pair, read_alignment(out), AuditConfig(), record.seed)
    write_triggers(triggers, tuple(pair.data.x.shape[1:]), out)
    return sum(len(found) for found in triggers)


def sensitivity_step(triggers: Path, suspect: Path, witness: Path, data: Path, device: str, out: Path) -> int:
    """Stage 4. Returns how many findings were measured."""
    record = _resume(triggers, out)
    if record is None:
        return 0
    if record.paradigm == LM:
        text_pair = _text_pair(record, suspect, witness, data, device)
        effects = text_effects(text_pair, read_text_triggers(out), TextSearchConfig(), record.seed)
        write_text_effects(effects, out)
        return len(effects)
    pair = _pair(record, suspect, witness, data, device)
    found = read_triggers(out, pair.data.num_classes, device)
    findings = pair_findings(pair, read_alignment(out), found, AuditConfig(), record.seed)
    write_findings(findings, out)
    return sum(len(f) for f in findings)


def pair_result(folder: Path, data: AuditData | None, profile: str) -> AuditResult:
    """Stage 5 for one pair: judge its findings (with the named profile, or the default
    of the pair's paradigm when `profile` is empty) and rebuild the full audit result."""
    record = read_pair(folder)
    reports = [
        ModelReport(uri, "inconclusive", clean_accuracy=acc, parity_max_abs_diff=diff)
        for uri, acc, diff in zip(record.uris, record.clean_accuracy, record.parity_max_abs_diff, strict=True)
    ]
    report = AuditReport(
        "inconclusive", reports, None, record.clean_agreement, {}, __version__, record.seed, REPORT_SCHEMA_VERSION,
        record.error, None if record.paradigm == AUTO else record.paradigm,
    )  # fmt: skip
    result = AuditResult(report)
    if record.error is None:
        thresholds = load_thresholds(profile or None, record.paradigm)
        result.alignment = read_alignment(folder)
        report.alignment = result.alignment.summary()
        if record.paradigm == LM:
            report.models = text_verdicts(reports, read_text_triggers(folder), read_text_effects(folder), thresholds)
        else:
            report.models = pair_verdicts(reports, read_findings(folder), thresholds, data.captions if data else None)
        if data is not None:
            result.data = data
            result.triggers = dict(enumerate(read_triggers(folder, data.num_classes)))
    report.verdict = overall(report.models)
    return result


def version_status(results: list[AuditResult]) -> str:
    """The audited version is model 0 of every pair: found in any pair -> failed; any pair
    that could not tell -> inconclusive; passed only when every peer's audit says clean."""
    verdicts = [r.report.models[0].verdict for r in results]
    if not verdicts:
        return "error"
    if "backdoor" in verdicts:
        return "failed"
    if any(v != "clean" for v in verdicts) or any(r.report.error for r in results):
        return "inconclusive"
    return "passed"


def _params(model_uri: str, peers: list[str], results: list[AuditResult]) -> dict[str, str]:
    seeds = {r.report.seed for r in results}
    return {"model_uri": model_uri, "peers": ",".join(peers), "seed": ",".join(map(str, sorted(seeds))),
            "crossaudit_version": __version__}  # fmt: skip


def _metrics(results: list[AuditResult]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for index, result in enumerate(results, start=1):
        model = result.report.models[0]
        values = {"score": model.score, "threshold": model.threshold, "asr": model.asr,
                  "clean_accuracy": model.clean_accuracy, "clean_agreement": result.report.clean_agreement,
                  "cka": result.alignment.cka if result.alignment else None}  # fmt: skip
        metrics.update({f"peer_{index}.{k}": float(v) for k, v in values.items() if v is not None})
    return metrics


def gate_step(
    model_uri: str, tracking_uri: str, data_uri: str, pair_folders: list[Path], alias: str, profile: str, out: Path
) -> str:
    """Stage 5: judge every peer's audit of the version, record it in MLflow as one run,
    tag the version, and move the promotion alias only when it passed; a version that
    holds the alias and no longer passes loses it. Returns the status."""
    mlflow_client = registry.client(tracking_uri)
    version = registry.resolve(mlflow_client, model_uri)
    ref = registry.VersionRef.of(version)
    with tempfile.TemporaryDirectory() as tmp:
        fetched = registry.materialize(data_uri, Path(tmp))
        data = None if is_text_data(fetched) else read_audit_data(fetched)
    results = [pair_result(folder, data, profile) for folder in pair_folders]
    status = version_status(results)
    for index, result in enumerate(results):
        write_outputs(result, out / f"peer_{index + 1}")
    peers = [r.report.models[1].uri for r in results]
    run_id = registry.record_run(mlflow_client, ref, _params(model_uri, peers, results), _metrics(results), out)
    scores = [r.report.models[0].score for r in results if r.report.models[0].score is not None]
    registry.set_status(
        mlflow_client, ref, status,
        **{
            registry.VERDICT: overall([r.report.models[0] for r in results]) if results else "inconclusive",
            registry.SCORE: f"{max(scores):.4f}" if scores else "",
            registry.RUN_ID: run_id,
            registry.AUDITED_AT: registry.now(),
            registry.PEERS: ",".join(peers),
        },
    )  # fmt: skip
    registry.append_description(
        mlflow_client, ref, f"**crossaudit: {status}** ([audit run]({registry.run_link(mlflow_client, run_id)}))"
    )
    promoted = registry.gate(mlflow_client, ref, alias)
    if status != "passed":
        registry.revoke(mlflow_client, ref, alias)
    (out / "gate.json").write_text(json.dumps({"status": status, "promoted": promoted, "run_id": run_id}))
    return status


def close_audit(model_uri: str, tracking_uri: str, state: str, message: str) -> str:
    """The pipeline's exit handler: a run that ended without the gate's final word marks
    the version `error` (fail closed: a missing result never reads as passed)."""
    mlflow_client = registry.client(tracking_uri)
    version = registry.resolve(mlflow_client, model_uri)
    status = registry.status_of(version)
    if state == "SUCCEEDED" and status in registry.FINAL:
        return status
    reason = message or f"audit pipeline ended {state} without a verdict"
    registry.set_status(
        mlflow_client, registry.VersionRef.of(version), "error",
        **{registry.ERROR: reason[:4000], registry.AUDITED_AT: registry.now()},
    )  # fmt: skip
    return "error"
