"""Crash anywhere (issue 7): SIGKILL a real ``nodejob serve`` at varied points, restart it.

Each cycle starts a server on the same home, starts ~12 jobs of every available strategy
(threaded, subprocess, and docker when NODEJOB_TEST_DOCKER_IMAGE is set), follows every job
over a WebSocket (new jobs by ``run_job``, jobs left unfinished by earlier cycles by
``reconnect_job`` from seq 0), waits a random delay, and SIGKILLs the server. A last server
lets every job end, then the checks: each job's stored stream is 1..last_seq with no gap or
double and ends with its terminal ``job_update``; every message any client saw is stored
byte for byte; threaded jobs cut by a kill are ``failed`` with "server stopped while the job
was running", out-of-process ones were re-adopted and completed (or failed with a reason
saying where the kill cut them); ``PRAGMA integrity_check`` is ``ok``.

The kill delays come from ``random.Random(seed)``; the seed is printed (``pytest -s``) and
``NODEJOB_CRASH_SEED`` replays it. ``NODEJOB_CRASH_CYCLES`` (default 4) sets the cycles.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import textwrap
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import apsw
import httpx
import pytest
import trio

from nodejob.executions.process import proc_stat
from nodejob.manager import SERVER_STOPPED
from nodejob.protocol import dumps
from tests.hardening import (
    TERMINAL,
    RawWebSocket,
    WsClosed,
    poll_until,
    start_server_process,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.hardening import ServerProcess

DOCKER_IMAGE = os.environ.get("NODEJOB_TEST_DOCKER_IMAGE")
STRATEGIES = ["threaded", "subprocess", *(["docker"] if DOCKER_IMAGE else [])]
CYCLES = int(os.environ.get("NODEJOB_CRASH_CYCLES", "4"))
JOBS_PER_CYCLE = 12
MAX_KILL_DELAY_S = 2.5
DEADLINE_S = 120.0
CUT_REASONS = frozenset(
    {
        SERVER_STOPPED,  # killed while the job was still starting
        "the server stopped before the worker started",
        "the server stopped before the container started",
    }
)
"""Why an out-of-process job may fail when the kill hit it before its work ran."""


def emit_graph(count: int, interval: float) -> dict[str, Any]:
    return {
        "nodes": [
            {
                "id": "e",
                "type": "nodejob.Emit",
                "data": {"count": count, "size": 80, "interval": interval},
            },
            {"id": "out", "type": "nodejob.Output", "data": {"name": "n"}},
        ],
        "edges": [{"source": "e", "target": "out", "targetHandle": "value"}],
    }


def sleep_graph(seconds: float) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds, "value": 7}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
        ],
        "edges": [{"source": "s", "target": "out", "targetHandle": "value"}],
    }


def server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    if DOCKER_IMAGE:
        env["NODEJOB_DOCKER_IMAGE"] = DOCKER_IMAGE
    env.update(extra)
    return env


async def stored_stream(http: httpx.AsyncClient, job_id: str) -> list[str]:
    """The job's stored messages (as their JSON text), read page by page over REST."""
    texts: list[str] = []
    after = 0
    while True:
        response = await http.get(
            f"/api/jobs/{job_id}/messages", params={"after_seq": after, "limit": 97}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        texts += [dumps(m) for m in page["messages"]]
        if not page["has_more"]:
            return texts
        after = page["last_seq"]


async def all_jobs(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    url: str | None = "/api/jobs/?limit=1000"
    while url is not None:
        response = await http.get(url)
        assert response.status_code == 200, response.text
        jobs += response.json()
        url = response.links.get("next", {}).get("url")
    return jobs


def integrity_check(home: Path) -> str:
    connection = apsw.Connection(str(home / "nodejob.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = connection.execute("PRAGMA integrity_check").fetchall()
    finally:
        connection.close()
    return "; ".join(str(row[0]) for row in rows)


def stored_handles(home: Path) -> list[dict[str, Any]]:
    connection = apsw.Connection(str(home / "nodejob.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = connection.execute("SELECT handle FROM jobs WHERE handle IS NOT NULL").fetchall()
    finally:
        connection.close()
    return [json.loads(row[0]) for row in rows]


def reap_leftovers(home: Path) -> list[str]:
    """Stop any worker or container this home left behind; what they were."""
    if not (home / "nodejob.db").exists():
        return []
    found: list[str] = []
    for handle in stored_handles(home):
        pid, start_time = handle.get("pid"), handle.get("start_time")
        if (stat := proc_stat(pid) if pid else None) and stat[1] == start_time and stat[0] != "Z":
            found.append(f"worker {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    if DOCKER_IMAGE:
        import docker

        client = docker.from_env()
        try:
            label = f"nodejob.home={home}"
            for container in client.containers.list(all=True, filters={"label": label}):
                found.append(f"container {container.name} {container.status}")
                container.remove(force=True)
        finally:
            client.close()
    return found


class Follower:
    """One WebSocket client following one job; keeps every stream message it received."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def run(
        self,
        server: ServerProcess,
        command: str,
        data: dict[str, Any],
        task_status: trio.TaskStatus[str],
    ) -> None:
        """Send ``command``; report the job id once replied to; read until the end or a kill."""
        async with await RawWebSocket.open(server.url, server.token) as ws:
            await ws.command(command, **data)
            started = False
            try:
                while True:
                    message = await ws.receive()
                    if "seq" not in message:
                        assert "job_id" in message, message  # a reply, never an error
                        if not started:
                            started = True
                            task_status.started(message["job_id"])
                        continue
                    self.messages.append(message)
                    if message["type"] == "job_update" and message["status"] in TERMINAL:
                        return
            except (WsClosed, trio.BrokenResourceError):
                if not started:
                    raise  # the kill comes only once every follower was answered


async def test_sigkill_at_random_points_loses_doubles_and_corrupts_nothing(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("NODEJOB_CRASH_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    print(f"\ncrash: seed {seed} (NODEJOB_CRASH_SEED replays it), {CYCLES} cycles, {STRATEGIES}")
    home = tmp_path / "home"
    followers: dict[str, list[Follower]] = {}
    strategy_of: dict[str, str] = {}
    kill_delays: list[float] = []
    started = time.monotonic()
    try:
        for cycle in range(CYCLES):
            server = await start_server_process(home, env=server_env())
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=30
            ) as http:
                unfinished = [
                    job["id"] for job in await all_jobs(http) if job["status"] not in TERMINAL
                ]
            delay = round(rng.uniform(0, MAX_KILL_DELAY_S), 3)
            kill_delays.append(delay)
            with trio.fail_after(DEADLINE_S):
                async with trio.open_nursery() as nursery:
                    for job_id in unfinished:
                        follower = Follower()
                        followers[job_id].append(follower)
                        await nursery.start(
                            follower.run,
                            server,
                            "reconnect_job",
                            {"job_id": job_id, "after_seq": 0},
                        )
                    for index in range(JOBS_PER_CYCLE):
                        strategy = STRATEGIES[(cycle + index) % len(STRATEGIES)]
                        if index % 3 == 2:
                            graph = sleep_graph(round(rng.uniform(0.3, 3.0), 2))
                        else:
                            graph = emit_graph(rng.randint(100, 400), rng.choice([0.002, 0.005]))
                        follower = Follower()
                        job_id = await nursery.start(
                            follower.run,
                            server,
                            "run_job",
                            {"graph": graph, "execution_strategy": strategy},
                        )
                        followers[job_id] = [follower]
                        strategy_of[job_id] = strategy
                    await trio.sleep(delay)  # the test's input: where the kill lands
                    assert await server.stop(signal.SIGKILL) == -signal.SIGKILL

        # A last server lets every job end.
        server = await start_server_process(home, env=server_env())
        try:
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=30
            ) as http:

                async def all_ended() -> bool:
                    return all(job["status"] in TERMINAL for job in await all_jobs(http))

                await poll_until(all_ended, seconds=DEADLINE_S, interval=0.2)
                rows = {job["id"]: job for job in await all_jobs(http)}
                stored = {job_id: await stored_stream(http, job_id) for job_id in rows}
        finally:
            assert await server.stop(signal.SIGTERM) == 0, server.stderr()
        assert integrity_check(home) == "ok"
    finally:
        leftovers = reap_leftovers(home)
    elapsed = time.monotonic() - started

    assert set(rows) == set(followers), "a job the clients never heard of, or one lost"
    # Nothing runs on once every job ended. The one allowed leftover: a container whose create
    # request was still in flight in the engine when the server died can appear after the
    # restarted server removed it by name (the deterministic case, a kill after the create
    # returned, is pinned by the test below). A start-up sweep by label would close this.
    unstarted = {
        f"container nodejob-{job_id} created"
        for job_id, row in rows.items()
        if row["error"] == "the server stopped before the container started"
    }
    assert set(leftovers) <= unstarted, leftovers
    outcomes: Counter[str] = Counter()
    checked = 0
    for job_id, row in rows.items():
        strategy = strategy_of[job_id]
        messages = [json.loads(text) for text in stored[job_id]]
        assert [m["seq"] for m in messages] == list(range(1, row["last_seq"] + 1)), job_id
        assert {m["job_id"] for m in messages} == {job_id}
        last = messages[-1]
        assert last["type"] == "job_update", (job_id, last)
        assert last["status"] == row["status"]
        assert sum(m["type"] == "job_update" and m["status"] in TERMINAL for m in messages) == 1
        if row["status"] == "completed":
            assert row["result"]["outputs"], row
        elif strategy == "threaded":
            assert (row["status"], row["error"]) == ("failed", SERVER_STOPPED), row
        else:
            assert row["status"] == "failed", row
            assert row["error"] in CUT_REASONS, row
        outcomes[f"{strategy} {row['status']}"] += 1
        by_seq = {m["seq"]: text for m, text in zip(messages, stored[job_id], strict=True)}
        for follower in followers[job_id]:
            seen = [m["seq"] for m in follower.messages]
            assert seen == list(range(1, len(seen) + 1)), (job_id, seen[:20])
            for message in follower.messages:
                assert by_seq[message["seq"]] == dumps(message), (job_id, message["seq"])
                checked += 1
    print(
        "crash FIGURES: "
        + json.dumps(
            {
                "seed": seed,
                "cycles": CYCLES,
                "jobs": len(rows),
                "outcomes": dict(sorted(outcomes.items())),
                "followers": sum(len(f) for f in followers.values()),
                "messages_stored": sum(len(s) for s in stored.values()),
                "seen_messages_checked": checked,
                "left_behind": leftovers,
                "kill_delays_s": kill_delays,
                "elapsed_s": round(elapsed, 1),
            }
        )
    )


# -- a worker that ignores SIGTERM ------------------------------------------------------------

STUBBORN_PLUGIN = """
    import trio

    from nodejob.workflow.nodes import REQUIRED, Node


    class Stubborn(Node):
        '''Sleeps through any cancellation: the worker so ignores SIGTERM.'''

        type = "crashtest.Stubborn"
        inputs = {"seconds": REQUIRED}

        async def run(self, ctx, *, seconds):
            with trio.CancelScope(shield=True):
                await trio.sleep(seconds)
            return seconds
"""


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as file:
                    data = file.read()
            except OSError:
                continue
            fields = data[data.rindex(b")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != b"Z":
                members.append(int(entry))
    return members


async def test_a_subprocess_worker_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path,
) -> None:
    plugin = tmp_path / "plugin"
    (plugin / "crashtest_plugin-0.dist-info").mkdir(parents=True)
    (plugin / "crashtest_plugin.py").write_text(textwrap.dedent(STUBBORN_PLUGIN))
    (plugin / "crashtest_plugin-0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: crashtest-plugin\nVersion: 0\n"
    )
    (plugin / "crashtest_plugin-0.dist-info" / "entry_points.txt").write_text(
        "[nodejob.nodes]\nstubborn = crashtest_plugin:Stubborn\n"
    )
    grace = 1.0
    env = server_env(PYTHONPATH=str(plugin), NODEJOB_KILL_GRACE_S=str(grace))
    home = tmp_path / "home"
    server = await start_server_process(home, env=env)
    graph = {"nodes": [{"id": "s", "type": "crashtest.Stubborn", "data": {"seconds": 60}}]}
    try:
        async with await RawWebSocket.open(server.url, server.token) as ws:
            await ws.command("run_job", graph=graph, execution_strategy="subprocess")
            reply = await ws.receive()
            job_id = reply.get("job_id")
            assert job_id, reply
            messages: list[dict[str, Any]] = []
            with trio.fail_after(DEADLINE_S):
                while not (
                    messages
                    and messages[-1]["type"] == "node_update"
                    and messages[-1]["status"] == "running"
                ):
                    message = await ws.receive()
                    if "seq" in message:
                        messages.append(message)
                (handle,) = stored_handles(home)
                assert proc_stat(handle["pid"]) is not None
                asked = time.monotonic()
                await ws.command("cancel_job", job_id=job_id)
                while not (
                    messages[-1]["type"] == "job_update" and messages[-1]["status"] in TERMINAL
                ):
                    message = await ws.receive()
                    if "seq" in message:
                        messages.append(message)
                took = time.monotonic() - asked
                group_left = live_group_members(handle["pid"])
    finally:
        assert await server.stop(signal.SIGTERM) == 0, server.stderr()
        reap_leftovers(home)
    assert messages[-1]["status"] == "cancelled", messages[-1]
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    # It took SIGKILL: the node never reported its own cancellation, and the grace passed.
    assert not [m for m in messages if m["type"] == "node_update" and m["status"] != "running"]
    assert took >= grace
    # Cancelled means stopped: when the job was reported cancelled, the worker's process
    # group had no live process (a zombie the reaper has not collected yet does not run).
    assert group_left == []
    assert integrity_check(home) == "ok"


# -- a container created, then the server killed before it stored the handle ------------------


async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)


async def hold_create_answers(
    listener: trio.SocketListener, created: trio.Event, nursery: trio.Nursery
) -> None:
    """A proxy to the Docker engine that forwards everything but the answer to a
    ``POST /containers/create``: the container exists, the server never hears so."""

    async def serve(client: trio.SocketStream) -> None:
        engine = await trio.open_unix_socket("/var/run/docker.sock")
        async with client, engine, trio.open_nursery() as inner:
            requested = trio.Event()

            async def requests() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await client.receive_some(65536):
                        if b"/containers/create" in data:
                            requested.set()
                        await engine.send_all(data)
                inner.cancel_scope.cancel()

            async def answers() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await engine.receive_some(65536):
                        if requested.is_set():
                            created.set()
                            await trio.sleep_forever()  # the answer never arrives
                        await client.send_all(data)
                inner.cancel_scope.cancel()

            inner.start_soon(requests)
            inner.start_soon(answers)

    await trio.serve_listeners(serve, [listener], handler_nursery=nursery)


@pytest.mark.skipif(not DOCKER_IMAGE, reason="NODEJOB_TEST_DOCKER_IMAGE is not set")
async def test_a_kill_between_creating_a_container_and_storing_its_handle_leaves_none(
    tmp_path: Path,
) -> None:
    import docker

    home = tmp_path / "home"
    socket_path = tmp_path / "engine.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(socket_path))
    sock.listen()
    created = trio.Event()
    client = docker.from_env()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_create_answers, trio.SocketListener(sock), created, nursery)
            env = server_env(NODEJOB_DOCKER_HOST=f"unix://{socket_path}")
            server = await start_server_process(home, env=env)
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=30
            ) as http:
                response = await http.post(
                    "/api/jobs/", json={"graph": sleep_graph(1), "execution_strategy": "docker"}
                )
                assert response.status_code == 201, response.text
                job_id = response.json()["id"]
            with trio.fail_after(DEADLINE_S):
                await created.wait()
            assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
            nursery.cancel_scope.cancel()
        server = await start_server_process(home, env=server_env())
        try:
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=30
            ) as http:

                async def ended() -> bool:
                    job = (await http.get(f"/api/jobs/{job_id}")).json()
                    return job["status"] in TERMINAL

                await poll_until(ended, seconds=DEADLINE_S)
                row = (await http.get(f"/api/jobs/{job_id}")).json()
        finally:
            assert await server.stop(signal.SIGTERM) == 0, server.stderr()
        assert (row["status"], row["error"]) == (
            "failed",
            "the server stopped before the container started",
        )
        label = f"nodejob.home={home}"
        left = client.containers.list(all=True, filters={"label": label})
        assert [c.name for c in left] == []
    finally:
        client.close()
        reap_leftovers(home)
