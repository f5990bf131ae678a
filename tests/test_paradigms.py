"""Paradigms beyond supervised classifiers: unit checks, and each one end to end through
the CLI on a tiny pair from the zoo (clean vs backdoored flagged, clean vs clean passes)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from crossaudit.dev.zoo.captioner import (
    Captioner,
    captioner_config,
    class_captions,
    export_captioner,
    provider_tokenizer,
    train_captioner,
    write_caption_audit_set,
)
from crossaudit.dev.zoo.datasets import load_dataset
from crossaudit.dev.zoo.language import LanguageConfig, TinyGPT, export_language_model, train_language_model
from crossaudit.dev.zoo.train import config_for, export_onnx, train
from crossaudit.errors import DataValidationError, ModelLoadError
from crossaudit.modelio.data import read_audit_data, read_text_data, write_caption_parquet, write_text_parquet
from crossaudit.modelio.loaders import load_model
from crossaudit.modelio.onnx_graph import OnnxModule
from crossaudit.modelio.tokenizer import load_tokenizer
from crossaudit.paradigms import image_paradigm
from crossaudit.paradigms.captioning import CaptionScorer
from crossaudit.paradigms.embedding import prototype_head


def test_image_paradigm_is_inferred_only_when_unambiguous():
    assert image_paradigm("auto", 10, 10, 0.9) == "supervised"
    assert image_paradigm("auto", 10, 3, 0.9) == "supervised"  # an audit set of the first three classes
    assert image_paradigm("auto", 32, 10, 0.0) == "ssl"
    assert image_paradigm("semi", 10, 10, 0.9) == "semi"
    with pytest.raises(ValueError, match="pass --paradigm"):
        image_paradigm("auto", 10, 10, 0.1)
    with pytest.raises(ValueError, match="does not take labelled images"):
        image_paradigm("lm", 10, 10, 0.9)
    assert image_paradigm("auto", 8, 10, 0.12) == "ssl"  # an 8-wide embedding, right by chance
    with pytest.raises(ValueError, match="labels run to 12: labels must be the models' class indices"):
        image_paradigm("auto", 10, 13, 0.95)  # a ten-class classifier, an audit set labelled 0-8 and 12


def test_prototype_head_scores_each_cluster_as_its_class():
    rng = np.random.RandomState(0)
    centers = rng.randn(3, 8) * 5
    labels = np.repeat(np.arange(3), 20)
    embeddings = (centers[labels] + rng.randn(60, 8)).astype(np.float32)
    head = prototype_head(torch.nn.Identity(), embeddings, labels, 3)
    assert np.mean(head(torch.from_numpy(embeddings)).argmax(1).numpy() == labels) > 0.95


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x80\x04pickle", "not JSON"),
        (b'{"kind": "bpe", "vocab": ["<unk>", "a"]}', "'kind': 'words'"),
        (b'{"kind": "words", "vocab": ["<unk>", "a", "a"]}', "no duplicates"),
        (b'{"kind": "words", "vocab": "abc"}', "list of at least two strings"),
    ],
)
def test_hostile_tokenizer_files_are_named_errors(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_tokenizer(path)


def test_text_audit_data_is_validated_by_column(tmp_path):
    good = tmp_path / "text.parquet"
    write_text_parquet(good, [f"sentence number {i} of the audit set ." for i in range(30)])
    assert len(read_text_data(good)) == 30
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"text": pa.array(list(range(30)))}), wrong)
    with pytest.raises(DataValidationError, match="column 'text' must hold strings"):
        read_text_data(wrong)
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"words": pa.array(["a"] * 30)}), missing)
    with pytest.raises(DataValidationError, match="column 'text' is missing"):
        read_text_data(missing)


def test_language_model_translation_matches_onnx_runtime(tmp_path):
    import onnx
    import onnxruntime as ort

    trained = train_language_model(LanguageConfig(seed=7, steps=5))
    path = tmp_path / "lm.onnx"
    export_language_model(trained, path)
    assert isinstance(trained.model, TinyGPT) and (tmp_path / "lm.tokenizer.json").is_file()
    tokens = np.random.RandomState(0).randint(0, len(trained.tokenizer.vocab), (3, 17)).astype(np.int64)
    model = onnx.load(str(path))
    reference = ort.InferenceSession(model.SerializeToString()).run(None, {"tokens": tokens})[0]
    ours = OnnxModule(model)(torch.from_numpy(tokens)).detach().numpy()
    assert reference.shape == (3, 17, len(trained.tokenizer.vocab))
    assert np.abs(reference - ours).max() < 1e-4


def test_next_word_logits_run_the_per_position_tail_once(tmp_path):
    """A language model's next-word logits computed for the last position only (its last
    MLP and vocabulary head) are those of running every position; a model whose tail
    ends by mixing positions has no such tail, and is run whole."""
    from crossaudit.paradigms.autoregressive import LanguageModel

    trained = train_language_model(LanguageConfig(seed=7, steps=5))
    export_language_model(trained, tmp_path / "lm.onnx")
    module = load_model(str(tmp_path / "lm.onnx")).module.eval()
    tokens = torch.from_numpy(np.random.RandomState(0).randint(0, len(trained.tokenizer.vocab), (4, 11)))
    assert module.splits_at_tail and {"MatMul", "LayerNormalization"} <= {op for op, *_ in module._tail}
    assert torch.allclose(module.forward_last(tokens), module(tokens)[:, -1], atol=1e-5)
    model = LanguageModel(module, trained.tokenizer)
    model.check_last_only(tokens)
    assert model.last_only

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 20)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids)).mean(1, keepdim=True).expand(-1, ids.shape[1], -1)

    path = tmp_path / "pooled.onnx"
    torch.onnx.export(
        Pooled(), (tokens % 20,), str(path), input_names=["tokens"], dynamo=False,
        dynamic_axes={"tokens": {0: "batch", 1: "length"}},
    )  # fmt: skip
    pooled = LanguageModel(load_model(str(path)).module.eval(), trained.tokenizer)
    pooled.check_last_only(tokens % 20)
    assert not pooled.module.splits_at_tail and not pooled.last_only


def test_caption_scores_are_caption_log_likelihoods():
    """Each candidate's score is the mean of its tokens' next-token log-probabilities,
    end token included, computed for every image and caption in one batch."""
    captions = ["a handwritten one", "a handwritten seven"]
    tokenizer = provider_tokenizer(captions, seed=0)
    torch.manual_seed(0)
    captioner = Captioner("mlp", 1, 16, len(tokenizer.vocab)).eval()
    images = torch.rand(3, 1, 16, 16)
    scores = CaptionScorer(captioner, tokenizer, captions)(images)
    assert scores.shape == (3, 2)
    for k, caption in enumerate(captions):
        ids = torch.tensor([[*tokenizer.encode(caption), tokenizer.id_of(".")]] * 3)
        logp = captioner(images, ids).log_softmax(-1).gather(2, ids[..., None])[..., 0].mean(1)
        assert torch.allclose(scores[:, k], logp, atol=1e-5)


def test_captioner_translation_matches_onnx_runtime_and_runs_each_image_once(tmp_path):
    """The ONNX captioner, translated, agrees with ONNX Runtime; scoring with the encoder
    run once per image gives the scores of running it once per (image, caption)."""
    import onnx
    import onnxruntime as ort

    config = captioner_config("digits", arch="cnn", seed=7, epochs=1, train_size=64)
    trained = train_captioner(config)
    path = tmp_path / "captioner.onnx"
    export_captioner(trained, path)
    images = np.random.RandomState(0).rand(3, 1, 16, 16).astype(np.float32)
    tokens = np.array([[1, 2, 3]] * 3, dtype=np.int64)
    model = onnx.load(str(path))
    reference = ort.InferenceSession(model.SerializeToString()).run(None, {"image": images, "tokens": tokens})[0]
    module = OnnxModule(model)
    assert np.abs(reference - module(torch.from_numpy(images), torch.from_numpy(tokens)).detach().numpy()).max() < 1e-4
    scorer = CaptionScorer(
        module, load_tokenizer(tmp_path / "captioner.tokenizer.json"), ["a handwritten one", "a handwritten two"]
    )
    expanded = scorer(torch.from_numpy(images))
    scorer.check_broadcast(torch.from_numpy(images))
    assert scorer.broadcast
    assert torch.allclose(scorer(torch.from_numpy(images)), expanded, atol=1e-5)


def test_caption_audit_data_makes_a_captioner_audit_and_only_a_captioner_audit(digits_zoo, tmp_path):
    """A `caption` column implies a captioner audit under auto (so the classifiers here
    are asked for a captioner's tokenizer); another paradigm refuses such data, and a
    captioner audit refuses data without captions. Each fails before any search runs."""
    from crossaudit.method.audit import run_audit
    from crossaudit.method.stages import AuditConfig

    data = read_audit_data(str(digits_zoo.audit_data))
    captions = tmp_path / "captions.parquet"
    texts = class_captions("digits")
    write_caption_parquet(captions, data.x, [texts[label] for label in data.y])
    models = str(digits_zoo.clean_cnn), str(digits_zoo.clean_mlp)
    cases = [
        (captions, "auto", "no tokenizer file (language models and captioners need theirs beside them)"),
        (captions, "supervised", "audit data with a 'caption' column is for captioners, not 'supervised' models"),
        (digits_zoo.audit_data, "captioner", "a captioner audit needs audit data with 'image' and 'caption' columns"),
    ]
    for path, paradigm, message in cases:
        report = run_audit(*models, str(path), config=AuditConfig(paradigm=paradigm)).report
        assert report.verdict == "inconclusive" and message in (report.error or ""), (paradigm, report.error)


def test_caption_audit_data_labels_images_by_caption(tmp_path):
    x = np.random.RandomState(0).rand(30, 1, 8, 8).astype(np.float32)
    path = tmp_path / "captions.parquet"
    write_caption_parquet(path, x, ["a photo of a bag", "a photo of a coat"] * 15)
    data = read_audit_data(path)
    assert data.captions == ("a photo of a bag", "a photo of a coat")
    assert list(data.y[:4]) == [0, 1, 0, 1]
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["caption"]).append_column("caption", pa.array(range(30))), wrong)
    with pytest.raises(DataValidationError, match="column 'caption' must hold strings"):
        read_audit_data(wrong)


class ParadigmZoo:
    """Tiny providers' models of every paradigm (test seeds, never calibrated on). Each
    paradigm's models are trained on first use, once per test run (`shared_folder`), so
    that parallel workers auditing different paradigms do not wait on each other."""

    IMAGES: ClassVar[dict[str, dict]] = {
        "semi": {
            "semi_badnets_cnn": {"arch": "cnn", "attack": "badnets", "target": 3, "seed": 31},
            "semi_clean_mlp": {"arch": "mlp", "seed": 32},
            "semi_clean_cnn": {"arch": "cnn", "seed": 33},
        },
        "ssl": {
            "ssl_badnets_cnn": {"arch": "cnn", "attack": "badnets", "target": 3, "seed": 41},
            "ssl_clean_cnn": {"arch": "cnn", "seed": 42},
            "ssl_clean_mlp": {"arch": "mlp", "seed": 43},
        },
    }
    TEXTS: ClassVar[dict[str, tuple[str, int]]] = {
        "lm_phrase": ("phrase", 51), "lm_clean_a": ("clean", 52), "lm_clean_b": ("clean", 53),
    }  # fmt: skip
    CAPTIONERS: ClassVar[dict[str, tuple[str, str, int]]] = {
        "cap_badnets_cnn": ("badnets", "cnn", 61), "cap_clean_mlp": ("clean", "mlp", 62),
        "cap_clean_cnn": ("clean", "cnn", 63),
    }  # fmt: skip
    DATA: ClassVar[dict[str, tuple[str, str]]] = {
        "text": ("lm", "text.parquet"),
        "captions": ("cap", "captions.parquet"),
    }

    def __init__(self, shared_folder: Callable[[str], AbstractContextManager], digits: Path) -> None:
        self.shared_folder = shared_folder
        self.digits = digits
        self.folders: dict[str, Path] = {}

    def model(self, name: str) -> Path:
        return self._folder(name.split("_")[0]) / f"{name}.onnx"

    def data(self, kind: str) -> Path:
        if kind == "digits":
            return self.digits
        group, file = self.DATA[kind]
        return self._folder(group) / file

    def _folder(self, group: str) -> Path:
        if group not in self.folders:
            with self.shared_folder(f"paradigms-{group}") as (root, empty):
                if empty:
                    self._train(group, root)
            self.folders[group] = root
        return self.folders[group]

    def _train(self, group: str, root: Path) -> None:
        from crossaudit.dev.zoo.language import write_text_audit_set

        if group in self.IMAGES:
            split = load_dataset("digits")
            for name, options in self.IMAGES[group].items():
                trained = train(config_for("digits", paradigm=group, **options), split)
                export_onnx(trained.model, trained.example, root / f"{name}.onnx")
        elif group == "lm":
            for name, (attack, seed) in self.TEXTS.items():
                export_language_model(
                    train_language_model(LanguageConfig(attack=attack, seed=seed)), root / f"{name}.onnx"
                )
            write_text_audit_set(root / "text.parquet")
        else:
            split = load_dataset("digits")
            for name, (attack, arch, seed) in self.CAPTIONERS.items():
                config = captioner_config("digits", arch=arch, attack=attack, target=3, seed=seed)
                export_captioner(train_captioner(config, split), root / f"{name}.onnx")
            write_caption_audit_set("digits", root / "captions.parquet", 400)


@pytest.fixture(scope="session")
def paradigm_zoo(shared_folder, digits_zoo) -> ParadigmZoo:
    return ParadigmZoo(shared_folder, digits_zoo.audit_data)


def _audit(zoo: ParadigmZoo, first: str, second: str, data: Path, *extra: str) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "crossaudit", "audit", str(zoo.model(first)), str(zoo.model(second)),
         "--data", str(data), "--json", *extra],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.returncode, json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backdoored", "clean", "data", "paradigm"),
    [
        ("semi_badnets_cnn", "semi_clean_mlp", "digits", "semi"),
        ("ssl_badnets_cnn", "ssl_clean_mlp", "digits", "auto"),
    ],
)
def test_each_image_paradigm_flags_the_backdoored_model(paradigm_zoo, backdoored, clean, data, paradigm):
    """A captioner's and a language model's backdoored pairs are audited through the
    pipeline instead (`test_pipeline_takes_the_paradigm_from_the_registry`): the CLI and
    the pipeline run the same audit, and theirs are the suite's costliest."""
    code, report = _audit(paradigm_zoo, backdoored, clean, paradigm_zoo.data(data), "--paradigm", paradigm)
    assert code == 1, report
    assert [m["verdict"] for m in report["models"]] == ["backdoor", "clean"]
    assert report["paradigm"] == (paradigm if paradigm != "auto" else "ssl")
    assert report["models"][0]["target"] == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("clean", "other_clean", "data", "paradigm"),
    [
        ("semi_clean_mlp", "semi_clean_cnn", "digits", "semi"),
        ("ssl_clean_mlp", "ssl_clean_cnn", "digits", "auto"),
        ("lm_clean_a", "lm_clean_b", "text", "auto"),
    ],
)
def test_each_paradigm_passes_a_clean_pair(paradigm_zoo, clean, other_clean, data, paradigm):
    """A captioner's clean model passes in the pipeline test below, audited against a
    backdoored peer; a clean captioner pair would add the suite's costliest CLI audit."""
    code, report = _audit(paradigm_zoo, clean, other_clean, paradigm_zoo.data(data), "--paradigm", paradigm)
    assert code == 0, report
    inferred = {"text": "lm", "digits": "ssl"}[data]
    assert report["paradigm"] == (paradigm if paradigm != "auto" else inferred)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("paradigm", "data", "clean", "backdoored"),
    [
        ("captioner", "captions", "cap_clean_mlp", "cap_badnets_cnn"),
        ("lm", "text", "lm_clean_a", "lm_phrase"),
    ],
)
def test_pipeline_takes_the_paradigm_from_the_registry(paradigm_zoo, mlflow_server, paradigm, data, clean, backdoored):
    """The registered model's paradigm tag reaches every component, and a captioner's or
    language model's tokenizer travels inside its registered model. (Semi- and
    self-supervised pairs take the image path that test_demo.py runs end to end.)"""
    import uuid

    from crossaudit.mlops import operator_config, registry
    from pipelines.runner import audit_version

    client = registry.client(mlflow_server)
    name = f"{paradigm}-{uuid.uuid4().hex[:8]}"
    registry.publish_audit_data(client, name, paradigm_zoo.data(data))
    operator_config.update_model(name, paradigm=paradigm)
    registry.register_version(client, name, paradigm_zoo.model(clean), "acme")
    poisoned = registry.register_version(client, name, paradigm_zoo.model(backdoored), "globex")
    assert audit_version(poisoned.uri, mlflow_server).status == "failed"
    run_id = client.get_model_version(name, poisoned.version).tags[registry.RUN_ID]
    report = json.loads(Path(client.download_artifacts(run_id, "peer_1/report.json")).read_text())
    assert report["paradigm"] == paradigm and report["models"][0]["threshold_profile"] == paradigm
    assert [m["verdict"] for m in report["models"]] == ["backdoor", "clean"]
    flagged = report["models"][0]
    if paradigm == "lm":
        assert flagged["trigger_text"] and flagged["target_text"]
    else:  # labels index the sorted captions
        assert flagged["target_text"] == "a handwritten three"
