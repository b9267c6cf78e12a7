"""Crash anywhere (issue 7): SIGKILL a real ``nodejob serve`` at varied points, restart it.

Each cycle starts a server on the same home, starts ``JOBS_PER_CYCLE`` jobs (50) that mix every
available strategy (threaded, subprocess; docker when NODEJOB_TEST_DOCKER_IMAGE is set; ray when
NODEJOB_TEST_RAY_ADDRESS is set), follows every job over a WebSocket (new jobs by ``run_job``,
jobs left unfinished by earlier cycles by ``reconnect_job`` from seq 0), waits a random delay
(with Ray, two cycles in four instead wait for a Ray submission to be under way, a window of a
few ms that random delays seldom hit), and SIGKILLs the server. Right after each kill it notes
where the kill cut every unfinished job (``cut_points``: from the rows the dead server left
and, for ray jobs, Ray's job list). A last
server lets every job end, then the checks: each job's stored stream is 1..last_seq with no gap
or double and ends with its terminal ``job_update``; every message any client saw is stored
byte for byte; every job ended in its true terminal state (below); ``PRAGMA integrity_check``
is ``ok``; no worker process, container or Ray job of ours runs on.

The true terminal state of a job, by where the kill cut it:

- not cut: ``completed`` (each graph completes when nothing stops it);
- threaded, cut: ``failed`` with "server stopped while the job was running";
- subprocess and docker, cut: ``completed`` (queued again if it was still ``starting``,
  launched if no worker had been recorded, re-adopted otherwise), or ``failed`` with a reason
  in CUT_REASONS saying the kill came before its work started;
- ray, cut anywhere: ``completed``, whether it was still ``starting`` (queued again), waiting
  for room on the cluster
  (``no handle``: the next server admits and submits it), had its submission id recorded but
  Ray not yet told (``submitting``: submitted again), had Ray told but its row not yet saying
  so (``submitted, unrecorded``: the next server submits again, Ray answers "already exists",
  which counts as submitted, and the server says so in its log), was running
  (``following``) or had ended (``outcome recorded``): the work is re-adopted or started,
  never given up, and Ray holds one job of that submission id, no other.

Ray jobs are a smaller share (RAY_SHARE) with shorter graphs: Ray takes ~1.6 s to start one
and the test head runs two at once. When the test ends, our Ray jobs' records are deleted from
the (shared) head once settled.

The kill delays come from ``random.Random(seed)``; the seed is printed (``pytest -s``) and
``NODEJOB_CRASH_SEED`` replays it. ``NODEJOB_CRASH_CYCLES`` (default 6) sets the cycles,
``NODEJOB_CRASH_JOBS`` (default 50) the jobs per cycle, ``NODEJOB_CRASH_STRATEGIES`` (say
``ray`` or ``subprocess,docker``; default: every available one) narrows the mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import apsw
import httpx
import pytest
import trio

from nodejob.executions.process import proc_stat
from nodejob.executions.ray_cluster import RAY_TERMINAL, RayError, RayJobs
from nodejob.manager import SERVER_STOPPED
from nodejob.protocol import dumps
from tests.hardening import (
    TERMINAL,
    RawWebSocket,
    WsClosed,
    container_names,
    install_plugin,
    poll_until,
    remove_containers,
    start_server_process,
    stored_stream,
)

if TYPE_CHECKING:
    from tests.hardening import ServerProcess

DOCKER_IMAGE = os.environ.get("NODEJOB_TEST_DOCKER_IMAGE")
RAY_ADDRESS = os.environ.get("NODEJOB_TEST_RAY_ADDRESS", "")
STRATEGIES = [
    strategy
    for strategy in [
        "threaded",
        "subprocess",
        *(["docker"] if DOCKER_IMAGE else []),
        *(["ray"] if RAY_ADDRESS else []),
    ]
    if strategy in os.environ.get("NODEJOB_CRASH_STRATEGIES", strategy).split(",")
]
RAY = "ray" in STRATEGIES
CYCLES = int(os.environ.get("NODEJOB_CRASH_CYCLES", "6"))
JOBS_PER_CYCLE = int(os.environ.get("NODEJOB_CRASH_JOBS", "50"))
RAY_SHARE = 0.08
"""Of each cycle's jobs, the share that runs on Ray (4 of 50). Ray takes ~1.6 s to start a job
and the test head (2 CPUs, 1 per job) runs two at once: an even share would leave the last
server a long queue to drain."""
MAX_KILL_DELAY_S = 2.5
SERVE_ARGS = ("--log-level", "info")
"""INFO: the test counts the servers' "Ray already had it" lines."""
DEADLINE_S = 120.0
RAY_DRAIN_S = 5.0
"""More time the last server gets per Ray job still unfinished when it starts."""
RAY_SETTLE_S = 5.0
"""Our Ray jobs' records are deleted this long after their end (see RayJobs.delete)."""
CUT_REASONS: frozenset[str] = frozenset()
"""Failures a kill may cause: none. Work cut before it ran is launched by the next server."""
"""Why a subprocess or docker job may fail when the kill hit it before its work ran."""


