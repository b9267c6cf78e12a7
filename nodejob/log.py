"""MessageLog: per-job sequence numbers, group commit, the bounded ring, and reader cursors.

Every message a job emits passes through here (DESIGN invariants 1-3):

- ``append`` gives it the job's next seq, encodes it once, keeps it in the job's in-memory
  tail and queues it for the writer. It is synchronous and costs microseconds.
- The writer task commits everything queued in one transaction (group commit: while one
  commit runs, the next batch accumulates), together with the job-row changes the batch
  implies, and trims each job's ring. Only then are the messages visible to readers.
- ``follow`` is a cursor: it yields committed messages after the cursor, from the tail if it
  still holds them, else from SQLite, then waits for more. Replay and live are one code path.
  A reader never holds the job up and the server never queues per reader: a slow reader just
  reads later, and if its cursor fell out of the ring it gets a ``gap`` first.

Must not import apsw (the store does the SQL) or anything of the server.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Final

import trio

from nodejob.protocol import (
    TERMINAL,
    JobStatus,
    MessageType,
    ProtocolError,
    dumps,
    encode_message,
    gap_message,
)
from nodejob.store import Batch, Entry, JobRecord, Store, StoreError, StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

logger = logging.getLogger(__name__)

TAIL_MAX: Final = 512
"""Messages per job kept in memory for fast live reads (older ones are read from SQLite).
Small on purpose: it is paid per chatty running job (up to ~130 KB each), and it is dropped once
the job has finished."""
READ_BATCH: Final = 2000
"""Messages a reader takes per step, from memory or from one query."""
HIGH_WATER: Final = 50_000
"""Queued, uncommitted messages above which ``drain`` makes producers wait for the writer."""
RETRY_MAX_S: Final = 2.0
SHUTDOWN_FLUSH_S: Final = 10.0
"""At shutdown, how long the writer keeps retrying a commit the database refuses (disk full,
locked) before it gives up on the uncommitted messages, so that the process can exit. They
were never visible to any reader, so no client holds a seq that is lost."""

__all__ = ["Entry", "JobEmitter", "MessageLog"]


class _JobState:
    """The live part of one job's log."""

    __slots__ = ("changed", "closed", "committed", "done", "job_id", "next_seq", "tail")

    def __init__(self, job_id: str, last_seq: int, *, done: bool = False) -> None:
        self.job_id = job_id
        self.next_seq = last_seq + 1
        self.committed = last_seq
        self.tail: list[Entry] = []
        self.changed = trio.Event()
        self.closed = done  # a terminal job_update was appended: nothing may follow it
        self.done = done  # ... and committed

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class JobEmitter:
    """The ``Emitter`` a job's workflow writes to: appends to that job's log."""

    __slots__ = ("_job_id", "_log")

    def __init__(self, log: MessageLog, job_id: str) -> None:
        self._log = log
        self._job_id = job_id

    def emit(self, message: dict[str, Any]) -> None:
        self._log.append(self._job_id, message)

    async def drain(self) -> None:
        await self._log.drain()


