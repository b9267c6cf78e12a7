"""The nodejob TUI: the Textual app, its key map, and `run_tui` (what ``nodejob tui`` calls).

Textual runs on asyncio, nodejob's client on trio: the app hosts a trio run in guest mode
(guest.py) in which the `Backend` keeps the `JobStore` up to date. The backend says "changed";
the app refreshes the screens at most every REFRESH_S, however fast messages arrive. Screens
ask for work (attach, cancel, start) through the app, which runs it as a trio task and reports
failures as notifications. Quitting closes the connection only: jobs keep running.

This package imports ``nodejob.protocol`` and ``nodejob.client`` from nodejob, nothing else
(no server code).
"""

from __future__ import annotations

import importlib.resources
import time
from typing import TYPE_CHECKING, Any, ClassVar, Final

from textual.app import App
from textual.binding import Binding, BindingType

from nodejob.client import ClientError
from nodejob_tui.backend import Backend
from nodejob_tui.guest import TrioGuest
from nodejob_tui.model import JobStore
from nodejob_tui.screens.attached import AttachedScreen
from nodejob_tui.screens.base import JobView
from nodejob_tui.screens.dialogs import ConfirmScreen, ParamsScreen, PathScreen, PrefixScreen
from nodejob_tui.screens.jobs import JobsScreen

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from datetime import tzinfo

    from textual.screen import Screen

    from nodejob_tui.workflow_file import WorkflowFile

REFRESH_S: Final = 0.05
"""Screens redraw at most this often while messages stream in."""


def _css() -> str:
    # Read through importlib.resources (not CSS_PATH, which Textual open()s): works from a zip.
    return importlib.resources.files("nodejob_tui").joinpath("app.tcss").read_text("utf-8")


class NodejobApp(App[int]):
    """The TUI. With ``connect=False`` it shows only what is put in ``store`` (snapshots)."""

    CSS = _css()
    TITLE = "nodejob"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
    ]

    def __init__(
        self,
        *,
        url: str,
        token: str | None,
        job_id: str | None = None,
        show_all: bool = False,
        connect: bool = True,
        clock: Callable[[], float] = time.time,
        tz: tzinfo | None = None,
    ) -> None:
        super().__init__()
        self.store = JobStore(url)
        self.clock = clock
        self.tz = tz
        """Time zone for times shown (None: the local one)."""
        self.backend = Backend(
            url, token, self.store, self._store_changed, show_all=show_all, clock=clock
        )
        self.guest = TrioGuest(self._trio_crashed)
        self._connect = connect
        self._initial_job = job_id
        self._show_all = show_all
        self._refresh_pending = False

    def get_default_screen(self) -> Screen[Any]:
        return JobsScreen(show_all=self._show_all)

    def on_mount(self) -> None:
        if self._connect:
            self.guest.start()
            self.guest.spawn(self.backend.run)
        if self._initial_job is not None:
            self.attach(self._initial_job)

    async def on_unmount(self) -> None:
        await self.guest.stop()

    async def action_quit(self) -> None:
        """Leave the TUI; jobs keep running on the server."""
        self.exit(0)

    # -- store -> screens --------------------------------------------------------------------

    def _store_changed(self) -> None:
        """Called by the backend (trio side) after it changed the store."""
        if not self._refresh_pending:
            self._refresh_pending = True
            self.call_later(self._schedule_refresh)

    def _schedule_refresh(self) -> None:
        self.set_timer(REFRESH_S, self.refresh_screens)

    def refresh_screens(self) -> None:
        """Show the store's changes on every job screen (and its notices as toasts)."""
        self._refresh_pending = False
        changes = self.store.take()
        for notice in changes.notices:
            self.notify(notice, severity="warning")
        for screen in list(self.screen_stack):
            if isinstance(screen, JobView) and screen.is_mounted:
                screen.refresh_view(changes)

    def _trio_crashed(self, error: BaseException) -> None:
        def crash() -> None:
            raise error

        self.call_later(crash)  # a bug on the trio side fails the app loudly

    # -- commands from the screens -----------------------------------------------------------

    def run_command(
        self,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        done: Callable[[Any], Any] | None = None,
    ) -> None:
        """Run ``fn(*args)`` on the trio side; ``done(result)`` back here, errors as toasts."""

        async def command() -> None:
            try:
                result = await fn(*args)
            except ClientError as exc:
                self.call_later(self.notify, exc.detail, severity="error")
            else:
                if done is not None:
                    self.call_later(done, result)

        self.guest.spawn(command)

    def attach(self, job_id: str) -> None:
        """Open the attached screen for ``job_id``: replay what is missing, then follow."""
        top = self.screen
        if isinstance(top, AttachedScreen):
            if top.job_id == job_id:
                return
            self.pop_screen()
        self.push_screen(AttachedScreen(job_id))
        self.run_command(self.backend.attach, job_id)

    def detach(self) -> None:
        """Back to the list; the job runs on."""
        if isinstance(self.screen, AttachedScreen):
            self.pop_screen()
        self.backend.detach()

    def confirm_cancel(self, job_id: str | None) -> None:
        model = self.store.jobs.get(job_id) if job_id is not None else None
        if model is None:
            self.notify("no job selected", severity="warning")
            return
        if model.is_finished:
            self.notify(f"job {model.job_id[:8]} already {model.status}", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_command(
                    self.backend.cancel,
                    model.job_id,
                    done=lambda _: self._cancel_requested(model.job_id),
                )

        self.push_screen(ConfirmScreen(f"Cancel job {model.job_id}?"), answered)

    def _cancel_requested(self, job_id: str) -> None:
        self.notify(f"cancelling job {job_id[:8]}")

    def new_job(self) -> None:
        """Ask for a workflow file, then its params; start it and attach."""

        def got_params(data: dict[str, Any] | None) -> None:
            if data is not None:
                self.run_command(self.backend.start, data, done=self.attach)

        def got_file(workflow: WorkflowFile | None) -> None:
            if workflow is not None:
                self.push_screen(ParamsScreen(workflow), got_params)

        self.push_screen(PathScreen(), got_file)

    def rerun(self, job_id: str | None) -> None:
        if job_id is None:
            self.notify("no job selected", severity="warning")
            return
        self.run_command(self.backend.rerun, job_id, done=self.attach)

    def set_show_all(self, show_all: bool) -> None:
        self.backend.show_all = show_all
        self.run_command(self.backend.set_show_all, show_all)

    def prefix(self) -> None:
        """``Ctrl-b``: the next key is a tmux-style command."""

        def command(key: str | None) -> None:
            if key == "d":
                self.detach()

        self.push_screen(PrefixScreen(), command)


def run_tui(
    *, url: str, token: str | None, job_id: str | None = None, show_all: bool = False
) -> int:
    """Run the TUI in the terminal until the user quits; the exit status (0 normally)."""
    app = NodejobApp(url=url, token=token, job_id=job_id, show_all=show_all)
    app.run()
    return app.return_code or 0
