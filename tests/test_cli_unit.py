"""The client library, the CLI and the renderer, without the real server.

Where a server is needed, `FakeServer` (tests/doubles.py) stands in: a small real double
(quart-trio on hypercorn, like the real one) that speaks DESIGN.md's WebSocket and REST
protocol over scripted in-memory jobs, and can drop every connection (a "restart") or ignore
``after_seq`` (to prove the client's dedup). End-to-end tests against the real server live
elsewhere.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
from typing import Any

import pytest
import trio
from rich.console import Console

from nodejob import __version__, cli, protocol
from nodejob.client import (
    Client,
    ClientError,
    ConnectError,
    SeqTracker,
    next_start_key,
    open_job_stream,
    ws_url,
)
from nodejob.render import JobView, job_details, jobs_table
from tests.doubles import TOKEN, FakeServer


@pytest.fixture
async def server(nursery: trio.Nursery) -> FakeServer:
    fake = FakeServer()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
def threaded_server() -> Any:
    """A FakeServer in its own thread and trio run, for the synchronous ``cli.main`` tests."""
    fake = FakeServer()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            holder["cancel"] = nursery.cancel_scope
            holder["token"] = trio.lowlevel.current_trio_token()
            await nursery.start(fake.serve)
            ready.set()

    thread = threading.Thread(target=trio.run, args=(run,), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield fake
    trio.from_thread.run_sync(holder["cancel"].cancel, trio_token=holder["token"])
    thread.join(10)


def free_port() -> int:
    """A port nothing listens on (bound, noted, closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def graph_file(tmp_path: Any, content: Any, name: str = "graph.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


EMPTY_GRAPH: dict[str, Any] = {"nodes": [], "edges": []}


# -- pure pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http", "ws"),
    [
        ("http://127.0.0.1:8787", "ws://127.0.0.1:8787/ws"),
        ("http://127.0.0.1:8787/", "ws://127.0.0.1:8787/ws"),
        ("https://example.org", "wss://example.org/ws"),
        ("https://example.org/nodejob/", "wss://example.org/nodejob/ws"),
    ],
)
def test_ws_url(http: str, ws: str) -> None:
    assert ws_url(http) == ws


@pytest.mark.parametrize(
    ("header", "key"),
    [
        (None, None),
        ("", None),
        ('<http://h/api/jobs/?limit=2&start_key=abc%3D1>; rel="next"', "abc=1"),
        (
            '<http://h/api/jobs/?start_key=p>; rel="prev", <http://h/api/jobs/?start_key=n>; rel="next"',
            "n",
        ),
        ('<http://h/api/jobs/?start_key=p>; rel="prev"', None),
        ("<http://h/api/jobs/?limit=2>; rel=next", None),
    ],
)
def test_next_start_key_reads_the_link_header(header: str | None, key: str | None) -> None:
    assert next_start_key(header) == key


def log_line(content: str) -> dict[str, Any]:
    return {"type": "log_update", "node_id": "a", "content": content, "severity": "info"}


def msg(seq: int, job_id: str = "j", kind: str = "log_update", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "job_id": job_id, "seq": seq, **fields}


def test_seq_tracker_drops_duplicates_and_older_messages() -> None:
    tracker = SeqTracker()
    accepted = [m["seq"] for m in map(msg, [1, 2, 2, 3, 1, 4, 3, 5]) if tracker.accept(m)]
    assert accepted == [1, 2, 3, 4, 5]
    assert tracker.last("j") == 5


def test_seq_tracker_is_per_job_and_resets() -> None:
    tracker = SeqTracker()
    assert tracker.accept(msg(1, "a"))
    assert tracker.accept(msg(1, "b"))
    assert not tracker.accept(msg(1, "a"))
    tracker.reset("a", 0)  # a new reconnect_job cursor replays
    assert tracker.accept(msg(1, "a"))
    assert tracker.last("b") == 1
    assert tracker.last("unknown") == 0


def test_seq_tracker_gap_advances_and_is_itself_deduplicated() -> None:
    tracker = SeqTracker()
    assert tracker.accept(msg(2))
    gap = protocol.gap_message("j", 3, 10)
    assert tracker.accept(gap)
    assert tracker.last("j") == 10
    assert not tracker.accept(gap)
    assert not tracker.accept(msg(9))
    assert tracker.accept(msg(11))


def test_seq_tracker_rejects_non_messages() -> None:
    tracker = SeqTracker()
    assert not tracker.accept({"message": "Job started", "job_id": "j"})
    assert not tracker.accept({"type": "log_update", "seq": 1})
    assert not tracker.accept({"type": "log_update", "job_id": "j", "seq": "1"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("n=3", ("n", 3)),
        ("x=1.5", ("x", 1.5)),
        ("flag=true", ("flag", True)),
        ("name=alice", ("name", "alice")),
        ('s="3"', ("s", "3")),
        ('o={"a": [1]}', ("o", {"a": [1]})),
        ("eq=a=b", ("eq", "a=b")),
        ("empty=", ("empty", "")),
        ("nothing=null", ("nothing", None)),
    ],
)
def test_parse_param_reads_json_else_string(text: str, expected: tuple[str, Any]) -> None:
    assert cli.parse_param(text) == expected


@pytest.mark.parametrize("text", ["noequals", "=3", ""])
def test_parse_param_needs_a_name(text: str) -> None:
    with pytest.raises(Exception, match="NAME=VALUE"):
        cli.parse_param(text)


# -- argument parsing --------------------------------------------------------------------------


def parse(*argv: str) -> Any:
    args, rest = cli.build_parser().parse_known_args(list(argv))
    return args, rest


def test_every_subcommand_parses() -> None:
    args, _ = parse(
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "0",
        "--max-jobs",
        "5",
        "--ring-size",
        "100",
        "--strategy",
        "subprocess",
        "--log-level",
        "debug",
    )
    assert (args.command, args.host, args.port, args.max_jobs, args.ring_size) == (
        "serve",
        "0.0.0.0",
        0,
        5,
        100,
    )
    assert (args.strategy, args.log_level) == ("subprocess", "debug")
    args, _ = parse("serve")
    assert (args.host, args.port, args.max_jobs, args.strategy) == (None, None, None, None)

    args, _ = parse(
        "run",
        "g.json",
        "-p",
        "a=1",
        "--param",
        "b=x",
        "--strategy",
        "docker",
        "--timeout",
        "2.5",
        "--workflow-id",
        "wf",
        "--detach",
        "--json",
    )
    assert args.file == "g.json"
    assert args.param == [("a", 1), ("b", "x")]
    assert (args.strategy, args.timeout, args.workflow_id, args.detach, args.json) == (
        "docker",
        2.5,
        "wf",
        True,
        True,
    )

    args, _ = parse("attach", "J", "--after-seq", "7", "--json")
    assert (args.job_id, args.after_seq, args.json) == ("J", 7, True)
    args, _ = parse("ls", "--all", "--json", "--limit", "3", "--workflow-id", "w")
    assert (args.all, args.json, args.limit, args.workflow_id) == (True, True, 3, "w")
    args, _ = parse("ls")
    assert (args.all, args.json) == (False, False)
    args, _ = parse("show", "J", "--json")
    assert (args.command, args.job_id, args.json) == ("show", "J", True)
    args, _ = parse("cancel", "J")
    assert (args.command, args.job_id) == ("cancel", "J")
    args, _ = parse("tui", "J", "--all")
    assert (args.job_id, args.all) == ("J", True)
    args, _ = parse("tui")
    assert args.job_id is None
    args, _ = parse("users", "add", "bob", "--home", "/h")
    assert (args.command, args.users_command, args.name, args.home) == ("users", "add", "bob", "/h")


def test_worker_and_bench_get_their_arguments_untouched() -> None:
    args, rest = parse("worker", "--spool", "/tmp/x", "--json", "-h")
    assert args.command == "worker"
    assert rest == ["--spool", "/tmp/x", "--json", "-h"]
    args, rest = parse("bench", "--messages", "1000")
    assert args.command == "bench"
    assert rest == ["--messages", "1000"]


def test_global_options_work_before_and_after_the_command() -> None:
    args, _ = parse("--url", "http://a:1", "--token", "t", "ls")
    assert (args.url, args.token) == ("http://a:1", "t")
    args, _ = parse("ls", "--url", "http://b:2", "--home", "/h")
    assert (args.url, args.home) == ("http://b:2", "/h")
    args, _ = parse("--url", "http://a:1", "ls", "--token", "t")
    assert (args.url, args.token) == ("http://a:1", "t")


def test_session_resolution_flags_env_and_token_file(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.delenv("NODEJOB_URL", raising=False)
    monkeypatch.delenv("NODEJOB_TOKEN", raising=False)
    monkeypatch.setenv("NODEJOB_HOME", str(tmp_path))
    (tmp_path / "token").write_text("from-file\n")
    session = cli.session_from(parse("ls")[0])
    assert (session.url, session.token, session.home) == (
        "http://127.0.0.1:8787",
        "from-file",
        tmp_path,
    )
    monkeypatch.setenv("NODEJOB_URL", "http://env:1/")
    monkeypatch.setenv("NODEJOB_TOKEN", "from-env")
    session = cli.session_from(parse("ls")[0])
    assert (session.url, session.token) == ("http://env:1", "from-env")
    session = cli.session_from(parse("ls", "--url", "http://flag:2", "--token", "flag")[0])
    assert (session.url, session.token) == ("http://flag:2", "flag")
    other = tmp_path / "other"
    session = cli.session_from(parse("ls", "--home", str(other))[0])
    assert session.home == other
    monkeypatch.delenv("NODEJOB_TOKEN")
    assert cli.session_from(parse("ls", "--home", str(other))[0]).token is None


def run_args(*argv: str) -> Any:
    return parse("run", *argv)[0]


def test_load_run_data_from_a_bare_graph(tmp_path: Any) -> None:
    path = graph_file(tmp_path, EMPTY_GRAPH)
    data = cli.load_run_data(
        path, run_args(path, "-p", "n=2", "--strategy", "subprocess", "--timeout", "9")
    )
    assert data == {
        "graph": EMPTY_GRAPH,
        "params": {"n": 2},
        "execution_strategy": "subprocess",
        "timeout_seconds": 9.0,
    }


def test_load_run_data_from_a_wrapped_graph(tmp_path: Any) -> None:
    path = graph_file(
        tmp_path,
        {"graph": {"nodes": []}, "name": "x", "workflow_id": "wf", "params": {"a": 1, "b": 1}},
    )
    data = cli.load_run_data(path, run_args(path, "-p", "b=2"))
    assert data == {"graph": {"nodes": []}, "workflow_id": "wf", "params": {"a": 1, "b": 2}}
    data = cli.load_run_data(path, run_args(path, "--workflow-id", "label"))
    assert data["workflow_id"] == "label"


def test_load_run_data_runs_a_saved_workflow_without_a_file() -> None:
    data = cli.load_run_data(None, run_args("--workflow-id", "saved"))
    assert data == {"workflow_id": "saved", "params": {}}
    with pytest.raises(cli.UsageError, match="FILE or --workflow-id"):
        cli.load_run_data(None, run_args())


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ('{"nodes": [', "invalid JSON"),
        ("[1, 2]", "invalid graph"),
        ('{"nodes": 3}', "invalid graph"),
        ('{"nodes": [], "edges": {}}', "invalid graph"),
        ('{"graph": "x"}', "invalid graph"),
    ],
)
def test_load_run_data_rejects_bad_files(tmp_path: Any, content: str, reason: str) -> None:
    path = graph_file(tmp_path, content)
    with pytest.raises(cli.UsageError, match=f"^{path}: {reason}"):
        cli.load_run_data(path, run_args(path))


