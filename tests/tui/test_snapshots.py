"""Snapshots (pytest-textual-snapshot) of the jobs screen and the attached screen.

The screens are fed fixed data through the real JobStore (rows and stream messages, as the
backend would feed them) with no server (``connect=False``), a fixed clock and UTC, so ids,
times and durations are the same on every run. Update the baselines with
``pytest tests/tui --snapshot-update`` and look at the SVGs in __snapshots__ before committing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from nodejob_tui.app import NodejobApp
from nodejob_tui.model import ConnState, JobStore

if TYPE_CHECKING:
    from collections.abc import Callable

    import pytest

NOW: Final = datetime(2026, 11, 28, 10, 15, 0, tzinfo=UTC).timestamp()
RUNNING: Final = "7f3a9c2e51d84b0e9a6c3d2f1e0b9a87"

SLEEPY: Final = {
    "nodes": [
        {"id": "seconds", "type": "nodejob.Input", "data": {"name": "seconds", "value": 5}},
        {"id": "nap", "type": "nodejob.Sleep", "data": {"value": "rested"}},
        {"id": "mood", "type": "nodejob.Output", "data": {"name": "mood"}},
        {"id": "chatter", "type": "nodejob.Emit", "data": {"count": 10, "size": 60}},
        {"id": "lines", "type": "nodejob.Output", "data": {"name": "lines"}},
    ],
    "edges": [],
}


def at(text: str) -> str:
    return f"2026-{text}Z"


def row(job_id: str, status: str, workflow: str, strategy: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "user_id": "u1",
        "job_type": "workflow",
        "status": status,
        "workflow_id": workflow,
        "execution_strategy": strategy,
        "params": {},
        "error": None,
        "result": None,
        "cost": None,
        **extra,
    }


def running_job_messages() -> list[dict[str, Any]]:
    """The stream of the running job: nodes, a gap, log lines, an output, progress."""
    messages: list[dict[str, Any]] = [
        {"type": "job_update", "status": "starting"},
        {"type": "job_update", "status": "running"},
        {
            "type": "node_update",
            "node_id": "seconds",
            "node_type": "nodejob.Input",
            "status": "running",
        },
        {
            "type": "node_update",
            "node_id": "seconds",
            "node_type": "nodejob.Input",
            "status": "completed",
        },
        {
            "type": "node_update",
            "node_id": "chatter",
            "node_type": "nodejob.Emit",
            "status": "running",
        },
        {
            "type": "node_update",
            "node_id": "nap",
            "node_type": "nodejob.Sleep",
            "status": "running",
        },
        {"type": "gap", "from_seq": 7, "to_seq": 26},
    ]
    for n in range(10):
        severity = "warning" if n == 6 else "info"
        messages.append(
            {"type": "log_update", "node_id": "chatter", "severity": severity,
             "content": f"chatter line {n + 11} of 20: the quick brown fox"}
        )  # fmt: skip
    messages += [
        {
            "type": "node_update",
            "node_id": "chatter",
            "node_type": "nodejob.Emit",
            "status": "completed",
        },
        {
            "type": "node_update",
            "node_id": "lines",
            "node_type": "nodejob.Output",
            "status": "running",
        },
        {"type": "output_update", "node_id": "lines", "output_name": "lines", "value": 20},
        {
            "type": "node_update",
            "node_id": "lines",
            "node_type": "nodejob.Output",
            "status": "completed",
        },
        {"type": "node_progress", "node_id": "nap", "progress": 2.0, "total": 5.0},
    ]
    seq = 0
    for message in messages:
        seq = message["to_seq"] if message["type"] == "gap" else seq + 1
        message.update(job_id=RUNNING, seq=seq)
    return messages


def fill(store: JobStore) -> None:
    """Five jobs, one of each state, as the backend would have loaded them."""
    store.merge_row(row(RUNNING, "running", "sleepy", "threaded",
                        created_at=at("11-28T10:14:12.000"), started_at=at("11-28T10:14:12.100"),
                        finished_at=None, last_seq=41))  # fmt: skip
    store.job(RUNNING).set_graph(SLEEPY)
    for message in running_job_messages():
        store.apply(message)
    store.merge_row(row("0d4e6b93aa7c4f01b2d3e4f5a6b7c8d9", "starting", "render", "docker",
                        created_at=at("11-28T10:14:58.000"), started_at=None, finished_at=None))  # fmt: skip
    store.merge_row(row("b41c07d2e3f44a5b8c9d0e1f2a3b4c5d", "completed", "hello", "threaded",
                        created_at=at("11-28T10:02:05.000"), started_at=at("11-28T10:02:05.010"),
                        finished_at=at("11-28T10:02:05.420"), last_seq=10,
                        result={"outputs": {"sum": 5}}))  # fmt: skip
    store.merge_row(row("e9d15f80c1b2435a9e8d7c6b5a4f3e2d", "failed", "fail", "subprocess",
                        created_at=at("11-28T09:58:30.000"), started_at=at("11-28T09:58:30.200"),
                        finished_at=at("11-28T09:58:31.400"), error="boom", last_seq=9))  # fmt: skip
    store.merge_row(row("c2208a11f0e94d3c8b7a6f5e4d3c2b1a", "cancelled", "sleepy", "threaded",
                        created_at=at("11-27T18:40:00.000"), started_at=at("11-27T18:40:00.500"),
                        finished_at=at("11-27T18:41:10.900"), last_seq=57))  # fmt: skip
    store.set_connection(ConnState.CONNECTED)


def snapshot_app(**options: Any) -> NodejobApp:
    app = NodejobApp(
        url="http://127.0.0.1:8787", token=None, connect=False, clock=lambda: NOW, tz=UTC, **options
    )
    fill(app.store)
    return app


def test_jobs_screen(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(snapshot_app(show_all=True), terminal_size=(80, 24))


def test_jobs_screen_unfinished_wide(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(snapshot_app(), terminal_size=(120, 36))


def test_jobs_screen_without_colour(
    snap_compare: Callable[..., bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    assert snap_compare(snapshot_app(show_all=True), terminal_size=(80, 24))


def test_attached_screen(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(snapshot_app(job_id=RUNNING), terminal_size=(80, 24))


def test_attached_screen_wide(snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(snapshot_app(job_id=RUNNING), terminal_size=(120, 36))


def test_attached_screen_connection_lost(snap_compare: Callable[..., bool]) -> None:
    app = snapshot_app(job_id=RUNNING)
    app.store.set_connection(ConnState.DISCONNECTED, "Connection refused", retry_in_s=2.0)
    assert snap_compare(app, terminal_size=(80, 24))
