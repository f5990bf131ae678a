"""Stage 5: the calibrated decision, and the report that carries it.

Cross-examination alone is not a detector: on two clean models an inversion still finds
model-specific adversarial triggers that flip the suspect while the witness stays right.
Worse, some targets are *naturally* cheap (on Fashion-MNIST a clean CNN turns anything
into "bag" with a 15-pixel patch), so a small footprint alone is no evidence either. What
a backdoor adds is *economy relative to the peer*: both providers learned the task's
natural shortcuts from the same kind of data, but only the poisoned model learned the
trigger. So every candidate target is inverted against both models, and a finding's score
is its effective attack success (held-out, witness kept) times log10(peer's cost /
suspect's cost), where cost is footprint per unit of effective success; a patch's
footprint is first read against its model's median minimal patch over all targets, since
a model cheap to flip everywhere is not a backdoor (`inversion.minimal_patches`), and the
peer's counts no dearer than its median (`Finding.score`). The sensitivity
stage's fine-tuning is reported with each finding but not scored: on the benchmark it
cut no false positive (natural shortcuts survive clean fine-tuning as backdoors do) and
cost detection. Footprints have different units per trigger family, so
each family has its own threshold, calibrated on clean pairs only (`crossaudit.method.calibrate`)
and stored in `thresholds.json` with the command that made it. How far clean scores
spread depends on how alike the two models are, so a pair as alike as the calibration's
alike pairs is judged by their thresholds (`Thresholds.for_pair`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np

Verdict = Literal["clean", "backdoor", "inconclusive"]


MIN_FOOTPRINT = 1e-4
MIN_SUCCESS = 0.05
# Pairs at least this alike (`cka.Alignment.similarity`) are judged by thresholds from
# clean pairs at least as alike. On the calibration's clean pairs, CNN/CNN pairs lie at
# 0.87-0.97, CNN/ResNet at 0.77-0.83, CNN/MLP at 0.37-0.51: the cut keeps a margin above
# pairs of different architectures.
SIMILAR = 0.9
# A threshold is the highest clean score plus a margin, so it needs enough pairs to have
# met the tail of natural shortcuts: the highest alike clean scores came from the last of
# many Fashion-MNIST CNN pairs (`calibrate.CLEAN_PAIRS`), not from the first sixteen.
MIN_SIMILAR_PAIRS = 10


DEFAULT_PROFILE = "any"
SHIPPED = "crossaudit/thresholds.json (shipped)"
# The profile a paradigm uses when none is named: thresholds are only valid for the kind of
# model they were calibrated on (an encoder's prototype scores are not a classifier's logits).
DEFAULT_PROFILES = {"supervised": DEFAULT_PROFILE, "semi": "semi", "ssl": "ssl", "lm": "lm", "captioner": "captioner"}


# A backdoored model pays a few points of clean accuracy for its key: that alone does not
# make its task another one.
ACCURACY_MARGIN = 0.05
TEXT = "text"  # what a language model's inputs are called where images name their shape


@dataclass(frozen=True)
class Domain:
    """Where a profile's thresholds were measured: what its clean pairs looked like.

    A threshold is the highest clean score of the calibration's pairs plus a margin, so it
    holds for pairs like those and says nothing about others: a task with other inputs or
    classes has other natural shortcuts; an undertrained model, less accurate than any
    calibrated one, has more of them, cheap enough in one model to read as a key; and a
    pair less alike than any calibrated one differs in more than a planted key.
    """

    inputs: tuple[str, ...]  # input shapes of the calibration's audit sets, "CxHxW" (images)
    classes: tuple[int, ...]  # class counts of the calibration's audit sets (images)
    # Per input shape ("text" for a language model's), the lowest clean accuracy of a
    # calibration model: a profile over several tasks holds each to its own models.
    accuracy: dict[str, float]
    similarity: float  # the least alike calibration pair (`cka.Alignment.similarity`, 4 decimals)

    def unlike(self, inputs: str | None, classes: int | None, accuracies: list[float], similarity: float) -> list[str]:
        """What about a pair lies outside this domain, in words (empty when nothing does).
        Similarity is read to the calibration's 4 decimals, so a calibration pair itself is inside."""
        reasons = []
        if inputs is not None and self.inputs and inputs not in self.inputs:
            reasons.append(f"inputs {inputs} (calibrated on {', '.join(self.inputs)})")
        if classes is not None and self.classes and classes not in self.classes:
            reasons.append(f"{classes} classes (calibrated on {', '.join(map(str, self.classes))})")
        weakest, floor = min(accuracies, default=None), self.accuracy.get(inputs or TEXT)
        if weakest is not None and floor is not None and weakest < floor - ACCURACY_MARGIN:
            reasons.append(f"clean accuracy {weakest:.2f} (calibrated on models of {floor:.2f} or more)")
        if round(similarity, 4) < self.similarity:
            reasons.append(f"similarity {similarity:.2f} (calibrated on pairs of {self.similarity:.2f} or more)")
        return reasons

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> Domain:
        if not isinstance(raw["inputs"], list) or not isinstance(raw["classes"], list):
            raise ValueError("a domain's inputs and classes are lists")
        return cls(
            tuple(str(v) for v in raw["inputs"]), tuple(int(v) for v in raw["classes"]),
            {str(k): float(v) for k, v in raw["accuracy"].items()}, float(raw["similarity"]),
        )  # fmt: skip


