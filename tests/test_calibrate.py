"""The calibration's bookkeeping: which seeds it may use, and that the shipped thresholds
follow from the clean-pair scores recorded beside them."""

import json
from importlib import resources

import pytest

from benchmarks.detection import PLANS
from benchmarks.paradigms import SEEDS as PARADIGM_BENCHMARK_SEEDS
from crossaudit.method.calibrate import (
    CLEAN_PAIRS,
    MARGIN,
    CalibrationRun,
    clean_pairs,
    profile,
    profiles,
    write_thresholds,
)
from crossaudit.method.verdict import DEFAULT_PROFILE, MIN_SIMILAR_PAIRS, SIMILAR, Domain, load_thresholds


def test_calibration_seeds_are_disjoint_across_paradigms_and_below_every_benchmark_seed():
    seen: set[int] = set()
    for paradigm in CLEAN_PAIRS:
        mine = {seed for pair in clean_pairs(paradigm) for seed in pair.seeds}
        assert not mine & seen, f"{paradigm} reuses another paradigm's calibration seeds"
        seen |= mine
    test_seeds = {seed for plan in PLANS.values() for seed in plan.seeds} | set(PARADIGM_BENCHMARK_SEEDS)
    assert max(seen) < min(test_seeds)


def test_a_profile_is_the_highest_clean_score_plus_the_margin_with_a_floor():
    runs = [CalibrationRun("a", {"patch": 0.3, "blend": 0.01, "warp": 0.5}, 0.95),
            CalibrationRun("b", {"patch": 0.6, "blend": 0.02, "warp": -0.2}, 0.5)]  # fmt: skip
    thresholds = profile("p", "supervised", runs)
    assert thresholds.per_family == {"patch": pytest.approx(0.6 + MARGIN), "blend": 0.2, "warp": 0.6}
    assert thresholds.clean_pairs == 2


def test_a_profile_records_what_its_clean_pairs_looked_like(tmp_path):
    """Every input shape and class count its audit sets had, the weakest model, the least
    alike pair: what `verdict.unfamiliar` reads an audited pair against."""
    scores = dict.fromkeys(("patch", "blend", "warp"), 0.3)
    models = [
        [{"model": "m", "clean_accuracy": a, "findings": []} for a in pair] for pair in ((0.96, 0.93), (0.88, 0.9))
    ]
    runs = [CalibrationRun("digits:a", scores, 0.4, models[0], "1x16x16", 10),
            CalibrationRun("fmnist:b", scores, 0.9, models[1], "1x28x28", 10)]  # fmt: skip
    domain = profile("p", "supervised", runs).domain
    assert domain == Domain(("1x16x16", "1x28x28"), (10,), {"1x16x16": 0.93, "1x28x28": 0.88}, 0.4)
    write_thresholds([profile("p", "supervised", runs)], runs, tmp_path / "t.json")
    assert load_thresholds("p", path=tmp_path / "t.json").domain == domain


def _runs(scores: list[float], similarity: float) -> list[CalibrationRun]:
    return [CalibrationRun(f"p{i}-{similarity}", dict.fromkeys(("patch", "blend", "warp"), s), similarity)
            for i, s in enumerate(scores)]  # fmt: skip


def test_enough_alike_clean_pairs_give_their_own_lower_thresholds():
    alike = _runs([0.35] + [0.1] * (MIN_SIMILAR_PAIRS - 1), SIMILAR)
    unlike = _runs([0.9], 0.55)  # a CNN/MLP pair with a natural shortcut one model takes far more cheaply
    thresholds = profile("p", "supervised", alike + unlike)
    assert thresholds.per_family["patch"] == pytest.approx(0.9 + MARGIN)
    assert thresholds.similar_per_family == {
        family: pytest.approx(0.35 + MARGIN) for family in ("patch", "blend", "warp")
    }
    assert thresholds.similar_pairs == MIN_SIMILAR_PAIRS
    too_few = profile("p", "supervised", alike[1:] + unlike)
    assert too_few.similar_per_family is None and too_few.similar_pairs == 0


def test_shipped_thresholds_follow_from_the_recorded_clean_pair_scores():
    """A threshold edited by hand, or a calibration whose pairs changed without a rerun,
    no longer matches the scores of the pairs `crossaudit calibrate` names."""
    record = json.loads(resources.files("crossaudit").joinpath("thresholds.json").read_text())
    similarity, looks = record["clean_pair_similarity"], record["clean_pair_looks"]

    def run(name: str) -> CalibrationRun:
        seen = looks[name]
        models = [{"clean_accuracy": accuracy} for accuracy in seen["accuracies"]]
        return CalibrationRun(
            name, record["clean_pair_scores"][name], similarity[name], models, seen["inputs"], seen["classes"]
        )

    for paradigm in CLEAN_PAIRS:
        runs = [run(pair.name) for pair in clean_pairs(paradigm)]
        for expected in profiles(paradigm, runs):
            shipped = record["profiles"][expected.profile]
            assert shipped["per_family"] == expected.per_family, expected.profile
            assert shipped["clean_pairs"] == expected.clean_pairs and shipped["paradigm"] == paradigm
            alike = shipped.get("similar", {"per_family": None, "clean_pairs": 0})
            assert (alike["per_family"], alike["clean_pairs"]) == (expected.similar_per_family, expected.similar_pairs)
            # Every shipped profile says what its clean pairs looked like (`verdict.Domain`).
            assert Domain.from_dict(shipped["domain"]) == expected.domain, expected.profile
            assert expected.domain.accuracy, expected.profile
            if paradigm != "lm":
                assert expected.domain.inputs and expected.domain.classes, expected.profile


def test_recalibrating_a_paradigm_replaces_its_scores_and_keeps_the_others(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({
        "profiles": {"semi": {"per_family": {"patch": 0.5}, "clean_pairs": 1, "paradigm": "semi"}},
        "clean_pair_scores": {"digits:cnn-vs-mlp": {"patch": 0.9}, "semi:digits:cnn120-vs-mlp121": {"patch": 0.4}},
    }))  # fmt: skip
    runs = [CalibrationRun("digits:cnn100-vs-mlp101", {"patch": 0.3, "blend": 0.1, "warp": 0.1}, 0.6)]
    write_thresholds([profile(DEFAULT_PROFILE, "supervised", runs)], runs, path)
    record = json.loads(path.read_text())
    assert set(record["clean_pair_scores"]) == {"digits:cnn100-vs-mlp101", "semi:digits:cnn120-vs-mlp121"}
    assert record["clean_pair_similarity"] == {"digits:cnn100-vs-mlp101": 0.6}
    assert set(record["profiles"]) == {"semi", DEFAULT_PROFILE}