# -- exit codes without a server ----------------------------------------------------------------


def one_line_error(capsys: Any) -> str:
    err: str = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert err.startswith("nodejob: ")
    return err.strip()


def test_version(capsys: Any) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"nodejob {__version__}"


def test_missing_file_is_a_usage_error(tmp_path: Any, capsys: Any) -> None:
    path = str(tmp_path / "nope.json")
    assert cli.main(["run", path]) == 2
    assert one_line_error(capsys) == f"nodejob: {path}: No such file or directory"


def test_bad_json_is_a_usage_error(tmp_path: Any, capsys: Any) -> None:
    path = graph_file(tmp_path, "{not json")
    assert cli.main(["run", path]) == 2
    assert one_line_error(capsys).startswith(f"nodejob: {path}: invalid JSON: ")


def test_bad_flags_exit_2(capsys: Any) -> None:
    assert cli.main(["run", "x.json", "--strategy", "nope"]) == 2
    assert cli.main(["attach", "J", "--after-seq", "-1"]) == 2
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["ls", "--bogus"]) == 2
    assert cli.main([]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "GRAPH"],
        ["run", "GRAPH", "--detach"],
        ["attach", "J"],
        ["attach", "J", "--json"],
        ["ls"],
        ["ls", "--all"],
        ["show", "J"],
        ["cancel", "J"],
    ],
)
def test_unreachable_server_exit_2(tmp_path: Any, capsys: Any, argv: list[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    argv = [graph_file(tmp_path, EMPTY_GRAPH) if a == "GRAPH" else a for a in argv]
    assert cli.main([*argv, "--url", url, "--token", "t"]) == 2
    assert (
        one_line_error(capsys) == f"nodejob: cannot connect to {url} (is `nodejob serve` running?)"
    )
    assert capsys.readouterr().out == ""


def test_not_an_http_url_exit_2(tmp_path: Any, capsys: Any) -> None:
    path = graph_file(tmp_path, EMPTY_GRAPH)
    assert cli.main(["run", path, "--url", "localhost:8787"]) == 2
    assert "invalid server URL" in one_line_error(capsys)


# -- the REST client against the double --------------------------------------------------------


async def test_rest_client_round_trip(server: FakeServer) -> None:
    async with Client(server.url, TOKEN) as client:
        assert await client.health() == {"status": "ok"}
        job = await client.start_job({"graph": EMPTY_GRAPH, "params": {"hold": True}})
        assert job["status"] == "starting"
        assert (await client.get_job(job["id"]))["id"] == job["id"]
        running = await client.running_jobs()
        assert [j["job_id"] for j in running] == [job["id"]]
        assert (await client.cancel_job(job["id"]))["job_id"] == job["id"]
        with trio.fail_after(5):
            await server.jobs[job["id"]].finished.wait()
        assert (await client.get_job(job["id"]))["status"] == "cancelled"
        with pytest.raises(ClientError) as info:
            await client.cancel_job(job["id"])
        assert (info.value.status, info.value.detail) == (409, f"Job already finished: {job['id']}")
        with pytest.raises(ClientError) as info:
            await client.get_job("nope")
        assert (info.value.status, info.value.detail) == (404, "Job not found: nope")


async def test_rest_client_paginates_with_the_link_header(server: FakeServer) -> None:
    for _ in range(5):
        server.start({"graph": EMPTY_GRAPH})
    async with Client(server.url, TOKEN) as client:
        page, key = await client.list_jobs(limit=2)
        assert [j["id"] for j in page] == ["job5", "job4"]
        assert key == "2"
        page, key = await client.list_jobs(limit=2, start_key=key)
        assert [j["id"] for j in page] == ["job3", "job2"]
        ids = [job["id"] async for job in client.iter_jobs(page_size=2)]
        assert ids == ["job5", "job4", "job3", "job2", "job1"]


async def test_rest_client_errors(server: FakeServer) -> None:
    async with Client(server.url, "wrong") as client:
        with pytest.raises(ClientError) as info:
            await client.running_jobs()
        assert (info.value.status, info.value.detail) == (401, "invalid token")
    url = f"http://127.0.0.1:{free_port()}"
    async with Client(url, TOKEN) as client:
        with pytest.raises(ConnectError) as connect_info:
            await client.health()
        assert connect_info.value.status is None
        assert connect_info.value.detail.startswith(f"cannot connect to {url}: ")


# -- the WebSocket stream against the double ---------------------------------------------------


async def collect(stream: Any, job_id: str) -> list[dict[str, Any]]:
    """Every message of ``job_id`` up to and including its terminal job_update."""
    out = []
    with trio.fail_after(10):
        async for message in stream.messages():
            if message["job_id"] == job_id:
                out.append(message)
                if protocol.is_terminal_update(message):
                    return out
    raise AssertionError(f"stream ended early after {out}")


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages]


async def test_run_job_streams_every_message_once(server: FakeServer) -> None:
    async with open_job_stream(server.url, TOKEN) as stream:
        job_id = await stream.run_job({"graph": EMPTY_GRAPH, "params": {"logs": 50}})
        messages = await collect(stream, job_id)
    assert seqs(messages) == list(range(1, len(server.jobs[job_id].messages) + 1))
    assert messages[0]["status"] == "starting"
    assert messages[-1]["status"] == "completed"
    assert stream.last_seq(job_id) == messages[-1]["seq"]


async def test_error_reply_raises_client_error_and_the_stream_stays_usable(
    server: FakeServer,
) -> None:
    async with open_job_stream(server.url, TOKEN) as stream:
        with pytest.raises(ClientError, match="invalid graph: node x") as info:
            await stream.run_job({"graph": {"invalid": True}})
        assert info.value.status is None
        with pytest.raises(ClientError, match="Job not found: nope"):
            await stream.reconnect_job("nope")
        with pytest.raises(ClientError, match="Job not found: noise"):
            await stream.reconnect_job("noise")
        job_id = await stream.run_job({"graph": EMPTY_GRAPH})
        assert (await collect(stream, job_id))[-1]["status"] == "completed"
        with pytest.raises(ClientError, match=f"Job already finished: {job_id}"):
            await stream.cancel_job(job_id)


async def test_reconnect_job_resumes_after_seq(server: FakeServer) -> None:
    job = server.start({"graph": EMPTY_GRAPH, "params": {"logs": 5}})
    async with open_job_stream(server.url, TOKEN) as stream:
        await stream.reconnect_job(job.id, after_seq=4)
        messages = await collect(stream, job.id)
    assert seqs(messages) == list(range(5, len(job.messages) + 1))


async def test_client_dedups_when_the_server_replays_too_much(server: FakeServer) -> None:
    server.replay_from_start = True  # the double ignores after_seq
    job = server.start({"graph": EMPTY_GRAPH, "params": {"logs": 5}})
    async with open_job_stream(server.url, TOKEN) as stream:
        await stream.reconnect_job(job.id, after_seq=6)
        messages = await collect(stream, job.id)
    assert seqs(messages) == list(range(7, len(job.messages) + 1))


async def test_a_new_reconnect_job_replaces_the_cursor(server: FakeServer) -> None:
    job = server.start({"graph": EMPTY_GRAPH, "params": {"logs": 3}})
    async with open_job_stream(server.url, TOKEN) as stream:
        await stream.reconnect_job(job.id)
        first = await collect(stream, job.id)
        await stream.reconnect_job(job.id, after_seq=2)  # replay from 3 on purpose
        again = await collect(stream, job.id)
    assert seqs(again) == seqs(first)[2:]


async def test_gap_comes_first_and_moves_the_cursor(server: FakeServer) -> None:
    job = server.start({"graph": EMPTY_GRAPH, "params": {"logs": 10, "trim": 6, "hold": True}})
    with trio.fail_after(5):
        await job.holding.wait()
    async with open_job_stream(server.url, TOKEN) as stream:
        await stream.reconnect_job(job.id)
        await stream.cancel_job(job.id)
        messages = await collect(stream, job.id)
    assert messages[0] == protocol.gap_message(job.id, 1, 6)
    assert seqs(messages) == list(range(6, len(job.messages) + 1))
    assert messages[-1]["status"] == "cancelled"


@pytest.mark.parametrize("replay_from_start", [False, True])
async def test_reconnect_survives_dropped_connections_gap_free(
    server: FakeServer, replay_from_start: bool
) -> None:
    server.replay_from_start = replay_from_start
    async with open_job_stream(server.url, TOKEN, reconnect=True) as stream:
        job_id = await stream.run_job({"graph": EMPTY_GRAPH, "params": {"logs": 3, "hold": True}})
        job = server.jobs[job_id]
        received: list[dict[str, Any]] = []
        with trio.fail_after(10):
            async for message in stream.messages():
                received.append(message)
                if message["seq"] == 3:  # mid-stream: "restart" the server, twice
                    for connections in (2, 3):
                        server.drop_connections()
                        job.emit(log_line("while away"))
                        await server.wait_connections(connections)
                        job.emit(log_line("back"))
                if message["seq"] == 8:
                    job.cancel.set()
                if protocol.is_terminal_update(message):
                    break
        assert stream.state == "connected"
    assert seqs(received) == list(range(1, len(job.messages) + 1))
    assert received[-1]["status"] == "cancelled"
    assert server.connections == 3
    reconnects = [d for c, d in server.commands if c == "reconnect_job"]
    assert reconnects
    assert all(d["job_id"] == job_id for d in reconnects)


async def test_without_reconnect_a_lost_connection_ends_the_stream(server: FakeServer) -> None:
    async with open_job_stream(server.url, TOKEN) as stream:
        job_id = await stream.run_job({"graph": EMPTY_GRAPH, "params": {"hold": True}})

        async def read_until_dropped() -> None:
            async for message in stream.messages():
                if message["seq"] == 2:
                    server.drop_connections()

        with trio.fail_after(5), pytest.raises(ConnectError, match="connection lost"):
            await read_until_dropped()
        with pytest.raises(ConnectError):
            await stream.cancel_job(job_id)
    server.jobs[job_id].cancel.set()


async def test_one_stream_follows_several_jobs_and_unsubscribes(server: FakeServer) -> None:
    async with open_job_stream(server.url, TOKEN) as stream:
        held = await stream.run_job({"graph": EMPTY_GRAPH, "params": {"hold": True}})
        with trio.fail_after(5):
            async for message in stream.messages():
                if message["seq"] == 3:
                    break
        await stream.unsubscribe(held)
        server.jobs[held].cancel.set()
        quick = await stream.run_job({"graph": EMPTY_GRAPH})
        messages = await collect(stream, quick)
    assert {m["job_id"] for m in messages} == {quick}
    assert stream.last_seq(held) >= 3


async def test_websocket_refuses_a_bad_token(server: FakeServer) -> None:
    with pytest.raises(ClientError) as info:
        async with open_job_stream(server.url, "wrong"):
            pass  # pragma: no cover
    assert (info.value.status, info.value.detail) == (401, "invalid token")


async def test_websocket_cannot_connect() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConnectError) as info:
        async with open_job_stream(url, TOKEN, reconnect=True):
            pass  # pragma: no cover
    assert info.value.detail.startswith(f"cannot connect to {url}: ")