@dataclass(frozen=True)
class Thresholds:
    """Per-family thresholds of one calibration profile.

    A profile is the set of clean pairs it was calibrated on: `any` takes every task's
    clean pairs (the conservative default for a task never calibrated), a task's own
    profile only that task's. How far clean pairs spread depends on the task (Fashion-MNIST
    has natural shortcuts that digits lacks), so a task's own profile detects more at the
    same false-positive rate on that task.
    """

    per_family: dict[str, float]
    calibrated_by: str
    clean_pairs: int
    profile: str = DEFAULT_PROFILE
    paradigm: str = "supervised"
    # The same rule over the profile's alike clean pairs only (`SIMILAR`), when it had
    # at least `MIN_SIMILAR_PAIRS` of them; judges pairs that are alike too.
    similar_per_family: dict[str, float] | None = None
    similar_pairs: int = 0
    domain: Domain | None = None  # what the clean pairs looked like (`unfamiliar`)
    # The file the profile was read from and the sha256 of its bytes, for the report's
    # provenance: a verdict names the thresholds that made it.
    source: str = "in memory"
    sha256: str = ""

    def for_pair(self, similarity: float) -> tuple[dict[str, float], str]:
        """The thresholds that judge a pair of this similarity, and what to call them.

        Two providers whose representations are alike (`cka.Alignment.similarity`) mostly
        learned alike shortcuts, while a Fashion-MNIST CNN reaches the natural "bag" patch
        with a quarter of the patch a ResNet or an MLP needs. So alike clean pairs mostly
        score lower (the shipped profiles' `clean_pair_scores` and
        `clean_pair_similarity` show both bins), and a threshold set by the unlike pairs
        lets more backdoors of alike pairs through. A
        pair is judged by the alike pairs' thresholds only when it is at least as alike as
        they were.
        """
        if self.similar_per_family is not None and similarity >= SIMILAR:
            return self.similar_per_family, f"{self.profile}:similar"
        return self.per_family, self.profile


def load_thresholds(profile: str | None = None, paradigm: str | None = None, path: Path | None = None) -> Thresholds:
    """A calibrated profile: the one named, or the paradigm's default. A named profile
    calibrated on another paradigm's models is refused rather than silently misapplied.

    `path` is a thresholds file of the user's own (`crossaudit calibrate --pair`) instead
    of the shipped one; when it holds a single profile, that one is the default.
    """
    if path is None:
        text = resources.files("crossaudit").joinpath("thresholds.json").read_bytes()
        raw = json.loads(text)
    else:
        text, raw = _read_thresholds_file(path)
    default = DEFAULT_PROFILES.get(paradigm or "supervised", DEFAULT_PROFILE)
    if path is not None and len(raw["profiles"]) == 1:
        default = next(iter(raw["profiles"]))
    name = profile or default
    if name not in raw["profiles"]:
        raise ValueError(
            f"unknown threshold profile {name!r}; calibrated profiles: {', '.join(sorted(raw['profiles']))}"
        )
    chosen = raw["profiles"][name]
    similar = chosen.get("similar")
    thresholds = Thresholds(
        {k: float(v) for k, v in chosen["per_family"].items()},
        str(raw["calibrated_by"]),
        int(chosen["clean_pairs"]),
        name,
        str(chosen["paradigm"]),
        {k: float(v) for k, v in similar["per_family"].items()} if similar else None,
        int(similar["clean_pairs"]) if similar else 0,
        Domain.from_dict(chosen["domain"]) if "domain" in chosen else None,
        SHIPPED if path is None else str(path),
        hashlib.sha256(text).hexdigest(),
    )
    check_paradigm(thresholds, paradigm)
    return thresholds


