"""The clean corpus's design: big enough to show a 1% false-positive rate, its splits
disjoint from each other and from every seed the project calibrates or benchmarks with."""

from collections import Counter

from benchmarks.clean_corpus import SPLITS, corpus_pairs
from benchmarks.detection import PLANS
from benchmarks.paradigms import SEEDS as PARADIGM_SEEDS
from crossaudit.dev.zoo.train import config_for
from crossaudit.method.calibrate import CLEAN_PAIRS, clean_pairs


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


def test_a_run_judges_what_it_built_and_a_rerun_builds_nothing(tmp_path, monkeypatch):
    """One small pair stands for the split: the section counts its two clean models, and a
    second run takes both models and their findings from the caches."""
    from benchmarks import clean_corpus
    from crossaudit.dev.zoo import cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    pair = clean_corpus.CorpusPair("test", "digits", ("cnn", "mlp"), (3000, 3001))
    monkeypatch.setattr(clean_corpus, "corpus_pairs", lambda split: [pair])
    monkeypatch.setattr(clean_corpus, "config_for", lambda task, **kw: config_for(task, epochs=2, **kw))
    page = tmp_path / "benchmarks.md"
    clean_corpus.main(["--split", "test", "--out", str(page)])
    text = page.read_text()
    assert "## Clean corpus: false positives per distinct clean model (test split)" in text
    assert "| **all clean models** | 2 |" in text and "Partial" not in text

    def refuse(*args, **kwargs):
        raise AssertionError("the second run trained or audited again")

    monkeypatch.setattr(cache, "train", refuse)
    monkeypatch.setattr(clean_corpus, "pair_scores", refuse)
    clean_corpus.main(["--split", "test", "--out", str(page)])
    assert page.read_text().count("clean-corpus-test:begin") == 1
