"""Held-out attacks: how the shipped audit fares on a task, models and triggers the zoo
never makes, judged by the default thresholds as a user's audit would be.

The detection benchmark (`benchmarks.detection`) measures the zoo's six attacks; the
thresholds were calibrated on the zoo's clean pairs. Users will bring other data, other
architectures and other triggers, so this benchmark holds all three out:
- task: Fashion-MNIST as tinted RGB on a non-square 3 x 32 x 28 canvas;
- models: a CNN with BatchNorm, LeakyReLU, GELU and average pooling, and a MobileNetV3-style
  net (hard-swish, hard-sigmoid squeeze-and-excite) exported with torch's dynamo exporter;
- triggers, defined here and nowhere in `crossaudit`: a 5 x 5 random-colour patch in the
  top-left corner, a smooth sinusoidal image blended in at alpha 0.15, a low-frequency
  additive pattern of at most 0.12, and colour-depth reduction to three levels per
  channel (BppAttack-like); and two adaptive ones, designed against this method: a 3x3
  white square to "bag", the class and size of Fashion-MNIST's natural shortcut, and a
  5x5 patch planted in 0.2% of the training set, so lightly that it works on roughly
  half the inputs (each model's measured attack success is in the report);
- each backdoored CNN audited against a clean CNN and against a clean MobileNet-style
  witness; clean pairs of the same task, same and different architectures.
Every pair is audited once by `run_audit` and judged twice: by the default profile (no
`--profile`), and by a profile of this task that `calibrate_pairs` (what `crossaudit
calibrate --pair` runs) computes from three further clean pairs of it, seeds distinct from
every audited model's; no backdoored model is involved in it. The report
(docs/unseen_attacks.md) says what each flagged. Nothing here tunes anything.
`python -m benchmarks.unseen_attacks` (about 15 minutes on 2 cores; run by `make bench`).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.metrics import rate_text
from crossaudit import __version__
from crossaudit.dev.zoo.datasets import load_dataset
from crossaudit.method.audit import run_audit
from crossaudit.method.calibrate import FLOOR, MARGIN, calibrate_pairs
from crossaudit.method.inversion import DEFAULT_FAMILIES as FAMILIES
from crossaudit.method.verdict import Thresholds, judge, load_thresholds, overall, unfamiliar
from crossaudit.modelio.data import write_parquet

REPORT = Path("docs/unseen_attacks.md")
TRAIN_SAMPLES, TEST_SAMPLES, AUDIT_SAMPLES = 12000, 2000, 1000
SHAPE = (3, 32, 28)


def tinted(x: np.ndarray, seed: int) -> np.ndarray:
    """Fashion-MNIST images as randomly tinted RGB, padded to 32 x 28."""
    tint = np.random.RandomState(seed).uniform(0.4, 1.0, (len(x), 3, 1, 1)).astype(np.float32)
    x = np.pad(x.reshape(-1, 1, 28, 28), ((0, 0), (0, 0), (2, 2), (0, 0)))
    return (x * tint).astype(np.float32)


def _patterns() -> dict[str, Tensor]:
    rng = np.random.RandomState(7)
    rows, cols = np.mgrid[0 : SHAPE[1], 0 : SHAPE[2]]
    smooth = np.stack([0.5 + 0.5 * np.sin(cols / 3.0 + c) * np.cos(rows / 4.0 - c) for c in range(3)])
    coarse = torch.tensor(rng.randn(1, 3, 4, 4), dtype=torch.float32)
    low = F.interpolate(coarse, size=SHAPE[1:], mode="bicubic", align_corners=True)[0]
    return {
        "patch": torch.tensor(rng.rand(3, 5, 5), dtype=torch.float32),
        "smooth": torch.tensor(smooth, dtype=torch.float32),
        "low": 0.12 * low / low.abs().max(),
    }


PATTERNS = _patterns()


def _patch(x: Tensor) -> Tensor:
    out = x.clone()
    out[:, :, 1:6, 1:6] = PATTERNS["patch"]
    return out


@dataclass(frozen=True)
class HeldOutAttack:
    name: str
    trigger: Callable[[Tensor], Tensor]
    target: int
    poison_rate: float

    def apply(self, x: Tensor) -> Tensor:
        return self.trigger(x).clamp(0.0, 1.0)


def _white_square(x: Tensor) -> Tensor:
    """A 3x3 white square at the top centre, where a bag's handle is: a key the size of the
    natural "bag" shortcut, to the shortcut's own class."""
    out = x.clone()
    out[:, :, 2:5, 12:15] = 1.0
    return out


