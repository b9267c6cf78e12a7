"""One contract suite for every execution strategy: threaded, subprocess and docker.

Real SQLite, a real manager, real worker processes and a real Docker engine (the docker cases
skip only when NODEJOB_TEST_DOCKER_IMAGE is unset; tests/run.sh sets it). The restart cases
run the manager twice on one home: leaving the first manager's context is a server stopping
(out-of-process work runs on), opening the second re-adopts. A last test SIGKILLs a real
``nodejob serve`` process and starts another on the same home.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
import trio

from nodejob.config import Config
from nodejob.executions.process import job_dir, proc_stat
from nodejob.executions.stream import LineAssembler, StreamIngester, describe_exit
from nodejob.log import MessageLog
from nodejob.manager import SERVER_STOPPED, CancelResult, open_manager
from nodejob.protocol import (
    MAX_MESSAGE_BYTES,
    ExecutionStrategy,
    JobStatus,
    ProcessingContext,
    ProtocolError,
    RunJobRequest,
    dumps,
    loads,
)
from nodejob.store import JobRecord, Store
from tests.hardening import remove_containers

DOCKER_IMAGE = os.environ.get("NODEJOB_TEST_DOCKER_IMAGE")
DOCKER = [
    pytest.mark.docker,
    pytest.mark.skipif(not DOCKER_IMAGE, reason="NODEJOB_TEST_DOCKER_IMAGE is not set"),
]
OUT_OF_PROCESS = ["subprocess", pytest.param("docker", marks=DOCKER)]
ALL = ["threaded", *OUT_OF_PROCESS]
CTX = ProcessingContext(user_id="u1")
EXAMPLES = Path(__file__).parent.parent / "examples"
GRACE_S = 3.0
MiB = 1024 * 1024
DEADLINE_S = 60.0
"""Generous: a docker job's container start alone takes ~0.4 s on a quiet machine."""


# -- graphs -----------------------------------------------------------------------------------


def chatter(count: int, interval: float = 0.0) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "e", "type": "nodejob.Emit", "data": {"count": count, "interval": interval}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "lines"}},
        ],
        "edges": [{"source": "e", "target": "out", "targetHandle": "value"}],
    }


def sleeper(seconds: float = 60) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds, "value": 1}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
        ],
        "edges": [{"source": "s", "target": "out", "targetHandle": "value"}],
    }


FAIL = {"nodes": [{"id": "f", "type": "nodejob.Fail", "data": {"message": "boom"}}]}


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        home=tmp_path / "home",
        max_jobs=8,
        cleanup_interval_s=3600,
        kill_grace_s=GRACE_S,
        docker_image=DOCKER_IMAGE or "unused",
    )


@pytest.fixture
async def store(config: Config):
    store = await Store.open(config.db_path)
    yield store
    # A failed test may leave work running: stop what this test's home started.
    jobs, _ = await store.list_jobs("u1", limit=1000)
    store.close()
    for job in jobs:
        handle = job.handle or {}
        if "pid" in handle and worker_alive("subprocess", handle):
            os.killpg(handle["pid"], signal.SIGKILL)
    if DOCKER_IMAGE:
        label = f"nodejob.home={config.home}"
        remove_containers(docker_client(), label=label)


def run(graph: dict[str, Any], strategy: str, **kwargs: Any) -> RunJobRequest:
    return RunJobRequest(graph=graph, execution_strategy=ExecutionStrategy(strategy), **kwargs)


async def collect(manager, job_id: str, after_seq: int = 0, *, until=None) -> list[dict]:
    """The job's messages after ``after_seq``, to its end or through the first ``until`` one."""
    out: list[dict] = []
    async with aclosing(manager.log.follow(job_id, after_seq)) as batches:
        async for batch in batches:
            for entry in batch:
                out.append(loads(entry.text))
                if until is not None and until(out[-1]):
                    return out
    return out


def node_running(node_id: str):
    return lambda m: m["type"] == "node_update" and m["node_id"] == node_id


def assert_whole(messages: list[dict], status: str) -> None:
    """Seqs 1..N with no gap or double, starting/running first, the terminal one last."""
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    updates = [m["status"] for m in messages if m["type"] == "job_update"]
    assert updates == ["starting", "running", status]
    assert messages[-1]["type"] == "job_update"


@functools.cache
def docker_client() -> Any:
    """One client for the whole module: each new one would leave pooled sockets to the GC."""
    import docker

    return docker.from_env()


