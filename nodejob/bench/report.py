"""What ``nodejob bench`` reports: the figures and their targets, as JSON or as a table.

`FIGURES` names every figure, the benchmark group that measures it and its target;
`as_json` and `print_table` render a `Report`.

Part of ``nodejob bench`` (docs/benchmarks.md explains every figure). The bench imports
the server; nothing outside nodejob.bench imports it but the CLI's lazy ``bench`` handler.
This module imports nodejob.bench.harness (for `Sizes`), no benchmark module.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from rich.console import Console

    from nodejob.bench.harness import Sizes

Figure = tuple[str, str, str | None]
"""(key, group, target) — target like ">= 0.5"; None: reported only."""
FIGURES: Final[tuple[Figure, ...]] = (
    ("stream_msgs_per_s", "stream", None),
    ("raw_ws_msgs_per_s", "stream", None),
    ("stream_vs_raw_ws", "stream", ">= 0.5"),
    ("trivial_job_ms_p50", "trivial", "< 5"),
    ("replay_10k_s", "replay", "< 0.5"),
    ("concurrent_jobs", "concurrent", None),
    ("rss_per_job_kb", "concurrent", "< 40"),
    ("multi_job_msgs_per_s", "multi", None),
    ("subprocess_job_ms_p50", "subprocess", None),
    ("docker_job_ms_p50", "docker", None),
    ("subprocess_stream_msgs_per_s", "subprocess", None),
    ("docker_stream_msgs_per_s", "docker", None),
    ("ray_job_ms_p50", "ray", None),
    ("ray_stream_lag_ms_p50", "ray", None),
)
GROUPS: Final = (
    "concurrent",  # first: later benchmarks leave freed memory that would hide RSS growth
    "stream",
    "trivial",
    "replay",
    "multi",
    "subprocess",
    "docker",
    "ray",
)
OPTIONAL_GROUPS: Final = frozenset({"subprocess", "docker", "ray"})
"""Strategies that may be unavailable here: reported as null with a reason, not an error."""


@dataclass
class Report:
    figures: dict[str, Any]
    notes: dict[str, str]
    details: dict[str, Any]
    failed: bool = False


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _meets(value: float, target: str) -> bool:
    op, _, bound = target.partition(" ")
    return value >= float(bound) if op == ">=" else value < float(bound)


def as_json(report: Report, sizes: Sizes, quick: bool) -> dict[str, Any]:
    """The ``--json`` object: the figures at top level, then notes, targets and context."""
    return {
        **{key: _rounded(value) for key, value in report.figures.items()},
        "notes": report.notes,
        "targets": {key: target for key, _, target in FIGURES if target is not None},
        "details": {key: _rounded(value) for key, value in report.details.items()},
        "quick": quick,
        "sizes": asdict(sizes),
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "—"
    if key.endswith("_per_s"):
        return f"{value:,.0f} msg/s"
    if key.endswith("_ms_p50"):
        return f"{value:.2f} ms"
    if key.endswith("_s"):
        return f"{value:.3f} s"
    if key.endswith("_kb"):
        return f"{value:.1f} KiB"
    if key == "stream_vs_raw_ws":
        return f"{value:.2f}x"
    return f"{value:,}"


def print_table(report: Report, quick: bool, console: Console) -> None:
    from rich.table import Table

    title = "nodejob bench" + (" (--quick: small counts, targets not judged)" if quick else "")
    table = Table(title=title)
    for column in ("figure", "value", "target", "result"):
        table.add_column(column, justify="right" if column == "value" else "left")
    targets = {key: target for key, _, target in FIGURES}
    for key, value in report.figures.items():
        target = targets[key]
        if value is None:
            verdict = "[yellow]not measured[/]"
        elif target is None:
            verdict = ""
        elif quick:
            verdict = "n/a"
        else:
            verdict = "[green]ok[/]" if _meets(value, target) else "[red]missed[/]"
        table.add_row(key, _shown(key, value), target or "", verdict)
    console.print(table)
    for key, note in report.notes.items():
        console.print(f"[yellow]{key}[/]: {note}")
