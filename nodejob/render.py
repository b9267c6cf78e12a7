"""Human output of the CLI, with rich: the live view of a followed job, and job tables.

`JobView` takes stream messages through `handle` (cheap: it only updates state, so it keeps
up with tens of thousands of messages a second) and draws at most as often as `refresh` is
called (the CLI calls it about 10 times a second). On a terminal it shows a live status
line and one row per node above which log lines scroll; elsewhere it degrades to plain
lines. Log lines are bounded per refresh: the rest are counted, never silently lost.

This module must not import trio, the server, the store or the client: it only draws.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from nodejob import protocol

if TYPE_CHECKING:
    from rich.console import RenderableType

LOG_LINES_PER_REFRESH: Final = 200
"""At most this many log lines are printed per refresh; the others are counted."""
MAX_LINE_CHARS: Final = 2000
MAX_NODES_SHOWN: Final = 15
MAX_OUTPUT_CHARS: Final = 1000
PIPE_WIDTH: Final = 160
DASH: Final = "\N{EN DASH}"

STATUS_STYLE: Final = {
    "starting": "yellow",
    "running": "cyan",
    "completed": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}
ICON: Final = {"completed": "✓", "failed": "✗", "cancelled": "⊘", "starting": "…"}
SEVERITY_STYLE: Final = {"info": "", "warning": "yellow", "error": "red"}


def make_console() -> Console:
    """A stdout console; when stdout is not a terminal, wide enough not to cut job ids."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, PIPE_WIDTH)
    return console


def parse_time(text: object) -> datetime | None:
    """An ISO 8601 timestamp of the API (``...Z``), or None."""
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def job_duration(job: dict[str, Any]) -> float | None:
    """Seconds from started_at to finished_at (or to now while running)."""
    started = parse_time(job.get("started_at") or job.get("created_at"))
    if started is None:
        return None
    finished = parse_time(job.get("finished_at")) or datetime.now(UTC)
    return max(0.0, (finished - started).total_seconds())


def status_text(status: object) -> Text:
    text = str(status or "?")
    return Text(text, style=STATUS_STYLE.get(text, ""))


def jobs_table(jobs: list[dict[str, Any]]) -> Table:
    """The ``nodejob ls`` table: id, workflow, status, strategy, started, duration."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("id", "workflow", "status", "strategy", "started", "duration"):
        # Only the workflow label may shrink: ids and times must stay copyable.
        table.add_column(
            column, no_wrap=True, overflow="ellipsis" if column == "workflow" else "fold"
        )
    for job in jobs:
        started = parse_time(job.get("started_at") or job.get("created_at"))
        table.add_row(
            str(job.get("id") or job.get("job_id") or ""),
            str(job.get("workflow_id") or ""),
            status_text(job.get("status")),
            str(job.get("execution_strategy") or ""),
            started.astimezone().strftime("%m-%d %H:%M:%S") if started else "",
            format_duration(job_duration(job)),
        )
    return table


def job_details(job: dict[str, Any]) -> Table:
    """The ``nodejob show`` view: one row per field of the job object."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in job.items():
        if key == "status":
            shown: Text = status_text(value)
        elif isinstance(value, dict | list):
            shown = Text(_clip(protocol.dumps(value), MAX_OUTPUT_CHARS))
        else:
            shown = Text("" if value is None else str(value))
        table.add_row(key, shown)
    return table


def _clip(text: str, limit: int) -> str:
    text = text.replace("\x1b", "\\x1b")  # never let a job drive the terminal
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


class _Node:
    __slots__ = ("error", "node_type", "progress", "spinner", "status", "total")

    def __init__(self) -> None:
        self.node_type = ""
        self.status = "running"
        self.error: str | None = None
        self.progress: float | None = None
        self.total: float | None = None
        self.spinner = Spinner("dots", style="cyan")


