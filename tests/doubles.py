"""`FakeServer`: a small real stand-in for the nodejob server, for the client and CLI tests.

Not a mock: quart-trio on hypercorn, like the real server, on 127.0.0.1:0, speaking
DESIGN.md's WebSocket and REST protocol over scripted in-memory jobs (`FakeJob`). It can drop
every connection (a "restart") or ignore ``after_seq`` (to prove the client's dedup), which
the real server cannot be made to do on demand.

This module imports nodejob.protocol only: never nodejob.server, the store, the manager or
the client it stands opposite to.
"""

from __future__ import annotations

from typing import Any

import hypercorn.config
import hypercorn.trio
import trio
from quart import request, websocket
from quart_trio import QuartTrio

from nodejob import protocol

TOKEN = "secret-token"


class FakeJob:
    """One scripted job: its messages, numbered from seq 1, are driven by its ``params``."""

    def __init__(self, job_id: str, data: dict[str, Any]) -> None:
        self.id = job_id
        self.params: dict[str, Any] = data.get("params") or {}
        self.workflow_id = data.get("workflow_id")
        self.strategy = data.get("execution_strategy") or "threaded"
        self.messages: list[dict[str, Any]] = []
        self.status = "starting"
        self.error: str | None = None
        self.trimmed = 0  # seqs 1..trimmed are "out of the ring"
        self.changed = trio.Event()
        self.cancel = trio.Event()
        self.finished = trio.Event()
        self.holding = trio.Event()
        self.emit({"type": "job_update", "status": "starting"})

    def emit(self, message: dict[str, Any]) -> None:
        message = {**message, "job_id": self.id, "seq": len(self.messages) + 1}
        if message["type"] == "job_update":
            self.status = message["status"]
            self.error = message.get("error")
        self.messages.append(message)
        if self.ended:
            self.finished.set()
        self.changed.set()
        self.changed = trio.Event()

    @property
    def ended(self) -> bool:
        return self.status in protocol.TERMINAL

    async def run(self) -> None:
        """The script: running, ``logs`` log lines, an output, then ``end`` (or wait to be
        cancelled with ``hold``)."""
        p = self.params
        self.emit({"type": "job_update", "status": "running"})
        self.emit({"type": "node_update", "node_id": "a", "node_type": "t.A", "status": "running"})
        for i in range(int(p.get("logs", 2))):
            self.emit(
                {"type": "log_update", "node_id": "a", "content": f"line {i}", "severity": "info"}
            )
        self.emit({"type": "node_progress", "node_id": "a", "progress": 5, "total": 10})
        self.trimmed = int(p.get("trim", 0))
        if p.get("hold"):
            self.holding.set()
            await self.cancel.wait()
            self.emit({"type": "job_update", "status": "cancelled"})
            return
        if p.get("end") == "failed":
            self.emit({"type": "node_update", "node_id": "a", "status": "failed", "error": "boom"})
            self.emit({"type": "job_update", "status": "failed", "error": "node a failed: boom"})
            return
        self.emit({"type": "node_update", "node_id": "a", "status": "completed"})
        self.emit({"type": "output_update", "node_id": "o", "output_name": "sum", "value": 5})
        self.emit({"type": "job_update", "status": "completed", "result": {"outputs": {"sum": 5}}})

    def as_object(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": "u1",
            "job_type": "workflow",
            "status": self.status,
            "workflow_id": self.workflow_id,
            "execution_strategy": self.strategy,
            "params": self.params,
            "started_at": "2026-01-01T00:00:00.000Z",
            "finished_at": "2026-01-01T00:00:02.500Z" if self.ended else None,
            "error": self.error,
            "cost": None,
            "last_seq": len(self.messages),
        }