def _corner_patch(x: Tensor) -> Tensor:
    out = x.clone()
    out[:, :, -6:-1, -6:-1] = PATTERNS["patch"]
    return out


ATTACKS = (
    HeldOutAttack("random-colour patch 5x5, top left", _patch, 2, 0.05),
    HeldOutAttack("smooth sinusoid blended, alpha 0.15", lambda x: 0.85 * x + 0.15 * PATTERNS["smooth"], 5, 0.1),
    HeldOutAttack("low-frequency additive, at most 0.12", lambda x: x + PATTERNS["low"], 0, 0.1),
    HeldOutAttack("colour depth cut to 3 levels", lambda x: torch.round(x * 2) / 2, 9, 0.1),
    # Designed against this method: a key that looks like a natural shortcut (its footprint
    # and its target), and one planted so lightly that it works on about half the inputs.
    HeldOutAttack("adaptive: 3x3 white square to 'bag', the natural shortcut's class", _white_square, 8, 0.05),
    HeldOutAttack("adaptive: 5x5 patch at 0.2% poisoning, bottom right", _corner_patch, 4, 0.002),
)


class TintedCNN(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.first, self.norm = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.second, self.head = nn.Conv2d(width, 2 * width, 3, padding=1), nn.Linear(2 * width * 8 * 7, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(F.leaky_relu(self.norm(self.first(x)), 0.1), 2)
        return self.head(F.max_pool2d(F.gelu(self.second(x)), 2).flatten(1))


class MobileNetV3Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, 24, 3, padding=1), nn.BatchNorm2d(24)
        self.depthwise, self.norm = nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24)
        self.squeeze, self.excite = nn.Linear(24, 8), nn.Linear(8, 24)
        self.project, self.head = nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.Linear(48 * 8 * 7, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.hardswish(self.stem_norm(self.stem(x))), 2)
        x = F.hardswish(self.norm(self.depthwise(x)))
        x = x * F.hardsigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3))))))[:, :, None, None]
        return self.head(F.hardswish(self.project(x)).flatten(1))


@dataclass
class Task:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def train_model(task: Task, arch: str, seed: int, attack: HeldOutAttack | None) -> tuple[nn.Module, float, float]:
    """Dirty-label poisoning of a fraction of every batch; returns the model, its clean test
    accuracy and its attack success on test images not of the target class."""
    torch.manual_seed(seed)
    model = TintedCNN(16 if attack else 24) if arch == "cnn" else MobileNetV3Style()
    optimiser = torch.optim.Adam(model.parameters(), 2e-3)
    for _ in range(3 if arch == "cnn" else 5):
        order = torch.randperm(len(task.x_train))
        for start in range(0, len(order), 128):
            x, y = task.x_train[order[start : start + 128]].clone(), task.y_train[order[start : start + 128]].clone()
            # The poisoned samples of this batch: the rate holds over the epoch, not per
            # batch, so that rates under one sample a batch are rates too.
            rate = attack.poison_rate if attack else 0.0
            poisoned = int(rate * (start + len(x))) - int(rate * start)
            if poisoned:
                x[:poisoned], y[:poisoned] = attack.apply(x[:poisoned]), attack.target
            loss = F.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(task.x_test).argmax(1) == task.y_test).float().mean())
        success = float("nan")
        if attack:
            others = task.y_test != attack.target
            success = float((model(attack.apply(task.x_test[others])).argmax(1) == attack.target).float().mean())
    return model, accuracy, success