async def test_body_exceptions_are_not_wrapped_in_groups(server: FakeServer) -> None:
    with pytest.raises(KeyError):
        async with open_job_stream(server.url, TOKEN):
            raise KeyError("mine")


# -- the CLI against the double (its own thread: cli.main runs trio.run itself) ---------------


def cli_main(server: FakeServer, *argv: str, token: str = TOKEN) -> int:
    return cli.main([*argv, "--url", server.url, "--token", token])


def json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.parametrize(("end", "code"), [("completed", 0), ("failed", 1)])
def test_run_json_prints_the_stream_and_exits_by_status(
    threaded_server: FakeServer, tmp_path: Any, capsys: Any, end: str, code: int
) -> None:
    path = graph_file(tmp_path, EMPTY_GRAPH)
    assert (
        cli_main(threaded_server, "run", path, "--json", "-p", f"end={end}", "-p", "logs=3") == code
    )
    captured = capsys.readouterr()
    messages = json_lines(captured.out)
    job = threaded_server.jobs["job1"]
    assert messages == job.messages  # exactly the envelopes, in order, once each
    assert messages[-1]["status"] == end
    assert captured.err == ""
    assert job.params == {"end": end, "logs": 3}


def test_run_sends_the_options(threaded_server: FakeServer, tmp_path: Any, capsys: Any) -> None:
    path = graph_file(tmp_path, EMPTY_GRAPH)
    assert (
        cli_main(
            threaded_server,
            "run",
            path,
            "--json",
            "--strategy",
            "subprocess",
            "--timeout",
            "30",
            "--workflow-id",
            "wf",
        )
        == 0
    )
    command, data = threaded_server.commands[0]
    assert command == "run_job"
    assert data == {
        "graph": EMPTY_GRAPH,
        "params": {},
        "workflow_id": "wf",
        "execution_strategy": "subprocess",
        "timeout_seconds": 30.0,
    }


