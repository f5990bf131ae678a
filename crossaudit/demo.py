"""`make demo`: the main job end to end on the embedded default.

A local MLflow server (SQLite, loopback) holds a registered model that two providers
deliver; one of them poisoned its training data (BadNets). Each registration is audited
by the KFP pipeline run locally (`kfp.local`); the gate promotes only the version that
passed. Everything lands in the MLflow UI, which stays up until Ctrl-C (`--no-serve` to
exit at once).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from crossaudit import registry
from crossaudit.tracking_server import local_server
from crossaudit.zoo.datasets import load_dataset
from crossaudit.zoo.train import config_for, export_onnx, train, write_audit_set

MODEL_NAME = "digits-classifier"


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


def main(argv: list[str] | None = None) -> int:
    from pipelines.runner import audit_version

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits", choices=["digits", "fmnist"])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    parser.add_argument("--no-serve", action="store_true", help="exit when done instead of serving the UI")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    models = _train_providers(args.dataset, args.out)
    data = args.out / "audit.parquet"
    write_audit_set(args.dataset, data)
    with local_server(args.out / "mlflow") as url:
        print(f"MLflow server: {url}")
        client = registry.client(url)
        registry.publish_audit_data(client, MODEL_NAME, data)
        client.set_registered_model_tag(MODEL_NAME, registry.PROFILE_TAG, args.dataset)
        statuses = {}
        for provider, path in models.items():
            version = registry.register_version(client, MODEL_NAME, path, provider, f"Delivered by {provider}.")
            start = time.perf_counter()
            submission = audit_version(version.uri, url)
            statuses[version.uri] = submission.status
            print(f"{version.uri} ({provider}): {submission.status} in {time.perf_counter() - start:.0f}s")
        for uri, status in list(statuses.items()):
            if status == "awaiting-peer":
                statuses[uri] = audit_version(uri, url).status
                print(f"{uri}: re-audited now that a peer exists: {statuses[uri]}")
        for uri in statuses:
            version = registry.resolve(client, uri)
            print(f"{uri}: provider {version.tags.get('provider')}, status {version.tags.get(registry.STATUS)}, "
                  f"score {version.tags.get(registry.SCORE)}, aliases {version.aliases}")  # fmt: skip
        print(f"MLflow UI: {url}/#/models/{MODEL_NAME}")
        if not args.no_serve:
            print("serving the MLflow UI; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
