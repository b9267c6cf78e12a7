"""The jobs screen: a live table of the user's jobs, with filter, sort and all/unfinished.

Rows change as the store changes (pushed over the WebSocket, see backend.py); the table is
rebuilt only when the set or order of rows changes, else just the changed cells are updated,
so the cursor stays where the user put it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Final

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Input, Static

from nodejob_tui.formatting import format_duration, format_progress, format_started
from nodejob_tui.screens.base import JOB_KEYS, JobView
from nodejob_tui.widgets.connection import ConnectionBar
from nodejob_tui.widgets.status import status_text

if TYPE_CHECKING:
    from collections.abc import Callable

    from textual import events
    from textual.app import ComposeResult

    from nodejob_tui.model import Changes, JobModel

COLUMNS: Final = (
    ("id", "id", 8),
    ("workflow", "workflow", 0),  # takes the width the others leave
    ("status", "status", 11),
    ("strategy", "strategy", 10),
    ("progress", "progress", 8),
    ("started", "started", 11),
    ("duration", "duration", 8),
)
WORKFLOW_MIN: Final = 8
WORKFLOW_WIDE: Final = 20
"""Room the workflow column keeps before ids are shown whole."""
ID_FULL: Final = 32
RESERVED: Final = 2 * len(COLUMNS) + 2
"""Cell padding (1 each side) and a vertical scrollbar."""
_STATUS_ORDER: Final = {"running": 0, "starting": 1, "failed": 2, "cancelled": 3, "completed": 4}


def _by_started(m: JobModel) -> Any:
    return (m.created_at or 0.0, m.job_id)


SORTS: Final[dict[str, Callable[[JobModel], Any]]] = {
    "started": _by_started,
    "status": lambda m: (_STATUS_ORDER.get(m.status, 9), -(m.created_at or 0.0)),
    "workflow": lambda m: ((m.workflow_id or "").lower(), -(m.created_at or 0.0)),
    "duration": lambda m: (m.duration(m.finished_at or m.started_at or 0.0) or 0.0, m.job_id),
    "id": lambda m: m.job_id,
}
DEFAULT_REVERSE: Final = {"started": True, "duration": True}


class JobTable(DataTable[Any]):
    """The jobs table; Enter attaches to the row under the cursor."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select_cursor", "attach", key_display="⏎"),
    ]


