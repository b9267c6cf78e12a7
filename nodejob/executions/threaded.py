"""The ``threaded`` strategy: the graph runs as tasks in the server's own trio loop.

Named after the seed's thread-per-job strategy; here a job is a trio task under the manager's
nursery (about 2 KB instead of a thread), and only nodes that block (synchronous plug-ins)
borrow a worker thread. The cheapest strategy, and the only one that cannot outlive the
server process.
"""

from __future__ import annotations

from typing import ClassVar

import trio

from nodejob.executions.base import JobExecution, Outcome
from nodejob.log import JobEmitter
from nodejob.protocol import ExecutionStrategy, JobStatus
from nodejob.workflow import NodeFailed, run_graph


class ThreadedExecution(JobExecution):
    strategy: ClassVar[ExecutionStrategy] = ExecutionStrategy.THREADED

    _scope: trio.CancelScope | None = None
    _cancel_requested = False

    async def run(self) -> Outcome:
        with trio.CancelScope() as self._scope:
            if self._cancel_requested:
                self._scope.cancel()
            try:
                outputs = await run_graph(
                    self.graph, self.job.params, JobEmitter(self.log, self.job.id)
                )
            except NodeFailed as exc:
                return Outcome(JobStatus.FAILED, error=str(exc))
            return Outcome(JobStatus.COMPLETED, outputs=outputs)
        return Outcome(JobStatus.CANCELLED)

    async def request_cancel(self) -> None:
        self._cancel_requested = True
        if self._scope is not None:
            self._scope.cancel()
