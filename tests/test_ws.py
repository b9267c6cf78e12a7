"""The WebSocket protocol of DESIGN.md against a real server: streams, reattach, cancel,
bad input and auth. Uses a bare trio-websocket client so the wire format itself is tested."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from trio_websocket import (
    WebSocketConnection,
    open_websocket_url,
)

from tests.conftest import Server, emitter, example, sleeper

MiB = 1024 * 1024


async def send(ws: WebSocketConnection, command: str, **data: Any) -> None:
    await ws.send_message(json.dumps({"command": command, "data": data}))


async def receive(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(20):
        message: dict[str, Any] = json.loads(await ws.get_message())
    return message


async def until_terminal(ws: WebSocketConnection, job_id: str) -> list[dict[str, Any]]:
    """Stream messages of ``job_id`` up to and including its terminal job_update."""
    out: list[dict[str, Any]] = []
    while True:
        message = await receive(ws)
        if message.get("job_id") != job_id or "seq" not in message:
            continue
        out.append(message)
        if message["type"] == "job_update" and message["status"] in (
            "completed",
            "failed",
            "cancelled",
        ):
            return out


async def start(ws: WebSocketConnection, graph: dict[str, Any], **data: Any) -> str:
    await send(ws, "run_job", graph=graph, **data)
    # Other jobs this connection follows may interleave their messages before the reply.
    while "seq" in (reply := await receive(ws)):
        pass
    assert reply["message"] == "Job started", reply
    assert "seq" not in reply
    job_id: str = reply["job_id"]
    return job_id


def url(server: Server, token: str | None = None) -> str:
    return f"{server.ws_url}?token={token or server.token}"


async def test_a_job_streams_in_order_with_consecutive_seqs(server: Server) -> None:
    async with open_websocket_url(url(server)) as ws:
        job_id = await start(ws, example("hello"))
        stream = await until_terminal(ws, job_id)
    assert [m["seq"] for m in stream] == list(range(1, len(stream) + 1))
    assert [m["type"] for m in stream[:2]] == ["job_update", "job_update"]
    assert [m["status"] for m in stream[:2]] == ["starting", "running"]
    kinds = [m["type"] for m in stream]
    assert kinds.index("output_update") < len(kinds) - 1
    assert "node_update" in kinds
    outputs = [m for m in stream if m["type"] == "output_update"]
    assert outputs == [
        {
            "type": "output_update",
            "job_id": job_id,
            "seq": outputs[0]["seq"],
            "node_id": "out",
            "output_name": "sum",
            "value": 5,
        }
    ]
    assert stream[-1]["status"] == "completed"
    assert stream[-1]["result"] == {"outputs": {"sum": 5}}


async def test_disconnect_and_reattach_many_times_gets_every_message_once(server: Server) -> None:
    graph = emitter(600, size=20, interval=0.002)
    seen: list[dict[str, Any]] = []
    async with open_websocket_url(url(server)) as ws:
        job_id = await start(ws, graph)
        for _ in range(5):
            message = await receive(ws)
            if "seq" in message:
                seen.append(message)
    # Reattach several times, each time reading a few messages then dropping the connection.
    done = False
    while not done:
        async with open_websocket_url(url(server)) as ws:
            await send(ws, "reconnect_job", job_id=job_id, after_seq=seen[-1]["seq"])
            reply = await receive(ws)
            assert reply == {"message": f"Reconnecting to job {job_id}", "job_id": job_id}
            for _ in range(97):
                message = await receive(ws)
                seen.append(message)
                if message["type"] == "job_update" and message["status"] == "completed":
                    done = True
                    break
    seqs = [m["seq"] for m in seen]
    assert seqs == list(range(1, len(seqs) + 1))
    assert sum(m["type"] == "log_update" for m in seen) == 600
    # After the end, a reattach from 0 replays the identical stream.
    async with open_websocket_url(url(server)) as ws:
        await send(ws, "reconnect_job", job_id=job_id, after_seq=0)
        await receive(ws)
        replay = await until_terminal(ws, job_id)
    assert replay == seen


async def test_ring_smaller_than_stream_gives_a_late_reader_a_gap(
    nursery: trio.Nursery, tmp_path
) -> None:
    from tests.conftest import start_server

    server = await start_server(nursery, tmp_path / "home", ring_size=100)
    async with open_websocket_url(url(server)) as ws:
        job_id = await start(ws, emitter(500))
        stream = await until_terminal(ws, job_id)
    last = stream[-1]["seq"]
    async with open_websocket_url(url(server)) as ws:
        await send(ws, "reconnect_job", job_id=job_id, after_seq=3)
        await receive(ws)
        late = await until_terminal(ws, job_id)
    first_kept = last - 100 + 1
    assert late[0] == {
        "type": "gap",
        "job_id": job_id,
        "seq": first_kept - 1,
        "from_seq": 4,
        "to_seq": first_kept - 1,
    }
    assert [m["seq"] for m in late[1:]] == list(range(first_kept, last + 1))
    assert late[1:] == stream[-100:]
    server.scope.cancel()


async def test_one_connection_follows_several_jobs_and_unsubscribes(server: Server) -> None:
    async with open_websocket_url(url(server)) as ws:
        slow = await start(ws, sleeper(30))
        fast = await start(ws, example("hello"))
        await until_terminal(ws, fast)
        await send(ws, "unsubscribe", job_id=slow)
        # Messages of the slow job may still be in flight before the reply.
        while (reply := await receive(ws)).get("seq") is not None:
            pass
        assert reply == {"message": "Unsubscribed", "job_id": slow}
        await send(ws, "cancel_job", job_id=slow)
        assert await receive(ws) == {"message": "Job cancelled", "job_id": slow}
        # Unsubscribed: the connection sees no more of the slow job. Prove it with a third job.
        third = await start(ws, example("hello"))
        tail = await until_terminal(ws, third)
        assert all(m["job_id"] == third for m in tail)


async def test_second_reconnect_replaces_the_cursor(server: Server) -> None:
    async with open_websocket_url(url(server)) as ws:
        job_id = await start(ws, example("hello"))
        first = await until_terminal(ws, job_id)
        await send(ws, "reconnect_job", job_id=job_id, after_seq=2)
        await receive(ws)
        await send(ws, "reconnect_job", job_id=job_id, after_seq=len(first) - 2)
        # Whatever of the first cursor arrived before the second reply, the stream after the
        # second reply is exactly the messages after the new cursor, once.
        while "seq" in (reply := await receive(ws)):
            pass
        assert reply["message"] == f"Reconnecting to job {job_id}"
        again = await until_terminal(ws, job_id)
        assert again == first[-2:]


async def test_cancel_running_and_finished_jobs(server: Server) -> None:
    async with open_websocket_url(url(server)) as ws:
        job_id = await start(ws, sleeper(30))
        while (await receive(ws)).get("status") != "running":
            pass
        await send(ws, "cancel_job", job_id=job_id)
        stream: list[dict[str, Any]] = []
        while True:
            message = await receive(ws)
            if "seq" not in message:
                assert message == {"message": "Job cancelled", "job_id": job_id}
                continue
            stream.append(message)
            if message["type"] == "job_update" and message["status"] == "cancelled":
                break
        await send(ws, "cancel_job", job_id=job_id)
        error = await receive(ws)
        assert error["type"] == "error"
        assert error["message"] == f"Job already finished: {job_id}"


async def test_a_failing_node_fails_the_job_with_its_message(server: Server) -> None:
    graph = {"nodes": [{"id": "f", "type": "nodejob.Fail", "data": {"message": "no luck"}}]}
    async with open_websocket_url(url(server)) as ws:
        job_id = await start(ws, graph)
        stream = await until_terminal(ws, job_id)
    failed_node = [m for m in stream if m["type"] == "node_update" and m["status"] == "failed"]
    assert failed_node[0]["node_id"] == "f"
    assert failed_node[0]["error"] == "no luck"
    assert stream[-1]["status"] == "failed"
    assert stream[-1]["error"] == "no luck"


@pytest.mark.parametrize(
    ("frame", "command", "fragment"),
    [
        ("{not json", None, "invalid JSON"),
        ("[1, 2]", None, "object"),
        ('{"command": "explode", "data": {}}', "explode", "unknown command"),
        ('{"command": "reconnect_job", "data": {}}', "reconnect_job", "job_id"),
        ('{"command": "reconnect_job", "data": {"job_id": 5}}', "reconnect_job", "job_id"),
        (
            '{"command": "reconnect_job", "data": {"job_id": "x", "after_seq": "a"}}',
            "reconnect_job",
            "after_seq",
        ),
        ('{"command": "run_job", "data": {"graph": "nope"}}', "run_job", "graph"),
        (
            '{"command": "run_job", "data": {"graph": {"nodes": [{"id": "a", "type": "x.Y"}]}}}',
            "run_job",
            "node 'a'",
        ),
        ('{"command": "cancel_job", "data": {"job_id": "nope"}}', "cancel_job", "Job not found"),
        ('{"command": "run_job", "data": []}', "run_job", "data"),
    ],
)
async def test_bad_input_gets_an_error_and_the_connection_stays_usable(
    server: Server, frame: str, command: str | None, fragment: str
) -> None:
    async with open_websocket_url(url(server)) as ws:
        await ws.send_message(frame)
        error = await receive(ws)
        assert error["type"] == "error"
        assert error["command"] == command
        assert fragment in error["message"]
        await ws.send_message(b"\x00binary")
        error = await receive(ws)
        assert error["type"] == "error"
        job_id = await start(ws, example("hello"))
        assert (await until_terminal(ws, job_id))[-1]["status"] == "completed"


async def close_code_after_sending(server: Server, payload: str) -> int:
    """Send one text frame over a raw wsproto client and return the server's close code.

    (trio-websocket's client leaks its socket when the server closes it abnormally, which
    ``filterwarnings = error`` turns into a failure, so this speaks wsproto directly.)
    """
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, CloseConnection, Message, Request

    host, port = server.url.removeprefix("http://").split(":")
    connection = WSConnection(ConnectionType.CLIENT)
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        target = f"/ws?token={server.token}"
        await stream.send_all(connection.send(Request(host=host, target=target)))
        with trio.fail_after(20):
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    raise AssertionError("connection closed without a close frame")
                connection.receive_data(data)
                for event in connection.events():
                    if isinstance(event, AcceptConnection):
                        await stream.send_all(connection.send(Message(data=payload)))
                    elif isinstance(event, CloseConnection):
                        return int(event.code)


async def test_oversized_frame_closes_with_1009_and_harms_no_job(server: Server) -> None:
    async with open_websocket_url(url(server)) as follower:
        job_id = await start(follower, sleeper(1))
        assert await close_code_after_sending(server, "x" * (MiB + 10)) == 1009
        assert (await until_terminal(follower, job_id))[-1]["status"] == "completed"


async def handshake_status(server: Server, target: str, headers: dict[str, str]) -> int:
    """Send a raw WebSocket upgrade request and return the HTTP status of the answer.

    (trio-websocket's client leaks its socket when a handshake is refused, which
    ``filterwarnings = error`` turns into a failure, so refusals are checked on the wire.)
    """
    host, port = server.url.removeprefix("http://").split(":")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        with trio.fail_after(10):
            head = await stream.receive_some(4096)
    return int(head.split(b" ", 2)[1])


async def test_bad_token_handshake_is_refused_with_401(server: Server) -> None:
    assert await handshake_status(server, "/ws?token=wrong", {}) == 401
    assert await handshake_status(server, "/ws", {"Authorization": "Bearer wrong"}) == 401
    assert await handshake_status(server, f"/ws?token={server.token}", {}) == 101
    assert await handshake_status(server, "/ws", {}) == 101


async def test_foreign_origin_is_refused(server: Server) -> None:
    evil = {"Origin": "http://evil.example"}
    assert await handshake_status(server, f"/ws?token={server.token}", evil) == 403
    own = {"Origin": server.url}
    assert await handshake_status(server, f"/ws?token={server.token}", own) == 101


async def test_unauthenticated_connection_until_run_job_brings_a_token(server: Server) -> None:
    async with open_websocket_url(server.ws_url) as ws:
        await send(ws, "reconnect_job", job_id="whatever")
        assert await receive(ws) == {
            "type": "error",
            "message": "authentication required",
            "command": "reconnect_job",
        }
        await send(ws, "run_job", graph=example("hello"), auth_token="wrong")
        assert (await receive(ws))["message"] == "authentication required"
        job_id = await start(ws, example("hello"), auth_token=server.token)
        await until_terminal(ws, job_id)
        # The identity sticks to the connection.
        await send(ws, "reconnect_job", job_id=job_id, after_seq=0)
        assert (await receive(ws))["message"] == f"Reconnecting to job {job_id}"


async def test_other_users_jobs_do_not_exist_over_ws(server: Server) -> None:
    other = await server.add_user("mallory")
    async with open_websocket_url(url(server)) as ws:
        job_id = await start(ws, sleeper(30))
    async with open_websocket_url(url(server, token=other)) as ws:
        for command in ("reconnect_job", "cancel_job", "unsubscribe"):
            await send(ws, command, job_id=job_id)
            error = await receive(ws)
            assert error["type"] == "error"
            assert error["message"] == f"Job not found: {job_id}"
    async with server.client() as http:
        assert (await http.get(f"/api/jobs/{job_id}")).json()["status"] == "running"
        await http.post(f"/api/jobs/{job_id}/cancel")


async def test_closing_a_connection_never_affects_the_job(server: Server) -> None:
    async with open_websocket_url(url(server)) as ws:
        job_id = await start(ws, emitter(200, interval=0.001))
    async with open_websocket_url(url(server)) as ws:
        await send(ws, "reconnect_job", job_id=job_id)
        await receive(ws)
        stream = await until_terminal(ws, job_id)
    assert stream[-1]["status"] == "completed"
    assert [m["seq"] for m in stream] == list(range(1, len(stream) + 1))
