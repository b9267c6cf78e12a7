"""The attached screen: one job's nodes, outputs and log, live, like an attached tmux session.

The log pane appends the job's log lines with a seq above the last one it showed, so a replay
after a reconnect (which resumes after that seq anyway) can never show a line twice. Scrollback
is bounded (SCROLLBACK_LINES). A ``gap`` (messages trimmed on the server before we read them)
gets a banner that stays, as well as a line in the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import Footer, RichLog, Static

from nodejob_tui.formatting import format_duration
from nodejob_tui.model import SCROLLBACK_LINES, JobModel, LineKind, LogLine, short_value
from nodejob_tui.screens.base import JOB_KEYS, JobView
from nodejob_tui.widgets.connection import ConnectionBar
from nodejob_tui.widgets.nodes import NodeList
from nodejob_tui.widgets.status import status_text

if TYPE_CHECKING:
    from textual.app import ComposeResult

    from nodejob_tui.model import Changes

_SEVERITY_STYLES = {"warning": "yellow", "error": "bold red"}


class AttachedScreen(JobView):
    """One job, followed live. ``d`` (or ``Ctrl-b d``) detaches back to the list."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("d", "detach", "detach", key_display="d/^b d"),
        Binding("escape", "detach", "detach", show=False),
        *JOB_KEYS,
    ]

    def __init__(self, job_id: str) -> None:
        super().__init__()
        self.job_id = job_id
        self.shown_seq = 0
        """The seq of the last log line written to the pane."""

    def compose(self) -> ComposeResult:
        yield Static(id="job-title")
        yield ConnectionBar(id="connection")
        yield Static(id="gap")
        yield NodeList(id="nodes")
        yield Static(id="outputs")
        yield RichLog(id="log", max_lines=SCROLLBACK_LINES, wrap=False, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(1.0, self._show_title)
        self._show_all()

    def on_screen_resume(self) -> None:
        super().on_screen_resume()
        self._show_all()

    def current_job_id(self) -> str | None:
        return self.job_id

    @property
    def model(self) -> JobModel:
        # Not added to the store until the server has said something about it.
        return self.tui.store.jobs.get(self.job_id) or JobModel(self.job_id)

    def refresh_view(self, changes: Changes) -> None:
        super().refresh_view(changes)
        if self.job_id in changes.gone and self.is_current:
            self.tui.detach()
        elif self.job_id in changes.jobs:
            self._show_all()

    def log_lines(self) -> list[str]:
        """The log pane's text, line by line (what the user sees, for tests and copy)."""
        return [strip.text for strip in self.query_one(RichLog).lines]

    def _show_all(self) -> None:
        model = self.model
        self._show_title()
        gap = self.query_one("#gap", Static)
        gap.display = bool(model.gaps)
        if model.gaps:
            spans = ", ".join(f"{a}-{b}" for a, b in model.gaps)
            gap.update(f"⚠ gap: messages {spans} were trimmed on the server, not shown")
        self.query_one(NodeList).show(model.nodes.values())
        outputs = self.query_one("#outputs", Static)
        outputs.display = bool(model.outputs)
        if model.outputs:
            text = Text("outputs: ", style="bold")
            for i, (name, value) in enumerate(model.outputs.items()):
                text.append(("  " if i else "") + f"{name} = ")
                text.append(short_value(value), style="bold")
            outputs.update(text)
        log = self.query_one(RichLog)
        for line in model.log:
            if line.seq > self.shown_seq:
                log.write(render_line(line))
                self.shown_seq = line.seq

    def _show_title(self) -> None:
        model = self.model
        now = self.tui.clock()
        title = Text.assemble(("job ", "bold"), (model.job_id, "bold"), "  ")
        title.append_text(status_text(model.status))
        details = [
            f"workflow {model.workflow_id or '-'}",
            model.strategy or "-",
            f"elapsed {format_duration(model.duration(now))}",
            f"seq {model.last_seq}",
        ]
        title.append("\n" + " · ".join(details))
        if model.error:
            title.append(f"\nerror: {model.error}", style="red")
        self.query_one("#job-title", Static).update(title)

    def action_detach(self) -> None:
        self.tui.detach()


def render_line(line: LogLine) -> Text:
    """``  42 node  text``: seq, node and the message, styled by kind and severity."""
    text = Text(f"{line.seq:>6} ", style="dim")
    if line.node_id:
        text.append(f"{line.node_id} ", style="cyan")
    match line.kind:
        case LineKind.GAP:
            text.append(f"⚠ GAP {line.text}", style="bold yellow")
        case LineKind.JOB:
            text.append(line.text, style="bold")
        case LineKind.NODE:
            text.append(line.text, style="italic")
        case LineKind.OUTPUT:
            text.append("→ " + line.text, style="green")
        case _:
            if line.severity != "info":
                text.append(f"{line.severity.upper()} ", style=_SEVERITY_STYLES.get(line.severity))
            text.append(line.text)
    return text