def test_run_human_output(threaded_server: FakeServer, tmp_path: Any, capsys: Any) -> None:
    path = graph_file(tmp_path, EMPTY_GRAPH)
    assert cli_main(threaded_server, "run", path) == 0
    out = capsys.readouterr().out
    assert "[a] line 0" in out
    assert "[a] line 1" in out
    assert "job job1 completed" in out
    assert "sum = 5" in out


def test_run_reports_a_rejected_graph(
    threaded_server: FakeServer, tmp_path: Any, capsys: Any
) -> None:
    path = graph_file(tmp_path, {"nodes": [], "edges": [], "invalid": True})
    assert cli_main(threaded_server, "run", path) == 2
    assert one_line_error(capsys) == "nodejob: invalid graph: node x"


def test_run_detach_prints_only_the_job_id(
    threaded_server: FakeServer, tmp_path: Any, capsys: Any
) -> None:
    path = graph_file(tmp_path, EMPTY_GRAPH)
    assert cli_main(threaded_server, "run", path, "--detach", "-p", "hold=true") == 0
    assert capsys.readouterr().out == "job1\n"
    assert threaded_server.jobs["job1"].params == {"hold": True}


def test_bad_token_is_one_line(threaded_server: FakeServer, tmp_path: Any, capsys: Any) -> None:
    path = graph_file(tmp_path, EMPTY_GRAPH)
    for argv in (["run", path], ["ls"]):
        assert cli_main(threaded_server, *argv, token="wrong") == 2
        assert one_line_error(capsys).startswith("nodejob: invalid token (set --token")


