"""Reading a worker's stream: byte chunks in, log messages and the job's Outcome out.

Every out-of-process execution runs ``nodejob worker``, which prints one JSON message per line,
each carrying ``job_id`` and ``seq``, and ends with the terminal ``job_update``. The lines reach
the server in byte chunks that may split a line anywhere — a spool file read at its end
(subprocess), a container's log (docker), a Ray job's log tail — and after a server restart the
same stream is read again from its start. This module is the part they share:

- ``LineAssembler`` turns chunks into whole lines, holding back an unfinished last line.
- ``StreamIngester`` hands each message to ``MessageLog.ingest`` (idempotent by seq, so lines
  the log already has are skipped: re-reading a stream from its start is how re-adoption
  works) and intercepts the terminal ``job_update``: executions never log it (the manager
  appends it, with the same seq, from the Outcome they return). It skips what is not a
  message of this job (a line that is not JSON, a truncated last line, a stray ``print``) with
  a logged warning, and raises ProtocolError for a stream that lost messages (a seq jump).

Typical use in an execution (``run`` and ``resume`` alike)::

    await store.set_handle(job_id, handle)   # before the worker can produce: re-adoption key
    ingester = StreamIngester(self.log, self.job.id, source=f"ray job {submission_id}")
    async for chunk in chunks:               # whatever the transport yields, from its start
        ingester.feed(chunk)                 # may raise ProtocolError: stop the work, fail
        await self.log.drain()               # backpressure for very chatty jobs
        if ingester.outcome is not None:     # the worker's terminal line arrived
            break
    # (a transport that reconnects and replays from the first byte: ingester.restart() first)
    ingester.end()                           # the stream ended: warn about a partial line
    outcome = ingester.outcome or Outcome(JobStatus.FAILED, error=describe_exit(code))
    await record_outcome(self.log, self.store, job_id, handle, outcome)
    ...                                      # now delete the stream; then return outcome

and at the top of ``resume``: ``if (done := recorded_outcome(handle)) is not None: return
done`` (after finishing the clean-up). The worker's request is ``{"job_id", "first_seq":
log.last_seq(job_id) + 1, "graph", "params"}`` (see nodejob/worker.py); ``first_seq`` is taken
after the manager's ``running`` update, and that update should be committed
(``log.wait_committed``) before the worker is started.

Must not import apsw, docker or the server; the log is used only through ``ingest``,
``last_seq`` and ``wait_committed``.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
from typing import TYPE_CHECKING, Any, Final

import trio

from nodejob.executions.base import Outcome
from nodejob.protocol import (
    MAX_MESSAGE_BYTES,
    JobStatus,
    MessageType,
    ProtocolError,
    is_terminal_update,
)
from nodejob.store import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from nodejob.log import MessageLog
    from nodejob.store import Store

logger = logging.getLogger(__name__)

STORE_RETRY_MIN_S: Final = 0.05
STORE_RETRY_MAX_S: Final = 2.0
"""A job-row write the database refused is retried after a delay doubling between these."""
MAX_LINE_BYTES: Final = MAX_MESSAGE_BYTES + 1
"""A line longer than this (one message and its newline) is not a worker's message: no
worker writes one, so the stream is given up as corrupt."""
WARN_SKIPPED: Final = 5
"""Skipped lines logged one by one per stream; after that only every 1000th."""

__all__ = [
    "LineAssembler",
    "StreamIngester",
    "describe_exit",
    "outcome_of",
    "record_outcome",
    "recorded_outcome",
    "until_stored",
]


class LineAssembler:
    """Whole lines from byte chunks that may split a line anywhere (including inside UTF-8).

    ``feed`` returns the lines completed by a chunk, without their ``\\n``; an unfinished last
    line is kept until a later chunk ends it. ``end`` hands back what is left when the stream
    ends (a line its writer never finished, e.g. because it was killed mid-write).
    """

    __slots__ = ("_partial",)

    def __init__(self) -> None:
        self._partial = bytearray()

    def feed(self, chunk: bytes) -> list[bytes]:
        """The lines that ``chunk`` completes. Raises ProtocolError past MAX_LINE_BYTES."""
        if b"\n" not in chunk:
            self._partial += chunk
            self._check_length()
            return []
        lines = chunk.split(b"\n")
        if self._partial:
            self._partial += lines[0]
            lines[0] = bytes(self._partial)
        self._partial = bytearray(lines.pop())
        self._check_length()
        return lines

    @property
    def pending(self) -> int:
        """Bytes of the unfinished line held back."""
        return len(self._partial)

    def end(self) -> bytes:
        """The stream ended: return the unfinished line (b"" if none) and forget it."""
        rest, self._partial = bytes(self._partial), bytearray()
        return rest

    def _check_length(self) -> None:
        if len(self._partial) > MAX_LINE_BYTES:
            raise ProtocolError(f"a line longer than {MAX_LINE_BYTES} bytes: not a job stream")


class StreamIngester:
    """One job's worker stream into the message log, and its terminal line into an Outcome.

    ``source`` names the stream in warnings (``"spool /path"``, ``"container 1a2b3c"``).
    Once ``outcome`` is set (the terminal line arrived) later lines are ignored.
    """

    def __init__(self, log: MessageLog, job_id: str, *, source: str = "worker") -> None:
        self.log = log
        self.job_id = job_id
        self.source = source
        self.outcome: Outcome | None = None
        self.skipped = 0
        """Lines skipped as not being messages of this job."""
        self._lines = LineAssembler()

    @property
    def last_seq(self) -> int:
        """The job's last seq in the log: everything up to it is ingested (or was there)."""
        return self.log.last_seq(self.job_id)

    def feed(self, chunk: bytes) -> Outcome | None:
        """Ingest the lines ``chunk`` completes; returns ``outcome`` (None until the end).

        Raises ProtocolError if the stream lost messages (a seq past the next one) or is not
        a job stream at all; the execution should then stop the work and fail the job.
        """
        for line in self._lines.feed(chunk):
            if self.outcome is not None:
                break
            self.feed_line(line)
        return self.outcome

    def feed_line(self, line: bytes | str) -> Outcome | None:
        """Ingest one whole line (without its newline); see ``feed``."""
        if self.outcome is not None:
            return self.outcome
        message = self._parse(line)
        if message is None:
            return None
        if is_terminal_update(message):
            expected = self.last_seq + 1
            if message["seq"] != expected:
                raise ProtocolError(
                    f"job {self.job_id}: expected seq {expected}, got the terminal "
                    f"job_update with seq {message['seq']}"
                )
            self.outcome = outcome_of(message)
            return self.outcome
        kind = message.get("type")
        if kind in (MessageType.GAP, MessageType.JOB_UPDATE):  # the server writes these
            raise ProtocolError(f"job {self.job_id}: a worker may not send {kind}: {message}")
        self.log.ingest(self.job_id, message)
        return None

    def restart(self) -> None:
        """The stream will be read again from its start (a new connection to a log that
        replays from its first byte): forget an unfinished line, the re-read brings it whole."""
        self._lines.end()

    def end(self) -> Outcome | None:
        """The stream ended. A last line left unfinished is skipped with a warning."""
        rest = self._lines.end()
        if rest.strip() and self.outcome is None:
            self._skip(rest, "an unfinished last line (the writer stopped mid-line)")
        return self.outcome

    def _parse(self, line: bytes | str) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            self._skip(line, "not JSON")
            return None
        if not isinstance(message, dict):
            self._skip(line, "not a JSON object")
            return None
        seq = message.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            self._skip(line, "no valid seq")
            return None
        if message.get("job_id") != self.job_id:
            self._skip(line, f"job_id is not {self.job_id}")
            return None
        return message

    def _skip(self, line: bytes | str, reason: str) -> None:
        self.skipped += 1
        if self.skipped <= WARN_SKIPPED or self.skipped % 1000 == 0:
            text = line if isinstance(line, str) else line.decode("utf-8", "replace")
            logger.warning(
                "job %s: %s: skipped a line (%s; %d so far): %.200s",
                self.job_id,
                self.source,
                reason,
                self.skipped,
                text,
            )


