"""`crossaudit serve`: audits that start by themselves when a version is registered.

MLflow posts model-registry events to `POST /webhook`. A delivery is verified (`webhook`),
turned into jobs and committed to the SQLite queue (`event_queue`) *before* it is
answered, so an acknowledged event survives a crash. Behind the queue:
- audit workers (a bounded pool) run each version's audit pipeline in its own process
  (`crossaudit audit-version`, i.e. the same KFP pipeline as by hand), with a time budget,
  under `kfp.local` or, with `kfp_host`, submitted to Kubeflow Pipelines;
- a guard worker answers `model_version_alias.created` for the promotion alias at once:
  an alias on a version that has not passed is removed (`registry.guard_alias`);
- a reconciler lists registered versions with no audit status, on start and then
  periodically, and queues them: MLflow's delivery is fire-and-forget, so a lost webhook
  still ends in an audit;
- a scheduler re-audits every promoted version on a cron schedule (default weekly).
Every way an audit can go wrong ends in a retry or in a non-passing status on the
version, never in a promotion.
"""

from __future__ import annotations

import contextlib
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

from crossaudit import registry
from crossaudit.errors import AuditError
from crossaudit.event_queue import EventQueue, Job, NewJob, ReplayedDeliveryError
from crossaudit.schedule import DEFAULT_CRON, Cron
from crossaudit.webhook import MAX_BODY_BYTES, Delivery, WebhookRejectedError, verify

log = logging.getLogger(__name__)
ENDED = ("passed", "failed", "inconclusive", "awaiting-peer", "error")
_POLL_S = 0.2


@dataclass(frozen=True)
class ReceiverConfig:
    tracking_uri: str
    secret: str
    queue_path: Path
    workers: int = 2
    alias: str = registry.DEFAULT_ALIAS
    tolerance_s: int = 300
    reconcile_every_s: float = 300.0
    cron: str = DEFAULT_CRON
    audit_timeout_s: float = 3600.0
    max_attempts: int = 3
    retry_delay_s: float = 30.0
    device: str = "cpu"
    kfp_host: str | None = None


def jobs_for(delivery: Delivery, alias: str) -> list[NewJob]:
    """The work an event asks for. A registration is audited once (its key is the version);
    setting the provider tag later audits it again under that provider; the promotion
    alias landing on a version is checked by the guard. Everything else (our own tags,
    other aliases) asks for nothing."""
    data = delivery.data
    name, version = str(data.get("name", "")), str(data.get("version", ""))
    if not name or not version.isdigit():
        return []
    if delivery.event == "model_version.created":
        return [NewJob(f"audit:{name}/{version}", "audit", name, version, delivery.delivery_id)]
    if delivery.event == "model_version_tag.set" and data.get("key") == registry.PROVIDER_TAG:
        key = f"audit:{name}/{version}:provider:{data.get('value')}"
        return [NewJob(key, "audit", name, version, delivery.delivery_id)]
    if delivery.event == "model_version_alias.created" and data.get("alias") == alias:
        return [NewJob(f"guard:{delivery.delivery_id}", "guard", name, version, delivery.delivery_id)]
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
            ("scheduler", self._schedule_loop),
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
        jobs = jobs_for(delivery, self.config.alias)
        try:
            added = await run_in_threadpool(
                self.queue.accept, delivery.delivery_id, delivery.event, delivery.timestamp, jobs
            )
        except ReplayedDeliveryError:
            return JSONResponse({"status": "duplicate", "delivery_id": delivery.delivery_id})
        return JSONResponse({"status": "queued" if added else "ignored", "jobs": added})

    async def health(self, _: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "jobs": await run_in_threadpool(self.queue.counts)})

    async def list_jobs(self, _: Request) -> JSONResponse:
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
        client, ref = self._client(), registry.VersionRef(job.name, job.version)
        try:
            registry.set_status(
                client, ref, "error", **{registry.ERROR: reason[:4000], registry.AUDITED_AT: registry.now()}
            )
            if registry.revoke(client, ref, self.config.alias):
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
        try:
            before = _audit_marks(client.get_model_version(job.name, job.version))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return "dropped", f"no such version: {exc.message}"
            raise
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
        """Share the cores between the workers: audits running side by side with a full
        thread pool each oversubscribe the CPU and all slow down several times. A smaller
        OMP_NUM_THREADS already in the environment (an operator's, or a parallel test
        run's) stands."""
        threads = max(1, (os.cpu_count() or 1) // max(1, self.config.workers))
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
        return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}

    def _queue_waiting_peers(self, versions: list[ModelVersion], source: str) -> int:
        """A delivery is the peer that other providers' earlier versions were waiting for:
        audit them again, once per new peer. Runs after every audit (over that model's
        versions) and every sweep (over all)."""
        due = registry.waiting_for_peers(versions)
        return self.queue.enqueue(
            [NewJob(f"audit:{v.name}/{v.version}:peer:{peer}", "audit", v.name, v.version, source) for v, peer in due]
        )

    def guard(self, job: Job) -> tuple[str, str]:
        incident = registry.guard_alias(self._client(), registry.VersionRef(job.name, job.version), self.config.alias)
        if incident:
            log.warning("alias guard on %s: %s", job.uri, incident)
        return "done", incident or "alias holder has passed (or the alias moved on)"

    # -- reconciliation and the schedule ---------------------------------------------

    def reconcile(self) -> int:
        """Queue every delivered version that has no audit status, and every version awaiting
        a peer that has one now; returns how many jobs were new."""
        versions = registry.model_versions(self._client())
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
            except (MlflowException, OSError) as exc:
                log.error("reconciliation could not reach MLflow: %s", exc)
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


def _audit_marks(version: ModelVersion) -> tuple[str | None, ...]:
    """What an audit that ran leaves on a version: a re-audit that died early leaves the
    previous audit's status in place, which must not read as this audit's result."""
    return tuple(version.tags.get(key) for key in (registry.STATUS, registry.AUDITED_AT, registry.RUN_ID))


def serve(config: ReceiverConfig, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(Receiver(config).app(), host=host, port=port, log_level="info")
