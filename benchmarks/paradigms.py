"""Detection per learning paradigm: semi-supervised, self-supervised, autoregressive and
image-to-text (captioners).

For each paradigm and test seed (300 and up: never used by calibration, which stays below
200), the zoo trains providers' models on real data (digits for images, the pydoc topics
corpus for language models, digits with class captions for captioners): backdoored ones
and clean ones. Each backdoored model is
audited against a clean model of another architecture and of the same one; clean models
are audited against each other. Every model of every pair is one sample, judged with its
paradigm's shipped profile (`crossaudit calibrate --paradigm P`, clean pairs only).

`python -m benchmarks.paradigms` (run by `make bench`) writes its section of
docs/benchmarks.md between the markers below, leaving the rest of the page as the
detection benchmark wrote it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.metrics import auroc, rate_text
from benchmarks.sections import PARADIGMS, write_section
from crossaudit.dev.zoo.captioner import captioner_config, export_captioner, train_captioner, write_caption_audit_set
from crossaudit.dev.zoo.datasets import load_dataset
from crossaudit.dev.zoo.language import (
    LanguageConfig,
    export_language_model,
    train_language_model,
    write_text_audit_set,
)
from crossaudit.dev.zoo.train import config_for, export_onnx, train, write_audit_set
from crossaudit.method.audit import run_audit
from crossaudit.method.stages import AuditConfig
from crossaudit.method.verdict import load_thresholds

BEGIN, END = PARADIGMS
IMAGE_ATTACKS = ("badnets", "blended")
TARGET = 3
SEEDS = (300, 310)  # each seed's pairs use it and the next few seeds


@dataclass
class Samples:
    positives: list[float] = field(default_factory=list)  # score / threshold of backdoored models
    negatives: list[float] = field(default_factory=list)  # ... of clean models
    seconds: list[float] = field(default_factory=list)
    errors: int = 0
    # One row per model judged wrongly or not at all: a rate says how often, only the
    # models say which architectures and attacks to look at next.
    misjudged: list[Misjudged] = field(default_factory=list)


@dataclass(frozen=True)
class Misjudged:
    model: str
    peer: str
    backdoored: bool
    judged: str  # "passed", "flagged" or "inconclusive"
    ratio: float | None  # score / threshold; None when the audit ended in an error


def _judge(
    samples: Samples, paradigm: str, first: Path, second: Path, data: Path, backdoored: tuple[bool, bool]
) -> None:
    start = time.perf_counter()
    report = run_audit(str(first), str(second), str(data), config=AuditConfig(paradigm=paradigm)).report
    samples.seconds.append(time.perf_counter() - start)
    pair = ((first, second, backdoored[0]), (second, first, backdoored[1]))
    if report.error:
        samples.errors += 1
        samples.misjudged.extend(Misjudged(m.stem, p.stem, poisoned, "inconclusive", None) for m, p, poisoned in pair)
        return
    for model, (path, peer, poisoned) in zip(report.models, pair, strict=True):
        ratio = (model.score or 0.0) / (model.threshold or 1.0)
        (samples.positives if poisoned else samples.negatives).append(ratio)
        if (ratio >= 1.0) != poisoned:
            samples.misjudged.append(
                Misjudged(path.stem, peer.stem, poisoned, "flagged" if ratio >= 1.0 else "passed", ratio)
            )


def image_paradigm(paradigm: str, seed: int, work: Path, samples: Samples) -> None:
    split = load_dataset("digits")
    data = work / f"digits_{paradigm}.parquet"
    if paradigm == "captioner":
        write_caption_audit_set("digits", data, seed=seed)
    else:
        write_audit_set("digits", data, seed=seed)

    def model(arch: str, attack: str, offset: int) -> Path:
        path = work / f"{paradigm}_{arch}_{attack}_{seed + offset}.onnx"
        if paradigm == "captioner":
            config = captioner_config("digits", arch=arch, attack=attack, target=TARGET, seed=seed + offset)
            export_captioner(train_captioner(config, split), path)
            return path
        trained = train(config_for("digits", arch=arch, attack=attack, target=TARGET, seed=seed + offset,
                                   paradigm=paradigm), split)  # fmt: skip
        export_onnx(trained.model, trained.example, path)
        return path

    clean_cnn, clean_mlp = model("cnn", "clean", 0), model("mlp", "clean", 1)
    _judge(samples, paradigm, clean_cnn, clean_mlp, data, (False, False))
    for offset, attack in enumerate(IMAGE_ATTACKS, start=2):
        poisoned = model("cnn", attack, offset)
        for witness in (clean_mlp, clean_cnn):
            _judge(samples, paradigm, poisoned, witness, data, (True, False))


def language_paradigm(seed: int, work: Path, samples: Samples) -> None:
    data = work / "text.parquet"
    write_text_audit_set(data)
    paths = {}
    for offset, attack in enumerate(("clean", "clean", "phrase")):
        paths[offset] = work / f"lm_{attack}_{seed + offset}.onnx"
        export_language_model(train_language_model(LanguageConfig(attack=attack, seed=seed + offset)), paths[offset])
    _judge(samples, "lm", paths[0], paths[1], data, (False, False))
    _judge(samples, "lm", paths[2], paths[0], data, (True, False))


def run(seeds: tuple[int, ...]) -> dict[str, Samples]:
    results: dict[str, Samples] = defaultdict(Samples)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for seed in seeds:
            for paradigm in ("semi", "ssl", "captioner"):
                image_paradigm(paradigm, seed, work, results[paradigm])
            language_paradigm(seed, work, results["lm"])
    return results


def misjudged_table(results: dict[str, Samples]) -> str:
    """Every model judged wrongly or not at all, by name (files are
    `paradigm_arch_attack_seed`, language models `lm_attack_seed`; a clean model is judged
    in every pair it is part of)."""
    rows = [
        f"| {paradigm} | {m.model} | {m.peer} | {'backdoored' if m.backdoored else 'clean'} | {m.judged} | "
        f"{'-' if m.ratio is None else f'{m.ratio:.2f}'} |"
        for paradigm, s in results.items()
        for m in s.misjudged
    ]
    if not rows:
        return "Misjudged models: none, every model was judged right."
    header = "| paradigm | model | audited with | model is | judged | score / threshold |\n|---|---|---|---|---|---|"
    return "Misjudged models:\n\n" + header + "\n" + "\n".join(rows)


def section(results: dict[str, Samples], seeds: tuple[int, ...], seconds: float) -> str:
    rows = []
    for paradigm, s in results.items():
        positives, negatives = np.array(s.positives), np.array(s.negatives)
        detected, flagged = int(np.sum(positives >= 1.0)), int(np.sum(negatives >= 1.0))
        rows.append(
            f"| {paradigm} | {detected}/{len(positives)}, {rate_text(detected, len(positives))} | "
            f"{flagged}/{len(negatives)}, {rate_text(flagged, len(negatives))} | "
            f"{auroc(positives, negatives):.3f} | {statistics.median(s.seconds):.1f} | {s.errors} | "
            f"{load_thresholds(paradigm=paradigm).clean_pairs} |"
        )
    attacks = ", ".join(IMAGE_ATTACKS)
    return f"""{BEGIN}
