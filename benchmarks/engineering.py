"""What engineering buys a trigger-search step, each option measured against the plain one.

One step of the search is a patch stamped on a batch, the suspect and the witness run
forward and backward through their ONNX translations, and Adam on the trigger. This times
that step on two zoo CNNs of Fashion-MNIST (`zoo.train`), as the audit runs it, and with
each option: bf16 autocast (the trigger parameters stay fp32), channels-last inputs, and
`torch.compile` of each model (its compile time reported apart). The audit keeps only
what is faster here; `python -m benchmarks.engineering` (part of `make bench`) writes its
section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.sections import ENGINEERING, write_section
from crossaudit.dev.zoo.datasets import load_dataset
from crossaudit.dev.zoo.train import config_for, export_onnx, train
from crossaudit.method.inversion import PatchTrigger
from crossaudit.modelio.loaders import load_model

BATCH = 120  # a step of the blend and warp screens on 10 targets is 80; the patch rounds' up to 48
STEPS = 30
REPEATS = 3


def _models(root: Path) -> list[torch.nn.Module]:
    split = load_dataset("fmnist")
    modules = []
    for seed in (500, 501):
        trained = train(config_for("fmnist", arch="cnn", seed=seed), split)
        export_onnx(trained.model, trained.example, root / f"{seed}.onnx")
        modules.append(load_model(str(root / f"{seed}.onnx")).module.requires_grad_(False).eval())
    return modules


def _step_time(models: list[torch.nn.Module], x: torch.Tensor, autocast: bool) -> float:
    """Median seconds per step over `REPEATS` runs of `STEPS` steps."""
    family = PatchTrigger(10, tuple(x.shape[1:]))
    optimiser = torch.optim.Adam(family.parameters(), lr=0.1)
    which = torch.arange(len(x)) % 10
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(STEPS):
            context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
            with context:
                stamped = family(x, which)
                loss = sum(F.cross_entropy(model(stamped).float(), which) for model in models)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        times.append((time.perf_counter() - start) / STEPS)
    return statistics.median(times)


@contextlib.contextmanager
def _timed(label: str, seconds: dict[str, float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[label] = time.perf_counter() - start


def measure(root: Path) -> tuple[dict[str, float], dict[str, float]]:
    models = _models(root)
    x = torch.from_numpy(load_dataset("fmnist").x_test[:BATCH])
    variants: dict[str, Callable[[], float]] = {
        "fp32 (what the audit runs)": lambda: _step_time(models, x, autocast=False),
        "bf16 autocast": lambda: _step_time(models, x, autocast=True),
        "channels-last input": lambda: _step_time(models, x.contiguous(memory_format=torch.channels_last), False),
    }
    steps = {label: run() for label, run in variants.items()}
    extra: dict[str, float] = {}
    try:
        with _timed("torch.compile: compile time", extra):
            compiled = [torch.compile(model) for model in models]
            _step_time(compiled, x[:12], autocast=False)
        steps["torch.compile"] = _step_time(compiled, x, autocast=False)
    except Exception as exc:  # inductor needs a C++ toolchain; say so rather than fail the benchmark
        extra[f"torch.compile failed: {type(exc).__name__}"] = float("nan")
    return steps, extra


def section(steps: dict[str, float], extra: dict[str, float], seconds: float) -> str:
    plain = steps["fp32 (what the audit runs)"]
    rows = "\n".join(f"| {label} | {1000 * t:.1f} | {plain / t:.2f}x |" for label, t in steps.items())
    notes = "; ".join(f"{label}: {value:.1f} s" for label, value in extra.items())
    return f"""{ENGINEERING[0]}
## Engineering options for a search step

Command: `python -m benchmarks.engineering` (part of `make bench`), finished {time.strftime("%Y-%m-%d %H:%M")}
in {seconds / 60:.1f} min on {platform.machine()} ({platform.processor() or "cpu"}), {torch.get_num_threads()} torch
threads, torch {torch.__version__}. A patch-search step on {BATCH} Fashion-MNIST images through two zoo CNNs
(their ONNX translations), forward and backward; median of {REPEATS} runs of {STEPS} steps. {notes}

| option | ms per step | speed-up over fp32 |
|---|---|---|
{rows}
{ENGINEERING[1]}"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs") / "benchmarks.md")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        steps, extra = measure(Path(tmp))
    text = section(steps, extra, time.perf_counter() - start)
    write_section(text, args.out, ENGINEERING)
    print(text)


if __name__ == "__main__":
    main()