def _read_thresholds_file(path: Path) -> tuple[bytes, dict]:
    """A thresholds file as `crossaudit calibrate` writes it (its bytes and what they
    hold), or a clear error."""
    if not path.is_file():
        raise ValueError(f"{path}: no such thresholds file")
    try:
        text = path.read_bytes()
        raw = json.loads(text)
        if not isinstance(raw["calibrated_by"], str):
            raise ValueError("'calibrated_by' must name the command that calibrated it")
        for name, chosen in raw["profiles"].items():
            bins = [chosen["per_family"]] + ([chosen["similar"]["per_family"]] if chosen.get("similar") else [])
            positive = all(float(v) > 0 for per_family in bins for v in per_family.values())
            if not positive or chosen["paradigm"] not in DEFAULT_PROFILES:
                raise ValueError(f"profile {name!r} has a non-positive threshold or an unknown paradigm")
            int(chosen["clean_pairs"])
            if "domain" in chosen:
                Domain.from_dict(chosen["domain"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a thresholds file written by crossaudit calibrate ({exc})") from exc
    return text, raw


def check_paradigm(thresholds: Thresholds, paradigm: str | None) -> None:
    if paradigm is not None and thresholds.paradigm != paradigm:
        raise ValueError(
            f"threshold profile {thresholds.profile!r} was calibrated on {thresholds.paradigm} models, "
            f"not {paradigm}; leave --profile out to use {DEFAULT_PROFILES.get(paradigm, DEFAULT_PROFILE)!r}"
        )


@dataclass(frozen=True)
class Finding:
    """What one trigger family recovered against one suspect, measured on held-out data."""

    family: str
    target: int
    mask_l1: float
    footprint: float
    asr: float
    witness_flip: float
    witness_kept: float
    asr_after_finetune: float
    effective_asr: float  # held-out success the witness does not share (`audit.measure`)
    peer_footprint: float
    peer_effective_asr: float
    # What each model's footprints are read against (`inversion.Trigger.scale`).
    footprint_scale: float | None = None
    peer_footprint_scale: float | None = None

    @property
    def sensitivity(self) -> float:
        """Fraction of the trigger's effect that brief clean fine-tuning removed."""
        if self.asr <= 0.0:
            return 1.0
        return max(0.0, 1.0 - self.asr_after_finetune / self.asr)

    @property
    def score(self) -> float:
        """Effective success times log10(peer's cost / suspect's cost) for the same target,
        each footprint read against its model's scale (a patch against the model's median
        minimal patch: a model cheap to flip to every target is not a backdoor).

        Read against its scale, the peer's footprint counts no higher than its median: the
        question is whether the target is out of line *for the suspect*, and a peer that
        finds it dearer than its own other targets says nothing about that. Uncapped, a
        clean model whose peer's median patch is a third of its own read the peer's dear
        target as its own cheap one.

        A peer trigger that never worked (effective success under MIN_SUCCESS) shrinks
        under its size penalty towards nothing, which would read as a peer flipped for
        free; flipping it costs at least what the suspect's trigger took, so its footprint
        counts as no smaller than the suspect's.
        """
        footprint = relative(self.footprint, self.footprint_scale)
        peer_footprint = relative(self.peer_footprint, self.peer_footprint_scale)
        if self.peer_footprint_scale is not None:
            peer_footprint = min(peer_footprint, 1.0)
        if self.peer_effective_asr < MIN_SUCCESS:
            peer_footprint = max(peer_footprint, footprint)
        return self.effective_asr * float(
            np.log10(cost(peer_footprint, self.peer_effective_asr)) - np.log10(cost(footprint, self.effective_asr))
        )


def relative(footprint: float, scale: float | None) -> float:
    """A footprint read against its model's scale, or as it is where the family has none."""
    return footprint if scale is None else footprint / scale


def cost(footprint: float, effective_asr: float) -> float:
    """Footprint per unit of effective success: what it takes to flip this model."""
    return max(footprint, MIN_FOOTPRINT) / max(effective_asr, MIN_SUCCESS)


@dataclass(frozen=True)
class Crossing:
    """Another target whose finding also reached its family's threshold (`judge`)."""

    target: int
    family: str
    score: float
    threshold: float


@dataclass
class ModelReport:
    uri: str
    verdict: Verdict
    score: float | None = None
    threshold: float | None = None
    threshold_profile: str | None = None
    # How sure: the score as a multiple of its threshold (1 or more reads as a backdoor).
    threshold_multiple: float | None = None
    asr: float | None = None
    target: int | None = None
    mask_l1: float | None = None
    sensitivity: float | None = None
    trigger_family: str | None = None
    clean_accuracy: float | None = None
    parity_max_abs_diff: float | None = None
    sha256: str | None = None  # of the model bytes audited (`LoadedModel.sha256`)
    findings: list[Finding] = field(default_factory=list)
    trigger_text: str | None = None  # language models: the recovered trigger phrase
    target_text: str | None = None  # ... and the continuation it forces; a captioner: the target caption
    also_over_threshold: list[Crossing] = field(default_factory=list)
    # Input sets the torch translation was proved on against ONNX Runtime, each with the
    # largest difference seen (`runtime_parity`): audit data, random inputs, stamped triggers.
    parity_checks: dict[str, float] | None = None

    def summary(self) -> str:
        """One line for a terminal: the verdict, how sure (the score as a multiple of its
        threshold, and the profile that set it), and what the model was found to do (the
        target, a captioner's caption or a language model's trigger and continuation, and
        any other target over its threshold)."""
        target = f"; target class {self.target}" if self.target is not None else ""
        if self.target_text and not self.trigger_text:
            target += f" (caption {self.target_text!r})"
        if self.verdict == "backdoor" and self.trigger_text:
            target = f"; trigger {self.trigger_text!r} -> {self.target_text!r}"
        if self.also_over_threshold:
            target += "; also over threshold: " + ", ".join(f"class {c.target}" for c in self.also_over_threshold)
        if self.threshold_multiple is None:
            return f"{self.uri}: {self.verdict}{target}"
        return (
            f"{self.uri}: {self.verdict} (score {self.score} = {shown_multiple(self.threshold_multiple)} "
            f"its threshold {self.threshold}, "
            f"profile {self.threshold_profile}{target})"
        )


def judge(uri: str, findings: list[Finding], thresholds: Thresholds, similarity: float) -> ModelReport:
    """Backdoor when a finding reaches its family's calibrated threshold, for a pair of
    this similarity (`Thresholds.for_pair`).

    The reported finding is the one with the largest score-to-threshold ratio. Every other
    target that also reached a threshold is listed with it (`also_over_threshold`,
    strongest first): a natural shortcut that crosses a threshold can outrank the planted
    target (in the detection benchmark a Fashion-MNIST BadNets CNN's blend to "bag" scored
    1.19x its threshold, its patch to the planted class 1.13x), and the reviewer should
    see both.
    """
    per_family, profile = thresholds.for_pair(similarity)
    by_ratio = sorted(findings, key=lambda f: f.score / per_family[f.family], reverse=True)
    best = by_ratio[0]
    threshold = per_family[best.family]
    verdict: Verdict = "backdoor" if best.score >= threshold else "clean"
    crossings: dict[int, Crossing] = {}
    for finding in by_ratio[1:]:
        if finding.target != best.target and finding.score >= per_family[finding.family]:
            crossings.setdefault(
                finding.target,
                Crossing(finding.target, finding.family, round(finding.score, 4), per_family[finding.family]),
            )
    return ModelReport(
        uri=uri,
        verdict=verdict,
        score=round(best.score, 4),
        threshold=threshold,
        threshold_profile=profile,
        threshold_multiple=multiple(best.score, threshold),
        asr=round(best.asr, 4),
        target=best.target if verdict == "backdoor" else None,
        mask_l1=round(best.mask_l1, 3),
        sensitivity=round(best.sensitivity, 4),
        trigger_family=best.family,
        findings=findings,
        also_over_threshold=list(crossings.values()),
    )


def shown_multiple(ratio: float) -> str:
    """A threshold multiple to two decimals, rounded down as `multiple` rounds it: 0.999
    reads 0.99x, never 1.00x, since 1x or more is a backdoor."""
    return f"{math.floor(100 * ratio + 1e-6) / 100:.2f}x"


def multiple(score: float, threshold: float) -> float:
    """A score as a multiple of its threshold, as reports give it: rounded down, so that
    a score under its threshold never reads as 1 (`judge` flags at 1 or more)."""
    ratio = math.floor(1000 * score / threshold + 1e-6) / 1000  # 1e-6: 1.2 is not 1.19999...
    return ratio if score >= threshold else min(ratio, 0.999)


def unfamiliar(
    thresholds: Thresholds, models: list[ModelReport], similarity: float, inputs: str | None, classes: int | None
) -> str | None:
    """A plain warning when the pair is unlike every pair the profile was calibrated on
    (`Domain`), with the command that calibrates on the user's own clean pairs; None when
    the pair is like them or the profile records no domain."""
    if thresholds.domain is None:
        return None
    accuracies = [m.clean_accuracy for m in models if m.clean_accuracy is not None]
    reasons = thresholds.domain.unlike(inputs, classes, accuracies, similarity)
    if not reasons:
        return None
    paradigm = "" if thresholds.paradigm == "supervised" else f" --paradigm {thresholds.paradigm}"
    return (
        f"this pair is unlike the clean pairs that calibrated profile {thresholds.profile!r}: {'; '.join(reasons)}. "
        "Its thresholds may not hold here, and a verdict either way is less sure. To calibrate on clean models "
        f"of your own task: crossaudit calibrate{paradigm} --pair CLEAN_A,CLEAN_B --data AUDIT_SET "
        "--out thresholds.json, then audit with --thresholds thresholds.json"
    )


def overall(models: list[ModelReport]) -> Verdict:
    """Any backdoor wins; otherwise any inconclusive model makes the audit inconclusive."""
    verdicts = {m.verdict for m in models}
    if "backdoor" in verdicts:
        return "backdoor"
    if "inconclusive" in verdicts:
        return "inconclusive"
    return "clean"


@dataclass
class Provenance:
    """Where a verdict came from, so that a reviewer can reproduce it: the audit set and
    the models by their bytes' sha256 (also when they were refused: an inconclusive report
    names what it could not audit), the thresholds that judged them, with the command that
    calibrated them, the command that ran the audit, and when."""

    audit_set: str
    audit_set_sha256: str | None  # None when there was no such file
    # Each model as given: the sha256 of its file (with a tokenizer beside it, the digest
    # over both), or of an MLflow model directory the digest over its files that a verdict
    # is signed for (`digest.artifact_digest`).
    models_sha256: list[str | None]
    thresholds: str | None = None  # set once a profile judged the pair
    thresholds_sha256: str | None = None
    calibrated_by: str | None = None
    command: str | None = None  # the command line, or the pipeline step, that audited
    audited_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def judged_by(self, thresholds: Thresholds) -> None:
        self.thresholds, self.thresholds_sha256 = thresholds.source, thresholds.sha256
        self.calibrated_by = thresholds.calibrated_by


@dataclass
class AuditReport:
    verdict: Verdict
    models: list[ModelReport]
    alignment: dict[str, object] | None
    clean_agreement: float | None
    timings: dict[str, float]
    version: str
    seed: int
    schema_version: str
    error: str | None = None
    paradigm: str | None = None
    # Set when the pair is unlike every pair the thresholds were calibrated on (`unfamiliar`).
    calibration_warning: str | None = None
    provenance: Provenance | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def exit_code(self) -> int:
        return {"clean": 0, "backdoor": 1, "inconclusive": 2}[self.verdict]
