"""Storage faults (issue 7): the database locked by another process, a damaged or newer
database at start-up, and the disk filling up under NODEJOB_HOME.

What must hold: the server keeps serving; a job that could not write waits and then completes
with nothing lost (seqs contiguous, and what a client saw is what is stored); a write that
cannot be done is a 503 naming the reason, never a 500; a database nodejob cannot use stops
``nodejob serve`` with one clear line and exit status 2, and is never modified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import apsw
import httpx
import pytest
import trio

from nodejob.executions.process import SPOOL_NAME, job_dir, proc_stat
from nodejob.store import Store
from tests.conftest import start_server
from tests.hardening import (
    TERMINAL,
    RawWebSocket,
    emitter,
    follow_job,
    metric,
    poll_until,
    start_server_process,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

LOCKER = r"""
import sys, apsw
connection = apsw.Connection(sys.argv[1])
connection.set_busy_timeout(10_000)
connection.execute("BEGIN IMMEDIATE")
connection.execute("INSERT INTO workflows VALUES ('nobody', 'lock', 'lock', '{}', 0, 0)")
print("locked", flush=True)
sys.stdin.readline()  # hold the write lock until told
connection.execute("ROLLBACK")
connection.close()
print("released", flush=True)
"""


async def wait_for_metric(http: httpx.AsyncClient, name: str, value: float) -> None:
    async def reached() -> bool:
        return await metric(http, name) == value

    await poll_until(reached, seconds=60, interval=0.05)


def stored_messages(db: Path, job_id: str) -> list[str]:
    connection = apsw.Connection(str(db))
    try:
        rows = connection.execute(
            "SELECT body FROM messages WHERE job_id = ? ORDER BY seq", (job_id,)
        ).fetchall()
        return [str(row[0]) for row in rows]
    finally:
        connection.close()


def integrity(db: Path) -> list[Any]:
    connection = apsw.Connection(str(db))
    try:
        return connection.execute("PRAGMA integrity_check").fetchall()
    finally:
        connection.close()


# -- a write lock held by another process ----------------------------------------------------

DOCKER_IMAGE = os.environ.get("NODEJOB_TEST_DOCKER_IMAGE")
DOCKER = [
    pytest.mark.docker,
    pytest.mark.skipif(not DOCKER_IMAGE, reason="NODEJOB_TEST_DOCKER_IMAGE is not set"),
]
STRATEGIES = ["threaded", "subprocess", pytest.param("docker", marks=DOCKER)]


def spool_of(home: Path, job_id: str) -> Path:
    """A subprocess job's spool file (the worker's stdout)."""
    return job_dir(home, job_id) / SPOOL_NAME


def spool_lines(spool: Path) -> int:
    """Whole lines in a spool file so far (0 before the worker made it)."""
    try:
        return spool.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_write_lock_held_by_another_process_delays_but_loses_nothing(
    nursery: trio.Nursery, tmp_path: Path, strategy: str
) -> None:
    """Another process holds BEGIN IMMEDIATE for longer than the busy timeout (10 s) while a
    job emits: the server answers reads throughout, a write it cannot do is a 503, new jobs
    are refused while commits fail, and once the lock goes the job completes with every
    message, in order, exactly as its follower saw them.

    Out of process, the worker does not wait for the server's commits: a subprocess worker
    keeps writing its spool file while the lock is held, and the spool keeps those lines (the
    server removes it only once they are committed)."""
    server = await start_server(nursery, tmp_path / "home", docker_image=DOCKER_IMAGE or "unused")
    seen: list[dict[str, Any]] = []
    done = trio.Event()
    async with server.client() as http, await RawWebSocket.open(server.url, server.token) as ws:
        await ws.command(
            "run_job",
            graph=emitter(3000, size=20, interval=0.002),
            execution_strategy=strategy,
        )
        job_id = (await ws.reply())["job_id"]
        spool = spool_of(server.config.home, job_id)

        async def follow() -> None:
            await follow_job(ws, job_id, seen)
            done.set()

        nursery.start_soon(follow)

        async def emitting() -> bool:
            return sum(m["type"] == "log_update" for m in seen) >= 10

        await poll_until(emitting, seconds=60)  # the worker (if any) is up and writing
        locker = await trio.lowlevel.open_process(
            [sys.executable, "-c", LOCKER, str(server.config.db_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert locker.stdin is not None
        assert locker.stdout is not None
        try:
            with trio.fail_after(30):
                assert (await locker.stdout.receive_some(100)).startswith(b"locked")
            locked_at = (await http.get(f"/api/jobs/{job_id}")).json()["last_seq"]
            # Reads never wait for the lock (WAL): each answers at once, many times over.
            for _ in range(20):
                with trio.fail_after(2):
                    assert (await http.get("/health")).status_code == 200
                    assert (await http.get(f"/api/jobs/{job_id}")).status_code == 200
                    assert (await http.get("/api/jobs/", params={"limit": 5})).status_code == 200
                await trio.sleep(0.05)
            if strategy == "subprocess":
                # The worker runs on while nothing can be committed: its spool grows well
                # past what the database holds.

                async def worker_ahead() -> bool:
                    return spool_lines(spool) > locked_at + 500

                await poll_until(worker_ahead, seconds=60)
            # The job's commits wait for the busy timeout, then fail: the writer keeps its
            # batch and retries, and new jobs are refused with the reason meanwhile.
            await wait_for_metric(http, "nodejob_log_commit_failing", 1)
            response = await http.post("/api/jobs/", json={"graph": {}})
            assert response.status_code == 503, response.text
            assert response.json()["detail"] == (
                "database unavailable: database is locked; try again later"
            )
            assert response.headers["Retry-After"] == "2"
            async with await RawWebSocket.open(server.url, server.token) as other:
                await other.command("run_job", graph={})
                refused = await other.reply()
            assert refused["type"] == "error"
            assert refused["message"].startswith("database unavailable: database is locked")
            assert not done.is_set()
            assert (await http.get(f"/api/jobs/{job_id}")).json()["last_seq"] == locked_at
            if strategy == "subprocess":  # still there, with every line written so far
                assert spool_lines(spool) > locked_at + 500
        finally:
            await locker.stdin.send_all(b"go\n")
            with trio.fail_after(30):
                await locker.wait()
        with trio.fail_after(60):
            await done.wait()
        await wait_for_metric(http, "nodejob_log_commit_failing", 0)
        assert (await http.post("/api/jobs/", json={"graph": {}})).status_code == 201
        job = (await http.get(f"/api/jobs/{job_id}")).json()
        assert (await http.put("/api/workflows/w", json={"graph": {}})).status_code == 200
    assert job["status"] == "completed", job
    assert [m["seq"] for m in seen] == list(range(1, job["last_seq"] + 1))
    assert sum(m["type"] == "log_update" for m in seen) == 3000
    assert [protocol_text(m) for m in seen] == stored_messages(server.config.db_path, job_id)
    assert not job_dir(server.config.home, job_id).exists()  # removed once all was committed
    server.scope.cancel()


def protocol_text(message: dict[str, Any]) -> str:
    from nodejob.protocol import dumps

    return dumps(message)


# -- databases nodejob must not use -----------------------------------------------------------


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_valid_database(home: Path, filler_rows: int = 0) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    db = home / "nodejob.db"
    store = Store.open_sync(db)
    store.close()
    connection = apsw.Connection(str(db))
    with connection:
        connection.execute("CREATE TABLE IF NOT EXISTS filler (x TEXT)")
        connection.executemany(
            "INSERT INTO filler VALUES (?)", [("x" * 400,) for _ in range(filler_rows)]
        )
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.execute("PRAGMA journal_mode=DELETE")  # one file, as a backup copy would be
    connection.close()
    return db


def damage_pages(db: Path) -> None:
    data = bytearray(db.read_bytes())
    for offset in range(4096 * 3, len(data), 4096):  # leave the schema pages alone
        data[offset + 100 : offset + 200] = b"\xff" * 100
    db.write_bytes(bytes(data))


def newer_version(db: Path) -> None:
    connection = apsw.Connection(str(db))
    connection.execute("PRAGMA user_version = 99")
    connection.close()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("random bytes", r"nodejob: .*nodejob\.db: not a nodejob database \(file is not SQLite\)"),
        ("newer schema", r"nodejob: .*database schema version 99 is newer than this nodejob"),
        ("damaged pages", r"nodejob: .*nodejob\.db: database is damaged: .* restore it from a"),
        ("truncated", r"nodejob: .*nodejob\.db: (database is (damaged|corrupt)|cannot open)"),
    ],
)
async def test_a_database_nodejob_cannot_use_stops_serve_with_one_line_and_exit_2(
    tmp_path: Path, case: str, expected: str
) -> None:
    home = tmp_path / "home"
    if case == "random bytes":
        home.mkdir()
        db = home / "nodejob.db"
        db.write_bytes(os.urandom(100_000))
    else:
        db = make_valid_database(home, filler_rows=2000)
        if case == "newer schema":
            newer_version(db)
        elif case == "damaged pages":
            damage_pages(db)
        else:
            db.write_bytes(db.read_bytes()[: len(db.read_bytes()) // 2])
    before = digest(db)
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "nodejob", "serve", "--port", "0", "--home", str(home)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert result.stdout == b""
    assert len(stderr.splitlines()) == 1, stderr
    assert re.match(expected, stderr), stderr
    assert "Traceback" not in stderr
    assert digest(db) == before  # not switched to WAL, not migrated, not "repaired"
    assert not (home / "token").exists()


# -- the disk filling up ----------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (unmounted afterwards); skips if not allowed."""
    path.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(disk: Path) -> Path:
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 512, 1):  # then the last few bytes
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


