"""Which thresholds judge a pair: a profile's alike-pairs thresholds only for pairs at
least as alike as the clean pairs they came from."""

import json
from dataclasses import replace

import numpy as np
import pytest

from crossaudit.method.verdict import (
    SIMILAR,
    Domain,
    Finding,
    ModelReport,
    Thresholds,
    judge,
    load_thresholds,
    unfamiliar,
)


def _finding() -> Finding:
    """A patch finding that scores 0.5: full success on both models, at a footprint
    10**0.5 times smaller than the peer's."""
    return Finding(
        family="patch", target=3, mask_l1=9.0, footprint=0.01, asr=1.0, witness_flip=0.0, witness_kept=1.0,
        asr_after_finetune=1.0, effective_asr=1.0, peer_footprint=10**0.5 * 0.01, peer_effective_asr=1.0,
    )  # fmt: skip


THRESHOLDS = Thresholds({"patch": 0.8}, "crossaudit calibrate", 10, "any", "supervised", {"patch": 0.4}, 4)


def test_an_alike_pair_is_judged_by_the_alike_clean_pairs_thresholds():
    assert _finding().score == pytest.approx(0.5)
    alike = judge("m.onnx", [_finding()], THRESHOLDS, SIMILAR)
    assert (alike.verdict, alike.threshold, alike.threshold_profile, alike.target) == (
        "backdoor",
        0.4,
        "any:similar",
        3,
    )


def test_a_suspect_cheap_to_flip_to_every_target_gains_nothing_from_it():
    """Footprints are read against each model's scale: a suspect whose median patch is as
    much smaller than its peer's as this target's is scores nothing for it."""
    cheap_everywhere = replace(_finding(), footprint_scale=10**-0.5, peer_footprint_scale=1.0)
    assert cheap_everywhere.score == pytest.approx(0.0, abs=1e-9)
    out_of_line = replace(_finding(), footprint_scale=10**0.5, peer_footprint_scale=1.0)
    assert out_of_line.score == pytest.approx(1.0)


def test_a_target_dear_to_the_peer_is_no_evidence_against_the_suspect():
    """Read against its median, the peer's footprint counts no higher than the median: a
    target the suspect reaches at its median cost scores nothing, however dear the peer
    finds it; a suspect's target cheaper than its median still scores against a peer at
    its own median."""
    median = {"footprint_scale": 0.01, "peer_footprint_scale": 0.01}
    peer_dear = replace(_finding(), footprint=0.01, peer_footprint=0.05, **median)
    assert peer_dear.score == pytest.approx(0.0, abs=1e-9)
    suspect_cheap = replace(peer_dear, footprint=0.001)
    assert suspect_cheap.score == pytest.approx(1.0)
    unscaled = replace(peer_dear, footprint_scale=None, peer_footprint_scale=None)
    assert unscaled.score == pytest.approx(np.log10(5.0))


def test_a_pair_less_alike_keeps_the_profiles_thresholds():
    unlike = judge("m.onnx", [_finding()], THRESHOLDS, SIMILAR - 0.01)
    assert (unlike.verdict, unlike.threshold, unlike.threshold_profile) == ("clean", 0.8, "any")


def test_a_profile_without_alike_pairs_judges_every_pair_alike():
    plain = Thresholds({"patch": 0.8}, "crossaudit calibrate", 10, "digits")
    assert plain.for_pair(1.0) == ({"patch": 0.8}, "digits")


def test_a_thresholds_file_carries_the_alike_pairs_thresholds(tmp_path):
    path = tmp_path / "t.json"
    profile = {"per_family": {"patch": 0.8}, "clean_pairs": 5, "paradigm": "supervised"}
    profile["similar"] = {"per_family": {"patch": 0.3}, "clean_pairs": 3}
    path.write_text(json.dumps({"calibrated_by": "crossaudit calibrate", "profiles": {"mine": profile}}))
    loaded = load_thresholds(path=path)
    assert (loaded.similar_per_family, loaded.similar_pairs) == ({"patch": 0.3}, 3)
    profile["similar"]["per_family"]["patch"] = 0.0
    path.write_text(json.dumps({"calibrated_by": "crossaudit calibrate", "profiles": {"mine": profile}}))
    with pytest.raises(ValueError, match="non-positive threshold"):
        load_thresholds(path=path)


