"""The TUI driven by Pilot against a real server: list, attach, detach, cancel, new job, rerun,
and reconnecting after a server restart without losing or repeating a line."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import pytest
from textual.widgets import Input, Static

from nodejob_tui.app import NodejobApp
from nodejob_tui.model import ConnState
from nodejob_tui.screens.attached import AttachedScreen
from nodejob_tui.screens.dialogs import ConfirmScreen, ParamsScreen, PathScreen
from nodejob_tui.screens.jobs import JobsScreen, JobTable
from nodejob_tui.widgets.connection import ConnectionBar
from tests.tui.support import (
    emitter,
    graph,
    run_app,
    sleeper,
    table_rows,
    wait_for,
    write_json,
)

if TYPE_CHECKING:
    from pathlib import Path

    from textual.pilot import Pilot

    from tests.tui.support import ServerProcess


def make_app(server: ServerProcess, **options: Any) -> NodejobApp:
    return NodejobApp(url=server.url, token=server.token, **options)


def rows(app: NodejobApp) -> dict[str, list[str]]:
    return dict(table_rows(app.screen.query_one(JobTable)))


def seqs(screen: AttachedScreen) -> list[int]:
    """The seqs of the lines the log pane shows, in order."""
    return [int(line.split()[0]) for line in screen.log_lines() if line.strip()]


def static_text(app: NodejobApp, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


async def connected(pilot: Pilot[int]) -> None:
    app = pilot.app
    assert isinstance(app, NodejobApp)
    await wait_for(pilot, lambda: app.store.connection.state is ConnState.CONNECTED, "connected")


def test_jobs_screen_lists_filters_sorts_and_updates_live(server: ServerProcess) -> None:
    done = server.start_job(emitter(3), workflow_id="quick")
    assert server.wait_finished(done)["status"] == "completed"
    running = server.start_job(sleeper(60), workflow_id="slow")
    app = make_app(server)

    async def scenario(pilot: Pilot[int]) -> None:
        await connected(pilot)
        assert isinstance(app.screen, JobsScreen)
        # Unfinished jobs only, by default.
        await wait_for(pilot, lambda: "running" in " ".join(rows(app).get(running, [])), "row")
        assert set(rows(app)) == {running}
        assert "unfinished jobs (1)" in static_text(app, "#title")
        await pilot.press("a")
        await wait_for(pilot, lambda: set(rows(app)) == {done, running}, "all jobs")
        assert rows(app)[done][:4] == [done, "quick", "✓ completed", "threaded"]
        assert rows(app)[done][4] == "100%"
        # Newest first; then sorted by status (running before completed), then reversed.
        assert list(rows(app)) == [running, done]
        await pilot.press("s")
        assert "sort: status" in static_text(app, "#title")
        assert list(rows(app)) == [running, done]
        await pilot.press("S")
        assert list(rows(app)) == [done, running]
        # Filter: "/" opens the box, typing narrows, Escape clears.
        await pilot.press("slash", *"quick")
        assert list(rows(app)) == [done]
        assert "filter: quick" in static_text(app, "#title")
        await pilot.press("escape")
        assert set(rows(app)) == {done, running}
        # A change made elsewhere is pushed: the running job is followed on the WebSocket.
        assert any(job_id == running for job_id, _ in app.backend.resumes)
        await asyncio.to_thread(server.call, lambda client: client.cancel_job(running))
        await wait_for(pilot, lambda: "⊘ cancelled" in rows(app)[running], "cancel shown")

    run_app(app, scenario)


def test_attach_replays_then_follows_and_detach_keys(server: ServerProcess) -> None:
    job = server.start_job(emitter(40, interval=0.02))
    app = make_app(server, job_id=job)  # like `nodejob tui JOB_ID`

    async def scenario(pilot: Pilot[int]) -> None:
        await wait_for(pilot, lambda: isinstance(app.screen, AttachedScreen), "attached")
        screen = app.screen
        assert isinstance(screen, AttachedScreen)
        model = app.store.job(job)
        await wait_for(pilot, lambda: model.status == "completed", "job completed")
        await wait_for(pilot, lambda: seqs(screen)[-1:] == [model.last_seq], "last line shown")
        assert seqs(screen) == list(range(1, model.last_seq + 1))  # each line once, in order
        assert "n = 40" in static_text(app, "#outputs")
        assert "✓ completed" in static_text(app, "#job-title")
        assert f"seq {model.last_seq}" in static_text(app, "#job-title")
        # d detaches to the list; the finished job is under "all".
        await pilot.press("d")
        assert isinstance(app.screen, JobsScreen)
        await pilot.press("a")
        await wait_for(pilot, lambda: job in rows(app), "job row")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, AttachedScreen), "attached again")
        again = app.screen
        assert isinstance(again, AttachedScreen)
        assert again is not screen
        await wait_for(pilot, lambda: seqs(again)[-1:] == [model.last_seq], "replayed")
        assert seqs(again) == list(range(1, model.last_seq + 1))
        # Ctrl-b d, as in tmux.
        await pilot.press("ctrl+b", "d")
        assert isinstance(app.screen, JobsScreen)
        assert model.duplicates == 0

    run_app(app, scenario)


def test_attaching_to_an_unknown_job_says_so_and_goes_back(server: ServerProcess) -> None:
    app = make_app(server, job_id="0123456789abcdef")

    async def scenario(pilot: Pilot[int]) -> None:
        await connected(pilot)
        await wait_for(pilot, lambda: isinstance(app.screen, JobsScreen), "back to the list")
        assert "0123456789abcdef" not in app.store.jobs
        assert rows(app) == {}

    run_app(app, scenario)


def test_cancel_asks_first(server: ServerProcess) -> None:
    job = server.start_job(sleeper(60))
    app = make_app(server, job_id=job)

    async def scenario(pilot: Pilot[int]) -> None:
        model = app.store.job(job)
        await wait_for(pilot, lambda: model.status == "running", "running")
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert isinstance(app.screen, AttachedScreen)
        row = await asyncio.to_thread(server.call, lambda client: client.get_job(job))
        assert row["status"] == "running"  # "no" left it alone
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_for(pilot, lambda: model.status == "cancelled", "cancelled")
        await wait_for(pilot, lambda: "⊘ cancelled" in static_text(app, "#job-title"), "shown")
        row = await asyncio.to_thread(server.call, lambda client: client.get_job(job))
        assert row["status"] == "cancelled"

    run_app(app, scenario)


def test_new_job_from_a_file_with_params_then_rerun(server: ServerProcess, tmp_path: Path) -> None:
    path = write_json(
        tmp_path / "adder.json",
        graph(
            {"id": "n", "type": "nodejob.Input", "data": {"name": "n", "value": 2}},
            {"id": "add", "type": "nodejob.Add", "data": {"b": 3}},
            {"id": "out", "type": "nodejob.Output", "data": {"name": "sum"}},
            edges=[
                {"source": "n", "target": "add", "targetHandle": "a"},
                {"source": "add", "target": "out", "targetHandle": "value"},
            ],
        ),
    )
    app = make_app(server)

    async def scenario(pilot: Pilot[int]) -> None:
        await connected(pilot)
        await pilot.press("n")
        assert isinstance(app.screen, PathScreen)
        box = app.screen.query_one("#path", Input)
        box.value = str(tmp_path)  # typing a long path key by key is slow: type the end only
        await pilot.press(*"/missing.json", "enter")
        assert isinstance(app.screen, PathScreen)  # stays, and says why
        assert "missing.json" in static_text(app, "#path-error")
        box.value = str(path)
        await pilot.press("enter")
        assert isinstance(app.screen, ParamsScreen)
        await pilot.press("1", "0", "enter")  # n = 10; Enter on the last field starts it
        await wait_for(pilot, lambda: isinstance(app.screen, AttachedScreen), "attached")
        first = app.screen
        assert isinstance(first, AttachedScreen)
        model = app.store.job(first.job_id)
        await wait_for(pilot, lambda: model.outputs.get("sum") == 13, "sum = 13")
        assert model.workflow_id == "adder"
        # r runs the same graph with the same params again, and attaches to the new job.
        await pilot.press("r")
        await wait_for(
            pilot,
            lambda: isinstance(app.screen, AttachedScreen) and app.screen is not first,
            "rerun attached",
        )
        second = app.screen
        assert isinstance(second, AttachedScreen)
        assert second.job_id != first.job_id
        rerun = app.store.job(second.job_id)
        await wait_for(pilot, lambda: rerun.outputs.get("sum") == 13, "rerun sum = 13")
        row = await asyncio.to_thread(server.call, lambda client: client.get_job(second.job_id))
        assert row["params"] == {"n": 10}

    run_app(app, scenario)


@pytest.mark.parametrize(
    ("strategy", "outcome"),
    [
        ("threaded", "failed"),  # in-process: ends with its server, the last lines follow
        ("subprocess", "completed"),  # survives the restart: what it said meanwhile follows
    ],
)
def test_reconnect_after_server_restart_resumes_at_the_right_seq(
    server: ServerProcess, strategy: str, outcome: str
) -> None:
    count = 2000 if strategy == "threaded" else 300
    job = server.start_job(emitter(count, interval=0.01), execution_strategy=strategy)
    app = make_app(server, job_id=job)

    async def scenario(pilot: Pilot[int]) -> None:
        model = app.store.job(job)
        await wait_for(pilot, lambda: model.last_seq >= 20, "some lines")
        await asyncio.to_thread(server.stop)
        await wait_for(pilot, lambda: app.store.connection.state is ConnState.DISCONNECTED, "lost")
        bar = app.screen.query_one(ConnectionBar)
        await wait_for(pilot, lambda: "connection lost" in str(bar.render()), "lost shown")
        shown = model.last_seq
        screen = app.screen
        assert isinstance(screen, AttachedScreen)
        await wait_for(pilot, lambda: seqs(screen)[-1:] == [shown], "shown up to the loss")
        await asyncio.to_thread(server.start)
        await connected(pilot)
        await wait_for(pilot, lambda: model.is_finished, "job ended")
        assert model.status == outcome
        await wait_for(pilot, lambda: seqs(screen)[-1:] == [model.last_seq], "all shown")
        # The server closes its WebSockets before it stops the jobs (threaded: failed), and
        # a subprocess job runs on: either way there is more after the last seq shown.
        assert model.last_seq > shown
        assert seqs(screen) == list(range(1, model.last_seq + 1))  # none twice, none missing
        assert model.duplicates == 0
        assert (job, shown) in app.backend.resumes  # asked for exactly what came after
        assert "connected" in str(bar.render())

    run_app(app, scenario)


def test_starts_without_a_server_and_connects_when_it_comes(server: ServerProcess) -> None:
    server.stop()
    app = make_app(server)

    async def scenario(pilot: Pilot[int]) -> None:
        await wait_for(pilot, lambda: app.store.connection.attempts >= 2, "retrying")
        assert "connection lost" in str(app.screen.query_one(ConnectionBar).render())
        await asyncio.to_thread(server.start)
        await connected(pilot)

    run_app(app, scenario)
