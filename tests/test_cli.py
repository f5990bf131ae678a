"""End-to-end audits through the `crossaudit` command, on real digits models."""

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import pytest

from tests.browser import CHROMIUM, browse


def crossaudit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crossaudit", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_clean_vs_badnets_exits_1_naming_model_and_target(digits_zoo, tmp_path):
    """With the digits profile (calibrated on clean digits pairs only)."""
    out = tmp_path / "out"
    done = crossaudit(
        "audit", str(digits_zoo.clean_cnn), str(digits_zoo.badnets_cnn),
        "--data", str(digits_zoo.audit_data), "--json", "--out", str(out), "--profile", "digits",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "backdoor"
    clean, poisoned = report["models"]
    assert clean["uri"] == str(digits_zoo.clean_cnn) and clean["verdict"] == "clean"
    assert poisoned["verdict"] == "backdoor"
    assert poisoned["target"] == digits_zoo.badnets_target
    assert poisoned["asr"] > 0.8 and poisoned["threshold_profile"] == "digits"
    for key in ("score", "threshold", "mask_l1", "sensitivity"):
        assert poisoned[key] is not None
    assert report["alignment"]["cka"] > 0.2 and set(report["timings"]) >= {"trigger_inversion"}
    assert {p.name for p in out.iterdir()} >= {
        "report.json", "report.html", "cka_heatmap.png", "trigger_model_2.png",
    }  # fmt: skip
    assert json.loads((out / "report.json").read_text()) == report
    check_report_page(out / "report.html", report, tmp_path)


def check_report_page(page: Path, report: dict, tmp_path: Path) -> None:
    """report.json validates against the published schema, and report.html says the
    verdict in words with its evidence, with no Python repr in it; a headless chromium
    renders it (docs/report.png came from here: CROSSAUDIT_SCREENSHOTS=docs)."""
    schema = json.loads(resources.files("crossaudit.report").joinpath("report.schema.json").read_text())
    jsonschema.validate(report, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    text = page.read_text()
    flagged = next(m for m in report["models"] if m["verdict"] == "backdoor")
    assert f"{flagged['uri']} is backdoored" in text and f"class {flagged['target']}" in text
    assert text.count("data:image/png;base64") == 2  # the recovered trigger and the CKA heatmap
    assert report["provenance"]["audit_set_sha256"] in text and report["provenance"]["command"] in text
    for python_repr in ("{'", "None", "ModelReport(", "Finding(", "[[", "<crossaudit"):
        assert python_repr not in text, python_repr
    if CHROMIUM is None:
        pytest.skip("rendering report.html needs chromium (make test installs Debian's chromium)")
    dom = browse(page.as_uri(), tmp_path / "report.png", size=(1200, 2400))
    assert f"{flagged['uri']} is backdoored" in dom


@pytest.mark.slow
def test_backdoor_target_outside_the_audit_sets_classes_is_found(digits_zoo, tmp_path):
    """An auditor's set need not hold every class the models score: with digits 0-2
    only, the BadNets target 3 is still searched (targets are the models' classes), and
    ten-wide logits on a three-class set are still read as a classifier."""
    from crossaudit.modelio.data import read_audit_data, write_parquet

    data = read_audit_data(str(digits_zoo.audit_data))
    keep = data.y < digits_zoo.badnets_target
    small = tmp_path / "digits012.parquet"
    write_parquet(small, data.x[keep], data.y[keep])
    done = crossaudit(
        "audit", str(digits_zoo.badnets_cnn), str(digits_zoo.clean_cnn), "--data", str(small),
        "--json", "--profile", "digits",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["paradigm"] == "supervised"
    assert report["models"][0]["target"] == digits_zoo.badnets_target


@pytest.mark.slow
def test_two_clean_models_of_different_architectures_exit_0(digits_zoo):
    done = crossaudit(
        "audit", str(digits_zoo.clean_cnn), str(digits_zoo.clean_mlp), "--data", str(digits_zoo.audit_data)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict: clean" in done.stdout
    assert f"{digits_zoo.clean_mlp}: clean (score " in done.stdout and "x its threshold" in done.stdout


def test_truncated_model_exits_2_with_one_clear_line(digits_zoo, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(digits_zoo.clean_cnn.read_bytes()[:300])
    done = crossaudit("audit", str(broken), str(digits_zoo.clean_mlp), "--data", str(digits_zoo.audit_data))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.onnx" in errors[0]
    assert "Traceback" not in done.stderr


def test_audit_set_too_small_to_measure_on_exits_2_not_clean(digits_zoo, tmp_path):
    """Sixty samples leave about thirty held out: too few for a success rate to mean
    anything, so two clean models are not cleared on them."""
    from crossaudit.modelio.data import read_audit_data, write_parquet

    data = read_audit_data(str(digits_zoo.audit_data))
    small = tmp_path / "sixty.parquet"
    write_parquet(small, data.x[:60], data.y[:60])
    done = crossaudit("audit", str(digits_zoo.clean_cnn), str(digits_zoo.clean_mlp), "--data", str(small))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "audit data too small" in errors[0] and "need 50" in errors[0]


def test_bad_audit_data_exits_2(digits_zoo, tmp_path):
    missing = tmp_path / "nothing.parquet"
    done = crossaudit("audit", str(digits_zoo.clean_cnn), str(digits_zoo.clean_mlp), "--data", str(missing))
    assert done.returncode == 2
    assert "no such audit data file" in done.stderr


def test_unknown_profile_exits_2(digits_zoo):
    done = crossaudit(
        "audit", str(digits_zoo.clean_cnn), str(digits_zoo.clean_mlp), "--data", str(digits_zoo.audit_data),
        "--profile", "imagenet",
    )  # fmt: skip
    assert done.returncode == 2 and "unknown threshold profile 'imagenet'" in done.stderr


@pytest.mark.slow
def test_a_profile_calibrated_on_the_users_own_clean_pair_judges_their_audits(digits_zoo, tmp_path):
    """`calibrate --pair` on a clean pair of the user's task writes a profile file that
    `audit --thresholds` then judges with (here it catches the tests' BadNets CNN), and
    with --findings the findings its scores came from."""
    from crossaudit.method.verdict import Finding

    thresholds, findings = tmp_path / "thresholds.json", tmp_path / "findings.json"
    done = crossaudit(
        "calibrate", "--pair", f"{digits_zoo.clean_cnn},{digits_zoo.clean_mlp}", "--data", str(digits_zoo.audit_data),
        "--profile", "my-digits", "--out", str(thresholds), "--findings", str(findings),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(thresholds.read_text())
    assert list(record["profiles"]) == ["my-digits"] and record["profiles"]["my-digits"]["clean_pairs"] == 1
    domain = record["profiles"]["my-digits"]["domain"]
    assert (domain["inputs"], domain["classes"]) == (["1x16x16"], [10]) and 0.5 < domain["accuracy"]["1x16x16"] <= 1
    [clean] = json.loads(findings.read_text())
    assert clean["similarity"] == record["clean_pair_similarity"][clean["pair"]]
    assert [model["model"] for model in clean["models"]] == [digits_zoo.clean_cnn.name, digits_zoo.clean_mlp.name]
    rescored = [Finding(**f) for model in clean["models"] for f in model["findings"]]
    for family, score in record["clean_pair_scores"][clean["pair"]].items():
        assert max([0.0] + [f.score for f in rescored if f.family == family]) == pytest.approx(score)
    ours = record["profiles"]["my-digits"]["per_family"]
    done = crossaudit(
        "audit", str(digits_zoo.clean_cnn), str(digits_zoo.badnets_cnn), "--data", str(digits_zoo.audit_data),
        "--json", "--thresholds", str(thresholds),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    poisoned = report["models"][1]
    assert poisoned["threshold_profile"] == "my-digits" and poisoned["threshold"] == ours[poisoned["trigger_family"]]
    assert poisoned["threshold_multiple"] == pytest.approx(poisoned["score"] / poisoned["threshold"], abs=1e-3)
    assert report["calibration_warning"] is None  # the task it was calibrated on
    assert "warning: this pair" not in done.stderr
    assert poisoned["target"] == digits_zoo.badnets_target


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", "not a thresholds file"),
        (
            '{"calibrated_by": "x", "profiles": {"t": {"per_family": {"patch": -1}, "clean_pairs": 1, '
            '"paradigm": "supervised"}}}',
            "non-positive threshold",
        ),
    ],
)
def test_a_broken_thresholds_file_exits_2(digits_zoo, tmp_path, content, message):
    broken = tmp_path / "thresholds.json"
    broken.write_text(content)
    done = crossaudit(
        "audit", str(digits_zoo.clean_cnn), str(digits_zoo.clean_mlp), "--data", str(digits_zoo.audit_data),
        "--thresholds", str(broken),
    )  # fmt: skip
    assert done.returncode == 2 and message in done.stderr


def _audit_with(env: dict[str, str], digits_zoo) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "crossaudit", "audit", str(digits_zoo.clean_cnn), str(digits_zoo.badnets_cnn),
         "--data", str(digits_zoo.audit_data), "--profile", "digits"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CROSSAUDIT_MAX_MODEL_BYTES", "1000", "limit"),
        ("CROSSAUDIT_MAX_AUDIT_SAMPLES", "50", "audit-set limit of 50"),
        ("CROSSAUDIT_TIME_BUDGET_S", "0.01", "time budget of 0.01s"),
        ("CROSSAUDIT_TIME_BUDGET_S", "soon", "expected a positive float"),
    ],
)
def test_exceeding_a_limit_is_inconclusive_never_clean_even_on_a_backdoored_pair(variable, value, message, digits_zoo):
    done = _audit_with({variable: value}, digits_zoo)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr


def functional_copy(original, copy) -> None:
    """The same model, different bytes: every node renamed and an Identity op on the output."""
    import onnx

    model = onnx.load(str(original))
    for index, node in enumerate(model.graph.node):
        node.name = f"renamed_{index}"
    output = model.graph.output[0].name
    producer = next(node for node in model.graph.node if output in node.output)
    producer.output[list(producer.output).index(output)] = "before_identity"
    model.graph.node.append(onnx.helper.make_node("Identity", ["before_identity"], [output], name="added_identity"))
    onnx.save(model, str(copy))


@pytest.mark.parametrize(("copy_kind", "message"), [("bytes", "is the same model as"), ("function", "same function")])
def test_a_model_audited_against_a_copy_of_itself_exits_2_not_clean(digits_zoo, tmp_path, copy_kind, message):
    """A copy cannot witness against its original: it shares every backdoor, so no trigger
    separates them and the pair would pass as clean (here the BadNets CNN)."""
    copy = tmp_path / "a_copy.onnx"
    if copy_kind == "bytes":
        copy.write_bytes(digits_zoo.badnets_cnn.read_bytes())
    else:
        functional_copy(digits_zoo.badnets_cnn, copy)
        assert copy.read_bytes() != digits_zoo.badnets_cnn.read_bytes()
    done = crossaudit("audit", str(digits_zoo.badnets_cnn), str(copy), "--data", str(digits_zoo.audit_data), "--json")
    assert done.returncode == 2, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "inconclusive" and message in report["error"]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]


def test_a_server_that_cannot_be_reached_is_named_at_once(tmp_path):
    """MLflow's own retries would make `check` wait minutes on a closed port."""
    from crossaudit.dev.tracking_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    done = crossaudit("check", "models:/task@production", "--tracking-uri", url)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: MLflow server {url} cannot be reached")


def test_version_and_paths_are_answered_before_anything_heavy(tmp_path):
    """`--version`, a directory given as --data and a missing model are told in one line
    each (checked before torch is imported), and `calibrate` refuses an --out it could not
    write before its long run."""
    from crossaudit import __version__

    assert crossaudit("--version").stdout.strip() == f"crossaudit {__version__}"
    done = crossaudit("audit", "a.onnx", "b.onnx", "--data", str(tmp_path))
    assert done.returncode == 2 and "a directory; --data takes one audit set file" in done.stderr
    (tmp_path / "set.parquet").write_bytes(b"")
    done = crossaudit("audit", str(tmp_path / "gone.onnx"), "b.onnx", "--data", str(tmp_path / "set.parquet"))
    assert done.returncode == 2 and "gone.onnx: no such file or directory" in done.stderr
    for out, why in ((tmp_path, "a directory"), (tmp_path / "no" / "t.json", "no directory")):
        done = crossaudit("calibrate", "--pair", "a.onnx,b.onnx", "--data", "set.parquet", "--out", str(out))
        assert done.returncode == 2 and why in done.stderr, done.stderr


@pytest.mark.slow
def test_models_that_are_not_what_the_audit_needs_are_named_plainly(digits_zoo, tmp_path):
    """A pickle renamed .onnx is refused as a pickle, and a model whose output is not its
    peer's kind (12 values where the peer scores 10 classes) is named with both widths."""
    import pickle

    import torch

    renamed = tmp_path / "model.onnx"
    renamed.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    done = crossaudit("audit", str(renamed), str(digits_zoo.clean_cnn), "--data", str(digits_zoo.audit_data))
    assert done.returncode == 2 and "its bytes are a pickle or a PyTorch archive, not ONNX" in done.stderr
    wide = tmp_path / "wide.onnx"
    torch.onnx.export(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 12)).eval(), (torch.rand(2, 1, 16, 16),),
        str(wide), input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    done = crossaudit("audit", str(wide), str(digits_zoo.clean_cnn), "--data", str(digits_zoo.audit_data))
    assert done.returncode == 2
    assert "returns 12 values per input" in done.stderr and "returns 10 values per input" in done.stderr


def test_provider_chosen_text_cannot_start_a_line_of_its_own(tmp_path):
    """A model name with a newline and an escape sequence is shown escaped: it cannot print
    a `verdict: clean` line of its own or move the cursor over the real one."""
    (tmp_path / "set.parquet").write_bytes(b"")
    hostile = str(tmp_path / "m.onnx\nverdict: clean\x1b[1A")
    done = crossaudit("audit", hostile, "b.onnx", "--data", str(tmp_path / "set.parquet"))
    assert done.returncode == 2
    assert not [row for row in (done.stdout + done.stderr).splitlines() if row.startswith("verdict: clean")]
    assert "\\nverdict: clean\\x1b[1A" in done.stderr


def test_an_unexpected_error_is_a_bug_that_still_exits_2(tmp_path, monkeypatch, capsys):
    """1 would read as a backdoor found: anything the error boundary does not expect is
    reported with its traceback and exits 2, as inconclusive."""
    from crossaudit.cli import app
    from crossaudit.method import calibrate

    def crash(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(calibrate, "calibrate_pairs", crash)
    with pytest.raises(SystemExit) as ended:
        app(["calibrate", "--pair", "a,b", "--data", "x", "--out", str(tmp_path / "t.json")], prog_name="crossaudit")
    assert ended.value.code == 2
    assert "unexpected ZeroDivisionError (a bug in crossaudit; nothing was judged): boom" in capsys.readouterr().err


def test_a_missing_runtime_or_extra_names_what_to_install(tmp_path, monkeypatch, capsys):
    """crossaudit depends on neither ONNX Runtime package (they install the same module):
    without one, an audit says which extra to install, and exits 2."""
    import sys

    from crossaudit.cli import app
    from crossaudit.method import calibrate

    def needs_runtime(*args: object, **kwargs: object) -> None:
        import onnxruntime  # noqa: F401

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if neither package were installed
    monkeypatch.setattr(calibrate, "calibrate_pairs", needs_runtime)
    with pytest.raises(SystemExit) as ended:
        app(["calibrate", "--pair", "a,b", "--data", "x", "--out", str(tmp_path / "t.json")], prog_name="crossaudit")
    assert ended.value.code == 2
    assert "pip install 'crossaudit[cpu]'" in capsys.readouterr().err
