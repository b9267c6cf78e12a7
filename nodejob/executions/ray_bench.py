"""Figures of the ``ray`` strategy against a real Ray cluster, for ``nodejob bench``.

``measure_ray(address)`` returns:

- ``ray_job_ms_p50``: a trivial graph through a real manager (real SQLite in a temporary
  home), from ``start_job`` to its terminal ``job_update`` being committed. Ray's part
  dominates: package check, submission, the job's supervisor actor and runtime env, the
  worker's start, then Ray noticing the exit.
- ``ray_stream_lag_ms_p50``: how long a line a job writes takes to reach us through the log
  tail that the strategy reads. Measured with a raw Ray job that prints wall-clock stamps
  every 20 ms (nodejob's messages carry no clock), read through the same ``RayJobs.tail``:
  arrival minus stamp. Valid where the Ray node's clock is ours (a local head) or NTP-close.
- in ``details``: p90s, the first message's latency, and ``ray_burst_msgs_per_s``: a job
  emitting 20,000 messages, counted from its first to its last message in our log.

Imports the manager and store: bench-only, never imported by the server.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from contextlib import aclosing
from pathlib import Path
from typing import Any, Final

import trio

from nodejob.config import Config
from nodejob.executions.ray_cluster import RayJobs
from nodejob.executions.stream import LineAssembler
from nodejob.manager import JobExecutionManager, open_manager
from nodejob.protocol import (
    ExecutionStrategy,
    ProcessingContext,
    RunJobRequest,
    is_terminal_update,
    loads,
)
from nodejob.store import Store

RUNS: Final = 5
BURST: Final = 20_000
STAMPS: Final = 200
STAMP_INTERVAL_S: Final = 0.02
TIMEOUT_S: Final = 600.0
TRIVIAL: Final = {
    "nodes": [
        {"id": "c", "type": "nodejob.Constant", "data": {"value": 1}},
        {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
    ],
    "edges": [{"source": "c", "target": "out", "targetHandle": "value"}],
}
STAMPER: Final = (
    "python3 -c 'import time\n"
    f"for _ in range({STAMPS}):\n"
    '    print(f"stamp {time.time():.6f}", flush=True)\n'
    f"    time.sleep({STAMP_INTERVAL_S})'"
)


def _burst(count: int) -> dict[str, Any]:
    """``count`` messages at once, then 5 s of sleep: the job outlives the tail's lag, so
    every message reaches us through the tail (not through the final read of a whole log)."""
    return {
        "nodes": [
            {"id": "e", "type": "nodejob.Emit", "data": {"count": count}},
            {"id": "s", "type": "nodejob.Sleep", "data": {"seconds": 5}},
        ],
        "edges": [{"source": "e", "target": "s", "targetHandle": "value"}],
    }


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(
    manager: JobExecutionManager, graph: dict[str, Any]
) -> tuple[float, float, float, int]:
    """Of one ray job: ms to its first worker message, to its last log_update, to its end;
    and how many log_updates it had."""
    request = RunJobRequest(graph=graph, execution_strategy=ExecutionStrategy.RAY)
    start = time.perf_counter()
    job = await manager.start_job(request, ProcessingContext(user_id="bench"))
    first = last_log = None
    count = 0
    async with aclosing(manager.log.follow(job.id)) as batches:
        async for batch in batches:
            now = time.perf_counter()
            for entry in batch:
                message = loads(entry.text)
                if first is None and message["type"] != "job_update":
                    first = now
                if message["type"] == "log_update":
                    count, last_log = count + 1, now
                if is_terminal_update(message) and message["status"] != "completed":
                    raise RuntimeError(f"ray job {job.id} ended {message}")
    end = time.perf_counter()
    ms = [((at or end) - start) * 1000 for at in (first, last_log, end)]
    return ms[0], ms[1], ms[2], count


async def _stream_lag(address: str) -> list[float]:
    """Lags (ms) of the STAMPER job's lines through Ray's log tail."""
    submission_id = f"nodejob-bench-{uuid.uuid4().hex}"
    lags: list[float] = []
    async with RayJobs(address) as ray:
        await ray.submit({"entrypoint": STAMPER, "submission_id": submission_id})
        try:
            lines = LineAssembler()
            async with ray.tail(submission_id) as ws:
                while len(lags) < STAMPS:
                    frame = await ws.get_message()
                    now = time.time()
                    chunk = frame.encode() if isinstance(frame, str) else frame
                    lags += [
                        (now - float(line.split()[1])) * 1000
                        for line in lines.feed(chunk)
                        if line.startswith(b"stamp ")
                    ]
        finally:
            # It ends on its own within seconds. Its record stays (a delete this soon would be
            # written back by Ray's job monitor, see RayJobs.delete).
            await ray.stop(submission_id)
    return lags


async def measure_ray(address: str) -> dict[str, Any]:
    """The ray strategy's figures against the Ray dashboard at ``address`` (see the module
    docstring). Takes about a minute; raises RayError if no cluster answers there.

    Cancellation: safe; a Ray job of the bench may be left to finish on its own.
    """
    with tempfile.TemporaryDirectory(prefix="nodejob-ray-bench-") as home:
        # A ring that holds the whole burst: the reader here must see every message.
        config = Config(
            home=Path(home), ray_address=address, cleanup_interval_s=3600, ring_size=2 * BURST
        )
        store = await Store.open(config.db_path)
        try:
            with trio.fail_after(TIMEOUT_S):
                async with open_manager(store, config) as manager:
                    await _run(manager, TRIVIAL)  # warm-up: uploads the worker bundle
                    runs = [await _run(manager, TRIVIAL) for _ in range(RUNS)]
                    burst_first, burst_last, _, burst_count = await _run(manager, _burst(BURST))
                lags = await _stream_lag(address)
        finally:
            store.close()
    firsts = [first for first, _, _, _ in runs]
    totals = [total for _, _, total, _ in runs]
    if burst_count != BURST:
        raise RuntimeError(f"the burst job logged {burst_count} of {BURST} messages")
    return {
        "ray_job_ms_p50": statistics.median(totals),
        "ray_stream_lag_ms_p50": statistics.median(lags),
        "details": {
            "ray_job_ms_p90": _p(totals, 0.9),
            "ray_first_message_ms_p50": statistics.median(firsts),
            "ray_stream_lag_ms_p90": _p(lags, 0.9),
            "ray_stream_lag_ms_max": max(lags),
            "ray_burst_msgs_per_s": burst_count / max(1e-3, (burst_last - burst_first) / 1000),
            "ray_runs": RUNS,
        },
    }