def worker_alive(strategy: str, handle: dict[str, Any] | None) -> bool:
    assert handle is not None
    if strategy == "subprocess":
        stat = proc_stat(handle["pid"])
        return stat is not None and stat[1] == handle["start_time"] and stat[0] != "Z"
    import docker

    try:
        docker_client().containers.get(handle["container_id"])
    except docker.errors.NotFound:
        return False
    return True


def kill_worker(strategy: str, handle: dict[str, Any] | None) -> None:
    """SIGKILL the process running the graph (as the OOM killer would)."""
    assert handle is not None
    if strategy == "docker":
        docker_client().containers.get(handle["container_id"]).kill()
        return
    # The handle's pid is the worker's supervisor; the graph runs in its child.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_bytes()
            except OSError:
                continue
            if int(stat[stat.rindex(b")") + 2 :].split()[1]) == handle["pid"]:
                os.kill(int(entry.name), signal.SIGKILL)
                return
    raise AssertionError(f"no worker process under {handle['pid']}")


# -- the contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ALL)
async def test_stream_is_whole_and_ends_with_the_outcome(config, store, strategy):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(chatter(50), strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "completed")
    assert [m["content"][:7] for m in messages if m["type"] == "log_update"] == ["nodejob"] * 50
    assert messages[-1]["result"] == {"outputs": {"lines": 50}}
    row = await store.get_job(job.id)
    assert row is not None
    assert (row.status, row.execution_strategy, row.last_seq) == (
        "completed",
        strategy,
        len(messages),
    )
    if strategy != "threaded":
        assert row.handle is not None
        assert row.handle["outcome"]["status"] == "completed"
        assert not worker_alive(strategy, row.handle)  # containers are removed when done
        assert not job_dir(config.home, job.id).exists()  # so are spool files


