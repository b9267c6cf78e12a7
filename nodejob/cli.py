"""The ``nodejob`` command: argument parsing and the client subcommands.

``run``, ``attach``, ``ls``, ``show`` and ``cancel`` talk to a server through nodejob.client
and draw with nodejob.render. ``serve``, ``users``, ``worker``, ``bench`` and ``tui`` belong
to other modules and are imported lazily inside their handlers, so that ``nodejob
--version`` and ``nodejob run`` stay fast.

This module must not import the server, the store, apsw or quart at module level.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from nodejob import __version__, protocol
from nodejob.config import DEFAULT_URL, default_home

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from nodejob.client import Client, JobStream
    from nodejob.render import JobView

# trio, httpx, rich and nodejob.client are imported inside the commands that use them, so
# that parsing (and --version, and the delegating commands) does not pay for them.

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


def home_dir(option: str | None) -> Path:
    """``--home``, else NODEJOB_HOME, else ~/.local/share/nodejob (as the server sees it)."""
    return Path(option).expanduser() if option else default_home()


def session_from(args: argparse.Namespace) -> Session:
    """Resolve --url / --token / --home against the environment and the token file."""
    home = home_dir(args.home)
    url = args.url or os.environ.get("NODEJOB_URL") or DEFAULT_URL
    token = args.token or os.environ.get("NODEJOB_TOKEN")
    if token is None:
        try:
            token = (home / "token").read_text(encoding="utf-8").strip() or None
        except OSError:
            token = None
    return Session(url=url.rstrip("/"), token=token, home=home)


def parse_param(text: str) -> tuple[str, Any]:
    """``NAME=VALUE``: VALUE as JSON when it parses, else as a plain string."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name.strip(), json.loads(value)
    except ValueError:
        return name.strip(), value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def load_run_data(path: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """The ``run_job`` data for ``nodejob run``: the graph file plus the command's options.

    FILE holds the graph itself (``{"nodes", "edges"}``) or ``{"graph": {...}, "name",
    "workflow_id", "params"}``. Without FILE, ``--workflow-id`` runs a saved workflow.
    """
    data: dict[str, Any] = {}
    params: dict[str, Any] = {}
    if path is not None:
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise UsageError(f"{path}: not a UTF-8 text file") from None
        except ValueError as exc:
            raise UsageError(f"{path}: invalid JSON: {exc}") from None
        graph = document.get("graph") if isinstance(document, dict) else None
        if graph is None:
            graph = document
        elif isinstance(document.get("params"), dict):
            params.update(document["params"])
        nodes = graph.get("nodes") if isinstance(graph, dict) else None
        edges = graph.get("edges", []) if isinstance(graph, dict) else None
        if not isinstance(nodes, list) or not isinstance(edges, list):
            raise UsageError(
                f'{path}: invalid graph: expected an object with "nodes" and "edges" lists'
            )
        data["graph"] = graph
        label = document.get("workflow_id") or document.get("id")
        if isinstance(label, str) and graph is not document:
            data["workflow_id"] = label
    elif args.workflow_id is None:
        raise UsageError("run needs a graph FILE or --workflow-id of a saved workflow")
    params.update(dict(args.param))
    data["params"] = params
    if args.workflow_id is not None:
        data["workflow_id"] = args.workflow_id
    if args.strategy is not None:
        data["execution_strategy"] = args.strategy
    if args.timeout is not None:
        data["timeout_seconds"] = args.timeout
    return data


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


async def _run(session: Session, args: argparse.Namespace, data: dict[str, Any]) -> int:
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


async def _attach(session: Session, args: argparse.Namespace) -> int:
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


async def _ls(session: Session, args: argparse.Namespace) -> int:
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
            jobs = await _with_details(client, await client.running_jobs())
            if args.workflow_id is not None:
                jobs = [job for job in jobs if job.get("workflow_id") == args.workflow_id]
    if args.json:
        print(json.dumps(jobs, indent=2, ensure_ascii=False))
    elif jobs:
        make_console().print(jobs_table(jobs))
    else:
        make_console().print("no unfinished jobs" if not args.all else "no jobs", style="dim")
    return 0


async def _with_details(client: Client, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


async def _show(session: Session, args: argparse.Namespace) -> int:
    from nodejob.client import Client
    from nodejob.render import job_details, make_console

    async with Client(session.url, session.token) as client:
        job = await client.get_job(args.job_id)
    if args.json:
        print(json.dumps(job, indent=2, ensure_ascii=False))
    else:
        make_console().print(job_details(job))
    return 0


async def _cancel(session: Session, args: argparse.Namespace) -> int:
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


# -- commands owned by other modules (imported lazily) -----------------------------------------


def _serve(args: argparse.Namespace, session: Session) -> int:
    if args.log_level is not None:
        import logging

        logging.basicConfig(
            level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    from nodejob.server.app import serve_forever

    return int(
        serve_forever(
            host=args.host,
            port=args.port,
            home=session.home,
            max_jobs=args.max_jobs,
            ring_size=args.ring_size,
            default_strategy=args.strategy,
        )
    )


def _users_add(args: argparse.Namespace, session: Session) -> int:
    from nodejob.store import add_user_cli

    return int(add_user_cli(session.home, args.name))


def _tui(args: argparse.Namespace, session: Session) -> int:
    from nodejob_tui.app import run_tui  # type: ignore[import-not-found,unused-ignore]

    options: dict[str, Any] = {"show_all": True} if args.all else {}
    return int(run_tui(url=session.url, token=session.token, job_id=args.job_id, **options))


def _passthrough(args: argparse.Namespace, rest: list[str]) -> int:
    if args.command == "worker":
        from nodejob.worker import main as worker_main

        return int(worker_main(rest))
    from nodejob.bench import main as bench_main

    return int(bench_main(rest))


def build_parser() -> argparse.ArgumentParser:
    """The ``nodejob`` argument parser (global options work before or after the command)."""
    parser = argparse.ArgumentParser(
        prog="nodejob", description="Reattachable background jobs for node-graph workflows."
    )
    parser.add_argument("--version", action="version", version=f"nodejob {__version__}")
    # The same options on every subcommand; SUPPRESS keeps a subcommand from resetting a value
    # given before it.
    common = argparse.ArgumentParser(add_help=False)
    for target, default in ((parser, None), (common, argparse.SUPPRESS)):
        target.add_argument("--url", default=default, help=f"server (NODEJOB_URL, {DEFAULT_URL})")
        target.add_argument("--token", default=default, help="API token (NODEJOB_TOKEN)")
        target.add_argument("--home", default=default, help="state directory (NODEJOB_HOME)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    strategies = [s.value for s in protocol.ExecutionStrategy]

    serve = sub.add_parser("serve", parents=[common], help="run the server")
    serve.add_argument("--host", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (8787); 0 picks a free one")
    serve.add_argument("--max-jobs", type=int, help="concurrently running jobs")
    serve.add_argument("--ring-size", type=int, help="messages kept in memory per job")
    serve.add_argument("--strategy", choices=strategies, help="default execution strategy")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    run = sub.add_parser("run", parents=[common], help="start a job and follow it")
    run.add_argument("file", nargs="?", metavar="FILE.json", help="the workflow graph")
    run.add_argument(
        "--param",
        "-p",
        action="append",
        type=parse_param,
        default=[],
        metavar="NAME=VALUE",
        help="a job param (VALUE as JSON, else a string)",
    )
    run.add_argument("--strategy", choices=strategies, help="execution strategy")
    run.add_argument("--timeout", type=_positive, metavar="SECONDS", help="stop the job after")
    run.add_argument("--workflow-id", help="label, or without FILE: the saved workflow to run")
    run.add_argument("--detach", "-d", action="store_true", help="print the job id and return")
    run.add_argument("--json", action="store_true", help="print the messages as JSON lines")

    attach = sub.add_parser("attach", parents=[common], help="follow a job: missed, then live")
    attach.add_argument("job_id", metavar="JOB_ID")
    attach.add_argument("--after-seq", type=_seq, default=0, metavar="N")
    attach.add_argument("--json", action="store_true", help="print the messages as JSON lines")

    ls = sub.add_parser("ls", parents=[common], help="list jobs (default: unfinished)")
    ls.add_argument("--all", "-a", action="store_true", help="finished jobs too, newest first")
    ls.add_argument("--workflow-id", help="only jobs of this workflow")
    ls.add_argument("--limit", type=int, help="at most this many jobs (with --all)")
    ls.add_argument("--json", action="store_true")

    for name, text in (("show", "print a job"), ("cancel", "cancel a job")):
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument("job_id", metavar="JOB_ID")
        if name == "show":
            command.add_argument("--json", action="store_true")

    tui = sub.add_parser("tui", parents=[common], help="open the terminal UI")
    tui.add_argument("job_id", nargs="?", metavar="JOB_ID")
    tui.add_argument("--all", action="store_true", help="list finished jobs too")

    users = sub.add_parser("users", help="manage users")
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="COMMAND")
    add = users_sub.add_parser("add", parents=[common], help="add a user, print its token")
    add.add_argument("name", metavar="NAME")

    # Their own modules parse their arguments: everything after the command goes to them.
    sub.add_parser("worker", add_help=False, help="(internal) run one job out of process")
    sub.add_parser("bench", add_help=False, help="benchmarks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nodejob`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
        if rest and args.command not in ("worker", "bench"):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else protocol.EXIT_USAGE
    if args.command in ("worker", "bench"):
        return _passthrough(args, rest)
    session = session_from(args)
    try:
        match args.command:
            case "serve":
                return _serve(args, session)
            case "users":
                return _users_add(args, session)
            case "tui":
                return _tui(args, session)
            case "run":
                data = load_run_data(args.file, args)
                if args.detach:
                    return run_async(session, _run, args, data)
                return run_async(session, _run, args, data, interrupt="attach")
            case "attach":
                return run_async(session, _attach, args, interrupt="attach")
            case "ls":
                return run_async(session, _ls, args)
            case "show":
                return run_async(session, _show, args)
            case "cancel":
                return run_async(session, _cancel, args)
    except UsageError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return protocol.EXIT_DETACHED
    parser.error(f"unknown command {args.command}")  # unreachable: argparse requires one