def test_ctrl_c_detaches_and_the_job_runs_on(
    threaded_server: FakeServer, tmp_path: Any, capsys: Any
) -> None:
    def interrupt_once_running(message: dict[str, Any]) -> None:
        if message["seq"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    threaded_server.on_sent = interrupt_once_running
    path = graph_file(tmp_path, EMPTY_GRAPH)
    assert cli_main(threaded_server, "run", path, "--json", "-p", "hold=true") == 130
    captured = capsys.readouterr()
    assert captured.err == "nodejob attach job1\n"
    assert all(m["job_id"] == "job1" for m in json_lines(captured.out))
    assert threaded_server.jobs["job1"].status == "running"
    threaded_server.on_sent = None
    # ... and it can be followed again, cancelled, and ends with exit status 3.
    assert cli_main(threaded_server, "cancel", "job1") == 0
    assert capsys.readouterr().out == "cancelled job1\n"
    assert cli_main(threaded_server, "attach", "job1", "--json", "--after-seq", "2") == 3
    messages = json_lines(capsys.readouterr().out)
    assert [m["seq"] for m in messages] == list(
        range(3, len(threaded_server.jobs["job1"].messages) + 1)
    )
    assert messages[-1]["status"] == "cancelled"


def test_attach_human_and_json(threaded_server: FakeServer, tmp_path: Any, capsys: Any) -> None:
    path = graph_file(tmp_path, EMPTY_GRAPH)
    assert cli_main(threaded_server, "run", path, "--detach") == 0
    capsys.readouterr()
    assert cli_main(threaded_server, "attach", "job1", "--json") == 0
    assert json_lines(capsys.readouterr().out) == threaded_server.jobs["job1"].messages
    assert cli_main(threaded_server, "attach", "job1") == 0
    out = capsys.readouterr().out
    assert "job job1 completed" in out
    assert "2.5s" in out
    # Past the end of a finished job: nothing more will come; do not wait for it.
    last = len(threaded_server.jobs["job1"].messages)
    assert cli_main(threaded_server, "attach", "job1", "--json", "--after-seq", str(last)) == 0
    assert capsys.readouterr().out == ""


def test_attach_unknown_job(threaded_server: FakeServer, capsys: Any) -> None:
    assert cli_main(threaded_server, "attach", "nope") == 2
    assert one_line_error(capsys) == "nodejob: Job not found: nope"


def test_ls_show_cancel(threaded_server: FakeServer, tmp_path: Any, capsys: Any) -> None:
    path = graph_file(tmp_path, EMPTY_GRAPH)
    assert cli_main(threaded_server, "ls") == 0
    assert "no unfinished jobs" in capsys.readouterr().out
    assert cli_main(threaded_server, "run", path, "--json") == 0
    assert (
        cli_main(
            threaded_server, "run", path, "--detach", "-p", "hold=true", "--workflow-id", "wf-held"
        )
        == 0
    )
    capsys.readouterr()

    assert cli_main(threaded_server, "ls", "--json") == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == ["job2"]
    assert cli_main(threaded_server, "ls") == 0
    out = capsys.readouterr().out
    assert "job2" in out
    assert "wf-held" in out
    assert "job1" not in out
    assert cli_main(threaded_server, "ls", "--all", "--json") == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == ["job2", "job1"]
    assert cli_main(threaded_server, "ls", "--all", "--limit", "1", "--json") == 0
    assert [j["id"] for j in json.loads(capsys.readouterr().out)] == ["job2"]

    assert cli_main(threaded_server, "show", "job1", "--json") == 0
    assert json.loads(capsys.readouterr().out) == threaded_server.jobs["job1"].as_object()
    assert cli_main(threaded_server, "show", "job1") == 0
    assert "completed" in capsys.readouterr().out

    assert cli_main(threaded_server, "cancel", "job1") == 1
    assert one_line_error(capsys) == "nodejob: Job already finished: job1"
    assert cli_main(threaded_server, "cancel", "nope") == 2
    assert one_line_error(capsys) == "nodejob: Job not found: nope"
    assert cli_main(threaded_server, "cancel", "job2") == 0
    assert capsys.readouterr().out == "cancelled job2\n"


# -- rendering ----------------------------------------------------------------------------------


def script(job_id: str = "j1", *, end: str = "completed") -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"type": "job_update", "status": "starting"},
        {"type": "job_update", "status": "running"},
        {"type": "node_update", "node_id": "a", "node_type": "nodejob.Sleep", "status": "running"},
        {"type": "node_progress", "node_id": "a", "progress": 3, "total": 10},
        {
            "type": "log_update",
            "node_id": "a",
            "content": "hello [bold]not markup[/]",
            "severity": "info",
        },
        {"type": "log_update", "node_id": "a", "content": "careful", "severity": "warning"},
        {"type": "gap", "from_seq": 7, "to_seq": 9},
        {
            "type": "node_update",
            "node_id": "b",
            "node_type": "nodejob.Fail",
            "status": "failed",
            "error": "bad input",
        },
        {"type": "output_update", "node_id": "out", "output_name": "sum", "value": {"x": [1, 2]}},
        {"type": "node_update", "node_id": "a", "status": "completed", "result": 3},
        {"type": "surprise", "anything": True},
        {"type": "node_progress", "node_id": "c", "progress": "lots", "total": None},
    ]
    final: dict[str, Any] = {"type": "job_update", "status": end}
    if end == "completed":
        final["result"] = {"outputs": {"sum": {"x": [1, 2]}, "n": 7}}
    elif end == "failed":
        final["error"] = "node b failed: bad input"
    messages.append(final)
    return [{**m, "job_id": job_id, "seq": i + 1} for i, m in enumerate(messages)]