class JobView:
    """The state of one followed job and how to draw it on ``console``.

    ``handle`` every stream message, call ``refresh`` periodically, then ``finish`` after the
    terminal job_update (or ``stop`` when detaching). ``job`` is the job object when known
    (attach): it supplies the start time and labels.
    """

    def __init__(
        self, console: Console, job_id: str | None = None, *, job: dict[str, Any] | None = None
    ) -> None:
        self.console = console
        self.job_id = job_id
        self.job = job or {}
        self.status: str | None = self.job.get("status")
        self.error: str | None = self.job.get("error")
        self.first_seq: int | None = None
        self.last_seq = 0
        self.count = 0
        self.connection = "connected"
        self.nodes: dict[str, _Node] = {}
        self.outputs: dict[str, Any] = {}
        # Lines waiting for the next refresh. Log lines beyond LOG_LINES_PER_REFRESH in one
        # refresh are only counted; notices (gaps, failures, states) are always kept.
        self._lines: list[tuple[str, str]] = []
        self._logged = 0
        self._skipped = 0
        # Elapsed time runs on the monotonic clock, anchored at the job's start when known.
        started, finished = (
            parse_time(self.job.get("started_at")),
            parse_time(self.job.get("finished_at")),
        )
        now = time.monotonic()
        self._t0 = now - (datetime.now(UTC) - started).total_seconds() if started else now
        self._t_end: float | None = None
        if started and finished:
            self._t_end = self._t0 + (finished - started).total_seconds()
        self._spinner = Spinner("dots", style="cyan")
        self._plain = not console.is_terminal or console.is_dumb_terminal
        self._live: Live | None = None

    # -- state ------------------------------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> None:
        """Take one stream message into the state; draws nothing."""
        self.count += 1
        seq = message.get("seq")
        if isinstance(seq, int):
            self.last_seq = max(self.last_seq, seq)
            if self.first_seq is None:
                self.first_seq = seq
        if self.job_id is None:
            self.job_id = message.get("job_id")
        kind = message.get("type")
        if kind == protocol.MessageType.LOG_UPDATE:
            severity = str(message.get("severity") or "info")
            node = message.get("node_id")
            prefix = f"[{node}] " if node else ""
            if self._logged >= LOG_LINES_PER_REFRESH:
                self._skipped += 1
                return
            self._logged += 1
            self._line(SEVERITY_STYLE.get(severity, ""), f"{prefix}{message.get('content', '')}")
        elif kind == protocol.MessageType.NODE_PROGRESS:
            state = self._node(message)
            state.progress = _number(message.get("progress"))
            state.total = _number(message.get("total"))
        elif kind == protocol.MessageType.NODE_UPDATE:
            self._on_node_update(message)
        elif kind == protocol.MessageType.OUTPUT_UPDATE:
            self.outputs[str(message.get("output_name"))] = message.get("value")
        elif kind == protocol.MessageType.JOB_UPDATE:
            self._on_job_update(message)
        elif kind == protocol.MessageType.GAP:
            first, last = message.get("from_seq"), message.get("to_seq")
            self._line("yellow", f"messages {first}{DASH}{last} were trimmed (gap)")

    def _node(self, message: dict[str, Any]) -> _Node:
        node_id = str(message.get("node_id"))
        state = self.nodes.get(node_id)
        if state is None:
            state = self.nodes[node_id] = _Node()
        return state

    def _on_node_update(self, message: dict[str, Any]) -> None:
        state = self._node(message)
        state.node_type = str(message.get("node_type") or state.node_type)
        status = str(message.get("status") or state.status)
        changed = status != state.status or self._plain
        state.status = status
        if message.get("error"):
            state.error = str(message["error"])
        node_id = message.get("node_id")
        if status == "failed":
            self._line("red", f"✗ node {node_id} failed: {state.error or ''}".rstrip(": "))
        elif self._plain and changed:
            icon = ICON.get(status, "▶")
            self._line(STATUS_STYLE.get(status, ""), f"{icon} node {node_id} {status}")

    def _on_job_update(self, message: dict[str, Any]) -> None:
        status = str(message.get("status"))
        if status != self.status and self._plain and status not in protocol.TERMINAL:
            self._line(STATUS_STYLE.get(status, ""), f"job {self.job_id} {status}")
        self.status = status
        if message.get("error"):
            self.error = str(message["error"])
        result = message.get("result")
        if isinstance(result, dict) and isinstance(result.get("outputs"), dict):
            self.outputs.update(result["outputs"])
        if status in protocol.TERMINAL and self._t_end is None:
            self._t_end = time.monotonic()

    def set_connection(self, state: str) -> None:
        """``connected``, ``reconnecting`` (shown live) or ``reconnected`` (a line)."""
        if state == "reconnected":
            self._line("yellow", "connection lost, reconnected")
            state = "connected"
        self.connection = state

    def _line(self, style: str, text: str) -> None:
        self._lines.append((style, text))

    def elapsed(self) -> float:
        """Seconds since the job started (or since we started watching), frozen at its end."""
        return max(0.0, (self._t_end or time.monotonic()) - self._t0)

    # -- drawing ----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin the live display (a no-op when the console is not a terminal)."""
        if not self._plain and self._live is None:
            self._live = Live(
                console=self.console,
                get_renderable=self.renderable,
                auto_refresh=False,
                transient=True,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()

    def refresh(self) -> None:
        """Print pending lines above the live area, then redraw it once."""
        self.flush()
        if self._live is not None:
            self._live.refresh()

    def flush(self) -> None:
        """Print the pending lines (one print: cheap even with many lines)."""
        if not self._lines and not self._skipped:
            return
        text = Text()
        for style, line in self._lines:
            text.append(_clip(line, MAX_LINE_CHARS) + "\n", style)
        if self._skipped:
            text.append(f"… {self._skipped} more log lines not shown (--json shows all)", "dim")
        self._lines, self._logged, self._skipped = [], 0, 0
        text.rstrip()
        self.console.print(text, soft_wrap=True, highlight=False)

    def stop(self) -> None:
        """End the live display, printing what is pending (also when detaching)."""
        if self._live is not None:
            self._live.stop()
            self._live = None
        self.flush()

    def finish(self) -> None:
        """Stop, then print the summary: status, node results, error and outputs."""
        self.stop()
        self.console.print(self.header(final=True), highlight=False)
        if self.nodes and not self._plain:
            self.console.print(self.nodes_table(final=True))
        if self.error:
            self.console.print(Text(f"error: {self.error}", style="red"), highlight=False)
        if self.outputs:
            self.console.print(Text("outputs:", style="bold"))
            for name, value in self.outputs.items():
                line = Text(f"  {name}", style="bold")
                line.append(f" = {_clip(protocol.dumps(value), MAX_OUTPUT_CHARS)}")
                self.console.print(line, highlight=False, soft_wrap=True)

    def header(self, *, final: bool = False) -> RenderableType:
        status = self.status or "connecting"
        line = Text()
        if status in protocol.TERMINAL or final:
            line.append(ICON.get(status, "•") + " ", STATUS_STYLE.get(status, ""))
        line.append(f"job {self.job_id or '?'} ", "bold")
        line.append(status, STATUS_STYLE.get(status, ""))
        line.append(f"  {format_duration(self.elapsed())}")
        if self.last_seq:
            span = f"seq {self.first_seq}{DASH}{self.last_seq}" if final else f"seq {self.last_seq}"
            line.append(f"  {span} ({self.count} messages)", "dim")
        if self.connection != "connected" and not final:
            line.append(f"  {self.connection}…", "yellow")
        if final or status in protocol.TERMINAL:
            return line
        table = Table.grid(padding=(0, 1))
        table.add_row(self._spinner, line)
        return table

    def nodes_table(self, *, final: bool = False) -> Table:
        table = Table.grid(padding=(0, 1))
        nodes = list(self.nodes.items())
        hidden = 0
        if len(nodes) > MAX_NODES_SHOWN:
            # Running nodes first: they are what is worth watching.
            nodes.sort(key=lambda item: item[1].status != "running")
            hidden = len(nodes) - MAX_NODES_SHOWN
            nodes = nodes[:MAX_NODES_SHOWN]
        for node_id, state in nodes:
            icon: RenderableType
            if state.status == "running" and not final:
                icon = state.spinner
            else:
                icon = Text(ICON.get(state.status, "•"), STATUS_STYLE.get(state.status, ""))
            label = Text(node_id, "bold")
            if state.node_type:
                label.append(f" {state.node_type}", "dim")
            progress: RenderableType = Text(state.error or "", "red")
            if state.progress is not None and state.status == "running":
                total = state.total if state.total else None
                bar = ProgressBar(total=total, completed=state.progress, width=30)
                done = f" {state.progress:g}/{total:g}" if total else f" {state.progress:g}"
                progress = Table.grid()
                progress.add_row(bar, Text(done, "dim"))
            table.add_row(icon, label, progress)
        if hidden:
            table.add_row(Text(""), Text(f"… and {hidden} more nodes", "dim"), Text(""))
        return table

    def renderable(self) -> RenderableType:
        if not self.nodes:
            return self.header()
        return Group(self.header(), self.nodes_table())


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
