"""The execution contract on the ``ray`` strategy, against a real Ray head; and Ray's specifics.

The contract cases are those of tests/test_executions.py (its graphs and helpers are reused),
with Ray in the place of the process or container: "the worker is alive" means Ray reports the
job non-terminal, and a finished job must be gone from Ray (nodejob deletes it once its
outcome is recorded). The Ray cases skip only when NODEJOB_TEST_RAY_ADDRESS is unset;
tests/run.sh starts a one-node head (2 CPUs) and sets it. Each job asks for 1 CPU (the
default), so the head runs two of ours at once.
"""

from __future__ import annotations

import json
import os
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from nodejob.config import Config
from nodejob.executions.ray import _RayLog, sweep_finished
from nodejob.executions.ray_cluster import RayJobs
from nodejob.executions.stream import StreamIngester
from nodejob.log import MessageLog
from nodejob.manager import open_manager
from tests.test_executions import (
    CTX,
    FAIL,
    GRACE_S,
    assert_whole,
    chatter,
    collect,
    job_record,
    node_running,
    run,
    sleeper,
    store,  # noqa: F401 - the fixture, used by name
)

RAY_ADDRESS = os.environ.get("NODEJOB_TEST_RAY_ADDRESS", "")
NEEDS_RAY = pytest.mark.skipif(
    not RAY_ADDRESS,
    reason="NODEJOB_TEST_RAY_ADDRESS is not set (tests/run.sh starts a Ray head and sets it)",
)
DEADLINE_S = 120.0
"""Generous: Ray takes 2-4 s from submission to a job's first line, more on a busy machine."""
POLL_S = 0.1


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        home=tmp_path / "home",
        max_jobs=8,
        cleanup_interval_s=3600,
        kill_grace_s=GRACE_S,
        ray_address=RAY_ADDRESS or "http://127.0.0.1:9",
    )


@asynccontextmanager
async def ray_api():
    async with RayJobs(RAY_ADDRESS) as ray:
        yield ray


async def ray_status(job_id: str) -> str | None:
    """Ray's status of the job (PENDING, RUNNING, ...), None if Ray does not know it."""
    async with ray_api() as ray:
        info = await ray.info(job_id)
    return None if info is None else str(info["status"])


async def wait_ray_status(job_id: str, *wanted: str | None) -> None:
    """Poll Ray (it has no status events) until the job is in one of ``wanted``."""
    while await ray_status(job_id) not in wanted:  # noqa: ASYNC110 - Ray has no events
        await trio.sleep(POLL_S)


