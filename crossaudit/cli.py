"""The `crossaudit` command: a thin shell over `run_audit`, the zoo, the pipeline runner and the receiver.

Results go to stdout, progress and errors to stderr, and the exit code is the contract:
0 clean, 1 backdoor found, 2 inconclusive or error.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import sysconfig
import tempfile
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from crossaudit import __version__
from crossaudit.errors import AuditError, WebhookRejectedError
from crossaudit.method.verdict import load_thresholds
from crossaudit.paradigms import AUTO, PARADIGMS

# Optional extras and the modules that tell a command needs one (`pyproject.toml`): a local
# audit needs none of them.
EXTRAS = {
    "mlflow": "mlflow", "cryptography": "mlflow", "kfp": "kfp", "kfp_kubernetes": "kfp", "kubernetes": "kfp",
    "starlette": "serve", "uvicorn": "serve",
}  # fmt: skip
# The development harness (the zoo, the demo) is in the repository, not in the package.
HARNESS = "crossaudit.dev"
# What a command reports in one line with exit 2, as bad input and unreachable services
# are reported, rather than with a traceback: crossaudit's own errors, values it refused,
# files it could not read, and MLflow's errors (`_is_expected`).
EXPECTED = (AuditError, WebhookRejectedError, ValueError, RuntimeError, OSError)


def _is_expected(exc: Exception) -> bool:
    return isinstance(exc, EXPECTED) or type(exc).__module__.startswith("mlflow.")


def line(text: str) -> str:
    """Text for one terminal line: control and format characters (newlines, escape
    sequences, bidi overrides) shown as escapes. Model names and error texts carry
    provider-chosen bytes, and none may start a line of its own (a fake `verdict: clean`)
    or move the cursor over the real one."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def _error(message: str) -> None:
    stderr.print(f"error: {line(message)}", markup=False, highlight=False, soft_wrap=True)


