"""Hostile input (issue 7): whatever a client sends, the server answers with a 4xx or a valid
reply, stays up, and keeps serving everyone else.

- schemathesis drives every operation of ``/openapi.json`` of a real ``nodejob serve``: no 5xx,
  every response conforms to the schema, bad data is refused, good data accepted;
- hypothesis drives the WebSocket command loop with arbitrary text, binary and JSON frames and
  the workflow engine with arbitrary graphs;
- deeply nested and oversized JSON, and slowloris clients, against real servers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

import apsw
import httpx
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nodejob.protocol import dumps
from nodejob.workflow import GraphError, NodeFailed, default_registry, run_graph, validate_graph
from tests.hardening import (
    TERMINAL,
    RawWebSocket,
    follow_job,
    metric,
    poll_until,
    rss_kib,
    start_server_process,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.conftest import Server

MiB = 1024 * 1024
FUZZ_EXAMPLES = int(os.environ.get("NODEJOB_FUZZ_EXAMPLES", "200"))
"""Examples per hypothesis property; raise it for a longer hunt (``NODEJOB_FUZZ_EXAMPLES``)."""


# -- schemathesis: every operation of /openapi.json -----------------------------------------

SCHEMATHESIS_CONFIG = """
# What a schema cannot say: a graph that is a well-formed object may still not run (unknown
# node type, cycle, missing input: 422 naming the node), a start_key must be one the server
# handed out (422 otherwise), and a plain GET of /ws is not a WebSocket upgrade (400).
[[operations]]
include-name = "POST /api/jobs/"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]

[[operations]]
include-name = "GET /api/jobs/"
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]

[[operations]]
include-name = "GET /ws"
checks.positive_data_acceptance.expected-statuses = ["101", "400", "401", "403"]

