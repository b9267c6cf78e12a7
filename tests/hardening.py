"""Helpers of the hardening tests (issue 7): a ``nodejob serve`` process and a bare WebSocket
client that reports close codes.

The client speaks wsproto over a trio socket stream itself: trio-websocket's client leaks its
socket when a server closes abnormally, which ``filterwarnings = error`` turns into failures,
and the tests here need the exact close code (1001 at shutdown, 1009 for a big frame).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import textwrap
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError

from nodejob.protocol import dumps

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    import httpx

TERMINAL = frozenset({"completed", "failed", "cancelled"})


# -- a server process ----------------------------------------------------------------------


@dataclass
class ServerProcess:
    """``python -m nodejob serve`` on a free port; its stderr goes to ``stderr_path``."""

    process: trio.Process
    url: str
    home: Path
    stderr_path: Path

    @property
    def token(self) -> str:
        return (self.home / "token").read_text().strip()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def stop(self, signum: int = signal.SIGTERM, within: float = 30) -> int:
        """Send ``signum`` and wait for the exit status (at most ``within`` seconds)."""
        if self.process.returncode is None:
            self.process.send_signal(signum)
        with trio.fail_after(within):
            return await self.process.wait()


async def start_server_process(
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    stderr_path: Path | None = None,
) -> ServerProcess:
    """Start ``nodejob serve --port 0 --home HOME`` and wait for the line with its URL.

    Its stderr is appended to ``stderr_path`` (default: next to HOME).
    """
    await trio.Path(home.parent).mkdir(parents=True, exist_ok=True)  # the server makes HOME
    stderr_path = stderr_path or home.parent / f"{home.name}-stderr.log"
    with stderr_path.open("ab") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "nodejob", "serve", "--port", "0", "--home", str(home), *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    assert process.stdout is not None
    seen = b""
    try:
        with trio.fail_after(30):
            while b"\n" not in seen:
                chunk = await process.stdout.receive_some(4096)
                if not chunk:
                    raise AssertionError(
                        f"server exited before printing its URL: {stderr_path.read_text()}"
                    )
                seen += chunk
    except BaseException:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
    match = re.search(r"http://[\d.]+:\d+", seen.decode())
    assert match, seen
    return ServerProcess(process, match.group(0), home, stderr_path)


async def poll_until(
    check: Callable[[], Awaitable[bool]], *, seconds: float = 30, interval: float = 0.02
) -> None:
    """Wait until ``check()`` is true, asking every ``interval`` seconds.

    Only for state that another process holds (a server's metrics, /proc, a file), where
    there is no event to wait on; fails after ``seconds``.
    """
    with trio.fail_after(seconds):
        while not await check():  # noqa: ASYNC110 - another process's state: no event exists
            await trio.sleep(interval)


def install_plugin(directory: Path, module: str, source: str, entry_points: dict[str, str]) -> Path:
    """A plug-in distribution in ``directory``: ``module.py`` with ``source`` and its
    ``nodejob.nodes`` entry points (name -> ``module:Class``). Put ``directory`` on a
    server's PYTHONPATH and its nodes exist there, as if pip-installed."""
    name = module.replace("_", "-")
    info = directory / f"{module}-0.dist-info"
    info.mkdir(parents=True)
    (directory / f"{module}.py").write_text(textwrap.dedent(source))
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0\n")
    lines = "".join(f"{key} = {value}\n" for key, value in entry_points.items())
    (info / "entry_points.txt").write_text("[nodejob.nodes]\n" + lines)
    return directory


async def stored_stream(http: httpx.AsyncClient, job_id: str) -> list[str]:
    """The job's stored messages as their JSON text, read over REST in pages of 97 (an odd
    size, so that page edges fall anywhere)."""
    texts: list[str] = []
    after = 0
    while True:
        response = await http.get(
            f"/api/jobs/{job_id}/messages", params={"after_seq": after, "limit": 97}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        texts += [dumps(m) for m in page["messages"]]
        if not page["has_more"]:
            return texts
        after = page["last_seq"]


async def metric(http: httpx.AsyncClient, name: str) -> float:
    """The value of an unlabelled metric on the server's ``/metrics``."""
    text = (await http.get("/metrics")).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"no {name} in /metrics"
    return float(match.group(1))


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process, KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


# -- containers, as the engine lists them --------------------------------------------------


def container_names(client: Any, **filters: Any) -> list[str]:
    """Names of the engine's containers (all states) that match ``filters``, sorted.

    The low-level list, one request: the SDK's ``containers.list`` inspects each container in
    turn and raises NotFound when one is removed between the list and its inspect.
    """
    found = client.api.containers(all=True, filters=filters)
    return sorted(name.lstrip("/") for info in found for name in info["Names"][:1])


def remove_containers(client: Any, **filters: Any) -> list[tuple[str, str]]:
    """Force-remove the containers that match ``filters``; return (name, state) of each removed.

    One that vanished meanwhile (its job, or the product's sweep, removed it) is not an error.
    """
    import docker

    removed = []
    for info in client.api.containers(all=True, filters=filters):
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(info["Id"], force=True)
            removed.append((info["Names"][0].lstrip("/"), info["State"]))
    return sorted(removed)


# -- a bare WebSocket client ---------------------------------------------------------------


class WsClosed(Exception):
    """The connection ended; ``code`` is the server's close code (1006: no close frame)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"closed with {code} {reason}".strip())
        self.code = code
        self.reason = reason


class WsRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"handshake refused with HTTP {status}")
        self.status = status


class RawWebSocket:
    """One client connection to ``/ws``: send frames, read whole messages, see close codes."""

    def __init__(self, stream: trio.SocketStream, connection: WSConnection) -> None:
        self._stream = stream
        self._ws = connection
        self._messages: deque[str | bytes] = deque()
        self._parts: list[str | bytes] = []
        self.close_code: int | None = None
        self.close_reason = ""

    @classmethod
    async def connect(
        cls, url: str, target: str = "/ws", headers: dict[str, str] | None = None
    ) -> RawWebSocket:
        host, port = url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        connection = WSConnection(ConnectionType.CLIENT)
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        try:
            await stream.send_all(
                connection.send(Request(host=f"{host}:{port}", target=target, extra_headers=extra))
            )
            with trio.fail_after(30):
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        raise WsClosed(1006, "closed during the handshake")
                    connection.receive_data(data)
                    for event in connection.events():
                        if isinstance(event, AcceptConnection):
                            client = cls(stream, connection)
                            return client
                        if isinstance(event, RejectConnection):
                            raise WsRefused(event.status_code)
                        if isinstance(event, RejectData):
                            continue
        except BaseException:
            await stream.aclose()
            raise

    @classmethod
    async def open(cls, url: str, token: str | None = None, **kwargs: Any) -> RawWebSocket:
        target = f"/ws?token={token}" if token else "/ws"
        return await cls.connect(url, target, **kwargs)

    async def send(self, payload: str | bytes) -> None:
        """One frame: text for a str, binary for bytes."""
        event = TextMessage(data=payload) if isinstance(payload, str) else BytesMessage(payload)
        await self._stream.send_all(self._ws.send(event))

    async def command(self, command: str, **data: Any) -> None:
        await self.send(json.dumps({"command": command, "data": data}))

    async def get(self) -> str | bytes:
        """The next whole message; raises WsClosed once the server closed the connection."""
        while not self._messages:
            if self.close_code is not None:
                raise WsClosed(self.close_code, self.close_reason)
            try:
                data = await self._stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            if not data:
                self.close_code = self.close_code or 1006
                continue
            self._ws.receive_data(data)
            for event in self._ws.events():
                if isinstance(event, Message):
                    self._parts.append(event.data)
                    if event.message_finished:
                        first = self._parts[0]
                        whole = (
                            "".join(p for p in self._parts if isinstance(p, str))
                            if isinstance(first, str)
                            else b"".join(p for p in self._parts if isinstance(p, bytes))
                        )
                        self._messages.append(whole)
                        self._parts = []
                elif isinstance(event, CloseConnection):
                    self.close_code, self.close_reason = event.code, event.reason or ""
                    await self._send_quietly(event.response())
                elif isinstance(event, Ping):
                    await self._send_quietly(event.response())
        return self._messages.popleft()

    async def receive(self) -> dict[str, Any]:
        message = await self.get()
        assert isinstance(message, str), message
        decoded: dict[str, Any] = json.loads(message)
        return decoded

    async def reply(self) -> dict[str, Any]:
        """The next command reply (a message without ``seq``), skipping stream messages."""
        while "seq" in (message := await self.receive()):
            pass
        return message

    async def _send_quietly(self, event: Any) -> None:
        with contextlib.suppress(
            LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            await self._stream.send_all(self._ws.send(event))

    async def aclose(self) -> None:
        """Close cleanly (1000) if the connection is still open, then drop the socket."""
        try:
            if self.close_code is None:
                await self._send_quietly(CloseConnection(code=1000))
                with trio.move_on_after(5):
                    while True:
                        await self.get()
        except WsClosed:
            pass
        finally:
            await self._stream.aclose()

    async def __aenter__(self) -> RawWebSocket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()


async def follow_job(
    ws: RawWebSocket, job_id: str, messages: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Collect ``job_id``'s stream messages up to its terminal job_update."""
    out = [] if messages is None else messages
    while True:
        message = await ws.receive()
        if message.get("job_id") != job_id or "seq" not in message:
            continue
        out.append(message)
        if message["type"] == "job_update" and message["status"] in TERMINAL:
            return out


def emitter(count: int, size: int = 100, interval: float = 0, delay: float = 0) -> dict[str, Any]:
    """Emit ``count`` log lines; with ``delay``, after sleeping that long first."""
    nodes: list[dict[str, Any]] = [
        {
            "id": "e",
            "type": "nodejob.Emit",
            "data": {"count": count, "size": size, "interval": interval},
        },
        {"id": "out", "type": "nodejob.Output", "data": {"name": "n"}},
    ]
    edges = [{"source": "e", "target": "out", "targetHandle": "value"}]
    if delay:
        # The Sleep hands ``size`` on to the Emit node, which so starts only after it.
        nodes.append(
            {"id": "d", "type": "nodejob.Sleep", "data": {"seconds": delay, "value": size}}
        )
        edges.append({"source": "d", "target": "e", "targetHandle": "size"})
        nodes[0]["data"].pop("size")
    return {"nodes": nodes, "edges": edges}
