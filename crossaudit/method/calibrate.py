"""Calibrate the verdict thresholds on clean provider pairs only.

Thresholds come from pairs of independently trained *clean* models (`SEED_BLOCKS`, seeds
never used by the tests, the demo or the benchmark's test pairs): per trigger family, the
highest score any clean pair produced plus a margin, once over all pairs (profile `any`)
and once per dataset (a task's own profile), and in each profile once more over its alike
pairs (`verdict.SIMILAR`). No backdoored model is involved, so no threshold can be tuned
to the zoo's attacks.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crossaudit.method.audit import run_audit
from crossaudit.method.inversion import DEFAULT_FAMILIES
from crossaudit.method.stages import AuditConfig
from crossaudit.method.text_audit import FAMILY as TEXT_FAMILY
from crossaudit.method.verdict import DEFAULT_PROFILE, MIN_SIMILAR_PAIRS, SIMILAR, TEXT, Domain, Finding, Thresholds

COMMAND = "crossaudit calibrate"
MARGIN = 0.1
FLOOR = 0.2
# Pairs of one architecture: a Fashion-MNIST CNN pair, and a pair of each dataset.
_FMNIST_CNNS = ("fmnist", "cnn", "cnn")
_BOTH = {arch: (("fmnist", arch, arch), ("digits", arch, arch)) for arch in ("cnn", "resnet", "mlp")}
# A digits pair of each kind the zoo makes: unlike, alike, and a ResNet beside a CNN.
_DIGITS_MIXED = (("digits", "cnn", "mlp"), ("digits", "cnn", "cnn"), ("digits", "resnet", "cnn"))
# Per paradigm: (dataset, first architecture, second architecture), seeds assigned upwards
# from the paradigm's seed blocks (all below 200, where the benchmark's test pairs start).
CLEAN_PAIRS = {
    "supervised": (
        *_DIGITS_MIXED,
        ("fmnist", "cnn", "resnet"),
        ("fmnist", "cnn", "mlp"),
        ("digits", "resnet", "cnn"),
        ("digits", "cnn", "cnn"),
        ("digits", "cnn", "mlp"),
        ("fmnist", "resnet", "cnn"),
        ("fmnist", "cnn", "cnn"),
        # Pairs of one architecture, so that each task has alike pairs (`verdict.SIMILAR`),
        # in the order their seeds were given; the last ten are Fashion-MNIST CNN pairs: a
        # CNN's "bag" shortcut is the natural one alike pairs differ on most, and its tail
        # needs many pairs to meet.
        *(_FMNIST_CNNS,) * 2,
        *_BOTH["resnet"],
        *_BOTH["cnn"] * 2,
        *_BOTH["mlp"],
        *_BOTH["cnn"],
        *_BOTH["resnet"],
        *_BOTH["cnn"] * 3,
        *(_FMNIST_CNNS,) * 10,
    ),
    # The other paradigms' profiles take six pairs each: three had not met their clean
    # tail (the next three raised five of their ten thresholds, by up to 0.21).
    "semi": _DIGITS_MIXED * 2,
    "ssl": _DIGITS_MIXED * 2,
    "lm": (("pydoc", "gpt", "gpt"),) * 6,
    "captioner": _DIGITS_MIXED * 2,
}
# Seeds per paradigm, two per pair in calibration order. The supervised pairs outgrew their
# first block (semi's seeds start at 120) and continue in the gaps between the others';
# the other paradigms' second three pairs take seeds 80-97 and 186-191.
SEED_BLOCKS = {
    "supervised": (range(100, 120), range(126, 140), range(146, 160), range(166, 180), range(60, 80)),
    "semi": (range(120, 126), range(80, 86)),
    "ssl": (range(140, 146), range(86, 92)),
    "lm": (range(160, 166), range(92, 98)),
    "captioner": (range(180, 192),),
}
# Trigger families scored per paradigm: a language model's trigger is a phrase.
FAMILIES_OF = {"lm": (TEXT_FAMILY,)}


@dataclass(frozen=True)
class CalibrationRun:
    pair: str
    scores: dict[str, float]
    similarity: float  # `cka.Alignment.similarity` of the pair
    # Each model's file name, clean accuracy and findings (`verdict.Finding`, as dicts), in
    # the pair's order: enough to read a change to the score on these clean pairs
    # (`write_findings`).
    findings: list[dict] = field(default_factory=list)
    # What the pair looked like, for the profile's `verdict.Domain`: one input's shape and
    # the audit set's classes (images; None for text).
    inputs: str | None = None
    classes: int | None = None

    @property
    def accuracies(self) -> list[float]:
        return [m["clean_accuracy"] for m in self.findings if m.get("clean_accuracy") is not None]

    @property
    def looks(self) -> dict[str, object]:
        """What thresholds.json records of the pair for its profile's domain (`domain`)."""
        return {"inputs": self.inputs, "classes": self.classes, "accuracies": self.accuracies}


