"""JobExecutionManager with the threaded strategy, on a real SQLite file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from nodejob.config import Config
from nodejob.manager import SERVER_STOPPED, CancelResult, open_manager
from nodejob.protocol import ProcessingContext, RunJobRequest, loads
from nodejob.store import Store
from nodejob.workflow import GraphError

EXAMPLES = Path(__file__).parent.parent / "examples"
CTX = ProcessingContext(user_id="u1")


def hello() -> dict:
    return json.loads((EXAMPLES / "hello.json").read_text())


def sleeper(seconds: float = 30) -> dict:
    return {
        "nodes": [
            {"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds, "value": 1}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
        ],
        "edges": [{"source": "s", "target": "out", "targetHandle": "value"}],
    }


@pytest.fixture
def config(tmp_path) -> Config:
    return Config(home=tmp_path, max_jobs=2, cleanup_interval_s=3600)


async def messages_of(manager, job_id: str) -> list[dict]:
    out = []
    async for batch in manager.log.follow(job_id, 0):
        out += [loads(e.text) for e in batch]
    return out


async def test_hello_completes_with_outputs(config):
    store = await Store.open(config.db_path)
    async with open_manager(store, config) as manager:
        job = await manager.start_job(RunJobRequest(graph=hello()), CTX)
        with trio.fail_after(10):
            messages = await messages_of(manager, job.id)
        row = await manager.get_job(job.id)
    store.close()
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    assert [m["status"] for m in messages if m["type"] == "job_update"] == [
        "starting",
        "running",
        "completed",
    ]
    assert messages[-1]["result"] == {"outputs": {"sum": 5}}
    assert row is not None
    assert row.status == "completed"
    assert row.result == {"outputs": {"sum": 5}}
    assert row.started_at is not None
    assert row.finished_at is not None


async def test_invalid_graph_is_rejected_before_start(config):
    store = await Store.open(config.db_path)
    async with open_manager(store, config) as manager:
        bad = {"nodes": [{"id": "x", "type": "nodejob.Nope"}], "edges": []}
        with pytest.raises(GraphError, match="node 'x'"):
            await manager.start_job(RunJobRequest(graph=bad), CTX)
        jobs, _ = await manager.list_jobs("u1")
    store.close()
    assert jobs == []


async def test_admission_limit_keeps_extra_jobs_starting_and_cancel_works(config):
    store = await Store.open(config.db_path)
    async with open_manager(store, config) as manager:
        jobs = [await manager.start_job(RunJobRequest(graph=sleeper()), CTX) for _ in range(3)]
        with trio.fail_after(10):
            for job in jobs[:2]:
                await manager.log.wait_committed(job.id, 2)
        assert manager.stats()["jobs_running"] == 2
        assert manager.stats()["jobs_starting"] == 1
        waiting = await manager.get_job(jobs[2].id)
        assert waiting is not None
        assert waiting.status == "starting"
        # Cancel the one still waiting for a slot, then a running one.
        assert await manager.cancel_job(jobs[2].id) is CancelResult.ACCEPTED
        assert await manager.cancel_job(jobs[0].id) is CancelResult.ACCEPTED
        assert await manager.cancel_job(jobs[0].id) is CancelResult.ACCEPTED
        with trio.fail_after(10):
            last_waiting = (await messages_of(manager, jobs[2].id))[-1]
            last_running = (await messages_of(manager, jobs[0].id))[-1]
        assert last_waiting["status"] == "cancelled"
        assert last_running["status"] == "cancelled"
        assert await manager.cancel_job(jobs[0].id) is CancelResult.ALREADY_FINISHED
        assert await manager.cancel_job("nope") is CancelResult.NOT_FOUND
        await manager.cancel_job(jobs[1].id)
    store.close()


async def test_timeout_fails_the_job(config):
    store = await Store.open(config.db_path)
    async with open_manager(store, config) as manager:
        job = await manager.start_job(RunJobRequest(graph=sleeper(), timeout_seconds=0.2), CTX)
        with trio.fail_after(10):
            last = (await messages_of(manager, job.id))[-1]
    store.close()
    assert last["status"] == "failed"
    assert last["error"] == "timed out after 0.2 s"


async def test_failing_node_fails_the_job_with_its_message(config):
    graph = {"nodes": [{"id": "f", "type": "nodejob.Fail", "data": {"message": "boom"}}]}
    store = await Store.open(config.db_path)
    async with open_manager(store, config) as manager:
        job = await manager.start_job(RunJobRequest(graph=graph), CTX)
        with trio.fail_after(10):
            last = (await messages_of(manager, job.id))[-1]
    store.close()
    assert (last["status"], last["error"]) == ("failed", "boom")


async def test_shutdown_fails_threaded_jobs_with_the_reason(config):
    store = await Store.open(config.db_path)
    async with open_manager(store, config) as manager:
        job = await manager.start_job(RunJobRequest(graph=sleeper()), CTX)
        with trio.fail_after(10):
            await manager.log.wait_committed(job.id, 2)
    row = await store.get_job(job.id)
    store.close()
    assert row is not None
    assert (row.status, row.error) == ("failed", SERVER_STOPPED)


async def test_saved_workflow_runs_by_id(config):
    store = await Store.open(config.db_path)
    await store.put_workflow("u1", "wf", "hello", hello())
    async with open_manager(store, config) as manager:
        job = await manager.start_job(RunJobRequest(workflow_id="wf"), CTX)
        with trio.fail_after(10):
            last = (await messages_of(manager, job.id))[-1]
        with pytest.raises(LookupError, match="Workflow not found: other"):
            await manager.start_job(RunJobRequest(workflow_id="other"), CTX)
        # Another user's saved workflow does not exist for this one.
        with pytest.raises(LookupError):
            await manager.start_job(
                RunJobRequest(workflow_id="wf"), ProcessingContext(user_id="u2")
            )
    store.close()
    assert last["result"] == {"outputs": {"sum": 5}}
