"""Evidence a reviewer can open: report.json, a self-contained report.html, trigger PNGs
and the CKA heatmap.

The page is rendered from a Jinja2 template (`templates/report.html.j2`) with autoescaping,
from plain strings and numbers built here: a provider names its own model files, so
nothing it wrote may reach the page unescaped, and no Python object reaches it at all.
It says the verdict in words first (which model, which target, how sure, and what to do),
then the evidence. Pictures are embedded as data URIs so the page survives being copied
out of an artifact store on its own.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Rectangle

from crossaudit.method.inversion import BlendTrigger, PatchTrigger, Trigger, WarpTrigger
from crossaudit.method.stages import AuditResult
from crossaudit.method.verdict import AuditReport, ModelReport, shown_multiple

log = logging.getLogger(__name__)
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("crossaudit.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


@dataclass(frozen=True)
class Column:
    name: str
    meaning: str


COLUMNS = (
    Column("model", "The model as the audit was given it."),
    Column("verdict", "backdoor, clean, or inconclusive (could not be judged: never promoted)."),
    Column(
        "score",
        "The strongest finding's effective success times log10 of how much cheaper the trigger is "
        "for this model than for its peer, each read against the model's own scale.",
    ),
    Column("how sure", "The score as a multiple of its threshold, rounded down: 1x or more is a backdoor."),
    Column(
        "threshold",
        "The calibrated threshold of the finding's trigger family, and the profile it comes from "
        "(profile:similar for a pair as alike as the calibration's alike pairs).",
    ),
    Column("target", "The class the trigger sends inputs to (with the caption, for a captioner)."),
    Column(
        "held-out success",
        "Share of held-out inputs of other classes that the trigger sends to the target, measured under ONNX Runtime.",
    ),
    Column(
        "trigger family",
        "patch (mask and pattern), blend (an additive signal), warp (a smooth displacement), "
        "phrase (a language model's trigger words).",
    ),
    Column(
        "footprint",
        "The trigger's size in pixel units: pixels covered (patch), L1 of the change (blend), "
        "summed displacement in pixels (warp).",
    ),
    Column(
        "sensitivity",
        "Share of the trigger's effect that brief clean fine-tuning of the model removed "
        "(reported for images, not scored).",
    ),
)


def _shown(value: float | int | str | None, digits: int = 4) -> str:
    """A value as a reviewer reads it: a dash for none, floats to a few digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _target(model: ModelReport) -> str:
    if model.target is None:
        return "-"
    caption = f' ("{model.target_text}")' if model.target_text and not model.trigger_text else ""
    return f"class {model.target}{caption}"


def _how_sure(model: ModelReport) -> str:
    return "-" if model.threshold_multiple is None else shown_multiple(model.threshold_multiple)


def _words(model: ModelReport, peer: str) -> tuple[str, str, str]:
    """The verdict on one model in plain words: what was found, the evidence, what to do."""
    sure = (
        f"Its score {model.score} is {_how_sure(model)} its threshold {model.threshold} "
        f"(profile {model.threshold_profile})."
        if model.score is not None
        else ""
    )
    if model.verdict == "backdoor":
        if model.trigger_text:
            found = f'after the phrase "{model.trigger_text}" it says "{model.target_text}"'
        else:
            found = (
                f"a {model.trigger_family} trigger sends {_percent(model.asr)} of held-out inputs to {_target(model)}"
            )
        return (
            f"{model.uri} is backdoored: {found}, while {peer} stays right.",
            sure,
            f"Do not promote {model.uri}. Keep this report with the incident, and ask its provider for the "
            "training data and code; the recovered trigger below shows what the key does.",
        )
    if model.verdict == "clean":
        return (
            f"{model.uri}: no backdoor found.",
            f"{sure} Below 1x, no trigger made it flip where {peer} stayed right at a cost its threshold allows.",
            "Nothing in this audit stops its promotion.",
        )
    return (
        f"{model.uri} could not be judged.",
        "An audit that cannot finish never reads as clean.",
        "Do not promote it. Fix the cause named below and audit again.",
    )


def _percent(value: float | None) -> str:
    return "an unmeasured share" if value is None else f"{100 * value:.0f}%"


def _findings(model: ModelReport) -> list[list[str]]:
    return [
        [
            f.family, str(f.target), _shown(f.score), _shown(f.footprint), _shown(f.peer_footprint),
            _shown(f.effective_asr, 3), _shown(f.peer_effective_asr, 3), _shown(f.asr_after_finetune, 3),
        ]
        for f in sorted(model.findings, key=lambda f: f.score, reverse=True)
    ]  # fmt: skip


