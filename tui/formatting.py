"""How times, durations and progress read on screen (shared by the screens).

Standard library only, plus the model's types.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from nodejob.protocol import JobStatus

if TYPE_CHECKING:
    from datetime import tzinfo

    from nodejob_tui.model import JobModel


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = int(seconds)
    if total < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{total}s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_started(ts: float | None, now: float, tz: tzinfo | None) -> str:
    """``HH:MM:SS`` for today, ``MM-DD HH:MM`` before (in ``tz``, the local zone if None)."""
    if ts is None:
        return "-"
    when = datetime.fromtimestamp(ts, tz or UTC)
    today = datetime.fromtimestamp(now, tz or UTC)
    if tz is None:
        when, today = when.astimezone(), today.astimezone()
    if when.date() == today.date():
        return when.strftime("%H:%M:%S")
    return when.strftime("%m-%d %H:%M")


def format_progress(model: JobModel) -> str:
    if model.status == JobStatus.COMPLETED:
        return "100%"
    progress = model.progress()
    if progress is None:
        return "-"
    fraction, done, known = progress
    # Without the graph only the nodes seen so far count: say it is an estimate.
    approx = "" if model.graph is not None else "~"
    return f"{approx}{int(fraction * 100)}% {done}/{known}"
