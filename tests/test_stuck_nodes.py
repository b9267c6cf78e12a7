"""A node that blocks its thread forever (issue 7, worker faults).

A plug-in node's synchronous ``run`` executes in a thread; nothing can interrupt a thread
that waits on a lock that is never released. The job must still end: a cancel or a timeout
abandons the thread (the node is reported cancelled, the job ``cancelled`` or ``failed``), the
abandoned thread can no longer add messages to the job, other jobs run on, and the server
still shuts down at once. Out of process, the worker's process is killed after the grace.
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from tests.hardening import (
    TERMINAL,
    RawWebSocket,
    follow_job,
    install_plugin,
    start_server_process,
)

if TYPE_CHECKING:
    from pathlib import Path

FROZEN = """
    import threading

    from nodejob.workflow.nodes import Node


    class Frozen(Node):
        '''Blocks its thread for good: the lock it waits for is never released.'''

        type = "stucktest.Frozen"

        def run(self, ctx):
            ctx.log("frozen now")
            threading.Event().wait()
"""
FROZEN_GRAPH = {"nodes": [{"id": "f", "type": "stucktest.Frozen", "data": {}}]}
DEADLINE_S = 60.0
TIMEOUT_S = 5
"""Long enough for a worker to start on a loaded machine, so that the node is blocked first."""


@pytest.mark.parametrize("strategy", ["threaded", "subprocess"])
async def test_a_node_blocked_forever_still_lets_its_job_end(tmp_path: Path, strategy: str) -> None:
    plugin = install_plugin(
        tmp_path / "plugin", "stucktest_plugin", FROZEN, {"frozen": "stucktest_plugin:Frozen"}
    )
    env = {**os.environ, "PYTHONPATH": str(plugin), "NODEJOB_KILL_GRACE_S": "1"}
    server = await start_server_process(tmp_path / "home", env=env)
    ended: dict[str, list[dict[str, Any]]] = {}
    try:
        async with (
            await RawWebSocket.open(server.url, server.token) as ws,
            httpx.AsyncClient(base_url=server.url, headers=server.headers) as http,
        ):
            with trio.fail_after(DEADLINE_S):
                # Cancelled while blocked.
                cancelled = await start(ws, FROZEN_GRAPH, strategy)
                await until_frozen(ws, cancelled, ended)
                await ws.command("cancel_job", job_id=cancelled)
                ended[cancelled] += await follow_job(ws, cancelled)
                # Timed out while blocked.
                timed_out = await start(ws, FROZEN_GRAPH, strategy, timeout_seconds=TIMEOUT_S)
                await until_frozen(ws, timed_out, ended)
                ended[timed_out] += await follow_job(ws, timed_out)
                # Meanwhile, another job runs as usual.
                hello = {"nodes": [{"id": "c", "type": "nodejob.Constant", "data": {"value": 1}}]}
                other = await start(ws, hello, strategy)
                ended[other] = await follow_job(ws, other)
                if strategy == "threaded":  # (a worker would be left to the next server)
                    # A third is blocked in the server's own thread when it shuts down.
                    left = await start(ws, FROZEN_GRAPH, strategy)
                    await until_frozen(ws, left, ended)
            rows = {job: (await http.get(f"/api/jobs/{job}")).json() for job in ended}
    finally:
        code = await server.stop(signal.SIGTERM, within=30)
    assert code == 0, server.stderr()  # not held up by the thread still blocked in it
    assert rows[cancelled]["status"] == "cancelled"
    assert (rows[timed_out]["status"], rows[timed_out]["error"]) == (
        "failed",
        f"timed out after {TIMEOUT_S} s",
    )
    assert rows[other]["status"] == "completed"
    for job in (cancelled, timed_out):
        stream = ended[job]
        assert [m["seq"] for m in stream] == list(range(1, len(stream) + 1))
        nodes = [m["status"] for m in stream if m["type"] == "node_update"]
        assert nodes == ["running", "cancelled"], (strategy, nodes)  # abandoned, reported
        assert stream[-1]["type"] == "job_update"
        assert stream[-1]["status"] in TERMINAL


async def start(ws: RawWebSocket, graph: dict[str, Any], strategy: str, **data: Any) -> str:
    await ws.command("run_job", graph=graph, execution_strategy=strategy, **data)
    reply = await ws.reply()
    assert reply.get("message") == "Job started", reply
    return str(reply["job_id"])


async def until_frozen(
    ws: RawWebSocket, job_id: str, seen: dict[str, list[dict[str, Any]]]
) -> None:
    """Read ``job_id``'s stream until its node said it is frozen."""
    stream = seen.setdefault(job_id, [])
    while not any(m.get("content") == "frozen now" for m in stream):
        message = await ws.receive()
        if message.get("job_id") == job_id and "seq" in message:
            stream.append(message)