class MessageLog:
    """All jobs' message logs. ``run`` is the writer task; start it in the owner's nursery."""

    def __init__(self, store: Store, ring_size: int) -> None:
        if ring_size < 1:
            raise ValueError("ring_size must be at least 1")
        self._store = store
        self.ring_size = ring_size
        self._tail_cap = min(ring_size, TAIL_MAX)
        self._tail_trim = self._tail_cap + self._tail_cap // 4  # amortised trimming
        self._jobs: dict[str, _JobState] = {}
        self._batch = Batch()
        self._dirty: dict[str, _JobState] = {}
        self._wakeup = trio.Event()
        self._flushed = trio.Event()
        self._messages_total = 0
        self._batches_total = 0
        self._commit_errors_total = 0
        self._failing: str | None = None
        self._finished: list[_JobState] = []
        """Jobs that finished in the last commit: their tails are dropped at the next one."""

    # -- producing ------------------------------------------------------------------------

    def create(self, job: JobRecord) -> None:
        """Register a new job: its row is inserted with the batch that carries its seq 1."""
        self._jobs[job.id] = _JobState(job.id, 0)
        self._batch.new_jobs.append(job)
        self.append(job.id, {"type": MessageType.JOB_UPDATE.value, "status": job.status.value})

    def adopt(self, job: JobRecord) -> None:
        """Track a job that already has a row and messages (recovery after a restart)."""
        if job.id not in self._jobs:
            self._jobs[job.id] = _JobState(job.id, job.last_seq, done=job.is_finished)

    def append(self, job_id: str, message: dict[str, Any]) -> int:
        """Give ``message`` the job's next seq and queue it; returns the seq."""
        state = self._jobs[job_id]
        return self._add(state, state.next_seq, message)

    def ingest(self, job_id: str, message: dict[str, Any]) -> bool:
        """Take a message that already carries its seq (out-of-process jobs).

        Idempotent by seq: a seq already logged is ignored (False). A seq beyond the next one
        means the source lost messages and raises ProtocolError.
        """
        state = self._jobs[job_id]
        seq = message.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ProtocolError(f"message without a valid seq: {str(message)[:200]}")
        if seq < state.next_seq:
            return False
        if seq > state.next_seq:
            raise ProtocolError(f"job {job_id}: expected seq {state.next_seq}, got {seq}")
        if not isinstance(message.get("type"), str):
            raise ProtocolError(f"message without a type: {str(message)[:200]}")
        body = {k: v for k, v in message.items() if k not in ("job_id", "seq")}
        self._add(state, seq, body)
        return True

    def _add(self, state: _JobState, seq: int, message: dict[str, Any]) -> int:
        if state.closed:
            raise RuntimeError(f"job {state.job_id} already ended; message refused: {message}")
        kind = message["type"]
        full = {"type": kind, "job_id": state.job_id, "seq": seq, **message}
        text = encode_message(full)  # may raise MessageTooLarge: nothing is logged then
        state.next_seq = seq + 1
        entry = Entry(seq, kind, text)
        tail = state.tail
        tail.append(entry)
        if len(tail) > self._tail_trim:
            del tail[: len(tail) - self._tail_cap]
        batch = self._batch
        batch.messages.append((state.job_id, seq, kind, text))
        if kind == "job_update":
            self._status_change(state, full, batch)
        self._dirty[state.job_id] = state
        self._wakeup.set()
        return seq

    def _status_change(self, state: _JobState, message: dict[str, Any], batch: Batch) -> None:
        try:
            status = JobStatus(str(message.get("status")))
        except ValueError:
            raise ProtocolError(
                f"job_update with unknown status: {message.get('status')}"
            ) from None
        changes = batch.updates.setdefault(state.job_id, {})
        changes["status"] = status.value
        if status is JobStatus.RUNNING:
            changes["started_at"] = time.time()
        elif status in TERMINAL:
            state.closed = True
            changes["finished_at"] = time.time()
            changes["error"] = message.get("error")
            result = message.get("result")
            changes["result"] = dumps(result) if result is not None else None

    async def drain(self) -> None:
        """Wait while the writer is far behind (backpressure for very chatty jobs)."""
        while len(self._batch.messages) > HIGH_WATER:
            await self._flushed.wait()

    async def wait_committed(self, job_id: str, seq: int) -> None:
        """Return once the job's messages up to ``seq`` are committed."""
        state = self._jobs[job_id]
        while state.committed < seq:
            await state.changed.wait()

    def last_seq(self, job_id: str) -> int:
        """The last seq assigned to a tracked job (committed or not)."""
        return self._jobs[job_id].next_seq - 1

    def forget(self, job_id: str) -> None:
        """Drop the in-memory state of a finished job (its messages stay in SQLite)."""
        state = self._jobs.get(job_id)
        if state is not None and state.done:
            del self._jobs[job_id]

    # -- the writer -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The group-commit writer. Runs until cancelled, then flushes what is queued.

        Cancellation: a commit in progress always completes, and on cancellation the writer
        flushes everything still queued (shielded) before returning, so no message that a
        producer appended is lost in an orderly shutdown.
        """
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                await self._flush()
        finally:
            with trio.CancelScope(shield=True):
                give_up_at = trio.current_time() + SHUTDOWN_FLUSH_S
                while self._batch:
                    if not await self._flush(give_up_at):
                        break

    @property
    def failing(self) -> str | None:
        """Why the last commit failed, while commits are failing (None once one succeeds)."""
        return self._failing

    async def _flush(self, give_up_at: float = math.inf) -> bool:
        """Commit the queued batch, retrying while the database refuses it; False if it was
        given up (only once ``give_up_at`` has passed: at shutdown)."""
        # Tails of jobs that finished in the previous commit: their followers, woken by that
        # commit, have read the end from memory by now (if not, SQLite serves them).
        for finished in self._finished:
            finished.tail = []
        self._finished = []
        batch, dirty = self._batch, self._dirty
        self._batch, self._dirty = Batch(), {}
        self._wakeup = trio.Event()
        committed: dict[str, int] = {}
        for job_id, state in dirty.items():
            last = state.next_seq - 1
            committed[job_id] = last
            batch.updates.setdefault(job_id, {})["last_seq"] = last
            if last > self.ring_size:
                batch.trims[job_id] = last - self.ring_size
        delay = 0.05
        while True:
            try:
                # A commit in progress always completes: cancelling it could lose messages
                # that producers already handed over.
                with trio.CancelScope(shield=True):
                    await self._store.commit_batch(batch)
                break
            except StoreError as exc:
                # The database is locked or full: keep the batch and retry; producers are
                # held back by drain() once the queue passes HIGH_WATER.
                self._commit_errors_total += 1
                self._failing = exc.reason if isinstance(exc, StoreUnavailable) else str(exc)
                if trio.current_time() >= give_up_at:
                    logger.error(
                        "shutting down: %d messages of %d jobs could not be committed and are"
                        " lost (no client saw them): %s",
                        len(batch.messages),
                        len(dirty),
                        exc,
                    )
                    return False
                logger.error("commit failed, retrying in %.2f s: %s", delay, exc)
                try:
                    await trio.sleep(delay)
                except trio.Cancelled:
                    # Shutdown while retrying: the batch goes back to the head of the queue,
                    # where the final (time-bounded) flush in run() picks it up.
                    self._requeue(batch, dirty)
                    raise
                delay = min(delay * 2, RETRY_MAX_S)
        if self._failing is not None:
            logger.warning("commits succeed again (%d messages committed)", len(batch.messages))
            self._failing = None
        self._messages_total += len(batch.messages)
        self._batches_total += 1
        for job_id, state in dirty.items():
            state.committed = committed[job_id]
            if state.closed and state.committed == state.next_seq - 1:
                state.done = True
                # A finished job's stream is complete in SQLite: late readers replay it from
                # there. Keeping its tail would hold up to TAIL_MAX (+25%) messages of every
                # finished job in memory until the registry forgets it (an hour by default).
                # It goes at the next commit, so the followers woken now still read from memory.
                self._finished.append(state)
            state.notify()
        self._flushed.set()
        self._flushed = trio.Event()
        return True

    def _requeue(self, batch: Batch, dirty: dict[str, _JobState]) -> None:
        """Put a batch that could not be committed back in front of what was queued since."""
        queued = self._batch
        batch.new_jobs += queued.new_jobs
        batch.messages += queued.messages
        for job_id, changes in queued.updates.items():
            batch.updates.setdefault(job_id, {}).update(changes)  # the newer ones win
        self._batch = batch
        self._dirty = {**dirty, **self._dirty}
        self._wakeup.set()

    # -- reading --------------------------------------------------------------------------

    async def follow(self, job_id: str, after_seq: int = 0) -> AsyncGenerator[list[Entry], None]:
        """Yield batches of the job's committed messages with seq > ``after_seq``, then live.

        Ends after the terminal job_update (at once for a reader already past it). If the
        cursor fell out of the ring, the first entry is a ``gap``.

        Cancellation: safe at any point; the cursor is the caller's last seen seq.
        """
        cursor = after_seq
        while True:
            state = self._jobs.get(job_id)
            if state is None:
                job = self._store.get_job_sync(job_id)
                if job is None or cursor >= job.last_seq:
                    return
                entries = await self._read_db(job_id, cursor, job.last_seq)
            elif cursor < state.committed:
                entries = self._from_tail(state, cursor) or await self._read_db(
                    job_id, cursor, state.committed
                )
            elif state.done:
                return
            else:
                await state.changed.wait()
                continue
            yield entries
            cursor = entries[-1].seq

    def _from_tail(self, state: _JobState, cursor: int) -> list[Entry]:
        tail = state.tail
        if not tail:
            return []
        first = tail[0].seq
        ring_first = state.committed - self.ring_size + 1
        if cursor + 1 < first or cursor + 1 < ring_first:
            return []
        start = cursor + 1 - first
        end = min(state.committed - first + 1, start + READ_BATCH)
        return tail[start:end]

    async def _read_db(
        self, job_id: str, cursor: int, upto: int, limit: int = READ_BATCH
    ) -> list[Entry]:
        """Up to ``limit`` stored entries after ``cursor`` (none past ``upto``), a gap first
        if the ring no longer holds ``cursor + 1``."""
        rows = await self._store.read_messages(job_id, cursor, min(limit, upto - cursor))
        rows = [row for row in rows if row.seq <= upto]
        first = rows[0].seq if rows else upto + 1
        if first > cursor + 1:
            gap = gap_message(job_id, cursor + 1, first - 1)
            rows.insert(0, Entry(first - 1, MessageType.GAP.value, dumps(gap)))
        return rows

    async def read_page(self, job_id: str, after_seq: int, limit: int) -> tuple[list[Entry], bool]:
        """One page of committed messages after ``after_seq`` (a gap first if needed)."""
        state = self._jobs.get(job_id)
        if state is not None:
            last = state.committed
        else:
            job = self._store.get_job_sync(job_id)
            last = job.last_seq if job is not None else 0
        if after_seq >= last or limit < 1:
            return [], False
        entries = await self._read_db(job_id, after_seq, last, limit)
        return entries, entries[-1].seq < last

    def stats(self) -> dict[str, float]:
        return {
            "messages_committed_total": self._messages_total,
            "commit_batches_total": self._batches_total,
            "commit_errors_total": self._commit_errors_total,
            "messages_pending": len(self._batch.messages),
            "commit_failing": 1.0 if self._failing is not None else 0.0,
            "jobs_tracked": len(self._jobs),
        }
