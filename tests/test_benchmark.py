"""The detection benchmark's metrics, the Neural Cleanse baseline, and the quick plan end to end."""

import numpy as np
import pytest

from benchmarks.metrics import auroc, bootstrap_auroc, rate_interval, rate_text, tpr_at_fpr
from crossaudit.dev.baselines.neural_cleanse import NeuralCleanseConfig, anomaly_index, neural_cleanse
from crossaudit.modelio.data import read_audit_data
from crossaudit.modelio.loaders import load_model


def test_auroc_counts_ties_as_half_and_matches_hand_computation():
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auroc(np.array([2.0, 0.0]), np.array([1.0, 3.0])) == 0.25


def test_bootstrap_interval_contains_the_estimate():
    rng = np.random.RandomState(0)
    positives, negatives = rng.normal(1, 1, 40), rng.normal(0, 1, 40)
    low, high = bootstrap_auroc(positives, negatives, rounds=300)
    assert low < auroc(positives, negatives) < high


def test_tpr_at_fpr_puts_the_threshold_above_the_allowed_negatives():
    negatives = np.arange(100, dtype=float)  # 0..99
    positives = np.array([97.5, 98.5, 150.0])
    assert tpr_at_fpr(positives, negatives, 0.01) == pytest.approx(2 / 3)  # threshold 98: one negative above it
    assert tpr_at_fpr(positives, np.array([1.0, 5.0]), 0.01) == 1.0  # with few negatives: above the highest


def test_rate_interval_is_exact_and_stays_in_the_unit_interval():
    # 0 of 52: the one-sided bound of the "rule of three" family, 1 - 0.025 ** (1 / 52).
    assert rate_interval(0, 52) == (0.0, pytest.approx(1 - 0.025 ** (1 / 52)))
    assert rate_interval(6, 6) == (pytest.approx(0.025 ** (1 / 6)), 1.0)
    low, high = rate_interval(3, 52)
    assert low < 3 / 52 < high and high > 0.01  # three false positives of 52 cannot show FPR <= 1%
    assert all(np.isnan(rate_interval(0, 0)))
    assert rate_text(0, 52) == "0.0% [0.0%, 6.8%]"  # what a report prints: no false positive still allows 6.8%
    assert rate_text(0, 0) == "n/a"


def test_anomaly_index_flags_only_the_lower_tail():
    index, target = anomaly_index(np.array([40.0, 42.0, 41.0, 39.0, 43.0, 5.0]))
    assert target == 5 and index > 2
    high, _ = anomaly_index(np.array([40.0, 42.0, 41.0, 39.0, 43.0, 90.0]))
    assert high < 2


def test_neural_cleanse_finds_the_badnets_target_of_a_backdoored_model(digits_zoo, monkeypatch):
    from benchmarks.detection import neural_cleanse_model, neural_cleanse_pair
    from crossaudit.dev.baselines import neural_cleanse as module

    config = NeuralCleanseConfig(steps=150)
    paths = (digits_zoo.badnets_cnn, digits_zoo.clean_cnn)
    (poisoned, clean), timing = neural_cleanse_pair(paths, digits_zoo.audit_data, config)
    assert poisoned.suspected_target == digits_zoo.badnets_target
    assert min(poisoned.mask_l1) == poisoned.mask_l1[digits_zoo.badnets_target]
    assert clean.anomaly_index < poisoned.anomaly_index
    # A pair is charged both models' times; a model judged again (a witness) is not rerun.
    times = [neural_cleanse_model(path, digits_zoo.audit_data, config)[1] for path in paths]
    assert timing.wall == times[0].wall + times[1].wall and timing.cpu == times[0].cpu + times[1].cpu > 0
    # The classes split over the threads, as the benchmark runs them, give bitwise what one
    # class after the other gives: reusing a judgement is what running it again would give.
    monkeypatch.setattr(module, "side_by_side", lambda jobs: [job() for job in jobs])
    data = read_audit_data(str(digits_zoo.audit_data))
    alone = neural_cleanse(load_model(str(digits_zoo.clean_cnn)).module, data.x, data.num_classes, config)
    assert (alone.mask_l1, alone.anomaly_index) == (clean.mask_l1, clean.anomaly_index)