def recording(*, terminal: bool) -> Console:
    return Console(
        record=True,
        width=100,
        file=io.StringIO(),
        force_terminal=terminal,
        color_system="truecolor" if terminal else None,
    )


@pytest.mark.parametrize("terminal", [False, True])
@pytest.mark.parametrize(
    ("end", "shown"),
    [
        ("completed", "n = 7"),
        ("failed", "error: node b failed: bad input"),
        ("cancelled", "cancelled"),
    ],
)
def test_job_view_renders_every_message_type(terminal: bool, end: str, shown: str) -> None:
    console = recording(terminal=terminal)
    view = JobView(console)
    view.start()
    for message in script(end=end):
        view.handle(message)
        view.refresh()
    view.finish()
    text = console.export_text()
    assert "[a] hello [bold]not markup[/]" in text
    assert "[a] careful" in text
    assert "messages 7\N{EN DASH}9 were trimmed (gap)" in text
    assert "✗ node b failed: bad input" in text
    assert f"job j1 {end}" in text
    assert "seq 1\N{EN DASH}13 (13 messages)" in text
    assert shown in text
    assert 'sum = {"x":[1,2]}' in text
    if not terminal:
        assert "▶ node a running" in text
        assert "✓ node a completed" in text


def test_job_view_live_area_shows_progress_and_state() -> None:
    view = JobView(recording(terminal=True), "j1")
    for message in script()[:6]:
        view.handle(message)
    view.connection = "reconnecting"
    console = recording(terminal=False)
    console.print(view.renderable())
    text = console.export_text()
    assert "job j1 running" in text
    assert "seq 6" in text
    assert "reconnecting…" in text
    assert "a nodejob.Sleep" in text
    assert "3/10" in text