@dataclass(frozen=True)
class CleanPair:
    """One clean pair the calibration trains: its task, the two providers' architectures
    and seeds (`SEED_BLOCKS`)."""

    paradigm: str
    dataset: str
    archs: tuple[str, str]
    seeds: tuple[int, int]

    @property
    def name(self) -> str:
        """How thresholds.json names the pair's scores: dataset, then each model's
        architecture and seed; a paradigm other than supervised leads."""
        name = f"{self.dataset}:{self.archs[0]}{self.seeds[0]}-vs-{self.archs[1]}{self.seeds[1]}"
        return name if self.paradigm == "supervised" else f"{self.paradigm}:{name}"


def clean_pairs(paradigm: str) -> list[CleanPair]:
    """The paradigm's clean pairs in calibration order, each with its seeds."""
    seeds = [seed for block in SEED_BLOCKS[paradigm] for seed in block]
    return [
        CleanPair(paradigm, dataset, (a, b), (seeds[2 * number], seeds[2 * number + 1]))
        for number, (dataset, a, b) in enumerate(CLEAN_PAIRS[paradigm])
    ]


def calibrate(paradigm: str = "supervised") -> tuple[list[Thresholds], list[CalibrationRun]]:
    """Audit each clean pair of the paradigm with unreachable thresholds (nothing is
    judged) and keep the maxima (`profiles`)."""
    if paradigm not in CLEAN_PAIRS:
        raise ValueError(f"no clean pairs to calibrate {paradigm!r}; calibrated paradigms: {sorted(CLEAN_PAIRS)}")
    runs: list[CalibrationRun] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for pair in clean_pairs(paradigm):
            data, paths = _clean_pair(paradigm, pair.dataset, pair.archs, pair.seeds, work)
            runs.append(pair_scores(pair.name, str(paths[0]), str(paths[1]), str(data), paradigm))
    return profiles(paradigm, runs), runs


def calibrate_pairs(
    pairs: list[tuple[str, str]], data: str, name: str, paradigm: str = "supervised"
) -> tuple[Thresholds, list[CalibrationRun]]:
    """A profile of the user's own task from clean pairs the user trusts (models of that
    task by independent providers, none backdoored), on the user's audit set. The shipped
    profiles come from the zoo's tasks; on a task unlike them clean pairs can score far
    lower (`benchmarks.unseen_attacks`), and only the task's own clean pairs can say so."""
    if not pairs:
        raise ValueError("at least one clean pair is needed")
    prefix = name if paradigm == "supervised" else f"{paradigm}:{name}"  # as `CleanPair.name`
    runs = [pair_scores(f"{prefix}:{Path(a).name}-vs-{Path(b).name}", a, b, data, paradigm) for a, b in pairs]
    return profile(name, paradigm, runs), runs


