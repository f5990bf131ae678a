"""`make demo`: the main job end to end on the embedded default.

A local MLflow server (SQLite, loopback) and the crossaudit receiver (`crossaudit serve`)
start; the receiver's webhook is installed in MLflow. Two providers then register their
versions of one model; one of them poisoned its training data (BadNets). Nothing else is
run by hand: each registration's webhook makes the receiver run the KFP audit pipeline
(`kfp.local`). The first version is registered alone and waits for a peer; the second
provider's registration audits the pair, and the first is audited again; the gate promotes
only the version that passed. Then someone sets the `production` alias on the backdoored
version by hand, and the receiver's alias guard takes it back. Everything lands in the
MLflow UI, which stays up until Ctrl-C (`--no-serve` to exit at once).
"""

from __future__ import annotations

import argparse
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from crossaudit.dev.receiver_process import ReceiverProcess, wait_for
from crossaudit.dev.tracking_server import local_server
from crossaudit.dev.zoo.datasets import load_dataset
from crossaudit.dev.zoo.train import config_for, export_onnx, train, write_audit_set
from crossaudit.errors import AuditError
from crossaudit.mlops import operator_config, registry
from crossaudit.mlops.webhook import install

MODEL_NAME = "digits-classifier"
ALIAS = registry.DEFAULT_ALIAS
AUDIT_WAIT_S = 900


def _train_providers(dataset: str, out: Path) -> dict[str, Path]:
    split = load_dataset(dataset)
    providers = {
        "acme": config_for(dataset, arch="cnn", seed=11),
        "globex": config_for(dataset, arch="cnn", attack="badnets", target=3, seed=12),
    }
    paths = {}
    for provider, config in providers.items():
        trained = train(config, split)
        paths[provider] = out / f"{provider}.onnx"
        export_onnx(trained.model, trained.example, paths[provider])
        asr = "" if trained.attack_success is None else f", hidden backdoor success {trained.attack_success:.2f}"
        print(f"provider {provider}: trained {dataset} {config.arch}, accuracy {trained.clean_accuracy:.3f}{asr}")
    return paths


def _status(client: MlflowClient, ref: registry.VersionRef) -> str | None:
    return registry.status_of(client.get_model_version(ref.name, ref.version))


def _incident(client: MlflowClient, ref: registry.VersionRef) -> str | None:
    """The alias guard's incident on `ref`, once it has handled it completely."""
    return client.get_model_version(ref.name, ref.version).tags.get(registry.INCIDENT)


@dataclass(frozen=True)
class DemoState:
    """The running demo, and what it made (the end-to-end test checks each part)."""

    url: str
    versions: dict[str, registry.VersionRef]
    receiver: ReceiverProcess
    models: dict[str, Path]
    data: Path


@contextmanager
def demo(out: Path, dataset: str = "digits") -> Iterator[DemoState]:
    """Run the demo up to its end state and hold it (MLflow server and receiver up) while
    the caller looks at it; `make demo` serves it, the UI test browses it."""
    out.mkdir(parents=True, exist_ok=True)
    models = _train_providers(dataset, out)
    data = out / "audit.parquet"
    write_audit_set(dataset, data)
    secret = secrets.token_urlsafe(32)
    # The operator's part: crossaudit's key pair, and a configuration naming who delivers
    # from which experiment and which audit set judges the model (filled in below).
    with operator_config.local_operator(out / "operator"), local_server(out / "mlflow") as url:
        print(f"MLflow server: {url}")
        client = registry.client(url)
        operator_config.onboard(client, models)
        receiver = ReceiverProcess(url, secret, out / "queue.db", out / "receiver.log")
        try:
            versions = _automatic_path(client, receiver, models, data, dataset, secret)
            print(f"MLflow UI: {url}/#/models/{MODEL_NAME}")
            yield DemoState(url, versions, receiver, models, data)
        finally:
            receiver.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits", choices=["digits", "fmnist"])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--no-serve", action="store_true", help="exit when done instead of serving the UI")
    args = parser.parse_args(argv)
    with demo(args.out, args.dataset):
        if not args.no_serve:
            print("serving the MLflow UI and the receiver; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def _automatic_path(
    client: MlflowClient, receiver: ReceiverProcess, models: dict[str, Path], data: Path, dataset: str, secret: str
) -> dict[str, registry.VersionRef]:
    """Install the webhook, register both deliveries, and only watch: every audit and the
    alias guard are the receiver's doing."""
    webhook_id, ok, detail = install(client, f"{receiver.url}/webhook", secret)
    print(f"receiver: {receiver.url} (log {receiver.log}); webhook {webhook_id} test delivery: {detail}")
    if not ok:
        raise AuditError(f"MLflow could not deliver to the receiver: {detail}")
    registry.publish_audit_data(client, MODEL_NAME, data)
    operator_config.update_model(MODEL_NAME, threshold_profile=dataset)
    start = time.perf_counter()
    finals = ("passed", "failed", "inconclusive", "error")
    refs: dict[str, registry.VersionRef] = {}
    for provider, path in models.items():
        description = f"Delivered by {provider}."
        ref = refs[provider] = registry.register_version(client, MODEL_NAME, path, provider, description)
        print(f"registered {ref.uri} ({provider}); no audit command is run")
        if len(refs) == 1:
            wait_for(lambda r=ref: _status(client, r) in ("awaiting-peer", *finals), AUDIT_WAIT_S, "the first audit")
            print(f"  {ref.uri}: {_status(client, ref)} (no other provider's version yet)")
    wait_for(
        lambda: all(_status(client, r) in finals for r in refs.values()) and not receiver.busy(),
        AUDIT_WAIT_S, "both audits",
    )  # fmt: skip
    print(f"both audited by the receiver in {time.perf_counter() - start:.0f}s:")
    _show(client, refs)
    poisoned = refs["globex"]
    print(f"someone sets {ALIAS!r} on {poisoned.uri} by hand...")
    client.set_registered_model_alias(MODEL_NAME, ALIAS, poisoned.version)
    wait_for(lambda: _incident(client, poisoned) is not None, 60, "the alias guard")
    incident = _incident(client, poisoned)
    print(f"alias guard: {incident}")
    _show(client, refs)
    return refs


def _show(client: MlflowClient, refs: dict[str, registry.VersionRef]) -> None:
    for provider, ref in refs.items():
        version = client.get_model_version(ref.name, ref.version)
        print(f"  {ref.uri} ({provider}): status {version.tags.get(registry.STATUS)}, "
              f"score {version.tags.get(registry.SCORE)}, aliases {version.aliases}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