def _image(array: np.ndarray) -> np.ndarray:
    """C x H x W in [0, 1] as an image matplotlib shows (grey for one channel)."""
    return np.clip(
        np.transpose(array, (1, 2, 0)).squeeze(-1) if array.shape[0] == 1 else array.transpose(1, 2, 0), 0, 1
    )


def _mask_and_pattern(trigger: Trigger, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Where the trigger writes and what it writes, per family: a patch's mask and pattern;
    a blend's size of change and the signed change; a warp's displacement and the change it
    makes."""
    family = trigger.family
    with torch.no_grad():
        change = (trigger.apply(x) - x)[0]
        if isinstance(family, PatchTrigger):
            mask = torch.sigmoid(family.mask_logit[trigger.target])
            written = mask * torch.sigmoid(family.pattern_logit[trigger.target])  # no pattern where nothing is written
            return mask.numpy(), written.numpy(), "mask", "pattern x mask"
        if isinstance(family, BlendTrigger):
            delta = family.delta()[trigger.target]
            size = delta.abs().mean(0, keepdim=True) / family.bound
            return size.numpy(), (0.5 + delta / (2 * family.bound)).numpy(), "size of change", "change (grey: none)"
        if isinstance(family, WarpTrigger):
            flow = family.flow_pixels()[trigger.target]
            shift = flow.norm(dim=0, keepdim=True) / family.max_pixels
            return shift.numpy(), (0.5 + change / 2).numpy(), "displacement", "change (grey: none)"
    raise ValueError(f"no picture for trigger family {trigger.family_name!r}")


def _trigger_png(result: AuditResult, index: int, path: Path) -> bool:
    """For the reported finding: held-out images of other classes, triggered, and the
    trigger's mask and pattern, side by side."""
    report = result.report.models[index]
    triggers = result.triggers.get(index, [])
    chosen = [t for t in triggers if t.family_name == report.trigger_family and t.target == report.target]
    if not chosen or result.data is None:
        return False
    trigger = chosen[0]
    others = np.flatnonzero(result.data.y != trigger.target)[:2]
    fig, axes = plt.subplots(len(others), 4, figsize=(9, 2.4 * len(others)), squeeze=False)
    for row, sample in enumerate(others):
        x = torch.from_numpy(result.data.x[sample : sample + 1])
        mask, pattern, mask_title, pattern_title = _mask_and_pattern(trigger, x)
        panels = (
            (x[0].numpy(), f"clean (class {int(result.data.y[sample])})"),
            (trigger.apply(x)[0].numpy(), f"triggered (-> class {trigger.target})"),
            (mask, mask_title),
            (pattern, pattern_title),
        )
        for column, (picture, title) in enumerate(panels):
            axes[row, column].imshow(_image(picture), cmap="gray", vmin=0, vmax=1)
            axes[row, column].set_title(title, fontsize=8)
            axes[row, column].axis("off")
    fig.suptitle(f"{trigger.family_name} trigger -> class {trigger.target}", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def _short(layer: str, keep: int = 28) -> str:
    return layer if len(layer) <= keep else "..." + layer[-keep:]


def _heatmap_png(result: AuditResult, path: Path) -> bool:
    """The CKA matrix with each model's layer names, the aligned pair boxed."""
    alignment = result.alignment
    if alignment is None:
        return False
    rows, columns = len(alignment.suspect_taps), len(alignment.witness_taps)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * columns + 3), max(4.0, 0.35 * rows + 2.5)))
    shown = ax.imshow(alignment.matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(columns), [_short(t) for t in alignment.witness_taps], rotation=90, fontsize=7)
    ax.set_yticks(range(rows), [_short(t) for t in alignment.suspect_taps], fontsize=7)
    i, j = alignment.suspect_taps.index(alignment.suspect_tap), alignment.witness_taps.index(alignment.witness_tap)
    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlabel("model 2 layers")
    ax.set_ylabel("model 1 layers")
    ax.set_title(f"debiased linear CKA (best {alignment.cka:.3f}, similarity {alignment.similarity:.3f})", fontsize=9)
    fig.colorbar(shown)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def _embedded(path: Path) -> str:
    return f"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"


