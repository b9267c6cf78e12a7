"""Security review, as tests (issue 7).

- Tokens are stored hashed: no plaintext token anywhere in the database files, and knowing a
  stored hash (someone read the database) grants nothing.
- The home is 0700, the token file and the database files 0600, whatever the umask.
- WebSocket Origins: the server's own, plus NODEJOB_ALLOWED_ORIGINS, and nothing else.
- Jobs never receive the server's token or environment secrets: a threaded graph has no way to
  read them, a subprocess worker runs with a scrubbed environment.
- No path in a request reaches a file: ids with ``../``, ``%2e%2e``, NUL bytes or 100k
  characters are 404/405/422, and nothing outside NODEJOB_HOME is created or changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import TYPE_CHECKING, Any

import apsw
import httpx
import trio

from nodejob.config import Config
from nodejob.store import hash_token
from tests.conftest import start_server
from tests.hardening import (
    TERMINAL,
    RawWebSocket,
    WsRefused,
    follow_job,
    poll_until,
    start_server_process,
)

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from tests.conftest import Server


def database_bytes(home: Path) -> bytes:
    """Everything SQLite keeps on disk for the home's database (file, WAL, shared memory)."""
    return b"".join(
        path.read_bytes() for path in sorted(home.glob("nodejob.db*")) if path.is_file()
    )


# -- tokens ---------------------------------------------------------------------------------