def emit_graph(count: int, interval: float) -> dict[str, Any]:
    return {
        "nodes": [
            {
                "id": "e",
                "type": "nodejob.Emit",
                "data": {"count": count, "size": 80, "interval": interval},
            },
            {"id": "out", "type": "nodejob.Output", "data": {"name": "n"}},
        ],
        "edges": [{"source": "e", "target": "out", "targetHandle": "value"}],
    }


def sleep_graph(seconds: float) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds, "value": 7}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
        ],
        "edges": [{"source": "s", "target": "out", "targetHandle": "value"}],
    }


def cycle_plan(rng: random.Random, cycle: int) -> list[tuple[str, dict[str, Any]]]:
    """The (strategy, graph) of each job a cycle starts: Ray's share spread evenly among the
    others, which take turns."""
    others = [s for s in STRATEGIES if s != "ray"]
    if "ray" not in STRATEGIES:
        rays = 0
    elif not others:
        rays = JOBS_PER_CYCLE
    else:
        rays = min(JOBS_PER_CYCLE, max(1, round(JOBS_PER_CYCLE * RAY_SHARE)))
    plan: list[tuple[str, dict[str, Any]]] = []
    for index in range(JOBS_PER_CYCLE):
        if (index + 1) * rays // JOBS_PER_CYCLE > index * rays // JOBS_PER_CYCLE:
            # Short: Ray's start-up (~1.6 s) is most of such a job's time anyway.
            if index % 2:
                graph = sleep_graph(round(rng.uniform(0.3, 1.5), 2))
            else:
                graph = emit_graph(rng.randint(50, 200), rng.choice([0.002, 0.005]))
            plan.append(("ray", graph))
            continue
        if index % 3 == 2:
            graph = sleep_graph(round(rng.uniform(0.3, 3.0), 2))
        else:
            graph = emit_graph(rng.randint(100, 400), rng.choice([0.002, 0.005]))
        plan.append((others[(cycle + index) % len(others)], graph))
    return plan


def server_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    if DOCKER_IMAGE:
        env["NODEJOB_DOCKER_IMAGE"] = DOCKER_IMAGE
    if RAY_ADDRESS:
        env["NODEJOB_RAY_ADDRESS"] = RAY_ADDRESS
    env.update(extra)
    return env


