"""JobExecutionManager: the live-job registry and the supervisor of every job.

One nursery owns every job task; each job gets its own cancel scope, waits for a slot under
the admission limit (in ``starting``), then runs its execution. The manager writes each job's
``running`` and terminal ``job_update`` exactly once, whatever ended it: the work itself, a
cancel, a timeout or the server stopping. At start-up it settles what an earlier process left
behind: threaded jobs become ``failed``, out-of-process jobs are re-adopted.

Must not import the server or apsw.
"""

from __future__ import annotations

import enum
import functools
import logging
import math
import time
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Final

import trio

from nodejob.executions import ExecutionUnavailable, JobExecution, Outcome, execution_class
from nodejob.log import MessageLog
from nodejob.protocol import (
    ExecutionStrategy,
    JobStatus,
    MessageTooLarge,
    MessageType,
    ProcessingContext,
    RunJobRequest,
)
from nodejob.store import JobRecord, Store
from nodejob.workflow import GraphError, default_registry, validate_graph

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from nodejob.config import Config

logger = logging.getLogger(__name__)

SERVER_STOPPED: Final = "server stopped while the job was running"

__all__ = [
    "SERVER_STOPPED",
    "CancelResult",
    "JobExecutionManager",
    "WorkflowNotFound",
    "open_manager",
]


class CancelResult(enum.Enum):
    ACCEPTED = "accepted"
    ALREADY_FINISHED = "already_finished"
    NOT_FOUND = "not_found"


class WorkflowNotFound(LookupError):
    """``run_job`` named a saved workflow that the user does not have."""


@dataclass(eq=False)
class _LiveJob:
    job: JobRecord
    execution: JobExecution
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    launched: bool = False
    running: trio.Event = field(default_factory=trio.Event)
    """Set once launched: a timeout counts from then."""
    cancel_requested: bool = False
    timed_out: bool = False
    finished_at: float | None = None


