"""Helpers for the TUI tests: a real server process, the asyncio runner, condition waits.

pytest-trio's ``trio_mode`` runs every ``async def`` test under trio, and Textual needs asyncio.
So the TUI tests are plain functions that call `run_app`, which drives ``app.run_test()`` under
``asyncio.run``; the app itself hosts trio as a guest (tui/guest.py). The server runs in its own
process (as a user runs it), so a test can stop and restart it on the same port. Nothing is
mocked, and waits are on conditions (`wait_for`) bounded by a timeout, never bare sleeps.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Final

import trio

from nodejob.client import Client, open_job_stream
from nodejob.protocol import is_terminal_update

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from textual.pilot import Pilot
    from textual.widgets import DataTable

    from nodejob_tui.app import NodejobApp

START_TIMEOUT_S: Final = 30.0
WAIT_S: Final = 20.0
SIZE: Final = (120, 36)
_URL: Final = re.compile(r"http://[0-9.]+:[0-9]+")


def _read_line(pipe: IO[bytes], timeout: float) -> str:
    """One line from ``pipe``, or "" if none came within ``timeout`` (or it closed)."""
    ready, _, _ = select.select([pipe], [], [], timeout)
    return pipe.readline().decode(errors="replace") if ready else ""


@dataclass
class ServerProcess:
    """``python -m nodejob serve`` on 127.0.0.1; `stop` and `start` keep home and port."""

    home: Path
    log: Path
    port: int = 0
    url: str = ""
    token: str = ""
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    _files: list[Any] = field(default_factory=list)

    def start(self) -> None:
        """Start the server and wait for its "serving on http://..." line."""
        self.starts += 1
        errors = self.log.with_suffix(f".{self.starts}.err").open("wb")
        self._files.append(errors)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nodejob",
                "serve",
                "--port",
                str(self.port),
                "--home",
                str(self.home),
            ],
            stdout=subprocess.PIPE,
            stderr=errors,
        )
        assert self.process.stdout is not None
        line = _read_line(self.process.stdout, START_TIMEOUT_S)
        match = _URL.search(line)
        if match is None:
            self.process.kill()
            self.process.wait()
            self.process.stdout.close()
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = match.group(0)
        self.port = int(self.url.rsplit(":", 1)[1])
        self.token = (self.home / "token").read_text().strip()

    def stop(self) -> None:
        """SIGTERM (graceful shutdown), then wait for the process to end."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def close(self) -> None:
        self.stop()
        for file in self._files:
            file.close()

    def call(self, fn: Callable[[Client], Awaitable[Any]]) -> Any:
        """Run one REST call (a trio client) against the server, outside the TUI."""

        async def main() -> Any:
            async with Client(self.url, self.token) as client:
                return await fn(client)

        return trio.run(main)

    def start_job(self, graph: dict[str, Any], **data: Any) -> str:
        job = self.call(lambda client: client.start_job({"graph": graph, **data}))
        return str(job["id"])

    def wait_finished(self, job_id: str) -> dict[str, Any]:
        """Follow ``job_id`` over the WebSocket until its terminal job_update; its row then."""

        async def main() -> dict[str, Any]:
            with trio.fail_after(WAIT_S):
                async with open_job_stream(self.url, self.token) as stream:
                    await stream.reconnect_job(job_id)
                    async for message in stream.messages():
                        if is_terminal_update(message):
                            break
                async with Client(self.url, self.token) as client:
                    return await client.get_job(job_id)

        return trio.run(main)


def run_app(app: NodejobApp, scenario: Callable[[Pilot[int]], Awaitable[None]]) -> None:
    """Run ``scenario`` against ``app`` (headless, 120x36) on a fresh asyncio loop."""

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await scenario(pilot)

    asyncio.run(main())


async def wait_for(
    pilot: Pilot[Any], condition: Callable[[], Any], what: str, within: float = WAIT_S
) -> None:
    """Let the app run until ``condition()`` holds; fail naming ``what`` after ``within`` s."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await pilot.pause(0.02)


def table_rows(table: DataTable[Any]) -> list[tuple[str, list[str]]]:
    """The rows a DataTable shows, in order: (row key, cell texts)."""
    return [
        (str(row.key.value), [str(cell) for cell in table.get_row(row.key)])
        for row in table.ordered_rows
    ]


def graph(*nodes: dict[str, Any], edges: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"nodes": list(nodes), "edges": edges or []}


def emitter(count: int, interval: float = 0.0) -> dict[str, Any]:
    return graph(
        {
            "id": "e",
            "type": "nodejob.Emit",
            "data": {"count": count, "size": 20, "interval": interval},
        },
        {"id": "out", "type": "nodejob.Output", "data": {"name": "n"}},
        edges=[{"source": "e", "target": "out", "targetHandle": "value"}],
    )


def sleeper(seconds: float = 60.0) -> dict[str, Any]:
    return graph(
        {"id": "nap", "type": "nodejob.Sleep", "data": {"seconds": seconds, "value": 1}},
        {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
        edges=[{"source": "nap", "target": "out", "targetHandle": "value"}],
    )


def write_json(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path
