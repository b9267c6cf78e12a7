"""The client subcommands of ``nodejob``: ``run``, ``attach``, ``ls``, ``show`` and ``cancel``.

Each is an async function of a `Session` and the parsed arguments, returning an exit status;
`run_async` runs one under trio, turning Ctrl-C into a detach and failures into one
``nodejob: ...`` line. They talk to a server through nodejob.client and draw with
nodejob.render. nodejob.cli parses the command line and calls them.

This module must not import nodejob.cli (it imports this module), nor the server, the store,
apsw or quart. trio, httpx, rich and nodejob.client are imported inside the functions that use
them, so that parsing (and --version, and the delegating commands) does not pay for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from nodejob import protocol

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable, Sequence
    from pathlib import Path

    from nodejob.client import Client, JobStream
    from nodejob.render import JobView

REFRESH_S: Final = 0.1
DETAIL_FETCHES: Final = 8
"""How many job objects ``ls`` fetches at once."""


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


@dataclass(slots=True)
class Session:
    """What a command needs to reach the server, and what an interrupt needs to report."""

    url: str
    token: str | None
    home: Path
    job_id: str | None = None
    stream: JobStream | None = None  # knows a started job's id even before run_job returns
    interrupted: bool = False


# -- following a job ---------------------------------------------------------------------------


def _write_json_line(message: dict[str, Any]) -> None:
    sys.stdout.write(protocol.dumps(message) + "\n")
    sys.stdout.flush()


async def follow(stream: JobStream, job_id: str, view: JobView | None) -> int:
    """Print ``job_id``'s messages (JSON lines, or ``view``) until it ends; its exit status.

    Cancellation: leaves the job running; ``view`` is left for the caller to stop.
    """
    import trio

    from nodejob.client import ClientError

    async with trio.open_nursery() as nursery:
        refresher = _Refresher(stream, view)
        if view is not None:
            view.start()
        nursery.start_soon(refresher.run)
        try:
            async for message in stream.messages():
                if message.get("job_id") != job_id:
                    continue
                if view is None:
                    _write_json_line(message)
                else:
                    view.handle(message)
                if protocol.is_terminal_update(message):
                    refresher.tick()
                    if view is not None:
                        view.finish()
                    return protocol.EXIT_BY_STATUS[protocol.JobStatus(message["status"])]
        finally:
            nursery.cancel_scope.cancel()
    raise ClientError(None, f"the stream of job {job_id} ended before the job did")


class _Refresher:
    """Redraws ``view`` about 10 times a second; reports reconnects (on stderr without one)."""

    def __init__(self, stream: JobStream, view: JobView | None) -> None:
        self.stream, self.view, self.reconnects = stream, view, 0

    def tick(self) -> None:
        state = self.stream.state
        if self.reconnects != self.stream.reconnects:
            self.reconnects = self.stream.reconnects
            state = "reconnected"
        if self.view is not None:
            self.view.set_connection(state)
            self.view.refresh()
        elif state == "reconnected":
            print("nodejob: connection lost, reconnected", file=sys.stderr, flush=True)

    async def run(self) -> None:
        import trio

        while True:
            await trio.sleep(REFRESH_S)
            self.tick()


async def run(session: Session, args: argparse.Namespace, data: dict[str, Any]) -> int:
    """``nodejob run``: start a job of ``data`` and follow it; ``--detach`` prints its id.

    Cancellation: the job runs on; `run_async` then prints how to attach to it.
    """
    from nodejob.client import Client, open_job_stream
    from nodejob.render import JobView, make_console

    if args.detach:
        async with Client(session.url, session.token) as client:
            job = await client.start_job(data)
        print(job["id"])
        return protocol.EXIT_COMPLETED
    view = None if args.json else JobView(make_console())
    try:
        async with open_job_stream(session.url, session.token, reconnect=True) as stream:
            session.stream = stream
            session.job_id = await stream.run_job(data)
            if view is not None:
                view.job_id = session.job_id
            return await follow(stream, session.job_id, view)
    finally:
        if view is not None:
            view.stop()


async def attach(session: Session, args: argparse.Namespace) -> int:
    """``nodejob attach JOB_ID``: the job's messages after ``--after-seq``, then live.

    Cancellation: the job runs on; `run_async` then prints how to attach again.
    """
    from nodejob.client import Client, open_job_stream
    from nodejob.render import JobView, make_console

    session.job_id = job_id = args.job_id
    async with Client(session.url, session.token) as client:
        job = await client.get_job(job_id)
    view = None if args.json else JobView(make_console(), job_id, job=job)
    status = job.get("status")
    if status in protocol.TERMINAL and args.after_seq >= int(job.get("last_seq") or 0):
        # Nothing after --after-seq will ever come: say how it ended, do not wait.
        if view is not None:
            view.finish()
        return protocol.EXIT_BY_STATUS[protocol.JobStatus(status)]
    try:
        async with open_job_stream(session.url, session.token, reconnect=True) as stream:
            session.stream = stream
            await stream.reconnect_job(job_id, args.after_seq)
            return await follow(stream, job_id, view)
    finally:
        if view is not None:
            view.stop()


# -- one-shot commands -------------------------------------------------------------------------


async def ls(session: Session, args: argparse.Namespace) -> int:
    """``nodejob ls``: unfinished jobs (``--all``: every job, newest first), table or JSON."""
    from nodejob.client import Client
    from nodejob.render import jobs_table, make_console

    async with Client(session.url, session.token) as client:
        if args.all:
            jobs: list[dict[str, Any]] = []
            async with contextlib.aclosing(client.iter_jobs(workflow_id=args.workflow_id)) as it:
                async for job in it:
                    jobs.append(job)
                    if args.limit is not None and len(jobs) >= args.limit:
                        break
        else:
            jobs = await with_details(client, await client.running_jobs())
            if args.workflow_id is not None:
                jobs = [job for job in jobs if job.get("workflow_id") == args.workflow_id]
    if args.json:
        print(json.dumps(jobs, indent=2, ensure_ascii=False))
    elif jobs:
        make_console().print(jobs_table(jobs))
    else:
        make_console().print("no unfinished jobs" if not args.all else "no jobs", style="dim")
    return 0


async def with_details(client: Client, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The full job objects of running-job summaries (a summary if the fetch fails)."""
    import trio

    from nodejob.client import ClientError

    jobs: list[dict[str, Any]] = [dict(summary) for summary in summaries]
    limiter = trio.CapacityLimiter(DETAIL_FETCHES)

    async def fetch(index: int) -> None:
        async with limiter:
            try:
                jobs[index] = await client.get_job(str(summaries[index]["job_id"]))
            except ClientError as exc:
                if exc.status is None:
                    raise

    async with trio.open_nursery() as nursery:
        for index in range(len(summaries)):
            nursery.start_soon(fetch, index)
    return jobs


