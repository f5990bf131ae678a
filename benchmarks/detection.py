"""Detection benchmark: crossaudit against Neural Cleanse on a seeded zoo of provider pairs.

Every test pair is a suspect (backdoored with one of the zoo's attacks, or clean) and a
clean witness from another provider; both detectors judge *every* model of the pair, so
each model is one sample (positive when it carries a backdoor). Thresholds are never
fitted here: crossaudit uses the shipped profiles (`crossaudit calibrate`, clean pairs of
seeds below 200 only, no backdoored model), Neural Cleanse its published rule (anomaly index
>= 2). Test pairs use seeds 200 and up. Both detectors are timed on the same cores, one
torch thread per job, doing the same for a pair: crossaudit's two directions run side by
side, Neural Cleanse's classes split over the threads; Neural Cleanse judges each model
once, and a pair is charged both its models' times (`neural_cleanse_pair`). Also
measured, in the same run:
- adversarially vulnerable clean models (MLPs, with their FGSM error shown): must pass;
- ablations on the plan's first architecture pairs: no witness and no CKA term, same
  thresholds; the sensitivity stage's fine-tuning scored as it was before, judged by the
  thresholds its calibration rule gives on the calibration's own clean findings;
- scaling of audit time with the number of classes (10/20/40 from real digits placed in
  the quadrants of a 16x16 canvas) and with the model size.

`python -m benchmarks.detection` (`--plan standard`, run by `make bench`, about 55 minutes on
2 cores) writes docs/benchmarks.md and docs/benchmarks_scaling.png. It gives each architecture
pair its own seed and target, so every attack on every dataset is measured on three seeds
and three targets at the cost of one seed. `--plan full` runs every seed on every
architecture pair (three times the pairs, about three hours, an estimate); `--quick` runs a
smoke version of the same code path in a few minutes (the tests run it).
Each run also writes every judged model's findings next to the report (`write_findings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.headline import HEADLINE, write_pages
from benchmarks.metrics import auroc, bootstrap_auroc, percent, rate_text, tpr_at_fpr
from benchmarks.sections import MARKED, existing_section, write_section
from crossaudit import __version__
from crossaudit.dev.baselines.neural_cleanse import NeuralCleanseConfig, NeuralCleanseResult, neural_cleanse
from crossaudit.dev.zoo.attacks import ATTACKS
from crossaudit.dev.zoo.datasets import Split, load_dataset
from crossaudit.dev.zoo.train import config_for, export_onnx, train
from crossaudit.method.audit import run_audit
from crossaudit.method.calibrate import SEED_BLOCKS, CalibrationRun, family_maxima, profile
from crossaudit.method.inversion import DEFAULT_FAMILIES, InversionConfig, ranked
from crossaudit.method.stages import AuditConfig, AuditResult
from crossaudit.method.verdict import Finding, ModelReport, Thresholds, judge, load_thresholds
from crossaudit.modelio.data import read_audit_data, write_parquet
from crossaudit.modelio.loaders import load_model

ABLATIONS = {
    "full": AuditConfig(),
    "no witness": AuditConfig(inversion=InversionConfig(use_witness=False)),
    "no CKA term": AuditConfig(inversion=InversionConfig(use_alignment=False)),
}
# The sensitivity stage is measured, not scored; this ablation is the earlier design that
# scored only the success surviving its fine-tuning, to show what scoring it buys. Only
# the score differs, so it rescores the full audit's findings (`finetune_scored`) rather
# than audit again, and its time is the full audit's.
FINETUNE_SCORED = "fine-tuning scored"
# What `crossaudit calibrate --paradigm supervised --findings` wrote with the shipped
# thresholds: the clean pairs' findings that a changed score is calibrated on.
CALIBRATION_FINDINGS = Path(__file__).resolve().parents[1] / "docs" / "calibration_findings_supervised.json"
TARGETS = (3, 7, 1, 5)


@dataclass(frozen=True)
class Plan:
    name: str
    datasets: tuple[str, ...]
    arch_pairs: tuple[tuple[str, str], ...]
    attacks: tuple[str, ...]
    seeds: tuple[int, ...]
    ablations: tuple[str, ...]
    scaling_classes: tuple[int, ...]
    scaling_archs: tuple[str, ...]
    neural_cleanse: NeuralCleanseConfig
    bootstrap: int = 1000
    ablation_arch_pairs: int = 1  # ablations run on the first this-many architecture pairs (time)
    seed_per_arch_pair: bool = False  # the i-th architecture pair gets the i-th seed only

    def cells(self) -> list[tuple[int, tuple[str, str], int, int]]:
        """Every (architecture pair's index, suspect/witness architectures, seed, target) the
        plan audits: every seed on every architecture pair, or with `seed_per_arch_pair` the
        i-th seed and target on the i-th pair. Why the latter: seeds and targets vary within
        each attack's models at the cost of one seed, where one seed for all would measure
        every attack on a single target."""
        cells = []
        for index, arch_pair in enumerate(self.arch_pairs):
            numbers = [index % len(self.seeds)] if self.seed_per_arch_pair else range(len(self.seeds))
            cells.extend((index, arch_pair, self.seeds[n], TARGETS[n % len(TARGETS)]) for n in numbers)
        return cells


FULL = Plan(
    "full", ("digits", "fmnist"), (("cnn", "cnn"), ("resnet", "cnn"), ("cnn", "mlp")), ATTACKS[1:], (200, 210, 220),
    (*ABLATIONS, FINETUNE_SCORED), (10, 20, 40), ("mlp", "cnn", "resnet"), NeuralCleanseConfig(),
    ablation_arch_pairs=2,
)  # fmt: skip
# A third of the pairs (each architecture pair on its own seed), and the ablations on
# cnn/cnn only: the ResNet pairs' audits are the slowest.
STANDARD = dataclasses.replace(FULL, name="standard", seed_per_arch_pair=True, ablation_arch_pairs=1)
# The smoke plan: one audited ablation (every one is the same code path with another
# config), the rescored one (free), and one scaling point, the cheapest, a pair of digits
# MLPs: the classes axis runs the same `_time_pair` on CNNs of the quadrant task
# (`quadrant_digits` has its own test).
QUICK = Plan(
    "quick", ("digits",), (("cnn", "cnn"),), ("badnets",), (200,), ("full", "no witness", FINETUNE_SCORED),
    (), ("mlp",), NeuralCleanseConfig(steps=60), bootstrap=200,
)  # fmt: skip
PLANS = {plan.name: plan for plan in (QUICK, STANDARD, FULL)}
DEFAULT_PLAN = STANDARD.name  # what `make bench` runs: about 55 min, where the full plan takes about three hours


@dataclass
class Sample:
    """One model as judged by one detector in one pair."""

    detector: str
    attack: str  # "clean" for clean models (witnesses included)
    dataset: str
    positive: bool
    score: float
    flagged: bool
    target_right: bool
    inconclusive: bool = False
    arch_pair: str = ""
    model: str = ""  # the judged model's file, and its peer's: which model a miss was
    peer: str = ""
    profile: str = ""  # the thresholds it was judged by (crossaudit's `threshold_profile`)
    # crossaudit's evidence, kept so that a change to the score can be read on this run's
    # triggers before the benchmark is run again (`write_findings`).
    findings: tuple[Finding, ...] = ()
    similarity: float | None = None
    # For a backdoored model: the planted target's rank (0 = first) in each screen of it
    # (each trigger family's, and the label statistic's, `screen_ranks`), and the families
    # that cross-examined it (ended with a trigger for it).
    screen_ranks: dict[str, int] = field(default_factory=dict)
    examined: tuple[str, ...] = ()


Clock = Literal["wall", "cpu"]


@dataclass(frozen=True)
class Timing:
    """A pair's seconds on the wall clock and of CPU (every thread of the process).

    Wall time is what an operator waits for; CPU time is the work done, however it was
    spread over the cores. `start()` holds both clocks' readings, `stop()` the time since.
    """

    wall: float
    cpu: float

    @classmethod
    def start(cls) -> Timing:
        return cls(time.perf_counter(), time.process_time())

    def stop(self) -> Timing:
        return Timing(time.perf_counter() - self.wall, time.process_time() - self.cpu)

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    pair_times: dict[str, list[Timing]] = field(default_factory=lambda: defaultdict(list))
    vulnerability: dict[str, float] = field(default_factory=dict)
    scaling: list[dict[str, float | str]] = field(default_factory=list)

    def add(self, detector: str, samples: list[Sample], timing: Timing) -> None:
        self.samples.extend(samples)
        self.pair_times[detector].append(timing)

    def mean(self, detector: str, clock: Clock = "wall") -> float:
        return statistics.mean(getattr(t, clock) for t in self.pair_times[detector])

    def speedup(self, clock: Clock = "wall") -> float:
        """Neural Cleanse's mean time per pair over crossaudit's."""
        return self.mean("Neural Cleanse", clock) / self.mean("crossaudit", clock)


class Zoo:
    """Trains each model once, on demand, and keeps it as ONNX under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.splits: dict[str, Split] = {}
        self.paths: dict[tuple, Path] = {}
        self.fgsm: dict[Path, float] = {}

    def split(self, dataset: str) -> Split:
        if dataset not in self.splits:
            self.splits[dataset] = load_dataset(dataset)
        return self.splits[dataset]

    def model(self, dataset: str, arch: str, attack: str, target: int, seed: int) -> Path:
        key = (dataset, arch, attack, target, seed)
        if key not in self.paths:
            split = self.split(dataset)
            trained = train(config_for(dataset, arch=arch, attack=attack, target=target, seed=seed), split)
            path = self.root / f"{dataset}_{arch}_{attack}_{target}_{seed}.onnx"
            export_onnx(trained.model, trained.example, path)
            self.paths[key] = path
            if attack == "clean":
                self.fgsm[path] = fgsm_error(trained.model, split)
        return self.paths[key]

    def audit_set(self, dataset: str) -> Path:
        path = self.root / f"{dataset}_audit.parquet"
        if not path.exists():
            split = self.split(dataset)
            rng = np.random.RandomState(0)
            chosen = np.concatenate(
                [rng.permutation(np.flatnonzero(split.y_test == c))[:100] for c in range(split.num_classes)]
            )
            write_parquet(path, split.x_test[chosen], split.y_test[chosen])
        return path


def fgsm_error(model: torch.nn.Module, split: Split, eps: float = 0.03) -> float:
    """Error under a one-step L-inf attack of size `eps`: how adversarially vulnerable a clean model is."""
    x, y = torch.from_numpy(split.x_test[:500]).requires_grad_(True), torch.from_numpy(split.y_test[:500])
    F.cross_entropy(model(x), y).backward()
    adversarial = (x + eps * x.grad.sign()).clamp(0, 1).detach()
    with torch.no_grad():
        return float((model(adversarial).argmax(1) != y).float().mean())


def crossaudit_samples(
    suspect: Path, witness: Path, data: Path, attack: str, target: int, dataset: str, ablations: tuple[str, ...],
) -> dict[str, tuple[list[Sample], Timing]]:  # fmt: skip
    """Per detector (the full audit and each ablation asked for): its samples and the pair's time."""
    thresholds = load_thresholds(dataset)
    judged = {}
    ranks: dict[str, int] = {}
    examined: tuple[str, ...] = ()
    for name in ablations:
        if name == FINETUNE_SCORED:
            continue
        clock = Timing.start()
        result = run_audit(str(suspect), str(witness), str(data), config=ABLATIONS[name], thresholds=thresholds)
        timing = clock.stop()
        similarity = result.alignment.similarity if result.alignment is not None else None
        judged[detector_name(name)] = (result.report.models, result.report.error, timing, similarity)
        if name == "full" and attack != "clean":
            ranks = screen_ranks(result, target) | {LABELS: label_statistic_rank(suspect, witness, data, target)}
            examined = tuple(sorted({t.family_name for t in result.triggers.get(0, []) if t.target == target}))
        if name == "full" and FINETUNE_SCORED in ablations:
            models = finetune_scored(result, finetune_scored_thresholds(dataset))
            judged[detector_name(FINETUNE_SCORED)] = (models, result.report.error, timing, similarity)
    names = (suspect.stem, witness.stem)
    samples = {}
    for detector, (models, error, timing, similarity) in judged.items():
        found = []
        for index, model in enumerate(models):
            positive = index == 0 and attack != "clean"
            ratio = (model.score / model.threshold) if model.score is not None and model.threshold else 0.0
            flagged = model.verdict == "backdoor"
            found.append(Sample(
                detector, attack if index == 0 else "clean", dataset, positive, ratio, flagged,
                positive and flagged and model.target == target, error is not None,
                model=names[index], peer=names[1 - index], profile=model.threshold_profile or "",
                findings=tuple(model.findings), similarity=similarity, screen_ranks=ranks if positive else {},
                examined=examined if positive else (),
            ))  # fmt: skip
        samples[detector] = (found, timing)
    return samples


LABELS = "label statistic"


def screen_ranks(result: AuditResult, target: int) -> dict[str, int]:
    """The planted target's rank in each trigger family's screen of the suspect (direction
    0): its place in the order the screen keeps targets in (`inversion.ranked`)."""
    return {
        family: ranked(merits[0], list(range(len(merits[0])))).index(target)
        for family, merits in result.screens.items()
    }


def label_statistic_rank(suspect: Path, witness: Path, data: Path, target: int) -> int:
    """The planted target's rank by a data-only screen measured beside the search's: the
    mean probability the suspect gives each class on clean audit images of other classes,
    less the witness's (K-Arm's label statistics, read against the peer). Measured, not used."""
    audit = read_audit_data(str(data))
    x, y = torch.from_numpy(audit.x), torch.from_numpy(audit.y)
    mass = []
    for path in (suspect, witness):
        with torch.no_grad():
            probabilities = torch.softmax(load_model(str(path)).module(x), 1)
        probabilities[torch.arange(len(y)), y] = 0.0
        mass.append(probabilities.mean(0).numpy())
    statistic = mass[0] - mass[1]
    return int(np.sum(statistic > statistic[target]))


def _kept_by_any(sample: Sample) -> bool:
    """Whether some family cross-examined the planted target."""
    return bool(sample.examined)


def screens_table(results: Results) -> str:
    """Per screen: on how many backdoored models it ranked the planted target first, and
    on how many its family cross-examined the planted target; and on how many some family did."""
    backdoored = [s for s in results.samples if s.detector == "crossaudit" and s.positive and s.screen_ranks]
    families = [f for f in InversionConfig().families if any(f in s.screen_ranks for s in backdoored)]
    rows = []
    for screen in (*families, LABELS):
        ranks = [s.screen_ranks[screen] for s in backdoored if screen in s.screen_ranks]
        kept = f"{sum(screen in s.examined for s in backdoored)} of {len(ranks)}" if screen != LABELS else "(not used)"
        rows.append(f"| {screen} | {sum(r == 0 for r in ranks)} of {len(ranks)} | {kept} |")
    return "\n".join([
        "| screen | planted target ranked first | planted target cross-examined |",
        "|---|---|---|",
        *rows,
        f"| **any family** | | **{sum(_kept_by_any(s) for s in backdoored)} of {len(backdoored)}** |",
    ])  # fmt: skip


def detector_name(ablation: str) -> str:
    return "crossaudit" if ablation == "full" else f"crossaudit ({ablation})"


def survived(findings: list[list[Finding]]) -> list[list[Finding]]:
    """A pair's two models' findings, each one's success (its own and its peer's for the
    same family and target) counted only as far as it survived the sensitivity stage's
    fine-tuning."""

    def surviving(finding: Finding) -> float:
        return min(finding.asr, finding.asr_after_finetune) * finding.witness_kept

    rescored = []
    for index, own in enumerate(findings):
        peers = {(f.family, f.target): f for f in findings[1 - index]}
        rescored.append([
            dataclasses.replace(f, effective_asr=surviving(f), peer_effective_asr=surviving(peers[f.family, f.target]))
            for f in own
        ])  # fmt: skip
    return rescored


def calibration_runs(
    dataset: str, rescore: Callable[[list[list[Finding]]], list[list[Finding]]], path: Path = CALIBRATION_FINDINGS
) -> list[CalibrationRun]:
    """The dataset's clean calibration pairs, each scored per family as
    `calibrate.pair_scores` scores them (`family_maxima`), on its findings after `rescore`."""
    runs = []
    for record in json.loads(path.read_text()):
        if not record["pair"].startswith(f"{dataset}:"):
            continue
        pair = rescore([[Finding(**f) for f in model["findings"]] for model in record["models"]])
        scores = family_maxima((finding for findings in pair for finding in findings), DEFAULT_FAMILIES)
        runs.append(CalibrationRun(record["pair"], scores, record["similarity"]))
    return runs


def finetune_scored_thresholds(dataset: str) -> Thresholds:
    """The dataset's profile as the calibration's rule sets it for the fine-tuning score:
    the same clean pairs' findings rescored (no pair audited again, none backdoored), so
    the ablation is judged like for like rather than by thresholds made for another score."""
    return profile(dataset, "supervised", calibration_runs(dataset, survived))


def finetune_scored(result: AuditResult, thresholds: Thresholds) -> list[ModelReport]:
    """The full audit's models judged again with their findings `survived`."""
    report = result.report
    if report.error is not None or result.alignment is None:
        return report.models
    findings = survived([model.findings for model in report.models])
    return [
        judge(model.uri, own, thresholds, result.alignment.similarity)
        for model, own in zip(report.models, findings, strict=True)
    ]


@cache
def neural_cleanse_model(path: Path, data: Path, config: NeuralCleanseConfig) -> tuple[NeuralCleanseResult, Timing]:
    """Neural Cleanse's judgement of one model, and its time; run once per model.

    Why once: it is a single-model detector and seeded, so a cell's witness, part of each
    of the cell's seven pairs, would get the same judgement seven times (a test checks that
    a rerun gives it bitwise), and running it again would cost time and show nothing. Each
    pair is still charged for judging both its models (`neural_cleanse_pair`). The clock
    starts once the model is loaded, where crossaudit's time includes loading both models
    and the parity check (under a second).
    """
    audit = read_audit_data(str(data))
    model = load_model(str(path)).module
    clock = Timing.start()
    result = neural_cleanse(model, audit.x, audit.num_classes, config)
    return result, clock.stop()


def neural_cleanse_pair(
    paths: tuple[Path, Path], data: Path, config: NeuralCleanseConfig
) -> tuple[list[NeuralCleanseResult], Timing]:
    """Neural Cleanse on a pair's two models: their results, and the sum of their times.

    Each model's classes run split over the cores (`neural_cleanse.neural_cleanse`), as
    crossaudit's two directions do, so the sum is what judging the pair from scratch takes
    on the same cores. Not the two models side by side, one thread each: a core then
    idles once the smaller model is done (in a ResNet/CNN pair, for most of the time).
    """
    judged = [neural_cleanse_model(path, data, config) for path in paths]
    return [result for result, _ in judged], sum((timing for _, timing in judged), Timing(0.0, 0.0))


def neural_cleanse_samples(
    suspect: Path, witness: Path, data: Path, attack: str, target: int, dataset: str, config: NeuralCleanseConfig
) -> tuple[list[Sample], Timing]:
    """Neural Cleanse's judgement of a pair's models, as `crossaudit_samples` gives
    crossaudit's: the suspect carries `attack` ("clean" for none), the witness is clean."""
    results, timing = neural_cleanse_pair((suspect, witness), data, config)
    names = (suspect.stem, witness.stem)
    samples = []
    for index, result in enumerate(results):
        positive = index == 0 and attack != "clean"
        samples.append(Sample(
            "Neural Cleanse", attack if index == 0 else "clean", dataset, positive, result.anomaly_index,
            result.flagged, positive and result.flagged and result.suspected_target == target,
            model=names[index], peer=names[1 - index],
        ))  # fmt: skip
    return samples, timing


def run_pairs(plan: Plan, zoo: Zoo, results: Results) -> None:
    for dataset in plan.datasets:
        data = zoo.audit_set(dataset)
        for pair_index, (first, second), seed, target in plan.cells():
            ablations = plan.ablations if pair_index < plan.ablation_arch_pairs else ("full",)
            witness = zoo.model(dataset, second, "clean", 0, seed + 1)
            suspects = [(a, zoo.model(dataset, first, a, target, seed)) for a in (*plan.attacks, "clean")]
            for attack, suspect in suspects:
                print(f"[{plan.name}] {dataset} {first}/{second} seed {seed}: {attack}", flush=True)
                judged = crossaudit_samples(suspect, witness, data, attack, target, dataset, ablations)
                judged["Neural Cleanse"] = neural_cleanse_samples(
                    suspect, witness, data, attack, target, dataset, plan.neural_cleanse
                )
                for detector, (samples, timing) in judged.items():
                    for sample in samples:
                        sample.arch_pair = f"{first}/{second}"
                    results.add(detector, samples, timing)
        mlp = zoo.model(dataset, "mlp", "clean", 0, plan.seeds[0] + 5)
        cnn = zoo.model(dataset, "cnn", "clean", 0, plan.seeds[0] + 6)
        print(f"[{plan.name}] {dataset}: adversarially vulnerable clean pair", flush=True)
        samples, _ = crossaudit_samples(mlp, cnn, data, "clean", 0, dataset, ("full",))["crossaudit"]
        samples += neural_cleanse_samples(mlp, cnn, data, "clean", 0, dataset, plan.neural_cleanse)[0]
        for sample in samples:
            sample.attack = "clean (vulnerable pair)"
        results.samples.extend(samples)
        results.vulnerability.update({f"{dataset} mlp": zoo.fgsm[mlp], f"{dataset} cnn": zoo.fgsm[cnn]})


def quadrant_digits(copies: int) -> Split:
    """sklearn's digits at their own 8x8 resolution, in one of `copies` quadrants of a 16x16
    canvas: 10 x copies classes, each unambiguous (the position is part of the class), all
    real images. Why 16x16: it is the zoo's digits input, so every point of the classes
    axis has the model axis's input size, and the axis's audits take about a quarter of
    the time they took with the zoo's 16x16 digits on a 32x32 canvas."""
    base = load_dataset("digits")

    def place(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        native = x[:, :, ::2, ::2]  # the zoo upsampled each pixel to 2x2 (`datasets.digits`)
        images, labels = [], []
        for quadrant in range(copies):
            canvas = np.zeros((len(x), 1, 16, 16), np.float32)
            row, col = divmod(quadrant, 2)
            canvas[:, :, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] = native
            images.append(canvas)
            labels.append(y + 10 * quadrant)
        return np.concatenate(images), np.concatenate(labels)

    return Split(*place(base.x_train, base.y_train), *place(base.x_test, base.y_test))


def run_scaling(plan: Plan, zoo: Zoo, results: Results) -> None:
    for classes in plan.scaling_classes:
        split = quadrant_digits(classes // 10)
        key = f"digits{classes}"
        zoo.splits[key] = split
        paths = [zoo.root / f"{key}_cnn_{seed}.onnx" for seed in (300, 301)]
        for seed, path in zip((300, 301), paths, strict=True):
            copies = classes // 10
            config = config_for("digits", arch="cnn", seed=seed, epochs=max(8, 20 // copies), train_size=1300 * copies)
            trained = train(config, split)
            export_onnx(trained.model, trained.example, path)
        data = zoo.audit_set(key)
        print(f"[{plan.name}] scaling: {classes} classes", flush=True)
        _time_pair(results, "classes", classes, paths, data, plan, f"{classes} classes")
    for arch in plan.scaling_archs:
        paths = [zoo.model("digits", arch, "clean", 0, seed) for seed in (310, 311)]
        params = sum(p.numel() for p in load_model(str(paths[0])).module.parameters())
        print(f"[{plan.name}] scaling: {arch} ({params} parameters)", flush=True)
        _time_pair(results, "parameters", params, paths, zoo.audit_set("digits"), plan, arch)


def _time_pair(results: Results, axis: str, value: int, paths: list[Path], data: Path, plan: Plan, label: str) -> None:
    clock = Timing.start()
    report = run_audit(str(paths[0]), str(paths[1]), str(data), thresholds=load_thresholds("digits")).report
    ours = clock.stop()
    _, nc = neural_cleanse_pair((paths[0], paths[1]), data, plan.neural_cleanse)
    results.scaling.append({
        "axis": axis, "value": value, "label": label, "crossaudit_s": ours.wall, "neural_cleanse_s": nc.wall,
        "inversion_s": report.timings.get("trigger_inversion", float("nan")), "verdict": report.verdict,
    })  # fmt: skip


# -- the report -------------------------------------------------------------------------


def _scores(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.array([s.score for s in samples if s.positive], float),
        np.array([s.score for s in samples if not s.positive], float),
    )


def _row(name: str, samples: list[Sample], negatives: list[Sample], rounds: int) -> str:
    positives = [s for s in samples if s.positive]
    pos_scores, neg_scores = np.array([s.score for s in positives]), np.array([s.score for s in negatives])
    flagged = [s for s in positives if s.flagged]
    target = float(np.mean([s.target_right for s in flagged])) if flagged else float("nan")
    area = auroc(pos_scores, neg_scores)
    low, high = bootstrap_auroc(pos_scores, neg_scores, rounds)
    inconclusive = sum(s.inconclusive for s in positives)
    detected = rate_text(len(flagged), len(positives))
    return (
        f"| {name} | {len(positives)} | {detected} | {area:.3f} [{low:.3f}, {high:.3f}] | "
        f"{percent(tpr_at_fpr(pos_scores, neg_scores, 0.01))} | {percent(tpr_at_fpr(pos_scores, neg_scores, 0.05))} | "
        f"{percent(target)} | {inconclusive} |"
    )


def distinct_models_flagged(negatives: list[Sample]) -> tuple[int, int]:
    """Clean models flagged in at least one of their audits, and how many clean models there were.

    Why: a cell's witness is judged in each of the cell's seven audits, so the clean
    judgements are not independent trials: crossaudit judges the witness anew against each
    suspect, Neural Cleanse (a single-model detector, seeded) repeats one judgement. The
    exact interval over judgements assumes independence; over distinct models it does not.
    """
    flagged: dict[str, bool] = {}
    for sample in negatives:
        flagged[sample.model] = flagged.get(sample.model, False) or sample.flagged
    return sum(flagged.values()), len(flagged)


def _false_positives(negatives: list[Sample]) -> str:
    """The false-positive rate over clean-model judgements, then over distinct clean models."""
    judged = sum(s.flagged for s in negatives)
    flagged, models = distinct_models_flagged(negatives)
    return (
        f"{rate_text(judged, len(negatives))}, {judged} of {len(negatives)} judgements; "
        f"{rate_text(flagged, models)} of distinct clean models, {flagged} of {models} flagged in any audit"
    )


def detector_table(results: Results, detector: str, rounds: int, arch_pairs: set[str] | None = None) -> str:
    samples = [
        s for s in results.samples if s.detector == detector and (arch_pairs is None or s.arch_pair in arch_pairs)
    ]
    negatives = [s for s in samples if not s.positive]
    attacks = sorted({s.attack for s in samples if s.positive})
    rows = [_row(a, [s for s in samples if s.attack == a], negatives, rounds) for a in attacks]
    rows.append(_row("**all attacks**", samples, negatives, rounds))
    scope = f" on {', '.join(sorted(arch_pairs))} pairs" if arch_pairs else ""
    vulnerable = [s for s in negatives if "vulnerable" in s.attack]
    return "\n".join([
        f"**{detector}**{scope}: false-positive rate on clean models {_false_positives(negatives)} "
        f"(vulnerable pair: {sum(s.flagged for s in vulnerable)} of {len(vulnerable)} flagged)",
        "",
        "| attack | backdoored models | detected [95% CI] | AUROC [95% CI] | TPR @ 1% FPR | TPR @ 5% FPR | right target | inconclusive |",  # noqa: E501
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])  # fmt: skip


def arch_pair_table(results: Results) -> str:
    """crossaudit per architecture pair: a threshold that holds for CNNs may not for ResNets."""
    rows = []
    for pair in sorted({s.arch_pair for s in results.samples if s.detector == "crossaudit" and s.arch_pair}):
        samples = [s for s in results.samples if s.detector == "crossaudit" and s.arch_pair == pair]
        positives = [s for s in samples if s.positive]
        negatives = [s for s in samples if not s.positive]
        rows.append(
            f"| {pair} | {sum(s.flagged for s in positives)} of {len(positives)} | "
            f"{sum(s.flagged for s in negatives)} of {len(negatives)} |"
        )
    return "\n".join([
        "| suspect/witness | backdoored models detected | clean models flagged |",
        "|---|---|---|",
        *rows,
    ])  # fmt: skip


def dataset_table(results: Results) -> str:
    """crossaudit per attack and dataset: each dataset has its own threshold profile, so
    a miss or a false positive is only explained once it is known which task it was on."""
    ours = [s for s in results.samples if s.detector == "crossaudit"]
    datasets = sorted({s.dataset for s in ours})
    rows = []
    for attack in sorted({s.attack for s in ours}, key=lambda a: (a.startswith("clean"), a)):
        cells = []
        for dataset in datasets:
            group = [s for s in ours if s.attack == attack and s.dataset == dataset]
            cells.append(f"{sum(s.flagged for s in group)} of {len(group)}")
        rows.append(f"| {attack} | {' | '.join(cells)} |")
    return "\n".join([
        f"| models flagged | {' | '.join(datasets)} |",
        f"|---|{'---|' * len(datasets)}",
        *rows,
    ])  # fmt: skip


def misjudged_table(results: Results) -> str:
    """Every model crossaudit judged wrongly (or could not judge), by name: a rate says how
    often, only the models say which tasks, architectures and profiles to look at next."""
    wrong = [
        s for s in results.samples
        if s.detector == "crossaudit" and (s.flagged != s.positive or s.inconclusive)
    ]  # fmt: skip
    if not wrong:
        return "None: every model was judged right."
    rows = [
        f"| {s.model} | {s.peer} | {s.arch_pair} | {s.attack} | "
        f"{'inconclusive' if s.inconclusive else 'flagged' if s.flagged else 'passed'} | {s.score:.2f} | {s.profile} |"
        for s in sorted(wrong, key=lambda s: (s.positive, s.model))
    ]
    return "\n".join(
        [
            "| model | audited with | suspect/witness | attack | judged | score / threshold | profile |",
            "|---|---|---|---|---|---|---|",
            *rows,
        ]
    )


def targets_line(results: Results) -> str:
    """Each of the detector's targets, met or not, with what the run measured.

    Rates carry their exact interval, which says whether the run could show the target at
    all; the speed target is met only on both clocks, because the wall-clock ratio depends
    on how each detector's two halves share the cores and the CPU ratio does not."""
    ours = [s for s in results.samples if s.detector == "crossaudit"]
    nc = [s for s in results.samples if s.detector == "Neural Cleanse"]

    def counts(samples: list[Sample]) -> tuple[int, int, int, int]:
        positives = [s for s in samples if s.positive]
        negatives = [s for s in samples if not s.positive]
        return sum(s.flagged for s in positives), len(positives), sum(s.flagged for s in negatives), len(negatives)

    detected, backdoored, false_positives, clean = counts(ours)
    nc_detected, nc_backdoored = counts(nc)[:2]
    detection, nc_detection = detected / backdoored, nc_detected / nc_backdoored
    flagged = [s for s in ours if s.positive and s.flagged]
    target = float(np.mean([s.target_right for s in flagged])) if flagged else float("nan")
    area = auroc(*_scores(ours))
    wall, cpu = results.speedup("wall"), results.speedup("cpu")
    backdoored_ranked = [s for s in ours if s.positive and s.screen_ranks]
    lost = sum(not _kept_by_any(s) for s in backdoored_ranked)
    checks = [
        ("detection >= 99%", detection >= 0.99, f"{rate_text(detected, backdoored)}, {detected} of {backdoored}"),
        ("FPR <= 1%", false_positives / clean <= 0.01, _false_positives([s for s in ours if not s.positive])),
        ("AUROC >= 0.99", area >= 0.99, f"{area:.3f}"),
        ("right target >= 95%", target >= 0.95, percent(target)),
        ("screens lose no planted target", lost == 0, f"{lost} of {len(backdoored_ranked)} backdoored models lost"),
        ("5x faster than Neural Cleanse at equal or better detection",
         min(wall, cpu) >= 5 and detection >= nc_detection,
         f"{wall:.2f}x wall clock, {cpu:.2f}x CPU, detection {percent(detection)} vs {percent(nc_detection)}"),
    ]  # fmt: skip
    return "\n".join(f"- {name}: **{'met' if ok else 'NOT met'}** ({value})" for name, ok, value in checks)


def plot_scaling(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, (name, label) in zip(axes, (("classes", "classes"), ("parameters", "model parameters")), strict=True):
        rows = sorted((r for r in results.scaling if r["axis"] == name), key=lambda r: r["value"])
        values = [r["value"] for r in rows]
        axis.plot(values, [r["crossaudit_s"] for r in rows], "o-", label="crossaudit (pair, both directions)")
        axis.plot(values, [r["neural_cleanse_s"] for r in rows], "s--", label="Neural Cleanse (both models)")
        axis.set_xlabel(label)
        axis.set_ylabel("seconds")
        axis.grid(alpha=0.3)
    axes[1].set_xscale("log")
    axes[0].legend()
    figure.suptitle("Audit time, 2 CPU cores" if torch.get_num_threads() == 2 else "Audit time")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _calibration_seeds() -> str:
    return ", ".join(f"{block.start}-{block.stop - 1}" for block in SEED_BLOCKS["supervised"])


def cells_line(plan: Plan) -> str:
    """Which seeds and targets each architecture pair was audited on (the suspects' seed;
    the witness is a clean model of the next seed)."""
    seeded: dict[str, list[str]] = defaultdict(list)
    for _, (first, second), seed, target in plan.cells():
        seeded[f"{first}/{second}"].append(f"{seed} (target {target})")
    return "; ".join(f"{pair} {', '.join(cells)}" for pair, cells in seeded.items())


def write_report(plan: Plan, results: Results, out: Path, plot: Path, seconds: float) -> None:
    ablated = {f"{a}/{b}" for a, b in plan.arch_pairs[: plan.ablation_arch_pairs]}
    detectors = ["crossaudit", "Neural Cleanse", *(detector_name(a) for a in plan.ablations if a != "full")]
    times = "\n".join(
        f"| {d} | {results.mean(d):.1f} | {statistics.median(t.wall for t in results.pair_times[d]):.1f} | "
        f"{results.mean(d, 'cpu'):.1f} |"
        for d in detectors
    )
    scaling = "\n".join(
        f"| {r['label']} | {r['crossaudit_s']:.1f} | {r['inversion_s']:.1f} | {r['neural_cleanse_s']:.1f} | "
        f"{r['neural_cleanse_s'] / r['crossaudit_s']:.2f}x | {r['verdict']} |"
        for r in results.scaling
    )
    vulnerability = ", ".join(f"{k} {100 * v:.0f}%" for k, v in results.vulnerability.items())
    kept = {markers: existing_section(out, markers) for markers in MARKED}
    out.write_text(f"""# Detection benchmark: crossaudit vs Neural Cleanse

Command: `python -m benchmarks.detection --plan {plan.name}`{" (run by `make bench`)" if plan.name == DEFAULT_PLAN else ""},
finished {time.strftime("%Y-%m-%d %H:%M")} in {seconds / 60:.1f} min on {platform.machine()},
{torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__},
crossaudit {__version__}.

Zoo: datasets {", ".join(plan.datasets)}; architecture pairs (suspect/witness)
{", ".join(f"{a}/{b}" for a, b in plan.arch_pairs)}; attacks {", ".join(plan.attacks)} and clean; test
seed and target per architecture pair: {cells_line(plan)}.
Each model of each pair is one sample; clean models include every witness and an adversarially
vulnerable clean MLP/CNN pair per dataset (FGSM error at eps 0.03: {vulnerability}).
Thresholds: the shipped per-dataset profiles from `crossaudit calibrate` (clean pairs, seeds {_calibration_seeds()},
no backdoored model); nothing here is fitted to these pairs. Neural Cleanse: anomaly index >= 2
({plan.neural_cleanse.steps} steps per class). Scores for AUROC: crossaudit's score / threshold, Neural
Cleanse's anomaly index. Bootstrap: {plan.bootstrap} rounds. Intervals on detection and
false-positive rates: exact (Clopper-Pearson) 95%.

## Targets

{targets_line(results)}

## Detection

{detector_table(results, "crossaudit", plan.bootstrap)}

{detector_table(results, "Neural Cleanse", plan.bootstrap)}

**crossaudit by architecture pair** (the adversarially vulnerable pair not included):

{arch_pair_table(results)}

**crossaudit by dataset** (backdoored models flagged are detections; clean ones, false positives):

{dataset_table(results)}

## Screens

Every trigger family first screens every target with each model alone, and cross-examines
only the targets its screen ranks most economical against the peer (`inversion.cross_invert`).
A screen may prune only what it does not lose: for each backdoored model, the planted target's
rank in each screen of it, and whether the family cross-examined it to the end (patch: the
first round keeps two targets per direction, the second one; blend and warp keep one). The label statistic (the suspect's mean
probability of each class on clean images of other classes, less the witness's) was measured as
a free screen before any optimisation; nothing uses it.

{screens_table(results)}

**crossaudit's misjudged models** (files are `dataset_arch_attack_target_seed`; a clean
model is judged in every pair it is part of, so a witness can appear more than once):

{misjudged_table(results)}

## Ablations (on the {", ".join(f"{a}/{b}" for a, b in plan.arch_pairs[: plan.ablation_arch_pairs])} pairs)

No witness and no CKA term are audited again and judged by the shipped thresholds.
Fine-tuning scored rescores the full audit's findings and is judged by the thresholds
the calibration's rule sets for that score on the calibration's own clean findings
(`docs/{CALIBRATION_FINDINGS.name}`): {_finetune_thresholds_line(plan)}.

{chr(10).join(detector_table(results, detector_name(d), plan.bootstrap, ablated) + chr(10) for d in plan.ablations)}

## Time per pair (seconds; crossaudit audits both models, Neural Cleanse runs on both)

Both detectors get the same cores, one torch thread per job: crossaudit runs its two
directions side by side, Neural Cleanse splits each model's classes over the threads.
Neural Cleanse, a seeded single-model detector, judges each model once (a witness's
judgement is reused in its cell's other pairs), and each pair is charged both its models'
times (`neural_cleanse_pair`). CPU seconds count every thread, so they compare the work
whatever the scheduling.

| detector | mean wall | median wall | mean CPU |
|---|---|---|---|
{times}

Neural Cleanse / crossaudit time ratio (means): {results.speedup():.2f}x wall clock,
{results.speedup("cpu"):.2f}x CPU.

## Scaling (one clean pair each; `{plot.name}`)

| task / model | crossaudit s | of which inversion s | Neural Cleanse s | NC / crossaudit | verdict |
|---|---|---|---|---|---|
{scaling}

![scaling]({plot.name})
""")  # noqa: E501
    for markers, text in kept.items():
        if text:
            write_section(text, out, markers)


def _finetune_thresholds_line(plan: Plan) -> str:
    """The fine-tuning-scored thresholds beside the shipped ones, per dataset of the plan."""

    def families(per_family: dict[str, float]) -> str:
        return ", ".join(f"{family} {value:.2f}" for family, value in per_family.items())

    lines = []
    for dataset in plan.datasets:
        ours, shipped = finetune_scored_thresholds(dataset), load_thresholds(dataset)
        line = f"{dataset} {families(ours.per_family)} (shipped {families(shipped.per_family)})"
        if ours.similar_per_family is not None and shipped.similar_per_family is not None:
            line += (
                f", alike pairs {families(ours.similar_per_family)} (shipped {families(shipped.similar_per_family)})"
            )
        lines.append(line)
    return "; ".join(lines)


def headline(plan: Plan, results: Results) -> dict[str, object]:
    """The run's headline for README and the docs' home page (`benchmarks.headline`)."""
    detectors = []
    for name in ("crossaudit", "Neural Cleanse"):
        samples = [s for s in results.samples if s.detector == name]
        positives, negatives = [s for s in samples if s.positive], [s for s in samples if not s.positive]
        distinct_flagged, distinct = distinct_models_flagged(negatives)
        scores = np.array([s.score for s in positives]), np.array([s.score for s in negatives])
        detectors.append({
            "name": name, "backdoored": len(positives), "detected": sum(s.flagged for s in positives),
            "clean_judgements": len(negatives), "flagged": sum(s.flagged for s in negatives),
            "distinct_clean": distinct, "distinct_flagged": distinct_flagged, "auroc": round(auroc(*scores), 3),
            "wall_s": round(results.mean(name), 1), "cpu_s": round(results.mean(name, "cpu"), 1),
        })  # fmt: skip
    attacks = sorted({s.attack for s in results.samples if s.positive})
    models = len({s.model for s in results.samples if s.detector == "crossaudit" and not s.positive})
    return {
        "command": f"python -m benchmarks.detection --plan {plan.name}",
        "finished": time.strftime("%Y-%m-%d %H:%M"),
        "cores": torch.get_num_threads(),
        "zoo": f"{detectors[0]['backdoored']} backdoored and {models} clean models "
        f"({', '.join(plan.datasets)}; {len(attacks)} attacks)",
        "detectors": detectors,
    }


def write_findings(results: Results, out: Path) -> None:
    """Every model crossaudit's full audit judged, with its findings and its pair's
    similarity: enough to score the same triggers again (`verdict.Finding.score`,
    `verdict.Thresholds.for_pair`) when the score changes."""
    judged = [dataclasses.asdict(s) for s in results.samples if s.detector == "crossaudit"]
    out.write_text(json.dumps(judged, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--plan", choices=sorted(PLANS), default=DEFAULT_PLAN, help="zoo size (full: about 3 h)")
    parser.add_argument("--quick", action="store_true", help="the smoke plan (same as --plan quick)")
    parser.add_argument("--out", type=Path, default=None, help="report path (default docs/benchmarks[-quick].md)")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else args.plan]
    out = args.out or Path("docs") / ("benchmarks-quick.md" if plan.name == "quick" else "benchmarks.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = Results()
    with tempfile.TemporaryDirectory() as tmp:
        zoo = Zoo(Path(tmp))
        run_pairs(plan, zoo, results)
        run_scaling(plan, zoo, results)
    plot = out.with_name(out.stem + "_scaling.png")
    plot_scaling(results, plot)
    write_report(plan, results, out, plot, time.perf_counter() - start)
    write_findings(results, out.with_name(out.stem + "_findings.json"))
    summary = out.with_name(out.stem + "_headline.json")
    summary.write_text(json.dumps(headline(plan, results), indent=1) + "\n")
    if summary.resolve() == HEADLINE:  # the run README and the docs' home page quote
        write_pages()
    print(out.read_text())


if __name__ == "__main__":
    main()