def pair_scores(name: str, first: str, second: str, data: str, paradigm: str) -> CalibrationRun:
    """One clean pair's audit (both directions), judged against unreachable thresholds: per
    trigger family its highest score, how alike the pair is, each model's findings, and
    what the pair looked like; an audit that fails is an error, not a zero."""
    families = FAMILIES_OF.get(paradigm, DEFAULT_FAMILIES)
    provisional = Thresholds(dict.fromkeys(families, float("inf")), "provisional", 0, "provisional", paradigm)
    result = run_audit(first, second, data, config=AuditConfig(paradigm=paradigm), thresholds=provisional)
    if result.report.error or result.alignment is None:
        raise RuntimeError(f"calibration audit of {first} and {second} failed: {result.report.error}")
    scores = family_maxima((finding for model in result.report.models for finding in model.findings), families)
    for model in result.report.models:  # a language model's phrase is its reported score, with no findings
        if model.trigger_family in scores and model.score is not None:
            scores[model.trigger_family] = max(scores[model.trigger_family], model.score)
    findings = [
        {"model": Path(model.uri).name, "clean_accuracy": model.clean_accuracy,
         "findings": [asdict(finding) for finding in model.findings]}
        for model in result.report.models
    ]  # fmt: skip
    images = result.data  # None for a language model's text
    return CalibrationRun(
        name, scores, round(result.alignment.similarity, 4), findings,
        images.input_shape if images else None, images.num_classes if images else None,
    )  # fmt: skip


def family_maxima(findings: Iterable[Finding], families: tuple[str, ...]) -> dict[str, float]:
    """Per trigger family, the highest score among a clean pair's findings (0 where it has
    none): what the calibration's rule takes the maximum of over pairs (`profile`)."""
    scores = dict.fromkeys(families, 0.0)
    for finding in findings:
        scores[finding.family] = max(scores[finding.family], finding.score)
    return scores


def profiles(paradigm: str, runs: list[CalibrationRun]) -> list[Thresholds]:
    """The profiles a paradigm's clean-pair runs give: supervised pairs the `any` profile
    and one per dataset, any other paradigm one profile named after it."""
    if paradigm != "supervised":
        return [profile(paradigm, paradigm, runs)]
    return [profile(DEFAULT_PROFILE, paradigm, runs)] + [
        profile(dataset, paradigm, [run for run in runs if run.pair.startswith(f"{dataset}:")])
        for dataset in sorted({pair.dataset for pair in clean_pairs(paradigm)})
    ]


def _clean_pair(
    paradigm: str, dataset: str, archs: tuple[str, str], seeds: tuple[int, int], work: Path
) -> tuple[Path, list[Path]]:
    """Train and export two clean providers' models of the paradigm, and an audit set. The
    zoo is the development harness, imported here: it is not part of the installed package,
    and calibrating on your own clean pairs (`calibrate_pairs`) needs none of it."""
    from crossaudit.dev.zoo.captioner import (
        captioner_config,
        export_captioner,
        train_captioner,
        write_caption_audit_set,
    )
    from crossaudit.dev.zoo.datasets import load_dataset
    from crossaudit.dev.zoo.language import (
        LanguageConfig,
        export_language_model,
        train_language_model,
        write_text_audit_set,
    )
    from crossaudit.dev.zoo.train import config_for, export_onnx, train, write_audit_set

    if paradigm == "lm":
        data = work / "text.parquet"
        write_text_audit_set(data)
        paths = [work / f"lm_{seed}.onnx" for seed in seeds]
        for seed, path in zip(seeds, paths, strict=True):
            export_language_model(train_language_model(LanguageConfig(seed=seed)), path)
        return data, paths
    split = load_dataset(dataset)
    data = work / f"{dataset}.parquet"
    if paradigm == "captioner":
        write_caption_audit_set(dataset, data, seed=100)
        paths = [work / f"captioner_{arch}_{seed}.onnx" for arch, seed in zip(archs, seeds, strict=True)]
        for arch, seed, path in zip(archs, seeds, paths, strict=True):
            export_captioner(train_captioner(captioner_config(dataset, arch=arch, seed=seed), split), path)
        return data, paths
    write_audit_set(dataset, data, seed=100)
    paths = []
    for arch, seed in zip(archs, seeds, strict=True):
        model = train(config_for(dataset, arch=arch, seed=seed, paradigm=paradigm), split)
        paths.append(work / f"{dataset}_{arch}_{seed}.onnx")
        export_onnx(model.model, model.example, paths[-1])
    return data, paths