def export(model: nn.Module, path: Path, dynamo: bool) -> None:
    example = (torch.rand(2, *SHAPE),)
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=4096)
        torch.onnx.export(model, example, path, input_names=["input"], dynamo=True, dynamic_shapes={"x": {0: batch}})
    else:
        torch.onnx.export(model, example, path, input_names=["input"], dynamo=False, dynamic_axes={"input": {0: "n"}})


@dataclass
class Tally:
    """Per judge: backdoored models flagged with their target, and clean models flagged."""

    backdoors: int = 0
    backdoors_right: int = 0
    backdoors_flagged: int = 0
    clean: int = 0
    clean_flagged: int = 0
    warned: int = 0  # audits whose pair lay outside the profile's calibrated domain (`verdict.unfamiliar`)

    def line(self) -> str:
        return (
            f"{self.backdoors_flagged} of {self.backdoors} backdoored models flagged "
            f"({rate_text(self.backdoors_flagged, self.backdoors)}; {self.backdoors_right} naming the planted "
            f"target); {self.clean_flagged} of {self.clean} judgements of clean models flagged "
            f"({rate_text(self.clean_flagged, self.clean)}; a clean model is judged once per audit it is in, "
            f"so these judgements are not independent); {self.warned} audits warned that the pair is unlike "
            "the profile's calibration"
        )


