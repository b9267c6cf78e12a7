"""What the jobs screen and the attached screen share: the job keys and the store refresh.

Both screens act on "the current job" (the selected row, or the attached job) with the same
keys, tmux-style: ``c`` cancel, ``n`` new, ``r`` rerun, ``q`` quit, ``Ctrl-b`` as a prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, cast

from textual.binding import Binding, BindingType
from textual.screen import Screen

from nodejob_tui.widgets.connection import ConnectionBar

if TYPE_CHECKING:
    from nodejob_tui.app import NodejobApp
    from nodejob_tui.model import Changes


JOB_KEYS: Final[list[BindingType]] = [
    Binding("c", "cancel_job", "cancel"),
    Binding("n", "new_job", "new"),
    Binding("r", "rerun_job", "rerun"),
    Binding("q", "quit", "quit"),
    Binding("ctrl+b", "prefix", "prefix", show=False),
]
"""The keys both screens share; each lists them after its own (the footer's order)."""


class JobView(Screen[None]):
    """A screen that shows jobs from the app's JobStore (its BINDINGS add JOB_KEYS)."""

    @property
    def tui(self) -> NodejobApp:
        return cast("NodejobApp", self.app)

    def current_job_id(self) -> str | None:
        raise NotImplementedError

    def refresh_view(self, changes: Changes) -> None:
        """Show what changed in the store (called at most every REFRESH_S)."""
        if changes.connection:
            self.query_one(ConnectionBar).show(self.tui.store.connection)

    def on_screen_resume(self) -> None:
        self.query_one(ConnectionBar).show(self.tui.store.connection)

    def action_cancel_job(self) -> None:
        self.tui.confirm_cancel(self.current_job_id())

    def action_new_job(self) -> None:
        self.tui.new_job()

    def action_rerun_job(self) -> None:
        self.tui.rerun(self.current_job_id())

    async def action_quit(self) -> None:
        await self.tui.action_quit()

    def action_prefix(self) -> None:
        self.tui.prefix()