def _model_view(model: ModelReport, peer: str, picture: Path | None) -> dict[str, object]:
    headline, evidence, action = _words(model, peer)
    return {
        "uri": model.uri,
        "verdict": model.verdict,
        "headline": headline,
        "evidence": evidence,
        "action": action,
        "cells": [
            model.uri,
            model.verdict,
            _shown(model.score),
            _how_sure(model),
            "-" if model.threshold is None else f"{model.threshold} ({model.threshold_profile})",
            _target(model),
            _shown(model.asr, 3),
            _shown(model.trigger_family),
            _shown(model.mask_l1),
            _shown(model.sensitivity, 3),
        ],
        "crossings": ", ".join(
            f"class {c.target} ({c.family}, {shown_multiple(c.score / c.threshold)})" for c in model.also_over_threshold
        ),
        "picture": _embedded(picture) if picture else None,
        "trigger_text": model.trigger_text if model.verdict == "backdoor" else None,
        "target_text": model.target_text,
        "findings": _findings(model),
        "sha256": model.sha256 or "-",
        "clean_accuracy": _shown(model.clean_accuracy, 3),
        "parity": [(name, f"{diff:.3g}") for name, diff in (model.parity_checks or {}).items()],
    }


def render_html(report: AuditReport, heatmap: Path | None, pictures: dict[int, Path]) -> str:
    """report.html for an audit report and the pictures written beside it."""
    uris = [m.uri for m in report.models]
    models = [
        _model_view(m, uris[1 - i] if len(uris) == 2 else "its peer", pictures.get(i))
        for i, m in enumerate(report.models)
    ]
    alignment = report.alignment or {}
    names = {
        "suspect_layer": "model 1 layer",
        "witness_layer": "model 2 layer",
        "cka": "CKA",
        "similarity": "similarity",
    }
    aligned = [(names.get(k, k), _shown(v)) for k, v in alignment.items()]
    if report.clean_agreement is not None:
        aligned.append(("clean agreement (both models right)", _shown(report.clean_agreement, 3)))
    provenance: list[tuple[str, str]] = []
    if report.provenance is not None:
        p = report.provenance
        provenance = [
            ("audit set", p.audit_set), ("audit set sha256", _shown(p.audit_set_sha256)),
            *((f"model {i + 1} sha256 ({uris[i]})", _shown(digest)) for i, digest in enumerate(p.models_sha256)),
            ("thresholds", _shown(p.thresholds)), ("thresholds sha256", _shown(p.thresholds_sha256 or None)),
            ("thresholds calibrated by", _shown(p.calibrated_by)), ("audited by", _shown(p.command)),
            ("audited at (UTC)", p.audited_at),
        ]  # fmt: skip
    provenance += [("paradigm", _shown(report.paradigm)), ("seed", str(report.seed)), ("crossaudit", report.version)]
    worst_first = sorted(models, key=lambda m: ("backdoor", "inconclusive", "clean").index(str(m["verdict"])))
    return _TEMPLATES.get_template("report.html.j2").render(
        verdict=report.verdict,
        verdicts=worst_first,
        models=models,
        columns=COLUMNS,
        error=report.error,
        calibration_warning=report.calibration_warning,
        alignment=aligned,
        heatmap=_embedded(heatmap) if heatmap else None,
        provenance=provenance,
        timings=[(stage, f"{seconds:.2f}") for stage, seconds in report.timings.items()],
    )


def _drawn(draw: Callable[..., bool], *args: object) -> bool:
    """Whether a picture was drawn. Labels are drawn as plain text, never as mathtext: the
    heatmap's are the providers' ONNX value names. A picture is evidence beside the verdict,
    not part of it: one that cannot be drawn is left out (and logged), and the report is
    written."""
    try:
        with plt.rc_context({"text.parse_math": False}):
            return draw(*args)
    except (ValueError, RuntimeError, OSError) as exc:
        log.warning("a picture of the report could not be drawn: %s", exc)
        plt.close("all")
        return False


def write_outputs(result: AuditResult, out: Path) -> list[Path]:
    """Write every artifact of an audit under `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    written = [out / "report.json"]
    written[0].write_text(json.dumps(report.to_dict(), indent=2))
    heatmap = out / "cka_heatmap.png"
    has_heatmap = _drawn(_heatmap_png, result, heatmap)
    pictures: dict[int, Path] = {}
    for index, model in enumerate(report.models):
        png = out / f"trigger_model_{index + 1}.png"
        if model.verdict == "backdoor" and _drawn(_trigger_png, result, index, png):
            pictures[index] = png
    (out / "report.html").write_text(render_html(report, heatmap if has_heatmap else None, pictures))
    return [*written, out / "report.html", *([heatmap] if has_heatmap else []), *pictures.values()]