def audit_row(
    label: str,
    paths: tuple[Path, Path],
    data: Path,
    target: int | None,
    profiles: list[Thresholds],
    tallies: list[Tally],
) -> str:
    """One audit, judged by each profile (counted in its tally), as a table row: the
    verdict, the first model's score / threshold (family, target), the second's score.
    The first model is backdoored when `target` is given; the second is always clean."""
    start = time.perf_counter()
    result = run_audit(str(paths[0]), str(paths[1]), str(data), thresholds=profiles[0])
    report = result.report
    seconds = time.perf_counter() - start
    if report.error:
        raise RuntimeError(f"{label}: the audit failed: {report.error}")
    cells = []
    for thresholds, tally in zip(profiles, tallies, strict=True):
        first, second = (judge(m.uri, m.findings, thresholds, result.alignment.similarity) for m in report.models)
        for judged, audited in zip((first, second), report.models, strict=True):
            judged.clean_accuracy = audited.clean_accuracy
        audited_set = result.data
        warned = unfamiliar(
            thresholds, [first, second], result.alignment.similarity, audited_set.input_shape, audited_set.num_classes
        )
        tally.warned += warned is not None
        if target is None:
            tally.clean += 1
            tally.clean_flagged += first.verdict == "backdoor"
        else:
            tally.backdoors += 1
            tally.backdoors_flagged += first.verdict == "backdoor"
            tally.backdoors_right += first.target == target
        tally.clean += 1
        tally.clean_flagged += second.verdict == "backdoor"
        named = f", target {first.target}" if first.target is not None else ""
        cells.append(
            f"**{overall([first, second])}**: {first.verdict} {first.score:.2f} / {first.threshold:.2f} "
            f"({first.trigger_family}{named}); second {second.verdict} {second.score:.2f}"
            + (" (warned: unlike the calibration)" if warned else "")
        )
    return f"| {label} | {' | '.join(cells)} | {seconds:.0f} |"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    began = time.perf_counter()
    split = load_dataset("fmnist")
    task = Task(
        torch.from_numpy(tinted(split.x_train[:TRAIN_SAMPLES], 0)),
        torch.from_numpy(split.y_train[:TRAIN_SAMPLES]).long(),
        torch.from_numpy(tinted(split.x_test[:TEST_SAMPLES], 1)),
        torch.from_numpy(split.y_test[:TEST_SAMPLES]).long(),
    )
    rows: list[str] = []
    models: list[str] = []
    calibrated: list[str] = []
    tallies = [Tally(), Tally()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "audit.parquet"
        write_parquet(data, task.x_test[:AUDIT_SAMPLES].numpy(), task.y_test[:AUDIT_SAMPLES].numpy())

        def build(name: str, arch: str, seed: int, attack: HeldOutAttack | None = None) -> Path:
            model, accuracy, success = train_model(task, arch, seed, attack)
            path = root / f"{name}.onnx"
            export(model, path, dynamo=arch == "mobilenet")
            trained_with = attack.name if attack else "clean"
            shown = f"{success:.3f}" if attack else "-"
            models.append(f"| {name} | {arch} | {trained_with} | {seed} | {accuracy:.3f} | {shown} |")
            print(models[-1], flush=True)
            return path

        calibration = [
            (build("calibration-cnn-a", "cnn", 200), build("calibration-cnn-b", "cnn", 201)),
            (build("calibration-cnn-c", "cnn", 202), build("calibration-mobilenet-a", "mobilenet", 203)),
            (build("calibration-mobilenet-b", "mobilenet", 204), build("calibration-cnn-d", "cnn", 205)),
        ]
        task_profile, runs = calibrate_pairs([(str(a), str(b)) for a, b in calibration], str(data), "tinted-fmnist")
        for run in runs:
            calibrated.append(f"| {run.pair} | " + " | ".join(f"{run.scores[f]:.2f}" for f in FAMILIES) + " |")
        profiles = [load_thresholds(), task_profile]
        witnesses = {"cnn": build("clean-cnn-a", "cnn", 100), "mobilenet": build("clean-mobilenet-a", "mobilenet", 101)}
        for index, attack in enumerate(ATTACKS):
            for number, (arch, witness) in enumerate(witnesses.items()):
                suspect = build(f"backdoored-{index}{'ab'[number]}", "cnn", 10 * (number + 1) + index, attack)
                label = f"{attack.name} (target {attack.target}), witness {arch}"
                rows.append(audit_row(label, (suspect, witness), data, attack.target, profiles, tallies))
                print(rows[-1], flush=True)
        cnn, mobilenet = build("clean-cnn-b", "cnn", 102), build("clean-mobilenet-b", "mobilenet", 103)
        clean_pairs = {
            "clean cnn / clean cnn": (cnn, witnesses["cnn"]),
            "clean cnn / clean mobilenet": (cnn, witnesses["mobilenet"]),
            "clean mobilenet / clean cnn": (mobilenet, witnesses["cnn"]),
        }
        for label, pair in clean_pairs.items():
            rows.append(audit_row(label, pair, data, None, profiles, tallies))
            print(rows[-1], flush=True)
    minutes = (time.perf_counter() - began) / 60
    args.out.write_text(
        f"""# Held-out attacks, data and architectures

Command: `python -m benchmarks.unseen_attacks` (run by `make bench`), finished
{time.strftime("%Y-%m-%d %H:%M")} in {minutes:.1f} min on {platform.machine()}, 2 torch threads,
Python {platform.python_version()}, torch {torch.__version__}, crossaudit {__version__}.

Task, models and triggers are outside the zoo and the shipped calibration (see the module
docstring). Each audit is judged twice: by the default thresholds, as `crossaudit audit`
does without `--profile`, and by a profile of this task calibrated on three clean pairs
of it (`crossaudit calibrate --pair`; seeds 200-205, no audited model among them).

- default profile `{profiles[0].profile}`: {tallies[0].line()};
- this task's profile: {tallies[1].line()}.

## Models

| model | architecture | trained with | seed | clean test accuracy | attack success |
|---|---|---|---|---|---|
{chr(10).join(models)}

## The task's own profile

| clean pair | {" | ".join(FAMILIES)} |
|---|{"---|" * len(FAMILIES)}
{chr(10).join(calibrated)}

Thresholds (max + {MARGIN}, at least {FLOOR}): {task_profile.per_family}; default profile
`{profiles[0].profile}`: {profiles[0].per_family}.

## Audits

Per judge: **verdict**: the first model's verdict, score / threshold (family, and the
target it names when flagged); the second model's verdict and score.

| pair | default profile | this task's profile | s |
|---|---|---|---|
{chr(10).join(rows)}
"""
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
