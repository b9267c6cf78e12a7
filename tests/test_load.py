"""Load, CI-sized (issue 7): many followers at once, and a big job history.

No wall-clock assertions: each test checks what must hold under load (every follower gets
every message of its job exactly once, in order; every page of a 100,000-job history is right)
and prints what it measured on a ``FIGURES`` line (``pytest -s``); docs/guarantees.md records
them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import trio

from nodejob.protocol import JobStatus, dumps
from nodejob.store import Batch, JobRecord, Store
from tests.hardening import TERMINAL, RawWebSocket, emitter, rss_kib, start_server_process

if TYPE_CHECKING:
    from pathlib import Path

JOBS = 100
CLIENTS = 1000
EMITTED = 40
"""log_update messages per job; with node and job updates a stream is ~50 messages."""
HISTORY = 100_000


def figures(name: str, **values: Any) -> None:
    print(f"\nFIGURES {name}: " + json.dumps(values, sort_keys=True))


async def test_a_thousand_followers_of_a_hundred_jobs_each_get_every_message_once_in_order(
    tmp_path: Path,
) -> None:
    server = await start_server_process(tmp_path / "home")
    streams: dict[int, list[str]] = {}
    connect_limiter = trio.CapacityLimiter(64)  # the listen backlog, not the server, is small
    rss_before = rss_kib(server.pid)
    rss_peak = rss_before
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
            # Each job sleeps first, so most followers are attached before it streams: the
            # load is live fan-out, not only replay.
            graph = emitter(EMITTED, size=50, interval=0.01, delay=3)
            jobs = [
                (await http.post("/api/jobs/", json={"graph": graph})).json()["id"]
                for _ in range(JOBS)
            ]
            started = time.perf_counter()
            attached = 0

            async def follower(index: int) -> None:
                nonlocal attached
                job_id = jobs[index % JOBS]
                async with connect_limiter:
                    ws = await RawWebSocket.open(server.url, server.token)
                async with ws:
                    await ws.command("reconnect_job", job_id=job_id, after_seq=0)
                    texts: list[str] = []
                    reply = json.loads(await ws.get())
                    assert reply == {"message": f"Reconnecting to job {job_id}", "job_id": job_id}
                    attached += 1
                    while True:
                        text = await ws.get()
                        assert isinstance(text, str)
                        texts.append(text)
                        message = json.loads(text)
                        if message["type"] == "job_update" and message["status"] in TERMINAL:
                            break
                streams[index] = texts

            async def sample_rss() -> None:
                nonlocal rss_peak
                while True:
                    rss_peak = max(rss_peak, rss_kib(server.pid))
                    await trio.sleep(0.1)

            with trio.fail_after(120):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sample_rss)
                    async with trio.open_nursery() as followers:
                        for index in range(CLIENTS):
                            followers.start_soon(follower, index)
                    nursery.cancel_scope.cancel()
            elapsed = time.perf_counter() - started
            stored = {}
            for job_id in jobs:
                page = await http.get(
                    f"/api/jobs/{job_id}/messages", params={"after_seq": 0, "limit": 10_000}
                )
                stored[job_id] = [dumps(m) for m in page.json()["messages"]]
    finally:
        assert await server.stop() == 0
    assert len(streams) == CLIENTS
    delivered = 0
    for index, texts in streams.items():
        expected = stored[jobs[index % JOBS]]
        assert json.loads(expected[-1])["status"] == "completed"
        # Exactly the stored stream: every seq once, in order, byte for byte.
        assert texts == expected, f"follower {index}"
        delivered += len(texts)
    assert "Traceback" not in server.stderr(), server.stderr()
    figures(
        "fan-out",
        clients=CLIENTS,
        jobs=JOBS,
        messages_delivered=delivered,
        seconds_from_first_connect_to_last_terminal=round(elapsed, 2),
        server_rss_mib_before=round(rss_before / 1024, 1),
        server_rss_mib_peak=round(rss_peak / 1024, 1),
    )


SLOW_READERS = 5
FAST_READERS = 20
BIG_JOB = 6000
"""log_update messages of 1000 characters, 0.5 ms apart: six times the ring of the server."""
RING = 1000


async def test_slow_readers_never_hold_back_the_job_or_the_fast_readers(tmp_path: Path) -> None:
    """One chatty job, followed by fast readers and by slow ones (~100 messages a second).

    The job and the fast readers run at full speed: when the first fast reader sees the
    terminal update, every slow reader is still far behind. The slow readers then get the
    rest at their own pace: each seq once, in order, with a ``gap`` for exactly the seqs that
    left the ring while they lagged, never a silent skip. Server memory stays bounded.
    """
    server = await start_server_process(tmp_path / "home", "--ring-size", str(RING))
    progress: dict[str, int] = {}
    when_fast_done: list[int] = []
    """How far each slow reader had read when the first fast reader saw the end."""
    streams: dict[str, list[dict[str, Any]]] = {}
    rss_before = rss_kib(server.pid)
    rss_peak = rss_before
    try:
        async with await RawWebSocket.open(server.url, server.token) as starter:
            graph = emitter(BIG_JOB, size=1000, interval=0.0005, delay=1)
            await starter.command("run_job", graph=graph)
            job_id = (await starter.reply())["job_id"]

        async def reader(name: str, slow: bool) -> None:
            nonlocal rss_peak
            seen: list[dict[str, Any]] = []
            async with await RawWebSocket.open(server.url, server.token) as ws:
                await ws.command("reconnect_job", job_id=job_id)
                await ws.reply()
                while (
                    seen[-1:] == []
                    or seen[-1]["type"] != "job_update"
                    or (seen[-1]["status"] not in TERMINAL)
                ):
                    seen.append(await ws.receive())
                    progress[name] = len(seen)
                    if slow and len(seen) % 5 == 0:
                        await trio.sleep(0.05)  # the reader is slow; not a synchronisation
                        rss_peak = max(rss_peak, rss_kib(server.pid))
            if not slow and not when_fast_done:
                when_fast_done.extend(progress.get(f"slow{i}", 0) for i in range(SLOW_READERS))
            streams[name] = seen

        with trio.fail_after(300):
            async with trio.open_nursery() as nursery:
                for index in range(SLOW_READERS):
                    nursery.start_soon(reader, f"slow{index}", True)
                for index in range(FAST_READERS):
                    nursery.start_soon(reader, f"fast{index}", False)
        rss_peak = max(rss_peak, rss_kib(server.pid))
    finally:
        code = await server.stop()
    assert code == 0
    assert len(streams) == SLOW_READERS + FAST_READERS
    last_seq = streams["fast0"][-1]["seq"]
    gaps = {}
    for name, seen in streams.items():
        expected = 1
        for message in seen:
            if message["type"] == "gap":
                assert message["from_seq"] == expected, name
                expected = message["to_seq"] + 1
            else:
                assert message["seq"] == expected, name
                expected += 1
        assert seen[-1]["status"] == "completed", name
        assert seen[-1]["seq"] == last_seq, name
        gaps[name] = sum(m["type"] == "gap" for m in seen)
    assert all(gaps[f"fast{i}"] == 0 for i in range(FAST_READERS)), gaps
    assert all(gaps[f"slow{i}"] >= 1 for i in range(SLOW_READERS)), gaps
    # Held back, they would be at the end with the fast ones (and have had no gap).
    assert max(when_fast_done) < last_seq * 2 // 3, when_fast_done
    grown_mib = (rss_peak - rss_before) / 1024
    assert grown_mib < 128, f"the readers grew the server by {grown_mib:.0f} MiB"
    assert "Traceback" not in server.stderr(), server.stderr()
    figures(
        "slow readers",
        job_messages=last_seq,
        ring=RING,
        slow_readers_progress_when_the_first_fast_one_was_done=when_fast_done,
        slow_reader_gaps=[gaps[f"slow{i}"] for i in range(SLOW_READERS)],
        server_rss_mib_before=round(rss_before / 1024, 1),
        server_rss_mib_peak=round(rss_peak / 1024, 1),
    )


def insert_history(home: Path, count: int) -> str:
    """``count`` finished jobs of user local, through the store's own group-commit path; each
    with its three job_update messages. Returns the user's id."""
    store = Store.open_sync(home / "nodejob.db")
    try:
        store.ensure_local_user_sync(home / "token")
        user_id = str(
            store._writer.execute("SELECT id FROM users WHERE name = 'local'").fetchall()[0][0]
        )
        first = time.time() - count - 10
        for start in range(0, count, 10_000):
            batch = Batch()
            for index in range(start, min(count, start + 10_000)):
                job_id = uuid.uuid4().hex
                created = first + index
                batch.new_jobs.append(
                    JobRecord(
                        id=job_id,
                        user_id=user_id,
                        job_type="workflow",
                        status=JobStatus.COMPLETED,
                        workflow_id="rare" if index < 10 else f"w{index % 50}",
                        execution_strategy="threaded",
                        params={"index": index},
                        graph={},
                        created_at=created,
                        started_at=created + 0.1,
                        finished_at=created + 0.2,
                        result={"outputs": {}},
                        last_seq=3,
                    )
                )
                for seq, status in enumerate(("starting", "running", "completed"), 1):
                    message = {"type": "job_update", "job_id": job_id, "seq": seq}
                    text = dumps({**message, "status": status})
                    batch.messages.append((job_id, seq, "job_update", text))
            store.commit_batch_sync(batch)
    finally:
        store.close()
    return user_id


