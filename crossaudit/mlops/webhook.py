"""MLflow model-registry webhooks: check a delivery is genuine, and register ours.

MLflow signs each delivery with the webhook's secret: `X-MLflow-Signature: v1,<base64
HMAC-SHA256 of "{delivery_id}.{timestamp}.{raw body}">`, with the delivery id and the
Unix timestamp in their own headers. A delivery is accepted only when the signature
matches (compared in constant time), the timestamp is recent, and the delivery id has not
been seen before (the queue remembers ids; see `event_queue`). Anything else is forged,
stale or replayed, and starts nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from crossaudit.errors import WebhookRejectedError

SIGNATURE_HEADER = "x-mlflow-signature"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
DELIVERY_ID_HEADER = "x-mlflow-delivery-id"
SECRET_ENV = "CROSSAUDIT_WEBHOOK_SECRET"
SECRET_FILE_ENV = "CROSSAUDIT_WEBHOOK_SECRET_FILE"
EVENTS = ("model_version.created", "model_version_tag.set", "model_version_alias.created")
DEFAULT_TOLERANCE_S = 300
MAX_BODY_BYTES = 1 << 20
WEBHOOK_NAME = "crossaudit"


@dataclass(frozen=True)
class Delivery:
    """A verified delivery: who sent it when, and the event it carries."""

    delivery_id: str
    timestamp: int
    event: str
    data: dict[str, object]


def secret_from_env() -> str:
    """The webhook secret, from the file CROSSAUDIT_WEBHOOK_SECRET_FILE names (a mounted
    Secret) or from CROSSAUDIT_WEBHOOK_SECRET. The receiver never hands it to an audit."""
    path = os.environ.get(SECRET_FILE_ENV, "")
    try:
        secret = Path(path).read_text().strip() if path else os.environ.get(SECRET_ENV, "")
    except OSError as exc:
        raise WebhookRejectedError(
            f"{SECRET_FILE_ENV}={path}: cannot read the webhook secret ({exc.strerror})"
        ) from exc
    if len(secret) < 16:
        raise WebhookRejectedError(
            f"{SECRET_FILE_ENV} or {SECRET_ENV} must hold the webhook secret (at least 16 characters)"
        )
    return secret


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The signature MLflow sends for this delivery (also used to test the receiver)."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: dict[str, str], body: bytes, now: float, tolerance_s: int) -> Delivery:
    """The delivery, when its signature and timestamp hold; `WebhookRejectedError` otherwise.
    Replays are the queue's concern: it holds the ids already seen."""
    delivery_id = headers.get(DELIVERY_ID_HEADER, "")
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    signature = headers.get(SIGNATURE_HEADER, "")
    if not (delivery_id and timestamp and signature):
        raise WebhookRejectedError("missing X-MLflow-Delivery-Id, X-MLflow-Timestamp or X-MLflow-Signature")
    if len(body) > MAX_BODY_BYTES:
        raise WebhookRejectedError(f"body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    if not hmac.compare_digest(sign(secret, delivery_id, timestamp, body).encode(), signature.encode()):
        raise WebhookRejectedError("signature does not match")
    try:
        sent = int(timestamp)
    except ValueError as exc:
        raise WebhookRejectedError(f"timestamp {timestamp!r} is not a Unix time") from exc
    if abs(now - sent) > tolerance_s:
        raise WebhookRejectedError(f"timestamp {sent} is {sent - now:+.0f}s from now (tolerance {tolerance_s}s)")
    try:
        payload = json.loads(body)
        event = f"{payload['entity']}.{payload['action']}"
        data = payload["data"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:  # RecursionError: nesting too deep to parse
        raise WebhookRejectedError("body is not an MLflow webhook payload (entity, action, data)") from exc
    if not isinstance(data, dict):
        raise WebhookRejectedError("payload 'data' is not an object")
    return Delivery(delivery_id, sent, event, data)


def install(mlflow_client: MlflowClient, url: str, secret: str) -> tuple[str, bool, str]:
    """Register (or update) the crossaudit webhook for our three events, then ask MLflow to
    send it a test delivery. Returns the webhook id, whether the test got a 2xx, and why."""
    existing = [w for w in mlflow_client.list_webhooks() if w.name == WEBHOOK_NAME]
    if existing:
        webhook = mlflow_client.update_webhook(
            existing[0].webhook_id, url=url, events=list(EVENTS), secret=secret, status="ACTIVE"
        )
    else:
        webhook = mlflow_client.create_webhook(
            WEBHOOK_NAME, url, list(EVENTS), description="crossaudit: audit every registered version", secret=secret
        )
    result = mlflow_client.test_webhook(webhook.webhook_id, event="model_version.created")
    detail = result.error_message or f"HTTP {result.response_status}"
    return webhook.webhook_id, bool(result.success), detail
