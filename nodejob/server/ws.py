"""The ``/ws`` command loop: run_job, reconnect_job, cancel_job, unsubscribe.

One Session per connection owns a nursery with three kinds of task: the command loop (reads
frames, answers each command in order), one follower per followed job (a cursor over the
MessageLog, each in its own cancel scope) and one sender, the only task that writes to the
socket. Followers hand whole batches of log entries to the sender through a small bounded
channel and the sender writes the entries' ready-made JSON texts, many frames per socket write
(``install_send_many``), so a message costs no re-encoding and no syscall of its own; a slow
client only holds back its own followers' cursors, never a job.
Closing the connection cancels the nursery and nothing else: jobs run on. This module must not
import apsw or any execution backend.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Final

import trio
from quart import abort, websocket

from nodejob.executions import ExecutionUnavailable
from nodejob.log import Entry
from nodejob.manager import CancelResult, WorkflowNotFound
from nodejob.protocol import (
    MAX_FRAME_BYTES,
    Command,
    ProcessingContext,
    ProtocolError,
    RunJobRequest,
    dumps,
    error_reply,
    loads,
    parse_command,
    require,
)
from nodejob.server.auth import authenticate, bearer_token, origin_allowed
from nodejob.store import StoreError, StoreUnavailable
from nodejob.workflow import GraphError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from quart_trio import QuartTrio

    from nodejob.manager import JobExecutionManager
    from nodejob.server.app import ServerState
    from nodejob.store import User

SEND_QUEUE: Final = 8
"""Replies and message batches waiting for the socket, per connection."""
SEND_MANY: Final = "nodejob.websocket.send_many"
"""ASGI extension (scope) and message key: several text frames written with one socket write."""
SEND_MANY_MAX: Final = 512
"""Messages per write, which bounds one (shielded) socket write to a slow client."""
CLOSE_GOING_AWAY: Final = 1001
CLOSE_TOO_BIG: Final = 1009
AUTH_REQUIRED: Final = "authentication required"

_log = logging.getLogger(__name__)

OPENAPI_OPERATION: Final[dict[str, Any]] = {
    "summary": "WebSocket command channel (upgrade).",
    "description": (
        'Client frames: {"command": NAME, "data": {...}} with NAME one of run_job, '
        "reconnect_job, cancel_job, unsubscribe. Replies carry no seq; job messages always do. "
        'Errors are {"type": "error", "message": ..., "command": NAME|null}. A token may '
        "be sent as a bearer header, as ?token=, or as auth_token in run_job data. Frames over "
        f"{MAX_FRAME_BYTES} bytes close the connection with 1009; shutdown closes with 1001."
    ),
    "operationId": "websocket",
    "security": [{"bearer": []}, {}],
    "parameters": [
        {"name": "token", "in": "query", "required": False, "schema": {"type": "string"}}
    ],
    "responses": {
        "101": {"description": "Switching Protocols: the command channel is open."},
        "400": {"description": "Not a WebSocket upgrade request."},
        "401": {"description": "The handshake carried a bad token."},
        "403": {"description": "The Origin is not this server's nor an allowed one."},
    },
}


def register(app: QuartTrio, state: ServerState) -> None:
    """Add the ``/ws`` route to ``app``."""

    @app.websocket("/ws")
    async def ws() -> None:
        headers = websocket.headers
        origin = headers.get("Origin")
        if origin is not None and not origin_allowed(
            origin,
            scheme=websocket.scheme,
            server=websocket.scope.get("server"),
            host_header=headers.get("Host"),
            extra=state.allowed_origins,
        ):
            abort(403, f"origin not allowed: {origin}")
        token = bearer_token(headers.get("Authorization"))
        if token is None:
            token = websocket.args.get("token")
        user = await authenticate(state.manager.store, token) if token is not None else None
        await websocket.accept()
        await Session(state, user, token).run()


class Session:
    """One WebSocket connection: its identity, followers and sender."""

    def __init__(self, state: ServerState, user: User | None, token: str | None) -> None:
        self.state = state
        self.manager = state.manager
        self.user = user
        self.token = token if user is not None else None
        self.close_code: int | None = None
        self._follows: dict[str, trio.CancelScope] = {}
        self._out: trio.MemorySendChannel[str | list[Entry]]
        self._nursery: trio.Nursery
        self._handlers: dict[Command, Callable[[dict[str, Any]], Awaitable[None]]] = {
            Command.RUN_JOB: self._run_job,
            Command.RECONNECT_JOB: self._reconnect_job,
            Command.CANCEL_JOB: self._cancel_job,
            Command.UNSUBSCRIBE: self._unsubscribe,
        }

    async def run(self) -> None:
        """Serve the connection until the client leaves or the server shuts down.

        Cancellation: the client closing the socket cancels this (quart does); shutdown
        cancels the nursery here, after which the socket is closed with 1001.
        """
        stats = self.state.stats
        stats.ws_connections += 1
        stats.ws_connections_total += 1
        try:
            self._out, receive = trio.open_memory_channel[str | list[Entry]](SEND_QUEUE)
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with self.state.track(nursery.cancel_scope):
                    nursery.start_soon(self._sender, receive)
                    await self._command_loop()
        finally:
            stats.ws_connections -= 1
        if self.state.shutting_down:
            await websocket.close(CLOSE_GOING_AWAY, "server shutting down")
        elif self.close_code is not None:
            await websocket.close(self.close_code, "message too big")

    async def _sender(self, receive: trio.MemoryReceiveChannel[str | list[Entry]]) -> None:
        send = websocket.send
        extension = websocket.scope.get("extensions", {}).get(SEND_MANY)
        send_many = extension["send"] if extension else None
        stats = self.state.stats
        async for item in receive:
            if isinstance(item, str):
                await send(item)
                continue
            stats.ws_messages_sent_total += len(item)
            if send_many is None:
                for entry in item:
                    await send(entry.text)
                continue
            for start in range(0, len(item), SEND_MANY_MAX):
                texts = [entry.text for entry in item[start : start + SEND_MANY_MAX]]
                await send_many({"type": "websocket.send", SEND_MANY: texts})

    async def _reply(self, message: dict[str, Any]) -> None:
        await self._out.send(dumps(message))

    async def _command_loop(self) -> None:
        stats = self.state.stats
        while True:
            frame = await websocket.receive()
            stats.ws_commands_total += 1
            if not isinstance(frame, str):
                await self._reply(error_reply("binary frames are not supported: send JSON text"))
                continue
            # hypercorn counts characters; the limit is in bytes (only long frames can exceed it).
            if len(frame) > MAX_FRAME_BYTES // 4 and len(frame.encode()) > MAX_FRAME_BYTES:
                self.close_code = CLOSE_TOO_BIG
                self._nursery.cancel_scope.cancel()
                return
            try:
                command, data = parse_command(frame)
            except ProtocolError as exc:
                await self._reply(error_reply(str(exc), _command_name(frame)))
                continue
            await self._dispatch(command, data)

    async def _dispatch(self, command: Command, data: dict[str, Any]) -> None:
        try:
            if self.user is None and command is not Command.RUN_JOB:
                raise ProtocolError(AUTH_REQUIRED)
            await self._handlers[command](data)
        except (ProtocolError, GraphError, WorkflowNotFound, ExecutionUnavailable) as exc:
            await self._reply(error_reply(_reason(exc), command.value))
        except StoreError as exc:
            _log.error("command %s failed: %s", command.value, exc)
            await self._reply(error_reply(store_unavailable(exc), command.value))
        except Exception:
            _log.exception("command %s failed", command.value)
            await self._reply(error_reply("internal error", command.value))

    # -- commands ------------------------------------------------------------------------

    async def _run_job(self, data: dict[str, Any]) -> None:
        if self.user is None:
            token = data.get("auth_token")
            if not isinstance(token, str) or not token:
                raise ProtocolError(AUTH_REQUIRED)
            user = await self.manager.store.authenticate(token)
            if user is None:  # DESIGN: "authentication required" until a *valid* auth_token
                raise ProtocolError(AUTH_REQUIRED)
            self.user, self.token = user, token  # from now on the connection is this user
        request = RunJobRequest.from_data(data)
        refuse_while_store_fails(self.manager)
        request.user_id = self.user.id
        request.auth_token = self.token
        context = ProcessingContext(
            user_id=self.user.id, auth_token=self.token, workflow_id=request.workflow_id
        )
        job = await self.manager.start_job(request, context)
        await self._reply({"message": "Job started", "job_id": job.id})
        self._start_following(job.id, 0)

    async def _reconnect_job(self, data: dict[str, Any]) -> None:
        job_id = require(data, "job_id", str)
        after_seq = data.get("after_seq")
        if after_seq is None:
            after_seq = 0
        elif isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < 0:
            raise ProtocolError("after_seq must be a non-negative integer")
        await self._check_owned(job_id)
        self._stop_following(job_id)  # before the reply: no old message can follow it
        await self._reply({"message": f"Reconnecting to job {job_id}", "job_id": job_id})
        self._start_following(job_id, after_seq)

    async def _cancel_job(self, data: dict[str, Any]) -> None:
        job_id = require(data, "job_id", str)
        await self._check_owned(job_id)
        result = await self.manager.cancel_job(job_id)
        if result is CancelResult.ALREADY_FINISHED:
            raise ProtocolError(f"Job already finished: {job_id}")
        if result is CancelResult.NOT_FOUND:
            raise ProtocolError(f"Job not found: {job_id}")
        await self._reply({"message": "Job cancelled", "job_id": job_id})

    async def _unsubscribe(self, data: dict[str, Any]) -> None:
        job_id = require(data, "job_id", str)
        if not self._stop_following(job_id):
            await self._check_owned(job_id)
        await self._reply({"message": "Unsubscribed", "job_id": job_id})

    async def _check_owned(self, job_id: str) -> None:
        job = await self.manager.get_job(job_id)
        if job is None or self.user is None or job.user_id != self.user.id:
            raise ProtocolError(f"Job not found: {job_id}")

    # -- followers -----------------------------------------------------------------------

    def _stop_following(self, job_id: str) -> bool:
        scope = self._follows.pop(job_id, None)
        if scope is None:
            return False
        # Effective at once: the follower's next checkpoint (its next send) raises Cancelled.
        scope.cancel()
        return True

    def _start_following(self, job_id: str, after_seq: int) -> None:
        self._stop_following(job_id)
        scope = trio.CancelScope()
        self._follows[job_id] = scope
        self._nursery.start_soon(self._follow, job_id, after_seq, scope)

    async def _follow(self, job_id: str, after_seq: int, scope: trio.CancelScope) -> None:
        """Stream the job's log after ``after_seq`` until its terminal job_update.

        Cancellation: cancelling ``scope`` (unsubscribe, a new reconnect_job) ends this stream
        only; the job and the connection's other streams go on.
        """
        out = self._out
        try:
            with scope:
                follow = self.manager.log.follow(job_id, after_seq)
                async with aclosing(follow) as batches:
                    async for batch in batches:
                        await out.send(batch)
        except Exception:
            _log.exception("following job %s failed", job_id)
            await self._reply(error_reply(f"streaming job {job_id} failed"))
        finally:
            if self._follows.get(job_id) is scope:
                del self._follows[job_id]


def install_send_many() -> bool:
    """Teach hypercorn's WebSocket stream the SEND_MANY message; True if it is installed.

    ASGI sends one frame per call, and through hypercorn each call is a separate socket write
    (a syscall and half a dozen awaits): most of a streamed message's cost. A SEND_MANY
    message carries a batch of texts that becomes one write of consecutive frames, built by
    the same wsproto connection (so permessage-deflate, if negotiated, stays consistent).
    Idempotent. If hypercorn's internals are not the expected shape, nothing is changed and
    the server sends frame by frame.
    """
    try:
        from hypercorn.protocol import ws_stream
        from hypercorn.protocol.events import Data
        from wsproto.events import TextMessage
        from wsproto.utilities import LocalProtocolError
    except ImportError:
        return False
    cls = ws_stream.WSStream
    if getattr(cls, "_nodejob_send_many", False):
        return True
    connected = getattr(getattr(ws_stream, "ASGIWebsocketState", None), "CONNECTED", None)
    original = getattr(cls, "app_send", None)
    if connected is None or original is None:
        return False

    async def app_send(self: Any, message: dict[str, Any] | None) -> None:
        if message is None or SEND_MANY not in message:
            await original(self, message)
            return
        if self.closed or self.state is not connected:
            return  # like a single send after the close: dropped
        frame = self.connection.send
        try:
            data = b"".join([frame(TextMessage(data=text)) for text in message[SEND_MANY]])
        except LocalProtocolError:
            return  # hypercorn already sent a close (1009): nothing more may be sent
        await self.send(Data(stream_id=self.stream_id, data=data))

    cls.app_send = app_send  # type: ignore[method-assign,assignment]
    cls._nodejob_send_many = True  # type: ignore[attr-defined]
    return True


def store_unavailable(exc: StoreError) -> str:
    """What a client is told when the database refuses a write (without the file's path)."""
    reason = exc.reason if isinstance(exc, StoreUnavailable) else "the database cannot be used"
    return f"database unavailable: {reason}; try again later"


def refuse_while_store_fails(manager: JobExecutionManager) -> None:
    """Raise StoreUnavailable while the message log's commits are failing (disk full,
    locked): a new job could not record even its first message."""
    reason = manager.log.failing
    if reason is not None:
        raise StoreUnavailable(manager.store.path, reason)


def _reason(exc: Exception) -> str:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return text or type(exc).__name__  # (str() of a KeyError adds quotes)


def _command_name(frame: str) -> str | None:
    """The command a malformed frame named, if any (only on the error path)."""
    try:
        obj = loads(frame)
    except (ValueError, RecursionError):
        return None
    name = obj.get("command") if isinstance(obj, dict) else None
    return name if isinstance(name, str) else None
