"""The ``nodejob`` command: argument parsing and dispatch.

``run``, ``attach``, ``ls``, ``show`` and ``cancel`` are implemented in nodejob.commands.
``serve``, ``users``, ``worker``, ``bench`` and ``tui`` belong to other modules and are
imported lazily inside their handlers, so that ``nodejob --version`` and ``nodejob run`` stay
fast.

This module must not import the server, the store, apsw or quart at module level.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nodejob import __version__, commands, protocol
from nodejob.commands import Session, UsageError
from nodejob.config import DEFAULT_URL, default_home

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "Session",
    "UsageError",
    "build_parser",
    "home_dir",
    "load_run_data",
    "main",
    "parse_param",
    "session_from",
]


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
    serve.add_argument(
        "--ring-size", type=int, help="messages kept per job in the database (the ring; 10000)"
    )
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
                    return commands.run_async(session, commands.run, args, data)
                return commands.run_async(session, commands.run, args, data, interrupt="attach")
            case "attach":
                return commands.run_async(session, commands.attach, args, interrupt="attach")
            case "ls":
                return commands.run_async(session, commands.ls, args)
            case "show":
                return commands.run_async(session, commands.show, args)
            case "cancel":
                return commands.run_async(session, commands.cancel, args)
    except UsageError as exc:
        return commands.fail(str(exc))
    except KeyboardInterrupt:
        return protocol.EXIT_DETACHED
    parser.error(f"unknown command {args.command}")  # unreachable: argparse requires one