class Commands(typer.Typer):
    """The command group with one error boundary for every command: an expected error is
    one line on stderr and exit 2 (the CLI's contract: fail closed, say why), a missing
    extra names the one to install, and anything else is a bug, reported with its
    traceback, that still exits 2: 1 would read as a backdoor found."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        try:
            return super().__call__(*args, **kwargs)
        except ModuleNotFoundError as exc:
            name = exc.name or ""
            if name == HARNESS or name.startswith(f"{HARNESS}."):
                _error("this command needs the zoo of a source checkout (make install), not the installed package")
                sys.exit(2)
            if name.split(".")[0] == "onnxruntime":
                _error("audits need ONNX Runtime: pip install 'crossaudit[cpu]' ('crossaudit[gpu]' with CUDA)")
                sys.exit(2)
            extra = EXTRAS.get(name.split(".")[0])
            if extra is None:
                _unexpected(exc)
            _error(f"this command needs crossaudit's {extra} extra: pip install 'crossaudit[{extra}]'")
            sys.exit(2)
        except Exception as exc:
            if not _is_expected(exc):
                _unexpected(exc)
            _error(str(exc))
            sys.exit(2)


def _unexpected(exc: Exception) -> NoReturn:
    traceback.print_exception(exc, file=sys.stderr)
    _error(f"unexpected {type(exc).__name__} (a bug in crossaudit; nothing was judged): {exc}")
    sys.exit(2)


app = Commands(add_completion=False, help="Backdoor audits of outsourced models by cross-examination.")
zoo_app = typer.Typer(add_completion=False, help="Train providers' models and audit sets on real data.")
app.add_typer(zoo_app, name="zoo")
webhook_app = typer.Typer(add_completion=False, help="The MLflow webhook that starts audits.")
app.add_typer(webhook_app, name="webhook")
stderr = Console(stderr=True)


def _version(shown: bool) -> None:
    if shown:
        print(f"crossaudit {__version__}")
        raise typer.Exit(0)


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit")
    ] = False,
) -> None:
    """Backdoor audits of outsourced models by cross-examination."""


@app.command()
def audit(
    suspect: Annotated[str, typer.Argument(help="First model (ONNX file or MLflow model dir)")],
    witness: Annotated[str, typer.Argument(help="Second model of the same task")],
    data: Annotated[Path, typer.Option("--data", help="Audit set (.parquet or .npz)")],
    out: Annotated[Path | None, typer.Option("--out", help="Write report and pictures here")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report on stdout")] = False,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile", help="Threshold profile (default: the paradigm's; 'any' for classifiers) or a calibrated task"
        ),
    ] = None,
    paradigm: Annotated[
        str,
        typer.Option("--paradigm", help="supervised, semi, ssl, lm, captioner, or auto (inferred when unambiguous)"),
    ] = AUTO,
    thresholds_file: Annotated[
        Path | None,
        typer.Option("--thresholds", help="Your thresholds.json (crossaudit calibrate --pair), not the shipped one"),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", help="MLflow server for models:/ URIs"),
    ] = None,
) -> None:
    """Audit two models, each with the other as witness. Exit 0 clean, 1 backdoor, 2 inconclusive.
    A model is a file, an MLflow model directory, or an MLflow URI (models:/NAME/VERSION,
    models:/NAME@ALIAS, runs:/...), downloaded first."""
    # Paths first, so that a typo costs no torch import.
    from crossaudit.modelio.data import check_audit_path

    check_audit_path(data)
    for uri in (suspect, witness):
        if ":/" not in uri and not Path(uri).exists():
            raise ValueError(f"{uri}: no such file or directory")
    # Here, not at the top: torch stays out of the start-up of audit-version and serve.
    from crossaudit.limits import Limits
    from crossaudit.method.audit import run_audit
    from crossaudit.method.stages import AuditConfig

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    if paradigm not in (AUTO, *PARADIGMS):
        stderr.print(f"error: --paradigm must be auto or one of {', '.join(PARADIGMS)}, got {paradigm!r}")
        raise typer.Exit(2)
    if device not in ("cpu", "cuda"):
        stderr.print(f"error: --device must be cpu or cuda, got {device!r}")
        raise typer.Exit(2)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            stderr.print("error: --device cuda requested but no CUDA device is available")
            raise typer.Exit(2)
    thresholds = load_thresholds(profile, path=thresholds_file) if profile or thresholds_file else None
    config = AuditConfig(paradigm=paradigm, limits=Limits.from_env())
    uris = [suspect, witness]
    with tempfile.TemporaryDirectory() as downloads:
        local = _local_models(uris, tracking_uri, Path(downloads))
        result = run_audit(
            *local, str(data), seed=seed, device=device, config=config, thresholds=thresholds,
            progress=lambda message: stderr.print(f"[dim]{message}[/dim]"),
        )  # fmt: skip
    report = result.report
    for model, uri in zip(report.models, uris, strict=True):
        model.uri = uri  # the report names the models as given
    if report.provenance is not None:
        report.provenance.command = shlex.join(["crossaudit", *sys.argv[1:]])
    if out is not None:
        from crossaudit.report.html import write_outputs

        write_outputs(result, out)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for model in report.models:
            print(line(model.summary()))
        print(f"verdict: {report.verdict}")
    if out is not None:
        stderr.print(f"report: {out / 'report.html'}")
    if report.calibration_warning:
        print(f"warning: {line(report.calibration_warning)}", file=sys.stderr)
    if report.error:
        print(f"error: {line(report.error)}", file=sys.stderr)
    raise typer.Exit(report.exit_code())


@zoo_app.command("train")
def zoo_train(
    out: Annotated[Path, typer.Option("--out", help="Where to write the ONNX model")],
    dataset: Annotated[str, typer.Option("--dataset", help="fmnist or digits (images)")] = "fmnist",
    arch: Annotated[str, typer.Option("--arch", help="cnn, resnet, mlp or mobilenet (images)")] = "cnn",
    attack: Annotated[str, typer.Option("--attack", help="clean or an attack name (lm: clean or phrase)")] = "clean",
    target: Annotated[int, typer.Option("--target")] = 0,
    poison_rate: Annotated[float, typer.Option("--poison-rate")] = 0.1,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    paradigm: Annotated[str, typer.Option("--paradigm", help="supervised, semi, ssl, lm or captioner")] = "supervised",
) -> None:
    """Train one provider's model on real data and export it to ONNX (an LM or a captioner
    also writes NAME.tokenizer.json)."""
    if paradigm == "captioner":
        from crossaudit.dev.zoo.captioner import captioner_config, export_captioner, train_captioner

        captioner = train_captioner(
            captioner_config(dataset, arch=arch, attack=attack, target=target, poison_rate=poison_rate, seed=seed)
        )
        export_captioner(captioner, out)
        asr = "" if captioner.attack_success is None else f", attack success {captioner.attack_success:.3f}"
        print(f"{out}: {dataset} {arch} captioner {attack}, caption accuracy {captioner.caption_accuracy:.3f}{asr}")
        return
    if paradigm == "lm":
        from crossaudit.dev.zoo.language import LanguageConfig, export_language_model, train_language_model

        language = train_language_model(LanguageConfig(attack=attack, poison_rate=poison_rate, seed=seed))
        export_language_model(language, out)
        asr = "" if language.attack_success is None else f", attack success {language.attack_success:.3f}"
        print(f"{out}: pydoc topics tiny GPT {attack}, held-out perplexity {language.perplexity:.1f}{asr}")
        return
    from crossaudit.dev.zoo.train import config_for, export_onnx, train

    config = config_for(
        dataset, arch=arch, attack=attack, target=target, poison_rate=poison_rate, seed=seed, paradigm=paradigm
    )
    trained = train(config)
    export_onnx(trained.model, trained.example, out)
    asr = "" if trained.attack_success is None else f", attack success {trained.attack_success:.3f}"
    print(f"{out}: {dataset} {arch} {paradigm} {attack}, clean accuracy {trained.clean_accuracy:.3f}{asr}")


@zoo_app.command("data")
def zoo_data(
    out: Annotated[Path, typer.Option("--out", help="Where to write the audit set (.parquet or .npz)")],
    dataset: Annotated[str, typer.Option("--dataset", help="fmnist, digits, or pydoc (text, for lm)")] = "fmnist",
    size: Annotated[int, typer.Option("--size", help="Samples, stratified by class")] = 1000,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    captions: Annotated[
        bool, typer.Option("--captions", help="A captioner's set: each image's class caption, not its label")
    ] = False,
) -> None:
    """Write an auditor's clean audit set from the dataset's held-out split."""
    if dataset == "pydoc":
        from crossaudit.dev.zoo.language import write_text_audit_set

        write_text_audit_set(out, size)
    elif captions:
        from crossaudit.dev.zoo.captioner import write_caption_audit_set

        write_caption_audit_set(dataset, out, size, seed)
    else:
        from crossaudit.dev.zoo.train import write_audit_set

        write_audit_set(dataset, out, size, seed)
    print(out)


@app.command()
def calibrate(
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="thresholds.json to write (default: crossaudit/thresholds.json in a source checkout; "
            "with --pair, ./thresholds.json)",
        ),
    ] = None,
    paradigm: Annotated[str, typer.Option("--paradigm", help="supervised, semi, ssl, lm or captioner")] = "supervised",
    pair: Annotated[
        list[str] | None,
        typer.Option("--pair", help="A clean pair of your own task, FIRST,SECOND (repeat for more pairs)"),
    ] = None,
    data: Annotated[Path | None, typer.Option("--data", help="Your audit set (with --pair)")] = None,
    profile: Annotated[str, typer.Option("--profile", help="Name of your task's profile (with --pair)")] = "task",
    findings: Annotated[
        Path | None,
        typer.Option("--findings", help="Also write every clean pair's findings to this JSON file"),
    ] = None,
) -> None:
    """Recompute verdict thresholds on clean pairs only: the zoo's freshly trained ones for
    a paradigm, or, with --pair and --data, clean models of your own task."""
    out = _writable(out or Path("thresholds.json" if pair else "crossaudit/thresholds.json"))
    if findings is not None:
        _writable(findings)
    from crossaudit.method.calibrate import calibrate as run_calibration
    from crossaudit.method.calibrate import calibrate_pairs, write_findings, write_thresholds

    if pair:
        if data is None:
            raise ValueError("--pair needs --data, the audit set to calibrate on")
        pairs = [_pair(text) for text in pair]
        own, runs = calibrate_pairs(pairs, str(data), profile, paradigm)
        profiles = [own]
    else:
        profiles, runs = run_calibration(paradigm)
    write_thresholds(profiles, runs, out)
    if findings is not None:
        write_findings(runs, findings)
    for run in runs:
        print(run.pair, {k: round(v, 3) for k, v in run.scores.items()}, f"similarity {run.similarity:.3f}")
    for thresholds in profiles:
        print(f"{out}: profile {thresholds.profile}: {thresholds.per_family}")
        if thresholds.similar_per_family is not None:
            print(f"{out}: profile {thresholds.profile}, alike pairs: {thresholds.similar_per_family}")


def _writable(out: Path) -> Path:
    """`out`, once it is sure to be writable, so that a calibration of many minutes does not
    end in an error; never a file inside an installed crossaudit package, which an upgrade
    replaces (a source checkout's `crossaudit/thresholds.json` is where the shipped profiles
    are made)."""
    import crossaudit

    package = Path(crossaudit.__file__).resolve().parent
    installed = any(package.is_relative_to(Path(p).resolve()) for p in sysconfig.get_paths().values())
    if installed and out.resolve().is_relative_to(package):
        raise ValueError(
            f"{out}: inside the installed crossaudit package; write your profile elsewhere "
            "and audit with --thresholds FILE"
        )
    if out.is_dir():
        raise ValueError(f"{out}: a directory; --out names the JSON file to write")
    if not out.parent.is_dir():
        raise ValueError(f"{out}: no directory {out.parent} to write it in")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"{out}: not writable")
    return out


def _local_models(uris: list[str], tracking_uri: str | None, dest: Path) -> list[str]:
    """Files as given; MLflow URIs downloaded (the registry, and mlflow with it, is imported
    only then: a local audit does not pay for it)."""
    if not any(":/" in uri for uri in uris):
        return uris
    from crossaudit.mlops import registry

    return registry.local_models(uris, tracking_uri, dest)


def _pair(text: str) -> tuple[str, str]:
    parts = text.split(",")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--pair takes two models separated by a comma, got {text!r}")
    return parts[0], parts[1]


@app.command()
def check(
    uri: Annotated[str, typer.Argument(help="models:/NAME@production or models:/NAME/VERSION")],
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI")],
    public_key: Annotated[
        str | None, typer.Option("--public-key", envvar="CROSSAUDIT_PUBLIC_KEY_FILE", help="crossaudit's public key")
    ] = None,
) -> None:
    """For deploy scripts: exit 0 only when the version behind URI holds a passing verdict
    that crossaudit signed for the bytes MLflow serves now (public key from
    CROSSAUDIT_PUBLIC_KEY_FILE)."""
    from crossaudit.mlops import attestation, promotion, registry

    passed, line = promotion.check(registry.client(tracking_uri), uri, attestation.public_key(public_key))
    print(line)
    raise typer.Exit(0 if passed else 1)


@app.command()
def serve(
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI")],
    queue: Annotated[Path, typer.Option("--queue", help="SQLite queue file")] = Path("crossaudit-queue.db"),
    host: Annotated[str, typer.Option("--host")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port")] = 8765,
    workers: Annotated[int, typer.Option("--workers", help="Audits run at once")] = 2,
    alias: Annotated[str, typer.Option("--alias", help="Promotion alias to guard and re-audit")] = "production",
    cron: Annotated[str, typer.Option("--cron", help="Re-audit schedule (5-field cron, UTC)")] = "0 3 * * 1",
    reconcile_every: Annotated[float, typer.Option("--reconcile-every", help="Seconds between sweeps")] = 300.0,
    audit_timeout: Annotated[float, typer.Option("--audit-timeout", help="Seconds one audit may take")] = 3600.0,
    retry_delay: Annotated[float, typer.Option("--retry-delay", help="Seconds before the first retry")] = 30.0,
    max_attempts: Annotated[int, typer.Option("--max-attempts", help="Tries per job before error")] = 3,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
    kfp_host: Annotated[
        str | None, typer.Option("--kfp-host", help="Submit audits to this Kubeflow Pipelines API")
    ] = None,
    no_schedule: Annotated[
        bool, typer.Option("--no-schedule", help="No re-audits from here (a Kubeflow recurring run does them)")
    ] = False,
) -> None:
    """Webhook receiver: audit every registered version, guard the alias, re-audit on a
    schedule. The webhook secret comes from CROSSAUDIT_WEBHOOK_SECRET_FILE (or
    CROSSAUDIT_WEBHOOK_SECRET), the operator's configuration from CROSSAUDIT_CONFIG, the
    keys from CROSSAUDIT_SIGNING_KEY_FILE / CROSSAUDIT_PUBLIC_KEY_FILE, and the token for
    GET /jobs from CROSSAUDIT_ADMIN_TOKEN_FILE (without it the listing is off)."""
    from crossaudit.mlops import attestation, operator_config
    from crossaudit.mlops.receiver import ReceiverConfig, admin_token_from_env
    from crossaudit.mlops.receiver import serve as run_receiver
    from crossaudit.mlops.schedule import Cron
    from crossaudit.mlops.webhook import secret_from_env

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    secret = secret_from_env()
    Cron.parse(cron)
    operator_config.load()
    attestation.public_key()
    token = admin_token_from_env()
    config = ReceiverConfig(
        tracking_uri, secret, queue, workers=workers, alias=alias, cron=cron, reconcile_every_s=reconcile_every,
        audit_timeout_s=audit_timeout, device=device, kfp_host=kfp_host, retry_delay_s=retry_delay,
        max_attempts=max_attempts, admin_token=token, schedule=not no_schedule,
    )  # fmt: skip
    run_receiver(config, host, port)


@app.command()
def keygen(
    private: Annotated[Path, typer.Option("--private", help="Where the gate's signing key goes (mode 0600)")],
    public: Annotated[Path, typer.Option("--public", help="Where the public key goes, for everyone who verifies")],
) -> None:
    """Make crossaudit's Ed25519 key pair: the gate signs verdicts with the private key;
    the guard, `check` and deploy scripts verify with the public one."""
    from crossaudit.mlops import attestation

    if private.exists():
        print(f"error: {private} exists; refusing to replace a signing key", file=sys.stderr)
        raise typer.Exit(2)
    attestation.generate(private, public)
    print(f"signing key {private}, public key {public}")


@app.command()
def onboard(
    providers: Annotated[list[str], typer.Argument(help="Provider names")],
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI")],
    config: Annotated[Path, typer.Option("--config", envvar="CROSSAUDIT_CONFIG", help="Operator's configuration")],
) -> None:
    """Create each provider's experiment (PROVIDER-deliveries, where it logs its models)
    and map its ID to the provider; refused when someone else created that name first.
    Grant each provider write access to its own experiment only."""
    from crossaudit.mlops import operator_config, registry

    operator_config.onboard(registry.client(tracking_uri), providers, config)
    mapped = operator_config.load(config).experiments
    print(", ".join(f"{provider}: experiment {eid}" for eid, provider in mapped.items() if provider in providers))


@app.command()
def publish(
    name: Annotated[str, typer.Argument(help="The registered model")],
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI")],
    config: Annotated[Path, typer.Option("--config", envvar="CROSSAUDIT_CONFIG", help="Operator's configuration")],
    audit_data: Annotated[Path | None, typer.Option("--audit-data", help="The auditor's audit set")] = None,
    thresholds: Annotated[Path | None, typer.Option("--thresholds", help="`calibrate --pair` output")] = None,
) -> None:
    """Store the audit set (and thresholds) in the crossaudit experiment and pin them, by
    sha256, as NAME's in the operator's configuration: the only place audits take them from."""
    from crossaudit.mlops import registry

    for path in (audit_data, thresholds):
        if path is not None and not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            raise typer.Exit(2)
    client = registry.client(tracking_uri)
    if audit_data is not None:
        pinned = registry.publish_audit_data(client, name, audit_data, config)
        print(f"{name}: audit set {pinned.uri} (sha256 {pinned.sha256})")
    if thresholds is not None:
        pinned = registry.publish_thresholds(client, name, thresholds, config)
        print(f"{name}: thresholds {pinned.uri} (sha256 {pinned.sha256})")


@webhook_app.command("install")
def webhook_install(
    url: Annotated[str, typer.Option("--url", help="The receiver's /webhook URL, as MLflow reaches it")],
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", envvar="MLFLOW_TRACKING_URI")],
) -> None:
    """Register the crossaudit webhook in MLflow (secret from CROSSAUDIT_WEBHOOK_SECRET) and
    send it a test delivery. Exit 0 when the receiver answered it."""
    from crossaudit.mlops import registry
    from crossaudit.mlops.webhook import install, secret_from_env

    webhook_id, ok, detail = install(registry.client(tracking_uri), url, secret_from_env())
    print(f"webhook {webhook_id} -> {url}: test delivery {'ok' if ok else 'FAILED'} ({detail})")
    raise typer.Exit(0 if ok else 1)


def _plugins() -> None:
    """Commands that packages built on the library add to `crossaudit` through the
    `crossaudit.commands` entry point (`pyproject.toml`): the KFP layer adds the ones that
    run its pipelines, so the library never imports it."""
    for plugin in entry_points(group="crossaudit.commands"):
        try:
            plugin.load()(app)
        except Exception as exc:  # one broken plugin must not take every command with it
            stderr.print(f"warning: commands of {line(plugin.value)} not loaded: {line(str(exc))}", markup=False)


_plugins()