def outcome_of(message: dict[str, Any]) -> Outcome:
    """The Outcome that a terminal ``job_update`` states."""
    status = JobStatus(message["status"])
    if status is JobStatus.FAILED:
        return Outcome(status, error=str(message.get("error") or "failed"))
    if status is JobStatus.COMPLETED:
        result = message.get("result")
        outputs = result.get("outputs") if isinstance(result, dict) else None
        return Outcome(status, outputs=outputs if isinstance(outputs, dict) else {})
    return Outcome(status)


def describe_exit(returncode: int, detail: str = "") -> str:
    """Why a worker ended without its terminal line: ``worker exited with status 2`` or
    ``worker killed by signal SIGKILL`` (negative ``returncode``, as subprocess has it),
    then ``: detail`` (say, the last line it wrote to stderr) when there is one."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        text = f"worker killed by signal {name}"
    else:
        text = f"worker exited with status {returncode}"
    return f"{text}: {detail}" if detail else text


async def record_outcome(
    log: MessageLog, store: Store, job_id: str, handle: dict[str, Any], outcome: Outcome
) -> None:
    """Once the work has ended: wait until the job's ingested messages are committed, then
    record ``outcome`` in the job's handle (``handle["outcome"]``).

    Call it before deleting the stream (spool file, container, Ray job): from then on a
    restarted server takes the outcome from the handle (``recorded_outcome``) instead of
    re-reading a stream that is gone, even if the manager's terminal job_update was not yet
    committed when the server stopped.
    """
    await log.wait_committed(job_id, log.last_seq(job_id))
    done = {"status": outcome.status.value, "error": outcome.error, "outputs": outcome.outputs}
    handle["outcome"] = done
    await until_stored(job_id, functools.partial(store.set_handle, job_id, handle))


async def until_stored(
    job_id: str, write: Callable[[], Awaitable[None]], *, shield: bool = False
) -> None:
    """Run ``write`` (a write of the job's row: its handle) until the database takes it.

    A database locked by another process or a full disk is a reason to wait, not to fail
    the job: the message log holds the job's messages back meanwhile anyway, and without
    this a completed worker's job, or one launched just as the disk filled, would end
    ``failed`` with an internal error.

    Cancellation: between attempts (the server stopping: the next one takes over). With
    ``shield``, an attempt itself is never cut short, so that a write that happened is
    not followed by a cancellation the caller would take for one that did not.
    """
    delay = STORE_RETRY_MIN_S
    while True:
        try:
            with trio.CancelScope(shield=shield):
                await write()
            return
        except StoreUnavailable as exc:
            logger.warning(
                "job %s: cannot write the job's row now, retrying in %.2f s: %s",
                job_id,
                delay,
                exc.reason,
            )
        await trio.sleep(delay)
        delay = min(delay * 2, STORE_RETRY_MAX_S)


def recorded_outcome(handle: dict[str, Any] | None) -> Outcome | None:
    """The outcome ``record_outcome`` stored in a handle, if any."""
    done = (handle or {}).get("outcome")
    if not isinstance(done, dict):
        return None
    return Outcome(JobStatus(done["status"]), done.get("error"), done.get("outputs"))
