"""The operator's configuration: who delivered a version, and how each model is audited.

A provider can write any tag on the versions and the registered model it delivers to, so
nothing that decides an audit is read from tags: not who the provider is (a provider
tagging its version with a rival's name would make its own earlier delivery its
witness), not the audit set or the thresholds (a provider pointing them at files of its
choosing would judge itself). The operator writes them here, a YAML file named by
CROSSAUDIT_CONFIG (a ConfigMap on a cluster):

    providers:
      users: {alice@acme.example: acme}         # MLflow user who registered the version
      experiments: {"12": acme}                 # ID of the experiment its model was logged in
    models:
      fashion-classifier:
        audit_data: {uri: "runs:/<run>/audit.parquet", sha256: "<hex>"}
        thresholds: {uri: "runs:/<run>/thresholds.json", sha256: "<hex>"}   # optional
        threshold_profile: ""                   # optional; empty: the paradigm's default
        paradigm: auto                          # optional
        hold_on_flagged_peer: false             # optional

Audit data and thresholds are pinned by sha256 and must be artifacts of runs in
crossaudit's own experiment (`registry.fetch_pinned`). The MLflow user is the strong
binding (with MLflow authentication the server sets it). Experiments are mapped by ID,
never by name: a provider can rename its own experiment to a rival's name, or create it
before the rival does. `onboard` creates a provider's experiment and maps its ID, and
refuses a name someone already took; each provider's experiment must then be writable
by that provider only.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from crossaudit.errors import AuditError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

CONFIG_ENV = "CROSSAUDIT_CONFIG"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODEL_KEYS = {"audit_data", "thresholds", "threshold_profile", "paradigm", "hold_on_flagged_peer"}


class ConfigError(AuditError):
    """The operator's configuration is missing, malformed, or says nothing about a model."""


@dataclass(frozen=True)
class Pinned:
    """An artifact named by URI and by the sha256 of its bytes."""

    uri: str
    sha256: str


@dataclass(frozen=True)
class ModelSettings:
    audit_data: Pinned
    thresholds: Pinned | None = None
    threshold_profile: str = ""
    paradigm: str = "auto"
    hold_on_flagged_peer: bool = False


@dataclass(frozen=True)
class OperatorConfig:
    users: dict[str, str] = field(default_factory=dict)
    experiments: dict[str, str] = field(default_factory=dict)
    models: dict[str, ModelSettings] = field(default_factory=dict)

    def settings(self, name: str) -> ModelSettings:
        if name not in self.models:
            raise ConfigError(f"registered model {name!r} has no audit settings in the operator's configuration")
        return self.models[name]


def _mapping(value: object, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, found {type(value).__name__}")
    return value


def _strings(value: object, where: str) -> dict[str, str]:
    mapping = _mapping(value, where)
    if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in mapping.items()):
        raise ConfigError(f"{where}: expected names mapped to provider names")
    return dict(mapping)


def _pinned(value: object, where: str) -> Pinned:
    mapping = _mapping(value, where)
    uri, digest = mapping.get("uri"), mapping.get("sha256")
    if set(mapping) != {"uri", "sha256"} or not isinstance(uri, str) or not isinstance(digest, str):
        raise ConfigError(f"{where}: expected {{uri: ..., sha256: ...}}")
    if not _SHA256.match(digest):
        raise ConfigError(f"{where}.sha256: expected 64 lowercase hex digits")
    return Pinned(uri, digest)


def _model(value: object, where: str) -> ModelSettings:
    mapping = _mapping(value, where)
    unknown = set(mapping) - _MODEL_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(_MODEL_KEYS)})")
    if "audit_data" not in mapping:
        raise ConfigError(f"{where}: audit_data is required")
    hold = mapping.get("hold_on_flagged_peer", False)
    if not isinstance(hold, bool):
        raise ConfigError(f"{where}.hold_on_flagged_peer: expected true or false, found {hold!r}")
    profile, paradigm = mapping.get("threshold_profile", "") or "", mapping.get("paradigm", "auto")
    if not isinstance(profile, str) or not isinstance(paradigm, str):
        raise ConfigError(f"{where}: threshold_profile and paradigm are strings")
    thresholds = mapping.get("thresholds")
    return ModelSettings(
        _pinned(mapping["audit_data"], f"{where}.audit_data"),
        _pinned(thresholds, f"{where}.thresholds") if thresholds else None,
        profile,
        paradigm,
        hold,
    )


