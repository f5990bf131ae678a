"""Stage 5: judge every peer's audit of a registered version, record it in MLflow, and
move the promotion alias.

Kept apart from `crossaudit.mlops.steps` so that only the processes that talk to MLflow pay
for importing it (and matplotlib, for the report).
"""

from __future__ import annotations

import json
from pathlib import Path

from crossaudit import REPORT_SCHEMA_VERSION, __version__
from crossaudit.limits import Limits
from crossaudit.method.audit import auditor_for
from crossaudit.method.stages import AuditResult
from crossaudit.method.verdict import AuditReport, ModelReport, Provenance, load_thresholds, overall, unfamiliar
from crossaudit.mlops import attestation, promotion, registry
from crossaudit.mlops.artifacts import (
    only_entry,
    read_alignment,
    read_pair,
)
from crossaudit.modelio.data import AuditData
from crossaudit.modelio.digest import file_sha256
from crossaudit.paradigms import AUTO
from crossaudit.report.html import write_outputs


def pair_result(
    folder: Path, data: AuditData | None, profile: str, thresholds_file: Path | None = None,
    audit_set: tuple[str, str] = ("", ""),
) -> AuditResult:  # fmt: skip
    """Stage 5 for one pair: judge its findings (with the named profile, or the default
    of the pair's paradigm when `profile` is empty; from `thresholds_file` when the
    registered model has its own) and rebuild the full audit result. `audit_set` names
    the audit set the branches fetched and its sha256, for the report's provenance."""
    record = read_pair(folder)
    reports = [
        ModelReport(
            uri, "inconclusive", clean_accuracy=acc, parity_max_abs_diff=diff, sha256=digest, parity_checks=checks
        )
        for uri, acc, diff, digest, checks in zip(
            record.uris,
            record.clean_accuracy,
            record.parity_max_abs_diff,
            record.model_sha256 or [None, None],
            record.parity_checks or [None, None],
            strict=True,
        )
    ]
    report = AuditReport(
        "inconclusive", reports, None, record.clean_agreement, {}, __version__, record.seed, REPORT_SCHEMA_VERSION,
        record.error, None if record.paradigm == AUTO else record.paradigm,
    )  # fmt: skip
    result = AuditResult(report)
    report.provenance = Provenance(*audit_set, list(record.artifact_sha256 or [None, None]))
    if record.error is None:
        auditor = auditor_for(record.paradigm)
        thresholds = load_thresholds(profile or None, record.paradigm, thresholds_file)
        report.provenance.judged_by(thresholds)
        result.alignment = read_alignment(folder)
        report.alignment = result.alignment.summary()
        report.models = auditor.judge(reports, auditor.read_measured(folder), thresholds, result.alignment, data)
        if data is not None:
            result.data = data
            result.triggers, _ = auditor.recovered(auditor.read_triggers(folder, "cpu"))
        report.calibration_warning = unfamiliar(  # a language model's audit set is text: data is None
            thresholds, report.models, result.alignment.similarity,
            data.input_shape if data else None, data.num_classes if data else None,
        )  # fmt: skip
    report.verdict = overall(report.models)
    return result


def version_status(results: list[AuditResult], hold_on_flagged_peer: bool) -> tuple[str, str]:
    """The status, and why a clean version was held. The audited version is model 0 of
    every pair: found in any pair -> failed; any pair that could not tell -> inconclusive;
    passed only when every peer's audit says clean.

    With `hold_on_flagged_peer`, a version whose peer the same audit judged backdoored is
    inconclusive instead of passed: the audit cannot always tell which of two models holds
    the backdoor (in the detection benchmark it once flagged a clean CNN and passed its
    backdoored peer), so a pass resting on a flagged peer's word is held for another
    provider or a person. Off by default: it also holds every clean model whose only peer
    is backdoored."""
    verdicts = [r.report.models[0].verdict for r in results]
    if not verdicts:
        return "error", ""
    if "backdoor" in verdicts:
        return "failed", ""
    if any(v != "clean" for v in verdicts) or any(r.report.error for r in results):
        return "inconclusive", ""
    flagged = [r.report.models[1].uri for r in results if r.report.models[1].verdict == "backdoor"]
    if hold_on_flagged_peer and flagged:
        return "inconclusive", f"held: peer {', '.join(flagged)} was judged backdoored (hold_on_flagged_peer)"
    return "passed", ""


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
                  "cka": result.alignment.cka if result.alignment else None,
                  "similarity": result.alignment.similarity if result.alignment else None}  # fmt: skip
        metrics.update({f"peer_{index}.{k}": float(v) for k, v in values.items() if v is not None})
    return metrics