# The schema declares its links (a new job's id feeds the job operations); inferring links from
# look-alike parameter names would only add false ones (a workflow_id filter as a path id).
[phases.stateful.inference]
algorithms = ["location-headers"]
"""


async def test_schemathesis_finds_no_server_error_and_every_response_conforms(
    tmp_path: Path,
) -> None:
    server = await start_server_process(tmp_path / "home")
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    argv = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {server.token}",
        "--checks",
        "all",
        "--max-examples",
        os.environ.get("NODEJOB_SCHEMATHESIS_EXAMPLES", "40"),
        "--request-timeout",
        "20",
        "--generation-database",
        "none",
        "--no-color",
    ]
    if seed := os.environ.get("NODEJOB_FUZZ_SEED"):
        argv += ["--seed", seed]
    try:
        with trio.fail_after(240):
            result = await trio.run_process(
                argv, capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path
            )
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.get("/health")).json() == {"status": "ok"}
    finally:
        code = await server.stop()
    output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    assert result.returncode == 0, output[-20_000:]
    assert "Test cases:" in output  # it did run
    assert code == 0
    assert "Traceback" not in server.stderr(), server.stderr()
    connection = apsw.Connection(str(server.home / "nodejob.db"))
    try:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        connection.close()


# -- hypothesis: WebSocket frames -------------------------------------------------------------

NODE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # type: (required inputs, optional inputs)
    "nodejob.Input": (("name",), ("value",)),
    "nodejob.Output": (("name", "value"), ()),
    "nodejob.Constant": (("value",), ()),
    "nodejob.Add": (("a", "b"), ()),
    "nodejob.Format": (("template",), ("values",)),
    "nodejob.Sleep": (("seconds",), ("value",)),
    "nodejob.Emit": (("count",), ("size", "interval")),
    "nodejob.Fail": (("message",), ()),
}

# Small numbers keep a valid Sleep or Emit short: the fuzz is after shapes, not load.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.floats(-1, 2, allow_nan=False)
    | st.text(max_size=6)
    | st.sampled_from(["{a}", "{0}", "{a[0]}", "{a.__class__}", "{", "}", "1", "0.01", "name"])
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=10,
)
TYPED_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": st.text(max_size=4),
    "seconds": st.sampled_from([0, 0.01, 0.5, 2]),
    "count": st.integers(0, 3),
    "size": st.integers(0, 50),
    "interval": st.sampled_from([0, 0.001]),
    "template": st.sampled_from(["{a}", "x{a}y", "plain", "{a[0]}", "{a.__class__}", "{", "{b}"]),
    "values": st.dictionaries(st.sampled_from("ab"), json_values, max_size=2),
    "a": st.integers(-3, 3) | st.text(max_size=3),
    "b": st.integers(-3, 3) | st.text(max_size=3),
}


def input_values(name: str) -> st.SearchStrategy[Any]:
    """Mostly the right kind of value for the input, else any JSON value."""
    typed = TYPED_VALUES.get(name, json_values)
    return st.one_of(typed, typed, typed, json_values)


MISTAKES = (
    "drop a required input",
    "an input that does not exist",
    "a duplicate id",
    "an unknown type",
    "an edge from a missing node",
    "an edge back (a cycle)",
    "an edge to a missing handle",
    "a malformed node",
    "a malformed edge",
)


@st.composite
def graphs(draw: st.DrawFn) -> Any:
    """Graphs that could run (standard types, required inputs, edges forward only), often
    with one mistake of every kind validate_graph must catch, now and then not a graph."""
    count = draw(st.integers(0, 5))
    nodes: list[dict[str, Any]] = []
    for index in range(count):
        node_type = draw(st.sampled_from(list(NODE_INPUTS)))
        required, optional = NODE_INPUTS[node_type]
        data = {name: draw(input_values(name)) for name in required}
        for name in optional:
            if draw(st.booleans()):
                data[name] = draw(input_values(name))
        if "name" in data and draw(st.booleans()):
            data["name"] = f"n{index}"  # distinct Output names
        nodes.append({"id": "abcde"[index], "type": node_type, "data": data})
    edges: list[Any] = []
    for target in range(1, count):
        for _ in range(draw(st.integers(0, 2))):
            source = draw(st.integers(0, target - 1))
            required, optional = NODE_INPUTS[nodes[target]["type"]]
            handle = draw(st.sampled_from(required + optional))
            if any(
                e["target"] == nodes[target]["id"] and e["targetHandle"] == handle for e in edges
            ):
                continue  # one edge per input
            edge = {"source": nodes[source]["id"], "target": nodes[target]["id"]}
            edges.append({**edge, "targetHandle": handle})
    mistake = draw(st.sampled_from([None, None, None, *MISTAKES])) if nodes else None
    if mistake is not None:
        node = draw(st.sampled_from(nodes))
        if mistake == "drop a required input":
            node["data"].pop(NODE_INPUTS[node["type"]][0][0], None)
        elif mistake == "an input that does not exist":
            node["data"]["bogus"] = 1
        elif mistake == "a duplicate id":
            nodes.append(dict(node))
        elif mistake == "an unknown type":
            node["type"] = draw(st.sampled_from(["x.Unknown", "", "nodejob.add"]))
        elif mistake == "an edge from a missing node":
            edges.append({"source": "zz", "target": node["id"], "targetHandle": "value"})
        elif mistake == "an edge back (a cycle)" and edges:
            edge = draw(st.sampled_from(edges))
            edges.append({"source": edge["target"], "target": edge["source"], "targetHandle": "a"})
        elif mistake == "an edge to a missing handle":
            edges.append({"source": node["id"], "target": node["id"], "targetHandle": "nope"})
        elif mistake == "a malformed node":
            nodes[nodes.index(node)] = draw(st.sampled_from([None, 1, {"id": 1}, {"id": "q"}]))
        elif mistake == "a malformed edge":
            edges.append(draw(st.sampled_from([None, {}, {"source": 1}, {"source": "a"}])))
    graph: dict[str, Any] = {"nodes": nodes, "edges": edges}
    shapes = st.sampled_from([graph] * 8 + [{"nodes": nodes}, {}])
    return draw(st.one_of(shapes, shapes, shapes, json_values))


def commands(job_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Commands with their own fields (right or wrong types), and anything else."""
    ids = st.one_of(st.sampled_from(job_ids), st.sampled_from(job_ids), st.text(max_size=8))
    run_job = st.fixed_dictionaries(
        {"graph": graphs()},
        optional={
            "workflow_id": st.text(max_size=5) | json_values,
            "params": st.dictionaries(st.text(max_size=4), json_values, max_size=3) | json_values,
            "job_type": st.text(max_size=5) | json_values,
            "execution_strategy": st.sampled_from(["threaded", "bogus", ""]) | json_values,
            "timeout_seconds": st.sampled_from([0.5, 5, 0, -1, "1", True]) | json_values,
            "auth_token": st.text(max_size=8) | json_values,
        },
    )

    def by_job(name: str) -> st.SearchStrategy[dict[str, Any]]:
        data = st.fixed_dictionaries(
            {}, optional={"job_id": ids | json_values, "after_seq": st.integers(-2, 10**20)}
        )
        return st.fixed_dictionaries({"command": st.just(name), "data": data})

    anything = st.fixed_dictionaries(
        {"command": st.sampled_from(["run_job", "reconnect_job", "x"]) | json_values},
        optional={"data": json_values},
    )
    return st.one_of(
        st.fixed_dictionaries({"command": st.just("run_job"), "data": run_job}),
        st.fixed_dictionaries({"command": st.just("run_job"), "data": run_job}),
        by_job("reconnect_job"),
        by_job("cancel_job"),
        by_job("unsubscribe"),
        anything,
    )