class JobExecutionManager:
    """Starts, supervises, cancels and forgets jobs. Open with ``open_manager``."""

    _instance: ClassVar[JobExecutionManager | None] = None

    def __init__(self, store: Store, log: MessageLog, config: Config, nursery: trio.Nursery):
        self.store = store
        self.log = log
        self.config = config
        self._nursery = nursery
        self._slots = trio.Semaphore(max(1, config.max_jobs))
        self._live: dict[str, _LiveJob] = {}
        self._started: Counter[str] = Counter()
        self._finished: Counter[str] = Counter()
        self._stopping = False
        self._docker_seen = False

    @classmethod
    def get_instance(cls) -> JobExecutionManager:
        if cls._instance is None:
            raise RuntimeError("no JobExecutionManager is open")
        return cls._instance

    # -- starting -------------------------------------------------------------------------

    async def start_job(self, request: RunJobRequest, context: ProcessingContext) -> JobRecord:
        """Validate, record and launch a job; returns once its row and seq 1 are committed.

        Raises GraphError for a graph that cannot run, WorkflowNotFound for an unknown saved
        workflow and ExecutionUnavailable for a strategy that cannot run here.
        """
        graph = request.graph
        if graph is None:
            assert request.workflow_id is not None
            saved = await self.store.get_workflow(context.user_id, request.workflow_id)
            if saved is None:
                raise WorkflowNotFound(f"Workflow not found: {request.workflow_id}")
            graph = saved["graph"]
        validated = validate_graph(graph, default_registry())
        strategy = request.execution_strategy or self.config.default_strategy
        cls = execution_class(strategy)
        job = JobRecord(
            id=uuid.uuid4().hex,
            user_id=context.user_id,
            job_type=request.job_type,
            status=JobStatus.STARTING,
            workflow_id=request.workflow_id,
            execution_strategy=strategy.value,
            params=request.params,
            graph=graph,
            created_at=time.time(),
            timeout_seconds=request.timeout_seconds,
            resources=request.resources,
        )
        live = _LiveJob(job, cls(job, validated, self.log, self.store, self.config))
        self._live[job.id] = live
        self.log.create(job)
        self._started[strategy.value] += 1
        self._nursery.start_soon(self._supervise, live, name=f"job {job.id}")
        await self.log.wait_committed(job.id, 1)
        return job

    async def _supervise(self, live: _LiveJob) -> None:
        job, execution = live.job, live.execution
        outcome: Outcome | None = None
        try:
            with live.scope:
                async with self._slots:
                    execution.launching = functools.partial(self._launching, live)
                    if not execution.admits_itself:
                        self._launching(live)
                    outcome = await self._run(live)
        except Exception as exc:
            logger.exception("job %s: execution crashed", job.id)
            outcome = Outcome(JobStatus.FAILED, error=f"internal error: {exc!r}")
        finally:
            if self._stopping and outcome is None:
                # Shutdown: in-process work is gone; out-of-process work runs on, to be
                # re-adopted by the next server, so its job stays as it is.
                if not execution.survives_restart:
                    self._finish(live, Outcome(JobStatus.FAILED, error=SERVER_STOPPED))
            else:
                self._finish(live, outcome or Outcome(JobStatus.CANCELLED))

    def _launching(self, live: _LiveJob) -> None:
        """The job's work starts now: it is ``running``, and a cancel goes to its execution."""
        if not live.launched:
            live.launched = True
            self.log.append(live.job.id, _job_update(JobStatus.RUNNING))
            live.running.set()

    async def _run(self, live: _LiveJob, *, resume: bool = False) -> Outcome:
        timeout = live.job.timeout_seconds
        async with trio.open_nursery() as nursery:
            if timeout is not None:
                if resume:  # re-adopted: what is left of the time since it started running
                    timeout = max(0.0, timeout - (time.time() - (live.job.started_at or 0.0)))
                nursery.start_soon(self._watchdog, live, timeout)
            if live.cancel_requested:
                await live.execution.request_cancel()
            outcome = await (live.execution.resume() if resume else live.execution.run())
            nursery.cancel_scope.cancel()
        return outcome

    async def _watchdog(self, live: _LiveJob, seconds: float) -> None:
        await live.running.wait()
        await trio.sleep(seconds)
        live.timed_out = True
        await live.execution.request_cancel()

    def _finish(self, live: _LiveJob, outcome: Outcome) -> None:
        if live.timed_out and outcome.status is not JobStatus.COMPLETED:
            timeout = live.job.timeout_seconds or 0
            shown = int(timeout) if timeout == math.floor(timeout) else timeout
            outcome = Outcome(JobStatus.FAILED, error=f"timed out after {shown} s")
        message = _job_update(outcome.status)
        if outcome.status is JobStatus.FAILED:
            message["error"] = outcome.error or "failed"
        elif outcome.status is JobStatus.COMPLETED:
            message["result"] = {"outputs": outcome.outputs or {}}
        try:
            try:
                self.log.append(live.job.id, message)
            except MessageTooLarge as exc:  # outputs each within the limit, but not together
                error = f"the job's outputs do not fit in its last message: {exc}"
                self.log.append(live.job.id, {**_job_update(JobStatus.FAILED), "error": error})
                outcome = Outcome(JobStatus.FAILED, error=error)
        except Exception:
            # Never let one job's bookkeeping take the supervisor (and the server) down.
            logger.exception("job %s: could not log its terminal update", live.job.id)
        live.finished_at = time.monotonic()
        self._finished[outcome.status.value] += 1

    # -- cancelling -----------------------------------------------------------------------

    async def cancel_job(self, job_id: str) -> CancelResult:
        """Ask a job to stop. ACCEPTED once the request is under way (also when it already
        was); followers see the terminal ``job_update`` once the work has stopped."""
        live = self._live.get(job_id)
        if live is None:
            job = await self.store.get_job(job_id)
            if job is None:
                return CancelResult.NOT_FOUND
            return CancelResult.ALREADY_FINISHED if job.is_finished else CancelResult.ACCEPTED
        if live.finished_at is not None:
            return CancelResult.ALREADY_FINISHED
        if not live.cancel_requested:
            live.cancel_requested = True
            if live.launched:
                await live.execution.request_cancel()
            else:
                live.scope.cancel()
        return CancelResult.ACCEPTED

    # -- reading --------------------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobRecord | None:
        return await self.store.get_job(job_id)

    async def list_jobs(self, user_id: str, **kwargs: Any) -> tuple[list[JobRecord], str | None]:
        return await self.store.list_jobs(user_id, **kwargs)

    def stats(self) -> dict[str, Any]:
        live = [j for j in self._live.values() if j.finished_at is None]
        return {
            "jobs_running": sum(j.launched for j in live),
            "jobs_starting": sum(not j.launched for j in live),
            "jobs_in_memory": len(self._live),
            "jobs_started_total": dict(self._started),
            "jobs_finished_total": dict(self._finished),
        }

    # -- housekeeping ---------------------------------------------------------------------

    def cleanup_completed_jobs(self, max_age_seconds: float = 3600.0) -> int:
        """Forget finished jobs older than ``max_age_seconds`` from memory (rows stay)."""
        cutoff = time.monotonic() - max_age_seconds
        old = [
            job_id
            for job_id, live in self._live.items()
            if live.finished_at is not None and live.finished_at <= cutoff
        ]
        for job_id in old:
            del self._live[job_id]
            self.log.forget(job_id)
        return len(old)

    def start_cleanup_task(self, interval_seconds: float = 300.0) -> None:
        self._nursery.start_soon(self._cleanup_loop, interval_seconds, name="cleanup")

    async def _cleanup_loop(self, interval_seconds: float) -> None:
        while True:
            await self._sweep_containers()  # first at start-up, after recovery
            await trio.sleep(interval_seconds)
            self.cleanup_completed_jobs(self.config.cleanup_max_age_s)
            await self.store.purge_messages(time.time() - self.config.retention_s)

    async def _sweep_containers(self) -> None:
        """Remove the containers that finished or unknown jobs of this home left behind (see
        ``executions/engine.py``), if this home has ever had docker jobs: a server that has
        none never loads the Docker SDK."""
        if not (self._docker_seen or self._started[ExecutionStrategy.DOCKER.value]):
            return
        try:
            from nodejob.executions.engine import sweep_containers

            await sweep_containers(self.store, self.config)
        except Exception:  # housekeeping must never take the supervisor (and the server) down
            logger.exception("container sweep failed")

    async def recover(self) -> None:
        """Settle the unfinished jobs an earlier server process left in the database."""
        # Containers a dead server left can belong to finished jobs only: sweep them too.
        self._docker_seen = await self.store.has_jobs_of(ExecutionStrategy.DOCKER.value)
        for job in await self.store.unfinished_jobs():
            self.log.adopt(job)
            strategy = ExecutionStrategy(job.execution_strategy)
            try:
                cls = execution_class(strategy)
                graph = validate_graph(job.graph or {}, default_registry())
            except (ExecutionUnavailable, GraphError) as exc:
                self.log.append(job.id, {**_job_update(JobStatus.FAILED), "error": str(exc)})
                continue
            live = _LiveJob(job, cls(job, graph, self.log, self.store, self.config))
            if not cls.survives_restart:  # in-process: its work died with the old process
                self.log.append(job.id, {**_job_update(JobStatus.FAILED), "error": SERVER_STOPPED})
                continue
            self._live[job.id] = live
            if job.status is JobStatus.STARTING:
                # Accepted but never launched: nothing ran, so it waits for a slot again.
                self._nursery.start_soon(self._supervise, live, name=f"job {job.id} (queued)")
                continue
            live.launched = True
            live.running.set()
            self._nursery.start_soon(self._readopt, live, name=f"job {job.id} (re-adopted)")

    async def _readopt(self, live: _LiveJob) -> None:
        outcome: Outcome | None = None
        try:
            with live.scope:
                outcome = await self._run(live, resume=True)
        except Exception as exc:
            logger.exception("job %s: re-adoption failed", live.job.id)
            outcome = Outcome(JobStatus.FAILED, error=f"re-adoption failed: {exc!r}")
        finally:
            if not (self._stopping and outcome is None):
                self._finish(live, outcome or Outcome(JobStatus.CANCELLED))

    async def shutdown(self) -> None:
        """Stop supervising: in-process jobs end ``failed`` (server stopped), out-of-process
        jobs keep running for the next server to re-adopt."""
        self._stopping = True
        self._nursery.cancel_scope.cancel()


def _job_update(status: JobStatus) -> dict[str, Any]:
    return {"type": MessageType.JOB_UPDATE.value, "status": status.value}


@asynccontextmanager
async def open_manager(store: Store, config: Config) -> AsyncIterator[JobExecutionManager]:
    """Open the message log's writer and the job supervisor; on exit, shut both down.

    Resource handling: on exit, jobs are stopped first (see ``shutdown``), then the writer
    commits everything still queued, so the last messages of stopped jobs are on disk.
    """
    log = MessageLog(store, config.ring_size)
    async with trio.open_nursery() as outer:
        await outer.start(log.run)
        try:
            async with trio.open_nursery() as jobs:
                manager = JobExecutionManager(store, log, config, jobs)
                await manager.recover()
                manager.start_cleanup_task(config.cleanup_interval_s)
                JobExecutionManager._instance = manager
                try:
                    yield manager
                finally:
                    await manager.shutdown()
        finally:
            if JobExecutionManager._instance is not None:
                JobExecutionManager._instance = None
            outer.cancel_scope.cancel()