@pytest.mark.parametrize("strategy", ALL)
async def test_reattach_after_a_disconnect_misses_and_doubles_nothing(config, store, strategy):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(chatter(40, 0.01), strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            first = await collect(manager, job.id, until=lambda m: m["seq"] >= 8)
            rest = await collect(manager, job.id, after_seq=first[-1]["seq"])
            replay = await collect(manager, job.id)
    assert_whole(first + rest, "completed")
    assert replay == first + rest


@pytest.mark.parametrize("strategy", ALL)
async def test_cancel_stops_the_work_gracefully_then_reports_cancelled(config, store, strategy):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
            started = time.monotonic()
            await manager.cancel_job(job.id)
            messages = await collect(manager, job.id)
        took = time.monotonic() - started
        row = await store.get_job(job.id)
    assert_whole(messages, "cancelled")
    # The worker got SIGTERM and cancelled its node itself, well before any SIGKILL.
    assert {"node_id": "s", "status": "cancelled"}.items() <= messages[-2].items()
    assert took < GRACE_S
    assert row is not None
    assert row.status == "cancelled"
    if strategy != "threaded":
        assert not worker_alive(strategy, row.handle)


@pytest.mark.parametrize("strategy", ALL)
async def test_timeout_stops_the_work_and_fails_the_job(config, store, strategy):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), strategy, timeout_seconds=1.5), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
        row = await store.get_job(job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"] == "timed out after 1.5 s"
    if strategy != "threaded":
        assert row is not None
        assert not worker_alive(strategy, row.handle)


@pytest.mark.parametrize("strategy", ALL)
async def test_failing_node_fails_the_job_with_its_message(config, store, strategy):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(FAIL, strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"] == "boom"
    assert {"node_id": "f", "status": "failed", "error": "boom"}.items() <= messages[-2].items()


def too_large(case: str) -> dict[str, Any]:
    """A graph whose job produces a message over MAX_MESSAGE_BYTES in one of three ways."""
    if case == "log line":
        return {"nodes": [{"id": "e", "type": "nodejob.Emit", "data": {"count": 1, "size": MiB}}]}
    third = "x" * (MiB // 3)  # the request itself stays well under the 1 MiB body limit
    nodes: list[dict[str, Any]] = [
        {"id": "c", "type": "nodejob.Constant", "data": {"value": third}},
        {"id": "double", "type": "nodejob.Add", "data": {}},  # 2/3 MiB: fits
    ]
    edges = [
        {"source": "c", "target": "double", "targetHandle": "a"},
        {"source": "c", "target": "double", "targetHandle": "b"},
    ]
    if case == "node result":
        nodes.append({"id": "quad", "type": "nodejob.Add", "data": {}})  # 4/3 MiB: too large
        edges += [
            {"source": "double", "target": "quad", "targetHandle": "a"},
            {"source": "double", "target": "quad", "targetHandle": "b"},
        ]
    else:  # "outputs": each output fits, the two together in the last message do not
        for name in ("one", "two"):
            nodes.append({"id": name, "type": "nodejob.Output", "data": {"name": name}})
            edges.append({"source": "double", "target": name, "targetHandle": "value"})
    return {"nodes": nodes, "edges": edges}


@pytest.mark.parametrize("case", ["log line", "node result", "outputs"])
@pytest.mark.parametrize("strategy", ALL)
async def test_a_message_over_the_limit_fails_its_node_and_nothing_breaks(
    config, store, strategy, case
):
    """No stored message exceeds MAX_MESSAGE_BYTES (so every one fits a client's 1 MiB frame):
    a node that tries fails with a clear error, or the job does if only its outputs together
    are too large; the stream stays whole and the next job runs."""
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(too_large(case), strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
        assert_whole(messages, "failed")
        error = messages[-1]["error"]
        limit = f"over the limit of {MAX_MESSAGE_BYTES:,} bytes per message"
        if case == "outputs":
            assert error.startswith(
                "the job's outputs do not fit in its last message: a job_update"
            )
            assert limit in error
            assert {m["output_name"] for m in messages if m["type"] == "output_update"} == {
                "one",
                "two",
            }
        else:
            node, kind = ("e", "log_update") if case == "log line" else ("quad", "node_update")
            failed = [m for m in messages if m["type"] == "node_update" and m["status"] == "failed"]
            assert [m["node_id"] for m in failed] == [node]
            assert failed[0]["error"] == error
            assert error.startswith(f"a {kind} message of ")
            assert error.endswith(limit)
        assert max(len(dumps(m).encode()) for m in messages) <= MAX_MESSAGE_BYTES
        next_job = await manager.start_job(run(chatter(3), strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            assert_whole(await collect(manager, next_job.id), "completed")
    row = await store.get_job(job.id)
    assert row is not None
    assert (row.status, row.error) == ("failed", error)


@pytest.mark.parametrize("strategy", ALL)
async def test_restart_mid_job(config, store, strategy):
    """Out of process: the job carries on and its stream is whole. Threaded: it failed."""
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(chatter(30, 0.1), strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            before = await collect(manager, job.id, until=lambda m: m["type"] == "log_update")
    if strategy == "threaded":
        row = await store.get_job(job.id)
        assert row is not None
        assert (row.status, row.error) == ("failed", SERVER_STOPPED)
        return
    row = await store.get_job(job.id)
    assert row is not None
    assert row.status == "running"
    assert worker_alive(strategy, row.handle)  # the server stopped; the work did not
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert messages[-1].get("error") is None
    assert_whole(messages, "completed")
    assert messages[: len(before)] == before
    assert sum(m["type"] == "log_update" for m in messages) == 30
    assert messages[-1]["result"] == {"outputs": {"lines": 30}}


@pytest.mark.parametrize("strategy", OUT_OF_PROCESS)
async def test_worker_killed_fails_the_job_with_the_signal(config, store, strategy):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
            kill_worker(strategy, (await store.get_job(job.id)).handle)
            messages = await collect(manager, job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"].startswith("worker killed by signal SIGKILL")


@pytest.mark.parametrize("strategy", OUT_OF_PROCESS)
async def test_worker_killed_while_the_server_is_down(config, store, strategy):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
    row = await store.get_job(job.id)
    assert row is not None
    kill_worker(strategy, row.handle)
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"].startswith("worker killed by signal SIGKILL")
    assert not worker_alive(strategy, (await store.get_job(job.id)).handle)


async def test_a_job_cut_before_its_worker_was_recorded_is_launched_by_the_next_server(
    config, store
):
    """What a server killed between committing ``running`` and recording the worker leaves:
    a running job without a handle. Nothing ran (a worker without its request exits), so the
    next server launches it, its seqs going on after the ones already logged."""
    job = JobRecord(
        id=uuid.uuid4().hex,
        user_id=CTX.user_id,
        job_type="workflow",
        status=JobStatus.STARTING,
        workflow_id=None,
        execution_strategy="subprocess",
        params={},
        graph=chatter(5),
        created_at=time.time(),
    )
    log = MessageLog(store, config.ring_size)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.create(job)
        log.append(job.id, {"type": "job_update", "status": "running"})
        await log.wait_committed(job.id, 2)
        nursery.cancel_scope.cancel()
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "completed")
    assert messages[-1]["result"] == {"outputs": {"lines": 5}}


async def test_a_queued_out_of_process_job_waits_for_a_slot_again_after_a_restart(config, store):
    """A job still waiting for a slot when the server stopped never ran: the next server
    queues it again (it is not failed), and it runs once a slot is free."""
    config = dataclasses.replace(config, max_jobs=1)
    async with open_manager(store, config) as manager:
        first = await manager.start_job(run(sleeper(), "subprocess"), CTX)
        queued = await manager.start_job(run(chatter(3), "subprocess"), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, first.id, until=node_running("s"))
    row = await store.get_job(queued.id)
    assert row is not None
    assert row.status == "starting"
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            assert await manager.cancel_job(first.id) is CancelResult.ACCEPTED
            messages = await collect(manager, queued.id)
            await collect(manager, first.id)
    assert_whole(messages, "completed")


@pytest.mark.parametrize("strategy", OUT_OF_PROCESS)
async def test_cancel_after_a_restart(config, store, strategy):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), strategy), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            await manager.cancel_job(job.id)
            messages = await collect(manager, job.id)
    assert_whole(messages, "cancelled")
    assert not worker_alive(strategy, (await store.get_job(job.id)).handle)


# -- subprocess specifics ---------------------------------------------------------------------


def open_files(pid: int) -> set[str]:
    return {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}


def environ_and_session(pid: int) -> tuple[dict[str, str], int]:
    raw = Path(f"/proc/{pid}/environ").read_text()
    environ = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    return environ, int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])


async def test_subprocess_worker_has_its_own_session_and_a_scrubbed_environment(
    config, store, monkeypatch
):
    monkeypatch.setenv("NODEJOB_TOKEN", "server-secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "server-secret")
    monkeypatch.setenv("NJ_TEST_PASSED", "asked-for")
    config.worker_env = "NJ_TEST_PASSED, NJ_TEST_UNSET"
    listener = socket.create_server(("127.0.0.1", 0))
    listener.set_inheritable(True)  # as hypercorn leaves its listening socket
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), "subprocess"), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
        handle = (await store.get_job(job.id)).handle
        assert handle is not None
        pid = handle["pid"]
        environ, session = environ_and_session(pid)
        held = open_files(pid)
        await manager.cancel_job(job.id)
    ours = os.readlink(f"/proc/self/fd/{listener.fileno()}")
    listener.close()
    assert ours not in held  # a restarted server can bind its port again
    assert session == pid != os.getsid(0)  # a Ctrl-C at the server's terminal cannot reach it
    assert os.getpgid(pid) == pid
    assert "server-secret" not in environ.values()
    assert environ["NJ_TEST_PASSED"] == "asked-for"
    assert environ["NODEJOB_JOB_ID"] == job.id
    assert "NJ_TEST_UNSET" not in environ


async def test_a_reused_pid_is_not_mistaken_for_the_worker(config, store):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), "subprocess"), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
    row = await store.get_job(job.id)
    assert row is not None
    assert row.handle is not None
    real = dict(row.handle)
    # Pretend the worker died and its pid went to another process: this test's own.
    await store.set_handle(job.id, {**real, "pid": os.getpid()})
    try:
        async with open_manager(store, config) as manager:
            with trio.fail_after(DEADLINE_S):
                messages = await collect(manager, job.id)
    finally:
        os.killpg(real["pid"], signal.SIGKILL)  # the real worker, now nobody's
    assert_whole(messages, "failed")
    assert messages[-1]["error"] == "worker ended without a result (exit status unknown)"


