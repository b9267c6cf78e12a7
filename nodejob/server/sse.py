"""``GET /api/jobs/{id}/events``: a job's messages as server-sent events.

Each message is one event, ``id: SEQ`` / ``event: TYPE`` / ``data: JSON``, so a browser's
EventSource resumes by itself through ``Last-Event-ID``; a gap arrives as ``event: gap`` with
``id: TO_SEQ``. Replay and live streaming are the same MessageLog cursor as on the WebSocket; the
stream ends after the terminal job_update, when the client leaves, or when the server shuts
down. EventSource cannot set headers, so this route also takes ``?token=``. This module must not
import apsw or any execution backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import trio
from pydantic import BaseModel, Field
from quart import Response, abort, g, request
from quart_schema import document_response
from quart_schema import validate_querystring as query

from nodejob.server.query import DIGITS, QueryInt, QueryModel, QueryStr

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from quart_trio import QuartTrio

    from nodejob.server.app import ServerState

_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventsQuery(QueryModel):
    after_seq: QueryInt = Field(0, ge=0, description="overridden by Last-Event-ID")
    token: QueryStr = Field(None, description="for EventSource, which cannot send headers")


class EventStream(BaseModel):
    """``text/event-stream``: ``id: SEQ``, ``event: TYPE``, ``data: JSON`` per message."""


def register(app: QuartTrio, state: ServerState) -> None:
    """Add the event-stream route to ``app``."""
    manager = state.manager

    @app.get("/api/jobs/<job_id>/events")
    @query(EventsQuery)
    @document_response(EventStream)
    async def job_events(job_id: str, query_args: EventsQuery) -> Response:
        """A job's messages as server-sent events: replay, then live, until the job ends."""
        user = g.user  # authenticated by rest.require_token, ?token= included
        job = await manager.get_job(job_id)
        if job is None or job.user_id != user.id:
            abort(404, f"Job not found: {job_id}")
        after_seq = query_args.after_seq
        last_event_id = request.headers.get("Last-Event-ID", "")  # blanks stripped by h11
        if last_event_id:
            if not DIGITS.fullmatch(last_event_id):
                abort(422, "Last-Event-ID must be a whole number written in decimal digits")
            after_seq = int(last_event_id)
        response = Response(
            _events(state, job_id, after_seq), content_type="text/event-stream", headers=_HEADERS
        )
        response.timeout = None  # a stream lasts as long as its job, not RESPONSE_TIMEOUT
        return response


async def _events(state: ServerState, job_id: str, after_seq: int) -> AsyncIterator[bytes]:
    """The encoded events of one job after ``after_seq``, a batch per chunk.

    The cancel scope lives only around each ``anext`` (never across a ``yield``), so shutdown
    can end a stream that is waiting for the job's next message.
    """
    state.stats.sse_streams += 1
    batches = state.manager.log.follow(job_id, after_seq)
    try:
        while True:
            with trio.CancelScope() as scope, state.track(scope):
                try:
                    batch = await anext(batches)
                except StopAsyncIteration:
                    return
            if scope.cancelled_caught:
                return
            yield "".join(
                [f"id: {e.seq}\nevent: {e.type}\ndata: {e.text}\n\n" for e in batch]
            ).encode()
    finally:
        state.stats.sse_streams -= 1
        await batches.aclose()
