"""What every benchmark stands on: a real server, a strict client, the graphs, the sizes.

`running_server` starts a real server in this process (``nodejob.server.app.serve`` on
127.0.0.1:0, in a fresh home); `Connection` drives its ``/ws`` the way clients do, checking
every seq; `start_direct` starts jobs through the manager where the figure is about the
server alone. `Sizes` says how much work each benchmark does.

Part of ``nodejob bench`` (docs/benchmarks.md explains every figure). The bench imports
the server; nothing outside nodejob.bench imports it but the CLI's lazy ``bench`` handler.
This module must not import the other nodejob.bench modules (they import it).
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio
import trio_websocket

from nodejob.config import Config
from nodejob.manager import JobExecutionManager
from nodejob.protocol import TERMINAL, JobStatus, ProcessingContext, RunJobRequest, dumps, loads
from nodejob.server.app import serve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

TERMINAL_STATUSES: Final = frozenset(s.value for s in TERMINAL)
RECEIVE_LIMIT_BYTES: Final = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each benchmark does (``--quick`` shrinks it for tests)."""

    stream_messages: int
    stream_rounds: int
    trivial_runs: int
    replay_messages: int
    replay_rounds: int
    concurrent_jobs: int
    multi_jobs: int
    multi_messages_per_job: int
    strategy_runs: int


FULL: Final = Sizes(100_000, 3, 50, 10_000, 5, 10_000, 100, 2_000, 10)
QUICK: Final = Sizes(3_000, 1, 5, 1_000, 2, 200, 10, 200, 2)


class BenchError(RuntimeError):
    """A benchmark could not produce an honest figure (lost messages, a failed job...)."""


class Unavailable(RuntimeError):
    """An optional strategy cannot run here; the message says why."""


def emitter(count: int, size: int = 100) -> dict[str, Any]:
    """An Emit → Output graph: ``count`` log_update messages of ``size`` characters."""
    return {
        "nodes": [
            {"id": "e", "type": "nodejob.Emit", "data": {"count": count, "size": size}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "n"}},
        ],
        "edges": [{"source": "e", "target": "out", "targetHandle": "value"}],
    }


def sleeper(seconds: float) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds, "value": 1}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
        ],
        "edges": [{"source": "s", "target": "out", "targetHandle": "value"}],
    }


TRIVIAL: Final = {
    "nodes": [
        {"id": "a", "type": "nodejob.Constant", "data": {"value": 2}},
        {"id": "b", "type": "nodejob.Add", "data": {"b": 3}},
        {"id": "out", "type": "nodejob.Output", "data": {"name": "sum"}},
    ],
    "edges": [
        {"source": "a", "sourceHandle": "output", "target": "b", "targetHandle": "a"},
        {"source": "b", "sourceHandle": "output", "target": "out", "targetHandle": "value"},
    ],
}
"""examples/hello.json: Constant → Add → Output."""


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc``), not its peak."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- a server and its clients ---------------------------------------------------------------


@dataclass
class Server:
    url: str
    token: str
    manager: JobExecutionManager

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + f"/ws?token={self.token}"


@asynccontextmanager
async def running_server(home: Path, **options: Any) -> AsyncIterator[Server]:
    """A real server on 127.0.0.1:0 with its state in ``home``; stopped on exit."""
    config = Config.from_env(home=home, host="127.0.0.1", port=0, **options)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(partial(serve, config))
        token = (home / "token").read_text().strip()
        try:
            yield Server(info.url, token, JobExecutionManager.get_instance())
        finally:
            nursery.cancel_scope.cancel()


class Connection:
    """One trio-websocket client connection speaking the ``/ws`` protocol, strictly."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def command(self, name: str, **data: Any) -> dict[str, Any]:
        """Send a command and return its reply (the next frame must be that reply)."""
        await self.ws.send_message(dumps({"command": name, "data": data}))
        reply: dict[str, Any] = loads(await self.ws.get_message())
        if "seq" in reply or reply.get("type") == "error":
            raise BenchError(f"{name}: unexpected answer {str(reply)[:200]}")
        return reply

    async def follow(self, job_id: str, after_seq: int = 0, keep: list[str] | None = None) -> int:
        """Read the job's messages up to its terminal job_update; returns the last seq.

        Every message is decoded and its seq checked: consecutive, no gap, nothing lost.
        """
        seq = after_seq
        get = self.ws.get_message
        while True:
            text = await get()
            message = loads(text)
            kind = message.get("type")
            if message.get("job_id") != job_id or message.get("seq") != seq + 1 or kind == "gap":
                raise BenchError(f"job {job_id}: expected seq {seq + 1}, got {text[:200]}")
            seq += 1
            if keep is not None:
                keep.append(text)
            if kind == "job_update" and message["status"] in TERMINAL_STATUSES:
                if message["status"] != JobStatus.COMPLETED:
                    raise BenchError(f"job {job_id} ended {message['status']}: {text[:300]}")
                return seq

    async def run(self, graph: dict[str, Any], **data: Any) -> tuple[str, int]:
        """run_job and follow it to its end: (job id, last seq)."""
        reply = await self.command("run_job", graph=graph, **data)
        job_id = str(reply["job_id"])
        return job_id, await self.follow(job_id)


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[Connection]:
    async with trio_websocket.open_websocket_url(url, max_message_size=RECEIVE_LIMIT_BYTES) as ws:
        yield Connection(ws)


async def committed_job_count(server: Server, graph: dict[str, Any]) -> int:
    """How many messages a job of ``graph`` writes in all (its last seq)."""
    async with connect(server.ws_url) as conn:
        return (await conn.run(graph))[1]


async def start_direct(server: Server, graphs: list[dict[str, Any]]) -> list[str]:
    """Start one job per graph through the manager, concurrently; their ids in order."""
    manager = server.manager
    user = await manager.store.authenticate(server.token)
    assert user is not None
    ids = [""] * len(graphs)

    async def start(index: int) -> None:
        # A private copy per job, as a graph parsed from a client's JSON would be.
        request = RunJobRequest(graph=loads(dumps(graphs[index])), user_id=user.id)
        job = await manager.start_job(request, ProcessingContext(user_id=user.id))
        ids[index] = job.id

    # All at once: their rows and seq 1s then share a few group commits.
    async with trio.open_nursery() as nursery:
        for index in range(len(graphs)):
            nursery.start_soon(start, index)
    return ids


Results = dict[str, Any]