def test_job_view_bounds_log_lines_per_refresh_but_keeps_notices() -> None:
    console = recording(terminal=False)
    view = JobView(console, "j1")
    for seq in range(1, 10_001):
        view.handle(
            {
                "type": "log_update",
                "job_id": "j1",
                "seq": seq,
                "node_id": "n",
                "content": f"line {seq}",
                "severity": "info",
            }
        )
        if seq == 5000:
            view.handle(
                {"type": "gap", "job_id": "j1", "seq": 5100, "from_seq": 5001, "to_seq": 5100}
            )
            view.handle(
                {
                    "type": "node_update",
                    "job_id": "j1",
                    "seq": 5101,
                    "node_id": "x",
                    "status": "failed",
                    "error": "oops",
                }
            )
    view.refresh()
    lines = console.export_text().splitlines()
    assert lines[:200] == [f"[n] line {seq}" for seq in range(1, 201)]
    assert lines[200:] == [
        "messages 5001\N{EN DASH}5100 were trimmed (gap)",
        "✗ node x failed: oops",
        "… 9800 more log lines not shown (--json shows all)",
    ]
    assert view.last_seq == 10_000
    view.refresh()  # the next refresh starts a new allowance
    view.handle({"type": "log_update", "job_id": "j1", "seq": 10_001, "content": "again"})
    view.refresh()
    assert console.export_text().splitlines() == ["again"]


