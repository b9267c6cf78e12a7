"""Docker engine faults (issue "hardening"): dockerd restarted while containers run, the job's
spool that tops up what the engine lost, and the sweep of containers that jobs left behind.

Every engine here is a private ``dockerd`` that this module starts itself (its own socket,
data root and exec root under a short /tmp directory; no bridge, no iptables) and loads the
test image into; the shared engine is only read, once, by ``docker save``. A test stops the
private engine with SIGTERM mid-job, as systemd would, and starts it again with the same
arguments: with ``--live-restore`` (containers run on) and without (the engine stops them).
The daemon is torn down at the end of the module whatever happened, its containerd and
container shims included. Skipped only when NODEJOB_TEST_DOCKER_IMAGE is unset or there is
no ``dockerd``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import httpx
import pytest
import trio

from nodejob.config import Config
from nodejob.log import MessageLog
from nodejob.manager import open_manager
from nodejob.protocol import ExecutionStrategy, JobStatus, ProcessingContext, RunJobRequest, dumps
from nodejob.store import Store
from tests.hardening import (
    TERMINAL,
    RawWebSocket,
    container_names,
    emitter,
    poll_until,
    remove_containers,
    start_server_process,
    stored_stream,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from tests.hardening import ServerProcess

IMAGE = os.environ.get("NODEJOB_TEST_DOCKER_IMAGE")
pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(not IMAGE, reason="NODEJOB_TEST_DOCKER_IMAGE is not set"),
    pytest.mark.skipif(not shutil.which("dockerd"), reason="no dockerd binary to start"),
]
DEADLINE_S = 120.0
ENGINE_START_S = 60.0
ENGINE_STOP_S = 60.0
CLEANUP_S = 1.0
"""The servers' cleanup interval here: the container sweep runs that often."""
ENGINE_STOPPED = "the container was stopped while the Docker engine stopped or restarted"
LOST = "lost the Docker engine while following the container: "
CTX = ProcessingContext(user_id="u1")


# -- a private Docker engine -----------------------------------------------------------------