def frames(job_ids: list[str]) -> st.SearchStrategy[str | bytes]:
    """Any text, any bytes, any JSON, and (most often) commands."""
    texts = commands(job_ids).map(json.dumps)
    return st.one_of(
        texts,
        texts,
        texts,
        texts,
        texts.map(lambda text: text[: max(1, len(text) // 2)]),  # cut short
        st.text(),
        st.binary(),
        json_values.map(json.dumps),
    )


REPLIES = ("Job started", "Reconnecting to job ", "Job cancelled", "Unsubscribed")
PROBE_ID = "probe-job-that-does-not-exist"


def check_stream_message(message: dict[str, Any]) -> None:
    assert isinstance(message.get("type"), str), message
    assert isinstance(message.get("job_id"), str), message
    assert isinstance(message["seq"], int), message
    assert message["seq"] >= 1, message


def check_reply(reply: dict[str, Any]) -> None:
    """A command reply: an error naming what was wrong, or one of the documented answers."""
    if reply.get("type") == "error":
        assert set(reply) == {"type", "message", "command"}, reply
        assert isinstance(reply["message"], str), reply
        assert reply["message"], reply
        assert reply["message"] != "internal error", reply
        assert reply["command"] is None or isinstance(reply["command"], str), reply
    else:
        assert set(reply) == {"message", "job_id"}, reply
        assert reply["message"].startswith(REPLIES), reply


async def test_websocket_frames_always_get_an_error_or_a_valid_reply(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """Each frame gets exactly one reply, in order, then the connection answers a probe: it
    stays usable. Nothing a frame does is logged as an error or crashes the server (which
    runs in this test's nursery: a crash would fail the test)."""
    caplog.set_level(logging.ERROR, logger="nodejob")
    other_token = await server.add_user("other")
    async with server.client() as http:
        running = (await http.post("/api/jobs/", json={"graph": sleeper()})).json()["id"]
        finished = (await http.post("/api/jobs/", json={"graph": {}})).json()["id"]
    async with server.client(other_token) as http:
        foreign = (await http.post("/api/jobs/", json={"graph": sleeper()})).json()["id"]
    job_ids = [running, finished, foreign]
    started: list[str] = []

    async with await RawWebSocket.open(server.url, server.token) as ws:

        async def one_frame(payload: str | bytes) -> None:
            await ws.send(payload)
            await ws.command("reconnect_job", job_id=PROBE_ID)
            replies: list[dict[str, Any]] = []
            with trio.fail_after(20):
                while len(replies) < 2:
                    message = await ws.receive()
                    if "seq" in message:
                        check_stream_message(message)
                    else:
                        replies.append(message)
            check_reply(replies[0])
            if replies[0].get("message") == "Job started":
                started.append(replies[0]["job_id"])
            assert replies[1] == {
                "type": "error",
                "message": f"Job not found: {PROBE_ID}",
                "command": "reconnect_job",
            }

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(payload=frames(job_ids))
        def fuzz(payload: str | bytes) -> None:
            trio.from_thread.run(one_frame, payload)

        await trio.to_thread.run_sync(fuzz)

    # Every job the fuzz started ends (the long ones once cancelled), and the server still runs
    # jobs for everyone.
    async with await RawWebSocket.open(server.url, server.token) as ws:
        for job_id in [*started, running]:
            await ws.command("cancel_job", job_id=job_id)
            await ws.reply()  # cancelled, or already finished
            await ws.command("reconnect_job", job_id=job_id)
            assert (await ws.reply())["job_id"] == job_id
            with trio.fail_after(30):
                assert (await follow_job(ws, job_id))[-1]["status"] in TERMINAL
    async with await RawWebSocket.open(server.url, other_token) as ws:
        await ws.command("run_job", graph=hello())
        reply = await ws.reply()
        assert (await follow_job(ws, reply["job_id"]))[-1]["status"] == "completed"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# -- hypothesis: graphs -----------------------------------------------------------------------


class CollectingEmitter:
    """Encodes each message as the message log does (so what it refuses, a node fails on)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    def emit(self, message: dict[str, Any]) -> None:
        dumps({"type": message["type"], "job_id": "j", "seq": 1, **message})
        self.messages.append(message)

    async def drain(self) -> None:
        await trio.lowlevel.checkpoint()


async def run_to_the_end(graph: Any, params: dict[str, Any]) -> tuple[str, Any, list[Any]]:
    emitter = CollectingEmitter()
    # Virtual time (MockClock): a Sleep of seconds ends at once, and one that would never end
    # trips this deadline instead of hanging the test.
    with trio.fail_after(24 * 3600):
        try:
            outputs = await run_graph(graph, params, emitter)
        except NodeFailed as exc:
            return "failed", exc, emitter.messages
    return "completed", outputs, emitter.messages


@settings(max_examples=FUZZ_EXAMPLES * 2, deadline=None, database=None)
@given(
    graph=graphs(),
    params=st.dictionaries(st.sampled_from(["a", "name", "value", "x"]), json_values),
)
def test_validate_graph_raises_only_graph_error_and_a_valid_graph_runs_to_the_end(
    graph: Any, params: dict[str, Any]
) -> None:
    try:
        validated = validate_graph(graph, default_registry())
    except GraphError as exc:
        assert str(exc)  # noqa: PT017 - every refusal says what is wrong
        return
    clock = trio.testing.MockClock(autojump_threshold=0)
    status, result, messages = trio.run(run_to_the_end, validated, params, clock=clock)
    by_node: dict[str, list[str]] = {}
    for message in messages:
        if message["type"] == "node_update":
            by_node.setdefault(message["node_id"], []).append(message["status"])
    for node_id, statuses in by_node.items():
        assert statuses[0] == "running", (node_id, statuses)
        assert len(statuses) == 2, (node_id, statuses)
        assert statuses[1] in ("completed", "failed", "cancelled"), (node_id, statuses)
    outputs = {m["output_name"]: m["value"] for m in messages if m["type"] == "output_update"}
    if status == "completed":
        assert set(by_node) == set(validated.nodes)
        assert all(s[1] == "completed" for s in by_node.values())
        assert result == outputs
    else:
        assert isinstance(result, NodeFailed)
        assert by_node[result.node_id][1] == "failed"
        failed = [m for m in messages if m["type"] == "node_update" and m["status"] == "failed"]
        assert failed[0]["error"] == result.message


# -- deep and big JSON ------------------------------------------------------------------------


def nested_text(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


async def test_deeply_nested_json_is_a_clear_4xx_over_rest(server: Server) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    objects = '{"a":' * 100_000 + "1" + "}" * 100_000
    async with server.client() as http:
        for body in (deep, objects, f'{{"graph": {deep}}}', f'{{"graph": {{}}, "params": {deep}}}'):
            response = await http.post(
                "/api/jobs/", content=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 400, response.text
            assert "nested too deeply" in response.json()["detail"] or (
                "recursion" in response.json()["detail"]
            )
        response = await http.put("/api/workflows/deep", content=deep)
        assert response.status_code == 400
        # As deep as the decoder takes: accepted or refused, but never a 5xx, and what was
        # accepted can be read back.
        for depth in (500, 900, 990):
            body = '{"graph": {}, "params": {"x": ' + nested_text(depth) + "}}"
            response = await http.post("/api/jobs/", content=body)
            assert response.status_code in (201, 400), response.text
            if response.status_code == 201:
                job_id = response.json()["id"]
                assert (await http.get(f"/api/jobs/{job_id}")).status_code == 200
                assert (await http.get(f"/api/jobs/{job_id}/messages")).status_code == 200
                assert (await http.get("/api/jobs/", params={"limit": 5})).status_code == 200
        assert (await http.get("/health")).status_code == 200


async def test_deeply_nested_json_is_an_error_reply_over_ws(server: Server) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    async with await RawWebSocket.open(server.url, server.token) as ws:
        for frame in (
            deep,
            '{"command": "run_job", "data": {"graph": ' + deep + "}}",
            '{"command": "run_job", "data": {"graph": {}, "params": {"x": ' + deep + "}}}",
        ):
            await ws.send(frame)
            reply = await ws.reply()
            assert reply["type"] == "error", reply
            assert "nested too deeply" in reply["message"], reply
        # A deep output value: refused by the decoder, or the job runs to its end.
        for depth in (500, 900, 990):
            graph = (
                '{"nodes": [{"id": "c", "type": "nodejob.Constant", "data": {"value": '
                + nested_text(depth)
                + '}}, {"id": "o", "type": "nodejob.Output", "data": {"name": "x"}}],'
                ' "edges": [{"source": "c", "target": "o", "targetHandle": "value"}]}'
            )
            await ws.send('{"command": "run_job", "data": {"graph": ' + graph + "}}")
            reply = await ws.reply()
            if reply.get("type") == "error":
                assert "nested too deeply" in reply["message"], reply
                continue
            stream = await follow_job(ws, reply["job_id"])
            assert stream[-1]["status"] in ("completed", "failed")
            assert [m["seq"] for m in stream] == list(range(1, len(stream) + 1))
        await ws.command("run_job", graph=hello())
        reply = await ws.reply()
        assert (await follow_job(ws, reply["job_id"]))[-1]["status"] == "completed"


async def test_oversized_requests_are_refused_and_the_connection_ends_cleanly(
    server: Server,
) -> None:
    big = b'{"graph": {}, "params": {"x": "' + b"x" * (MiB + 100) + b'"}}'
    async with server.client() as http:
        response = await http.post("/api/jobs/", content=big)
        assert response.status_code == 413
        assert "detail" in response.json()
        response = await http.put("/api/workflows/big", content=big)
        assert response.status_code == 413
        # Odd but well-formed query values: a 4xx or an empty answer, never a 5xx.
        for path, params in [
            ("/api/jobs/", {"limit": "1" * 5000}),
            ("/api/jobs/", {"start_key": "x" * 10_000}),
            ("/api/jobs/", {"start_key": "bmFuOng"}),  # "nan:x"
            ("/api/jobs/nope/messages", {"after_seq": str(10**30)}),
            ("/api/jobs/nope/messages", {"after_seq": "-1"}),
        ]:
            response = await http.get(path, params=params)
            assert 200 <= response.status_code < 500, (path, response.text)
        assert (await http.get("/health")).status_code == 200
    host, port = server.url.removeprefix("http://").split(":")
    # Headers beyond h11's limit (16 KiB): refused before anything is parsed.
    for head in (
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            with trio.fail_after(10):
                try:
                    await stream.send_all(head)
                except trio.BrokenResourceError:
                    continue  # closed on us mid-send: refused all the same
                answer = await stream.receive_some(4096)
        assert answer.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")) or answer == b"", answer


NOT_JSON = ("NaN", "Infinity", "-Infinity")


@pytest.mark.parametrize("constant", NOT_JSON)
async def test_nan_and_infinity_are_refused_over_rest(server: Server, constant: str) -> None:
    """Python's decoder accepts them; echoed back they would make the server's own answers
    invalid JSON for every standard parser."""
    graph = '{"nodes": [{"id": "c", "type": "nodejob.Constant", "data": {"value": ' + constant
    graph += "}}]}"
    async with server.client() as http:
        for body in (
            '{"graph": {}, "params": {"x": ' + constant + "}}",
            '{"graph": ' + graph + "}",
        ):
            response = await http.post(
                "/api/jobs/", content=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 400, response.text
            assert response.json()["detail"] == f"invalid JSON: {constant} is not a JSON value"
        response = await http.put("/api/workflows/w", content='{"graph": ' + graph + "}")
        assert response.status_code == 400


async def test_nan_is_refused_over_ws(server: Server) -> None:
    async with await RawWebSocket.open(server.url, server.token) as ws:
        await ws.send('{"command": "run_job", "data": {"graph": {}, "params": {"x": NaN}}}')
        reply = await ws.reply()
        if reply.get("message") == "Job started":
            await follow_job(ws, reply["job_id"])
    assert reply["type"] == "error", reply


# -- slowloris ---------------------------------------------------------------------------------


async def test_slowloris_clients_are_dropped_and_everyone_else_is_served(tmp_path: Path) -> None:
    """Clients that send their headers a byte at a time and never finish are closed by the
    server (hypercorn's keep-alive timeout covers a request that has not yet arrived), cost
    bounded memory meanwhile, and never hold anyone else up."""
    server = await start_server_process(tmp_path / "home")
    host, port = server.url.removeprefix("http://").split(":")
    slow_clients = 200
    dropped = 0
    before = rss_kib(server.pid)
    peak = before

    async def slowloris(head: bytes, task_status: trio.TaskStatus[None]) -> None:
        nonlocal dropped
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(head)
            task_status.started()
            async with trio.open_nursery() as nursery:

                async def dribble() -> None:
                    try:
                        while True:
                            await trio.sleep(0.5)
                            await stream.send_all(b"a")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass

                nursery.start_soon(dribble)
                try:
                    while await stream.receive_some(4096):
                        pass  # whatever the server says (a 4xx), until it closes
                except trio.BrokenResourceError:
                    pass
                dropped += 1
                nursery.cancel_scope.cancel()

    heads = [
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-",
        b"POST /api/jobs/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Le",
    ]
    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for index in range(slow_clients):
                    await nursery.start(slowloris, heads[index % len(heads)])
                peak = max(peak, rss_kib(server.pid))
                # Meanwhile the server serves others: REST, and a job followed over WebSocket.
                async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
                    with trio.fail_after(10):
                        for _ in range(20):
                            assert (await http.get("/health")).status_code == 200
                        job = (await http.post("/api/jobs/", json={"graph": hello()})).json()
                    async with await RawWebSocket.open(server.url, server.token) as ws:
                        await ws.command("reconnect_job", job_id=job["id"])
                        with trio.fail_after(10):
                            stream = await follow_job(ws, job["id"])
                assert stream[-1]["status"] == "completed"
                peak = max(peak, rss_kib(server.pid))
            # The nursery exits once the server has closed every slow connection.
    finally:
        code = await server.stop()
    assert dropped == slow_clients
    assert code == 0
    grown_mib = (peak - before) / 1024
    assert grown_mib < 64, f"{slow_clients} slow clients grew the server by {grown_mib:.0f} MiB"
    assert "Traceback" not in server.stderr(), server.stderr()


PEER_TIMEOUT_S = 2


async def test_a_reader_that_stopped_reading_is_dropped_and_a_quiet_one_is_not(
    tmp_path: Path,
) -> None:
    """A follower whose socket stays full (it stopped reading: suspended, hung) is dropped
    after NODEJOB_PEER_TIMEOUT_S of zero window, freeing its connection; a quiet follower
    that reads stays; the job goes on and a reattach gets all of it."""
    env = {**os.environ, "NODEJOB_PEER_TIMEOUT_S": str(PEER_TIMEOUT_S)}
    server = await start_server_process(tmp_path / "home", env=env)
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, headers=server.headers) as http,
            await RawWebSocket.open(server.url, server.token) as quiet,
        ):
            stalled = await RawWebSocket.open(server.url, server.token)
            await stalled.command("run_job", graph=emitter_graph(5000, size=8000))
            await poll_until(lambda: open_websockets(http, 2))
            # 40 MB for a reader that reads nothing: the buffers fill, the window closes.
            await poll_until(lambda: open_websockets(http, 1), seconds=120)
            jobs = (await http.get("/api/jobs/", params={"limit": 1})).json()
            await quiet.command("reconnect_job", job_id=jobs[0]["id"])
            stream = await follow_job(quiet, jobs[0]["id"])
            await stalled._stream.aclose()
    finally:
        code = await server.stop()
    assert stream[-1]["status"] == "completed"
    assert [m["seq"] for m in stream] == list(range(1, len(stream) + 1))
    assert code == 0
    assert "Traceback" not in server.stderr(), server.stderr()


@pytest.mark.skipif(shutil.which("iptables") is None, reason="iptables is not installed")
async def test_a_peer_that_vanished_is_dropped(tmp_path: Path) -> None:
    """A follower whose host is gone (its packets dropped by a firewall rule: no FIN, no RST)
    is dropped after NODEJOB_PEER_TIMEOUT_S by keepalive probes, while idle, and by the
    unacknowledged data of its job's stream, while streaming; a live idle one stays."""
    env = {**os.environ, "NODEJOB_PEER_TIMEOUT_S": str(PEER_TIMEOUT_S)}
    server = await start_server_process(tmp_path / "home", env=env)
    port = int(server.url.rsplit(":", 1)[1])
    rules: list[list[str]] = []
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, headers=server.headers) as http,
            await RawWebSocket.open(server.url, server.token) as quiet,
        ):
            idle = await RawWebSocket.open(server.url, server.token)
            streaming = await RawWebSocket.open(server.url, server.token)
            await streaming.command("run_job", graph=emitter_graph(800, interval=0.01))
            job_id = (await streaming.reply())["job_id"]
            await streaming.receive()
            await poll_until(lambda: open_websockets(http, 3))
            for ws in (idle, streaming):
                client_port = ws._stream.socket.getsockname()[1]
                rule = ["INPUT", "-p", "tcp", "-s", "127.0.0.1", "--sport", str(client_port)]
                rule += ["--dport", str(port), "-j", "DROP"]
                if not await iptables("-I", *rule):
                    pytest.skip("iptables cannot add rules here (no CAP_NET_ADMIN?)")
                rules.append(rule)
            await poll_until(lambda: open_websockets(http, 1), seconds=120)
            await quiet.command("reconnect_job", job_id=job_id)
            stream = await follow_job(quiet, job_id)
            await idle._stream.aclose()
            await streaming._stream.aclose()
    finally:
        for rule in rules:
            await iptables("-D", *rule)
        code = await server.stop()
    assert stream[-1]["status"] == "completed"
    assert [m["seq"] for m in stream] == list(range(1, len(stream) + 1))
    assert code == 0
    assert "Traceback" not in server.stderr(), server.stderr()


async def open_websockets(http: httpx.AsyncClient, count: int) -> bool:
    return await metric(http, "nodejob_ws_connections_open") == count


async def iptables(*args: str) -> bool:
    """Run ``iptables -w ARGS``; whether it succeeded."""
    done = await trio.run_process(["iptables", "-w", *args], check=False, capture_stderr=True)
    return done.returncode == 0


async def test_a_closed_socket_mid_stream_harms_no_job(server: Server) -> None:
    """A client that vanishes (no close frame) while its job streams: the job goes on."""
    ws = await RawWebSocket.open(server.url, server.token)
    await ws.command("run_job", graph=emitter_graph(2000))
    job_id = (await ws.reply())["job_id"]
    await ws.receive()
    await ws._stream.aclose()  # gone without a close frame
    async with await RawWebSocket.open(server.url, server.token) as again:
        await again.command("reconnect_job", job_id=job_id)
        stream = await follow_job(again, job_id)
    assert stream[-1]["status"] == "completed"
    assert [m["seq"] for m in stream] == list(range(1, len(stream) + 1))


# -- graphs used here --------------------------------------------------------------------------


def hello() -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "a", "type": "nodejob.Constant", "data": {"value": 2}},
            {"id": "b", "type": "nodejob.Add", "data": {"b": 3}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "sum"}},
        ],
        "edges": [
            {"source": "a", "target": "b", "targetHandle": "a"},
            {"source": "b", "target": "out", "targetHandle": "value"},
        ],
    }


def sleeper(seconds: float = 60) -> dict[str, Any]:
    return {"nodes": [{"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds}}]}


def emitter_graph(count: int, size: int = 20, interval: float = 0) -> dict[str, Any]:
    data = {"count": count, "size": size, "interval": interval}
    return {"nodes": [{"id": "e", "type": "nodejob.Emit", "data": data}]}
