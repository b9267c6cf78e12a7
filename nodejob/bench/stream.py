"""Benchmarks of the message path: one stream against bare trio-websocket, replay, many jobs.

``stream``: one Emit job's messages over /ws, and the yardstick, the same frames over bare
trio-websocket in the same process. ``replay``: ``reconnect_job`` from seq 0 of a finished
job, warm and from SQLite. ``multi``: many Emit jobs at once, messages committed per second.

Part of ``nodejob bench`` (docs/benchmarks.md explains every figure). The bench imports
the server; nothing outside nodejob.bench imports it but the CLI's lazy ``bench`` handler.
This module imports nodejob.bench.harness, no other benchmark module.
"""

from __future__ import annotations

import statistics
import time
from contextlib import suppress
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
import trio_websocket

from nodejob.bench.harness import (
    RECEIVE_LIMIT_BYTES,
    BenchError,
    Results,
    Sizes,
    committed_job_count,
    connect,
    emitter,
    running_server,
    start_direct,
)
from nodejob.protocol import JobStatus, loads

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


async def bench_stream(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    """One Emit job's messages over /ws vs the same frames over bare trio-websocket."""
    n = sizes.stream_messages
    streams: list[float] = []
    raws: list[float] = []
    frames: list[str] = []
    for round_ in range(sizes.stream_rounds):
        report(f"stream: round {round_ + 1}/{sizes.stream_rounds}, {n:,} messages via /ws")
        # A ring larger than the stream: nothing is trimmed, so nothing can be skipped.
        async with (
            running_server(home / f"stream{round_}", ring_size=2 * n + 1000) as server,
            connect(server.ws_url) as conn,
        ):
            await conn.run(emitter(1))  # warm-up
            frames = []
            start = time.perf_counter()  # from the run_job send...
            reply = await conn.command("run_job", graph=emitter(n, 100))
            count = await conn.follow(str(reply["job_id"]), keep=frames)
            streams.append(count / (time.perf_counter() - start))  # ...to the last receipt
        report(f"stream: round {round_ + 1}/{sizes.stream_rounds}, bare trio-websocket")
        raws.append(await raw_ws_rate(frames))
    stream, raw = statistics.median(streams), statistics.median(raws)
    return {
        "stream_msgs_per_s": stream,
        "raw_ws_msgs_per_s": raw,
        "stream_vs_raw_ws": stream / raw,
        "details": {
            "stream_messages": len(frames),
            "frame_bytes_mean": sum(map(len, frames)) / len(frames),
            "stream_rounds_msgs_per_s": streams,
            "raw_rounds_msgs_per_s": raws,
        },
    }


async def raw_ws_rate(frames: list[str]) -> float:
    """Send ``frames`` from a trio-websocket server to a client (one process, loopback), one
    ``send_message`` each; the client decodes each; messages per second, first send to last
    receipt."""
    started = 0.0

    async def handler(request: Any) -> None:
        nonlocal started
        ws = await request.accept()
        started = time.perf_counter()
        for text in frames:
            await ws.send_message(text)
        with suppress(trio_websocket.ConnectionClosed):
            await ws.get_message()  # until the client closes

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            partial(
                trio_websocket.serve_websocket,
                handler,
                "127.0.0.1",
                0,
                ssl_context=None,
                handler_nursery=nursery,
                max_message_size=RECEIVE_LIMIT_BYTES,
            )
        )
        url = f"ws://127.0.0.1:{server.port}/"
        async with trio_websocket.open_websocket_url(
            url, max_message_size=RECEIVE_LIMIT_BYTES
        ) as ws:
            get, expected = ws.get_message, 1
            for _ in frames:
                if loads(await get())["seq"] != expected:
                    raise BenchError("bare trio-websocket lost or reordered a frame")
                expected += 1
            elapsed = time.perf_counter() - started
        nursery.cancel_scope.cancel()
    return len(frames) / elapsed


async def bench_replay(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    """reconnect_job from seq 0 to a finished job of ``replay_messages`` messages."""
    n = sizes.replay_messages
    report(f"replay: writing a job of {n:,} messages")
    async with running_server(home) as server, connect(server.ws_url) as conn:
        overhead = (await conn.run(emitter(0)))[1]  # the messages around Emit's own
        job_id, last = await conn.run(emitter(n - overhead))
        if last != n:
            raise BenchError(f"replay job has {last} messages, not {n}")
        rounds: dict[str, list[float]] = {"warm": [], "cold": []}
        for kind in rounds:
            if kind == "cold":
                # Forget the job's in-memory state: every message then comes from SQLite.
                server.manager.cleanup_completed_jobs(0)
            for round_ in range(sizes.replay_rounds):
                report(f"replay: {kind} round {round_ + 1}/{sizes.replay_rounds}")
                start = time.perf_counter()
                await conn.command("reconnect_job", job_id=job_id, after_seq=0)
                if await conn.follow(job_id) != n:
                    raise BenchError("replay ended early")
                rounds[kind].append(time.perf_counter() - start)
    return {
        "replay_10k_s": statistics.median(rounds["warm"]),
        "details": {
            "replay_messages": n,
            "replay_rounds_s": rounds["warm"],
            "replay_cold_s": statistics.median(rounds["cold"]),
        },
    }


async def bench_multi(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    """``multi_jobs`` Emit jobs at once: messages committed per second, all jobs together."""
    jobs, m = sizes.multi_jobs, sizes.multi_messages_per_job
    async with running_server(home, max_jobs=max(1000, jobs)) as server:
        manager, log = server.manager, server.manager.log
        per_job = await committed_job_count(server, emitter(m))  # warm-up, and the count
        report(f"multi: {jobs} jobs emitting {m:,} messages each")
        start = time.perf_counter()
        ids = await start_direct(server, [emitter(m)] * jobs)
        for job_id in ids:
            await log.wait_committed(job_id, per_job)
        elapsed = time.perf_counter() - start
        for job_id in ids:
            job = await manager.get_job(job_id)
            if job is None or job.status is not JobStatus.COMPLETED or job.last_seq != per_job:
                raise BenchError(f"job {job_id} did not complete with {per_job} messages")
    return {
        "multi_job_msgs_per_s": jobs * per_job / elapsed,
        "details": {"multi_jobs": jobs, "multi_messages": jobs * per_job, "multi_s": elapsed},
    }