async def all_jobs(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    url: str | None = "/api/jobs/?limit=1000"
    while url is not None:
        response = await http.get(url)
        assert response.status_code == 200, response.text
        jobs += response.json()
        url = response.links.get("next", {}).get("url")
    return jobs


def read_db(home: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql``, read-only: as the (maybe killed) server left the database."""
    connection = apsw.Connection(str(home / "nodejob.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def integrity_check(home: Path) -> str:
    return "; ".join(str(row[0]) for row in read_db(home, "PRAGMA integrity_check"))


def stored_handles(home: Path) -> list[dict[str, Any]]:
    rows = read_db(home, "SELECT handle FROM jobs WHERE handle IS NOT NULL")
    return [json.loads(row[0]) for row in rows]


def cut_points(home: Path, known_to_ray: set[str]) -> dict[str, str]:
    """Where a kill cut each unfinished job, read from what the dead server left.

    ``starting``; ``no handle`` (launched, nothing out of process recorded: a ray job waiting
    for room on the cluster, a worker or container about to start); then for ray jobs
    ``submitting`` (submission id recorded, Ray does not have it), ``submitted, unrecorded``
    (Ray has it, our row does not say so); ``following``; ``outcome recorded`` (the work ended,
    the terminal update was not committed). ``known_to_ray``: Ray's submission ids, listed
    after the kill.
    """
    points = {}
    rows = read_db(
        home,
        "SELECT id, execution_strategy, status, handle FROM jobs"
        " WHERE status IN ('starting', 'running')",
    )
    for job_id, strategy, status, text in rows:
        handle = json.loads(text) if text else None
        if strategy == "ray" and job_id in known_to_ray:
            # The submission id is recorded before anything is sent to Ray.
            assert handle is not None, (job_id, status)
            assert handle["submission_id"] == job_id, (job_id, handle)
        if status == "starting":
            point = "starting"
        elif strategy == "threaded":
            point = "running"
        elif handle is None:
            point = "no handle"
        elif "outcome" in handle:
            point = "outcome recorded"
        elif strategy == "ray" and not handle.get("submitted"):
            point = "submitted, unrecorded" if job_id in known_to_ray else "submitting"
        else:
            point = "following"
        points[job_id] = point
    return points


async def ray_submission_under_way(home: Path, *, ray_has_it: bool) -> None:
    """Return once a ray job's submission id is recorded and Ray's answer is not (a window of
    a few requests to Ray, tens of ms, which a random delay rarely hits): at once, or, with
    ``ray_has_it``, once Ray lists the job too. At worst after half of DEADLINE_S (the cycle's
    deadline): then the kill lands wherever it does.
    """
    sql = (
        "SELECT id FROM jobs WHERE execution_strategy = 'ray' AND status = 'running'"
        " AND json_extract(handle, '$.submitted') = 0"
    )
    async with RayJobs(RAY_ADDRESS) as ray:

        async def submitting() -> bool:
            for (job_id,) in read_db(home, sql):
                if not ray_has_it or await ray.info(job_id) is not None:
                    return True
            return False

        with contextlib.suppress(trio.TooSlowError):
            await poll_until(submitting, seconds=DEADLINE_S / 2, interval=0.002)


async def ray_jobs() -> dict[str, dict[str, Any]]:
    """Every job the Ray head has a record of, by submission id."""
    async with RayJobs(RAY_ADDRESS) as ray:
        return {str(info["submission_id"]): info for info in await ray.jobs()}


def ray_worker_pids(job_ids: set[str]) -> list[int]:
    """Live ``nodejob.worker`` processes of these jobs on this machine (the Ray head's node)."""
    wanted = {f"NODEJOB_JOB_ID={job_id}".encode() for job_id in job_ids}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"nodejob.worker" not in cmdline:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted.intersection(environ) and (stat := proc_stat(int(entry.name))) and stat[0] != "Z":
            found.append(int(entry.name))
    return found


async def reap_ray_jobs(job_ids: set[str]) -> list[str]:
    """Stop any Ray job of ours still running (each is reported), then delete our jobs'
    records once settled: the head is shared, and its job list should not grow run by run."""
    found: dict[str, str] = {}
    async with RayJobs(RAY_ADDRESS) as ray:

        async def swept() -> bool:
            ours = {i: info for i, info in (await ray_jobs()).items() if i in job_ids}
            for job_id, info in ours.items():
                if info["status"] not in RAY_TERMINAL:
                    found.setdefault(job_id, f"ray job {job_id} {info['status']}")
                    await ray.stop(job_id)
                elif info["end_time"] < (time.time() - RAY_SETTLE_S) * 1000:
                    with contextlib.suppress(RayError):
                        await ray.delete(job_id)
            return not ours

        with contextlib.suppress(trio.TooSlowError):
            await poll_until(swept, seconds=DEADLINE_S, interval=0.5)
    return list(found.values())


def reap_leftovers(home: Path) -> list[str]:
    """Stop any worker or container this home left behind; what they were."""
    if not (home / "nodejob.db").exists():
        return []
    found: list[str] = []
    for handle in stored_handles(home):
        pid, start_time = handle.get("pid"), handle.get("start_time")
        if (stat := proc_stat(pid) if pid else None) and stat[1] == start_time and stat[0] != "Z":
            found.append(f"worker {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    if DOCKER_IMAGE:
        import docker

        client = docker.from_env()
        try:
            label = f"nodejob.home={home}"
            removed = remove_containers(client, label=label)
            found += [f"container {name} {state}" for name, state in removed]
        finally:
            client.close()
    return found


class Follower:
    """One WebSocket client following one job; keeps every stream message it received."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def run(
        self,
        server: ServerProcess,
        command: str,
        data: dict[str, Any],
        task_status: trio.TaskStatus[str],
    ) -> None:
        """Send ``command``; report the job id once replied to; read until the end or a kill."""
        async with await RawWebSocket.open(server.url, server.token) as ws:
            await ws.command(command, **data)
            started = False
            try:
                while True:
                    message = await ws.receive()
                    if "seq" not in message:
                        assert "job_id" in message, message  # a reply, never an error
                        if not started:
                            started = True
                            task_status.started(message["job_id"])
                        continue
                    self.messages.append(message)
                    if message["type"] == "job_update" and message["status"] in TERMINAL:
                        return
            except (WsClosed, trio.BrokenResourceError):
                if not started:
                    raise  # the kill comes only once every follower was answered


async def test_sigkill_at_random_points_loses_doubles_and_corrupts_nothing(
    tmp_path: Path,
) -> None:
    seed = int(os.environ.get("NODEJOB_CRASH_SEED", random.randrange(2**31)))
    rng = random.Random(seed)
    print(
        f"\ncrash: seed {seed} (NODEJOB_CRASH_SEED replays it), {CYCLES} cycles of "
        f"{JOBS_PER_CYCLE} jobs, {STRATEGIES}"
    )
    home = tmp_path / "home"
    followers: dict[str, list[Follower]] = {}
    strategy_of: dict[str, str] = {}
    # Where each kill found each job, kill after kill (see cut_points); the last kill's.
    cuts: defaultdict[str, list[str]] = defaultdict(list)
    points: dict[str, str] = {}
    known_to_ray: set[str] = set()  # our jobs that Ray had a record of, at a kill or the end
    # Each kill's delay after the last job of its cycle started, or the event it waited for.
    kill_points: list[float | str] = []
    on_ray: dict[str, dict[str, Any]] = {}
    ray_workers: list[int] = []
    cycle_s: list[float] = []
    started = time.monotonic()
    try:
        for cycle in range(CYCLES):
            cycle_started = time.monotonic()
            plan = cycle_plan(rng, cycle)
            delay = round(rng.uniform(0, MAX_KILL_DELAY_S), 3)
            # Two cycles in four wait for a Ray submission to be under way instead.
            at_submission = RAY and cycle % 4 in (1, 2)
            if at_submission:
                kill_points.append("ray: recorded" if cycle % 4 == 1 else "ray: Ray has it")
            else:
                kill_points.append(delay)
            server = await start_server_process(home, *SERVE_ARGS, env=server_env())
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=30
            ) as http:
                unfinished = [
                    job["id"] for job in await all_jobs(http) if job["status"] not in TERMINAL
                ]
            with trio.fail_after(DEADLINE_S):
                async with trio.open_nursery() as nursery:
                    for job_id in unfinished:
                        follower = Follower()
                        followers[job_id].append(follower)
                        await nursery.start(
                            follower.run,
                            server,
                            "reconnect_job",
                            {"job_id": job_id, "after_seq": 0},
                        )
                    for strategy, graph in plan:
                        follower = Follower()
                        job_id = await nursery.start(
                            follower.run,
                            server,
                            "run_job",
                            {"graph": graph, "execution_strategy": strategy},
                        )
                        followers[job_id] = [follower]
                        strategy_of[job_id] = strategy
                    # The test's input: where the kill lands.
                    if at_submission:
                        await ray_submission_under_way(home, ray_has_it=cycle % 4 == 2)
                    else:
                        await trio.sleep(delay)
                    assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
            listed = set(await ray_jobs()) & set(strategy_of) if RAY else set()
            known_to_ray |= listed
            points = cut_points(home, listed)
            for job_id, point in points.items():
                cuts[job_id].append(point)
            cycle_s.append(round(time.monotonic() - cycle_started, 1))

        # A last server lets every job end (Ray's queue of ours takes a while to drain).
        server = await start_server_process(home, *SERVE_ARGS, env=server_env())
        ray_ids = {job_id for job_id, strategy in strategy_of.items() if strategy == "ray"}
        try:
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=30
            ) as http:

                async def all_ended() -> bool:
                    return all(job["status"] in TERMINAL for job in await all_jobs(http))

                ray_queue = sum(1 for job_id in points if job_id in ray_ids)
                drain_s = DEADLINE_S + RAY_DRAIN_S * ray_queue
                draining = time.monotonic()
                await poll_until(all_ended, seconds=drain_s, interval=0.2)
                drained_s = round(time.monotonic() - draining, 1)
                rows = {job["id"]: job for job in await all_jobs(http)}
                stored = {job_id: await stored_stream(http, job_id) for job_id in rows}
            if RAY:
                listed_now = await ray_jobs()
                # One submission per job, under its own id: none under another (a double).
                assert {
                    sid: meta
                    for sid, info in listed_now.items()
                    if (meta := (info.get("metadata") or {}).get("nodejob_job_id")) in ray_ids
                    and meta != sid
                } == {}
                on_ray = {i: info for i, info in listed_now.items() if i in ray_ids}
                known_to_ray |= set(on_ray)
                ray_workers = ray_worker_pids(ray_ids)
        finally:
            assert await server.stop(signal.SIGTERM) == 0, server.stderr()
        assert integrity_check(home) == "ok"
    finally:
        leftovers = reap_leftovers(home)
        if RAY:
            try:
                leftovers += await reap_ray_jobs(set(strategy_of))
            except RayError as exc:
                leftovers.append(f"Ray jobs not checked: {exc}")
    elapsed = time.monotonic() - started
    # Ray jobs that a restarted server submitted again and Ray turned out to have already.
    resubmitted = set(re.findall(r"job (\w+): Ray already had it", server.stderr()))

    assert set(rows) == set(followers), "a job the clients never heard of, or one lost"
    # Nothing runs on once every job ended, no container is left.
    assert leftovers == [], leftovers
    if RAY:
        assert ray_workers == [], "worker processes of finished Ray jobs run on"
        running = {
            i: info["status"] for i, info in on_ray.items() if info["status"] not in RAY_TERMINAL
        }
        assert running == {}, "Ray jobs of ours run on after every job ended"
    wrong: list[str] = []
    outcomes: Counter[str] = Counter()
    cut_counts: Counter[str] = Counter()
    checked = 0
    for job_id, row in rows.items():
        strategy = strategy_of[job_id]
        messages = [json.loads(text) for text in stored[job_id]]
        assert [m["seq"] for m in messages] == list(range(1, row["last_seq"] + 1)), job_id
        assert {m["job_id"] for m in messages} == {job_id}
        last = messages[-1]
        assert last["type"] == "job_update", (job_id, last)
        assert last["status"] == row["status"]
        assert sum(m["type"] == "job_update" and m["status"] in TERMINAL for m in messages) == 1
        # Its true terminal state, by where the kills cut it (see the module docstring).
        cut_counts.update(f"{strategy} {point}" for point in cuts[job_id])
        last_cut = cuts[job_id][-1] if cuts[job_id] else None
        if last_cut is None:
            true_end = row["status"] == "completed"
        elif strategy == "threaded":
            true_end = (row["status"], row["error"]) == ("failed", SERVER_STOPPED)
        elif strategy == "ray":
            true_end = row["status"] == "completed"
        else:
            true_end = row["status"] == "completed" or row["error"] in CUT_REASONS
        if not true_end:
            wrong.append(f"{strategy} {job_id} {row['status']} {row['error']!r} cut {cuts[job_id]}")
        if row["status"] == "completed":
            assert row["result"]["outputs"], row
        if strategy == "ray":
            if "submitted, unrecorded" in cuts[job_id]:  # Ray had it: so Ray must have said
                assert job_id in resubmitted, job_id
            if row["status"] == "completed":  # its record may be swept already
                assert on_ray.get(job_id, {"status": "SUCCEEDED"})["status"] == "SUCCEEDED"
            else:
                assert job_id not in known_to_ray, "Ray heard of a job cut before it launched"
        outcomes[f"{strategy} {row['status']}"] += 1
        by_seq = {m["seq"]: text for m, text in zip(messages, stored[job_id], strict=True)}
        for follower in followers[job_id]:
            seen = [m["seq"] for m in follower.messages]
            assert seen == list(range(1, len(seen) + 1)), (job_id, seen[:20])
            for message in follower.messages:
                assert by_seq[message["seq"]] == dumps(message), (job_id, message["seq"])
                checked += 1
    print(
        "crash FIGURES: "
        + json.dumps(
            {
                "seed": seed,
                "cycles": CYCLES,
                "jobs_per_cycle": JOBS_PER_CYCLE,
                "jobs": len(rows),
                "outcomes": dict(sorted(outcomes.items())),
                "cuts": dict(sorted(cut_counts.items())),
                "followers": sum(len(f) for f in followers.values()),
                "messages_stored": sum(len(s) for s in stored.values()),
                "seen_messages_checked": checked,
                "left_behind": leftovers,
                "wrong_end": wrong,
                "ray_resubmitted_already_there": len(resubmitted),
                "kill_points": kill_points,
                "cycle_s": cycle_s,
                "drain_s": drained_s,
                "elapsed_s": round(elapsed, 1),
            }
        )
    )
    assert wrong == [], "jobs that did not end in their true terminal state"


# -- a worker that ignores SIGTERM ------------------------------------------------------------

STUBBORN_PLUGIN = """
    import trio

    from nodejob.workflow.nodes import REQUIRED, Node


    class Stubborn(Node):
        '''Sleeps through any cancellation: the worker so ignores SIGTERM.'''

        type = "crashtest.Stubborn"
        inputs = {"seconds": REQUIRED}

        async def run(self, ctx, *, seconds):
            with trio.CancelScope(shield=True):
                await trio.sleep(seconds)
            return seconds
"""


def live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as file:
                    data = file.read()
            except OSError:
                continue
            fields = data[data.rindex(b")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != b"Z":
                members.append(int(entry))
    return members


async def test_a_subprocess_worker_that_ignores_sigterm_is_killed_after_the_grace(
    tmp_path: Path,
) -> None:
    plugin = install_plugin(
        tmp_path / "plugin",
        "crashtest_plugin",
        STUBBORN_PLUGIN,
        {"stubborn": "crashtest_plugin:Stubborn"},
    )
    grace = 1.0
    env = server_env(PYTHONPATH=str(plugin), NODEJOB_KILL_GRACE_S=str(grace))
    home = tmp_path / "home"
    server = await start_server_process(home, env=env)
    graph = {"nodes": [{"id": "s", "type": "crashtest.Stubborn", "data": {"seconds": 60}}]}
    try:
        async with await RawWebSocket.open(server.url, server.token) as ws:
            await ws.command("run_job", graph=graph, execution_strategy="subprocess")
            reply = await ws.receive()
            job_id = reply.get("job_id")
            assert job_id, reply
            messages: list[dict[str, Any]] = []
            with trio.fail_after(DEADLINE_S):
                while not (
                    messages
                    and messages[-1]["type"] == "node_update"
                    and messages[-1]["status"] == "running"
                ):
                    message = await ws.receive()
                    if "seq" in message:
                        messages.append(message)
                (handle,) = stored_handles(home)
                assert proc_stat(handle["pid"]) is not None
                asked = time.monotonic()
                await ws.command("cancel_job", job_id=job_id)
                while not (
                    messages[-1]["type"] == "job_update" and messages[-1]["status"] in TERMINAL
                ):
                    message = await ws.receive()
                    if "seq" in message:
                        messages.append(message)
                took = time.monotonic() - asked
                group_left = live_group_members(handle["pid"])
    finally:
        assert await server.stop(signal.SIGTERM) == 0, server.stderr()
        reap_leftovers(home)
    assert messages[-1]["status"] == "cancelled", messages[-1]
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    # It took SIGKILL: the node never reported its own cancellation, and the grace passed.
    assert not [m for m in messages if m["type"] == "node_update" and m["status"] != "running"]
    assert took >= grace
    # Cancelled means stopped: when the job was reported cancelled, the worker's process
    # group had no live process (a zombie the reaper has not collected yet does not run).
    assert group_left == []
    assert integrity_check(home) == "ok"


# -- a container created, then the server killed before it stored the handle ------------------


async def pump(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)


async def hold_create_answers(
    listener: trio.SocketListener, created: trio.Event, nursery: trio.Nursery
) -> None:
    """A proxy to the Docker engine that forwards everything but the answer to a
    ``POST /containers/create``: the container exists, the server never hears so."""

    async def serve(client: trio.SocketStream) -> None:
        engine = await trio.open_unix_socket("/var/run/docker.sock")
        async with client, engine, trio.open_nursery() as inner:
            requested = trio.Event()

            async def requests() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await client.receive_some(65536):
                        if b"/containers/create" in data:
                            requested.set()
                        await engine.send_all(data)
                inner.cancel_scope.cancel()

            async def answers() -> None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while data := await engine.receive_some(65536):
                        if requested.is_set():
                            created.set()
                            await trio.sleep_forever()  # the answer never arrives
                        await client.send_all(data)
                inner.cancel_scope.cancel()

            inner.start_soon(requests)
            inner.start_soon(answers)

    await trio.serve_listeners(serve, [listener], handler_nursery=nursery)


@pytest.mark.skipif(not DOCKER_IMAGE, reason="NODEJOB_TEST_DOCKER_IMAGE is not set")
async def test_a_kill_between_creating_a_container_and_storing_its_handle_leaves_none(
    tmp_path: Path,
) -> None:
    import docker

    home = tmp_path / "home"
    socket_path = tmp_path / "engine.sock"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.bind(str(socket_path))
    sock.listen()
    created = trio.Event()
    client = docker.from_env()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hold_create_answers, trio.SocketListener(sock), created, nursery)
            env = server_env(NODEJOB_DOCKER_HOST=f"unix://{socket_path}")
            server = await start_server_process(home, env=env)
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=30
            ) as http:
                response = await http.post(
                    "/api/jobs/", json={"graph": sleep_graph(1), "execution_strategy": "docker"}
                )
                assert response.status_code == 201, response.text
                job_id = response.json()["id"]
            with trio.fail_after(DEADLINE_S):
                await created.wait()
            assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
            nursery.cancel_scope.cancel()
        server = await start_server_process(home, env=server_env())
        try:
            async with httpx.AsyncClient(
                base_url=server.url, headers=server.headers, timeout=30
            ) as http:

                async def ended() -> bool:
                    job = (await http.get(f"/api/jobs/{job_id}")).json()
                    return job["status"] in TERMINAL

                await poll_until(ended, seconds=DEADLINE_S)
                row = (await http.get(f"/api/jobs/{job_id}")).json()
        finally:
            assert await server.stop(signal.SIGTERM) == 0, server.stderr()
        # Nothing had run: the next server removed the created container and launched anew.
        assert (row["status"], row["error"]) == ("completed", None)
        label = f"nodejob.home={home}"
        assert container_names(client, label=label) == []
    finally:
        client.close()
        reap_leftovers(home)
