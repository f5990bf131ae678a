"""`make demo`: two providers train the same task on real data, one poisons it, and the
audit finds out. Writes everything under ./demo-output."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from crossaudit.audit import run_audit
from crossaudit.report import write_outputs
from crossaudit.zoo.datasets import load_dataset
from crossaudit.zoo.train import config_for, export_onnx, train, write_audit_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits", choices=["digits", "fmnist"])
    parser.add_argument("--out", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    split = load_dataset(args.dataset)
    data = args.out / "audit.parquet"
    write_audit_set(args.dataset, data)
    providers = {
        "provider_a_clean": config_for(args.dataset, arch="cnn", seed=11),
        "provider_b_badnets": config_for(args.dataset, arch="cnn", attack="badnets", target=3, seed=12),
    }
    paths = []
    for name, config in providers.items():
        start = time.perf_counter()
        trained = train(config, split)
        path = args.out / f"{name}.onnx"
        export_onnx(trained.model, trained.example, path)
        paths.append(path)
        asr = "" if trained.attack_success is None else f", backdoor success {trained.attack_success:.2f}"
        print(f"trained {path}: accuracy {trained.clean_accuracy:.3f}{asr} ({time.perf_counter() - start:.0f}s)")
    result = run_audit(str(paths[0]), str(paths[1]), str(data), progress=lambda m: print(m, file=sys.stderr))
    write_outputs(result, args.out)
    for model in result.report.models:
        target = f", target class {model.target}" if model.target is not None else ""
        print(f"{model.uri}: {model.verdict} (score {model.score}, threshold {model.threshold}{target})")
    print(f"verdict: {result.report.verdict}; timings {result.report.timings}")
    print(f"report: {args.out / 'report.html'}")
    return result.report.exit_code()


if __name__ == "__main__":
    raise SystemExit(0 if main() in (0, 1) else 2)