async def test_garbage_in_the_spool_is_skipped_and_a_seq_jump_fails_the_job(config, store, caplog):
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), "subprocess"), CTX)
        spool = job_dir(config.home, job.id) / "stream.jsonl"
        with trio.fail_after(DEADLINE_S):
            before = await collect(manager, job.id, until=node_running("s"))
            with spool.open("a") as file:  # O_APPEND, as the worker's: whole lines interleave
                file.write("not json at all\n")
            after = await collect(
                manager, job.id, before[-1]["seq"], until=lambda m: m["type"] == "node_progress"
            )
            with spool.open("a") as file:
                file.write(json.dumps({"type": "log_update", "job_id": job.id, "seq": 10**6}))
                file.write("\n")
            messages = await collect(manager, job.id)
        row = await store.get_job(job.id)
    assert_whole(messages, "failed")
    assert after
    assert "skipped a line (not JSON" in caplog.text
    assert messages[-1]["error"].startswith("the worker's stream is broken: job ")
    assert "expected seq" in messages[-1]["error"]
    assert row is not None
    assert not worker_alive("subprocess", row.handle)


async def test_no_docker_engine_is_a_clear_error_not_a_hang(config, store):
    config.docker_host = f"unix://{config.home}/no-such-docker.sock"
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(FAIL, "docker"), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"].startswith(f"no Docker engine reachable at {config.docker_host}")


