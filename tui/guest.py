"""Trio as a guest inside Textual's asyncio loop (``trio.lowlevel.start_guest_run``).

Textual runs on asyncio; nodejob's client runs on trio. In guest mode both loops share the one
thread: trio's I/O waits happen on a helper thread, but every trio task step runs as an asyncio
callback on the main thread. So a trio task may touch plain Python objects the screens read (the
JobStore) without locks, and hands work to Textual with ``App.call_later`` (a message, processed
by the app in its own context). Textual hands work to trio with `TrioGuest.spawn`, which is safe
to call at any time, also before trio has started or after it has stopped.

This module imports trio and asyncio only: nothing of Textual, nothing of the server.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Final

import trio

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import outcome

STOP_TIMEOUT_S: Final = 5.0
"""How long `TrioGuest.stop` waits for trio's tasks to unwind (closing the WebSocket)."""


class TrioGuest:
    """One trio run, hosted by the running asyncio loop, with a nursery for spawned tasks.

    Resource handling: `stop` cancels every task and waits for the run to end; call it before
    the asyncio loop ends, or trio's run is abandoned half-way (its sockets unclosed).
    """

    def __init__(self, on_crash: Callable[[BaseException], None]) -> None:
        self._on_crash = on_crash
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._queued: list[tuple[Callable[..., Awaitable[Any]], tuple[Any, ...]]] = []
        self._done: asyncio.Future[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._done is not None and not self._done.done()

    def start(self) -> None:
        """Start the trio run on the running asyncio loop (call it from a Textual handler)."""
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        trio.lowlevel.start_guest_run(
            self._main,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=loop.call_soon,
            done_callback=self._finished,
            host_uses_signal_set_wakeup_fd=True,
        )

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` as a trio task; dropped if the run is over or stopping."""
        if self._stopping:
            return
        if self._token is None:
            self._queued.append((fn, args))
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._start_soon, fn, args)

    async def stop(self) -> None:
        """Cancel every trio task and wait (bounded) for the run to finish."""
        self._stopping = True
        self._queued.clear()
        if self._done is None or self._done.done():
            return
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(self._cancel)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._done), STOP_TIMEOUT_S)

    # -- trio side ---------------------------------------------------------------------------

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._stopping:
                nursery.cancel_scope.cancel()
            for fn, args in self._queued:
                nursery.start_soon(fn, *args)
            self._queued.clear()
            await trio.sleep_forever()

    def _start_soon(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        # A run_sync_soon callback must not raise (that is a TrioInternalError).
        if self._nursery is not None and not self._stopping:
            with contextlib.suppress(RuntimeError):  # nursery already closed
                self._nursery.start_soon(fn, *args)

    def _cancel(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _finished(self, result: outcome.Outcome[None]) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        error = getattr(result, "error", None)
        if error is not None and not _only_cancelled(error):
            self._on_crash(error)


def _only_cancelled(error: BaseException) -> bool:
    if isinstance(error, trio.Cancelled):
        return True
    if isinstance(error, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in error.exceptions)
    return False
