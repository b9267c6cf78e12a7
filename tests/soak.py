"""Soak: ``python -m tests.soak --minutes 10`` (not run in CI).

Runs a real ``nodejob serve`` under a mixed, steady workload for a while and records the
server's resident memory and open file descriptors every few seconds, while checking the
product's promises all along:

- jobs of every kind start all the time: chatty emitters, sleepers, failures, timeouts,
  cancels, tiny graphs;
- WebSocket followers attach to recent jobs, read a random number of messages, drop the
  connection, reattach with ``after_seq`` and carry on to the end: each must see every seq
  exactly once, in order (a ``gap`` only if the ring moved on);
- event-stream readers and REST pollers (job lists, running jobs, message pages) run too.

Prints one CSV line per sample (``elapsed_s,rss_mib,fds,...``) and a summary; exits 1 if any
promise was broken or the server failed. docs/guarantees.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.hardening import (
    TERMINAL,
    RawWebSocket,
    WsClosed,
    emitter,
    metric,
    rss_kib,
    start_server_process,
)

SAMPLE_S = 5.0


@dataclass
class Tally:
    jobs_started: int = 0
    jobs_followed: int = 0
    reattaches: int = 0
    messages: int = 0
    sse_streams: int = 0
    rest_calls: int = 0
    violations: list[str] = field(default_factory=list)
    recent: list[str] = field(default_factory=list)


def graphs(rng: random.Random) -> dict[str, Any]:
    """A job's run_job data, drawn from a mix of kinds."""
    kind = rng.choices(
        ["chatty", "steady", "sleeper", "fail", "hello", "burst", "timeout"],
        weights=[3, 4, 2, 1, 2, 1, 1],
    )[0]
    if kind == "chatty":
        return {"graph": emitter(rng.randint(100, 2000), size=rng.randint(20, 300))}
    if kind == "steady":
        return {"graph": emitter(rng.randint(50, 400), size=80, interval=0.005)}
    if kind == "sleeper":
        seconds = rng.uniform(0.5, 4)
        return {
            "graph": {"nodes": [{"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds}}]}
        }
    if kind == "fail":
        return {
            "graph": {"nodes": [{"id": "f", "type": "nodejob.Fail", "data": {"message": "no"}}]}
        }
    if kind == "burst":
        return {"graph": emitter(20_000, size=50)}  # more than the ring of small test homes
    if kind == "timeout":
        return {"graph": emitter(100_000, size=50, interval=0.01), "timeout_seconds": 1.5}
    return {"graph": {"nodes": [{"id": "c", "type": "nodejob.Constant", "data": {"value": 1}}]}}


async def starter(url: str, token: str, tally: Tally, rate: float, rng: random.Random) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        while True:
            response = await http.post("/api/jobs/", json=graphs(rng))
            if response.status_code != 201:
                tally.violations.append(f"start: {response.status_code} {response.text[:200]}")
            else:
                job_id = response.json()["id"]
                tally.jobs_started += 1
                tally.recent = [*tally.recent[-200:], job_id]
                if rng.random() < 0.1:
                    await trio.sleep(rng.uniform(0, 0.5))
                    await http.post(f"/api/jobs/{job_id}/cancel")
            await trio.sleep(rng.expovariate(rate))


async def follower(url: str, token: str, tally: Tally, rng: random.Random) -> None:
    """Follow recent jobs to their end across several dropped connections."""
    while True:
        if not tally.recent:
            await trio.sleep(0.1)
            continue
        job_id = rng.choice(tally.recent)
        cursor = 0
        done = False
        while not done:
            budget = rng.randint(1, 400)
            try:
                async with await RawWebSocket.open(url, token) as ws:
                    await ws.command("reconnect_job", job_id=job_id, after_seq=cursor)
                    reply = await ws.receive()
                    if reply.get("job_id") != job_id or "seq" in reply:
                        tally.violations.append(f"reconnect reply: {reply}")
                        return
                    for _ in range(budget):
                        message = await ws.receive()
                        seq = message["seq"]
                        start = message["from_seq"] if message["type"] == "gap" else seq
                        if start != cursor + 1:
                            tally.violations.append(f"{job_id}: after {cursor} came {message}")
                            return
                        cursor = seq
                        tally.messages += 1
                        if message["type"] == "job_update" and message["status"] in TERMINAL:
                            done = True
                            break
            except WsClosed as closed:
                tally.violations.append(f"{job_id}: connection closed {closed.code}")
                return
            tally.reattaches += 1
        tally.jobs_followed += 1


async def sse_reader(url: str, token: str, tally: Tally, rng: random.Random) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while True:
            if not tally.recent:
                await trio.sleep(0.1)
                continue
            job_id = rng.choice(tally.recent)
            last = 0
            path = f"/api/jobs/{job_id}/events?token={token}"
            async with http.stream("GET", path) as response:
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        seq = int(line[4:])
                        if seq <= last:
                            tally.violations.append(f"sse {job_id}: {seq} after {last}")
                        last = seq
            tally.sse_streams += 1


async def poller(url: str, token: str, tally: Tally, rng: random.Random) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        while True:
            choice = rng.random()
            if choice < 0.4:
                response = await http.get("/api/jobs/", params={"limit": rng.choice([10, 100])})
            elif choice < 0.7:
                response = await http.get("/api/jobs/running/all")
            elif tally.recent:
                job_id = rng.choice(tally.recent)
                response = await http.get(f"/api/jobs/{job_id}/messages", params={"limit": 500})
            else:
                response = await http.get("/health")
            tally.rest_calls += 1
            if response.status_code >= 500:
                tally.violations.append(f"poll: {response.status_code} {response.text[:200]}")
            await trio.sleep(rng.uniform(0.05, 0.3))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def db_bytes(home: Path) -> int:
    """The database's size on disk, with its write-ahead log."""
    files = (home / "nodejob.db", home / "nodejob.db-wal")
    return sum(f.stat().st_size for f in files if f.exists())


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    home = Path(args.home or tempfile.mkdtemp(prefix="nodejob-soak-")) / "home"
    env = dict(os.environ)
    if args.cleanup_s:
        # Let the registry cleanup and the message retention pass many times in the run.
        env["NODEJOB_CLEANUP_INTERVAL_S"] = env["NODEJOB_CLEANUP_MAX_AGE_S"] = str(args.cleanup_s)
        env["NODEJOB_RETENTION_S"] = str(args.cleanup_s * 5)
    server = await start_server_process(home, "--ring-size", str(args.ring_size), env=env)
    tally = Tally()
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    print(f"# soak: {args.minutes} min, server {server.url}, home {home}", flush=True)
    print(
        "elapsed_s,rss_mib,fds,db_mib,jobs_in_memory,"
        "jobs_started,jobs_followed,reattaches,messages,violations"
    )
    http = httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=60)
    try:
        async with http, trio.open_nursery() as nursery:
            nursery.start_soon(starter, server.url, server.token, tally, args.rate, rng)
            for _ in range(args.followers):
                nursery.start_soon(follower, server.url, server.token, tally, rng)
            for _ in range(args.sse):
                nursery.start_soon(sse_reader, server.url, server.token, tally, rng)
            for _ in range(args.pollers):
                nursery.start_soon(poller, server.url, server.token, tally, rng)
            deadline = started + args.minutes * 60
            while time.monotonic() < deadline and server.process.returncode is None:
                sample = {
                    "elapsed_s": round(time.monotonic() - started),
                    "rss_mib": round(rss_kib(server.pid) / 1024, 1),
                    "fds": open_fds(server.pid),
                    "db_mib": round(db_bytes(home) / 2**20, 1),
                    "jobs_in_memory": int(await metric(http, "nodejob_jobs_in_memory")),
                    "jobs_started": tally.jobs_started,
                    "jobs_followed": tally.jobs_followed,
                    "reattaches": tally.reattaches,
                    "messages": tally.messages,
                    "violations": len(tally.violations),
                }
                samples.append(sample)
                print(",".join(str(v) for v in sample.values()), flush=True)
                if tally.violations and args.stop_on_violation:
                    break
                await trio.sleep(SAMPLE_S)
            nursery.cancel_scope.cancel()
    finally:
        code = await server.stop(within=60)
    rss = [s["rss_mib"] for s in samples]
    summary = {
        "minutes": args.minutes,
        "exit_status": code,
        "rss_mib_first": rss[0] if rss else None,
        "rss_mib_last": rss[-1] if rss else None,
        "rss_mib_max": max(rss) if rss else None,
        "db_mib_last": samples[-1]["db_mib"] if samples else None,
        "jobs_started": tally.jobs_started,
        "jobs_followed_to_the_end": tally.jobs_followed,
        "reattaches": tally.reattaches,
        "messages_checked": tally.messages,
        "sse_streams": tally.sse_streams,
        "rest_calls": tally.rest_calls,
        "violations": tally.violations[:20],
        "tracebacks_in_server_log": server.stderr().count("Traceback"),
    }
    print("# summary " + json.dumps(summary), flush=True)
    if args.report:
        report = json.dumps({"summary": summary, "samples": samples}, indent=1)
        await trio.Path(args.report).write_text(report)
    ok = code == 0 and not tally.violations and summary["tracebacks_in_server_log"] == 0
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--home", help="parent directory for the server's home (default: temp)")
    parser.add_argument("--rate", type=float, default=5.0, help="jobs started per second")
    parser.add_argument("--followers", type=int, default=40)
    parser.add_argument("--sse", type=int, default=5)
    parser.add_argument("--pollers", type=int, default=5)
    parser.add_argument("--ring-size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--cleanup-s",
        type=float,
        default=0,
        help="registry cleanup interval and max age (retention: 5x) for the server; "
        "default: the server's own (300 s, 3600 s, 7 days)",
    )
    parser.add_argument("--report", help="write the samples and summary here as JSON")
    parser.add_argument("--stop-on-violation", action="store_true")
    args = parser.parse_args(argv)
    return trio.run(soak, args)


if __name__ == "__main__":
    sys.exit(main())