class JobsScreen(JobView):
    """Every job of the user (``a``: all, or only unfinished), newest first by default."""

    BINDINGS: ClassVar[list[BindingType]] = [
        *JOB_KEYS[:3],
        Binding("a", "toggle_all", "all"),
        Binding("slash", "filter", "filter", key_display="/"),
        Binding("s", "sort", "sort"),
        Binding("S", "reverse", "reverse", show=False),
        Binding("escape", "clear_filter", "clear filter", show=False),
        *JOB_KEYS[3:],
    ]

    def __init__(self, *, show_all: bool = False) -> None:
        super().__init__()
        self.show_all = show_all
        self.sort_key = "started"
        self.sort_reverse = DEFAULT_REVERSE["started"]
        self.filter_text = ""
        self._row_keys: list[str] = []
        self._widths = (0, 0)

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        yield ConnectionBar(id="connection")
        yield Input(placeholder="filter: part of an id, workflow, status or strategy", id="filter")
        yield JobTable(id="jobs", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter").display = False
        self.set_interval(1.0, self._tick)
        self._fit_columns(self.app.size.width)
        self.query_one(JobTable).focus()

    def on_resize(self, event: events.Resize) -> None:
        self._fit_columns(event.size.width)

    def _fit_columns(self, width: int) -> None:
        """Share out the terminal's width: at 80 columns ids are cut to 8 characters and
        the workflow gets 8; wider, ids are shown whole, then the workflow gets the rest."""
        spare = width - sum(w for _label, _key, w in COLUMNS) - RESERVED
        id_width = ID_FULL if spare >= ID_FULL - COLUMNS[0][2] + WORKFLOW_WIDE else COLUMNS[0][2]
        workflow = max(WORKFLOW_MIN, spare - (id_width - COLUMNS[0][2]))
        if (id_width, workflow) == self._widths:
            return
        self._widths = (id_width, workflow)
        table = self.query_one(JobTable)
        table.clear(columns=True)
        widths = {"id": id_width, "workflow": workflow}
        for label, key, w in COLUMNS:
            table.add_column(label, key=key, width=widths.get(key, w))
        self._row_keys = []
        self._show_rows()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self._show_rows()

    def current_job_id(self) -> str | None:
        table = self.query_one(JobTable)
        if not self._row_keys or table.cursor_row < 0:
            return None
        return self._row_keys[min(table.cursor_row, len(self._row_keys) - 1)]

    def refresh_view(self, changes: Changes) -> None:
        super().refresh_view(changes)
        if changes.jobs:
            self._show_rows(changes.jobs)

    # -- rows ----------------------------------------------------------------------------------

    def visible_jobs(self) -> list[JobModel]:
        """The jobs the table shows, filtered and in order."""
        jobs = [
            m
            for m in self.tui.store.jobs.values()
            if m.created_at is not None and (self.show_all or not m.is_finished)
        ]
        needle = self.filter_text.lower()
        if needle:
            jobs = [m for m in jobs if needle in _haystack(m)]
        jobs.sort(key=SORTS[self.sort_key], reverse=self.sort_reverse)
        return jobs

    def _cells(self, model: JobModel) -> tuple[Any, ...]:
        now = self.tui.clock()
        return (
            model.job_id[: self._widths[0]],
            Text(model.workflow_id or "-", overflow="ellipsis", no_wrap=True),
            status_text(model.status),
            model.strategy or "-",
            format_progress(model),
            format_started(model.started_at or model.created_at, now, self.tui.tz),
            format_duration(model.duration(now)),
        )

    def _show_rows(self, changed: set[str] | None = None) -> None:
        table = self.query_one(JobTable)
        jobs = self.visible_jobs()
        keys = [m.job_id for m in jobs]
        if keys != self._row_keys:
            selected = self.current_job_id()
            table.clear()
            for model in jobs:
                table.add_row(*self._cells(model), key=model.job_id)
            self._row_keys = keys
            if selected in keys:
                table.move_cursor(row=keys.index(selected), animate=False)
        else:
            for model in jobs:
                if changed is None or model.job_id in changed:
                    self._update_row(table, model)
        self._show_title(len(jobs))

    def _update_row(self, table: JobTable, model: JobModel) -> None:
        for (_label, key, _width), value in zip(COLUMNS, self._cells(model), strict=True):
            table.update_cell(model.job_id, key, value)

    def _tick(self) -> None:
        """Running jobs' durations move with the clock."""
        table = self.query_one(JobTable)
        for job_id in self._row_keys:
            model = self.tui.store.jobs.get(job_id)
            if model is not None and not model.is_finished:
                self._update_row(table, model)

    def _show_title(self, count: int) -> None:
        which = "all jobs" if self.show_all else "unfinished jobs"
        arrow = "↓" if self.sort_reverse else "↑"
        title = Text.assemble(
            ("nodejob", "bold"), f" · {which} ({count}) · sort: {self.sort_key} {arrow}"
        )
        if self.filter_text:
            title.append(f" · filter: {self.filter_text}")
        self.query_one("#title", Static).update(title)

    # -- actions -------------------------------------------------------------------------------

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.tui.attach(event.row_key.value)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        if key in SORTS:
            self._set_sort(key, not self.sort_reverse if key == self.sort_key else None)

    def action_toggle_all(self) -> None:
        self.show_all = not self.show_all
        self.tui.set_show_all(self.show_all)
        self._show_rows()

    def action_sort(self) -> None:
        names = list(SORTS)
        self._set_sort(names[(names.index(self.sort_key) + 1) % len(names)], None)

    def action_reverse(self) -> None:
        self._set_sort(self.sort_key, not self.sort_reverse)

    def _set_sort(self, key: str, reverse: bool | None) -> None:
        self.sort_key = key
        self.sort_reverse = DEFAULT_REVERSE.get(key, False) if reverse is None else reverse
        self._show_rows()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.display = True
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.display = False
        self.query_one(JobTable).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._show_rows()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if not event.value.strip():
            event.input.display = False
        self.query_one(JobTable).focus()


def _haystack(model: JobModel) -> str:
    return " ".join((model.job_id, model.workflow_id or "", model.status, model.strategy)).lower()