# -- the worker on its own --------------------------------------------------------------------


async def test_worker_prints_numbered_lines_and_exits_by_outcome(tmp_path):
    hello = json.loads((EXAMPLES / "hello.json").read_text())
    cases = [(hello, 0, "completed"), (FAIL, 1, "failed")]
    for graph, code, status in cases:
        request = {"job_id": "j", "first_seq": 3, "graph": graph, "params": {}}
        result = await trio.run_process(
            [sys.executable, "-m", "nodejob", "worker"],
            stdin=json.dumps(request).encode(),
            capture_stdout=True,
            check=False,
        )
        lines = [json.loads(line) for line in result.stdout.splitlines()]
        assert result.returncode == code
        assert [m["seq"] for m in lines] == list(range(3, 3 + len(lines)))
        assert {m["job_id"] for m in lines} == {"j"}
        assert (lines[-1]["type"], lines[-1]["status"]) == ("job_update", status)
        assert all(m["type"] != "job_update" for m in lines[:-1])
    # Its import closure is small and pure Python: it starts fast, and fits the bundle.
    request = {"job_id": "j", "first_seq": 1, "graph": hello, "params": {}}
    traced = await trio.run_process(
        [sys.executable, "-X", "importtime", "-m", "nodejob", "worker"],
        stdin=json.dumps(request).encode(),
        capture_stdout=True,
        capture_stderr=True,
    )
    imported = {line.split("|")[-1].strip() for line in traced.stderr.decode().splitlines()}
    heavy = {"apsw", "quart", "hypercorn", "httpx", "docker", "rich", "textual", "nodejob.store"}
    tops = {name.split(".")[0] for name in imported}
    assert "trio" in tops
    assert not heavy & (tops | imported)
    refused = await trio.run_process(
        [sys.executable, "-m", "nodejob", "worker"],
        stdin=b"",
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert (refused.returncode, refused.stdout) == (2, b"")
    assert b"nodejob worker: no request given" in refused.stderr


# -- the stream module ------------------------------------------------------------------------


def test_line_assembler_survives_any_split():
    lines = [b'{"a": "\xc3\xa9t\xc3\xa9"}', b"", b"x" * 300, b"last"]
    data = b"\n".join(lines) + b"\n" + b"unfinished"
    for size in (1, 2, 3, 7, 64, len(data)):
        assembler = LineAssembler()
        got: list[bytes] = []
        for start in range(0, len(data), size):
            got += assembler.feed(data[start : start + size])
        assert got == lines
        assert assembler.pending == len(b"unfinished")
        assert assembler.end() == b"unfinished"
        assert assembler.end() == b""


def job_record(job_id: str) -> JobRecord:
    return JobRecord(
        id=job_id,
        user_id="u1",
        job_type="workflow",
        status=JobStatus.STARTING,
        workflow_id=None,
        execution_strategy="subprocess",
        params={},
        graph={},
        created_at=time.time(),
    )


async def test_ingester_dedupes_skips_garbage_and_intercepts_the_end(nursery, store, caplog):
    log = MessageLog(store, 100)
    await nursery.start(log.run)
    log.create(job_record("j"))
    log.append("j", {"type": "job_update", "status": "running"})

    def line(seq: int, **fields: Any) -> bytes:
        body = {"type": "log_update", "job_id": "j", "seq": seq, "content": str(seq), **fields}
        return json.dumps(body).encode() + b"\n"

    stream = line(3) + b"garbage\n" + line(4) + line(3, job_id="other") + line(5)
    ingester = StreamIngester(log, "j", source="test")
    assert ingester.feed(stream[:10]) is None
    assert ingester.feed(stream[10:]) is None
    again = StreamIngester(log, "j", source="test")  # a re-read from the start: no doubles
    assert again.feed(stream) is None
    assert log.last_seq("j") == 5
    assert ingester.skipped == 2
    end = json.dumps({"type": "job_update", "job_id": "j", "seq": 6, "status": "failed"})
    outcome = ingester.feed(end.encode() + b"\n" + line(7) + b'{"trunc')
    assert outcome is not None
    assert (outcome.status, outcome.error) == (JobStatus.FAILED, "failed")
    assert log.last_seq("j") == 5  # the terminal line is the manager's to log
    assert ingester.end() is outcome
    with pytest.raises(ProtocolError, match="expected seq 6, got 9"):
        StreamIngester(log, "j").feed(line(9))
    truncated = StreamIngester(log, "j", source="test")
    truncated.feed(b'{"type": "log_update", "job_id": "j", "se')
    truncated.end()
    assert "unfinished last line" in caplog.text


def test_exit_descriptions():
    assert describe_exit(2, "no request") == "worker exited with status 2: no request"
    assert describe_exit(-signal.SIGKILL) == "worker killed by signal SIGKILL"


# -- a real server, SIGKILLed and restarted ---------------------------------------------------


async def start_server(home: Path) -> tuple[trio.Process, str]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "nodejob", "serve", "--port", "0", "--home", str(home)],
        stdout=subprocess.PIPE,
        start_new_session=True,  # as if started from its own terminal
    )
    assert process.stdout is not None
    buffer = b""
    with trio.fail_after(DEADLINE_S):
        while b"\n" not in buffer:
            chunk = await process.stdout.receive_some()
            assert chunk, "the server exited before it served"
            buffer += chunk
    url = buffer.split(b"http://", 1)[1].split()[0].decode()
    return process, f"http://{url}"


