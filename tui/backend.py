"""The TUI's trio side: one WebSocket stream and one REST client, feeding the JobStore.

Live updates are pushed: every unfinished job in view (and the attached job) is followed on one
WebSocket with ``reconnect_job``, so status, progress, logs and outputs arrive as they happen. The
only polling is a small, slow one (``GET /api/jobs/?limit=50`` every POLL_S) to discover jobs
that another client started; the protocol has no "job list changed" push yet.

Connection loss is normal. The backend owns the reconnect loop (the stream is opened with
``reconnect=False``) so that it can tell the user at once, retry with backoff, and on return
resume every followed job after ``JobModel.last_seq``: the last seq it applied, and so the last
one the screens can show. Nothing is replayed twice and nothing is skipped (a ``gap`` excepted,
which the attached screen shows).

This module imports trio, ``nodejob.client`` and ``nodejob.protocol``: never Textual, never the
server.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

import trio

from nodejob.client import Client, ClientError, ConnectError, JobStream, open_job_stream
from nodejob.protocol import JobStatus, MessageType, is_terminal_update
from nodejob_tui.model import ConnState, JobModel, JobStore

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

RETRY_INITIAL_S: Final = 0.25
RETRY_MAX_S: Final = 8.0
POLL_S: Final = 5.0
"""Seconds between looks at the newest jobs, to find those started elsewhere."""
POLL_PAGE: Final = 50
LIST_LIMIT: Final = 200
"""Jobs fetched for the ``--all`` view (newest first)."""
FOLLOW_MAX: Final = 50
"""Unfinished jobs followed live at once; more are refreshed by the poll only."""
REFUSED: Final = frozenset({401, 403})

JsonObject = dict[str, Any]


class Backend:
    """Keeps the JobStore in step with the server; commands for the screens.

    ``changed`` is called (on the trio side) whenever the store changed; the app coalesces
    these into screen refreshes. Commands raise `ClientError` with a one-line reason.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        store: JobStore,
        changed: Callable[[], None],
        *,
        show_all: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.token = token
        self.store = store
        self.show_all = show_all
        self.attached: str | None = None
        self.resumes: list[tuple[str, int]] = []
        """Every (job_id, after_seq) this backend asked the server to stream from."""
        self._changed = changed
        self._clock = clock
        self._client: Client | None = None
        self._stream: JobStream | None = None
        self._following: set[str] = set()  # jobs followed on the current connection
        self._poll_now = trio.Event()

    # -- the connection ----------------------------------------------------------------------

    async def run(self) -> None:
        """Stay connected to the server until cancelled, reconnecting with backoff.

        Cancellation: closes the WebSocket (jobs are not affected) and the HTTP client.
        """
        async with Client(self.url, self.token) as client:
            self._client = client
            delay = RETRY_INITIAL_S
            while True:
                if self.store.connection.state is not ConnState.DISCONNECTED:
                    self.store.set_connection(ConnState.CONNECTING)
                    self._changed()
                error = await self._connected_session()
                if error is not None and error.status in REFUSED:
                    self.store.set_connection(ConnState.REFUSED, error.detail)
                    self._changed()
                    return  # a refused token does not get better by retrying
                if isinstance(error, ConnectError):
                    detail = error.reason  # "Connection refused": the URL is on screen already
                else:
                    detail = error.detail if error is not None else "connection closed"
                if self.store.connection.state is ConnState.CONNECTED:
                    delay = RETRY_INITIAL_S  # it was up: start the backoff afresh
                self.store.set_connection(ConnState.DISCONNECTED, detail, retry_in_s=delay)
                self._changed()
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    async def _connected_session(self) -> ClientError | None:
        """One connection, from opening it to losing it; returns why it ended."""
        error: ClientError | None = None
        try:
            async with open_job_stream(self.url, self.token, reconnect=False) as stream:
                self._stream, self._following = stream, set()
                self.store.set_connection(ConnState.CONNECTED)
                self._changed()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._sync_and_poll, nursery)
                        async for message in stream.messages():
                            self._on_message(message, nursery)
                        nursery.cancel_scope.cancel()
                finally:
                    self._stream = None
        except* ClientError as group:
            error = _first(group)
        return error

    def _on_message(self, message: JsonObject, nursery: trio.Nursery) -> None:
        model = self.store.apply(message)
        if model is None:
            return
        if message.get("type") == MessageType.JOB_UPDATE and _row_is_behind(model):
            # Timestamps live on the row: fetch it when the status moved past what it says.
            nursery.start_soon(self._refresh_row, model.job_id)
        if is_terminal_update(message):
            self._following.discard(model.job_id)  # the server ends that follower
        self._changed()

    async def _sync_and_poll(self, nursery: trio.Nursery) -> None:
        """After (re)connecting: resume the attached job, then the list; then poll slowly."""
        if self.attached is not None:
            await self._guard(self._follow(self.attached))
        await self._guard(self._load_unfinished())
        if self.show_all:
            await self._guard(self._load_page(LIST_LIMIT))
        await self._guard(self._follow_unfinished())
        while True:
            with trio.move_on_after(POLL_S):
                await self._poll_now.wait()
            self._poll_now = trio.Event()
            await self._guard(self._load_page(POLL_PAGE))
            await self._guard(self._follow_unfinished())

    async def _guard(self, operation: Awaitable[None]) -> None:
        """Run one REST/WS operation; a failure is shown, and a lost connection is left to
        the stream reader to notice."""
        try:
            await operation
        except ConnectError:
            pass  # the server went away: the stream reader notices and reconnects
        except ClientError as exc:
            self.store.notice(exc.detail)
            self._changed()

    async def _load_unfinished(self) -> None:
        client = self._require_client()
        running = {str(job["job_id"]): job for job in await client.running_jobs()}
        for job_id, brief in running.items():
            if job_id in self.store.jobs and self.store.jobs[job_id].started_at is not None:
                self.store.merge_row({"id": job_id, "status": brief.get("status")})
            else:
                await self._load_row(job_id)
        # Jobs we saw unfinished that are not any more: their rows say how they ended.
        for model in list(self.store.jobs.values()):
            if not model.is_finished and model.job_id not in running:
                await self._load_row(model.job_id)
        self._changed()

    async def _load_page(self, limit: int) -> None:
        jobs, _next = await self._require_client().list_jobs(limit=limit)
        for row in jobs:
            self.store.merge_row(row)
        self._changed()

    async def _follow_unfinished(self) -> None:
        unfinished = [m for m in self.store.jobs.values() if not m.is_finished]
        unfinished.sort(key=lambda m: m.created_at or 0.0, reverse=True)
        for model in unfinished[:FOLLOW_MAX]:
            if model.job_id not in self._following:
                await self._follow(model.job_id)

    async def _follow(self, job_id: str) -> None:
        """Stream ``job_id`` after the last seq applied; nothing if it is all here already."""
        stream = self._stream
        if stream is None or job_id in self._following:
            return
        model = self.store.jobs.get(job_id)
        if model is None or model.created_at is None:
            model = await self._load_row(job_id)
        if model.is_finished and model.last_seq >= model.row_last_seq > 0:
            return
        self._following.add(job_id)
        try:
            self.resumes.append((job_id, model.last_seq))
            await stream.reconnect_job(job_id, model.last_seq)
        except ClientError:
            self._following.discard(job_id)
            raise

    async def _refresh_row(self, job_id: str) -> None:
        await self._guard(self._refresh_row_once(job_id))

    async def _refresh_row_once(self, job_id: str) -> None:
        await self._load_row(job_id)
        self._changed()

    async def _load_row(self, job_id: str) -> JobModel:
        """Fetch the job's row into the store; a 404 forgets the job (and re-raises)."""
        try:
            row = await self._require_client().get_job(job_id)
        except ClientError as exc:
            if exc.status == 404:
                self.store.forget(job_id)
                self._changed()
            raise
        return self.store.merge_row(row)

    def _require_client(self) -> Client:
        if self._client is None:
            raise ClientError(None, "not connected to the server")
        return self._client

    def _require_stream(self) -> JobStream:
        if self._stream is None:
            raise ClientError(None, f"not connected to {self.url}: try again when it is back")
        return self._stream

    # -- commands (run as trio tasks on behalf of the screens) -------------------------------

    async def attach(self, job_id: str) -> None:
        """Show ``job_id``: load its row if needed, then replay what is missing and follow.

        Offline, this only records the job: it is followed once the connection is up.
        """
        self.attached = job_id
        if self._stream is not None:
            await self._follow(job_id)

    def detach(self) -> None:
        """Leave the attached job (it keeps running; the list may still follow it)."""
        self.attached = None

    async def cancel(self, job_id: str) -> None:
        await self._require_stream().cancel_job(job_id)

    async def start(self, data: JsonObject) -> str:
        """Start a job from ``run_job`` data and follow it; returns its id."""
        stream = self._require_stream()
        job_id = await stream.run_job(data)
        self._following.add(job_id)  # run_job follows from seq 1
        model = self.store.job(job_id)
        if isinstance(data.get("graph"), dict):
            model.set_graph(data["graph"])
        model.created_at = model.created_at or self._clock()
        self._changed()
        self._poll_now.set()
        return job_id

    async def rerun(self, job_id: str) -> str:
        model = self.store.jobs.get(job_id)
        data = model.run_data() if model is not None else None
        if data is None:
            raise ClientError(
                None, "cannot rerun: the server does not say which graph this job ran"
            )
        return await self.start(data)

    async def set_show_all(self, show_all: bool) -> None:
        self.show_all = show_all
        if show_all and self._stream is not None:
            await self._guard(self._load_page(LIST_LIMIT))


def _row_is_behind(model: JobModel) -> bool:
    """True when the job's status is ahead of the timestamps its row gave us."""
    if model.created_at is None:
        return True
    if model.is_finished:
        return model.finished_at is None
    return model.status is JobStatus.RUNNING and model.started_at is None


def _first(group: BaseExceptionGroup[ClientError]) -> ClientError:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    assert isinstance(leaf, ClientError)
    return leaf
