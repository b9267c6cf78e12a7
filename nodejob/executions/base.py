"""JobExecution: how one job's graph runs somewhere, and what it reports back.

An execution runs a validated graph for one job and returns an ``Outcome``; it emits the
job's node messages into the message log on the way. It never writes the job's terminal
``job_update``: the manager does, exactly once, because only the manager knows whether the
job ended on its own, was cancelled, timed out, or the server is shutting down.

Must not import the server, apsw or docker (strategies import their own SDKs lazily).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from collections.abc import Callable

    from nodejob.config import Config
    from nodejob.log import MessageLog
    from nodejob.protocol import ExecutionStrategy, JobStatus
    from nodejob.store import JobRecord, Store
    from nodejob.workflow import Graph


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job's work ended, as its execution saw it."""

    status: JobStatus
    error: str | None = None
    outputs: dict[str, Any] | None = None


class ExecutionUnavailable(RuntimeError):
    """The strategy cannot run jobs here (no Docker engine, no Ray cluster): says why."""


class JobExecution(ABC):
    """One job's run under one strategy. Created by the manager once the job has a slot."""

    strategy: ClassVar[ExecutionStrategy]
    survives_restart: ClassVar[bool] = False
    """Whether a job of this strategy keeps running when the server stops (invariant 4)."""
    admits_itself: ClassVar[bool] = False
    """Whether ``run`` first waits for room of its own (on a cluster): the job then stays
    ``starting`` until ``run`` calls ``launching``. Otherwise it is ``running`` as soon as it
    has one of the server's slots."""

    def __init__(
        self, job: JobRecord, graph: Graph, log: MessageLog, store: Store, config: Config
    ) -> None:
        self.job = job
        self.graph = graph
        self.log = log
        self.store = store
        self.config = config
        self.launching: Callable[[], None] = _nothing
        """Set by the manager: marks the job ``running`` (once; see ``admits_itself``)."""

    @abstractmethod
    async def run(self) -> Outcome:
        """Run the job's graph to its end and say how it ended.

        Cancellation: if the caller's scope is cancelled (the server shutting down), an
        in-process execution stops its work; an out-of-process one stops only following it,
        leaving the work running for ``resume`` after a restart.
        """

    async def first_worker_seq(self) -> int:
        """The seq an out-of-process worker starts numbering at, once everything before it
        (``running`` at least) is committed: a restarted server re-adopts only what is on disk,
        and a worker must never number messages the log could still take back."""
        first_seq = self.log.last_seq(self.job.id) + 1
        await self.log.wait_committed(self.job.id, first_seq - 1)
        return first_seq

    @abstractmethod
    async def request_cancel(self) -> None:
        """Ask the work to stop; ``run`` then returns once it has verifiably stopped."""

    async def resume(self) -> Outcome:
        """Follow a job started by an earlier server process to its end (out-of-process only)."""
        raise ExecutionUnavailable(f"{self.strategy} jobs cannot be re-adopted")


def _nothing() -> None:
    """``launching`` of an execution nobody supervises (or one already running)."""