async def timed_get(http: httpx.AsyncClient, url: str, **params: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    # (params={} would drop the query string that a Link URL carries)
    response = await http.get(url, params=params or None)
    elapsed_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    return response, elapsed_ms


async def test_a_hundred_thousand_finished_jobs_page_whole_and_in_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    started = time.perf_counter()
    await trio.to_thread.run_sync(insert_history, home, HISTORY)
    insert_s = time.perf_counter() - started
    started = time.perf_counter()
    server = await start_server_process(home)
    startup_s = time.perf_counter() - started
    latencies: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(
            base_url=server.url, headers=server.headers, timeout=60
        ) as http:
            # Walk the whole history, 1000 a page, by the Link headers.
            seen: list[tuple[str, str]] = []
            keys: list[str | None] = [None]
            page_ms: list[float] = []
            url: str | None = "/api/jobs/?limit=1000"
            while url is not None:
                response, elapsed = await timed_get(http, url)
                page_ms.append(elapsed)
                seen += [(job["created_at"], job["id"]) for job in response.json()]
                link = response.headers.get("Link")
                url = link[1 : link.index(">")] if link else None
                if url is not None:
                    keys.append(httpx.URL(url).params["start_key"])
            assert len(seen) == HISTORY
            assert len({job_id for _, job_id in seen}) == HISTORY
            assert seen == sorted(seen, reverse=True)  # newest first, no overlaps
            latencies["walk_1000_first_ms"] = page_ms[0]
            latencies["walk_1000_middle_ms"] = page_ms[len(page_ms) // 2]
            latencies["walk_1000_last_ms"] = page_ms[-1]
            latencies["walk_1000_total_s"] = sum(page_ms) / 1000
            # Pages of 100 from the first, middle and last keys; each right where it should be.
            for name, key, offset in [
                ("first", None, 0),
                ("middle", keys[len(keys) // 2], 1000 * (len(keys) // 2)),
                ("last", keys[-1], 1000 * (len(keys) - 1)),
            ]:
                params = {"limit": 100} | ({"start_key": key} if key else {})
                times = []
                for _ in range(5):
                    response, elapsed = await timed_get(http, "/api/jobs/", **params)
                    times.append(elapsed)
                ids = [job["id"] for job in response.json()]
                assert ids == [job_id for _, job_id in seen[offset : offset + 100]]
                latencies[f"page_100_{name}_ms"] = sorted(times)[2]
            # A rare workflow at the very end of the history, and the unfinished jobs.
            response, elapsed = await timed_get(http, "/api/jobs/", workflow_id="rare")
            assert len(response.json()) == 10
            latencies["rare_workflow_ms"] = elapsed
            response, elapsed = await timed_get(http, "/api/jobs/running/all")
            assert response.json() == []
            latencies["running_all_ms"] = elapsed
            rss = rss_kib(server.pid)
    finally:
        assert await server.stop() == 0
    db_mib = (home / "nodejob.db").stat().st_size / 2**20
    figures(
        "history",
        jobs=HISTORY,
        insert_s=round(insert_s, 2),
        serve_startup_s=round(startup_s, 2),
        db_mib=round(db_mib, 1),
        server_rss_mib=round(rss / 1024, 1),
        **{k: round(v, 2) for k, v in latencies.items()},
    )