async def show(session: Session, args: argparse.Namespace) -> int:
    """``nodejob show JOB_ID``: one job object, as details or JSON."""
    from nodejob.client import Client
    from nodejob.render import job_details, make_console

    async with Client(session.url, session.token) as client:
        job = await client.get_job(args.job_id)
    if args.json:
        print(json.dumps(job, indent=2, ensure_ascii=False))
    else:
        make_console().print(job_details(job))
    return 0


async def cancel(session: Session, args: argparse.Namespace) -> int:
    """``nodejob cancel JOB_ID``: ask for cancellation; an already finished job exits 1."""
    from nodejob.client import Client, ClientError

    async with Client(session.url, session.token) as client:
        try:
            await client.cancel_job(args.job_id)
        except ClientError as exc:
            if exc.status == 409:  # already finished: not a usage error
                print(f"nodejob: {exc.detail}", file=sys.stderr)
                return protocol.EXIT_FAILED
            raise
    print(f"cancelled {args.job_id}")
    return 0


# -- running, and reporting errors in one line -------------------------------------------------


def run_async(
    session: Session, fn: Callable[..., Awaitable[int]], *args: Any, interrupt: str = ""
) -> int:
    """``trio.run(fn, session, *args)``, mapping failures to one stderr line and an exit status.

    Ctrl-C exits 130; when a job is being followed (``interrupt="attach"``) it keeps running
    and the way back is printed. The first Ctrl-C cancels ``fn`` so that the WebSocket
    closes cleanly; a second one (or one that trio raises as KeyboardInterrupt out of
    ``trio.run``) stops at once.
    """
    import trio

    from nodejob.client import ClientError

    try:
        code = trio.run(_interruptible, session, fn, *args)
    except BaseException as exc:
        if session.interrupted:  # whatever the interrupted work raised on its way out
            return _detached(session, interrupt)
        leaves = list(_leaves(exc))
        if any(isinstance(leaf, KeyboardInterrupt | BrokenPipeError) for leaf in leaves):
            if any(isinstance(leaf, BrokenPipeError) for leaf in leaves):
                _silence_stdout()
            return _detached(session, interrupt)
        for leaf in leaves:
            if isinstance(leaf, ClientError | UsageError):
                return fail(_describe(leaf, session))
        raise
    return _detached(session, interrupt) if session.interrupted else code


async def _interruptible(session: Session, fn: Callable[..., Awaitable[int]], *args: Any) -> int:
    import trio

    if threading.current_thread() is not threading.main_thread():
        return await fn(session, *args)  # signals can only be caught in the main thread
    code = protocol.EXIT_DETACHED
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            work = trio.CancelScope()

            async def watch() -> None:
                async for _ in signals:
                    if session.interrupted:
                        raise KeyboardInterrupt
                    session.interrupted = True
                    if session.stream is not None:  # a clean close first, while it can
                        with trio.move_on_after(1.0):
                            await session.stream.aclose()
                    work.cancel()

            nursery.start_soon(watch)
            with work:
                code = await fn(session, *args)
            nursery.cancel_scope.cancel()
    return code


def _detached(session: Session, interrupt: str) -> int:
    if session.job_id is None and session.stream is not None and session.stream.started:
        session.job_id = session.stream.started[-1]
    if interrupt and session.job_id:
        print(f"nodejob attach {session.job_id}", file=sys.stderr)
    elif interrupt:
        print("nodejob: interrupted", file=sys.stderr)
    return protocol.EXIT_DETACHED


def _leaves(exc: BaseException) -> Sequence[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for child in exc.exceptions for leaf in _leaves(child)]
    return [exc]


def _describe(exc: Exception, session: Session) -> str:
    from nodejob.client import ClientError, ConnectError

    if isinstance(exc, ConnectError):
        return f"cannot connect to {session.url} (is `nodejob serve` running?)"
    if isinstance(exc, ClientError) and exc.status == 401:
        return f"{exc.detail} (set --token or NODEJOB_TOKEN, or the file {session.home}/token)"
    return exc.detail if isinstance(exc, ClientError) else str(exc)


def _silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so exiting does not complain."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def fail(message: str) -> int:
    """Report ``message`` as the one ``nodejob: ...`` line on stderr; exit status 2."""
    print(f"nodejob: {message}", file=sys.stderr)
    return protocol.EXIT_USAGE