class FakeServer:
    """The server double: start it with ``nursery.start(fake.serve)``; ``url`` is then set."""

    def __init__(self) -> None:
        self.jobs: dict[str, FakeJob] = {}
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.connections = 0
        self.replay_from_start = False
        self.on_sent: Any = None  # called with each stream message sent
        self._drop = trio.Event()
        self._connected = trio.Event()
        self.nursery: trio.Nursery | None = None
        self.url = ""
        self.app = self._app()

    def drop_connections(self) -> None:
        """Close every open WebSocket (code 1001), as a restarting server does."""
        self._drop.set()
        self._drop = trio.Event()

    async def wait_connections(self, count: int) -> None:
        """Until ``count`` WebSocket connections have been accepted in all."""
        while self.connections < count:
            await self._connected.wait()

    def start(self, data: dict[str, Any]) -> FakeJob:
        job = FakeJob(f"job{len(self.jobs) + 1}", data)
        self.jobs[job.id] = job
        assert self.nursery is not None
        self.nursery.start_soon(job.run)
        return job

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        config = hypercorn.config.Config()
        config.bind = ["127.0.0.1:0"]
        config.graceful_timeout = 0.1
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            binds = await nursery.start(hypercorn.trio.serve, self.app, config)
            self.url = binds[0]
            task_status.started(self.url)

    def _app(self) -> QuartTrio:
        app = QuartTrio(__name__)
        server = self

        def authorized() -> bool:
            return request.headers.get("Authorization") == f"Bearer {TOKEN}"

        def not_found(job_id: str) -> tuple[dict[str, str], int]:
            return {"detail": f"Job not found: {job_id}"}, 404

        @app.get("/health")
        async def health() -> Any:
            return {"status": "ok"}

        @app.before_request
        async def auth() -> Any:
            if request.path.startswith("/api/") and not authorized():
                return {"detail": "invalid token"}, 401
            return None

        @app.post("/api/jobs/")
        async def start_job() -> Any:
            return server.start(await request.get_json()).as_object(), 201

        @app.get("/api/jobs/")
        async def list_jobs() -> Any:
            jobs = [job.as_object() for job in reversed(server.jobs.values())]
            start = int(request.args.get("start_key", 0))
            limit = int(request.args.get("limit", 100))
            page = jobs[start : start + limit]
            headers = {}
            if start + limit < len(jobs):
                headers["Link"] = (
                    f'<{request.url_root}api/jobs/?start_key={start + limit}>; rel="next"'
                )
            return page, 200, headers

        @app.get("/api/jobs/running/all")
        async def running() -> Any:
            return [
                {
                    "job_id": j.id,
                    "status": j.status,
                    "workflow_id": j.workflow_id,
                    "created_at": "2026-01-01T00:00:00.000Z",
                    "is_running": True,
                    "is_completed": False,
                }
                for j in server.jobs.values()
                if not j.ended
            ]

        @app.get("/api/jobs/<job_id>")
        async def get_job(job_id: str) -> Any:
            job = server.jobs.get(job_id)
            return job.as_object() if job else not_found(job_id)

        @app.post("/api/jobs/<job_id>/cancel")
        async def cancel(job_id: str) -> Any:
            job = server.jobs.get(job_id)
            if job is None:
                return not_found(job_id)
            if job.ended:
                return {"detail": f"Job already finished: {job_id}"}, 409
            job.cancel.set()
            return {"message": "Job cancelled successfully", "job_id": job_id}

        @app.websocket("/ws")
        async def ws() -> Any:
            token = websocket.args.get("token")
            if token is not None and token != TOKEN:
                return {"detail": "invalid token"}, 401
            await websocket.accept()
            server.connections += 1
            server._connected.set()
            server._connected = trio.Event()
            drop = server._drop
            try:
                async with trio.open_nursery() as nursery:
                    cursors: dict[str, trio.CancelScope] = {}

                    async def dropper() -> None:
                        await drop.wait()
                        await websocket.close(1001)
                        nursery.cancel_scope.cancel()

                    async def stream(job: FakeJob, cursor: int, scope: trio.CancelScope) -> None:
                        with scope:
                            if server.replay_from_start:
                                cursor = 0
                            if cursor < job.trimmed:
                                gap = protocol.gap_message(job.id, cursor + 1, job.trimmed)
                                await websocket.send(protocol.dumps(gap))
                                cursor = job.trimmed
                            while True:
                                changed = job.changed
                                while cursor < len(job.messages):
                                    message = job.messages[cursor]
                                    await websocket.send(protocol.dumps(message))
                                    cursor += 1
                                    if server.on_sent is not None:
                                        server.on_sent(message)
                                if job.ended:
                                    return
                                await changed.wait()

                    def follow(job: FakeJob, after: int) -> None:
                        if job.id in cursors:
                            cursors[job.id].cancel()
                        cursors[job.id] = trio.CancelScope()
                        nursery.start_soon(stream, job, after, cursors[job.id])

                    async def reply(message: dict[str, Any]) -> None:
                        await websocket.send(protocol.dumps(message))

                    nursery.start_soon(dropper)
                    while True:
                        try:
                            frame = await websocket.receive()
                            text = frame if isinstance(frame, str) else frame.decode()
                            command, data = protocol.parse_command(text)
                        except protocol.ProtocolError as exc:
                            await reply(protocol.error_reply(str(exc)))
                            continue
                        server.commands.append((command.value, data))
                        job = server.jobs.get(str(data.get("job_id")))
                        if command == protocol.Command.RUN_JOB:
                            if data.get("graph", {}).get("invalid"):
                                await reply(
                                    protocol.error_reply("invalid graph: node x", "run_job")
                                )
                                continue
                            job = server.start(data)
                            await reply({"message": "Job started", "job_id": job.id})
                            follow(job, 0)
                        elif data.get("job_id") == "noise":  # an unsolicited error first
                            await reply(protocol.error_reply("streaming job x failed"))
                            await reply(protocol.error_reply("Job not found: noise", command.value))
                        elif job is None:
                            await reply(
                                protocol.error_reply(
                                    f"Job not found: {data.get('job_id')}", command.value
                                )
                            )
                        elif command == protocol.Command.RECONNECT_JOB:
                            await reply(
                                {"message": f"Reconnecting to job {job.id}", "job_id": job.id}
                            )
                            follow(job, int(data.get("after_seq", 0)))
                        elif command == protocol.Command.CANCEL_JOB:
                            if job.ended:
                                await reply(
                                    protocol.error_reply(
                                        f"Job already finished: {job.id}", command.value
                                    )
                                )
                            else:
                                job.cancel.set()
                                await reply({"message": "Job cancelled", "job_id": job.id})
                        elif command == protocol.Command.UNSUBSCRIBE:
                            if job.id in cursors:
                                cursors.pop(job.id).cancel()
                            await reply({"message": "Unsubscribed", "job_id": job.id})
            except* Exception:  # the peer went away: end this connection
                pass

        return app
