"""What one audit stage hands to the next, on disk, without pickle.

The pipeline runs each stage in its own process (a KFP component, possibly on another
node), so every intermediate result has a file form: features and trigger parameters as
`.npz` (numpy arrays, loaded with `allow_pickle=False`), everything else as JSON. A stage's
output folder carries its upstream's files forward, so the last one holds the whole story
of a pair: `pair.json`, `alignment.json`, `triggers.npz` + `triggers.json`, `findings.json`
(a language-model pair: `text_triggers.json` and `text_effects.json` instead).
An error is carried forward the same way, so a pair that could not be audited reaches the
gate as an error, never as silence.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from crossaudit.errors import AuditError
from crossaudit.method.cka import Alignment
from crossaudit.method.inversion import FAMILY_CLASSES, Trigger, TriggerFamily
from crossaudit.method.verdict import Finding
from crossaudit.paradigms.autoregressive import TextEffect, TextTrigger

PAIR = "pair.json"


@dataclass
class PairRecord:
    """The pair as the first stage saw it: what later stages must find unchanged."""

    uris: list[str]
    clean_accuracy: list[float | None]
    parity_max_abs_diff: list[float | None]
    clean_agreement: float | None
    seed: int
    error: str | None = None
    paradigm: str = "auto"
    model_sha256: list[str | None] | None = None  # None until stage 1 has loaded the models
    # The digest of each model's whole artifact as fetched (`digest.artifact_digest`): what
    # the gate signs its verdict for.
    artifact_sha256: list[str] | None = None
    # Per model, the input sets its translation was proved on against ONNX Runtime so far
    # (`ModelReport.parity_checks`): stage 1 adds the audit data and random inputs, stage 3
    # the stamped candidate triggers, stage 4 the final triggers on held-out data.
    parity_checks: list[dict[str, float]] | None = None

    def checked(self) -> dict[str, float | None]:
        """The models stage 1 proved against ONNX Runtime, by digest (`parity_check`)."""
        if self.model_sha256 is None:
            return {}
        pairs = zip(self.model_sha256, self.parity_max_abs_diff, strict=True)
        return {digest: diff for digest, diff in pairs if digest is not None}

    def add_parity_checks(self, checks: list[dict[str, float]]) -> None:
        """Merge a stage's proofs into what earlier stages proved (largest difference per set)."""
        merged = self.parity_checks or [{} for _ in checks]
        for known, found in zip(merged, checks, strict=True):
            for input_set, diff in found.items():
                known[input_set] = max(known.get(input_set, 0.0), diff)
        self.parity_checks = merged


def only_entry(folder: Path) -> Path:
    """The model or data file a `registry.materialize` put into its folder."""
    entries = sorted(folder.iterdir())
    if len(entries) != 1:
        raise AuditError(f"{folder}: expected one model or data entry, found {len(entries)}")
    return entries[0]


def carry(upstream: Path, out: Path) -> None:
    """Start a stage's output folder with everything its upstream produced."""
    shutil.copytree(upstream, out, dirs_exist_ok=True)


def write_pair(record: PairRecord, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / PAIR).write_text(json.dumps(asdict(record), indent=1))


def read_pair(folder: Path) -> PairRecord:
    return PairRecord(**json.loads((folder / PAIR).read_text()))


def write_features(features: list[dict[str, np.ndarray]], out: Path) -> None:
    arrays = {f"{index}/{tap}": values for index, taps in enumerate(features) for tap, values in taps.items()}
    order = [list(taps) for taps in features]
    np.savez(out / "features.npz", **arrays)
    (out / "features.json").write_text(json.dumps(order))


def read_features(folder: Path) -> list[dict[str, np.ndarray]]:
    order = json.loads((folder / "features.json").read_text())
    with np.load(folder / "features.npz", allow_pickle=False) as arrays:
        return [{tap: arrays[f"{index}/{tap}"] for tap in taps} for index, taps in enumerate(order)]


def write_alignment(alignment: Alignment, out: Path) -> None:
    record = asdict(alignment)
    record["matrix"] = alignment.matrix.tolist()
    (out / "alignment.json").write_text(json.dumps(record, indent=1))


def read_alignment(folder: Path) -> Alignment:
    record = json.loads((folder / "alignment.json").read_text())
    record["matrix"] = np.array(record["matrix"], dtype=np.float64)
    return Alignment(**record)


def write_triggers(triggers: list[list[Trigger]], shape: tuple[int, ...], classes: int, out: Path) -> None:
    """Each direction's trigger families (their parameters, one slot per class of the
    search) and which targets were kept."""
    arrays: dict[str, np.ndarray] = {}
    listing = []
    for index, found in enumerate(triggers):
        for trigger in found:
            prefix = f"{index}/{trigger.family_name}"
            for name, value in trigger.family.state_dict().items():
                arrays[f"{prefix}/{name}"] = value.detach().cpu().numpy()
            listing.append(
                {"direction": index, "family": trigger.family_name, "target": trigger.target,
                 "footprint": trigger.footprint, "pixels": trigger.pixels, "scale": trigger.scale}
            )  # fmt: skip
    np.savez(out / "triggers.npz", **arrays)
    (out / "triggers.json").write_text(
        json.dumps({"shape": list(shape), "classes": classes, "triggers": listing}, indent=1)
    )


def read_triggers(folder: Path, device: str = "cpu") -> list[list[Trigger]]:
    meta = json.loads((folder / "triggers.json").read_text())
    shape, classes = tuple(meta["shape"]), int(meta["classes"])
    families: dict[tuple[int, str], TriggerFamily] = {}
    found: list[list[Trigger]] = [[], []]
    with np.load(folder / "triggers.npz", allow_pickle=False) as arrays:
        for entry in meta["triggers"]:
            key = (int(entry["direction"]), str(entry["family"]))
            if key not in families:
                family = FAMILY_CLASSES[key[1]](classes, shape)
                prefix = f"{key[0]}/{key[1]}/"
                family.load_state_dict(
                    {name[len(prefix) :]: torch.from_numpy(arrays[name]) for name in arrays if name.startswith(prefix)}
                )
                families[key] = family.to(device).requires_grad_(False)
            found[key[0]].append(
                Trigger(
                    key[1],
                    int(entry["target"]),
                    families[key],
                    float(entry["footprint"]),
                    int(entry["pixels"]),
                    None if entry["scale"] is None else float(entry["scale"]),
                )
            )
    return found


def write_findings(findings: list[list[Finding]], out: Path) -> None:
    (out / "findings.json").write_text(json.dumps([[asdict(f) for f in found] for found in findings], indent=1))


def read_findings(folder: Path) -> list[list[Finding]]:
    return [[Finding(**f) for f in found] for found in json.loads((folder / "findings.json").read_text())]


def write_text_triggers(found: list[TextTrigger], out: Path) -> None:
    """A language-model pair's recovered triggers (words, not ids: each model has its own tokenizer)."""
    (out / "text_triggers.json").write_text(json.dumps([asdict(t) for t in found], indent=1))


def read_text_triggers(folder: Path) -> list[TextTrigger]:
    return [
        TextTrigger(tuple(t["trigger"]), tuple(t["target"]), float(t["merit"]))
        for t in json.loads((folder / "text_triggers.json").read_text())
    ]


def write_text_effects(effects: list[TextEffect], out: Path) -> None:
    (out / "text_effects.json").write_text(json.dumps([asdict(e) for e in effects], indent=1))


def read_text_effects(folder: Path) -> list[TextEffect]:
    return [TextEffect(**e) for e in json.loads((folder / "text_effects.json").read_text())]
