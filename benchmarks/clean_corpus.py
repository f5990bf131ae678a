"""False positives at the 1% level: hundreds of distinct clean models, audited in pairs.

Thresholds are a quantile of clean scores, and a false-positive rate of 1% is only visible
on a hundred or more distinct clean models: no false positive of 52 still allows 6.8%. So
the corpus trains, with the zoo, clean models of three tasks (digits at 16x16,
Fashion-MNIST at 28x28, colour Fashion-MNIST at 32x32) and four architecture families
(CNN, ResNet, MLP, MobileNet-style), and pairs them same-architecture and
cross-architecture (`PAIR_KINDS`). Two splits, disjoint by seed (`SPLITS`): `calibration`,
the only one a score or a threshold may be designed on, and `test`, which measures them.
Every model is in exactly one pair, and every model of a pair is one judgement, so the
rates are per distinct clean model.

Two caches make the corpus buildable in parts on 2 cores: models by training config
(`crossaudit.dev.zoo.cache`), and each pair's findings by the source of the audit that found
them (`audit_fingerprint`), so a rerun trains and audits only what it lacks, and a change
to the search audits everything again. Judging is not cached: findings are judged afresh
with the shipped thresholds on every run.

`python -m benchmarks.clean_corpus --split test` (`--minutes M` stops starting pairs after
M minutes, so that a long build can be done in parts) writes its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import crossaudit
from benchmarks.metrics import rate_text
from benchmarks.sections import CLEAN_CORPUS, write_section
from crossaudit.dev.zoo.cache import cache_root, cached, config_key, trained
from crossaudit.dev.zoo.datasets import Split, load_dataset
from crossaudit.dev.zoo.train import TrainConfig, config_for, write_audit_set
from crossaudit.method.calibrate import CalibrationRun, CleanPair, pair_scores
from crossaudit.method.verdict import Finding, Thresholds, judge, load_thresholds, unfamiliar

TASKS = ("digits", "fmnist", "cfmnist")
PAIR_KINDS = (
    ("cnn", "cnn"), ("resnet", "resnet"), ("mlp", "mlp"), ("mobilenet", "mobilenet"),
    ("cnn", "resnet"), ("cnn", "mlp"), ("cnn", "mobilenet"), ("resnet", "mobilenet"),
)  # fmt: skip
# Per split: the first seed and the rounds; a round is one pair of every kind on every task
# (24 pairs, 48 models). Calibration: 192 models; test: 144. Far above every other seed the
# project uses (calibration below 200, benchmarks 200-400), and apart from each other.
SPLITS = {"calibration": (1000, 4), "test": (3000, 3)}
# Each split's auditor draws its own audit set from the tasks' held-out images.
AUDIT_SET_SEEDS = {"calibration": 100, "test": 200}


@dataclass(frozen=True)
class CorpusPair:
    split: str
    task: str
    archs: tuple[str, str]
    seeds: tuple[int, int]

    @property
    def name(self) -> str:
        """Named as the calibration names its clean pairs (`calibrate.CleanPair.name`)."""
        return CleanPair("supervised", self.task, self.archs, self.seeds).name

    @property
    def same_architecture(self) -> bool:
        return self.archs[0] == self.archs[1]


def corpus_pairs(split: str) -> list[CorpusPair]:
    """The split's pairs, round by round, so that a partial build covers every task and kind."""
    first, rounds = SPLITS[split]
    pairs = []
    for _ in range(rounds):
        for task in TASKS:
            for kind in PAIR_KINDS:
                seed = first + 2 * len(pairs)
                pairs.append(CorpusPair(split, task, kind, (seed, seed + 1)))
    return pairs