def _pings(path: Path) -> bool:
    """Whether a dockerd answers ``GET /_ping`` on the unix socket ``path`` (a new connection)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    except OSError:
        return False
    return answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n", 1)[0]


class PrivateEngine:
    """A dockerd of this module's own, restartable with the same arguments."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.live_restore = False
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.root / 'd.sock'}"

    def args(self) -> list[str]:
        root = self.root
        return [
            *("dockerd", "--host", self.host, "--data-root", str(root / "data")),
            *("--exec-root", str(root / "x"), "--pidfile", str(root / "d.pid")),
            *("--bridge", "none", "--iptables=false", "--ip6tables=false"),
            *(["--live-restore"] if self.live_restore else []),
        ]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def spawn(self, *, live_restore: bool) -> None:
        assert not self.running
        self.live_restore = live_restore
        with (self.root / "dockerd.log").open("ab") as log:
            self.process = subprocess.Popen(self.args(), stdout=log, stderr=log)

    def answers(self) -> bool:
        if not self.running:
            tail = (self.root / "dockerd.log").read_text(errors="replace")[-2000:]
            raise AssertionError(f"the private dockerd exited: {tail}")
        return _pings(self.root / "d.sock")

    def start_sync(self, *, live_restore: bool) -> None:
        """Start it and wait until it answers, blocking (for set-up and tear-down)."""
        self.spawn(live_restore=live_restore)
        deadline = time.monotonic() + ENGINE_START_S
        while not self.answers():
            assert time.monotonic() < deadline, "the private dockerd did not answer"
            time.sleep(0.05)

    async def start(self, *, live_restore: bool) -> None:
        """Start it and wait until it answers."""
        self.spawn(live_restore=live_restore)
        await poll_until(self._answers, seconds=ENGINE_START_S, interval=0.05)

    async def stop(self) -> None:
        """SIGTERM, as systemd stops dockerd; returns once it has exited."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        await poll_until(self._exited, seconds=ENGINE_STOP_S, interval=0.05)

    async def ensure(self, *, live_restore: bool) -> None:
        """Running, with or without ``--live-restore``."""
        if self.running and self.live_restore != live_restore:
            await self.stop()
        if not self.running:
            await self.start(live_restore=live_restore)

    async def _answers(self) -> bool:
        return await trio.to_thread.run_sync(self.answers)

    async def _exited(self) -> bool:
        return not self.running

    @functools.cached_property
    def client(self) -> Any:
        """One SDK client for the module: each new one would leave pooled sockets to the GC."""
        import docker

        return docker.DockerClient(base_url=self.host, timeout=30)

    async def container_names(self, **filters: Any) -> list[str]:
        return await trio.to_thread.run_sync(
            functools.partial(container_names, self.client, **filters)
        )

    def load_image(self, image: str) -> None:
        """``docker save IMAGE`` from the shared engine, ``docker load`` into this one."""
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        try:
            subprocess.run(
                ["docker", "-H", self.host, "load"],
                stdin=save.stdout,
                check=True,
                capture_output=True,
                timeout=300,
            )
        finally:
            assert save.stdout is not None
            save.stdout.close()
            assert save.wait(timeout=300) == 0

    def destroy(self) -> None:
        """Remove its containers, stop it, kill what it left (containerd, shims), unmount,
        delete its directory. Best effort at each step: the next must run whatever failed."""
        with contextlib.suppress(Exception):
            if not self.running:  # started without --live-restore, it stops what runs
                self.start_sync(live_restore=False)
            remove_containers(self.client)
        with contextlib.suppress(Exception):
            self.client.close()
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout=ENGINE_STOP_S)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for pid in self._leftover_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mount in self._mounts():
            subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def container_processes(self) -> list[int]:
        """The processes of its running containers: the children of its container shims."""
        ours = set(self._leftover_processes())  # dockerd's, containerd's, the shims
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) not in ours:
                with contextlib.suppress(OSError):
                    status = (entry / "status").read_text()
                    parent = re.search(r"^PPid:\s+(\d+)$", status, re.MULTILINE)
                    if parent and int(parent.group(1)) in ours:
                        found.append(int(entry.name))
        return found

    async def runs_no_container(self) -> bool:
        return not await trio.to_thread.run_sync(self.container_processes)

    def _leftover_processes(self) -> list[int]:
        """Processes started for this engine (containerd, shims): they name its root."""
        found = []
        marker = str(self.root).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if marker in (entry / "cmdline").read_bytes():
                        found.append(int(entry.name))
        return found

    def _mounts(self) -> list[str]:
        """Mount points under its root, deepest first."""
        points = [
            line.split()[1]
            for line in Path("/proc/mounts").read_text().splitlines()
            if line.split()[1].startswith(f"{self.root}/")
        ]
        return sorted(points, key=len, reverse=True)


@pytest.fixture(scope="module")
def engine() -> Iterator[PrivateEngine]:
    # Short: the engine's unix sockets live under it (108-byte socket path limit).
    engine = PrivateEngine(Path(tempfile.mkdtemp(prefix="njd", dir="/tmp")))
    try:
        engine.start_sync(live_restore=False)
        assert IMAGE is not None
        engine.load_image(IMAGE)
        yield engine
    finally:
        engine.destroy()


# -- a server on the private engine, and a follower ------------------------------------------


def server_env(engine: PrivateEngine, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    assert IMAGE is not None
    env.update(
        NODEJOB_DOCKER_IMAGE=IMAGE,
        NODEJOB_DOCKER_HOST=engine.host,
        NODEJOB_CLEANUP_INTERVAL_S=str(CLEANUP_S),
        NODEJOB_KILL_GRACE_S="2",
    )
    env.update(extra)
    return env


def sleeper(seconds: float = 120) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds, "value": 1}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
        ],
        "edges": [{"source": "s", "target": "out", "targetHandle": "value"}],
    }


class Follower:
    """One WebSocket client: starts jobs, keeps every stream message and reply it received."""

    def __init__(self, ws: RawWebSocket) -> None:
        self.ws = ws
        self.seen: dict[str, list[dict[str, Any]]] = {}
        self.replies: list[dict[str, Any]] = []
        self.arrived: dict[str, list[float]] = {}
        """When each stream message arrived (trio clock), per job."""

    async def run_job(self, graph: dict[str, Any]) -> str:
        await self.ws.command("run_job", graph=graph, execution_strategy="docker")
        await self.until(lambda: bool(self.replies))
        job_id: str = self.replies.pop()["job_id"]
        return job_id

    async def until(self, done: Callable[[], bool]) -> None:
        """Read messages until ``done()``."""
        while not done():
            message = await self.ws.receive()
            if "seq" not in message:
                assert "job_id" in message, message  # a reply, never an error
                self.replies.append(message)
                continue
            self.seen.setdefault(message["job_id"], []).append(message)
            self.arrived.setdefault(message["job_id"], []).append(trio.current_time())

    def count(self, job_id: str, kind: str) -> int:
        return sum(m["type"] == kind for m in self.seen.get(job_id, []))

    def ended(self, job_id: str) -> bool:
        messages = self.seen.get(job_id, [])
        return bool(messages) and is_terminal(messages[-1])

    def node_running(self, job_id: str) -> bool:
        return any(
            m["type"] == "node_update" and m["status"] == "running"
            for m in self.seen.get(job_id, [])
        )


def is_terminal(message: dict[str, Any]) -> bool:
    return message["type"] == "job_update" and message["status"] in TERMINAL


async def check_stream(
    http: httpx.AsyncClient, job_id: str, seen: list[dict[str, Any]]
) -> dict[str, Any]:
    """The stored stream is 1..last_seq with one terminal update, last, matching the row;
    everything the follower saw (from seq 1, contiguously) is stored byte for byte."""
    row = (await http.get(f"/api/jobs/{job_id}")).json()
    texts = await stored_stream(http, job_id)
    messages = [json.loads(text) for text in texts]
    assert [m["seq"] for m in messages] == list(range(1, row["last_seq"] + 1))
    assert sum(is_terminal(m) for m in messages) == 1
    assert is_terminal(messages[-1])
    assert messages[-1]["status"] == row["status"]
    assert [m["seq"] for m in seen] == list(range(1, len(seen) + 1))
    for message in seen:
        assert texts[message["seq"] - 1] == dumps(message), message["seq"]
    return row


async def wait_ended(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    async def ended() -> bool:
        return (await http.get(f"/api/jobs/{job_id}")).json()["status"] in TERMINAL

    await poll_until(ended, seconds=DEADLINE_S, interval=0.1)
    row: dict[str, Any] = (await http.get(f"/api/jobs/{job_id}")).json()
    return row


async def a_new_job_runs_and_nothing_is_left(
    engine: PrivateEngine, http: httpx.AsyncClient
) -> None:
    """A docker job started now completes, and the engine ends with no container at all
    (a container the engine stopped while away is the sweep's, every CLEANUP_S)."""
    response = await http.post(
        "/api/jobs/", json={"graph": emitter(3), "execution_strategy": "docker"}
    )
    assert response.status_code == 201, response.text
    row = await wait_ended(http, response.json()["id"])
    assert (row["status"], row["error"]) == ("completed", None)

    async def no_container() -> bool:
        return await engine.container_names() == []

    await poll_until(no_container, seconds=DEADLINE_S, interval=0.1)


async def stopped(server: ServerProcess) -> None:
    """SIGTERM: the server shuts down promptly and cleanly, whatever the engine did."""
    assert await server.stop(signal.SIGTERM) == 0, server.stderr()[-3000:]
    assert "Traceback" not in server.stderr(), server.stderr()[-3000:]


class Served(NamedTuple):
    server: ServerProcess
    ws: RawWebSocket
    http: httpx.AsyncClient
    follower: Follower


@contextlib.asynccontextmanager
async def serving(engine: PrivateEngine, home: Path, **env: str) -> AsyncIterator[Served]:
    """A server on ``engine`` with one WebSocket follower and an HTTP client; on the way out
    the server must stop cleanly (``stopped``), also when the block stopped it already."""
    server = await start_server_process(home, env=server_env(engine, **env))
    try:
        async with (
            await RawWebSocket.open(server.url, server.token) as ws,
            httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30) as http,
        ):
            yield Served(server, ws, http, Follower(ws))
    finally:
        await stopped(server)


