"""The message log against a real SQLite file: seqs, group commit, ring, gaps, cursors."""

from __future__ import annotations

import time

import pytest
import trio

from nodejob.log import MessageLog
from nodejob.protocol import JobStatus, ProtocolError, loads
from nodejob.store import JobRecord, Store


def new_job(job_id: str = "job1", user_id: str = "u1") -> JobRecord:
    return JobRecord(
        id=job_id,
        user_id=user_id,
        job_type="workflow",
        status=JobStatus.STARTING,
        workflow_id=None,
        execution_strategy="threaded",
        params={},
        graph={"nodes": [], "edges": []},
        created_at=time.time(),
    )


@pytest.fixture
async def store(tmp_path):
    store = await Store.open(tmp_path / "nodejob.db")
    yield store
    store.close()


async def open_log(nursery: trio.Nursery, store: Store, ring_size: int = 10_000) -> MessageLog:
    log = MessageLog(store, ring_size)
    await nursery.start(log.run)
    return log


def log_line(i: int) -> dict:
    return {"type": "log_update", "node_id": "n", "content": f"line {i}", "severity": "info"}


def finish(log: MessageLog, job_id: str) -> None:
    log.append(job_id, {"type": "job_update", "status": "completed", "result": {"outputs": {}}})


async def collect(log: MessageLog, job_id: str, after_seq: int = 0) -> list[dict]:
    out = []
    async for batch in log.follow(job_id, after_seq):
        out += [loads(entry.text) for entry in batch]
    return out


async def test_seqs_are_consecutive_and_committed_before_readers_see_them(nursery, store):
    log = await open_log(nursery, store)
    job = new_job()
    log.create(job)
    for i in range(500):
        log.append(job.id, log_line(i))
    finish(log, job.id)
    with trio.fail_after(10):
        messages = await collect(log, job.id)
    assert [m["seq"] for m in messages] == list(range(1, 503))
    assert messages[0] == {"type": "job_update", "job_id": "job1", "seq": 1, "status": "starting"}
    assert messages[-1]["status"] == "completed"
    # Everything a reader saw is on disk, and the row carries the final state.
    on_disk = await store.read_messages(job.id, 0, 10_000)
    assert [e.seq for e in on_disk] == list(range(1, 503))
    row = await store.get_job(job.id)
    assert row is not None
    assert (row.status, row.last_seq, row.result) == ("completed", 502, {"outputs": {}})


async def test_live_follower_gets_messages_as_they_commit(nursery, store):
    log = await open_log(nursery, store)
    log.create(new_job())
    seen: list[int] = []
    got_three = trio.Event()

    async def follower() -> None:
        async for batch in log.follow("job1"):
            seen.extend(e.seq for e in batch)
            if len(seen) >= 3:
                got_three.set()

    nursery.start_soon(follower)
    log.append("job1", log_line(1))
    log.append("job1", log_line(2))
    with trio.fail_after(10):
        await got_three.wait()
    finish(log, "job1")
    with trio.fail_after(10):
        await log.wait_committed("job1", 4)
    assert seen[:3] == [1, 2, 3]


async def test_reader_resumes_after_seq_exactly_once(nursery, store):
    log = await open_log(nursery, store)
    log.create(new_job())
    for i in range(100):
        log.append("job1", log_line(i))
    finish(log, "job1")
    with trio.fail_after(10):
        first = (await collect(log, "job1"))[:40]
        rest = await collect(log, "job1", after_seq=first[-1]["seq"])
    assert [m["seq"] for m in first + rest] == list(range(1, 103))


async def test_reader_past_the_end_of_a_finished_job_gets_nothing(nursery, store):
    log = await open_log(nursery, store)
    log.create(new_job())
    finish(log, "job1")
    with trio.fail_after(10):
        await log.wait_committed("job1", 2)
        assert await collect(log, "job1", after_seq=2) == []
        assert await collect(log, "job1", after_seq=99) == []


async def test_ring_trims_and_late_reader_gets_a_gap_first(nursery, store):
    log = await open_log(nursery, store, ring_size=50)
    log.create(new_job())
    for i in range(200):
        log.append("job1", log_line(i))
    finish(log, "job1")
    with trio.fail_after(10):
        await log.wait_committed("job1", 202)
        messages = await collect(log, "job1")
    # 202 messages, the ring keeps the last 50: seqs 153..202.
    assert messages[0] == {
        "type": "gap",
        "job_id": "job1",
        "seq": 152,
        "from_seq": 1,
        "to_seq": 152,
    }
    assert [m["seq"] for m in messages[1:]] == list(range(153, 203))
    assert len(await store.read_messages("job1", 0, 1000)) == 50
    # The same holds once the job is no longer in memory (read from SQLite only).
    log.forget("job1")
    with trio.fail_after(10):
        again = await collect(log, "job1", after_seq=10)
    assert again[0]["type"] == "gap"
    assert (again[0]["from_seq"], again[0]["to_seq"]) == (11, 152)
    assert again[-1]["status"] == "completed"


async def test_read_page(nursery, store):
    log = await open_log(nursery, store)
    log.create(new_job())
    for i in range(30):
        log.append("job1", log_line(i))
    with trio.fail_after(10):
        await log.wait_committed("job1", 31)
    page, more = await log.read_page("job1", 0, 10)
    assert [e.seq for e in page] == list(range(1, 11))
    assert more
    page, more = await log.read_page("job1", 25, 10)
    assert [e.seq for e in page] == list(range(26, 32))
    assert not more


async def test_read_page_behind_the_ring_starts_with_one_gap(nursery, store):
    log = await open_log(nursery, store, ring_size=50)
    log.create(new_job())
    for i in range(200):
        log.append("job1", log_line(i))
    with trio.fail_after(10):
        await log.wait_committed("job1", 201)
    page, more = await log.read_page("job1", 0, 5)
    assert [(e.type, e.seq) for e in page] == [("gap", 151)] + [
        ("log_update", s) for s in range(152, 157)
    ]
    assert more


async def test_ingest_is_idempotent_by_seq(nursery, store):
    log = await open_log(nursery, store)
    log.create(new_job())
    line = {**log_line(0), "seq": 2}
    assert log.ingest("job1", line)
    assert not log.ingest("job1", line)
    assert not log.ingest("job1", {**log_line(9), "seq": 1})
    with pytest.raises(ProtocolError, match="expected seq 3, got 5"):
        log.ingest("job1", {**log_line(1), "seq": 5})
    assert log.ingest("job1", {**log_line(1), "seq": 3})
    with trio.fail_after(10):
        await log.wait_committed("job1", 3)
    assert [e.seq for e in await store.read_messages("job1", 0, 100)] == [1, 2, 3]


async def test_nothing_may_follow_the_terminal_update(nursery, store):
    log = await open_log(nursery, store)
    log.create(new_job())
    finish(log, "job1")
    with pytest.raises(RuntimeError, match="already ended"):
        log.append("job1", log_line(0))


async def test_shutdown_flushes_what_is_queued(tmp_path):
    store = await Store.open(tmp_path / "nodejob.db")
    async with trio.open_nursery() as nursery:
        log = await open_log(nursery, store)
        log.create(new_job())
        for i in range(1000):
            log.append("job1", log_line(i))
        nursery.cancel_scope.cancel()
    assert len(await store.read_messages("job1", 0, 10_000)) == 1001
    store.close()
