"""``nodejob bench``: speed and memory of a real server, measured end to end.

Each benchmark starts a real server in this process (``nodejob.server.app.serve`` on
127.0.0.1:0, a fresh temporary home) and drives it the way clients do: trio-websocket over
loopback, or the manager directly where the figure is about the server alone. The yardstick
for streaming is bare trio-websocket in the same process. docs/benchmarks.md explains every
figure, its target and the latest results. This module belongs to the CLI: it imports the
server, never the other way round.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio
import trio_websocket

from nodejob.config import Config
from nodejob.manager import JobExecutionManager
from nodejob.protocol import (
    EXIT_USAGE,
    TERMINAL,
    JobStatus,
    ProcessingContext,
    RunJobRequest,
    dumps,
    loads,
)
from nodejob.server.app import serve

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from rich.console import Console

TERMINAL_STATUSES: Final = frozenset(s.value for s in TERMINAL)
RECEIVE_LIMIT_BYTES: Final = 16 * 1024 * 1024
BENCH_TIMEOUT_S: Final = 900.0
"""Bound on any one benchmark, so a broken server fails the run instead of hanging it."""
POLL_S: Final = 0.05
SLEEP_JOB_S: Final = 3600.0
"""Sleep jobs of the concurrency benchmark run until cancelled."""

Figure = tuple[str, str, str | None]
"""(key, group, target) — target like ">= 0.5"; None: reported only."""
FIGURES: Final[tuple[Figure, ...]] = (
    ("stream_msgs_per_s", "stream", None),
    ("raw_ws_msgs_per_s", "stream", None),
    ("stream_vs_raw_ws", "stream", ">= 0.5"),
    ("trivial_job_ms_p50", "trivial", "< 5"),
    ("replay_10k_s", "replay", "< 0.5"),
    ("concurrent_jobs", "concurrent", None),
    ("rss_per_job_kb", "concurrent", "< 40"),
    ("multi_job_msgs_per_s", "multi", None),
    ("subprocess_job_ms_p50", "subprocess", None),
    ("docker_job_ms_p50", "docker", None),
)
GROUPS: Final = (
    "concurrent",  # first: later benchmarks leave freed memory that would hide RSS growth
    "stream",
    "trivial",
    "replay",
    "multi",
    "subprocess",
    "docker",
)
OPTIONAL_GROUPS: Final = frozenset({"subprocess", "docker"})
"""Strategies that may be unavailable here: reported as null with a reason, not an error."""


@dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each benchmark does (``--quick`` shrinks it for tests)."""

    stream_messages: int
    stream_rounds: int
    trivial_runs: int
    replay_messages: int
    replay_rounds: int
    concurrent_jobs: int
    multi_jobs: int
    multi_messages_per_job: int
    strategy_runs: int


FULL: Final = Sizes(100_000, 3, 50, 10_000, 5, 10_000, 100, 2_000, 10)
QUICK: Final = Sizes(3_000, 1, 5, 1_000, 2, 200, 10, 200, 2)


class BenchError(RuntimeError):
    """A benchmark could not produce an honest figure (lost messages, a failed job...)."""


class Unavailable(RuntimeError):
    """An optional strategy cannot run here; the message says why."""


def emitter(count: int, size: int = 100) -> dict[str, Any]:
    """An Emit → Output graph: ``count`` log_update messages of ``size`` characters."""
    return {
        "nodes": [
            {"id": "e", "type": "nodejob.Emit", "data": {"count": count, "size": size}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "n"}},
        ],
        "edges": [{"source": "e", "target": "out", "targetHandle": "value"}],
    }


def sleeper(seconds: float) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds, "value": 1}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
        ],
        "edges": [{"source": "s", "target": "out", "targetHandle": "value"}],
    }


TRIVIAL: Final = {
    "nodes": [
        {"id": "a", "type": "nodejob.Constant", "data": {"value": 2}},
        {"id": "b", "type": "nodejob.Add", "data": {"b": 3}},
        {"id": "out", "type": "nodejob.Output", "data": {"name": "sum"}},
    ],
    "edges": [
        {"source": "a", "sourceHandle": "output", "target": "b", "targetHandle": "a"},
        {"source": "b", "sourceHandle": "output", "target": "out", "targetHandle": "value"},
    ],
}
"""examples/hello.json: Constant → Add → Output."""


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc``), not its peak."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- a server and its clients ---------------------------------------------------------------


@dataclass
class Server:
    url: str
    token: str
    manager: JobExecutionManager

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + f"/ws?token={self.token}"


@asynccontextmanager
async def running_server(home: Path, **options: Any) -> AsyncIterator[Server]:
    """A real server on 127.0.0.1:0 with its state in ``home``; stopped on exit."""
    config = Config.from_env(home=home, host="127.0.0.1", port=0, **options)
    async with trio.open_nursery() as nursery:
        info = await nursery.start(partial(serve, config))
        token = (home / "token").read_text().strip()
        try:
            yield Server(info.url, token, JobExecutionManager.get_instance())
        finally:
            nursery.cancel_scope.cancel()


