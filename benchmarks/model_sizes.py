"""What an audit of a model of realistic size costs: crossaudit and Neural Cleanse on clean
pairs of a ResNet-18 at two widths (16 and the full 64: 0.7M and 11.2M parameters) and a small ViT, on
32x32 colour images (`zoo.datasets.colour_fashion_mnist`), on CPU and, where one is
present, on a CUDA GPU.

`python -m benchmarks.model_sizes` (part of `make bench`) writes its section of
docs/benchmarks.md. Each pair is two independently seeded models of one architecture,
trained briefly (the cost of an audit depends on the model's size, not on how well it
learned). crossaudit runs its full audit. Neural Cleanse's full schedule (300 steps per
class) on a ResNet-18 takes most of an hour per model on 2 cores, so it runs on the pair's
first model at two short schedules and its time is extrapolated linearly in steps (what
its loop is: the same step, `steps` times per class), then doubled for the pair; the
table says so beside each number.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.detection import Timing, neural_cleanse_model
from benchmarks.sections import MODEL_SIZES, write_section
from crossaudit import __version__
from crossaudit.dev.baselines.neural_cleanse import NeuralCleanseConfig
from crossaudit.dev.zoo.datasets import load_dataset
from crossaudit.dev.zoo.train import config_for, export_onnx, train, write_audit_set
from crossaudit.method.audit import run_audit
from crossaudit.modelio.loaders import load_model

ARCHS = ("resnet18-w16", "resnet18", "vit")
SEEDS = (400, 401)
DATASET = "cfmnist"
TRAINING = {"epochs": 3, "train_size": 3000}
AUDIT_SIZE = 500
# Neural Cleanse's two short schedules, in steps per class (its full one is
# NeuralCleanseConfig().steps), after a warm-up run of the first, so that neither carries
# one-off costs the extrapolation would multiply.
SHORT_STEPS = (8, 24)
BEGIN, END = MODEL_SIZES


@dataclass
class Row:
    arch: str
    parameters: int
    accuracy: tuple[float, float]
    device: str
    crossaudit: Timing
    inversion_s: float
    verdict: str
    neural_cleanse_s: float

    @property
    def ratio(self) -> float:
        return self.neural_cleanse_s / self.crossaudit.wall


def neural_cleanse_extrapolated(path: Path, data: Path) -> float:
    """Neural Cleanse's wall seconds for one model at its full schedule (on CPU), from two
    short ones: a line through (steps, seconds) read at the full step count."""
    full = NeuralCleanseConfig().steps
    neural_cleanse_model(path, data, NeuralCleanseConfig(steps=SHORT_STEPS[0]))  # warm-up
    (short, t_short), (long, t_long) = [
        (steps, neural_cleanse_model(path, data, NeuralCleanseConfig(steps=steps))[1].wall) for steps in SHORT_STEPS
    ]
    per_step = (t_long - t_short) / (long - short)
    return t_long + per_step * (full - long)


def measure(root: Path, devices: list[str]) -> list[Row]:
    split = load_dataset(DATASET)
    data = root / "audit.parquet"
    write_audit_set(DATASET, data, size=AUDIT_SIZE)
    rows = []
    for arch in ARCHS:
        paths, accuracy = [], []
        for seed in SEEDS:
            trained = train(config_for(DATASET, arch=arch, seed=seed, **TRAINING), split)
            path = root / f"{arch}_{seed}.onnx"
            export_onnx(trained.model, trained.example, path)
            paths.append(path)
            accuracy.append(round(trained.clean_accuracy, 3))
        parameters = sum(p.numel() for p in load_model(str(paths[0])).module.parameters())
        print(f"[model sizes] {arch}: {parameters} parameters, accuracy {accuracy}", flush=True)
        nc = 2 * neural_cleanse_extrapolated(paths[0], data)
        for device in devices:
            clock = Timing.start()
            report = run_audit(str(paths[0]), str(paths[1]), str(data), device=device).report
            timing = clock.stop()
            print(f"[model sizes] {arch} on {device}: {timing.wall:.1f} s, {report.verdict}", flush=True)
            rows.append(Row(
                arch, parameters, (accuracy[0], accuracy[1]), device, timing,
                report.timings.get("trigger_inversion", float("nan")), report.error or report.verdict, nc,
            ))  # fmt: skip
    return rows


def section(rows: list[Row], seconds: float, devices: list[str]) -> str:
    table = "\n".join(
        f"| {r.arch} | {r.parameters / 1e6:.2f} | {r.accuracy[0]:.2f}, {r.accuracy[1]:.2f} | {r.device} | "
        f"{r.crossaudit.wall:.1f} | {r.crossaudit.cpu:.1f} | {r.inversion_s:.1f} | "
        f"{r.crossaudit.wall / (r.parameters / 1e6):.1f} | {r.neural_cleanse_s:.0f} (extrapolated) | "
        f"{r.neural_cleanse_s / (r.parameters / 1e6):.1f} | {f'{r.ratio:.1f}x' if r.device == 'cpu' else 'n/a'} | "
        f"{r.verdict} |"
        for r in rows
    )
    gpu = (
        "The same audits ran on the GPU too (rows marked cuda); the GPU / CPU ratio is the ratio of their wall "
        "times. Neural Cleanse ran on CPU only, so its ratio is given for the CPU rows."
        if "cuda" in devices
        else "**GPU: not measured.** No CUDA device was present when this ran; on a machine with one, "
        "this command audits every pair on CPU and on the GPU and adds the GPU rows."
    )
    return f"""{BEGIN}
## Model sizes

Command: `python -m benchmarks.model_sizes` (part of `make bench`), finished {time.strftime("%Y-%m-%d %H:%M")}
in {seconds / 60:.1f} min on {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__},
crossaudit {__version__}. One clean pair per architecture (seeds {SEEDS[0]} and {SEEDS[1]}), colour
Fashion-MNIST at 32x32, {TRAINING["train_size"]} training images for {TRAINING["epochs"]} epochs, an audit set
of {AUDIT_SIZE} images. crossaudit: the full audit (`run_audit`), wall and CPU seconds. Neural Cleanse:
the pair's first model at {SHORT_STEPS[0]} and {SHORT_STEPS[1]} steps per class, extrapolated linearly to its
{NeuralCleanseConfig().steps} and doubled for the pair (its full schedule on a ResNet-18 would take most of an
hour per model here). The verdicts are by the default profile, which was not calibrated on this task.
{gpu}

| model | M params | accuracy | device | crossaudit wall s | CPU s | of which inversion s | s per M params | Neural Cleanse s | NC s per M params | NC / crossaudit | verdict |
|---|---|---|---|---|---|---|---|---|---|---|---|
{table}
{END}"""  # noqa: E501


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs") / "benchmarks.md")
    args = parser.parse_args(argv)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(Path(tmp), devices)
    text = section(rows, time.perf_counter() - start, devices)
    write_section(text, args.out, MODEL_SIZES)
    print(text)


if __name__ == "__main__":
    main()
