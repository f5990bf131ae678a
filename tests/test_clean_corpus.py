"""The clean corpus's design: big enough to show a 1% false-positive rate, its splits
disjoint from each other and from every seed the project calibrates or benchmarks with."""

from collections import Counter

from benchmarks.clean_corpus import SPLITS, corpus_pairs
from benchmarks.detection import PLANS
from benchmarks.paradigms import SEEDS as PARADIGM_SEEDS
from crossaudit.calibrate import CLEAN_PAIRS, clean_pairs


def test_each_split_has_enough_distinct_clean_models_of_every_task_and_family():
    for split, least in (("calibration", 150), ("test", 100)):
        pairs = corpus_pairs(split)
        seeds = [seed for pair in pairs for seed in pair.seeds]
        assert len(seeds) == len(set(seeds)) >= least
        assert {pair.task for pair in pairs} == {"digits", "fmnist", "cfmnist"}
        assert {arch for pair in pairs for arch in pair.archs} == {"cnn", "resnet", "mlp", "mobilenet"}
        kinds = Counter(pair.same_architecture for pair in pairs)
        assert kinds[True] > 0 and kinds[False] > 0


def test_the_splits_share_no_seed_with_each_other_or_any_other_seed_in_use():
    calibration, test = ({s for p in corpus_pairs(split) for s in p.seeds} for split in SPLITS)
    assert not calibration & test
    elsewhere = {seed for paradigm in CLEAN_PAIRS for pair in clean_pairs(paradigm) for seed in pair.seeds}
    for plan in PLANS.values():  # each benchmark seed's pairs use it and the next twenty
        elsewhere |= {seed + offset for seed in plan.seeds for offset in range(20)}
    elsewhere |= {seed + offset for seed in PARADIGM_SEEDS for offset in range(10)}
    assert not (calibration | test) & elsewhere
