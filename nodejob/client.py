"""The trio client of a nodejob server: REST (`Client`) and the WebSocket stream (`JobStream`).

Used by the CLI, the TUI and the tests, and their one import path: the REST `Client` lives
here; `JobStream`, `SeqTracker` and `open_job_stream` (nodejob.jobstream) and `ClientError`,
`ConnectError` and `ws_url` (nodejob.connection) are re-exported from here.

This module imports only the standard library, httpx, nodejob.connection and
nodejob.jobstream: never the server, the store, apsw or quart.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any, Self

import httpx

from nodejob.connection import ClientError, ConnectError, ws_url
from nodejob.jobstream import JobStream, SeqTracker, open_job_stream

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator

__all__ = [
    "Client",
    "ClientError",
    "ConnectError",
    "JobStream",
    "SeqTracker",
    "next_start_key",
    "open_job_stream",
    "ws_url",
]

JsonObject = dict[str, Any]


def next_start_key(link_header: str | None) -> str | None:
    """The ``start_key`` of the ``rel="next"`` link in a ``Link`` header, or None."""
    if not link_header:
        return None
    for link in link_header.split(","):
        target, _, params = link.partition(";")
        rels = [p.strip() for p in params.split(";")]
        if 'rel="next"' not in rels and "rel=next" not in rels:
            continue
        query = urllib.parse.urlsplit(target.strip().strip("<>")).query
        values = urllib.parse.parse_qs(query).get("start_key")
        return values[0] if values else None
    return None


def _quote(job_id: str) -> str:
    return urllib.parse.quote(str(job_id), safe="")


class Client:
    """Async REST client (trio). Use as ``async with Client(url, token) as client``.

    Every method raises `ClientError` with the server's ``detail`` on an HTTP error, and
    `ConnectError` when the server cannot be reached.
    """

    def __init__(self, url: str, token: str | None, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise ConnectError(self.url, str(exc) or type(exc).__name__) from None
        except httpx.TimeoutException:
            limit = f"{self._timeout:g} s"
            raise ClientError(
                None, f"{self.url} did not answer {method} {path} in {limit}"
            ) from None
        except httpx.TransportError as exc:
            raise ClientError(None, f"{method} {self.url}{path} failed: {exc!r}") from None
        if response.status_code >= 400:
            raise ClientError(response.status_code, _detail(response))
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ClientError(response.status_code, f"invalid JSON from {path}") from None

    async def health(self) -> JsonObject:
        result: JsonObject = await self._json("GET", "/health")
        return result

    async def start_job(self, data: JsonObject) -> JsonObject:
        """POST /api/jobs/ with ``run_job`` data; returns the new job object."""
        result: JsonObject = await self._json("POST", "/api/jobs/", json=data)
        return result

    async def get_job(self, job_id: str) -> JsonObject:
        result: JsonObject = await self._json("GET", f"/api/jobs/{_quote(job_id)}")
        return result

    async def list_jobs(
        self, *, workflow_id: str | None = None, limit: int = 100, start_key: str | None = None
    ) -> tuple[list[JsonObject], str | None]:
        """One page of jobs, newest first, and the ``start_key`` of the next page (or None)."""
        params: dict[str, str | int] = {"limit": limit}
        if workflow_id is not None:
            params["workflow_id"] = workflow_id
        if start_key is not None:
            params["start_key"] = start_key
        response = await self._request("GET", "/api/jobs/", params=params)
        return response.json(), next_start_key(response.headers.get("link"))

    async def iter_jobs(
        self, *, workflow_id: str | None = None, page_size: int = 100
    ) -> AsyncGenerator[JsonObject, None]:
        """Every job, newest first, following the ``Link: rel="next"`` pagination.

        An async generator: wrap it in ``contextlib.aclosing`` if you may stop early.
        """
        start_key: str | None = None
        while True:
            jobs, start_key = await self.list_jobs(
                workflow_id=workflow_id, limit=page_size, start_key=start_key
            )
            for job in jobs:
                yield job
            if start_key is None or not jobs:
                return

    async def running_jobs(self) -> list[JsonObject]:
        """Every unfinished job: GET /api/jobs/running/all."""
        result: list[JsonObject] = await self._json("GET", "/api/jobs/running/all")
        return result

    async def cancel_job(self, job_id: str) -> JsonObject:
        """Ask for cancellation; 409 (already finished) and 404 raise `ClientError`."""
        result: JsonObject = await self._json("POST", f"/api/jobs/{_quote(job_id)}/cancel")
        return result

    async def messages(self, job_id: str, after_seq: int = 0, limit: int = 1000) -> JsonObject:
        """One page of stored messages: ``{"messages", "last_seq", "has_more"}``."""
        params = {"after_seq": after_seq, "limit": limit}
        path = f"/api/jobs/{_quote(job_id)}/messages"
        result: JsonObject = await self._json("GET", path, params=params)
        return result

    async def put_workflow(self, workflow_id: str, name: str, graph: JsonObject) -> JsonObject:
        body = {"name": name, "graph": graph}
        path = f"/api/workflows/{_quote(workflow_id)}"
        result: JsonObject = await self._json("PUT", path, json=body)
        return result

    async def get_workflow(self, workflow_id: str) -> JsonObject:
        result: JsonObject = await self._json("GET", f"/api/workflows/{_quote(workflow_id)}")
        return result

    async def list_workflows(self) -> list[JsonObject]:
        result: list[JsonObject] = await self._json("GET", "/api/workflows/")
        return result


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return str(body["detail"])
    text = response.text.strip().splitlines()
    return text[0] if text else f"HTTP {response.status_code}"