async def test_tokens_are_stored_hashed_and_a_stolen_hash_grants_nothing(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    server = await start_server(nursery, tmp_path / "home")
    other = await server.add_user("bob")
    # Use both tokens every way a token can travel: header, ?token=, run_job's auth_token.
    async with server.client(other) as http:
        assert (await http.post("/api/jobs/", json={"graph": {}})).status_code == 201
    async with await RawWebSocket.open(server.url) as ws:
        await ws.command("run_job", graph={}, auth_token=server.token)
        job_id = (await ws.reply())["job_id"]
        await follow_job(ws, job_id)
    async with await RawWebSocket.open(server.url, other) as ws:
        await ws.command("run_job", graph={}, params={"note": "hello"})
        await follow_job(ws, (await ws.reply())["job_id"])

    stored = database_bytes(server.config.home)
    for token in (server.token, other):
        assert token.encode() not in stored
        assert hash_token(token) == hashlib.sha256(token.encode()).hexdigest()
        assert hash_token(token).encode() in stored  # what is stored instead

    # Whoever reads the database learns the hashes; a hash is not a token.
    connection = apsw.Connection(str(server.config.db_path))
    try:
        hashes = [str(row[0]) for row in connection.execute("SELECT token_hash FROM users")]
    finally:
        connection.close()
    assert len(hashes) == 2
    async with httpx.AsyncClient(base_url=server.url) as http:
        for stolen in hashes:
            response = await http.get("/api/jobs/", headers={"Authorization": f"Bearer {stolen}"})
            assert response.status_code == 401
        # Near misses fail the same way as strangers (one answer, whatever is wrong).
        token = server.token
        for wrong in (
            token[:-1],
            token + "x",
            token[:-1] + ("A" if token[-1] != "A" else "B"),
            token.upper(),
            "x" * 8000,
            token + "\u00e9",
        ):
            value = f"Bearer {wrong}".encode()
            response = await http.get("/api/jobs/", headers={b"Authorization": value})
            assert response.status_code == 401, wrong
            assert response.json()["detail"] in ("invalid token", "missing token")
    server.scope.cancel()


# -- file modes -----------------------------------------------------------------------------


async def test_home_is_0700_and_token_and_database_files_are_0600_whatever_the_umask(
    tmp_path: Path,
) -> None:
    home = tmp_path / "fresh" / "home"
    old = os.umask(0)  # the most permissive umask: modes must not depend on it
    try:
        server = await start_server_process(home)
    finally:
        os.umask(old)
    try:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
            assert (await http.post("/api/jobs/", json={"graph": {}})).status_code == 201
        modes = {
            path.name: stat.S_IMODE(path.stat().st_mode)
            for path in [home, *home.iterdir()]
            if path.name != "jobs"
        }
    finally:
        assert await server.stop() == 0
    assert modes.pop("home") == 0o700
    assert modes.pop("token") == 0o600
    assert modes.pop("nodejob.db") == 0o600
    # SQLite gives its side files the database file's mode.
    assert modes == dict.fromkeys(modes, 0o600)
    assert set(modes) <= {"nodejob.db-wal", "nodejob.db-shm"}


# -- WebSocket origins ----------------------------------------------------------------------


async def handshake(server_url: str, token: str, origin: str | None) -> int:
    headers = {"Origin": origin} if origin is not None else {}
    try:
        ws = await RawWebSocket.open(server_url, token, headers=headers)
    except WsRefused as refused:
        return refused.status
    await ws.aclose()
    return 101


def test_nodejob_allowed_origins_is_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NODEJOB_ALLOWED_ORIGINS", " https://app.example ,http://localhost:5173,,")
    assert Config.from_env().allowed_origins == ("https://app.example", "http://localhost:5173")
    monkeypatch.setenv("NODEJOB_ALLOWED_ORIGINS", "")
    assert Config.from_env().allowed_origins == ()
    monkeypatch.delenv("NODEJOB_ALLOWED_ORIGINS")
    assert Config.from_env().allowed_origins == ()


async def test_only_the_servers_own_and_the_configured_origins_may_open_a_websocket(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "NODEJOB_ALLOWED_ORIGINS": "https://app.example,http://localhost:5173"}
    server = await start_server_process(tmp_path / "home", env=env)
    port = server.url.rsplit(":", 1)[1]
    try:
        cases = {
            None: 101,  # not a browser
            server.url: 101,  # the server's own page
            f"http://localhost:{port}": 101,  # ... by its loopback name
            "https://app.example": 101,  # configured
            "HTTPS://APP.EXAMPLE:443": 101,  # the same origin, spelt otherwise
            "http://localhost:5173": 101,  # configured
            "https://app.example:8443": 403,  # another port is another origin
            "http://app.example": 403,  # another scheme too
            "https://evil.example": 403,
            "https://app.example.evil.example": 403,
            "http://localhost:5174": 403,
            "null": 403,  # sandboxed frames, file:// pages
            "": 403,
        }
        for origin, status in cases.items():
            assert await handshake(server.url, server.token, origin) == status, origin
    finally:
        assert await server.stop() == 0


# -- jobs and secrets -----------------------------------------------------------------------


async def test_a_threaded_graph_cannot_read_the_token(server: Server) -> None:
    """Nothing in a graph reaches the token: params are only what the client sent, Input reads
    only params, Format sees only the JSON values it was given. (Plug-in node code runs in the
    server process and is trusted like the server itself: docs/guarantees.md.)"""
    probes = ["token", "auth_token", "NODEJOB_TOKEN", "HOME", "secret"]
    templates = [
        "{v.__class__}",
        "{v.__class__.__mro__}",
        "{v.__class__.__mro__[1].__subclasses__}",
        "{v.__doc__}",
        "{v.__init__}",
    ]
    nodes: list[dict[str, Any]] = []
    edges: list[dict[str, Any]] = []
    for index, name in enumerate(probes):
        nodes.append({"id": f"i{index}", "type": "nodejob.Input", "data": {"name": name}})
        nodes.append({"id": f"o{index}", "type": "nodejob.Output", "data": {"name": name}})
        edges.append({"source": f"i{index}", "target": f"o{index}", "targetHandle": "value"})
    for index, template in enumerate(templates):
        data = {"template": template, "values": {"v": "x"}}
        nodes.append({"id": f"f{index}", "type": "nodejob.Format", "data": data})
    async with await RawWebSocket.open(server.url, server.token) as ws:
        await ws.command("run_job", graph={"nodes": nodes, "edges": edges})
        job_id = (await ws.reply())["job_id"]
        stream = await follow_job(ws, job_id)
    async with server.client() as http:
        row = (await http.get(f"/api/jobs/{job_id}")).text
        page = (await http.get(f"/api/jobs/{job_id}/messages")).text
    text = json.dumps(stream) + row + page
    assert server.token not in text
    assert hash_token(server.token) not in text
    assert stream[-1]["status"] in TERMINAL
    outputs = stream[-1].get("result", {}).get("outputs", {})
    assert all(outputs.get(name) is None for name in probes), outputs


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as file:
        entries = file.read().split(b"\0")
    return dict(e.decode(errors="replace").partition("=")[::2] for e in entries if e)


def processes_of_job(job_id: str) -> dict[int, tuple[dict[str, str], bytes]]:
    """Live processes whose environment names the job: (environment, command line) by pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = environ_of(int(entry))
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                cmdline = file.read()
        except OSError:
            continue
        if environ.get("NODEJOB_JOB_ID") == job_id:
            found[int(entry)] = (environ, cmdline)
    return found


async def test_a_subprocess_worker_gets_a_scrubbed_environment(tmp_path: Path) -> None:
    """The server has the token and a secret in its environment; the worker has neither (only
    variables named in NODEJOB_WORKER_ENV are passed on, and SECRET is not one of them)."""
    home = tmp_path / "home"
    # The token comes from the token file: start once to create it, then again with it in env.
    first = await start_server_process(home)
    token = first.token
    assert await first.stop() == 0
    env = {
        **os.environ,
        "NODEJOB_TOKEN": token,
        "SECRET_API_KEY": "hunter2-do-not-leak",
        "NODEJOB_WORKER_ENV": "HARMLESS_SETTING",
        "HARMLESS_SETTING": "passed on by request",
    }
    server = await start_server_process(home, env=env)
    workers: dict[int, tuple[dict[str, str], bytes]] = {}
    try:
        async with await RawWebSocket.open(server.url, server.token) as ws:
            graph = {"nodes": [{"id": "s", "type": "nodejob.Sleep", "data": {"seconds": 60}}]}
            await ws.command("run_job", graph=graph, execution_strategy="subprocess")
            job_id = (await ws.reply())["job_id"]
            stream: list[dict[str, Any]] = []
            with trio.fail_after(30):
                while not any(m["type"] == "node_progress" for m in stream):  # the worker runs
                    stream.append(await ws.receive())

            async def found() -> bool:
                workers.update(processes_of_job(job_id))
                return len(workers) >= 1

            await poll_until(found)
            await ws.command("cancel_job", job_id=job_id)
            with trio.fail_after(30):
                assert (await follow_job(ws, job_id, stream))[-1]["status"] == "cancelled"
    finally:
        assert await server.stop() == 0
    assert processes_of_job(job_id) == {}  # cancelled: the worker is gone
    assert workers
    for environ, cmdline in workers.values():
        assert "NODEJOB_TOKEN" not in environ
        assert "SECRET_API_KEY" not in environ
        assert environ.get("HARMLESS_SETTING") == "passed on by request"
        everything = json.dumps(environ) + cmdline.decode(errors="replace")
        assert token not in everything
        assert "hunter2" not in everything


# -- paths ----------------------------------------------------------------------------------

HOSTILE_IDS = [
    "..",
    "../token",
    "../../etc/passwd",
    "..%2F..%2Ftoken",
    "%2e%2e",
    "%2e%2e%2f%2e%2e%2fsecret",
    "%252e%252e%252fsecret",
    "..%5c..%5csecret",
    "a%00b",
    "%00",
    "secret%00.json",
    "x" * 10_000,
    "%C0%AE%C0%AE%2Fsecret",  # overlong UTF-8 dots
    "nodejob.db",
    "token",
]


def snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file and directory under ``root`` except ``skip``'s tree."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath.startswith(str(skip)):
            dirnames[:] = []
            continue
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            if path.startswith(str(skip)):
                continue
            info = os.lstat(path)
            out[path] = (info.st_size, info.st_mtime_ns)
    return out


async def test_no_id_in_a_request_reaches_a_file_inside_or_outside_home(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    (tmp_path / "secret").write_text("outside home")
    (tmp_path / "secret.json").write_text("{}")
    server = await start_server(nursery, tmp_path / "home")
    home = server.config.home
    before = snapshot(tmp_path, home)
    token_before = (home / "token").read_bytes()
    statuses: set[int] = set()
    saved: set[str] = set()
    async with server.client() as http:
        for raw in HOSTILE_IDS:
            for method, path in [
                ("GET", f"/api/jobs/{raw}"),
                ("GET", f"/api/jobs/{raw}/messages"),
                ("GET", f"/api/jobs/{raw}/events"),
                ("POST", f"/api/jobs/{raw}/cancel"),
                ("GET", f"/api/workflows/{raw}"),
                ("PUT", f"/api/workflows/{raw}"),
            ]:
                response = await http.request(method, path, json={"graph": {}})
                statuses.add(response.status_code)
                if method == "PUT" and response.status_code == 200:
                    # A workflow id is a database key, never a file name: it reads back as is.
                    saved.add(response.json()["id"])
                    fetched = await http.get(f"/api/workflows/{raw}")
                    assert fetched.json()["id"] in saved
                    continue
                assert response.status_code in (404, 405, 414, 422, 431), (method, path[:80])
        response = await http.get(
            f"/api/jobs/{'a' * 32}/events", headers={"Last-Event-ID": "../../secret"}
        )
        assert response.status_code in (404, 422)
    async with await RawWebSocket.open(server.url, server.token) as ws:
        for raw in [*HOSTILE_IDS, "y" * 100_000, "a\x00b", "../" * 1000]:
            for command in ("reconnect_job", "cancel_job", "unsubscribe"):
                await ws.command(command, job_id=raw)
                reply = await ws.reply()
                assert reply["type"] == "error", reply
            await ws.command("run_job", workflow_id=raw)
            reply = await ws.reply()
            if raw in saved:  # runs that saved workflow, found by its key
                assert reply["message"] == "Job started", reply
            else:
                assert reply["type"] == "error", reply
    # Raw requests: a NUL byte or a traversal in the request line itself.
    host, port = server.url.removeprefix("http://").split(":")
    for target in (
        b"/api/jobs/a\x00b",
        b"/../../secret",
        b"/api/jobs/../../../secret",
        b"/api/jobs/" + b"z" * 100_000,
    ):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            await stream.send_all(request + server.token.encode() + b"\r\n\r\n")
            with trio.fail_after(10):
                head = await stream.receive_some(4096)
        assert head.split(b" ", 2)[1] in (b"400", b"404", b"414", b"431"), head
    assert snapshot(tmp_path, home) == before
    assert (tmp_path / "secret").read_text() == "outside home"
    assert (home / "token").read_bytes() == token_before
    assert {p.name for p in home.iterdir()} <= {
        "nodejob.db",
        "nodejob.db-wal",
        "nodejob.db-shm",
        "token",
    }
    assert statuses <= {200, 404, 405, 414, 422, 431}, statuses
    server.scope.cancel()