async def test_a_full_disk_holds_jobs_back_with_a_clear_error_and_they_recover(
    tmp_path: Path,
) -> None:
    log = tmp_path / "stderr.log"  # not on the disk that fills up
    with small_disk(tmp_path / "disk", "8m") as disk:
        home = disk / "home"
        server = await start_server_process(home, stderr_path=log)
        db = home / "nodejob.db"
        seen: list[dict[str, Any]] = []
        try:
            async with (
                httpx.AsyncClient(base_url=server.url, headers=server.headers) as http,
                await RawWebSocket.open(server.url, server.token) as ws,
                trio.open_nursery() as nursery,
            ):
                await ws.command("run_job", graph=emitter(4000, size=100, interval=0.001))
                job_id = (await ws.reply())["job_id"]
                done = trio.Event()

                async def follow() -> None:
                    await follow_job(ws, job_id, seen)
                    done.set()

                nursery.start_soon(follow)
                filler = fill(disk)
                await wait_for_metric(http, "nodejob_log_commit_failing", 1)
                # Full: the server stays up and answers; writes are refused with the reason.
                assert (await http.get("/health")).json() == {"status": "ok"}
                assert (await http.get(f"/api/jobs/{job_id}")).status_code == 200
                response = await http.post("/api/jobs/", json={"graph": {}})
                assert response.status_code == 503, response.text
                assert response.json()["detail"] == (
                    "database unavailable: database or disk is full; try again later"
                )
                big = {"graph": {"nodes": [], "blob": "x" * 800_000}}
                response = await http.put("/api/workflows/big", json=big)
                assert response.status_code == 503, response.text
                assert response.json()["detail"] == (
                    "database unavailable: database or disk is full; try again later"
                )
                assert not done.is_set()
                # Space returns: the job carries on and completes; new jobs run again.
                filler.unlink()
                with trio.fail_after(60):
                    await done.wait()
                await wait_for_metric(http, "nodejob_log_commit_failing", 0)
                response = await http.post("/api/jobs/", json={"graph": {}})
                assert response.status_code == 201, response.text
                job = (await http.get(f"/api/jobs/{job_id}")).json()
        finally:
            code = await server.stop()
        assert code == 0
        assert job["status"] == "completed"
        assert [m["seq"] for m in seen] == list(range(1, job["last_seq"] + 1))
        assert [protocol_text(m) for m in seen] == stored_messages(db, job_id)
        assert integrity(db) == [("ok",)]
        stderr = server.stderr()
        assert "database or disk is full" in stderr
        assert "commits succeed again" in stderr
        assert "Traceback" not in stderr, stderr

        # Full at shutdown: the writer gives up after SHUTDOWN_FLUSH_S and the process exits;
        # what no one saw is lost, what anyone saw is kept, and the database is sound.
        server = await start_server_process(home, stderr_path=log)
        seen = []
        try:
            async with (
                httpx.AsyncClient(base_url=server.url, headers=server.headers) as http,
                await RawWebSocket.open(server.url, server.token) as ws,
            ):
                await ws.command("run_job", graph=emitter(100_000, size=100, interval=0.001))
                job_id = (await ws.reply())["job_id"]
                while len(seen) < 10:
                    seen.append(await ws.receive())
                filler = fill(disk)
                await wait_for_metric(http, "nodejob_log_commit_failing", 1)
        finally:
            code = await server.stop(within=40)
        filler.unlink()
        assert code == 0
        assert "could not be committed" in server.stderr()
        assert "Traceback" not in server.stderr(), server.stderr()
        assert integrity(db) == [("ok",)]
        server = await start_server_process(home, stderr_path=log)
        try:
            async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
                job = (await http.get(f"/api/jobs/{job_id}")).json()
        finally:
            assert await server.stop() == 0
        assert job["status"] == "failed"
        assert job["error"] == "server stopped while the job was running"
        stored = stored_messages(db, job_id)
        assert stored[: len(seen)] == [protocol_text(m) for m in seen]
        assert len(stored) == job["last_seq"]  # contiguous from 1 (ring not reached)
        assert job["status"] in TERMINAL


