"""Benchmarks of jobs themselves: a trivial job's round trip, memory per running job, and
the out-of-process strategies (``subprocess``, ``docker``).

Part of ``nodejob bench`` (docs/benchmarks.md explains every figure). The bench imports
the server; nothing outside nodejob.bench imports it but the CLI's lazy ``bench`` handler.
This module imports nodejob.bench.harness, no other benchmark module.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import TYPE_CHECKING, Any, Final

import trio

from nodejob.bench.harness import (
    TRIVIAL,
    BenchError,
    Results,
    Sizes,
    Unavailable,
    connect,
    emitter,
    rss_bytes,
    running_server,
    sleeper,
    start_direct,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from nodejob.manager import JobExecutionManager

POLL_S: Final = 0.05
SLEEP_JOB_S: Final = 3600.0
"""Sleep jobs of the concurrency benchmark run until cancelled."""


async def bench_trivial(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    """run_job of Constant → Add → Output to its terminal job_update, one connection."""
    report(f"trivial: {sizes.trivial_runs} runs of Constant → Add → Output")
    times: list[float] = []
    async with running_server(home) as server, connect(server.ws_url) as conn:
        for _ in range(3):
            await conn.run(TRIVIAL)  # warm-up
        for _ in range(sizes.trivial_runs):
            start = time.perf_counter()
            await conn.run(TRIVIAL)
            times.append((time.perf_counter() - start) * 1000)
    return {
        "trivial_job_ms_p50": statistics.median(times),
        "details": {"trivial_job_ms_p90": _p90(times), "trivial_runs": len(times)},
    }


async def bench_concurrent(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    """RSS growth per running Sleep job, with ``concurrent_jobs`` of them at once."""
    n = sizes.concurrent_jobs
    hold_s = 5.0 if n >= 1000 else 0.5
    async with running_server(home, max_jobs=n + 100) as server:
        manager, log = server.manager, server.manager.log
        report("concurrent: warm-up")
        for job_id in await start_direct(server, [sleeper(SLEEP_JOB_S)] * 20):
            await manager.cancel_job(job_id)
        await wait_until(lambda: _active(manager) == 0)
        gc.collect()
        before = rss_bytes()
        report(f"concurrent: starting {n:,} Sleep jobs")
        start = time.perf_counter()
        ids = await start_direct(server, [sleeper(SLEEP_JOB_S)] * n)
        await wait_until(lambda: manager.stats()["jobs_running"] >= n)
        started_s = time.perf_counter() - start
        gc.collect()
        at_start = rss_bytes()
        report(f"concurrent: {n:,} jobs running; holding {hold_s:g} s")
        committed = log.stats()["messages_committed_total"]
        await trio.sleep(hold_s)
        committed_rate = (log.stats()["messages_committed_total"] - committed) / hold_s
        after_hold = rss_bytes()
        report(f"concurrent: cancelling {n:,} jobs")
        start = time.perf_counter()
        for job_id in ids:
            await manager.cancel_job(job_id)
        await wait_until(lambda: _active(manager) == 0)
        cancel_s = time.perf_counter() - start
        for job_id in ids:
            await log.wait_committed(job_id, log.last_seq(job_id))
        unfinished = await manager.store.unfinished_jobs()
        if unfinished:
            raise BenchError(f"{len(unfinished)} jobs still unfinished after cancelling")
    return {
        "concurrent_jobs": n,
        "rss_per_job_kb": (at_start - before) / 1024 / n,
        "details": {
            "concurrent_start_s": started_s,
            "concurrent_cancel_s": cancel_s,
            "concurrent_hold_s": hold_s,
            "rss_per_job_kb_after_hold": (after_hold - before) / 1024 / n,
            "concurrent_hold_committed_msgs_per_s": committed_rate,
            "rss_baseline_mb": before / 2**20,
        },
    }


async def bench_strategy(
    home: Path, sizes: Sizes, report: Callable[[str], None], strategy: str, **options: Any
) -> Results:
    """Trivial graph, submit → terminal job_update, under an out-of-process strategy; then
    one Emit job's stream, end to end, under the same strategy."""
    times: list[float] = []
    n = sizes.stream_messages
    # A ring larger than the stream: nothing is trimmed, so nothing can be skipped.
    options.setdefault("ring_size", 2 * n + 1000)
    async with running_server(home, **options) as server, connect(server.ws_url) as conn:
        report(f"{strategy}: warm-up")
        try:
            await conn.run(TRIVIAL, execution_strategy=strategy)
        except BenchError as exc:
            raise Unavailable(str(exc)) from None
        for round_ in range(sizes.strategy_runs):
            report(f"{strategy}: run {round_ + 1}/{sizes.strategy_runs}")
            start = time.perf_counter()
            await conn.run(TRIVIAL, execution_strategy=strategy)
            times.append((time.perf_counter() - start) * 1000)
        report(f"{strategy}: stream of {n:,} messages")
        start = time.perf_counter()
        reply = await conn.command("run_job", graph=emitter(n, 100), execution_strategy=strategy)
        count = await conn.follow(str(reply["job_id"]))
        rate = count / (time.perf_counter() - start)
    return {
        f"{strategy}_job_ms_p50": statistics.median(times),
        f"{strategy}_stream_msgs_per_s": rate,
        "details": {f"{strategy}_job_ms_p90": _p90(times), f"{strategy}_runs": len(times)},
    }


async def bench_subprocess(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    return await bench_strategy(home, sizes, report, "subprocess")


async def bench_docker(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    image = os.environ.get("NODEJOB_TEST_DOCKER_IMAGE")
    if not image:
        raise Unavailable("NODEJOB_TEST_DOCKER_IMAGE is not set (an image with Python 3.11+)")
    return await bench_strategy(home, sizes, report, "docker", docker_image=image)


async def bench_ray(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    """Submit → terminal and the log tail's lag on a real Ray cluster (NODEJOB_RAY_ADDRESS or
    NODEJOB_TEST_RAY_ADDRESS)."""
    from nodejob.executions.ray_bench import measure_ray
    from nodejob.executions.ray_cluster import RayError

    address = os.environ.get("NODEJOB_TEST_RAY_ADDRESS") or os.environ.get("NODEJOB_RAY_ADDRESS")
    if not address:
        raise Unavailable("no Ray cluster: set NODEJOB_RAY_ADDRESS (its dashboard URL)")
    report(f"ray: measuring against {address} (about 30 s)")
    try:
        return await measure_ray(address)
    except RayError as exc:
        raise Unavailable(f"Ray at {address}: {exc}") from None


def _active(manager: JobExecutionManager) -> int:
    stats = manager.stats()
    return int(stats["jobs_running"] + stats["jobs_starting"])


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the caller's scope bounds the wait)."""
    while not condition():  # noqa: ASYNC110 - the manager's counters have no event to wait on
        await trio.sleep(POLL_S)


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]
