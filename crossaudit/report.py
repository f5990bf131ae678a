"""Evidence a reviewer can open: report.json, a self-contained report.html, trigger PNGs
and the CKA heatmap. Pictures are embedded in the HTML as data URIs so the page survives
being copied out of an artifact store on its own."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from crossaudit.audit import AuditResult
from crossaudit.verdict import ModelReport


def _trigger_png(result: AuditResult, index: int, path: Path) -> bool:
    """Clean samples next to the same samples with the model's reported trigger stamped."""
    report = result.report.models[index]
    triggers = result.triggers.get(index, [])
    chosen = [t for t in triggers if t.family_name == report.trigger_family and t.target == report.target]
    if not chosen or result.data is None:
        return False
    x = torch.from_numpy(result.data.x[:6])
    stamped = chosen[0].apply(x).numpy()
    fig, axes = plt.subplots(2, len(x), figsize=(1.4 * len(x), 3))
    for column in range(len(x)):
        for row, images in enumerate((x.numpy(), stamped)):
            image = np.transpose(images[column], (1, 2, 0)).squeeze()
            axes[row, column].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row, column].axis("off")
    caption = f' "{report.target_text}"' if report.target_text else ""
    fig.suptitle(f"{chosen[0].family_name} trigger -> class {chosen[0].target}{caption}")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def _heatmap_png(result: AuditResult, path: Path) -> bool:
    alignment = result.alignment
    if alignment is None:
        return False
    fig, ax = plt.subplots(figsize=(5, 4))
    shown = ax.imshow(alignment.matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xlabel("model 2 layers")
    ax.set_ylabel("model 1 layers")
    ax.set_xticks(range(len(alignment.witness_taps)))
    ax.set_yticks(range(len(alignment.suspect_taps)))
    ax.set_title(f"debiased linear CKA (best {alignment.cka:.3f}, similarity {alignment.similarity:.3f})")
    fig.colorbar(shown)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return True


def _target(model: ModelReport) -> str:
    """The target class, and for a captioner the caption it forces."""
    if model.target_text and not model.trigger_text:
        return f"{model.target} ({html.escape(model.target_text)})"
    return str(model.target)


def _embedded(path: Path) -> str:
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def write_outputs(result: AuditResult, out: Path) -> list[Path]:
    """Write every artifact of an audit under `out`; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    report = result.report
    written = [out / "report.json"]
    written[0].write_text(json.dumps(report.to_dict(), indent=2))
    pictures: list[tuple[str, Path]] = []
    heatmap = out / "cka_heatmap.png"
    if _heatmap_png(result, heatmap):
        pictures.append(("CKA alignment", heatmap))
    for index, model in enumerate(report.models):
        png = out / f"trigger_model_{index + 1}.png"
        if model.verdict == "backdoor" and _trigger_png(result, index, png):
            pictures.append((f"Recovered trigger: {model.uri}", png))
    rows = "".join(
        f"<tr><td>{html.escape(m.uri)}</td><td><b>{m.verdict}</b></td><td>{m.score}</td><td>{m.threshold_multiple}</td>"
        f"<td>{m.threshold} ({m.threshold_profile})</td><td>{_target(m)}</td><td>{m.asr}</td><td>{m.mask_l1}</td>"
        f"<td>{m.sensitivity}</td><td>{m.trigger_family}</td><td>{m.parity_max_abs_diff}</td>"
        f"<td><code>{m.sha256 or ''}</code></td></tr>"
        for m in report.models
    )
    figures = "".join(f"<h3>{html.escape(title)}</h3>{_embedded(path)}" for title, path in pictures)
    figures += "".join(
        f"<h3>Recovered trigger: {html.escape(m.uri)}</h3><p>prompt + <code>{html.escape(m.trigger_text)}</code> "
        f"&rarr; <code>{html.escape(m.target_text or '')}</code></p>"
        for m in report.models
        if m.verdict == "backdoor" and m.trigger_text
    )
    crossings = "".join(
        f"<p>{html.escape(m.uri)}: other targets also over their thresholds: "
        + ", ".join(f"class {c.target} ({c.family}, {c.score / c.threshold:.2f}x)" for c in m.also_over_threshold)
        + "</p>"
        for m in report.models
        if m.also_over_threshold
    )
    notices = f"<p><b>Error:</b> {html.escape(report.error)}</p>" if report.error else ""
    if report.calibration_warning:
        notices += f"<p><b>Warning:</b> {html.escape(report.calibration_warning)}</p>"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>crossaudit report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:4px}}
table{{border-collapse:collapse}}</style></head><body>
<h1>crossaudit: {report.verdict}</h1>
<p>{"; ".join(f"{html.escape(m.uri)}: <b>{m.verdict}</b>" for m in report.models)}
(each model judged with the other as its witness).</p>{notices}
<p>Paradigm {report.paradigm}; clean agreement {report.clean_agreement};
aligned layers {html.escape(str(report.alignment))}; seed {report.seed}; crossaudit {report.version}.</p>
<table><tr><th>model</th><th>verdict</th><th>score</th><th>x threshold</th><th>threshold</th><th>target</th>
<th>held-out ASR</th><th>mask L1</th><th>sensitivity</th><th>family</th><th>parity diff</th><th>sha256</th></tr>
{rows}</table>{crossings}{figures}
<h3>Timings (s)</h3><pre>{html.escape(json.dumps(report.timings, indent=1))}</pre>
</body></html>"""
    (out / "report.html").write_text(page)
    return [*written, out / "report.html", *(path for _, path in pictures)]
