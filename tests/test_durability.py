"""Durability: slow readers cannot hold a job up, and a killed server loses nothing committed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import open_websocket_url

from tests.conftest import Server, emitter, sleeper


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_reader_that_stops_reading_never_stalls_the_job(server: Server) -> None:
    count = 100_000
    ws_url = f"{server.ws_url}?token={server.token}"
    async with open_websocket_url(ws_url) as stalled:
        await stalled.send_message(
            json.dumps({"command": "run_job", "data": {"graph": emitter(count)}})
        )
        reply = json.loads(await stalled.get_message())
        job_id = reply["job_id"]
        before = rss_kib()
        # The stalled client never reads again. A second client follows the job to its end.
        async with open_websocket_url(ws_url) as follower:
            await follower.send_message(
                json.dumps({"command": "reconnect_job", "data": {"job_id": job_id}})
            )
            seqs: list[int] = []
            with trio.fail_after(120):
                while True:
                    message = json.loads(await follower.get_message())
                    if "seq" in message:
                        # A gap (the follower started late, the ring moved on) covers seqs.
                        seqs += range(message.get("from_seq", message["seq"]), message["seq"] + 1)
                    if message.get("type") == "job_update" and message["status"] == "completed":
                        break
        grown_mib = (rss_kib() - before) / 1024
        async with server.client() as http:
            job = (await http.get(f"/api/jobs/{job_id}")).json()
    assert job["status"] == "completed"
    assert seqs == list(range(1, job["last_seq"] + 1))
    assert job["last_seq"] > count
    # Nothing queues per reader: memory grows by the log's bounded tail and buffers only.
    assert grown_mib < 150, f"RSS grew by {grown_mib:.0f} MiB"


async def start_server_process(home: Path) -> tuple[trio.Process, str]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "nodejob", "serve", "--port", "0", "--home", str(home)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(30):
        while b"\n" not in seen:
            chunk = await process.stdout.receive_some(4096)
            assert chunk, "server exited before it printed its URL"
            seen += chunk
    match = re.search(r"http://[\d.]+:\d+", seen.decode())
    assert match, seen
    return process, match.group(0)


async def follow_until(url: str, token: str, job_id: str, status: str) -> list[dict[str, Any]]:
    ws_url = url.replace("http://", "ws://") + f"/ws?token={token}"
    seen: list[dict[str, Any]] = []
    async with open_websocket_url(ws_url) as ws:
        await ws.send_message(json.dumps({"command": "reconnect_job", "data": {"job_id": job_id}}))
        with trio.fail_after(30):
            while True:
                message = json.loads(await ws.get_message())
                if "seq" in message:
                    seen.append(message)
                    if message["type"] == "job_update" and message["status"] == status:
                        return seen


async def test_sigkilled_server_fails_threaded_jobs_and_keeps_what_was_committed(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    process, url = await start_server_process(home)
    token = (home / "token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            job = (await http.post("/api/jobs/", json={"graph": sleeper(60)})).json()
        # Wait until the Sleep node has reported progress: those messages are committed.
        seen = await follow_until(url, token, job["id"], "running")
        ws_url = url.replace("http://", "ws://") + f"/ws?token={token}"
        async with open_websocket_url(ws_url) as ws:
            await ws.send_message(
                json.dumps(
                    {"command": "reconnect_job", "data": {"job_id": job["id"], "after_seq": 2}}
                )
            )
            with trio.fail_after(30):
                while not any(m.get("type") == "node_progress" for m in seen):
                    message = json.loads(await ws.get_message())
                    if "seq" in message:
                        seen.append(message)
    finally:
        process.send_signal(signal.SIGKILL)
        with trio.fail_after(10):
            await process.wait()
    assert process.returncode == -signal.SIGKILL

    process, url = await start_server_process(home)
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            row = (await http.get(f"/api/jobs/{job['id']}")).json()
            page = (await http.get(f"/api/jobs/{job['id']}/messages")).json()
    finally:
        process.terminate()
        with trio.fail_after(20):
            await process.wait()
    assert row["status"] == "failed"
    assert row["error"] == "server stopped while the job was running"
    stored = page["messages"]
    by_seq = {m["seq"]: m for m in stored}
    # Everything any client saw before the kill is still there, unchanged...
    for message in seen:
        assert by_seq[message["seq"]] == message
    # ... the stream is contiguous, and it ends with the terminal update.
    assert [m["seq"] for m in stored] == list(range(1, len(stored) + 1))
    assert stored[-1]["type"] == "job_update"
    assert stored[-1]["status"] == "failed"
    assert row["last_seq"] == stored[-1]["seq"]
    assert os.stat(home / "token").st_mode & 0o777 == 0o600