def audited_digest(pair_folders: list[Path]) -> str:
    """The digest of the version's whole model artifact as every pair fetched and audited
    it (`digest.artifact_digest`): what a verdict is signed for. Pairs that disagree (the
    model changed between branches) or a model never fetched give no digest, and no pass."""
    digests = {(read_pair(folder).artifact_sha256 or [None])[0] for folder in pair_folders}
    return digests.pop() if len(digests) == 1 and None not in digests else ""


def gate_step(
    model_uri: str,
    tracking_uri: str,
    data_folder: Path,
    pair_folders: list[Path],
    alias: str,
    profile: str,
    thresholds_uri: str,
    thresholds_sha256: str,
    hold_on_flagged_peer: bool,
    out: Path,
) -> str:
    """Stage 5: judge every peer's audit of the version, record it in MLflow as one run,
    sign the verdict for the audited bytes, tag the version, and move the promotion alias
    only when it passed; a version that holds the alias and no longer passes loses it.
    Returns the status.

    The signing key (CROSSAUDIT_SIGNING_KEY_FILE) is read first: without it no verdict
    can be given, and the step fails (the exit handler then marks the version `error`).
    `data_folder` is the audit set as stage 1 fetched it (not fetched again: the gate
    draws the triggers and names the captions of the data the branches audited). A
    `thresholds_uri` (the registered model's own calibration, pinned by
    `thresholds_sha256` in the operator's configuration) is fetched into `out`, so the
    audit run keeps the thresholds it was judged by. `hold_on_flagged_peer` holds a clean
    version whose peer was flagged (`version_status`); the description says why."""
    key = attestation.signing_key()
    mlflow_client = registry.client(tracking_uri)
    version = registry.resolve(mlflow_client, model_uri)
    ref = registry.VersionRef.of(version)
    fetched = only_entry(data_folder)
    limits = Limits.from_env()
    # Every pair audited the version against one audit set, so the first says how to read it.
    data = auditor_for(read_pair(pair_folders[0]).paradigm, fetched).read_data(fetched, limits)
    thresholds_file = (
        registry.fetch_pinned(thresholds_uri, thresholds_sha256, out / "thresholds") if thresholds_uri else None
    )
    audit_set = (Path(fetched).name, file_sha256(Path(fetched)))
    results = [pair_result(folder, data, profile, thresholds_file, audit_set) for folder in pair_folders]
    for result in results:
        if result.report.provenance is not None:
            result.report.provenance.command = f"the crossaudit audit pipeline's gate, for {model_uri}"
    status, held = version_status(results, hold_on_flagged_peer)
    digest = audited_digest(pair_folders)
    if status == "passed" and not digest:
        status, held = "inconclusive", "held: the pairs did not audit one and the same model"
    for index, result in enumerate(results):
        write_outputs(result, out / f"peer_{index + 1}")
    peers = [r.report.models[1].uri for r in results]
    run_id = registry.record_run(mlflow_client, ref, _params(model_uri, peers, results), _metrics(results), out)
    scores = [r.report.models[0].score for r in results if r.report.models[0].score is not None]
    promotion.record_verdict(
        mlflow_client, ref, status, digest, run_id, key,
        **{
            registry.VERDICT: overall([r.report.models[0] for r in results]) if results else "inconclusive",
            registry.SCORE: f"{max(scores):.4f}" if scores else "",
            registry.RUN_ID: run_id,
            registry.AUDITED_AT: registry.now(),
            registry.PEERS: ",".join(peers),
        },
    )  # fmt: skip
    why = f" ({held})" if held else ""
    # A verdict on a task unlike the calibration's says so where the registry's users look.
    warnings = sorted({r.report.calibration_warning for r in results if r.report.calibration_warning})
    registry.append_description(
        mlflow_client, ref,
        f"**crossaudit: {status}**{why} ([audit run]({registry.run_link(mlflow_client, run_id)}))"
        + "".join(f" Warning: {warning}" for warning in warnings),
    )  # fmt: skip
    promoted = promotion.gate(mlflow_client, ref, key.public_key(), alias)
    if status != "passed":
        promotion.revoke(mlflow_client, ref, alias)
    (out / "gate.json").write_text(json.dumps({"status": status, "held": held, "promoted": promoted, "run_id": run_id}))
    return status
