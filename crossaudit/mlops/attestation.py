"""Signed verdicts: the one thing in the registry a provider cannot write.

A provider needs registry rights to register a version, and with them it can set any tag
on it, `crossaudit.status=passed` included. So a tag is never the verdict: the verdict is
an Ed25519 signature, made by the gate with a key only crossaudit holds, over the
registered model, the version, the sha256 of the bytes audited, the status and the time.
Whoever decides (the gate, the alias guard, `crossaudit check`, the re-audits) verifies it
with the public key, checks it against crossaudit's own copy (the newest attestation in
the `crossaudit` experiment, so an older pass cannot be put back over a newer failure),
and hashes the version's bytes again, so a pass cannot follow a model swapped after its
audit. Ed25519 rather than an HMAC: a deploy script verifies with the public key and so
cannot sign.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crossaudit.errors import AuditError

SIGNING_KEY_ENV = "CROSSAUDIT_SIGNING_KEY_FILE"
PUBLIC_KEY_ENV = "CROSSAUDIT_PUBLIC_KEY_FILE"
_PREFIX = "v1"
_MAX_TEXT = 4096


class AttestationError(AuditError):
    """An attestation is missing, malformed, not signed by crossaudit's key, or not about
    these bytes: whatever it says, it is not a pass."""


@dataclass(frozen=True)
class Attestation:
    """What the gate signs. `signed_at` orders attestations of one version (seconds since
    the epoch, float): the newest is the verdict."""

    name: str
    version: str
    model_sha256: str
    status: str
    run_id: str
    signed_at: float

    def payload(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(key: Ed25519PrivateKey, attestation: Attestation) -> str:
    """The tag value: `v1.<payload>.<signature>`, both base64url."""
    payload = attestation.payload()
    return f"{_PREFIX}.{_b64(payload)}.{_b64(key.sign(payload))}"


def verify(public_key: Ed25519PublicKey, text: str | None) -> Attestation:
    """The attestation a tag value carries, once its signature holds; raises otherwise."""
    if not text:
        raise AttestationError("no attestation")
    parts = text.split(".")
    if len(text) > _MAX_TEXT or len(parts) != 3 or parts[0] != _PREFIX:
        raise AttestationError("malformed attestation (expected v1.<payload>.<signature>)")
    try:
        payload, signature = _unb64(parts[1]), _unb64(parts[2])
    except ValueError as exc:
        raise AttestationError("malformed attestation (not base64url)") from exc
    try:
        public_key.verify(signature, payload)
    except InvalidSignature as exc:
        raise AttestationError("attestation signature does not verify under crossaudit's public key") from exc
    fields = json.loads(payload)
    return Attestation(**fields)


def create(name: str, version: str, model_sha256: str, status: str, run_id: str) -> Attestation:
    return Attestation(name, str(version), model_sha256, status, run_id, time.time())


def generate(private_path: Path, public_path: Path) -> None:
    """A new key pair: the private key readable by its owner only (the gate's secret), the
    public key for everyone who verifies."""
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(pem)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _read(path_text: str, env: str) -> bytes:
    if not path_text:
        raise AttestationError(f"{env} is not set: it must name crossaudit's key file")
    try:
        return Path(path_text).read_bytes()
    except OSError as exc:
        raise AttestationError(f"{env}={path_text}: cannot read the key file ({exc.strerror})") from exc


def signing_key(path: str | None = None) -> Ed25519PrivateKey:
    """The gate's private key, from `path` or the file named by CROSSAUDIT_SIGNING_KEY_FILE."""
    data = _read(path or os.environ.get(SIGNING_KEY_ENV, ""), SIGNING_KEY_ENV)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AttestationError(f"{SIGNING_KEY_ENV}: not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise AttestationError(f"{SIGNING_KEY_ENV}: expected an Ed25519 key, found {type(key).__name__}")
    return key


def public_key(path: str | None = None) -> Ed25519PublicKey:
    """The verifying key, from `path` or CROSSAUDIT_PUBLIC_KEY_FILE; with neither, derived
    from the signing key when this process holds it."""
    path_text = path or os.environ.get(PUBLIC_KEY_ENV, "")
    if not path_text and os.environ.get(SIGNING_KEY_ENV):
        return signing_key().public_key()
    data = _read(path_text, PUBLIC_KEY_ENV)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise AttestationError(f"{PUBLIC_KEY_ENV}: not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise AttestationError(f"{PUBLIC_KEY_ENV}: expected an Ed25519 key, found {type(key).__name__}")
    return key
