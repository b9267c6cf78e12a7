"""How the client reaches a nodejob server: shared by the REST `Client` and the `JobStream`.

Holds the errors both raise (`ClientError`, `ConnectError`), the WebSocket endpoint of a server
URL (`ws_url`) and one owned WebSocket connection (`open_websocket`), with the mapping of
connection and handshake failures to those errors. The public import path of all of it is
``nodejob.client``.

This module imports only the standard library, trio, trio_websocket and nodejob.protocol:
never nodejob.client or nodejob.jobstream (they import it), httpx, the server, the store,
apsw or quart.
"""

from __future__ import annotations

import math
import ssl
import urllib.parse
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final

import trio
import trio_websocket

from nodejob import protocol

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

CONNECT_TIMEOUT_S: Final = 10.0
"""Bound on opening TCP, and separately on the WebSocket handshake."""
CLOSE_TIMEOUT_S: Final = 2.0
MAX_RECEIVE_BYTES: Final = protocol.MAX_FRAME_BYTES * 16
"""Server frames may carry large outputs; a frame over this closes the socket (1009)."""


class ClientError(Exception):
    """The server refused a request (``status`` is its HTTP status, None for a WebSocket error
    reply) or could not be reached (`ConnectError`). ``detail`` is one line for humans."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ConnectError(ClientError):
    """The server could not be reached or the connection was lost for good."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(None, f"cannot connect to {url}: {reason}")
        self.url = url
        self.reason = reason


def ws_url(http_url: str) -> str:
    """The WebSocket endpoint of a server: ``http://h:p`` -> ``ws://h:p/ws`` (https -> wss)."""
    parts = urllib.parse.urlsplit(http_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws", "", ""))


@asynccontextmanager
async def open_websocket(
    url: str,
    display_url: str,
    *,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
    max_message_size: int = MAX_RECEIVE_BYTES,
) -> AsyncIterator[Any]:
    """A trio_websocket client connection over a TCP stream that this function owns.

    Used by the CLI/TUI client and by the Ray strategy's log tail. A refused handshake raises
    trio_websocket's ConnectionRejected; see ``rejection_error``.

    trio-websocket 0.12's own ``open_websocket_url`` leaves the socket to the garbage
    collector after a server-side close or a refused handshake (a ResourceWarning, an error
    under ``-W error``); owning the stream lets us always close it.

    Resource handling: on exit, closes the WebSocket (code 1000, bounded by CLOSE_TIMEOUT_S)
    and then the TCP stream, also when cancelled.
    """
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = host if port in (80, 443) else f"{host}:{port}"
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    try:
        with trio.fail_after(CONNECT_TIMEOUT_S):
            if secure:
                stream = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=ssl.create_default_context(), https_compatible=True
                )
            else:
                stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise ConnectError(display_url, "timed out") from None
    except OSError as exc:
        raise ConnectError(display_url, exc.strerror or str(exc)) from None
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(CONNECT_TIMEOUT_S):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        host_header,
                        resource,
                        extra_headers=extra_headers,
                        max_message_size=max_message_size,
                    )
            except trio.TooSlowError:
                raise ConnectError(display_url, "WebSocket handshake timed out") from None
            try:
                yield ws
            finally:
                # Once cancelled, trio_websocket's reader is cancelled too and could never see
                # the server's close reply: then just drop the TCP connection (harmless to jobs).
                if trio.current_effective_deadline() != -math.inf:
                    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                        await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise single_exception(group) from None
    finally:
        await trio.aclose_forcefully(stream)


def failure_reason(exc: BaseException) -> str:
    """One line for why a connection attempt failed: the OS error behind ``exc``, if any."""
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return str(exc) or type(exc).__name__


def rejection_error(exc: Any) -> ClientError:
    """The `ClientError` for a refused handshake (``trio_websocket.ConnectionRejected``):
    the HTTP status, and the server's ``detail`` when its body has one."""
    detail = f"WebSocket handshake refused with HTTP {exc.status_code}"
    try:
        body = protocol.loads(exc.body or b"")
        if isinstance(body, dict) and isinstance(body.get("detail"), str):
            detail = body["detail"]
    except ValueError:
        pass
    return ClientError(int(exc.status_code), detail)


def single_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one leaf of a group of a single exception, else the group itself."""
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    return leaf