class Connection:
    """One trio-websocket client connection speaking the ``/ws`` protocol, strictly."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def command(self, name: str, **data: Any) -> dict[str, Any]:
        """Send a command and return its reply (the next frame must be that reply)."""
        await self.ws.send_message(dumps({"command": name, "data": data}))
        reply: dict[str, Any] = loads(await self.ws.get_message())
        if "seq" in reply or reply.get("type") == "error":
            raise BenchError(f"{name}: unexpected answer {str(reply)[:200]}")
        return reply

    async def follow(self, job_id: str, after_seq: int = 0, keep: list[str] | None = None) -> int:
        """Read the job's messages up to its terminal job_update; returns the last seq.

        Every message is decoded and its seq checked: consecutive, no gap, nothing lost.
        """
        seq = after_seq
        get = self.ws.get_message
        while True:
            text = await get()
            message = loads(text)
            kind = message.get("type")
            if message.get("job_id") != job_id or message.get("seq") != seq + 1 or kind == "gap":
                raise BenchError(f"job {job_id}: expected seq {seq + 1}, got {text[:200]}")
            seq += 1
            if keep is not None:
                keep.append(text)
            if kind == "job_update" and message["status"] in TERMINAL_STATUSES:
                if message["status"] != JobStatus.COMPLETED:
                    raise BenchError(f"job {job_id} ended {message['status']}: {text[:300]}")
                return seq

    async def run(self, graph: dict[str, Any], **data: Any) -> tuple[str, int]:
        """run_job and follow it to its end: (job id, last seq)."""
        reply = await self.command("run_job", graph=graph, **data)
        job_id = str(reply["job_id"])
        return job_id, await self.follow(job_id)


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[Connection]:
    async with trio_websocket.open_websocket_url(url, max_message_size=RECEIVE_LIMIT_BYTES) as ws:
        yield Connection(ws)


async def committed_job_count(server: Server, graph: dict[str, Any]) -> int:
    """How many messages a job of ``graph`` writes in all (its last seq)."""
    async with connect(server.ws_url) as conn:
        return (await conn.run(graph))[1]


async def start_direct(server: Server, graphs: list[dict[str, Any]]) -> list[str]:
    """Start one job per graph through the manager, concurrently; their ids in order."""
    manager = server.manager
    user = await manager.store.authenticate(server.token)
    assert user is not None
    ids = [""] * len(graphs)

    async def start(index: int) -> None:
        # A private copy per job, as a graph parsed from a client's JSON would be.
        request = RunJobRequest(graph=loads(dumps(graphs[index])), user_id=user.id)
        job = await manager.start_job(request, ProcessingContext(user_id=user.id))
        ids[index] = job.id

    # All at once: their rows and seq 1s then share a few group commits.
    async with trio.open_nursery() as nursery:
        for index in range(len(graphs)):
            nursery.start_soon(start, index)
    return ids


# -- the benchmarks ---------------------------------------------------------------------------


Results = dict[str, Any]


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


async def bench_strategy(
    home: Path, sizes: Sizes, report: Callable[[str], None], strategy: str, **options: Any
) -> Results:
    """Trivial graph, submit → terminal job_update, under an out-of-process strategy."""
    times: list[float] = []
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
    return {
        f"{strategy}_job_ms_p50": statistics.median(times),
        "details": {f"{strategy}_job_ms_p90": _p90(times), f"{strategy}_runs": len(times)},
    }


async def bench_subprocess(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    return await bench_strategy(home, sizes, report, "subprocess")


async def bench_docker(home: Path, sizes: Sizes, report: Callable[[str], None]) -> Results:
    image = os.environ.get("NODEJOB_TEST_DOCKER_IMAGE")
    if not image:
        raise Unavailable("NODEJOB_TEST_DOCKER_IMAGE is not set (no image with nodejob in it)")
    return await bench_strategy(home, sizes, report, "docker", docker_image=image)


BENCHES: Final[dict[str, Callable[[Path, Sizes, Callable[[str], None]], Awaitable[Results]]]] = {
    "stream": bench_stream,
    "trivial": bench_trivial,
    "replay": bench_replay,
    "concurrent": bench_concurrent,
    "multi": bench_multi,
    "subprocess": bench_subprocess,
    "docker": bench_docker,
}


def _active(manager: JobExecutionManager) -> int:
    stats = manager.stats()
    return int(stats["jobs_running"] + stats["jobs_starting"])


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the caller's scope bounds the wait)."""
    while not condition():  # noqa: ASYNC110 - the manager's counters have no event to wait on
        await trio.sleep(POLL_S)


def _p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


# -- running and reporting ------------------------------------------------------------------