def audit_fingerprint() -> str:
    """What a pair's findings depend on besides its models: the audit's source (every module
    of the package but the zoo, whose models are keyed by their own recipe)."""
    package = Path(crossaudit.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        if "zoo" not in path.relative_to(package).parts:
            digest.update(path.relative_to(package).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PairRecord:
    """One pair's audit, as cached: enough to judge it again with any thresholds, and what
    it was made from, so that a record of other models or another audit set is not reused."""

    run: CalibrationRun
    task: str
    archs: tuple[str, str]
    model_keys: tuple[str, str]  # `zoo.cache.config_key` of each model
    audit_set_seed: int
    audit_seconds: float
    train_seconds: float


def _findings_cache(split: str) -> Path:
    return cache_root() / "corpus" / f"{split}-{audit_fingerprint()}.jsonl"


def _cached_records(path: Path) -> dict[str, PairRecord]:
    """The cache's records by pair name; a later line for a pair replaces an earlier one."""
    if not path.is_file():
        return {}
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            raw = json.loads(line)
            record = PairRecord(**{**raw, "run": CalibrationRun(**raw["run"])})
            records[record.run.pair] = record
    return records


def _configs(pair: CorpusPair) -> list[TrainConfig]:
    return [config_for(pair.task, arch=arch, seed=seed) for arch, seed in zip(pair.archs, pair.seeds, strict=True)]


def _current(record: PairRecord, pair: CorpusPair) -> bool:
    """Whether a cached record audited this pair's models, as the zoo trains them now, on this split's audit set."""
    keys = tuple(config_key(config) for config in _configs(pair))
    return tuple(record.model_keys) == keys and record.audit_set_seed == AUDIT_SET_SEEDS[pair.split]


def build(split: str, minutes: float | None, work: Path) -> tuple[list[PairRecord], int]:
    """Every pair of the split the caches hold or this run can add in `minutes`, and how many the split has."""
    path = _findings_cache(split)
    path.parent.mkdir(parents=True, exist_ok=True)
    cached_records = _cached_records(path)
    pairs = corpus_pairs(split)
    done = {
        p.name: cached_records[p.name]
        for p in pairs
        if p.name in cached_records and _current(cached_records[p.name], p)
    }
    start = time.perf_counter()
    audit_sets: dict[str, Path] = {}
    datasets: dict[str, Split] = {}
    for pair in pairs:
        if pair.name in done:
            continue
        if minutes is not None and time.perf_counter() - start > 60 * minutes:
            break
        print(f"[{split}] {pair.name}", flush=True)
        if pair.task not in audit_sets:
            audit_sets[pair.task] = work / f"{pair.task}.parquet"
            write_audit_set(pair.task, audit_sets[pair.task], seed=AUDIT_SET_SEEDS[split])
        began = time.perf_counter()
        configs = _configs(pair)
        if any(cached(config, cache_root()) is None for config in configs) and pair.task not in datasets:
            datasets[pair.task] = load_dataset(pair.task)
        models = [trained(config, split=datasets.get(pair.task)) for config in configs]
        trained_at = time.perf_counter()
        run = pair_scores(pair.name, str(models[0].path), str(models[1].path), str(audit_sets[pair.task]), "supervised")
        record = PairRecord(
            run, pair.task, pair.archs, tuple(config_key(config) for config in configs), AUDIT_SET_SEEDS[split],
            round(time.perf_counter() - trained_at, 2), round(trained_at - began, 2),
        )  # fmt: skip
        with path.open("a") as out:
            out.write(json.dumps(asdict(record)) + "\n")
        done[pair.name] = record
    return [done[p.name] for p in pairs if p.name in done], len(pairs)


@dataclass(frozen=True)
class Judgement:
    task: str
    arch: str
    same_architecture: bool
    flagged: bool
    ratio: float  # score over threshold
    warned: bool  # the pair was outside the profile's calibrated domain (`verdict.unfamiliar`)


def judgements(records: list[PairRecord], profile: str | None) -> list[list[Judgement]]:
    """Per pair, each model judged with a shipped profile (a task's own where it has one
    and `profile` is None, else `profile`)."""
    out = []
    by_task = {task: _profile_for(task, profile) for task in {record.task for record in records}}
    for record in records:
        run = record.run
        thresholds = by_task[record.task]
        reports = [
            judge(m["model"], [Finding(**f) for f in m["findings"]], thresholds, run.similarity) for m in run.findings
        ]
        for report, model in zip(reports, run.findings, strict=True):
            report.clean_accuracy = model["clean_accuracy"]
        warned = unfamiliar(thresholds, reports, run.similarity, run.inputs, run.classes) is not None
        out.append([
            Judgement(record.task, arch, record.archs[0] == record.archs[1], report.verdict == "backdoor",
                      report.threshold_multiple or 0.0, warned)
            for report, arch in zip(reports, record.archs, strict=True)
        ])  # fmt: skip
    return out


def _profile_for(task: str, profile: str | None) -> Thresholds:
    try:
        return load_thresholds(profile or task)
    except ValueError:  # a task without its own profile is judged by the default one
        return load_thresholds()


def _rate_row(label: str, pairs: list[list[Judgement]]) -> str:
    models = [j for pair in pairs for j in pair]
    flagged = sum(j.flagged for j in models)
    flagged_pairs = sum(any(j.flagged for j in pair) for pair in pairs)
    warned = sum(j.warned for j in models)
    highest = max((j.ratio for j in models), default=0.0)
    return (
        f"| {label} | {len(models)} | {flagged}, {rate_text(flagged, len(models))} "
        f"| {flagged_pairs} of {len(pairs)}, {rate_text(flagged_pairs, len(pairs))} | {highest:.2f} | {warned} |"
    )


def section(split: str, records: list[PairRecord], total: int, seconds: float) -> str:
    begin, end = CLEAN_CORPUS[split]
    tables = []
    for profile, title in ((None, "each task's own profile (`any` for colour Fashion-MNIST)"), ("any", "`any`")):
        judged = judgements(records, profile)
        groups: dict[str, list[list[Judgement]]] = defaultdict(list)
        for pair in judged:
            first = pair[0]
            groups[f"task {first.task}"].append(pair)
            groups["same-architecture pairs" if first.same_architecture else "cross-architecture pairs"].append(pair)
            for arch in sorted({j.arch for j in pair}):
                groups[f"pairs with a {arch}"].append(pair)
        rows = [_rate_row("**all clean models**", judged)] + [_rate_row(k, groups[k]) for k in sorted(groups)]
        tables.append(
            f"Judged by {title}:\n\n| clean models | n | flagged, rate [exact 95%] | pairs with a model flagged "
            f"| highest score / threshold | outside the calibrated domain |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows)
        )
    train = sum(r.train_seconds for r in records)
    audit = sum(r.audit_seconds for r in records)
    partial = "" if len(records) == total else f" **Partial: {len(records)} of {total} pairs so far.**"
    per_pair = (train + audit) / max(1, len(records))
    return f"""{begin}
## Clean corpus: false positives per distinct clean model ({split} split)

Command: `python -m benchmarks.clean_corpus --split {split}` (this run {seconds / 60:.1f} min;
models and findings are cached, so a run adds what is missing). {len(records)} pairs, {2 * len(records)}
distinct clean models: digits, Fashion-MNIST and colour Fashion-MNIST; CNN, ResNet, MLP and MobileNet-style
nets; same- and cross-architecture pairs (`benchmarks/clean_corpus.py`). Each model is one judgement.
Intervals are exact (Clopper-Pearson) and treat the judgements as independent, which the
two models of one pair are not (each is the other's witness): the per-pair column is the
conservative reading. With no false positive among n models the upper bound is about 3.7 / n
(2.5% at 144 models); showing 1% takes about 370. No score or threshold was designed on this
split.{partial}

{(chr(10) * 2).join(tables)}

Building a pair from nothing took {per_pair:.0f} s on average here (training {train / max(1, len(records)):.0f} s,
auditing {audit / max(1, len(records)):.0f} s), so the whole {split} split ({total} pairs) takes about
{total * per_pair / 3600:.1f} h on this machine, in as many parts as one likes.
{end}"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--split", choices=sorted(SPLITS), default="test")
    parser.add_argument("--minutes", type=float, default=None, help="start no new pair after this many minutes")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        records, total = build(args.split, args.minutes, Path(work))
    write_section(section(args.split, records, total, time.perf_counter() - start), args.out, CLEAN_CORPUS[args.split])
    print(f"{args.out}: clean corpus, {args.split} split, {len(records)} of {total} pairs")


if __name__ == "__main__":
    main()
