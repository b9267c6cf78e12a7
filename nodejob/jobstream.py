"""The WebSocket side of the client: `JobStream`, opened with `open_job_stream`.

`open_job_stream` follows any number of jobs over one WebSocket, deduplicates by seq
(`SeqTracker`), and (with ``reconnect=True``) resumes across connection losses and server
restarts so callers see each message exactly once, in order. Import it from
``nodejob.client``, which re-exports it.

This module imports only the standard library, trio, trio_websocket, nodejob.protocol and
nodejob.connection: never nodejob.client (it imports this module), httpx, the server, the
store, apsw or quart.
"""

from __future__ import annotations

import contextlib
import math
import urllib.parse
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Self

import trio
import trio_websocket

from nodejob import protocol
from nodejob.connection import (
    CLOSE_TIMEOUT_S,
    ClientError,
    ConnectError,
    failure_reason,
    open_websocket,
    rejection_error,
    single_exception,
    ws_url,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

RECONNECT_INITIAL_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
PERMANENT_REJECTIONS: Final = frozenset({401, 403, 404})
"""Handshake refusals that end a stream instead of being retried."""

JsonObject = dict[str, Any]


class SeqTracker:
    """The highest seq seen per job; decides which stream messages are new.

    A message is new when its seq is above the last seen for its job; a ``gap`` is new when
    its ``to_seq`` is (it then just advances the cursor). Everything else is a duplicate,
    which is what makes a resumed stream exactly-once.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def last(self, job_id: str) -> int:
        return self._last.get(job_id, 0)

    def reset(self, job_id: str, after_seq: int) -> None:
        """Restart the job's cursor (a new ``reconnect_job`` replaces the old one)."""
        self._last[job_id] = after_seq

    def accept(self, message: JsonObject) -> bool:
        """True (and advance) if ``message`` is new; False for a duplicate or a non-message."""
        seq = message.get("seq")
        job_id = message.get("job_id")
        if not isinstance(seq, int) or not isinstance(job_id, str):
            return False
        if seq <= self._last.get(job_id, 0):
            return False
        self._last[job_id] = seq
        return True


@dataclass(slots=True, eq=False)
class _Pending:
    """A command sent (or to be sent) and waiting for its reply."""

    command: str
    data: JsonObject
    internal: bool = False  # a re-issued reconnect_job nobody awaits
    done: trio.Event = field(default_factory=trio.Event)
    reply: JsonObject | None = None
    error: ClientError | None = None

    def resolve(self, reply: JsonObject | None, error: ClientError | None = None) -> None:
        self.reply, self.error = reply, error
        self.done.set()


class JobStream:
    """One WebSocket connection to ``/ws`` following any number of jobs.

    Create it with `open_job_stream`. Commands may be awaited from any task; their replies
    are matched to them in order. Stream messages are read with `messages` by ONE consumer;
    they are buffered without bound so that an unread stream can never block a command's
    reply: the consumer must keep reading.

    Cancellation: cancelling a command's caller abandons the wait, not the command: it has
    been sent, its reply is still consumed in order, and a cancelled `run_job`'s job still
    starts and is followed (its id is appended to `started`).
    """

    def __init__(self, url: str, token: str | None, *, reconnect: bool) -> None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https", "ws", "wss"):
            raise ClientError(None, f"invalid server URL (want http://HOST:PORT): {url}")
        query = f"?token={urllib.parse.quote(token, safe='')}" if token else ""
        self.url = ws_url(url) + query
        self._display_url = url
        self._reconnect = reconnect
        self.tracker = SeqTracker()
        self.started: list[str] = []
        """Ids of the jobs started here, recorded as the reply arrives (before `run_job`
        returns), so that an interrupt at any moment still knows them."""
        self.state = "connecting"
        """``connecting``, ``connected``, ``reconnecting`` or ``closed`` (for status lines)."""
        self.reconnects = 0
        """How many times the connection was lost and re-established."""
        self._ws: Any = None
        self._send_lock = trio.Lock()
        self._pending: list[_Pending] = []
        self._followed: set[str] = set()
        self._unsubscribed: set[str] = set()
        self._send, self._receive = trio.open_memory_channel[JsonObject](math.inf)
        self._failure: ClientError | None = None
        self._closing = False
        self._interrupt: trio.CancelScope | None = None  # what _close cancels: read or backoff
        self._done = trio.Event()

    # -- commands ---------------------------------------------------------------------------

    async def run_job(self, data: JsonObject) -> str:
        """Start a job; returns its id once the server accepted it. Then follows the job.

        Raises `ClientError` (the server's message) on an error reply, and if the connection
        drops before the reply (the job may or may not have started).
        """
        reply = await self._command(protocol.Command.RUN_JOB, data)
        return str(reply["job_id"])

    async def reconnect_job(self, job_id: str, after_seq: int = 0) -> None:
        """Follow ``job_id`` from ``after_seq``: what was missed, then live.

        Replaces this connection's cursor for the job: messages after ``after_seq`` are
        delivered again even if seen before.
        """
        self._followed.add(job_id)
        self._unsubscribed.discard(job_id)
        data = {"job_id": job_id, "after_seq": after_seq}
        await self._command(protocol.Command.RECONNECT_JOB, data)

    async def cancel_job(self, job_id: str) -> None:
        """Ask the server to cancel; the terminal job_update follows on the stream."""
        await self._command(protocol.Command.CANCEL_JOB, {"job_id": job_id})

    async def unsubscribe(self, job_id: str) -> None:
        """Stop streaming ``job_id`` on this connection (the job runs on)."""
        self._followed.discard(job_id)
        self._unsubscribed.add(job_id)
        await self._command(protocol.Command.UNSUBSCRIBE, {"job_id": job_id})

    def last_seq(self, job_id: str) -> int:
        """The highest seq of ``job_id`` delivered by `messages` (0 if none)."""
        return self.tracker.last(job_id)

    def messages(self) -> AsyncIterator[JsonObject]:
        """Stream messages (those with a ``seq``) of every followed job, in arrival order.

        Ends when the stream is closed; raises `ClientError` if the connection is lost for
        good (``reconnect=False``, or the server refused us on reconnect). A plain iterator,
        not a generator: breaking out of ``async for`` leaves nothing to finalize.
        """
        return _Messages(self)

    async def _command(self, command: str, data: JsonObject) -> JsonObject:
        pending = _Pending(command, data)
        await self._submit(pending)
        await pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.reply is not None
        return pending.reply

    async def _submit(self, pending: _Pending) -> None:
        if self._failure is not None:
            raise self._failure
        async with self._send_lock:  # keeps _pending in the order the server receives
            self._pending.append(pending)
            if self._ws is not None:
                frame = protocol.dumps({"command": pending.command, "data": pending.data})
                # Shielded: a frame cut off by a cancellation would corrupt the connection.
                # On failure the connection task resends it, or fails it for good.
                with (
                    trio.CancelScope(shield=True),
                    contextlib.suppress(trio_websocket.ConnectionClosed),
                ):
                    await self._ws.send_message(frame)

    # -- connection -------------------------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            delay = RECONNECT_INITIAL_S
            started = False
            while True:
                try:
                    async with open_websocket(self.url, self._display_url) as ws:
                        if started:
                            await self._resume(ws)
                            self.reconnects += 1
                        else:
                            self._ws = ws
                            started = True
                            task_status.started()
                        self.state = "connected"
                        delay = RECONNECT_INITIAL_S
                        # Leaving this block (also when _close cancels it) closes the socket
                        # gracefully: the server then sees code 1000, not a dropped connection.
                        with self._interruptible():
                            await self._read(ws)
                except trio_websocket.ConnectionRejected as exc:
                    error = rejection_error(exc)
                    if not started:
                        raise error from None
                    if error.status in PERMANENT_REJECTIONS:
                        self._fail(error)  # a refused token will not get better by retrying
                        return
                except (ConnectError, trio_websocket.HandshakeError) as exc:
                    if not started:
                        if isinstance(exc, ConnectError):
                            raise
                        raise ConnectError(self._display_url, failure_reason(exc)) from None
                except trio_websocket.ConnectionClosed as exc:
                    code = exc.reason.code if exc.reason is not None else None
                    if code == 1009:
                        self._fail(ClientError(None, "a server message exceeded the size limit"))
                        return
                finally:
                    self._ws = None
                if self._closing:
                    return
                if not self._reconnect:
                    self._fail(ConnectError(self._display_url, "connection lost"))
                    return
                self.state = "reconnecting"
                with self._interruptible():
                    await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
        finally:
            self._done.set()

    async def _resume(self, ws: Any) -> None:
        """Resend what was unanswered and re-follow every job that has not ended."""
        async with self._send_lock:
            resend: list[_Pending] = []
            for pending in self._pending:
                if pending.command == protocol.Command.RUN_JOB:
                    pending.resolve(
                        None,
                        ClientError(None, "connection lost before the server answered run_job"),
                    )
                elif not pending.internal:
                    resend.append(pending)
            covered = {
                p.data.get("job_id") for p in resend if p.command == protocol.Command.RECONNECT_JOB
            }
            for job_id in sorted(self._followed - covered):
                data = {"job_id": job_id, "after_seq": self.tracker.last(job_id)}
                resend.append(_Pending(protocol.Command.RECONNECT_JOB, data, internal=True))
            self._pending = resend
            for pending in resend:
                await ws.send_message(
                    protocol.dumps({"command": pending.command, "data": pending.data})
                )
            self._ws = ws

    async def _read(self, ws: Any) -> None:
        while True:
            text = await ws.get_message()
            try:
                message = protocol.loads(text)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if "seq" in message:
                self._deliver(message)
            else:
                self._on_reply(message)

    def _deliver(self, message: JsonObject) -> None:
        """Pass a stream message on unless it is a duplicate or its job was unsubscribed."""
        job_id = message.get("job_id")
        if job_id in self._unsubscribed or not self.tracker.accept(message):
            return
        if protocol.is_terminal_update(message):
            self._followed.discard(str(job_id))
        self._send.send_nowait(message)

    def _on_reply(self, reply: JsonObject) -> None:
        if reply.get("type") == "error" and reply.get("command") is None:
            # Not an answer: our commands are well-formed, so the server names them in its
            # errors. An unsolicited error (a server-side follower failing) must not be
            # taken for the answer to a pending command.
            return
        if not self._pending:
            return  # nobody asked: nothing to match it to
        pending = self._pending.pop(0)
        if reply.get("type") == "error":
            message = str(reply.get("message") or "error")
            if pending.internal:
                self._fail(ClientError(None, message))
            pending.resolve(None, ClientError(None, message))
            return
        if pending.command == protocol.Command.RUN_JOB and "job_id" in reply:
            # Followed from the reply on, before any of its messages can be read.
            job_id = str(reply["job_id"])
            self.started.append(job_id)
            self._unsubscribed.discard(job_id)
            self._followed.add(job_id)
        elif pending.command == protocol.Command.RECONNECT_JOB:
            # The server answers in order: all later messages come from the new cursor.
            self.tracker.reset(str(pending.data["job_id"]), int(pending.data["after_seq"]))
        pending.resolve(reply)

    def _fail(self, error: ClientError) -> None:
        if self._failure is None:
            self._failure = error
        for pending in self._pending:
            pending.resolve(None, error)
        self._pending.clear()
        self.state = "closed"
        self._send.close()

    def _interruptible(self) -> trio.CancelScope:
        self._interrupt = trio.CancelScope()
        if self._closing:
            self._interrupt.cancel()
        return self._interrupt

    async def aclose(self) -> None:
        """Close the connection (code 1000) and end `messages`; jobs are not affected.

        `open_job_stream` does this on exit; call it to stop early (e.g. on Ctrl-C) while
        the reader can still complete the close handshake. Bounded by about 3 s.
        """
        await self._close()

    async def _close(self) -> None:
        """Stop the connection task and let it close the socket; bounded in time."""
        self._closing = True
        if self._interrupt is not None:
            self._interrupt.cancel()
        with trio.move_on_after(CLOSE_TIMEOUT_S + 1):
            await self._done.wait()
        self.state = "closed"
        self._send.close()


class _Messages:
    """The iterator of `JobStream.messages`."""

    def __init__(self, stream: JobStream) -> None:
        self._stream = stream

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> JsonObject:
        try:
            return await self._stream._receive.receive()
        except trio.EndOfChannel:
            if self._stream._failure is not None:
                raise self._stream._failure from None
            raise StopAsyncIteration from None


@asynccontextmanager
async def open_job_stream(
    url: str, token: str | None, *, reconnect: bool = False
) -> AsyncIterator[JobStream]:
    """Connect a `JobStream` to the server at ``url`` (an http(s) URL); close it on exit.

    The token travels as ``?token=``. Raises `ConnectError` if the first connection fails
    and `ClientError` (status 401) if the server refuses the token. With ``reconnect=True``
    a lost connection is re-opened with backoff (0.1 s doubling to 5 s, forever) and every
    followed job that has not ended is resumed after its last seen seq.

    Resource handling: owns a nursery running the reader task; leaving the block closes the
    WebSocket (code 1000), which never affects a job. Exceptions from the body propagate
    unwrapped (not as an ExceptionGroup).
    """
    stream = JobStream(url, token, reconnect=reconnect)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(stream._run)
            try:
                yield stream
            finally:
                with trio.CancelScope(shield=True):
                    await stream._close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise single_exception(group) from None