# -- the disk filling up under a subprocess worker ----------------------------------------------


def stored_handle(db: Path, job_id: str) -> dict[str, Any]:
    connection = apsw.Connection(str(db))
    try:
        (row,) = connection.execute("SELECT handle FROM jobs WHERE id = ?", (job_id,)).fetchall()
    finally:
        connection.close()
    handle: dict[str, Any] = json.loads(row[0])
    return handle


def worker_of(supervisor: int) -> int:
    """The worker process: the only child of the supervisor whose pid is in the handle."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def write_calls(pid: int) -> int:
    """How many write system calls ``pid`` has made, failed ones included (/proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError(f"no syscw for {pid}")


async def wait_until_out_of_space(disk: Path, spool: Path, supervisor: int) -> None:
    """Return once the worker has tried to write its spool and found no space: the disk is
    full, the spool ends on a page boundary (tmpfs allocates pages, so a write that ran out of
    space stops there and nothing more fits), and the worker made write calls since without
    the spool growing."""
    worker = worker_of(supervisor)
    page = os.sysconf("SC_PAGE_SIZE")
    mark: tuple[int, int] | None = None

    async def refused() -> bool:
        nonlocal mark
        assert os.statvfs(disk).f_bavail == 0
        size, calls = os.stat(spool).st_size, write_calls(worker)
        if size % page or (mark is not None and mark[0] != size):
            mark = None
            return False
        if mark is None:
            mark = (size, calls)
            return False
        return calls >= mark[1] + 2

    await poll_until(refused, seconds=60, interval=0.05)
    state = proc_stat(worker)
    assert state is not None
    assert state[0] != "Z", "the worker died instead of waiting for space"


async def test_a_full_disk_under_a_subprocess_worker_holds_it_until_space_returns(
    tmp_path: Path,
) -> None:
    """The disk under NODEJOB_HOME fills while a subprocess worker writes its spool there:
    the server stays up and refuses writes with the 503, the worker finds no space for its
    spool and waits (it keeps what it could not write), and once space returns the job
    completes with every message, seqs contiguous, stored as its follower saw them; new jobs
    run and the database is sound. A second job cancelled while the disk is full ends
    ``cancelled`` (its worker is stopped even while it waits to write), its stream whole."""
    log = tmp_path / "stderr.log"  # not on the disk that fills up
    count = 4000
    graph = emitter(count, size=100, interval=0.001)
    with small_disk(tmp_path / "disk", "8m") as disk:
        home = disk / "home"
        db = home / "nodejob.db"
        server = await start_server_process(home, stderr_path=log)
        seen: list[dict[str, Any]] = []
        try:
            async with (
                httpx.AsyncClient(base_url=server.url, headers=server.headers) as http,
                await RawWebSocket.open(server.url, server.token) as ws,
                trio.open_nursery() as nursery,
            ):
                await ws.command("run_job", graph=graph, execution_strategy="subprocess")
                job_id = (await ws.reply())["job_id"]
                spool = spool_of(home, job_id)
                done = trio.Event()

                async def follow() -> None:
                    await follow_job(ws, job_id, seen)
                    done.set()

                nursery.start_soon(follow)

                async def writing() -> bool:
                    return spool_lines(spool) >= 50

                await poll_until(writing, seconds=60)
                # A second job, to be cancelled while the disk is full.
                response = await http.post(
                    "/api/jobs/",
                    json={
                        "graph": emitter(100_000, interval=0.001),
                        "execution_strategy": "subprocess",
                    },
                )
                assert response.status_code == 201, response.text
                cancelled_id = response.json()["id"]
                filler = fill(disk)
                # The worker has more to write than fits in its spool's last page.
                assert b'"status":"completed"' not in spool.read_bytes()
                await wait_for_metric(http, "nodejob_log_commit_failing", 1)
                supervisor = stored_handle(db, job_id)["pid"]
                await wait_until_out_of_space(disk, spool, supervisor)
                assert (await http.get("/health")).json() == {"status": "ok"}
                assert (await http.get(f"/api/jobs/{job_id}")).json()["status"] == "running"
                response = await http.post("/api/jobs/", json={"graph": {}})
                assert response.status_code == 503, response.text
                assert response.json()["detail"] == (
                    "database unavailable: database or disk is full; try again later"
                )
                response = await http.post(f"/api/jobs/{cancelled_id}/cancel")
                assert response.status_code == 200, response.text
                assert not done.is_set()
                filler.unlink()
                with trio.fail_after(60):
                    await done.wait()

                async def cancelled() -> bool:
                    job = (await http.get(f"/api/jobs/{cancelled_id}")).json()
                    return job["status"] in TERMINAL

                await poll_until(cancelled, seconds=60, interval=0.05)
                stopped = (await http.get(f"/api/jobs/{cancelled_id}")).json()
                await wait_for_metric(http, "nodejob_log_commit_failing", 0)
                response = await http.post(
                    "/api/jobs/", json={"graph": emitter(3), "execution_strategy": "subprocess"}
                )
                assert response.status_code == 201, response.text
                other: list[dict[str, Any]] = []
                await ws.command("reconnect_job", job_id=response.json()["id"])
                with trio.fail_after(60):
                    await follow_job(ws, response.json()["id"], other)
                job = (await http.get(f"/api/jobs/{job_id}")).json()
        finally:
            code = await server.stop()
        assert code == 0
        assert job["status"] == "completed", job
        assert other[-1]["status"] == "completed", other[-1]
        assert [m["seq"] for m in seen] == list(range(1, job["last_seq"] + 1))
        assert sum(m["type"] == "log_update" for m in seen) == count
        assert [protocol_text(m) for m in seen] == stored_messages(db, job_id)
        assert not job_dir(home, job_id).exists()
        assert stopped["status"] == "cancelled", stopped
        stopped_stream = [json.loads(text) for text in stored_messages(db, cancelled_id)]
        assert [m["seq"] for m in stopped_stream] == list(range(1, stopped["last_seq"] + 1))
        assert stopped_stream[-1]["status"] == "cancelled"
        assert not job_dir(home, cancelled_id).exists()
        assert integrity(db) == [("ok",)]
        assert "Traceback" not in server.stderr(), server.stderr()


async def test_a_server_stopped_while_the_disk_is_full_leaves_the_worker_to_the_next_one(
    tmp_path: Path,
) -> None:
    """SIGTERM while the disk is full and a subprocess worker waits for space: the server
    drops only what no client saw and exits 0; the worker runs on (it is not the server's to
    stop). Space returns, a new server re-adopts the job from its spool, and the job completes
    with every message, the ones clients saw before the stop exactly as they saw them."""
    log = tmp_path / "stderr.log"  # not on the disk that fills up
    count = 3000
    with small_disk(tmp_path / "disk", "8m") as disk:
        home = disk / "home"
        db = home / "nodejob.db"
        server = await start_server_process(home, stderr_path=log)
        before: list[dict[str, Any]] = []
        try:
            async with (
                httpx.AsyncClient(base_url=server.url, headers=server.headers) as http,
                await RawWebSocket.open(server.url, server.token) as ws,
            ):
                await ws.command(
                    "run_job",
                    graph=emitter(count, size=100, interval=0.001),
                    execution_strategy="subprocess",
                )
                job_id = (await ws.reply())["job_id"]
                spool = spool_of(home, job_id)

                async def writing() -> bool:
                    return spool_lines(spool) >= 50

                await poll_until(writing, seconds=60)
                while len(before) < 10:
                    before.append(await ws.receive())
                # The server must hold whole lines it has yet to commit when the disk fills:
                # filled while it keeps up, the worker's last write may fit only part of a
                # line in its page and the server then has nothing to commit. So the server
                # is paused while the worker writes 20 lines more, and the disk fills.
                os.kill(server.pid, signal.SIGSTOP)
                try:
                    mark = spool_lines(spool)

                    async def ahead() -> bool:
                        return spool_lines(spool) >= mark + 20

                    await poll_until(ahead, seconds=60)
                    filler = fill(disk)
                finally:
                    os.kill(server.pid, signal.SIGCONT)
                assert b'"status":"completed"' not in spool.read_bytes()
                await wait_for_metric(http, "nodejob_log_commit_failing", 1)
                handle = stored_handle(db, job_id)
                await wait_until_out_of_space(disk, spool, handle["pid"])
        finally:
            code = await server.stop(within=40)
        try:
            assert code == 0
            assert "could not be committed" in server.stderr()
            # The worker outlived the server, waiting for space.
            state = proc_stat(handle["pid"])
            assert state is not None
            assert state[0] != "Z"
            assert state[1] == handle["start_time"]
            filler.unlink()
            server = await start_server_process(home, stderr_path=log)
            seen: list[dict[str, Any]] = []
            async with (
                httpx.AsyncClient(base_url=server.url, headers=server.headers) as http,
                await RawWebSocket.open(server.url, server.token) as ws,
            ):
                await ws.command("reconnect_job", job_id=job_id, after_seq=0)
                with trio.fail_after(60):
                    await follow_job(ws, job_id, seen)
                job = (await http.get(f"/api/jobs/{job_id}")).json()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(handle["pid"], signal.SIGKILL)  # only if the test failed early
            code = await server.stop()
        assert code == 0
        assert job["status"] == "completed", job
        assert [m["seq"] for m in seen] == list(range(1, job["last_seq"] + 1))
        assert sum(m["type"] == "log_update" for m in seen) == count
        stored = stored_messages(db, job_id)
        assert [protocol_text(m) for m in seen] == stored
        assert [protocol_text(m) for m in before] == stored[: len(before)]
        assert not job_dir(home, job_id).exists()
        assert integrity(db) == [("ok",)]
        assert "Traceback" not in server.stderr(), server.stderr()