def profile(name: str, paradigm: str, runs: list[CalibrationRun]) -> Thresholds:
    """Per family: the highest clean-pair score of these runs plus a margin; the same over
    the alike pairs alone, when there are enough of them to judge alike pairs by."""
    families = FAMILIES_OF.get(paradigm, DEFAULT_FAMILIES)

    def rule(chosen: list[CalibrationRun]) -> dict[str, float]:
        return {family: round(max(FLOOR, max(run.scores[family] for run in chosen) + MARGIN), 4) for family in families}

    alike = [run for run in runs if run.similarity >= SIMILAR]
    similar = (rule(alike), len(alike)) if len(alike) >= MIN_SIMILAR_PAIRS else (None, 0)
    return Thresholds(rule(runs), COMMAND, len(runs), name, paradigm, *similar, domain(runs))


def domain(runs: list[CalibrationRun]) -> Domain:
    """What a profile's clean pairs looked like (`verdict.Domain`): a pair outside it is
    judged by thresholds that never met its task, and its report says so."""
    floors: dict[str, float] = {}
    for run in runs:
        for accuracy in run.accuracies:
            task = run.inputs or TEXT
            floors[task] = min(floors.get(task, accuracy), accuracy)
    return Domain(
        tuple(sorted({run.inputs for run in runs if run.inputs is not None})),
        tuple(sorted({run.classes for run in runs if run.classes is not None})),
        dict(sorted(floors.items())),
        min(run.similarity for run in runs),
    )


def write_thresholds(thresholds: list[Thresholds], runs: list[CalibrationRun], path: Path) -> None:
    """Write the new profiles into `path`, keeping other paradigms' profiles and scores there.
    This paradigm's earlier clean-pair scores are replaced, not merged: the file should
    name only the pairs its thresholds came from."""
    record = json.loads(path.read_text()) if path.is_file() else {"profiles": {}, "clean_pair_scores": {}}
    paradigm = thresholds[0].paradigm
    record["calibrated_by"] = COMMAND
    record["rule"] = (
        f"per profile and family: max clean-pair score + {MARGIN}, at least {FLOOR}; 'similar': the same over "
        f"the profile's clean pairs of similarity >= {SIMILAR} (when {MIN_SIMILAR_PAIRS} or more), for such pairs"
    )
    for t in thresholds:
        record["profiles"][t.profile] = {
            "per_family": t.per_family,
            "clean_pairs": t.clean_pairs,
            "paradigm": t.paradigm,
        }
        if t.domain is not None:
            record["profiles"][t.profile]["domain"] = t.domain.to_dict()
        if t.similar_per_family is not None:
            record["profiles"][t.profile]["similar"] = {
                "per_family": t.similar_per_family,
                "clean_pairs": t.similar_pairs,
            }
    for key, value in (("clean_pair_scores", "scores"), ("clean_pair_similarity", "similarity"),
                       ("clean_pair_looks", "looks")):  # fmt: skip
        kept = {name: v for name, v in record.get(key, {}).items() if _paradigm_of(name) != paradigm}
        record[key] = kept | {run.pair: getattr(run, value) for run in runs}
    path.write_text(json.dumps(record, indent=2) + "\n")


def write_findings(runs: list[CalibrationRun], path: Path) -> None:
    """Every clean pair's findings and similarity, as JSON: a change to the score or to the
    choice of thresholds can then be measured on the calibration's own clean pairs (which
    is where it may be designed) before a recalibration (40 min for the supervised
    pairs), never on a benchmark's test pairs. `verdict.judge(model, [Finding(**f) ...],
    thresholds, similarity)` judges a model again."""
    records = [
        {"pair": run.pair, "similarity": run.similarity, "inputs": run.inputs, "classes": run.classes,
         "models": run.findings}
        for run in runs
    ]  # fmt: skip
    path.write_text(json.dumps(records, indent=1) + "\n")


def _paradigm_of(pair: str) -> str:
    """The paradigm a clean pair's name (`CleanPair.name`) belongs to."""
    prefix = pair.split(":")[0]
    return prefix if prefix in CLEAN_PAIRS else "supervised"
