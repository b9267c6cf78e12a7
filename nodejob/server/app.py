"""The app factory and the server's lifespan: store, manager, hypercorn, graceful shutdown.

Start-up reads top to bottom: make the home directory, open the store, make sure the local user
exists, open the manager, build the app, then ``hypercorn.trio.serve`` under ``nursery.start``
so the real bound port (``--port 0``) comes back through ``task_status``. Shutdown runs the other
way: the app closes its own WebSockets with 1001 and ends its event streams, hypercorn drains
HTTP requests, then the manager and the store flush and close. Every error a client can provoke
is ``{"detail": ...}`` with a 4xx status. This module must not import apsw or any execution
backend; it reaches the core only through the manager, the store and the log.
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import hypercorn.config
import hypercorn.trio
import trio
from quart import Response
from quart_schema import QuartSchema, RequestSchemaValidationError
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from nodejob import __version__
from nodejob.config import Config
from nodejob.manager import open_manager
from nodejob.metrics import ServerStats
from nodejob.protocol import EXIT_USAGE, MAX_FRAME_BYTES, dumps
from nodejob.server import rest, sse, ws
from nodejob.server.listen import ListenConfig
from nodejob.server.ws import store_unavailable
from nodejob.store import Store, StoreError

if TYPE_CHECKING:
    import os
    from collections.abc import Awaitable, Callable

    from nodejob.manager import JobExecutionManager

GRACEFUL_TIMEOUT_S: Final = 3.0
"""How long hypercorn waits for open connections once shutdown begins."""
DRAIN_LIMIT_BYTES: Final = 8 * MAX_FRAME_BYTES
"""Unread request body taken in (and dropped) to keep a connection reusable after an early
answer; beyond it the connection is closed instead."""
DRAIN_TIMEOUT_S: Final = 10.0
RETRY_AFTER_S: Final = 2
"""``Retry-After`` (seconds) of a 503 answered while the database refuses writes."""
KEEP_ALIVE_S: Final = 5.0
"""An idle connection, or one whose request head has not fully arrived, is closed after this."""
MAX_HEAD_BYTES: Final = 16 * 1024
"""Request line and headers, at most (h11 answers 431 or 400 beyond)."""
_CLOSE: Final = (b"connection", b"close")

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """Where a started server listens: ``url`` is ``http://HOST:PORT`` with the real port."""

    url: str
    host: str
    port: int


@dataclass(eq=False)
class ServerState:
    """What the routes share: the manager, counters, and the shutdown switch.

    Long-lived handlers (WebSockets, event streams) register a cancel scope with ``track`` so
    that ``begin_shutdown`` can end them promptly instead of letting hypercorn time them out.
    """

    manager: JobExecutionManager
    allowed_origins: tuple[str, ...] = ()
    stats: ServerStats = field(default_factory=ServerStats)
    shutting_down: bool = False
    _scopes: set[trio.CancelScope] = field(default_factory=set)

    def track(self, scope: trio.CancelScope) -> _Tracked:
        """Context manager: ``scope`` is cancelled if shutdown begins while it is registered.

        A scope tracked after shutdown began is cancelled at once.
        """
        return _Tracked(self, scope)

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        for scope in list(self._scopes):
            scope.cancel()


class _Tracked:
    # A plain class rather than @contextmanager: it runs once per event-stream batch.
    __slots__ = ("scope", "state")

    def __init__(self, state: ServerState, scope: trio.CancelScope) -> None:
        self.state, self.scope = state, scope

    def __enter__(self) -> None:
        if self.state.shutting_down:
            self.scope.cancel()
        self.state._scopes.add(self.scope)

    def __exit__(self, *exc: object) -> None:
        self.state._scopes.discard(self.scope)


