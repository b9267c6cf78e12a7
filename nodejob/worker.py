"""``nodejob worker``: run one job's graph out of process and print its messages as JSON lines.

The subprocess and docker executions (and, later, Ray) start this. It reads a request
(``{"job_id", "first_seq", "graph", "params"}``) from a file or from stdin, runs the graph and
writes every message to stdout as one JSON line carrying ``job_id`` and ``seq`` (first_seq,
first_seq + 1, ...). The last line is the terminal ``job_update`` (completed / failed /
cancelled) — the server turns it into the job's outcome — and the exit status follows it:
0 completed, 1 failed, 3 cancelled, 2 for a request it cannot read (then nothing is printed).
SIGTERM (or SIGINT) cancels the graph gracefully: running nodes report ``cancelled``, then the
terminal ``cancelled`` line.

stdout is the protocol channel and nothing else writes to it: the worker keeps the stream for
itself and points file descriptor 1 at stderr, so a node's stray ``print`` lands in stderr
instead of corrupting the stream. Lines are written in batches, whole lines at a time.

A full disk does not end the job: the spool file lives under NODEJOB_HOME, on the disk that the
server's database also needs, so when one cannot be written the other cannot either, and the
server holds its jobs back until space returns (docs/guarantees.md, "Storage faults"). The
worker does the same: a write refused with ENOSPC (or EDQUOT) keeps the bytes not yet written
and is retried, backing off up to SPACE_RETRY_MAX_S, while emitting nodes wait past HIGH_WATER.
A short write never leaves half a line behind for good (the retry continues from the exact
byte), so the server's reader, which holds an unfinished last line back, sees every line
whole. A worker waiting for space can still be stopped: SIGTERM cancels its graph, and the
server's SIGKILL after the grace period ends it even while it waits to write its last line.

``--tee PATH`` also appends every line to PATH, a copy of the stream that outlives a transport
that may drop its end (docker: an engine that is down when a container exits loses what the
container wrote meanwhile; the container appends to a spool file on the host, which the server
reads to top the container's log up). The copy is written before the stream, so it holds at
least what the stream got, and it must never cost the stream: the first write it refuses (full
disk, EIO, anything) ends the copy — said once on stderr — and the stream goes on. No retry
here: a file that lost a line is of no use as a copy, and the stream must not wait for it.

``--status-file PATH`` makes the started process a small supervisor: it forks the actual
worker, ignores SIGTERM/SIGINT/SIGHUP, waits for it and records its exit (``{"pid",
"returncode"}``, negative for a signal, as in subprocess) in PATH before exiting with the
same status. That is how a server that restarted — and so is not the worker's parent any
more — still learns that a worker was, say, killed by the OOM killer.

Imports only the stdlib, nodejob.protocol and nodejob.workflow (which import trio): it starts
fast and fits in the worker bundle. Never apsw, quart, httpx, docker or the server.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import stat
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any, Final, NoReturn

import trio

from nodejob.protocol import (
    EXIT_BY_STATUS,
    EXIT_USAGE,
    JobStatus,
    MessageTooLarge,
    MessageType,
    encode_message,
)
from nodejob.workflow import GraphError, NodeFailed, run_graph, validate_graph

if TYPE_CHECKING:
    from collections.abc import Sequence

HIGH_WATER: Final = 10_000
"""Lines waiting to be written above which emitting nodes wait (``drain``)."""
NO_SPACE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})
SPACE_RETRY_MIN_S: Final = 0.01
SPACE_RETRY_MAX_S: Final = 0.5
"""A spool write refused for want of space is retried after a delay doubling between these:
the worker goes on at most this long after space returns."""
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
SUPERVISOR_IGNORES: Final = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class RequestError(ValueError):
    """The request cannot be read or is malformed; the message says why."""


def parse_request(data: bytes | str) -> dict[str, Any]:
    """Decode and check a worker request; raises RequestError naming the problem."""
    try:
        request = json.loads(data)
    except ValueError as exc:
        raise RequestError(f"the request is not JSON: {exc}") from None
    if not isinstance(request, dict):
        raise RequestError("the request must be a JSON object")
    job_id, first_seq = request.get("job_id"), request.get("first_seq")
    if not isinstance(job_id, str) or not job_id:
        raise RequestError("the request needs a job_id (a string)")
    if not isinstance(first_seq, int) or isinstance(first_seq, bool) or first_seq < 1:
        raise RequestError("the request needs a first_seq (an integer >= 1)")
    if not isinstance(request.get("graph", {}), dict):
        raise RequestError("graph must be an object")
    if not isinstance(request.get("params", {}), dict):
        raise RequestError("params must be an object")
    return request


def main(argv: Sequence[str] | None = None) -> int:
    """Run one job as ``nodejob worker`` does.

    Returns the exit status only for a request it refuses (2). Once a request has run it
    ends the process with ``os._exit`` after flushing its streams: the interpreter's teardown
    with trio loaded costs 20-60 ms, and the server waits for the worker's exit before it
    reports the job's end.
    """
    parser = argparse.ArgumentParser(prog="nodejob worker", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--request", default="-", metavar="PATH", help="the request file; - for stdin (default)"
    )
    parser.add_argument(
        "--status-file", metavar="PATH", help="supervise: record the worker's exit status here"
    )
    parser.add_argument(
        "--tee", metavar="PATH", help="also append the stream to PATH (best effort: see above)"
    )
    args = parser.parse_args(argv)
    try:
        if args.request == "-":
            raw = sys.stdin.buffer.read()
        else:
            with open(args.request, "rb") as file:
                raw = file.read()
        if not raw.strip():
            raise RequestError("no request given (empty input)")
        request = parse_request(raw)
    except (OSError, RequestError) as exc:
        print(f"nodejob worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.status_file is not None:
        code = _fork_supervised(args.status_file)
        if code is not None:
            _exit(code)
    _exit(run_request(request, tee=args.tee))


def _fork_supervised(status_file: str) -> int | None:
    """Fork: the parent waits and records the child's exit; the child returns None and works.

    Forked before trio runs, while the process has one thread.
    """
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in SUPERVISOR_IGNORES}
    pid = os.fork()
    if pid == 0:
        for signum in SUPERVISOR_IGNORES:
            signal.signal(signum, previous[signum])
        return None
    sys.stdin.close()
    _, status = os.waitpid(pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    temp = f"{status_file}.tmp"
    try:
        with open(temp, "w", encoding="utf-8") as file:
            json.dump({"pid": pid, "returncode": returncode}, file)
        os.replace(temp, status_file)
    except OSError:
        # No space (or no directory any more): the record is lost, not the exit status. A
        # traceback here would make the supervisor exit 1, and the server, its parent, would
        # report that instead of how the worker really ended.
        with contextlib.suppress(OSError):
            os.unlink(temp)
    return returncode if returncode >= 0 else 128 - returncode


def _exit(code: int) -> NoReturn:
    # Both point at stderr.log, which a full disk may refuse: the exit status matters more.
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    with contextlib.suppress(OSError):
        sys.stderr.flush()
    os._exit(code)


def run_request(request: dict[str, Any], *, tee: str | None = None) -> int:
    """Run a checked request (see parse_request), writing its stream to stdout (and a copy to
    the file ``tee``, best effort); exit status."""
    out = os.dup(sys.stdout.fileno())  # the protocol stream; not inherited by node processes
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    writer = LineWriter(out, request["job_id"], request["first_seq"], tee=Tee(tee))
    try:
        terminal = trio.run(_run, request, writer)
    finally:
        for signum in STOP_SIGNALS:  # the graph has ended: nothing may cut off the last line
            signal.signal(signum, signal.SIG_IGN)
        writer.flush_now()
    try:
        writer.write_line(terminal)
    except MessageTooLarge as exc:
        # Each output fitted in its output_update, but not all of them together: the job
        # fails, worded as the manager words it for an in-process job.
        terminal = {
            "type": MessageType.JOB_UPDATE.value,
            "status": JobStatus.FAILED.value,
            "error": f"the job's outputs do not fit in its last message: {exc}",
        }
        writer.write_line(terminal)
    writer.close()
    return EXIT_BY_STATUS[JobStatus(terminal["status"])]


async def _run(request: dict[str, Any], writer: LineWriter) -> dict[str, Any]:
    terminal: dict[str, Any] = {"type": MessageType.JOB_UPDATE.value}
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            work = trio.CancelScope()
            nursery.start_soon(_cancel_on_signal, signals, work)
            with work:
                try:
                    graph = validate_graph(request.get("graph") or {})
                    outputs = await run_graph(graph, request.get("params") or {}, writer)
                except (NodeFailed, GraphError) as exc:
                    terminal.update(status=JobStatus.FAILED.value, error=str(exc))
                except Exception as exc:
                    with contextlib.suppress(OSError):  # stderr.log may be on a full disk
                        traceback.print_exc()
                    terminal.update(
                        status=JobStatus.FAILED.value,
                        error=f"internal error in the worker: {exc!r}",
                    )
                else:
                    terminal.update(status=JobStatus.COMPLETED.value, result={"outputs": outputs})
            if "status" not in terminal:
                terminal["status"] = JobStatus.CANCELLED.value
            nursery.cancel_scope.cancel()  # the caller writes what is still queued
    return terminal


async def _cancel_on_signal(signals: Any, work: trio.CancelScope) -> None:
    async for _ in signals:
        work.cancel()


class LineWriter:
    """The worker's Emitter: numbers messages and writes them to ``fd`` as JSON lines.

    ``emit`` encodes at once (so a value that is not JSON fails in the node that sent it) and
    queues the line; the ``run`` task writes whatever is queued in one go, so a burst of
    messages costs one write. A pipe (docker's stdout) is written through a thread, so a slow
    reader blocks the writes and, past HIGH_WATER, the emitting nodes, never the event loop.
    A file (the subprocess spool) is written inline; when its disk is full the writer keeps
    the bytes it could not write and retries (see the module docstring), so that the file
    only ever grows by the stream's exact bytes: no line is lost, doubled or cut for good.
    A ``tee`` gets each batch first, exactly once (``Tee``).
    """

    def __init__(self, fd: int, job_id: str, first_seq: int, *, tee: Tee | None = None) -> None:
        self._fd = fd
        self._tee = tee or Tee(None)
        self._job_id = job_id
        self._seq = first_seq
        self._pending: list[str] = []
        self._unwritten = memoryview(b"")
        """Bytes taken from ``_pending`` that the disk has not taken yet (file only)."""
        self._wakeup = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        self._is_file = stat.S_ISREG(os.fstat(fd).st_mode)

    def emit(self, message: dict[str, Any]) -> None:
        self._pending.append(self._encode(message))
        self._wakeup.set()
        if self._idle.is_set():
            self._idle = trio.Event()

    def _encode(self, message: dict[str, Any]) -> str:
        """The message's line, with the next seq; MessageTooLarge past MAX_MESSAGE_BYTES (as
        in the server's log: the node that emitted it fails, and no seq is used up)."""
        full = {"type": message["type"], "job_id": self._job_id, "seq": self._seq}
        full.update(message)
        full["job_id"], full["seq"] = self._job_id, self._seq  # a node cannot override them
        line = encode_message(full) + "\n"
        self._seq += 1
        return line

    async def drain(self) -> None:
        while len(self._pending) > HIGH_WATER:
            await self._idle.wait()

    async def run(self) -> None:
        """Write queued lines until cancelled (then ``flush_now`` writes the rest).

        Cancellation: at any point, including while it waits for disk space; whatever is
        not written yet stays queued (in order) for ``flush_now``.
        """
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._pending or self._unwritten:
                if self._is_file:
                    delay = SPACE_RETRY_MIN_S
                    while not self._write_file():
                        await trio.sleep(delay)
                        delay = min(delay * 2, SPACE_RETRY_MAX_S)
                    continue
                count = len(self._pending)
                data = "".join(self._pending[:count]).encode()
                # A cancel can strike before the thread starts: forget the lines only once
                # they are written, so that flush_now writes them otherwise.
                await trio.to_thread.run_sync(self._write_pipe, data)
                del self._pending[:count]
            self._idle.set()

    def _write_file(self) -> bool:
        """Write the unwritten bytes, else everything queued, to the file as far as the disk
        takes them. True once they are all written; False if the disk is full (the rest is
        kept, to go first at the next try)."""
        if not self._unwritten:
            data = "".join(self._pending).encode()
            self._pending.clear()
            self._tee.write(data)
            self._unwritten = memoryview(data)
        while self._unwritten:
            try:
                written = os.write(self._fd, self._unwritten)
            except OSError as exc:
                if exc.errno not in NO_SPACE_ERRNOS:
                    raise
                return False
            self._unwritten = self._unwritten[written:]
        return True

    def flush_now(self) -> None:
        """Write everything queued, blocking; to a file on a full disk, until space returns
        (only SIGKILL ends the wait: the caller ignores SIGTERM while its last lines go)."""
        if not self._is_file:
            if self._pending:
                data = "".join(self._pending).encode()
                self._pending.clear()
                self._write_pipe(data)
            return
        delay = SPACE_RETRY_MIN_S
        while self._pending or self._unwritten:
            if not self._write_file():
                time.sleep(delay)
                delay = min(delay * 2, SPACE_RETRY_MAX_S)

    def write_line(self, message: dict[str, Any]) -> None:
        """Write ``message`` with the next seq at once, after anything queued (the last line)."""
        self._pending.append(self._encode(message))
        self.flush_now()

    def close(self) -> None:
        """Close the stream and the tee (everything is written: see ``flush_now``)."""
        os.close(self._fd)
        self._tee.close()

    def _write_pipe(self, data: bytes) -> None:
        """(In a thread, or at the end.) ``data`` to the tee, then all of it to the stream."""
        self._tee.write(data)
        _write_all(self._fd, data)


class Tee:
    """A best-effort copy of the stream, appended to the file ``path`` (none if None): the
    first failure, to open or to write, ends it for good and is said once on stderr. The file
    then holds a prefix of the stream (its last line maybe cut): a stream that ended early."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._fd: int | None = None
        if path is not None:
            try:
                self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            except OSError as exc:
                self._give_up(f"cannot copy the stream to {path}: {exc}")

    def write(self, data: bytes) -> None:
        if self._fd is not None:
            try:
                _write_all(self._fd, data)
            except OSError as exc:
                self._give_up(f"stopped copying the stream to {self.path}: {exc}")

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _give_up(self, what: str) -> None:
        self.close()
        with contextlib.suppress(OSError):  # stderr may be on the full disk too
            print(f"nodejob worker: {what}; the stream goes on", file=sys.stderr, flush=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


if __name__ == "__main__":
    raise SystemExit(main())