def test_job_view_never_lets_a_job_drive_the_terminal() -> None:
    console = recording(terminal=False)
    view = JobView(console, "j1")
    view.handle({"type": "log_update", "job_id": "j1", "seq": 1, "content": "\x1b[2Jgotcha"})
    view.refresh()
    assert "\x1b" not in console.file.getvalue()  # type: ignore[attr-defined]
    assert "\\x1b[2Jgotcha" in console.export_text()


def test_jobs_table_and_job_details() -> None:
    jobs = [
        {
            "id": "j1",
            "workflow_id": "wf",
            "status": "running",
            "execution_strategy": "threaded",
            "started_at": "2026-01-01T00:00:00.000Z",
            "finished_at": None,
        },
        {
            "id": "j2",
            "workflow_id": None,
            "status": "failed",
            "execution_strategy": "docker",
            "started_at": "2026-01-01T00:00:00.000Z",
            "finished_at": "2026-01-01T00:01:05.000Z",
        },
        {"job_id": "j3", "status": "starting", "created_at": None},
    ]
    console = recording(terminal=False)
    console.print(jobs_table(jobs))
    text = console.export_text()
    for expected in (
        "id",
        "workflow",
        "status",
        "strategy",
        "started",
        "duration",
        "j1",
        "wf",
        "running",
        "j2",
        "failed",
        "docker",
        "1m05s",
        "j3",
        "starting",
    ):
        assert expected in text
    console.print(
        job_details({"id": "j1", "status": "completed", "params": {"a": 1}, "error": None})
    )
    text = console.export_text()
    assert 'params  {"a":1}' in text
    assert "status  completed" in text


@pytest.mark.parametrize("as_json", [True, False])
def test_run_follows_across_a_server_restart(
    threaded_server: FakeServer, tmp_path: Any, capsys: Any, as_json: bool
) -> None:
    def drop_once(message: dict[str, Any]) -> None:
        if message["seq"] == 3 and threaded_server.connections == 1:
            threaded_server.drop_connections()

    threaded_server.on_sent = drop_once
    threaded_server.replay_from_start = True  # and the client must not show anything twice
    path = graph_file(tmp_path, EMPTY_GRAPH)
    argv = ["run", path, "-p", "logs=20"] + (["--json"] if as_json else [])
    assert cli_main(threaded_server, *argv) == 0
    captured = capsys.readouterr()
    assert threaded_server.connections == 2
    if as_json:
        assert json_lines(captured.out) == threaded_server.jobs["job1"].messages
        assert captured.err == "nodejob: connection lost, reconnected\n"
    else:
        lines = [line for line in captured.out.splitlines() if line.startswith("[a] line")]
        assert lines == [f"[a] line {i}" for i in range(20)]
        assert "connection lost, reconnected" in captured.out
