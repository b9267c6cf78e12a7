"""Shared fixtures: a real nodejob server on 127.0.0.1:0 with a real SQLite home.

The server runs in the test's own trio nursery (``nursery.start(serve, ...)``), so each test
gets a fresh home and database, and tears the server down when it ends.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio

from nodejob.config import Config
from nodejob.server.app import serve
from nodejob.store import Store

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

EXAMPLES = Path(__file__).parent.parent / "examples"


@dataclass
class Server:
    url: str
    token: str
    config: Config
    scope: trio.CancelScope

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws"

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=self.headers(token), timeout=30)

    async def add_user(self, name: str) -> str:
        store = await Store.open(self.config.db_path)
        try:
            return store.add_user_sync(name)[1]
        finally:
            store.close()


async def start_server(nursery: trio.Nursery, home: Path, **options: Any) -> Server:
    config = Config(home=home, port=0, **options)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await serve(config, task_status=task_status)

    info = await nursery.start(run)
    token = (home / "token").read_text().strip()
    return Server(url=info.url, token=token, config=config, scope=scope)


@pytest.fixture
async def server(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Server]:
    server = await start_server(nursery, tmp_path / "home")
    yield server
    server.scope.cancel()


def example(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((EXAMPLES / f"{name}.json").read_text())
    return data


def sleeper(seconds: float = 30.0) -> dict[str, Any]:
    return {
        "nodes": [
            {"id": "s", "type": "nodejob.Sleep", "data": {"seconds": seconds, "value": 1}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "v"}},
        ],
        "edges": [{"source": "s", "target": "out", "targetHandle": "value"}],
    }


def emitter(count: int, size: int = 100, interval: float = 0) -> dict[str, Any]:
    return {
        "nodes": [
            {
                "id": "e",
                "type": "nodejob.Emit",
                "data": {"count": count, "size": size, "interval": interval},
            },
            {"id": "out", "type": "nodejob.Output", "data": {"name": "n"}},
        ],
        "edges": [{"source": "e", "target": "out", "targetHandle": "value"}],
    }