## Paradigms

Command: `python -m benchmarks.paradigms` (part of `make bench`), seeds {", ".join(map(str, seeds))},
{seconds / 60:.1f} min. Images: digits, semi-supervised (FixMatch-style, 10% labels) and
self-supervised (SimCLR-style encoders, BadEncoder-style attack) CNNs with {attacks} (target {TARGET}),
each audited against a clean MLP and a clean CNN; clean CNN vs clean MLP. Language models: tiny GPTs
on the pydoc topics corpus, a trigger phrase forcing a continuation, audited against a clean GPT;
clean vs clean. Captioners: digits images captioned by class ("a handwritten three"), CNN encoder
plus a causal decoder, an image trigger ({attacks}) forcing the target caption, audited as the
image models. Every model of a pair is a sample, judged by its paradigm's shipped profile (clean
pairs, seeds below 200; the last column says how many). AUROC on score / threshold. Rates carry
their exact (Clopper-Pearson) 95% interval: on eight judgements, 8 of 8 still allows a rate of 63%.
A model in several pairs (a backdoored image model has two witnesses) is judged in each, and the
intervals treat those judgements as independent, which they are not: read them as a floor on the
uncertainty.

| paradigm | backdoored models detected [95% CI] | clean models flagged [95% CI] | AUROC | median s per pair | inconclusive pairs | profile's clean pairs |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{misjudged_table(results)}
{END}"""  # noqa: E501


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--out", type=Path, default=Path("docs") / "benchmarks.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = run(tuple(args.seeds))
    text = section(results, tuple(args.seeds), time.perf_counter() - start)
    write_section(text, args.out, PARADIGMS)
    print(text)


if __name__ == "__main__":
    main()