def figures(name: str, **values: Any) -> None:
    print(f"\n{name} FIGURES: {values}")


# -- dockerd restarted while a container runs ------------------------------------------------


async def test_an_engine_restarted_with_live_restore_loses_and_doubles_nothing(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    await engine.ensure(live_restore=True)
    async with serving(engine, tmp_path / "home") as (server, _ws, http, follower):
        with trio.fail_after(DEADLINE_S):
            job_id = await follower.run_job(emitter(60, size=80, interval=0.1))
            await follower.until(lambda: follower.count(job_id, "log_update") >= 5)
            down = trio.current_time()
            await engine.stop()
            stopped_at = trio.current_time()
            row = (await http.get(f"/api/jobs/{job_id}")).json()
            assert row["status"] == "running", row  # waiting for the engine, not failed
            before = row["last_seq"]
            await engine.start(live_restore=True)
            up = trio.current_time()
            await follower.until(lambda: follower.ended(job_id))
        seen = follower.seen[job_id]
        row = await check_stream(http, job_id, seen)
        assert (row["status"], row["error"]) == ("completed", None), row
        assert row["result"] == {"outputs": {"n": 60}}
        assert follower.count(job_id, "log_update") == 60
        first_after = next(
            at for m, at in zip(seen, follower.arrived[job_id], strict=True) if m["seq"] > before
        )
        await a_new_job_runs_and_nothing_is_left(engine, http)
    again = re.search(r"Docker engine answers again after ([\d.]+) s", server.stderr())
    assert again, server.stderr()  # it noticed the engine go, and come back
    figures(
        "live-restore",
        engine_stop_s=round(stopped_at - down, 2),
        engine_start_s=round(up - stopped_at, 2),
        first_new_message_after_engine_up_s=round(first_after - up, 2),
        server_saw_engine_again_after_s=again and float(again.group(1)),
        messages=len(seen),
    )


async def test_an_engine_restarted_without_live_restore_fails_the_job_with_the_reason(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    await engine.ensure(live_restore=False)
    async with serving(engine, tmp_path / "home") as (_server, _ws, http, follower):
        with trio.fail_after(DEADLINE_S):
            job_id = await follower.run_job(emitter(400, size=80, interval=0.05))
            await follower.until(lambda: follower.count(job_id, "log_update") >= 5)
            await engine.stop()  # it stops the container: the worker takes it for a cancel
            await engine.start(live_restore=False)
            await follower.until(lambda: follower.ended(job_id))
        row = await check_stream(http, job_id, follower.seen[job_id])
        assert row["status"] == "failed", row
        assert re.fullmatch(rf"{ENGINE_STOPPED} \(exit code \d+\)", row["error"]), row
        assert follower.count(job_id, "log_update") < 400
        await a_new_job_runs_and_nothing_is_left(engine, http)
    figures("no-live-restore", error=row["error"], messages=len(follower.seen[job_id]))


async def test_a_cancel_while_the_engine_is_away_ends_cancelled_once_it_is_back(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    await engine.ensure(live_restore=True)
    async with serving(engine, tmp_path / "home") as (_server, ws, http, follower):
        with trio.fail_after(DEADLINE_S):
            job_id = await follower.run_job(sleeper())
            await follower.until(lambda: follower.node_running(job_id))
            await engine.stop()
            await ws.command("cancel_job", job_id=job_id)
            await follower.until(lambda: bool(follower.replies))
            assert follower.replies == [{"message": "Job cancelled", "job_id": job_id}]
            row = (await http.get(f"/api/jobs/{job_id}")).json()
            assert row["status"] == "running", row  # not cancelled before it has stopped
            await engine.start(live_restore=True)
            await follower.until(lambda: follower.ended(job_id))
        row = await check_stream(http, job_id, follower.seen[job_id])
        assert (row["status"], row["error"]) == ("cancelled", None), row
        node = follower.seen[job_id][-2]  # the worker cancelled its node: it got SIGTERM
        assert (node["type"], node["node_id"], node["status"]) == (
            "node_update",
            "s",
            "cancelled",
        )
        await a_new_job_runs_and_nothing_is_left(engine, http)


async def test_an_engine_that_stays_away_fails_its_jobs_and_the_sweep_removes_them_later(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    await engine.ensure(live_restore=True)
    async with serving(engine, tmp_path / "home", NODEJOB_DOCKER_RECONNECT_S="5") as served:
        _, ws, http, follower = served
        with trio.fail_after(DEADLINE_S):
            cancelled = await follower.run_job(sleeper())
            left = await follower.run_job(sleeper())
            await follower.until(
                lambda: follower.node_running(cancelled) and follower.node_running(left)
            )
            await engine.stop()
            await ws.command("cancel_job", job_id=cancelled)
            await follower.until(lambda: follower.ended(cancelled) and follower.ended(left))
        rows = {
            job_id: await check_stream(http, job_id, follower.seen[job_id])
            for job_id in (cancelled, left)
        }
        assert rows[left]["status"] == "failed"
        assert rows[left]["error"].startswith(LOST), rows[left]
        assert rows[left]["error"].endswith("(not back within 5 s)"), rows[left]
        assert rows[cancelled]["status"] == "failed"
        assert rows[cancelled]["error"].startswith(
            f"cancelled, but the container could not be verified stopped: {LOST}"
        ), rows[cancelled]
        # Live-restored, both containers run on; their jobs have ended: the sweep's.
        await engine.start(live_restore=True)
        await a_new_job_runs_and_nothing_is_left(engine, http)


async def test_a_server_restarted_while_the_engine_is_away_readopts_once_it_is_back(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    """The container ends while the engine is down: the engine loses what it wrote meanwhile
    (its last lines and the worker's terminal line never reach the container's log), and the
    job's spool brings them. The job completes with every line."""
    await engine.ensure(live_restore=True)
    home = tmp_path / "home"
    async with serving(engine, home) as (server, _, _, first):
        with trio.fail_after(DEADLINE_S):
            job_id = await first.run_job(emitter(LINES, size=80, interval=0.2))
            await first.until(lambda: first.count(job_id, "log_update") >= 5)
        await stopped(server)  # the container runs on, for the next server
    await engine.stop()
    spool = home / "jobs" / job_id / "stream.jsonl"
    assert not has_terminal_line(spool), "the job ended before the engine stopped"
    async with serving(engine, home) as (server, ws, http, again):
        await ws.command("reconnect_job", job_id=job_id, after_seq=0)
        with trio.fail_after(DEADLINE_S):
            await again.until(lambda: again.count(job_id, "log_update") >= 5)
            row = (await http.get(f"/api/jobs/{job_id}")).json()
            assert row["status"] == "running", row  # re-adopted, waiting for the engine
            # The worker writes the rest and exits, all while the engine is down.
            await poll_until(engine.runs_no_container, seconds=DEADLINE_S, interval=0.1)
            assert has_terminal_line(spool)
            await engine.start(live_restore=True)
            await again.until(lambda: again.ended(job_id))
        row = await check_stream(http, job_id, again.seen[job_id])
        await check_stream(http, job_id, first.seen[job_id])
        assert (row["status"], row["error"]) == ("completed", None), row
        assert row["result"] == {"outputs": {"n": LINES}}
        # The engine lost the container's last lines; every log_update came through all
        # the same, those past the end of the container's log from the spool.
        topped = re.search(
            rf"job {job_id}: the log of container \w+ ended at seq (\d+) without the "
            r"worker's last line; its spool brought seqs up to (\d+) and the worker's "
            "terminal line",
            server.stderr(),
        )
        assert topped, server.stderr()[-3000:]
        log_end, spool_end = int(topped.group(1)), int(topped.group(2))
        assert log_end < spool_end == row["last_seq"] - 1
        lines = [m for m in again.seen[job_id] if m["type"] == "log_update"]
        assert len(lines) == again.count(job_id, "log_update") == LINES
        assert sum(m["seq"] > log_end for m in lines) > 0
        assert not spool.parent.exists()  # nothing left of the job on the host
        await a_new_job_runs_and_nothing_is_left(engine, http)
    figures("spool top-up", log_ended_at=log_end, spool_brought_up_to=spool_end)


LINES = 60
"""That test's job emits a line every 0.2 s: 12 s in all, most of them after the engine stopped."""


async def test_a_container_removed_while_the_server_was_down_ends_as_its_spool_says(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    """The container ends and is removed (``docker rm``) while no server runs: the next server
    cannot follow it, but the job's spool says how it ended, so the job completes with every
    line rather than failing with "container ... is gone"."""
    await engine.ensure(live_restore=True)
    home = tmp_path / "home"
    async with serving(engine, home) as (server, _, _, first):
        with trio.fail_after(DEADLINE_S):
            job_id = await first.run_job(emitter(20, size=80, interval=0.1))
            await first.until(lambda: first.count(job_id, "log_update") >= 2)
        await stopped(server)  # the container runs on
    name = f"nodejob-{job_id}"
    container = await trio.to_thread.run_sync(engine.client.containers.get, name)
    await trio.to_thread.run_sync(functools.partial(container.wait, timeout=DEADLINE_S))
    await trio.to_thread.run_sync(container.remove)
    async with serving(engine, home) as (server, ws, http, again):
        await ws.command("reconnect_job", job_id=job_id, after_seq=0)
        with trio.fail_after(DEADLINE_S):
            await again.until(lambda: again.ended(job_id))
        row = await check_stream(http, job_id, again.seen[job_id])
        await check_stream(http, job_id, first.seen[job_id])
        assert (row["status"], row["error"]) == ("completed", None), row
        assert again.count(job_id, "log_update") == 20
        assert not (home / "jobs" / job_id).exists()
        await a_new_job_runs_and_nothing_is_left(engine, http)


def has_terminal_line(spool: Path) -> bool:
    """Whether the worker wrote its terminal line to the job's spool (read as root)."""
    lines = spool.read_bytes().split(b"\n")[:-1]  # whole lines: the worker may be writing
    return bool(lines) and is_terminal(json.loads(lines[-1]))


# -- the spool: the worker's copy, the server's top-up -------------------------------------


def test_a_tee_that_fails_stops_copying_and_the_stream_goes_on(tmp_path: Path) -> None:
    """The worker's copy of its stream (docker: the spool) never costs the stream itself: a
    copy that cannot be written (a full disk: /dev/full) or opened ends, said once on stderr,
    and stdout still gets every line; one that can is the stream byte for byte."""
    request = tmp_path / "request.json"
    graph = emitter(2000, size=100)
    request.write_text(dumps({"job_id": "j", "first_seq": 3, "graph": graph, "params": {}}))
    copy = tmp_path / "copy.jsonl"
    copy.touch()
    cases = {
        "/dev/full": "stopped copying the stream to /dev/full: [Errno 28] No space left",
        str(tmp_path / "none" / "copy"): "cannot copy the stream to ",
        str(copy): None,
    }
    for tee, said in cases.items():
        worker = subprocess.run(
            [sys.executable, "-m", "nodejob", "worker", "--request", str(request), "--tee", tee],
            capture_output=True,
            timeout=120,
            check=False,
        )
        stderr = worker.stderr.decode()
        assert worker.returncode == 0, stderr
        messages = [json.loads(line) for line in worker.stdout.splitlines()]
        assert [m["seq"] for m in messages] == list(range(3, 3 + len(messages)))
        assert sum(m["type"] == "log_update" for m in messages) == 2000
        assert messages[-1]["status"] == "completed"
        if said is None:
            assert stderr == ""
            assert copy.read_bytes() == worker.stdout
        else:
            assert stderr.count("nodejob worker:") == 1, stderr
            assert said in stderr, stderr
            assert stderr.rstrip().endswith("; the stream goes on"), stderr


async def test_the_spool_tops_up_what_the_log_lost_and_never_makes_things_worse(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The server's side (jobfiles.top_up, on a real message log): a spool brings what the
    container's log lost, each seq once; an absent, short or corrupt spool adds what it can
    and fails nothing; the files are made with the modes the module documents."""
    store = await Store.open(tmp_path / "nodejob.db")
    try:
        async with trio.open_nursery() as nursery:
            log = MessageLog(store, 100)
            await nursery.start(log.run)
            await spool_cases(log, tmp_path, caplog)
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def spool_cases(log: MessageLog, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The cases of the test above, on a running message log."""
    from nodejob.executions.jobfiles import prepare, top_up
    from nodejob.executions.stream import StreamIngester
    from nodejob.protocol import MAX_MESSAGE_BYTES
    from nodejob.store import JobRecord

    def line(job_id: str, seq: int, kind: str = "log_update", **fields: Any) -> bytes:
        return dumps({"type": kind, "job_id": job_id, "seq": seq, **fields}).encode() + b"\n"

    def stream(job_id: str, last: int) -> bytes:
        """seq 2 .. last - 1 log lines (a stray print among them), then the end."""
        body = b"".join(line(job_id, seq, content=str(seq)) for seq in range(2, last))
        end = line(job_id, last, "job_update", status="completed", result={"outputs": {}})
        cut = body.index(b"\n", 100) + 1
        return body[:cut] + b"not a message\n" + body[cut:] + end

    def ingester_of(job_id: str, log_bytes: bytes, spool: bytes | None) -> StreamIngester:
        """A job whose container log brought ``log_bytes``, and its spool (None: none)."""
        log.create(
            JobRecord(
                id=job_id,
                user_id="u1",
                job_type="workflow",
                status=JobStatus.STARTING,
                workflow_id=None,
                execution_strategy="docker",
                params={},
                graph={},
                created_at=time.time(),
            )
        )
        _, path = prepare(tmp_path / job_id, {"job_id": job_id})
        if spool is None:
            path.unlink()
        else:
            path.write_bytes(spool)
        ingester = StreamIngester(log, job_id, source="container c")
        ingester.feed(log_bytes)
        return ingester

    # The log lost its end (and stopped mid-line): the spool brings the rest, once each.
    full = stream("lost", 40)
    ingester = ingester_of("lost", full[: len(full) // 2], full)
    await top_up(ingester, tmp_path / "lost", log)
    assert ingester.outcome is not None
    assert ingester.outcome.status is JobStatus.COMPLETED
    assert log.last_seq("lost") == 39
    assert ingester.skipped == 2  # the stray print, seen in the log and in the spool
    assert "its spool brought seqs up to 39 and the worker's terminal line" in caplog.text

    # Absent, short, or cut by a line over the limit: what it has, never an error.
    ingester = ingester_of("absent", full[:300].replace(b"lost", b"absent"), None)
    before = log.last_seq("absent")
    await top_up(ingester, tmp_path / "absent", log)
    assert (ingester.outcome, log.last_seq("absent")) == (None, before)
    ingester = ingester_of("short", b"", stream("short", 40)[:700])
    await top_up(ingester, tmp_path / "short", log)
    assert ingester.outcome is None
    assert 2 < log.last_seq("short") < 39
    huge = line("huge", 3, content="x" * MAX_MESSAGE_BYTES)
    ingester = ingester_of("huge", b"", line("huge", 2) + huge + line("huge", 4))
    await top_up(ingester, tmp_path / "huge", log)
    assert (ingester.outcome, log.last_seq("huge")) == (None, 2)
    assert "stopped reading the spool" in caplog.text
    # The spool is the server's to read and write; the container's user may only write.
    directory = tmp_path / "huge"
    assert (directory / "stream.jsonl").stat().st_mode & 0o777 == 0o622
    assert (directory / "request.json").stat().st_mode & 0o777 == 0o644
    assert directory.stat().st_mode & 0o777 == 0o700


# -- the sweep of leftover containers ----------------------------------------------------------


async def test_the_sweep_removes_exactly_the_containers_of_finished_and_unknown_jobs(
    engine: PrivateEngine, tmp_path: Path
) -> None:
    from nodejob.executions.engine import HOME_LABEL, LABEL, sweep_containers

    await engine.ensure(live_restore=False)
    assert IMAGE is not None
    home = tmp_path / "home"
    config = Config(
        home=home,
        docker_host=engine.host,
        docker_image=IMAGE,
        cleanup_interval_s=0.2,
        kill_grace_s=2,
    )

    async def create(name: str, job_id: str, job_home: Path) -> None:
        labels = {LABEL: job_id, HOME_LABEL: str(job_home)}
        await trio.to_thread.run_sync(
            functools.partial(
                engine.client.containers.create, IMAGE, ["true"], name=name, labels=labels
            )
        )

    store = await Store.open(config.db_path)
    try:
        async with open_manager(store, config) as manager:
            finished = await manager.start_job(RunJobRequest(graph=emitter(1)), CTX)
            docker = ExecutionStrategy.DOCKER
            live = await manager.start_job(
                RunJobRequest(graph=sleeper(), execution_strategy=docker), CTX
            )
            with trio.fail_after(DEADLINE_S):
                await wait_row(store, finished.id, lambda job: job.is_finished)
                await wait_row(store, live.id, lambda job: bool(job.handle))
                await create("left-finished", finished.id, home)
                await create("left-unknown", uuid.uuid4().hex, home)
                await create("other-home", finished.id, tmp_path / "elsewhere")
                await create("live-twin", live.id, home)  # say, a create still in flight

                async def swept() -> bool:
                    names = await engine.container_names(label=f"{HOME_LABEL}={home}")
                    return "left-finished" not in names and "left-unknown" not in names

                await poll_until(swept, seconds=DEADLINE_S, interval=0.05)
                assert await sweep_containers(store, config) == 0  # nothing more to remove
                assert await engine.container_names() == [
                    "live-twin",
                    f"nodejob-{live.id}",
                    "other-home",
                ]
                await manager.cancel_job(live.id)
                await wait_row(store, live.id, lambda job: job.is_finished)
                await poll_until(
                    no_container_named(engine, "live-twin"), seconds=DEADLINE_S, interval=0.05
                )
            assert await engine.container_names() == ["other-home"]
    finally:
        store.close()
        await trio.to_thread.run_sync(
            functools.partial(engine.client.api.remove_container, "other-home", force=True)
        )


def no_container_named(engine: PrivateEngine, name: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return name not in await engine.container_names()

    return check


async def wait_row(store: Store, job_id: str, done: Callable[[Any], bool]) -> None:
    async def check() -> bool:
        job = await store.get_job(job_id)
        return job is not None and done(job)

    await poll_until(check, seconds=DEADLINE_S, interval=0.05)


async def test_the_sweep_without_an_engine_costs_one_debug_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from nodejob.executions.engine import sweep_containers

    config = Config(home=tmp_path / "home", docker_host=f"unix://{tmp_path}/none.sock")
    store = await Store.open(config.db_path)
    try:
        with caplog.at_level(logging.DEBUG, logger="nodejob.executions.engine"):
            assert await sweep_containers(store, config) == 0
    finally:
        store.close()
    records = [r for r in caplog.records if r.name == "nodejob.executions.engine"]
    assert [r.levelname for r in records] == ["DEBUG"]
    assert records[0].getMessage().startswith("container sweep skipped: no Docker engine")