@pytest.mark.slow
def test_quick_benchmark_writes_a_report_with_every_section(tmp_path):
    import json

    from benchmarks.detection import main
    from crossaudit.method.verdict import Finding, judge, load_thresholds

    out = tmp_path / "benchmarks-quick.md"
    main(["--quick", "--out", str(out)])
    report = out.read_text()
    sections = (
        "## Targets", "**crossaudit**", "**Neural Cleanse**", "**crossaudit by architecture pair**",
        "| cnn/cnn | ", "**crossaudit by dataset**", "| badnets | ", "**crossaudit's misjudged models**",
        "crossaudit (no witness)", "crossaudit (fine-tuning scored)", "x wall clock", "x CPU.", "x CPU, detection",
        "detected [95% CI]", "of distinct clean models", "## Scaling", "| mlp | ",
    )  # fmt: skip
    assert [s for s in sections if s not in report] == []
    assert (tmp_path / "benchmarks-quick_scaling.png").stat().st_size > 10_000
    # The findings file is enough to judge every model again, as the run judged it.
    judged = json.loads((tmp_path / "benchmarks-quick_findings.json").read_text())
    assert len(judged) == 6 and all(record["findings"] for record in judged)
    for record in judged:
        findings = [Finding(**f) for f in record["findings"]]
        again = judge(record["model"], findings, load_thresholds("digits"), record["similarity"])
        assert (again.verdict == "backdoor") == record["flagged"], record["model"]
    # Its headline is what README's table is generated from (`benchmarks.headline`).
    from benchmarks.headline import table

    headline = json.loads((tmp_path / "benchmarks-quick_headline.json").read_text())
    assert [d["name"] for d in headline["detectors"]] == ["crossaudit", "Neural Cleanse"]
    assert headline["detectors"][0]["backdoored"] == sum(record["positive"] for record in judged)
    assert "| backdoored models detected |" in table(headline)


def test_make_bench_plan_puts_each_architecture_pair_on_its_own_seed_and_target():
    """The default plan measures each attack on three seeds and targets at one seed's cost;
    the full plan runs every seed on every architecture pair."""
    from benchmarks.detection import DEFAULT_PLAN, FULL, PLANS

    cells = PLANS[DEFAULT_PLAN].cells()
    assert [arch_pair for _, arch_pair, _, _ in cells] == list(FULL.arch_pairs)
    assert len({seed for _, _, seed, _ in cells}) == len({target for *_, target in cells}) == len(cells) == 3
    assert {(arch_pair, seed) for _, arch_pair, seed, _ in FULL.cells()} == {
        (arch_pair, seed) for arch_pair in FULL.arch_pairs for seed in FULL.seeds
    }


