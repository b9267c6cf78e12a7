"""Graceful shutdown under load (issue 7): SIGTERM to ``nodejob serve`` while clients stream.

Every WebSocket client sees close code 1001, event streams end, the process exits 0 promptly;
after a restart the threaded jobs are ``failed`` with "server stopped while the job was
running", and every message any client saw is in the database, unchanged, with the seqs
contiguous up to the terminal update.
"""

from __future__ import annotations

import json
import signal
import time
from typing import TYPE_CHECKING, Any

import httpx
import trio

from nodejob.protocol import dumps
from tests.hardening import RawWebSocket, WsClosed, emitter, start_server_process

if TYPE_CHECKING:
    from pathlib import Path

JOBS = 20
WS_CLIENTS = 60
SSE_CLIENTS = 10


async def test_sigterm_under_load_closes_with_1001_exits_0_and_keeps_every_seen_message(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    server = await start_server_process(home)
    seen: dict[int, list[dict[str, Any]]] = {i: [] for i in range(WS_CLIENTS)}
    close_codes: dict[int, int] = {}
    sse_seen: dict[int, list[dict[str, Any]]] = {i: [] for i in range(SSE_CLIENTS)}
    sse_ended: set[int] = set()
    streaming = trio.Semaphore(0)  # released once per client that is receiving live messages
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        graph = emitter(1_000_000, size=60, interval=0.005)  # runs until the server stops
        jobs = [
            (await http.post("/api/jobs/", json={"graph": graph})).json()["id"] for _ in range(JOBS)
        ]

    async def ws_client(index: int) -> None:
        job_id = jobs[index % JOBS]
        async with await RawWebSocket.open(server.url, server.token) as ws:
            await ws.command("reconnect_job", job_id=job_id)
            assert (await ws.receive())["job_id"] == job_id
            try:
                while True:
                    seen[index].append(await ws.receive())
                    if len(seen[index]) == 100:
                        streaming.release()
            except WsClosed as closed:
                close_codes[index] = closed.code

    async def sse_client(index: int, http: httpx.AsyncClient) -> None:
        job_id = jobs[index % JOBS]
        async with http.stream("GET", f"/api/jobs/{job_id}/events") as response:
            assert response.status_code == 200
            data: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    data.append(line.removeprefix("data: "))
                elif line == "" and data:
                    sse_seen[index].append(json.loads("\n".join(data)))
                    data = []
                    if len(sse_seen[index]) == 100:
                        streaming.release()
        sse_ended.add(index)  # the stream ended cleanly (no exception)

    with trio.fail_after(60):
        async with (
            httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30) as http,
            trio.open_nursery() as nursery,
        ):
            for index in range(WS_CLIENTS):
                nursery.start_soon(ws_client, index)
            for index in range(SSE_CLIENTS):
                nursery.start_soon(sse_client, index, http)
            for _ in range(WS_CLIENTS + SSE_CLIENTS):
                await streaming.acquire()
            # Everyone is streaming live: stop the server.
            started = time.perf_counter()
            code = await server.stop(signal.SIGTERM, within=20)
            shutdown_s = time.perf_counter() - started
    assert code == 0, server.stderr()
    assert close_codes == dict.fromkeys(range(WS_CLIENTS), 1001)
    assert sse_ended == set(range(SSE_CLIENTS))
    assert "Traceback" not in server.stderr(), server.stderr()

    server = await start_server_process(home)
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
            rows = {job_id: (await http.get(f"/api/jobs/{job_id}")).json() for job_id in jobs}
            stored: dict[str, list[str]] = {}
            for job_id in jobs:
                texts: list[str] = []
                after = 0
                while True:
                    page = (
                        await http.get(
                            f"/api/jobs/{job_id}/messages",
                            params={"after_seq": after, "limit": 10_000},
                        )
                    ).json()
                    texts += [dumps(m) for m in page["messages"]]
                    after = page["last_seq"]
                    if not page["has_more"]:
                        break
                stored[job_id] = texts
    finally:
        assert await server.stop() == 0
    for job_id, row in rows.items():
        assert row["status"] == "failed"
        assert row["error"] == "server stopped while the job was running"
        messages = [json.loads(text) for text in stored[job_id]]
        assert [m["seq"] for m in messages] == list(range(1, row["last_seq"] + 1))
        assert messages[-1]["type"] == "job_update"
        assert messages[-1]["status"] == "failed"
    for index, messages in [*seen.items(), *sse_seen.items()]:
        job_id = jobs[index % JOBS]
        by_seq = {json.loads(text)["seq"]: text for text in stored[job_id]}
        for message in messages:
            assert by_seq[message["seq"]] == dumps(message)
    print(
        "\nFIGURES shutdown: "
        + json.dumps(
            {
                "jobs": JOBS,
                "ws_clients": WS_CLIENTS,
                "sse_clients": SSE_CLIENTS,
                "sigterm_to_exit_s": round(shutdown_s, 2),
                "messages_per_job": sorted(len(s) for s in stored.values())[JOBS // 2],
            }
        )
    )