def create_app(manager: JobExecutionManager) -> QuartTrio:
    """The Quart-Trio app serving REST, SSE and ``/ws`` for ``manager``.

    The returned app holds its ServerState in ``app.extensions["nodejob"]``.
    """
    app = QuartTrio("nodejob")
    app.config["MAX_CONTENT_LENGTH"] = MAX_FRAME_BYTES
    app.url_map.strict_slashes = False  # /api/jobs and /api/jobs/ are the same, no redirect
    QuartSchema(
        app,
        openapi_path="/openapi.json",
        redoc_ui_path=None,
        scalar_ui_path=None,
        swagger_ui_path=None,
        info={"title": "nodejob", "version": __version__},
        security_schemes={"bearer": {"type": "http", "scheme": "bearer"}},
        security=[{"bearer": []}],
        openapi_provider_class=rest.OpenAPI,
    )
    state = ServerState(manager, allowed_origins=tuple(manager.config.allowed_origins))
    app.extensions["nodejob"] = state
    rest.register(app, state)
    sse.register(app, state)
    ws.register(app, state)
    app.register_error_handler(RequestSchemaValidationError, _validation_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(StoreError, _store_error)

    @app.after_request
    async def count(response: Response) -> Response:
        state.stats.http_responses[response.status_code] += 1
        return response

    return app


def json_error(status: int, detail: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        dumps({"detail": detail}),
        status=status,
        content_type="application/json",
        headers=headers,
    )


_DEFAULT_DETAILS: Final = {
    400: "bad request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: f"request body larger than {MAX_FRAME_BYTES} bytes",
    500: "internal server error",
}


async def _http_error(exc: HTTPException) -> Response:
    code = exc.code or 500
    detail = exc.description
    if not detail or detail == type(exc).description:
        detail = _DEFAULT_DETAILS.get(code, exc.name)
    headers: dict[str, str] = {}
    if code == 401:
        headers["WWW-Authenticate"] = "Bearer"
    valid = getattr(exc, "valid_methods", None)
    if code == 405 and valid:
        headers["Allow"] = ", ".join(valid)
    return json_error(code, detail, headers)


async def _store_error(exc: StoreError) -> Response:
    # Locked past the busy timeout, or the disk is full: not the client's fault, and worth
    # retrying. The database's path stays in the server's log.
    _log.error("request failed: %s", exc)
    return json_error(503, store_unavailable(exc), {"Retry-After": str(RETRY_AFTER_S)})


async def _validation_error(exc: RequestSchemaValidationError) -> Response:
    return json_error(422, describe_validation_error(exc.validation_error))


def describe_validation_error(error: Exception) -> str:
    """One line per problem, ``field: message``, from a pydantic (or other) validation error."""
    errors = getattr(error, "errors", None)
    if callable(errors):
        try:
            items = errors()
        except Exception:  # any describable error beats none
            items = None
        if items:
            parts = []
            for item in items:
                where = ".".join(str(p) for p in item.get("loc", ()))
                parts.append(f"{where}: {item.get('msg', 'invalid')}" if where else item["msg"])
            return "; ".join(parts)
    return str(error) or "invalid request"


# -- running it ---------------------------------------------------------------------------


class ServerShim:
    """ASGI wrapper for the app under hypercorn, fixing how the two get along.

    1. hypercorn hands body chunks to the app through a small bounded queue and stops reading
       the socket while it is full, so an app that answers before reading the whole body (401
       before the body, 413 for one over the limit) would leave the connection stuck. Before
       such an early answer, the rest of a body up to ``DRAIN_LIMIT_BYTES`` is read and
       dropped, so the connection stays reusable and the client, still sending, is not cut
       off; a bigger body gets ``Connection: close`` and is drained while hypercorn closes.
    2. hypercorn finishes a response (closes the connection, or readies it for the next
       request) inside the app's last ``send``, and quart-trio cancels that very send when it
       sees the disconnect the same call delivers. The last send therefore runs shielded;
       hypercorn already shields its socket writes, so this adds no new way to block.
    3. With ``send_many`` (see ``ws.install_send_many``), WebSocket scopes get the SEND_MANY
       extension carrying the raw ASGI send, for batched frame writes.
    """

    def __init__(self, app: QuartTrio, *, send_many: bool = False) -> None:
        self.app = app
        self.send_many = send_many

    async def __call__(
        self,
        scope: dict[str, Any],
        receive: Callable[[], Awaitable[dict[str, Any]]],
        send: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> None:
        if scope["type"] == "websocket" and self.send_many:
            extensions = {**(scope.get("extensions") or {}), ws.SEND_MANY: {"send": send}}
            scope = {**scope, "extensions": extensions}
        if scope["type"] != "http":
            await self.app(scope, receive, send)  # type: ignore[arg-type]
            return
        finished = False
        received = 0
        progress = trio.Event()

        async def receive_tracked() -> dict[str, Any]:
            nonlocal finished, received, progress
            event = await receive()
            received += len(event.get("body", b""))
            if event["type"] == "http.disconnect" or not event.get("more_body", False):
                finished = True
            progress.set()
            progress = trio.Event()
            return event

        async def send_fixed(event: dict[str, Any]) -> None:
            if event["type"] == "http.response.start" and not finished:
                # quart-trio's own reader keeps taking the body in while the response is
                # being written; wait for it to reach the end (or the limit).
                with trio.move_on_after(DRAIN_TIMEOUT_S):
                    while not finished and received <= DRAIN_LIMIT_BYTES:
                        await progress.wait()
                if not finished:
                    event = {**event, "headers": [*event.get("headers", ()), _CLOSE]}
            if event["type"] == "http.response.body" and not event.get("more_body", False):
                with trio.CancelScope(shield=True):
                    await send(event)
            else:
                await send(event)

        await self.app(scope, receive_tracked, send_fixed)  # type: ignore[arg-type]
        while not finished:
            await receive_tracked()


def _hypercorn_config(config: Config) -> hypercorn.config.Config:
    hc = ListenConfig()
    hc.peer_timeout_s = config.peer_timeout_s  # dead peers: see server/listen.py
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    hc.websocket_max_message_size = MAX_FRAME_BYTES
    hc.graceful_timeout = GRACEFUL_TIMEOUT_S
    # Slow clients: a connection whose request has not fully arrived (a slowloris sending its
    # head a byte at a time) is closed after KEEP_ALIVE_S, like an idle one; a head is at most
    # MAX_HEAD_BYTES. No read_timeout: it would also cut WebSocket followers that are quiet
    # on purpose. No websocket_ping_interval either: hypercorn's ping task sleeps out its
    # interval after the socket closed, holding every closed connection (and shutdown, up to
    # GRACEFUL_TIMEOUT_S) that long; the kernel watches for dead peers instead (listen.py).
    hc.keep_alive_timeout = KEEP_ALIVE_S
    hc.h11_max_incomplete_size = MAX_HEAD_BYTES
    hc.accesslog = None
    hc.loglevel = "WARNING"
    hc.include_server_header = False
    return hc


async def serve(
    config: Config,
    *,
    task_status: trio.TaskStatus[ServerInfo] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[[], Awaitable[Any]] | None = None,
) -> None:
    """Run the server until ``shutdown_trigger`` returns (forever if None).

    Reports a ServerInfo with the real bound port through ``task_status`` once it accepts
    connections. Then, when the trigger returns, shuts down gracefully: WebSockets close with
    1001, event streams end, in-flight requests get ``GRACEFUL_TIMEOUT_S``, and the manager and
    store flush their writes before this returns.

    Cancellation: cancelling the caller's scope stops everything at once (no 1001 closes);
    committed messages stay committed.
    """
    config.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = await Store.open(config.db_path)
    try:
        await store.ensure_local_user(config.token_path)
        async with open_manager(store, config) as manager:
            app = create_app(manager)
            state: ServerState = app.extensions["nodejob"]

            async def trigger() -> None:
                await (shutdown_trigger or trio.sleep_forever)()
                state.begin_shutdown()

            shim: Any = ServerShim(app, send_many=ws.install_send_many())
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    partial(
                        hypercorn.trio.serve,
                        shim,
                        _hypercorn_config(config),
                        shutdown_trigger=trigger,
                    )
                )
                url = binds[0]
                parts = urlsplit(url)
                assert parts.hostname is not None
                assert parts.port is not None
                task_status.started(ServerInfo(url=url, host=parts.hostname, port=parts.port))
    finally:
        store.close()


def serve_forever(
    *,
    host: str | None = None,
    port: int | None = None,
    home: str | os.PathLike[str] | None = None,
    max_jobs: int | None = None,
    ring_size: int | None = None,
    default_strategy: str | None = None,
    **_: Any,
) -> int:
    """``nodejob serve``: run until SIGINT/SIGTERM, then shut down gracefully; the exit status.

    Prints one line ``nodejob serving on http://HOST:PORT (home: DIR)`` once connections are
    accepted. A second signal stops at once. 2 when the address cannot be bound.
    """
    try:
        config = Config.from_env(
            host=host,
            port=port,
            home=home,
            max_jobs=max_jobs,
            ring_size=ring_size,
            default_strategy=default_strategy,
        )
    except ValueError as exc:
        print(f"nodejob: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = False

    def on_started(info: ServerInfo) -> None:
        nonlocal started
        started = True
        print(f"nodejob serving on {info.url} (home: {config.home})", flush=True)

    try:
        trio.run(_serve_until_signalled, config, on_started)
    except (OSError, StoreError, BaseExceptionGroup) as exc:
        error = _startup_error(exc)
        if started or error is None:
            raise
        if isinstance(error, StoreError):
            print(f"nodejob: {error}", file=sys.stderr)
        else:
            reason = error.strerror or str(error)
            where = f"{config.host}:{config.port}"
            print(f"nodejob: cannot listen on {where}: {reason}", file=sys.stderr)
        return EXIT_USAGE
    return 0


async def _serve_until_signalled(config: Config, on_started: Callable[[ServerInfo], None]) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for _ in signals:
                    if stop.is_set():
                        nursery.cancel_scope.cancel()  # second signal: stop now
                    stop.set()

            async def run(task_status: trio.TaskStatus[ServerInfo]) -> None:
                await serve(config, shutdown_trigger=stop.wait, task_status=task_status)
                nursery.cancel_scope.cancel()  # served and shut down: end the watcher too

            nursery.start_soon(watch)
            on_started(await nursery.start(run))


def _startup_error(exc: BaseException) -> OSError | StoreError | None:
    """The OSError or StoreError in ``exc``, which may be nested in exception groups."""
    if isinstance(exc, OSError | StoreError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _startup_error(inner)
            if found is not None:
                return found
    return None