def test_quadrant_digits_gives_each_class_its_own_quadrant():
    """The scaling benchmark's 20- and 40-class tasks: real digits, the quadrant part of the class."""
    from benchmarks.detection import quadrant_digits

    split = quadrant_digits(4)
    assert split.x_train.shape[1:] == (1, 16, 16) and set(split.y_test.tolist()) == set(range(40))
    for label in range(40):
        row, col = divmod(label // 10, 2)
        images = split.x_test[split.y_test == label].copy()
        quadrant = (slice(None), slice(None), slice(8 * row, 8 * row + 8), slice(8 * col, 8 * col + 8))
        assert images[quadrant].any()
        images[quadrant] = 0
        assert not images.any()


def test_misjudged_models_are_listed_by_name_with_their_profile():
    from benchmarks.detection import Results, Sample, misjudged_table

    def sample(model: str, positive: bool, flagged: bool, detector: str = "crossaudit") -> Sample:
        return Sample(
            detector, "badnets" if positive else "clean", "fmnist", positive, 1.2 if flagged else 0.4, flagged,
            positive and flagged, arch_pair="cnn/cnn", model=model, peer="peer", profile="fmnist:similar",
        )  # fmt: skip

    results = Results([
        sample("caught", True, True), sample("missed", True, False), sample("passed", False, False),
        sample("false_alarm", False, True), sample("nc_false_alarm", False, True, detector="Neural Cleanse"),
    ])  # fmt: skip
    rows = misjudged_table(results).splitlines()[2:]
    assert [row.split(" | ")[0] for row in rows] == ["| false_alarm", "| missed"]
    assert "| peer | cnn/cnn | clean | flagged | 1.20 | fmnist:similar |" in rows[0]
    assert misjudged_table(Results([sample("caught", True, True)])).startswith("None")


def test_false_positives_are_counted_per_judgement_and_per_distinct_clean_model():
    """A witness judged in several audits is one clean model: flagged in any, it counts once."""
    from benchmarks.detection import Sample, distinct_models_flagged

    def clean(model: str, flagged: bool) -> Sample:
        return Sample("crossaudit", "clean", "fmnist", False, 1.2 if flagged else 0.4, flagged, False, model=model)

    witness = [clean("witness", flagged) for flagged in (False, True, False, True)]
    assert distinct_models_flagged([*witness, clean("suspect", False)]) == (1, 2)
    assert distinct_models_flagged([clean("a", False), clean("a", False)]) == (0, 1)


def test_finetune_scored_counts_only_the_success_that_survived_fine_tuning():
    from types import SimpleNamespace

    from benchmarks.detection import finetune_scored
    from crossaudit.method.verdict import Finding, ModelReport, load_thresholds

    def finding(asr: float, after: float, footprint: float, peer_footprint: float) -> Finding:
        return Finding(
            "patch", 3, footprint, footprint, asr, 0.0, 1.0, after, asr, peer_footprint, asr,
        )  # fmt: skip

    fragile = finding(0.9, 0.1, 0.01, 0.2)  # a cheap trigger that fine-tuning wipes out
    steady = finding(0.9, 0.9, 0.2, 0.01)
    models = [ModelReport("suspect", "backdoor", findings=[fragile]), ModelReport("peer", "clean", findings=[steady])]
    report = SimpleNamespace(error=None, models=models)
    result = SimpleNamespace(report=report, alignment=SimpleNamespace(similarity=0.9))
    suspect, peer = finetune_scored(result, load_thresholds("digits"))
    # The suspect keeps a tenth of its success, against a peer whose success all survived.
    assert suspect.findings[0].effective_asr == pytest.approx(0.1)
    assert suspect.findings[0].peer_effective_asr == pytest.approx(0.9)
    assert suspect.score == pytest.approx(suspect.findings[0].score, abs=1e-4) and suspect.score < fragile.score
    assert peer.findings[0].peer_effective_asr == pytest.approx(0.1)


def test_finetune_scored_thresholds_follow_the_calibrations_rule_on_its_clean_findings():
    """Rebuilt from the shipped calibration findings with today's score, the calibration's
    rule gives the shipped thresholds exactly; so the fine-tuning-scored ablation's, built
    the same way from the rescored findings, are those a calibration for that score sets."""
    from benchmarks.detection import calibration_runs, finetune_scored_thresholds
    from crossaudit.method.calibrate import profile
    from crossaudit.method.verdict import load_thresholds

    for dataset in ("digits", "fmnist"):
        runs = calibration_runs(dataset, lambda findings: findings)
        rebuilt, shipped = profile(dataset, "supervised", runs), load_thresholds(dataset)
        assert (rebuilt.per_family, rebuilt.similar_per_family) == (shipped.per_family, shipped.similar_per_family)
        assert rebuilt.clean_pairs == shipped.clean_pairs
        ablated = finetune_scored_thresholds(dataset)
        assert ablated.clean_pairs == shipped.clean_pairs
        assert ablated.per_family != shipped.per_family  # the rescoring moved the clean maxima


def test_paradigm_benchmark_names_its_misjudged_models():
    from benchmarks.paradigms import Misjudged, Samples, section
    from crossaudit.method.verdict import load_thresholds

    semi = Samples(positives=[0.8, 1.4], negatives=[0.3, 1.1], seconds=[20.0, 21.0])
    semi.misjudged += [
        Misjudged("semi_cnn_badnets_302", "semi_mlp_clean_301", True, "passed", 0.8),
        Misjudged("semi_mlp_clean_301", "semi_cnn_clean_300", False, "flagged", 1.1),
    ]
    lm = Samples(positives=[1.5], negatives=[0.2, 0.4], seconds=[30.0], errors=1)
    lm.misjudged.append(Misjudged("lm_phrase_302", "lm_clean_300", True, "inconclusive", None))
    text = section({"semi": semi, "lm": lm}, (300,), 60.0)
    assert "| semi | semi_cnn_badnets_302 | semi_mlp_clean_301 | backdoored | passed | 0.80 |" in text
    assert "| semi | semi_mlp_clean_301 | semi_cnn_clean_300 | clean | flagged | 1.10 |" in text
    assert "| lm | lm_phrase_302 | lm_clean_300 | backdoored | inconclusive | - |" in text
    assert "| semi | 1/2, 50.0% [1.3%, 98.7%] | 1/2, 50.0% [1.3%, 98.7%] |" in text, "rates carry their interval"
    assert "none, every model" in section({"ssl": Samples([1.2], [0.1], [9.0])}, (300,), 9.0)
    shipped = load_thresholds(paradigm="semi").clean_pairs
    assert f"| 0.750 | 20.5 | 0 | {shipped} |" in text, "each row names how many clean pairs its profile rests on"


def test_model_size_zoo_is_colour_32x32_and_its_sized_models_load_with_parity(tmp_path):
    """The model-size benchmark's task and architectures: colour Fashion-MNIST at 32x32
    whose colours say nothing of the class, and a ResNet-18 and a ViT the translator loads
    (with its parity and batch-independence checks) as a user's export would."""
    import torch

    from benchmarks.model_sizes import ARCHS
    from crossaudit.dev.zoo.architectures import build
    from crossaudit.dev.zoo.datasets import colour_fashion_mnist
    from crossaudit.dev.zoo.train import export_onnx

    split = colour_fashion_mnist()
    assert split.x_train.shape[1:] == (3, 32, 32) and split.x_train.dtype == np.float32
    assert split.x_test.min() >= 0.0 and split.x_test.max() <= 1.0
    # No class has its own hue: channels differ alike in every class (garments cover
    # different areas, so brightness, which is content, does differ).
    classes = [split.x_test[split.y_test == c] for c in range(10)]
    hue = np.array([(images - images.mean(1, keepdims=True)).mean(axis=(0, 2, 3)) for images in classes])
    assert np.ptp(hue, axis=0).max() < 0.01
    sizes = {}
    for arch in ("resnet18", "vit"):
        assert arch in ARCHS
        torch.manual_seed(0)
        model = build(arch, 3, 32, 10).eval()
        export_onnx(model, split.x_test[:2], tmp_path / f"{arch}.onnx")
        loaded = load_model(str(tmp_path / f"{arch}.onnx"))
        x = torch.from_numpy(split.x_test[:4])
        with torch.no_grad():
            assert torch.allclose(loaded.module(x), model(x), atol=1e-4)
        sizes[arch] = sum(p.numel() for p in loaded.module.parameters())
    assert 11_000_000 < sizes["resnet18"] < 11_500_000  # ResNet-18's size
