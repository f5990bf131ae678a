"""ONNX Runtime, the runtime a model is deployed with, as the judge of what the model does.

Every gradient of the audit comes from a torch translation of the provider's ONNX graph,
but the user runs the graph under ONNX Runtime. A hostile provider can make the two
differ only where the auditor does not look: a branch that is exactly zero on clean
images, so that the translation matches ONNX Runtime on the audit set, but that fires
under ONNX Runtime on triggered inputs. So the translation is proved against ONNX Runtime
on every kind of input the audit reasons about, not only the audit set
(`models.parity_check`): random inputs of the audit's shape (`noise_inputs`), the audit
images with every candidate trigger stamped (`prove_on_triggers`), and the held-out
images with the final triggers, on which a finding's attack success is measured under
ONNX Runtime itself (`RuntimeGraph`, `deployed`). Any disagreement beyond tolerance is a
ParityError: the audit is inconclusive, never clean.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from crossaudit.errors import AuditError, ParityError
from crossaudit.modelio.loaders import PARITY_TOLERANCE, LoadedModel, logits_of

if TYPE_CHECKING:
    from crossaudit.method.inversion import Trigger

# Names of the input sets a model's translation was proved on (`ModelReport.parity_checks`).
AUDIT = "audit data"
NOISE = "random inputs"
CANDIDATES = "candidate triggers stamped"
HELD_OUT = "final triggers on held-out data"
# Random inputs per model: enough to reach a branch that clean data never enters, few
# enough to cost well under a second for models of the audit's size.
NOISE_SAMPLES = 64
# Audit images per candidate trigger, drawn from the classes other than its target.
STAMPED_PER_TRIGGER = 64
BATCH = 256


@dataclass(frozen=True)
class GraphInputs:
    """How the audit's images become a graph's inputs: the images alone, or (a captioner)
    each image with the tokens of its true caption. `vocab` bounds the random token ids
    of noise inputs (token models)."""

    label_tokens: np.ndarray | None = None
    vocab: int = 0

    def of(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        return (x,) if self.label_tokens is None else (x, self.label_tokens[y])


def noise_inputs(
    inputs: tuple[np.ndarray, ...], vocab: int, seed: int, n: int = NOISE_SAMPLES
) -> tuple[np.ndarray, ...]:
    """Random inputs shaped like `inputs` (without their batch size): images uniform in
    [0, 1], token ids uniform over the vocabulary. The same seed and shapes give the same
    inputs, so both models of a pair see the same noise."""
    rng = np.random.RandomState(seed)
    noise = []
    for part in inputs:
        shape = (n, *part.shape[1:])
        if np.issubdtype(part.dtype, np.integer):
            if vocab < 1:
                raise AuditError("random token inputs need the model's vocabulary size")
            noise.append(rng.randint(0, vocab, shape).astype(part.dtype))
        else:
            noise.append(rng.uniform(0.0, 1.0, shape).astype(part.dtype))
    return tuple(noise)


class RuntimeGraph(nn.Module):
    """A model's ONNX graph run by ONNX Runtime, every call proved against its torch translation.

    Its outputs are ONNX Runtime's, so whatever is measured through it is what the deployed
    model does; each call also runs the translation on the same inputs and raises
    ParityError where the two disagree beyond tolerance, so a branch alive only under the
    runtime cannot pass unseen. One session per model, created on first use and reused.
    The largest difference seen on each named input set is kept in `checks`.
    """

    def __init__(self, model: LoadedModel, device: str) -> None:
        super().__init__()
        self.translation = model.module
        self.uri = model.uri
        self.device = device
        self.onnx_bytes = model.onnx_bytes
        self.checks: dict[str, float] = {}
        self.input_set = HELD_OUT
        self._session: Any = None
        self._lock = threading.Lock()

    @property
    def taps(self) -> list[str]:
        return []

    def _runtime(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            providers = ["CPUExecutionProvider"]
            if self.device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            self._session = ort.InferenceSession(self.onnx_bytes, options, providers=providers)
        return self._session

    def run(self, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
        """ONNX Runtime's first output, in batches."""
        session = self._runtime()
        names = [i.name for i in session.get_inputs()]
        if len(names) != len(inputs):
            raise ParityError(f"{self.uri}: the graph takes inputs {names}; the audit gives {len(inputs)}")
        try:
            return np.concatenate(
                [
                    session.run(None, {name: part[i : i + BATCH] for name, part in zip(names, inputs, strict=True)})[0]
                    for i in range(0, len(inputs[0]), BATCH)
                ]
            )
        except Exception as exc:  # ONNX Runtime raises its own unrelated types on bad inputs
            raise ParityError(f"{self.uri}: ONNX Runtime could not run the model on {self.input_set}: {exc}") from exc

    def compare(self, reference: np.ndarray, ours: np.ndarray) -> None:
        """Raise ParityError when the translation's outputs are not ONNX Runtime's."""
        if reference.shape != ours.shape:
            raise ParityError(
                f"{self.uri}: on {self.input_set}, ONNX Runtime gave outputs {reference.shape}, "
                f"the torch translation {ours.shape}"
            )
        diff = float(np.max(np.abs(reference - ours))) if reference.size else 0.0
        scale = max(1.0, float(np.max(np.abs(reference)))) if reference.size else 1.0
        if not np.isfinite(diff) or diff > PARITY_TOLERANCE * scale:
            raise ParityError(
                f"{self.uri}: torch translation differs from ONNX Runtime by {diff:.3g} on {self.input_set}: "
                "the model does not behave under the runtime it is deployed with as the audited translation does"
            )
        with self._lock:  # both directions of an audit prove one model's outputs side by side
            self.checks[self.input_set] = max(self.checks.get(self.input_set, 0.0), round(diff, 9))

    @contextmanager
    def checking(self, input_set: str) -> Iterator[None]:
        """Name the inputs the calls inside are proved on (for `checks` and messages)."""
        before, self.input_set = self.input_set, input_set
        try:
            yield
        finally:
            self.input_set = before

    def prove(self, input_set: str, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
        """The translation's outputs on `inputs`, once proved equal to ONNX Runtime's."""
        with self.checking(input_set):
            ours = logits_of(self.translation, inputs, self.device, BATCH)
            self.compare(self.run(inputs), ours)
        return ours

    def _deployed(self, ours: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
        """ONNX Runtime's outputs on `inputs`, once proved equal to the translation's `ours`."""
        reference = self.run(tuple(part.detach().cpu().numpy() for part in inputs))
        self.compare(reference, ours.float().cpu().numpy())
        return torch.from_numpy(reference).to(ours.device)

    @torch.no_grad()
    def forward(self, *inputs: Tensor) -> Tensor:
        return self._deployed(self.translation(*inputs), inputs)

    @torch.no_grad()
    def forward_tapped(
        self, x: Tensor | tuple[Tensor, ...], taps: Sequence[str], broadcast: int = 1
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """As `OnnxModule.forward_tapped`, without activations: ONNX Runtime gives outputs
        only. With `broadcast` k, each row of the first input serves k rows of the others:
        the translation computes it once per row, ONNX Runtime (which runs the graph as it
        is) on every repeated row."""
        if taps:
            raise AuditError(f"{self.uri}: activations are read from the torch translation, not under ONNX Runtime")
        inputs = x if isinstance(x, tuple) else (x,)
        if broadcast == 1:
            return self(*inputs), {}
        ours, _ = self.translation.forward_tapped(inputs, [], broadcast=broadcast)
        repeated = (inputs[0].repeat_interleave(broadcast, 0), *inputs[1:])
        return self._deployed(ours, repeated), {}


def deployed(scored: nn.Module, graph: RuntimeGraph) -> nn.Module:
    """The module the stages score (a paradigm's head around the translation, or the
    translation itself) with ONNX Runtime in the translation's place: what the user's
    deployment would answer, read the way the audit reads the model."""
    if scored is graph.translation:
        return graph
    view = copy.copy(scored)
    view._modules = {name: deployed(child, graph) for name, child in scored._modules.items()}
    if not any(module is graph for module in view.modules()):
        raise AuditError(f"{graph.uri}: the scored model does not run its own translation; cannot run it as deployed")
    return view


@torch.no_grad()
def prove_on_triggers(
    graphs: Sequence[RuntimeGraph],
    feeds: Sequence[GraphInputs],
    triggers: Sequence[Sequence[Trigger]],
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
) -> None:
    """Both models' translations against ONNX Runtime on audit images with every candidate
    trigger of either direction stamped: the inputs the search steered towards, where a
    runtime-only branch is likeliest to fire. Raises ParityError on a difference."""
    rng = np.random.RandomState(seed)
    device = graphs[0].device
    stamped, labels = [], []
    for trigger in (t for found in triggers for t in found):
        pool = np.flatnonzero(y != trigger.target)
        chosen = rng.choice(pool, min(STAMPED_PER_TRIGGER, len(pool)), replace=False)
        stamped.append(trigger.apply(torch.from_numpy(x[chosen]).to(device)).float().cpu().numpy())
        labels.append(y[chosen])
    if not stamped:
        return
    images, truth = np.concatenate(stamped), np.concatenate(labels)
    for graph, feed in zip(graphs, feeds, strict=True):
        graph.prove(CANDIDATES, feed.of(images, truth))