def worker_pids(job_id: str) -> list[int]:
    """The pids of the ``nodejob.worker`` process running ``job_id`` on this (the head) node."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"nodejob.worker" in cmdline and f"NODEJOB_JOB_ID={job_id}".encode() in environ:
            found.append(int(entry.name))
    return found


def ray_test(test: Any) -> Any:
    """Marks a test that needs the Ray head."""
    return pytest.mark.ray(NEEDS_RAY(test))


def log_updates(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "log_update"]


async def head_cpus() -> float:
    async with ray_api() as ray:
        nodes = await ray.nodes()
    assert nodes, "the Ray head reports no alive node"
    return max(node.get("CPU", 0.0) for node in nodes.values())


# -- the contract -----------------------------------------------------------------------------


@ray_test
@pytest.mark.parametrize("worker", ["bundle", "installed"])
async def test_stream_is_whole_and_ends_with_the_outcome(config, store, worker, caplog):  # noqa: F811
    config.ray_worker = worker  # installed: the head's python3 is this checkout's (tests/run.sh)
    caplog.set_level("DEBUG", logger="nodejob.executions.ray")
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(chatter(50), "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "completed")
    assert [m["content"][:7] for m in log_updates(messages)] == ["nodejob"] * 50
    assert messages[-1]["result"] == {"outputs": {"lines": 50}}
    row = await store.get_job(job.id)
    assert row is not None
    assert (row.status, row.execution_strategy, row.last_seq) == ("completed", "ray", len(messages))
    assert row.handle is not None
    assert row.handle["outcome"]["status"] == "completed"
    assert row.handle["resources"] == {"CPU": 1.0}
    assert "swept" in caplog.text  # the first job of a server sweeps old records meanwhile
    assert await ray_status(job.id) == "SUCCEEDED"  # its record stays until a sweep


@ray_test
async def test_reattach_after_a_disconnect_misses_and_doubles_nothing(config, store):  # noqa: F811
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(chatter(40, 0.01), "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            first = await collect(manager, job.id, until=lambda m: m["seq"] >= 8)
            rest = await collect(manager, job.id, after_seq=first[-1]["seq"])
            replay = await collect(manager, job.id)
    assert_whole(first + rest, "completed")
    assert replay == first + rest


@ray_test
async def test_cancel_stops_the_work_gracefully_then_reports_cancelled(config, store):  # noqa: F811
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
            assert await ray_status(job.id) == "RUNNING"
            started = time.monotonic()
            await manager.cancel_job(job.id)
            messages = await collect(manager, job.id)
        took = time.monotonic() - started
    assert_whole(messages, "cancelled")
    # Ray's stop sent SIGTERM and the worker cancelled its node itself: no SIGKILL needed.
    assert {"node_id": "s", "status": "cancelled"}.items() <= messages[-2].items()
    assert took < GRACE_S + 5  # Ray's stop takes ~1.5 s, its log tail lags ~1 s
    assert await ray_status(job.id) == "STOPPED"
    assert not worker_pids(job.id)


@ray_test
async def test_timeout_stops_the_work_and_fails_the_job(config, store):  # noqa: F811
    # 1.5 s after `running` the Ray job has barely started (or is still PENDING).
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), "ray", timeout_seconds=1.5), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"] == "timed out after 1.5 s"
    assert await ray_status(job.id) == "STOPPED"
    assert not worker_pids(job.id)


@ray_test
async def test_failing_node_fails_the_job_with_its_message(config, store):  # noqa: F811
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(FAIL, "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"] == "boom"
    assert {"node_id": "f", "status": "failed", "error": "boom"}.items() <= messages[-2].items()
    assert await ray_status(job.id) == "FAILED"


@ray_test
async def test_restart_mid_job_re_adopts_and_misses_nothing(config, store):  # noqa: F811
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(chatter(30, 0.2), "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            before = await collect(manager, job.id, until=lambda m: m["type"] == "log_update")
    row = await store.get_job(job.id)
    assert row is not None
    assert row.status == "running"
    assert await ray_status(job.id) == "RUNNING"  # the server stopped; the Ray job did not
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert messages[-1].get("error") is None
    assert_whole(messages, "completed")
    assert messages[: len(before)] == before
    assert len(log_updates(messages)) == 30  # the re-read tail replayed them all: no doubles
    assert messages[-1]["result"] == {"outputs": {"lines": 30}}
    assert await ray_status(job.id) == "SUCCEEDED"


@ray_test
async def test_worker_killed_fails_the_job_with_the_signal(config, store):  # noqa: F811
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
            for pid in worker_pids(job.id) or pytest.fail("no worker process found"):
                os.kill(pid, signal.SIGKILL)
            messages = await collect(manager, job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"].startswith("worker killed by signal SIGKILL")
    assert await ray_status(job.id) == "FAILED"


@ray_test
async def test_worker_killed_while_the_server_is_down(config, store):  # noqa: F811
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
    for pid in worker_pids(job.id) or pytest.fail("no worker process found"):
        os.kill(pid, signal.SIGKILL)
    with trio.fail_after(DEADLINE_S):
        await wait_ray_status(job.id, "FAILED")
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"].startswith("worker killed by signal SIGKILL")
    assert await ray_status(job.id) == "FAILED"


@ray_test
async def test_cancel_after_a_restart(config, store):  # noqa: F811
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(sleeper(), "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id, until=node_running("s"))
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            await manager.cancel_job(job.id)
            messages = await collect(manager, job.id)
    assert_whole(messages, "cancelled")
    assert {"node_id": "s", "status": "cancelled"}.items() <= messages[-2].items()
    assert await ray_status(job.id) == "STOPPED"
    assert not worker_pids(job.id)


# -- Ray specifics ----------------------------------------------------------------------------


@ray_test
async def test_a_lost_submission_answer_is_resubmitted_and_ray_says_it_already_has_it(
    config,
    store,  # noqa: F811
    caplog,
):
    """A server that died between Ray accepting the job and recording that: the next one
    submits again; Ray answers "already exists" and the job is simply followed."""
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(chatter(20, 0.1), "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            before = await collect(manager, job.id, until=lambda m: m["type"] == "log_update")
    row = await store.get_job(job.id)
    assert row is not None
    assert row.handle is not None
    await store.set_handle(job.id, {**row.handle, "submitted": False})
    caplog.set_level("INFO", logger="nodejob.executions.ray")
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert f"job {job.id}: Ray already had it" in caplog.text  # its HTTP 500, understood
    assert "retrying" not in caplog.text
    assert_whole(messages, "completed")
    assert messages[: len(before)] == before
    assert len(log_updates(messages)) == 20


@ray_test
async def test_admission_holds_back_what_ray_cannot_place(config, store):  # noqa: F811
    """The head has room for N one-CPU jobs: job N+1 waits on our side (Ray never sees it),
    says why, starts when a place frees up; and a waiting job cancels at once."""
    room = int(await head_cpus())
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            running = [await manager.start_job(run(sleeper(), "ray"), CTX) for _ in range(room)]
            for job in running:
                await collect(manager, job.id, until=node_running("s"))
            waiting = await manager.start_job(run(sleeper(), "ray"), CTX)
            gives_up = await manager.start_job(run(sleeper(), "ray"), CTX)
            note = await collect(manager, waiting.id, until=lambda m: m["type"] == "log_update")
            assert note[-1]["content"].startswith("waiting for room on the Ray cluster")
            assert note[-1]["node_id"] is None
            assert [m["status"] for m in note if m["type"] == "job_update"] == ["starting"]
            row = await store.get_job(waiting.id)
            assert row is not None
            assert row.status == "starting"  # waiting for room is not running yet
            assert await ray_status(waiting.id) is None  # not handed to Ray
            await collect(manager, gives_up.id, until=lambda m: m["type"] == "log_update")
            await manager.cancel_job(gives_up.id)
            cancelled = await collect(manager, gives_up.id)
            assert cancelled[-1]["status"] == "cancelled"
            assert await ray_status(gives_up.id) is None  # never submitted, nothing to clean
            await manager.cancel_job(running[0].id)
            await collect(manager, running[0].id)
            await collect(manager, waiting.id, until=node_running("s"))
            assert await ray_status(waiting.id) == "RUNNING"
            for job in [*running[1:], waiting]:
                await manager.cancel_job(job.id)
                assert (await collect(manager, job.id))[-1]["status"] == "cancelled"


@ray_test
async def test_a_restart_while_waiting_for_room_submits_later(config, store):  # noqa: F811
    room = int(await head_cpus())
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            running = [await manager.start_job(run(sleeper(), "ray"), CTX) for _ in range(room)]
            for job in running:
                await collect(manager, job.id, until=node_running("s"))
            waiting = await manager.start_job(run(chatter(5), "ray"), CTX)
            await collect(manager, waiting.id, until=lambda m: m["type"] == "log_update")
    row = await store.get_job(waiting.id)
    assert row is not None
    assert (row.status, row.handle) == ("starting", None)  # queued again by the next server
    async with open_manager(store, config) as manager:
        with trio.fail_after(DEADLINE_S):
            for job in running:  # re-adopted: they hold their places again
                await manager.cancel_job(job.id)
            messages = await collect(manager, waiting.id)
            for job in running:
                assert (await collect(manager, job.id))[-1]["status"] == "cancelled"
    assert_whole(messages, "completed")
    assert messages[-1]["result"] == {"outputs": {"lines": 5}}


@ray_test
async def test_a_job_no_node_can_hold_fails_at_once(config, store):  # noqa: F811
    async with open_manager(store, config) as manager:
        big = await manager.start_job(run(FAIL, "ray", resources={"num_gpus": 64}), CTX)
        bad = await manager.start_job(run(FAIL, "ray", resources={"num_cpus": "two"}), CTX)
        with trio.fail_after(DEADLINE_S):
            big_messages = await collect(manager, big.id)
            bad_messages = await collect(manager, bad.id)
    assert_refused(big_messages)
    assert_refused(bad_messages)
    assert big_messages[-1]["error"].startswith("no node of the Ray cluster at ")
    assert "asks for CPU 1, GPU 64" in big_messages[-1]["error"]
    assert await ray_status(big.id) is None
    assert bad_messages[-1]["error"] == "resources.num_cpus must be a number >= 0, not 'two'"


@ray_test
async def test_cancel_while_ray_holds_the_job_pending(config, store):  # noqa: F811
    """Someone else's job takes the whole head, so Ray holds ours PENDING, where it ignores
    stop requests. Our cancel still ends as `cancelled` once Ray lets go, and the Ray job
    is cleaned up; its worker never ran a node."""
    blocker = f"nodejob-test-blocker-{os.getpid()}-{time.monotonic_ns()}"
    async with ray_api() as ray:
        body = {"entrypoint": "sleep 600", "submission_id": blocker}
        assert await ray.submit({**body, "entrypoint_num_cpus": await head_cpus()})
        try:
            with trio.fail_after(DEADLINE_S):
                await wait_ray_status(blocker, "RUNNING")
            async with open_manager(store, config) as manager:
                job = await manager.start_job(run(sleeper(), "ray"), CTX)
                with trio.fail_after(DEADLINE_S):
                    await wait_ray_status(job.id, "PENDING")
                    await manager.cancel_job(job.id)
                    assert (await store.get_job(job.id)).status == "running"
                    await ray.stop(blocker)
                    messages = await collect(manager, job.id)
        finally:
            await ray.stop(blocker)
            with trio.fail_after(DEADLINE_S):
                await wait_ray_status(blocker, "STOPPED", "SUCCEEDED", "FAILED")
            # Its record stays: deleted now, Ray's job monitor would write it back as FAILED.
    assert_whole(messages, "cancelled")
    assert [m["type"] for m in messages] == ["job_update"] * 3
    assert await ray_status(job.id) == "STOPPED"


@ray_test
async def test_a_worker_that_dies_early_fails_with_its_stderr(config, store):  # noqa: F811
    config.ray_worker = "installed"
    config.ray_worker_command = (
        "python3 -c 'import sys; print(\"bad things\", file=sys.stderr); sys.exit(7)'"
    )
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(FAIL, "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_whole(messages, "failed")
    assert messages[-1]["error"] == "worker exited with status 7: bad things"
    assert await ray_status(job.id) == "FAILED"


@ray_test
async def test_finished_jobs_records_are_swept_once_ray_has_settled_them(config, store):  # noqa: F811
    """Ray writes back (as FAILED) a record deleted before its job monitor noticed the end:
    records are deleted only once settled, and other users' jobs are never touched."""
    foreign = f"nodejob-test-foreign-{os.getpid()}-{time.monotonic_ns()}"
    async with ray_api() as ray, open_manager(store, config) as manager:
        assert await ray.submit({"entrypoint": "true", "submission_id": foreign})
        job = await manager.start_job(run(chatter(3), "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            await collect(manager, job.id)
            await wait_ray_status(foreign, "SUCCEEDED")
            assert job.id not in await sweep_finished(ray, store)  # ended < SETTLE_S ago
            while job.id not in (deleted := await sweep_finished(ray, store, settle_s=5)):
                assert foreign not in deleted
                await trio.sleep(POLL_S)
        # Nothing writes it back: the only way to see that something does not happen is to wait.
        with trio.move_on_after(4):
            await wait_ray_status(job.id, "SUCCEEDED", "FAILED", "STOPPED")
        assert await ray_status(job.id) is None
        assert await ray_status(foreign) == "SUCCEEDED"


# -- without a Ray cluster --------------------------------------------------------------------


async def test_no_ray_cluster_is_a_clear_error_not_a_hang(config, store):  # noqa: F811
    config.ray_address = "http://127.0.0.1:9"  # discard: nothing listens
    async with open_manager(store, config) as manager:
        job = await manager.start_job(run(FAIL, "ray"), CTX)
        with trio.fail_after(DEADLINE_S):
            messages = await collect(manager, job.id)
    assert_refused(messages)
    assert messages[-1]["error"].startswith(
        "no answer from the Ray dashboard at http://127.0.0.1:9"
    )


def assert_refused(messages: list[dict]) -> None:
    """Failed before it was launched: it never ran, so it never was ``running``."""
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    updates = [m["status"] for m in messages if m["type"] == "job_update"]
    assert updates == ["starting", "failed"]


async def test_ray_log_keeps_our_lines_by_shape_and_reads_again_without_doubles(
    nursery,
    store,  # noqa: F811
    caplog,
):
    log = MessageLog(store, 100)
    await nursery.start(log.run)
    log.create(job_record("j"))
    log.append("j", {"type": "job_update", "status": "running"})

    def ours(seq: int) -> bytes:
        body = {"type": "log_update", "job_id": "j", "seq": seq, "content": f"line {seq}"}
        return json.dumps(body, separators=(",", ":")).encode()

    stream = b"".join(
        [
            b"2026-11-28 22:14:15,217\tINFO job_manager.py:581 -- Runtime env is setting up.\n",
            b"Running entrypoint for job j: exec python3 -m nodejob.worker\n",
            ours(3) + b"\n",
            b"Traceback (most recent call last): a stray print\n",
            b"no newline before our line" + ours(4) + b"\n",
            ours(5) + b"\n",
            b'{"type":"log_update","job_id":"j","seq":6,"content":"unfinish',
        ]
    )
    caplog.set_level("DEBUG", logger="nodejob.executions.ray")
    ray_log = _RayLog(StreamIngester(log, "j", source="test"))
    for size in (1, 7, len(stream)):  # Ray's frames split lines anywhere; each read replays
        ray_log.restart()
        for start in range(0, len(stream), size):
            ray_log.feed(stream[start : start + size])
    assert log.last_seq("j") == 5
    assert list(ray_log.stderr) == [
        "Traceback (most recent call last): a stray print",
        "no newline before our line",
    ]
    debug = [r.getMessage() for r in caplog.records if r.name == "nodejob.executions.ray"]
    assert debug == [
        "job j: ray: 2026-11-28 22:14:15,217\tINFO job_manager.py:581 -- Runtime env is setting up.",
        "job j: ray: Running entrypoint for job j: exec python3 -m nodejob.worker",
        "job j: stderr: Traceback (most recent call last): a stray print",
        "job j: stderr: no newline before our line",
    ]
    assert "skipped a line" not in caplog.text  # Ray's lines are expected, not warned about
