"""What every paradigm's audit shares: the interface each paradigm implements
(`ParadigmAudit`), the configuration, the result, the stage clock and the layer
alignment. The image audit (`image_audit`) and the language-model audit (`text_audit`)
build on these and not on each other; `audit.run_audit` runs either."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from crossaudit.errors import IncomparableModelsError, TimeBudgetError
from crossaudit.limits import Limits
from crossaudit.method.cka import Alignment, align_layers
from crossaudit.method.inversion import InversionConfig, Trigger
from crossaudit.method.sensitivity import SensitivityConfig
from crossaudit.method.verdict import AuditReport, ModelReport, Thresholds
from crossaudit.modelio.data import AuditData
from crossaudit.paradigms import AUTO

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AuditConfig:
    inversion: InversionConfig = field(default_factory=InversionConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    holdout_fraction: float = 0.5
    feature_samples: int = 500
    min_accuracy: float = 0.5
    min_agreement: float = 0.6
    min_cka: float = 0.2
    paradigm: str = AUTO
    limits: Limits = field(default_factory=Limits.from_env)


@dataclass
class AuditResult:
    """The report plus the recovered triggers and the CKA matrix, for pictures."""

    report: AuditReport
    alignment: Alignment | None = None
    triggers: dict[int, list[Trigger]] = field(default_factory=dict)
    data: AuditData | None = None
    # Per trigger family, each direction's screen merit of every target (`inversion.Examination`).
    screens: dict[str, list[np.ndarray]] = field(default_factory=dict)


class StageClock:
    """Stage timings, and the time budget: checked as each stage ends."""

    def __init__(self, progress: Progress, budget_s: float) -> None:
        self.timings: dict[str, float] = {}
        self.progress = progress
        self.budget_s = budget_s
        self.started = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.progress(f"{name}...")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - start, 3)
        elapsed = time.perf_counter() - self.started
        if elapsed > self.budget_s:
            raise TimeBudgetError(
                f"audit exceeded its time budget of {self.budget_s:g}s ({elapsed:.0f}s after {name}); "
                "raise CROSSAUDIT_TIME_BUDGET_S to allow more"
            )


def pair_alignment(features: list[dict[str, np.ndarray]], config: AuditConfig) -> Alignment:
    """Stage 2: the best-aligned layer pair; too little alignment is inconclusive."""
    alignment = align_layers(*features)
    if alignment.cka < config.min_cka:
        raise IncomparableModelsError(f"no layer pair aligns: best CKA {alignment.cka:.3f} < {config.min_cka}")
    return alignment


class PreparedPair(Protocol):
    """Two loaded, parity-checked, comparable models and the audit data split between the
    search and held-out measurement: what every stage after loading starts from."""

    reports: list[ModelReport]
    agreement: float

    @property
    def paradigm(self) -> str: ...

    @property
    def data(self) -> AuditData | None: ...  # images; None for text

    def parity_checks(self) -> list[dict[str, float]]: ...


class ParadigmAudit(Protocol):
    """One learning paradigm's way through the five stages: what changes between paradigms
    is how models are read and attacked, never the order of the stages, how a verdict is
    reached or what fails closed. `audit.run_audit` runs the stages in one process; the
    pipeline runs each in its own component, with the stages' results written between them
    (`write_triggers`, `read_triggers`, `write_measured`, `read_measured`), and the gate
    judges what the last one wrote. So nothing outside the implementations (`image_audit`,
    `text_audit`) asks which paradigm a pair is."""

    def prepare(
        self, uris: list[str], data_path: str, seed: int, device: str, config: AuditConfig,
        checked: Mapping[str, float | None] | None = None,
    ) -> Any: ...  # fmt: skip

    def features(self, pair: Any, config: AuditConfig) -> list[dict[str, np.ndarray]]: ...

    def triggers(self, pair: Any, alignment: Alignment, config: AuditConfig, seed: int) -> Any: ...

    def measure(self, pair: Any, alignment: Alignment, found: Any, config: AuditConfig, seed: int) -> Any: ...

    def judge(
        self, reports: list[ModelReport], measured: Any, thresholds: Thresholds, alignment: Alignment,
        data: AuditData | None,
    ) -> list[ModelReport]: ...  # fmt: skip

    def read_data(self, path: Path, limits: Limits) -> AuditData | None: ...

    def write_triggers(self, found: Any, pair: Any, out: Path) -> int: ...

    def read_triggers(self, folder: Path, device: str) -> Any: ...

    def write_measured(self, measured: Any, out: Path) -> int: ...

    def read_measured(self, folder: Path) -> Any: ...

    def recovered(self, found: Any) -> tuple[dict[int, list[Trigger]], dict[str, list[np.ndarray]]]:
        """The triggers to draw per model, and each family's screen of every target."""
        ...
