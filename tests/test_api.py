"""REST, SSE and auth of DESIGN.md against a real server with real HTTP clients."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import Server, emitter, example, sleeper


async def wait_status(http: Any, job_id: str, *statuses: str) -> dict[str, Any]:
    """Follow the job over the WebSocket until it reaches one of ``statuses``; its row then."""
    token = http.headers["Authorization"].removeprefix("Bearer ")
    ws_url = str(http.base_url).rstrip("/").replace("http://", "ws://") + f"/ws?token={token}"
    async with open_websocket_url(ws_url) as ws:
        await ws.send_message(json.dumps({"command": "reconnect_job", "data": {"job_id": job_id}}))
        with trio.fail_after(30):
            while True:
                message = json.loads(await ws.get_message())
                if message.get("type") == "job_update" and message["status"] in statuses:
                    break
    job: dict[str, Any] = (await http.get(f"/api/jobs/{job_id}")).json()
    return job


async def sse_events(http: Any, job_id: str, **kwargs: Any) -> list[tuple[int, str, dict]]:
    events: list[tuple[int, str, dict]] = []
    with trio.fail_after(30):
        async with http.stream("GET", f"/api/jobs/{job_id}/events", **kwargs) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line == "":
                    if fields:
                        events.append(
                            (int(fields["id"]), fields["event"], json.loads(fields["data"]))
                        )
                    fields = {}
                    continue
                if line.startswith(":"):
                    continue
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return events


async def test_health_needs_no_token_and_everything_else_does(server: Server) -> None:
    async with server.client() as http:
        http.headers.pop("Authorization")
        assert (await http.get("/health")).json() == {"status": "ok"}
        for method, path in [
            ("GET", "/api/jobs/"),
            ("GET", "/api/jobs/x"),
            ("GET", "/api/jobs/running/all"),
            ("POST", "/api/jobs/x/cancel"),
            ("GET", "/api/jobs/x/messages"),
            ("GET", "/api/jobs/x/events"),
            ("GET", "/api/workflows/"),
            ("GET", "/metrics"),
        ]:
            response = await http.request(method, path)
            assert response.status_code == 401, path
            assert "detail" in response.json()
            bad = await http.request(method, path, headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401, path


async def test_post_job_runs_and_lists(server: Server) -> None:
    async with server.client() as http:
        response = await http.post("/api/jobs/", json={"graph": example("hello")})
        assert response.status_code == 201
        job = response.json()
        assert set(job) >= {
            "id",
            "user_id",
            "job_type",
            "status",
            "workflow_id",
            "execution_strategy",
            "params",
            "started_at",
            "finished_at",
            "error",
            "cost",
            "last_seq",
        }
        assert job["status"] == "starting"
        assert job["execution_strategy"] == "threaded"
        done = await wait_status(http, job["id"], "completed")
        assert done["finished_at"].endswith("Z")
        page = (await http.get(f"/api/jobs/{job['id']}/messages")).json()
        assert page["last_seq"] == done["last_seq"]
        assert page["has_more"] is False
        assert [m["seq"] for m in page["messages"]] == list(range(1, done["last_seq"] + 1))
        listed = (await http.get("/api/jobs/")).json()
        assert [j["id"] for j in listed] == [job["id"]]


async def test_list_pagination_with_link_header(server: Server) -> None:
    async with server.client() as http:
        ids = [(await http.post("/api/jobs/", json={"graph": {}})).json()["id"] for _ in range(5)]
        seen: list[str] = []
        url: str | None = "/api/jobs/?limit=2"
        while url:
            response = await http.get(url)
            seen += [j["id"] for j in response.json()]
            link = response.headers.get("link")
            if link is None:
                break
            assert link.startswith(f"<{server.url}/api/jobs/?")
            assert link.endswith('>; rel="next"')
            url = link[1 : link.index(">")]
        assert seen == ids[::-1]
        assert (await http.get("/api/jobs/?limit=1001")).status_code == 422
        assert (await http.get("/api/jobs/?start_key=garbage!")).status_code in (400, 422)


async def test_messages_pagination(server: Server) -> None:
    async with server.client() as http:
        job = (await http.post("/api/jobs/", json={"graph": emitter(50)})).json()
        done = await wait_status(http, job["id"], "completed")
        first = (await http.get(f"/api/jobs/{job['id']}/messages?limit=20")).json()
        assert [m["seq"] for m in first["messages"]] == list(range(1, 21))
        assert (first["last_seq"], first["has_more"]) == (20, True)
        rest = (await http.get(f"/api/jobs/{job['id']}/messages?after_seq=20&limit=1000")).json()
        assert rest["messages"][-1]["seq"] == done["last_seq"]
        assert rest["has_more"] is False


async def test_sse_replays_then_resumes_after_last_event_id(server: Server) -> None:
    async with server.client() as http:
        job = (await http.post("/api/jobs/", json={"graph": emitter(30, interval=0.01)})).json()
        events = await sse_events(http, job["id"])
        assert [e[0] for e in events] == list(range(1, len(events) + 1))
        assert events[-1][1] == "job_update"
        assert events[-1][2]["status"] == "completed"
        assert all(e[1] == e[2]["type"] for e in events)
        resumed = await sse_events(http, job["id"], headers={"Last-Event-ID": "17"})
        assert resumed == events[17:]
        by_query = await sse_events(http, job["id"], params={"after_seq": 25})
        assert by_query == events[25:]


async def test_cancel_over_rest_running_starting_and_finished(
    nursery: trio.Nursery, tmp_path
) -> None:
    from tests.conftest import start_server

    server = await start_server(nursery, tmp_path / "home", max_jobs=1)
    async with server.client() as http:
        running = (await http.post("/api/jobs/", json={"graph": sleeper()})).json()
        waiting = (await http.post("/api/jobs/", json={"graph": sleeper()})).json()
        await wait_status(http, running["id"], "running")
        assert (await http.get(f"/api/jobs/{waiting['id']}")).json()["status"] == "starting"
        unfinished = (await http.get("/api/jobs/running/all")).json()
        assert {j["job_id"] for j in unfinished} == {running["id"], waiting["id"]}
        assert set(unfinished[0]) == {
            "job_id",
            "status",
            "workflow_id",
            "created_at",
            "is_running",
            "is_completed",
        }
        for job in (waiting, running):
            response = await http.post(f"/api/jobs/{job['id']}/cancel")
            assert response.status_code == 200
            assert response.json() == {
                "message": "Job cancelled successfully",
                "job_id": job["id"],
            }
            done = await wait_status(http, job["id"], "cancelled")
            assert done["finished_at"] is not None
        again = await http.post(f"/api/jobs/{running['id']}/cancel")
        assert again.status_code == 409
        assert again.json() == {"detail": f"Job already finished: {running['id']}"}
        assert (await http.post("/api/jobs/nope/cancel")).status_code == 404
        assert (await http.get("/api/jobs/running/all")).json() == []
    server.scope.cancel()


@pytest.mark.parametrize(
    "body",
    [
        {"graph": {"nodes": [{"id": "a", "type": "nodejob.Nope"}]}},
        {"graph": {"nodes": [{"id": "a", "type": "nodejob.Add", "data": {"a": 1}}]}},
        {"graph": "x"},
        {},
        {"graph": {}, "execution_strategy": "quantum"},
    ],
)
async def test_invalid_jobs_are_rejected_before_start(server: Server, body: dict) -> None:
    async with server.client() as http:
        response = await http.post("/api/jobs/", json=body)
        assert response.status_code in (400, 422)
        assert isinstance(response.json()["detail"], str)
        assert (await http.get("/api/jobs/")).json() == []


async def raw_post_status(server: Server, path: str, size: int) -> int:
    """POST a ``size``-byte JSON body over a raw socket; the response's status code.

    (httpx leaves its request-body generator unfinished when the server answers early,
    which trio reports as a ResourceWarning; a raw socket shows the server's behaviour.)
    """
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"graph": "' + b"x" * (size - 13) + b'"}'
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {server.token}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:

        async def push() -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(head + body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(push)
            with trio.fail_after(20):
                answer = await stream.receive_some(4096)
            nursery.cancel_scope.cancel()
    return int(answer.split(b" ", 2)[1])


async def test_bad_bodies_get_json_errors_never_500(server: Server) -> None:
    async with server.client() as http:
        response = await http.post(
            "/api/jobs/", content=b"{nope", headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
        assert "detail" in response.json()
        assert await raw_post_status(server, "/api/jobs/", 2 * 1024 * 1024) == 413
        missing = await http.get("/api/nothing-here")
        assert missing.status_code == 404
        assert "detail" in missing.json()


async def test_other_users_jobs_are_invisible_everywhere(server: Server) -> None:
    other = await server.add_user("mallory")
    async with server.client() as mine, server.client(other) as theirs:
        job = (await mine.post("/api/jobs/", json={"graph": sleeper()})).json()
        job_id = job["id"]
        for path in (
            f"/api/jobs/{job_id}",
            f"/api/jobs/{job_id}/messages",
            f"/api/jobs/{job_id}/events",
        ):
            response = await theirs.get(path)
            assert response.status_code == 404, path
        assert (await theirs.post(f"/api/jobs/{job_id}/cancel")).status_code == 404
        own = job["user_id"]
        assert (await theirs.get("/api/jobs/", params={"user_id": own})).json() == []
        assert (await theirs.get("/api/jobs/running/all", params={"user_id": own})).json() == []
        # A user_id in the body does not make the job someone else's either.
        theirs_job = (await theirs.post("/api/jobs/", json={"graph": {}, "user_id": own})).json()
        assert theirs_job["user_id"] != own
        assert [j["id"] for j in (await mine.get("/api/jobs/")).json()] == [job_id]
        assert (await mine.get(f"/api/jobs/{job_id}")).json()["status"] in (
            "starting",
            "running",
        )
        await mine.post(f"/api/jobs/{job_id}/cancel")


async def test_saved_workflows_are_per_user_and_run_by_id(server: Server) -> None:
    other = await server.add_user("mallory")
    async with server.client() as http, server.client(other) as theirs:
        saved = await http.put(
            "/api/workflows/hello", json={"name": "Hello", "graph": example("hello")}
        )
        assert saved.status_code in (200, 201)
        assert (await http.get("/api/workflows/hello")).json()["name"] == "Hello"
        assert [w["id"] for w in (await http.get("/api/workflows/")).json()] == ["hello"]
        assert (await theirs.get("/api/workflows/hello")).status_code == 404
        assert (await theirs.get("/api/workflows/")).json() == []
        job = (await http.post("/api/jobs/", json={"workflow_id": "hello"})).json()
        done = await wait_status(http, job["id"], "completed")
        assert done["workflow_id"] == "hello"
        assert done["result"] == {"outputs": {"sum": 5}} or done.get("result") is None
        refused = await theirs.post("/api/jobs/", json={"workflow_id": "hello"})
        assert refused.status_code == 404


async def test_metrics_and_openapi(server: Server) -> None:
    async with server.client() as http:
        job = (await http.post("/api/jobs/", json={"graph": example("hello")})).json()
        await wait_status(http, job["id"], "completed")
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert "nodejob_" in metrics.text
        spec = (await http.get("/openapi.json")).json()
        assert spec["openapi"].startswith("3.")
        for path in (
            "/api/jobs/",
            "/api/jobs/{job_id}",
            "/api/jobs/running/all",
            "/api/jobs/{job_id}/cancel",
            "/api/jobs/{job_id}/messages",
            "/api/jobs/{job_id}/events",
            "/api/workflows/{workflow_id}",
            "/api/workflows/",
            "/health",
            "/metrics",
        ):
            assert path in spec["paths"], path


async def test_null_optional_fields_of_a_run_mean_their_defaults_and_the_schema_says_so(
    server: Server,
) -> None:
    """schemathesis found this: ``params: null`` was accepted (as ``{}``, the WebSocket's
    reading of null) while /openapi.json said params must be an object."""
    from jsonschema import Draft202012Validator

    body = {
        "graph": {"edges": []},
        "params": None,
        "job_type": None,
        "resources": None,
        "execution_strategy": None,
        "timeout_seconds": None,
        "workflow_id": None,
    }
    async with server.client() as http:
        spec = (await http.get("/openapi.json")).json()
        run_job = spec["paths"]["/api/jobs/"]["post"]["requestBody"]["content"]
        schema = {**run_job["application/json"]["schema"], "components": spec["components"]}
        assert list(Draft202012Validator(schema).iter_errors(body)) == []
        assert list(Draft202012Validator(schema).iter_errors({**body, "params": []})) != []
        response = await http.post("/api/jobs/", json=body)
        assert response.status_code == 201, response.text
        job = response.json()
        assert (job["params"], job["job_type"], job["execution_strategy"]) == (
            {},
            "workflow",
            "threaded",
        )
        assert (await wait_status(http, job["id"], "completed"))["status"] == "completed"
        response = await http.post("/api/jobs/", json={**body, "params": []})
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == "params must be an object"


@pytest.mark.parametrize(
    ("path", "query", "problem"),
    [
        ("/api/jobs/", "?foo=1", "foo: Extra inputs are not permitted"),
        ("/api/jobs/", "?limit=5.0", "limit: Value error, must be a whole number"),
        ("/api/jobs/", "?limit=%2B5", "limit: Value error, must be a whole number"),
        ("/api/jobs/", "?limit=5&limit=6", "limit: Input should be a valid integer"),
        ("/api/jobs/", "?workflow_id=a&workflow_id=b", "workflow_id: Input should be a valid"),
        ("{job}/messages", "?afterseq=5", "afterseq: Extra inputs are not permitted"),
        ("{job}/messages", "?after_seq=0.0", "after_seq: Value error, must be a whole number"),
        ("{job}/messages", "?after_seq=%201", "after_seq: Value error, must be a whole number"),
        ("{job}/messages", "?limit=1_0", "limit: Value error, must be a whole number"),
        ("{job}/events", "?after_seq=0.0", "after_seq: Value error, must be a whole number"),
        ("{job}/events", "?after_seq=1&token=a&token=b", "token: Input should be a valid"),
        ("{job}/events", "?after=1", "after: Extra inputs are not permitted"),
    ],
)
async def test_a_query_parameter_the_schema_does_not_declare_or_allow_is_a_422(
    server: Server, path: str, query: str, problem: str
) -> None:
    """schemathesis found these taken silently: a mistyped ``after_seq`` would replay a job
    from its start, and ``after_seq=0.0`` was read as 0 though the schema says integer."""
    async with server.client() as http:
        job = (await http.post("/api/jobs/", json={"graph": {}})).json()
        url = path.replace("{job}", f"/api/jobs/{job['id']}") + query
        response = await http.get(url)
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith(problem), response.text
        # What the schema declares still works.
        ok = path.replace("{job}", f"/api/jobs/{job['id']}") + "?limit=5"
        if path.endswith("events"):
            ok = ok.replace("limit=5", "after_seq=0")
        assert (await http.get(ok)).status_code == 200


@pytest.mark.parametrize("value", ["5.0", "+5", "5_0", "x", "-1"])
async def test_last_event_id_must_be_decimal_digits(server: Server, value: str) -> None:
    async with server.client() as http:
        job = (await http.post("/api/jobs/", json={"graph": {}})).json()
        await wait_status(http, job["id"], "completed")
        events = f"/api/jobs/{job['id']}/events"
        response = await http.get(events, headers={"Last-Event-ID": value})
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == (
            "Last-Event-ID must be a whole number written in decimal digits"
        )
        # Past the end: nothing more (a reader already past the last seq of a finished job).
        response = await http.get(events, headers={"Last-Event-ID": "9" * 30})
        assert (response.status_code, response.text) == (200, "")