async def stop(process: trio.Process, signum: int = signal.SIGKILL) -> None:
    if process.returncode is None:
        process.send_signal(signum)
    with trio.fail_after(DEADLINE_S):
        await process.wait()
    if process.stdout is not None:
        await process.stdout.aclose()


def terminal(message: dict) -> bool:
    return message["type"] == "job_update" and message["status"] in {
        "completed",
        "failed",
        "cancelled",
    }


async def follow(url: str, token: str, *, start=None, job_id=None, until=terminal):
    """Over a WebSocket: start a job (``start`` data) or reattach from seq 0; read ``until``."""
    from nodejob.client import open_job_stream

    messages: list[dict] = []
    async with open_job_stream(url, token) as stream:
        if start is not None:
            job_id = await stream.run_job(start)
        else:
            await stream.reconnect_job(job_id, 0)
        async for message in stream.messages():
            messages.append(message)
            if until(message):
                break
    return job_id, messages


async def test_server_sigkill_and_ctrl_c_then_restart_keep_subprocess_jobs(tmp_path):
    home = tmp_path / "home"
    server, url = await start_server(home)
    try:
        token = (home / "token").read_text().strip()
        data = {"graph": chatter(40, 0.1), "execution_strategy": "subprocess"}
        with trio.fail_after(DEADLINE_S):
            job_id, before = await follow(url, token, start=data, until=lambda m: m["seq"] >= 6)
        await stop(server)  # SIGKILL: no shutdown at all
        server, url = await start_server(home)
        with trio.fail_after(DEADLINE_S):
            _, messages = await follow(url, token, job_id=job_id)
        assert_whole(messages, "completed")
        assert messages[: len(before)] == before
        assert sum(m["type"] == "log_update" for m in messages) == 40
        # A Ctrl-C at the server's terminal reaches its whole process group: the server shuts
        # down gracefully; the worker, in its own session, runs on.
        data = {"graph": chatter(30, 0.05), "execution_strategy": "subprocess"}
        with trio.fail_after(DEADLINE_S):
            job_id, before = await follow(url, token, start=data, until=lambda m: m["seq"] >= 4)
        os.killpg(server.pid, signal.SIGINT)
        with trio.fail_after(DEADLINE_S):
            assert await server.wait() == 0
        server, url = await start_server(home)
        with trio.fail_after(DEADLINE_S):
            _, messages = await follow(url, token, job_id=job_id)
        assert_whole(messages, "completed")
        assert messages[-1]["result"] == {"outputs": {"lines": 30}}
    finally:
        await stop(server)
