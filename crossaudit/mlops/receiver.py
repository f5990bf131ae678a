"""`crossaudit serve`: audits that start by themselves when a version is registered.

MLflow posts model-registry events to `POST /webhook`. A delivery is verified (`webhook`),
turned into jobs and committed to the SQLite queue (`event_queue`) *before* it is
answered, so an acknowledged event survives a crash. Behind the queue:
- audit workers (a bounded pool) run each version's audit pipeline in its own process
  (`crossaudit audit-version`, i.e. the same KFP pipeline as by hand), with a time budget,
  under `kfp.local` or, with `kfp_host`, submitted to Kubeflow Pipelines;
- a guard worker answers `model_version_alias.created` for the promotion alias, and a
  `crossaudit.status` set to passed, at once: an alias on a version without a passing
  verdict that crossaudit signed for its bytes is removed (`promotion.guard_alias`), and
  a status tag that claims a pass nobody signed is put back;
- a reconciler, on start and then periodically, runs the guard over every alias holder
  and every status tag, and queues the registered versions with no audit status:
  MLflow's delivery is fire-and-forget, so a lost webhook still ends in an audit and a
  lost alias webhook still ends in the guard;
- a scheduler re-audits every promoted version on a cron schedule (default weekly).
Every way an audit can go wrong ends in a retry or in a non-passing status on the
version, never in a promotion. Audits load hostile models, so their processes get an
environment with no secret in it (`audit_environment`).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from crossaudit.errors import AuditError, WebhookRejectedError
from crossaudit.mlops import attestation, operator_config, promotion, registry
from crossaudit.mlops.event_queue import EventQueue, Job, NewJob, ReplayedDeliveryError
from crossaudit.mlops.schedule import DEFAULT_CRON, Cron
from crossaudit.mlops.webhook import DEFAULT_TOLERANCE_S, MAX_BODY_BYTES, Delivery, verify

log = logging.getLogger(__name__)
ENDED = ("passed", "failed", "inconclusive", "awaiting-peer", "error")
_POLL_S = 0.2
GUARD_WINDOW_S = 5
# What an audit process may inherit: what Python, the thread pools and a GPU need, and
# crossaudit's own settings (file paths and limits). Everything else, credentials
# included, stays with the receiver.
_AUDIT_ENV_NAMES = ("PATH", "HOME", "LANG", "TZ", "TMPDIR", "USER", "VIRTUAL_ENV", "CUDA_VISIBLE_DEVICES")
_AUDIT_ENV_PREFIXES = ("LC_", "PYTHON", "OMP_", "MKL_", "NVIDIA_", "CROSSAUDIT_", "MLFLOW_")
_NEVER_TO_AUDITS = ("CROSSAUDIT_WEBHOOK_SECRET", "CROSSAUDIT_WEBHOOK_SECRET_FILE", "CROSSAUDIT_ADMIN_TOKEN_FILE")
# MLflow's settings (addresses, retries, timeouts) pass; its credentials never do. With an
# authenticated MLflow, local audits read MLflow's credentials file instead.
_SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET", "KEY", "CREDENTIAL", "USERNAME", "AUTH", "CERT")


def audit_environment(environment: dict[str, str]) -> dict[str, str]:
    """The environment an audit runs in: an allowlist, so a secret added to the receiver's
    environment later (a token, a cloud key) is not inherited by code that loads hostile
    models. The signing key reaches the local gate as a file path, never as a value."""
    return {
        name: value
        for name, value in environment.items()
        if (name in _AUDIT_ENV_NAMES or name.startswith(_AUDIT_ENV_PREFIXES))
        and name not in _NEVER_TO_AUDITS
        and not (name.startswith("MLFLOW_") and any(word in name for word in _SECRET_WORDS))
    }


@dataclass(frozen=True)
class ReceiverConfig:
    tracking_uri: str
    secret: str
    queue_path: Path
    workers: int = 2
    alias: str = registry.DEFAULT_ALIAS
    tolerance_s: int = DEFAULT_TOLERANCE_S
    reconcile_every_s: float = 300.0
    cron: str = DEFAULT_CRON
    audit_timeout_s: float = 3600.0
    max_attempts: int = 3
    retry_delay_s: float = 30.0
    device: str = "cpu"
    kfp_host: str | None = None
    admin_token: str | None = None  # bearer token for GET /jobs; None: the listing is off
    schedule: bool = True  # off where a Kubeflow recurring run does the re-audits


ADMIN_TOKEN_ENV = "CROSSAUDIT_ADMIN_TOKEN_FILE"


def admin_token_from_env() -> str | None:
    """The operator's bearer token for GET /jobs, from the file CROSSAUDIT_ADMIN_TOKEN_FILE
    names; None (the listing answers 401) when unset."""
    path = os.environ.get(ADMIN_TOKEN_ENV, "")
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise AuditError(f"{ADMIN_TOKEN_ENV}={path}: cannot read the admin token ({exc.strerror})") from exc
    if len(token) < 16:
        raise AuditError(f"{ADMIN_TOKEN_ENV}: the admin token must have at least 16 characters")
    return token


def jobs_for(delivery: Delivery, alias: str, now: float) -> list[NewJob]:
    """The work an event asks for. A registration is audited once (its key is the version);
    the promotion alias landing on a version, or a status tag set to passed, is checked by
    the guard. Nothing else a provider can write (tags, other aliases) asks for work, so
    no tag can make the receiver queue audits without bound."""
    data = delivery.data
    name, version = str(data.get("name", "")), str(data.get("version", ""))
    if not name or not version.isdigit():
        return []
    if delivery.event == "model_version.created":
        return [NewJob(f"audit:{name}/{version}", "audit", name, version, delivery.delivery_id)]
    claims_pass = data.get("key") == registry.STATUS and data.get("value") == "passed"
    if (delivery.event == "model_version_tag.set" and claims_pass) or (
        delivery.event == "model_version_alias.created" and data.get("alias") == alias
    ):
        # One guard per version per window of arrival, run once the window has closed: a
        # provider writing the alias or the tag in a loop queues a bounded number of jobs,
        # and the job runs after every write of its window, so none goes unguarded.
        window = int(now // GUARD_WINDOW_S)
        due = (window + 1) * GUARD_WINDOW_S
        return [NewJob(f"guard:{name}/{version}:{window}", "guard", name, version, delivery.delivery_id, due)]
    return []


class Receiver:
    """The queue and the threads that work it; `app()` is the HTTP side."""

    def __init__(self, config: ReceiverConfig) -> None:
        self.config = config
        self.queue = EventQueue(config.queue_path)
        self.cron = Cron.parse(config.cron)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._audits: set[subprocess.Popen] = set()
        self.public_key = attestation.public_key()
        self.signing_key = promotion.optional_signing_key()

    def _client(self) -> MlflowClient:
        return registry.client(self.config.tracking_uri)

    def start(self) -> None:
        recovered = self.queue.recover()
        if recovered:
            log.warning("queued again %d job(s) left running by a previous receiver", recovered)
        loops: list[tuple[str, Callable[[], None]]] = [
            *((f"audit-worker-{i}", self._audit_loop) for i in range(self.config.workers)),
            ("alias-guard", self._guard_loop),
            ("reconciler", self._reconcile_loop),
            *((("scheduler", self._schedule_loop),) if self.config.schedule else ()),
        ]
        for name, loop in loops:
            thread = threading.Thread(target=loop, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop taking work and end the audits in flight with their pipelines; their jobs
        stay `running` in the queue and are redone on the next start."""
        self._stop.set()
        for process in list(self._audits):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for thread in self._threads:
            thread.join(timeout=5)
        self.queue.close()

    # -- the HTTP side ---------------------------------------------------------------

    async def receive(self, request: Request) -> JSONResponse:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse({"error": f"body exceeds {MAX_BODY_BYTES} bytes"}, status_code=413)
        try:
            delivery = verify(self.config.secret, dict(request.headers), body, time.time(), self.config.tolerance_s)
        except WebhookRejectedError as exc:
            log.warning("webhook rejected from %s: %s", request.client.host if request.client else "?", exc)
            return JSONResponse({"error": str(exc)}, status_code=401)
        jobs = jobs_for(delivery, self.config.alias, time.time())
        try:
            added = await run_in_threadpool(
                self.queue.accept, delivery.delivery_id, delivery.event, delivery.timestamp, jobs
            )
        except ReplayedDeliveryError:
            return JSONResponse({"status": "duplicate", "delivery_id": delivery.delivery_id})
        return JSONResponse({"status": "queued" if added else "ignored", "jobs": added})

    async def health(self, _: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "jobs": await run_in_threadpool(self.queue.counts)})

    async def list_jobs(self, request: Request) -> JSONResponse:
        """The queue's jobs (model names, outcomes, error texts) for an operator holding the
        admin token; to anyone else, nothing."""
        token = self.config.admin_token
        offered = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not token or not hmac.compare_digest(offered.encode(), token.encode()):
            return JSONResponse({"error": "GET /jobs needs the operator's bearer token"}, status_code=401)
        return JSONResponse(await run_in_threadpool(self.queue.jobs))

    def app(self) -> Starlette:
        routes = [
            Route("/webhook", self.receive, methods=["POST"]),
            Route("/healthz", self.health, methods=["GET"]),
            Route("/jobs", self.list_jobs, methods=["GET"]),
        ]
        return Starlette(routes=routes, lifespan=self._lifespan)

    @asynccontextmanager
    async def _lifespan(self, _: Starlette) -> AsyncIterator[None]:
        self.start()
        try:
            yield
        finally:
            self.stop()

    # -- the workers -----------------------------------------------------------------

    def _work(self, kinds: tuple[str, ...], handle: Callable[[Job], tuple[str, str]]) -> None:
        while not self._stop.is_set():
            job = self.queue.claim(kinds)
            if job is None:
                self._stop.wait(_POLL_S)
                continue
            try:
                state, outcome = handle(job)
            except Exception as exc:  # a worker must outlive any job: the job is retried or fails closed
                if self._stop.is_set():
                    return  # left `running`: queued again and redone on the next start
                log.exception("%s %s: attempt %d raised", job.kind, job.uri, job.attempts)
                self._retry_or_fail(job, f"{type(exc).__name__}: {exc}")
                continue
            self.queue.finish(job, state, outcome)
            log.info("%s %s: %s (%s)", job.kind, job.uri, state, outcome)

    def _retry_or_fail(self, job: Job, reason: str) -> None:
        if job.attempts < self.config.max_attempts:
            log.warning("%s %s: attempt %d failed (%s); retrying", job.kind, job.uri, job.attempts, reason)
            self.queue.retry(job, self.config.retry_delay_s * job.attempts, reason)
            return
        log.error("%s %s: giving up after %d attempts: %s", job.kind, job.uri, job.attempts, reason)
        self.queue.finish(job, "failed", reason)
        self._mark_error(job, f"audit could not run after {job.attempts} attempts: {reason}")

    def _mark_error(self, job: Job, reason: str) -> None:
        """The version says `error` and loses the promotion alias if it held it (a version
        that could not be audited is never promoted). Best effort: when MLflow itself is
        the problem, the version keeps its `running` status (which is not promotable
        either) and the failed job stays in the queue (`/jobs`) for an operator."""
        ref = registry.VersionRef(job.name, job.version)
        try:
            client = self._client()
            promotion.mark_error(client, ref, reason, self.signing_key)
            if promotion.revoke(client, ref, self.config.alias):
                log.warning("%s lost the %r alias: %s", job.uri, self.config.alias, reason)
        except (MlflowException, OSError) as exc:
            log.error("could not mark %s error: %s", job.uri, exc)

    def _audit_loop(self) -> None:
        self._work(("audit",), self.audit)

    def _guard_loop(self) -> None:
        self._work(("guard",), self.guard)

    def audit(self, job: Job) -> tuple[str, str]:
        """Run the version's audit pipeline in its own process, within the time budget."""
        client = self._client()
        version = _current(client, job)
        if version is None:
            return "dropped", f"no such version: {job.uri}"
        before = _audit_marks(version)
        command = [
            sys.executable, "-m", "crossaudit", "audit-version", job.uri, "--tracking-uri", self.config.tracking_uri,
            "--alias", self.config.alias, "--device", self.config.device,
            *(("--kfp-host", self.config.kfp_host) if self.config.kfp_host else ()),
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self._audit_env(),
            start_new_session=True,
        )  # fmt: skip
        self._audits.add(process)
        try:
            stdout, stderr = process.communicate(timeout=self.config.audit_timeout_s)
        except subprocess.TimeoutExpired:
            # The whole group: the pipeline's component processes too, so no late gate can
            # write a verdict (or move the alias) after the version is marked error.
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            reason = f"audit exceeded its time budget of {self.config.audit_timeout_s:g}s"
            self._mark_error(job, reason)
            return "failed", reason
        finally:
            self._audits.discard(process)
        if self._stop.is_set():
            raise AuditError("receiver stopping: the audit was ended and will be redone on the next start")
        done = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        after = _audit_marks(client.get_model_version(job.name, job.version))
        status = after[0]
        self._queue_waiting_peers(registry.model_versions(client, job.name), job.key)
        if status in ENDED and after != before:
            return "done", status
        if self.config.kfp_host and status == "running":
            return "done", f"submitted to Kubeflow Pipelines: {done.stdout.strip()}"
        message = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        if done.returncode == 2 and message.startswith("error:"):
            self._mark_error(job, message.removeprefix("error:").strip())
            return "done", f"error: {message}"
        raise AuditError(f"audit process ended {done.returncode} with status {status!r}: {message}")

    def _audit_env(self) -> dict[str, str]:
        """No secrets (`audit_environment`), and the cores shared between the workers:
        audits running side by side with a full thread pool each oversubscribe the CPU and
        all slow down several times. A smaller OMP_NUM_THREADS already in the environment
        (an operator's, or a parallel test run's) stands."""
        threads = max(1, (os.cpu_count() or 1) // max(1, self.config.workers))
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
        return {**audit_environment(dict(os.environ)), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def _queue_waiting_peers(self, versions: list[ModelVersion], source: str) -> int:
        """A delivery is the peer that other providers' earlier versions were waiting for:
        audit them again, once per new peer. Runs after every audit (over that model's
        versions) and every sweep (over all)."""
        due = registry.waiting_for_peers(self._client(), versions, operator_config.load())
        return self.queue.enqueue(
            [NewJob(f"audit:{v.name}/{v.version}:peer:{peer}", "audit", v.name, v.version, source) for v, peer in due]
        )

    def guard(self, job: Job) -> tuple[str, str]:
        """The version's status tag against its signed verdict, then the alias of its model."""
        client = self._client()
        version = _current(client, job)
        if version is None:
            return "dropped", f"no such version: {job.uri}"
        forged = promotion.restore_forged_statuses(client, [version], self.public_key)
        incident = promotion.guard_alias(client, job.name, self.public_key, self.config.alias)
        if incident:
            log.warning("alias guard on %s: %s", job.uri, incident)
        notes = [*(["status tag restored"] if forged else []), incident or "alias holder verified (or none)"]
        return "done", "; ".join(notes)

    # -- reconciliation and the schedule ---------------------------------------------

    def reconcile(self) -> int:
        """Guard every alias holder and every status tag, then queue every registered version
        that has no audit status, and every version awaiting a peer that has one now;
        returns how many jobs were new."""
        client = self._client()
        versions = registry.model_versions(client)
        for ref in promotion.restore_forged_statuses(client, versions, self.public_key):
            log.warning("%s: a status tag claimed a pass crossaudit did not sign; restored", ref.uri)
        promotion.guard_every_alias(client, self.public_key, self.config.alias)
        added = self.queue.enqueue(
            [NewJob(f"audit:{v.name}/{v.version}", "audit", v.name, v.version, "reconcile")
             for v in registry.unaudited_versions(versions)]
        )  # fmt: skip
        if added:
            log.warning("reconciliation queued %d version(s) whose webhook never arrived", added)
        added += self._queue_waiting_peers(versions, "reconcile")
        self.queue.forget_deliveries(older_than=time.time() - 2 * self.config.tolerance_s)
        return added

    def _reconcile_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
            except Exception:  # the sweep is the guard's safety net: it must outlive any one failure
                log.exception("reconciliation failed; retrying at the next sweep")
            self._stop.wait(self.config.reconcile_every_s)

    def reaudit_promoted(self, tick: datetime) -> int:
        """Queue a re-audit of every version holding the promotion alias."""
        promoted = registry.promoted_versions(self._client(), self.config.alias)
        stamp = tick.strftime("%Y-%m-%dT%H:%M")
        return self.queue.enqueue(
            [NewJob(f"audit:{v.name}/{v.version}:reaudit:{stamp}", "audit", v.name, v.version, "schedule")
             for v in promoted]
        )  # fmt: skip

    def _schedule_loop(self) -> None:
        tick = self.cron.next_after(datetime.now(UTC))
        while not self._stop.wait(max(0.0, min(60.0, (tick - datetime.now(UTC)).total_seconds()))):
            if datetime.now(UTC) < tick:
                continue
            try:
                log.info("scheduled re-audit at %s: %d version(s) queued", tick, self.reaudit_promoted(tick))
            except (MlflowException, OSError) as exc:
                log.error("scheduled re-audit could not reach MLflow: %s", exc)
            tick = self.cron.next_after(tick)


def _current(client: MlflowClient, job: Job) -> ModelVersion | None:
    """The job's version as the registry holds it now, or None once it was deleted."""
    try:
        return client.get_model_version(job.name, job.version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _audit_marks(version: ModelVersion) -> tuple[str | None, ...]:
    """What an audit that ran leaves on a version: a re-audit that died early leaves the
    previous audit's status in place, which must not read as this audit's result."""
    return tuple(version.tags.get(key) for key in (registry.STATUS, registry.AUDITED_AT, registry.RUN_ID))


def serve(config: ReceiverConfig, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(Receiver(config).app(), host=host, port=port, log_level="info")