def test_every_other_target_over_its_threshold_is_reported_with_the_named_one(tmp_path):
    """The named target is the strongest finding's; another target that also reached its
    family's threshold is listed (once, at its strongest family), so a natural shortcut
    that outranks a planted target does not hide it."""
    from crossaudit.method.stages import AuditResult
    from crossaudit.method.verdict import AuditReport, Crossing
    from crossaudit.report.html import write_outputs

    thresholds = Thresholds({"patch": 0.4, "blend": 0.5}, "crossaudit calibrate", 10)
    shortcut = replace(_finding(), family="blend", target=8, peer_footprint=10**0.6 * 0.01)  # 0.6: 1.2x
    planted = replace(_finding(), target=3, peer_footprint=10**0.45 * 0.01)  # 0.45: 1.125x
    planted_blend = replace(planted, family="blend")  # 0.45 < 0.5: under its threshold
    weaker_shortcut = replace(shortcut, family="patch", peer_footprint=10**0.42 * 0.01)  # 1.05x, target 8 again
    below = replace(_finding(), target=5, peer_footprint=10**0.3 * 0.01)  # 0.3 < 0.4
    judged = judge("m.onnx", [below, planted_blend, planted, weaker_shortcut, shortcut], thresholds, 0.5)
    assert (judged.verdict, judged.target, judged.trigger_family) == ("backdoor", 8, "blend")
    assert judged.also_over_threshold == [Crossing(3, "patch", pytest.approx(0.45), 0.4)]
    assert judge("m.onnx", [below], thresholds, 0.5).also_over_threshold == []
    assert judged.summary() == (
        "m.onnx: backdoor (score 0.6 = 1.20x its threshold 0.5, profile any; target class 8; "
        "also over threshold: class 3)"
    )

    report = AuditReport("backdoor", [judged], None, None, {}, "0", 0, "1")
    write_outputs(AuditResult(report), tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["models"][0]["also_over_threshold"] == [
        {"target": 3, "family": "patch", "score": pytest.approx(0.45), "threshold": 0.4}
    ]
    assert "class 3 (patch, 1.12x)" in (tmp_path / "report.html").read_text()


CALIBRATED = Domain(("1x16x16", "1x28x28"), (10,), accuracy={"1x16x16": 0.96, "1x28x28": 0.82}, similarity=0.37)


@pytest.mark.parametrize(
    ("inputs", "classes", "accuracies", "similarity", "reason"),
    [
        ("3x32x32", 10, [0.95, 0.93], 0.6, "inputs 3x32x32 (calibrated on 1x16x16, 1x28x28)"),
        ("1x8x8", 10, [0.95, 0.93], 0.6, "inputs 1x8x8"),
        ("1x28x28", 43, [0.95, 0.93], 0.6, "43 classes (calibrated on 10)"),
        ("1x16x16", 10, [0.81, 0.84], 0.6, "clean accuracy 0.81 (calibrated on models of 0.96 or more)"),
        ("1x16x16", 10, [0.95, 0.93], 0.2, "similarity 0.20 (calibrated on pairs of 0.37 or more)"),
    ],
)
def test_a_pair_unlike_every_calibrated_one_is_told_so_with_the_command_to_calibrate(
    inputs, classes, accuracies, similarity, reason
):
    thresholds = replace(THRESHOLDS, domain=CALIBRATED)
    models = [ModelReport(f"m{i}.onnx", "clean", clean_accuracy=a) for i, a in enumerate(accuracies)]
    warning = unfamiliar(thresholds, models, similarity, inputs, classes)
    assert warning is not None and reason in warning and "profile 'any'" in warning
    assert "crossaudit calibrate --pair" in warning and "--thresholds" in warning


def test_a_pair_like_the_calibrated_ones_gets_no_warning():
    """Nor does a backdoored model for the few points of accuracy its key cost (each task
    held to its own models' accuracy), nor a pair judged by a profile that records no domain."""
    models = [
        ModelReport("a.onnx", "backdoor", clean_accuracy=0.8),
        ModelReport("b.onnx", "clean", clean_accuracy=0.84),
    ]
    assert unfamiliar(replace(THRESHOLDS, domain=CALIBRATED), models, 0.9, "1x28x28", 10) is None
    assert unfamiliar(replace(THRESHOLDS, domain=CALIBRATED), models, 0.9, "1x16x16", 10) is not None
    assert unfamiliar(THRESHOLDS, models, 0.1, "3x32x32", 43) is None


def test_a_thresholds_file_carries_its_domain(tmp_path):
    path = tmp_path / "t.json"
    profile = {"per_family": {"patch": 0.8}, "clean_pairs": 5, "paradigm": "supervised", "domain": CALIBRATED.to_dict()}
    path.write_text(json.dumps({"calibrated_by": "crossaudit calibrate", "profiles": {"mine": profile}}))
    assert load_thresholds(path=path).domain == CALIBRATED
    profile["domain"] = {"inputs": ["1x16x16"]}
    path.write_text(json.dumps({"calibrated_by": "crossaudit calibrate", "profiles": {"mine": profile}}))
    with pytest.raises(ValueError, match="not a thresholds file"):
        load_thresholds(path=path)


def test_provider_named_layers_are_drawn_as_text_not_mathtext(tmp_path):
    """ONNX value names are the provider's: `$\\foo$` is not a formula to parse (which
    would fail and lose the report), it is a name to show."""
    import numpy as np

    from crossaudit.method.cka import Alignment
    from crossaudit.method.stages import AuditResult
    from crossaudit.method.verdict import AuditReport
    from crossaudit.report.html import _drawn, _heatmap_png

    result = AuditResult(AuditReport("clean", [], None, None, {}, "0", 0, "1"))
    result.alignment = Alignment(["$\\foo$", "ok"], ["w1", "w2"], np.eye(2), "$\\foo$", "w1", 0.9)
    assert _drawn(_heatmap_png, result, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 1000