@dataclass
class Report:
    figures: dict[str, Any]
    notes: dict[str, str]
    details: dict[str, Any]
    failed: bool = False


async def run_benches(
    groups: list[str], sizes: Sizes, root: Path, report: Callable[[str], None]
) -> Report:
    """Run each group on its own fresh server; a failure becomes nulls with a reason."""
    result = Report({}, {}, {})
    for group in groups:
        keys = [key for key, g, _ in FIGURES if g == group]
        try:
            with trio.fail_after(BENCH_TIMEOUT_S):
                figures = await BENCHES[group](root / group, sizes, report)
        except Exception as exc:
            reason = _describe(exc)
            if not isinstance(exc, Unavailable) and group not in OPTIONAL_GROUPS:
                result.failed = True
            for key in keys:
                result.figures[key] = None
                result.notes[key] = reason
            continue
        result.details.update(figures.pop("details", {}))
        result.figures.update({key: figures[key] for key in keys})
    order = [key for key, _, _ in FIGURES]
    result.figures = dict(sorted(result.figures.items(), key=lambda item: order.index(item[0])))
    return result


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, trio.TooSlowError):
        return f"did not finish within {BENCH_TIMEOUT_S:g} s"
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, Unavailable) else str(exc)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _meets(value: float, target: str) -> bool:
    op, _, bound = target.partition(" ")
    return value >= float(bound) if op == ">=" else value < float(bound)


def as_json(report: Report, sizes: Sizes, quick: bool) -> dict[str, Any]:
    """The ``--json`` object: the figures at top level, then notes, targets and context."""
    return {
        **{key: _rounded(value) for key, value in report.figures.items()},
        "notes": report.notes,
        "targets": {key: target for key, _, target in FIGURES if target is not None},
        "details": {key: _rounded(value) for key, value in report.details.items()},
        "quick": quick,
        "sizes": asdict(sizes),
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key.endswith("_per_s"):
        return f"{value:,.0f} msg/s"
    if key.endswith("_ms_p50"):
        return f"{value:.2f} ms"
    if key.endswith("_s"):
        return f"{value:.3f} s"
    if key.endswith("_kb"):
        return f"{value:.1f} KiB"
    if key == "stream_vs_raw_ws":
        return f"{value:.2f}x"
    return f"{value:,}"


def print_table(report: Report, quick: bool, console: Console) -> None:
    from rich.table import Table

    title = "nodejob bench" + (" (--quick: small counts, targets not judged)" if quick else "")
    table = Table(title=title)
    for column in ("figure", "value", "target", "result"):
        table.add_column(column, justify="right" if column == "value" else "left")
    targets = {key: target for key, _, target in FIGURES}
    for key, value in report.figures.items():
        target = targets[key]
        if value is None:
            verdict = "[yellow]not measured[/]"
        elif target is None:
            verdict = ""
        elif quick:
            verdict = "n/a"
        else:
            verdict = "[green]ok[/]" if _meets(value, target) else "[red]missed[/]"
        table.add_row(key, _shown(key, value), target or "", verdict)
    console.print(table)
    for key, note in report.notes.items():
        console.print(f"[yellow]{key}[/]: {note}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nodejob bench",
        description="Measure a real in-process server on loopback (temporary home).",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="small counts (for tests)")
    parser.add_argument(
        "--only",
        metavar="NAME,...",
        help=f"benchmarks ({', '.join(GROUPS)}) or figure names to run",
    )
    args = parser.parse_args(argv)
    groups = list(GROUPS)
    if args.only:
        by_key = {key: group for key, group, _ in FIGURES}
        wanted = set()
        for name in (n.strip() for n in args.only.split(",") if n.strip()):
            if name not in GROUPS and name not in by_key:
                parser.error(f"--only: unknown benchmark {name!r}")
            wanted.add(by_key.get(name, name))
        groups = [group for group in GROUPS if group in wanted]
    args.groups = groups
    return args


def main(argv: list[str]) -> int:
    """``nodejob bench [--json] [--quick] [--only NAME,...]``; 0 if every benchmark ran,
    1 if one failed, 2 for a usage error, 130 on Ctrl-C."""
    from rich.console import Console

    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    sizes = QUICK if args.quick else FULL
    progress = Console(stderr=True)
    try:
        with tempfile.TemporaryDirectory(prefix="nodejob-bench-") as root:
            if progress.is_terminal:
                with progress.status("starting", refresh_per_second=4) as status:
                    report = trio.run(run_benches, args.groups, sizes, Path(root), status.update)
            else:

                def line(text: str) -> None:
                    print(f"bench: {text}", file=sys.stderr, flush=True)

                report = trio.run(run_benches, args.groups, sizes, Path(root), line)
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(as_json(report, sizes, args.quick), ensure_ascii=False))
    else:
        print_table(report, args.quick, Console())
    return 1 if report.failed else 0