def parse(text: str, where: str = "configuration") -> OperatorConfig:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not YAML ({exc})") from exc
    document = _mapping(document, where)
    unknown = set(document) - {"providers", "models"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)} (known: models, providers)")
    providers = _mapping(document.get("providers"), f"{where}.providers")
    if set(providers) - {"users", "experiments"}:
        raise ConfigError(f"{where}.providers: expected users and/or experiments")
    models = _mapping(document.get("models"), f"{where}.models")
    return OperatorConfig(
        _strings(providers.get("users"), f"{where}.providers.users"),
        _strings(providers.get("experiments"), f"{where}.providers.experiments"),
        {str(name): _model(value, f"{where}.models.{name}") for name, value in models.items()},
    )


def config_path() -> Path:
    path = os.environ.get(CONFIG_ENV, "")
    if not path:
        raise ConfigError(f"{CONFIG_ENV} is not set: it must name the operator's configuration file")
    return Path(path)


def load(path: Path | None = None) -> OperatorConfig:
    """The configuration at `path`, or at CROSSAUDIT_CONFIG."""
    path = path or config_path()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the operator's configuration ({exc.strerror})") from exc
    return parse(text, str(path))


def _document(config: OperatorConfig) -> dict:
    models = {}
    for name, settings in config.models.items():
        entry = {k: v for k, v in asdict(settings).items() if v is not None}
        models[name] = entry
    return {"providers": {"users": config.users, "experiments": config.experiments}, "models": models}


def save(config: OperatorConfig, path: Path) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as out:
        yaml.safe_dump(_document(config), out, sort_keys=True)
    Path(out.name).replace(path)


def with_model(config: OperatorConfig, name: str, **changes: object) -> OperatorConfig:
    """`config` with model `name`'s settings changed (created when `audit_data` is given)."""
    current = config.models.get(name)
    if current is None:
        if "audit_data" not in changes:
            raise ConfigError(f"registered model {name!r}: publish its audit set first")
        current = ModelSettings(changes.pop("audit_data"))  # type: ignore[arg-type]
    return replace(config, models={**config.models, name: replace(current, **changes)})


def update_model(name: str, path: Path | None = None, **changes: object) -> None:
    """Change model `name`'s settings in the configuration file (CROSSAUDIT_CONFIG when
    `path` is None), creating the file when it does not exist yet."""
    path = path or config_path()
    current = load(path) if path.exists() else OperatorConfig()
    save(with_model(current, name, **changes), path)


def provider_experiment(provider: str) -> str:
    """The name `onboard` gives a provider's experiment."""
    return f"{provider}-deliveries"


def onboard(mlflow_client: MlflowClient, providers: Iterable[str], path: Path | None = None) -> None:
    """Create each provider's experiment (`provider_experiment`) and map its ID to the
    provider in the configuration at `path` (CROSSAUDIT_CONFIG when None). An experiment
    of that name that the configuration does not already give this provider was made by
    someone else: refused, since mapping it would hand its deliveries that provider's name."""
    path = path or config_path()
    config = load(path) if path.exists() else OperatorConfig()
    for provider in providers:
        name = provider_experiment(provider)
        existing = mlflow_client.get_experiment_by_name(name)
        if existing is not None and config.experiments.get(existing.experiment_id) != provider:
            raise ConfigError(
                f"experiment {name!r} (id {existing.experiment_id}) exists already and is not {provider!r}'s "
                "in the operator's configuration: someone else created it; choose another name"
            )
        experiment_id = existing.experiment_id if existing else mlflow_client.create_experiment(name)
        config = replace(config, experiments={**config.experiments, experiment_id: provider})
    save(config, path)


def bootstrap(folder: Path) -> dict[str, str]:
    """A one-machine operator setup (the demo's, the benchmarks', the tests'): a fresh key
    pair and an empty configuration in `folder` (`onboard` adds the providers once MLflow
    runs). Returns the environment that names them."""
    from crossaudit.mlops import attestation

    folder.mkdir(parents=True, exist_ok=True)
    private, public, path = folder / "signing-key.pem", folder / "public-key.pem", folder / "config.yaml"
    attestation.generate(private, public)
    save(OperatorConfig(), path)
    return {
        CONFIG_ENV: str(path),
        attestation.SIGNING_KEY_ENV: str(private),
        attestation.PUBLIC_KEY_ENV: str(public),
    }


@contextmanager
def local_operator(folder: Path) -> Iterator[Path]:
    """`bootstrap`, with its environment set in this process (and so in every process it
    starts) until the block ends; yields the configuration file."""
    environment = bootstrap(folder)
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        yield Path(environment[CONFIG_ENV])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
