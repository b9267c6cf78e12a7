"""The TUI's data model and workflow-file reading (plain functions, no app, no server)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from nodejob_tui.formatting import format_duration, format_progress
from nodejob_tui.model import SCROLLBACK_LINES, JobModel, JobStore, LineKind
from nodejob_tui.workflow_file import (
    WorkflowFileError,
    load_workflow_file,
    parse_value,
    show_value,
)

if TYPE_CHECKING:
    from pathlib import Path


def msg(seq: int, kind: str = "log_update", **fields: Any) -> dict[str, Any]:
    return {"type": kind, "job_id": "j", "seq": seq, **fields}


def test_each_seq_is_applied_once_and_last_seq_is_where_to_resume() -> None:
    model = JobModel("j")
    assert model.apply(msg(1, "job_update", status="starting"))
    assert model.apply(msg(2, content="a"))
    assert not model.apply(msg(2, content="a"))  # a replay after a reconnect
    assert not model.apply(msg(1, "job_update", status="starting"))
    assert model.apply(msg(3, content="b"))
    assert model.last_seq == 3
    assert model.duplicates == 2
    assert [line.seq for line in model.log] == [1, 2, 3]


def test_a_gap_moves_the_cursor_and_is_recorded() -> None:
    model = JobModel("j")
    model.apply(msg(1, "job_update", status="starting"))
    model.apply(msg(500, "gap", from_seq=2, to_seq=500))
    model.apply(msg(501, content="after"))
    assert model.gaps == [(2, 500)]
    assert model.last_seq == 501
    assert [line.kind for line in model.log] == [LineKind.JOB, LineKind.GAP, LineKind.LOG]


def test_scrollback_is_bounded() -> None:
    model = JobModel("j")
    for seq in range(1, SCROLLBACK_LINES + 11):
        model.apply(msg(seq, content=str(seq)))
    assert len(model.log) == SCROLLBACK_LINES
    assert model.log[0].seq == 11


def test_a_terminal_status_is_never_undone_by_a_stale_row() -> None:
    model = JobModel("j")
    model.apply(msg(1, "job_update", status="starting"))
    model.apply(msg(2, "job_update", status="running"))
    model.apply(msg(3, "job_update", status="cancelled"))
    model.merge_row({"id": "j", "status": "running", "last_seq": 2})
    assert model.status == "cancelled"
    assert model.row_last_seq == 3


def test_progress_counts_declared_nodes_and_partial_progress() -> None:
    model = JobModel("j")
    model.set_graph({"nodes": [{"id": "a", "type": "t"}, {"id": "b", "type": "t"}], "edges": []})
    model.apply(msg(1, "node_update", node_id="a", status="completed"))
    model.apply(msg(2, "node_progress", node_id="b", progress=1, total=4))
    assert model.progress() == (0.625, 1, 2)
    assert format_progress(model) == "62% 1/2"
    unknown = JobModel("k")
    unknown.apply(msg(1, "node_update", node_id="a", status="completed"))
    assert format_progress(unknown) == "~100% 1/1"  # only the nodes seen so far


def test_outputs_and_rerun_data() -> None:
    store = JobStore("http://x")
    model = store.merge_row(
        {"id": "j", "status": "completed", "workflow_id": "w", "execution_strategy": "threaded",
         "params": {"n": 1}, "result": {"outputs": {"sum": 5}}, "created_at": "2026-01-01T00:00:00Z"}
    )  # fmt: skip
    assert model.outputs == {"sum": 5}
    assert model.run_data() == {
        "params": {"n": 1},
        "workflow_id": "w",
        "execution_strategy": "threaded",
    }
    model.workflow_id = None
    assert model.run_data() is None  # neither a graph nor a saved workflow to run
    changes = store.take()
    assert changes.jobs == {"j"}
    assert store.take().jobs == set()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.42, "0.4s"), (47.2, "47s"), (70.9, "1m10s"), (3720, "1h02m")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


def test_workflow_file_lists_input_params(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    path.write_text(
        json.dumps(
            {"graph": {"nodes": [{"id": "i", "type": "nodejob.Input", "data": {"name": "n", "value": 2}},
                                 {"id": "o", "type": "nodejob.Output", "data": {"name": "out"}}],
                       "edges": []},
             "workflow_id": "adder", "params": {"n": 7}}
        )
    )  # fmt: skip
    workflow = load_workflow_file(path)
    assert [(p.name, p.default) for p in workflow.inputs] == [("n", 2)]
    assert workflow.params == {"n": 7}
    assert workflow.run_data({"n": 3}, "subprocess") == {
        "graph": workflow.graph,
        "params": {"n": 3},
        "workflow_id": "adder",
        "execution_strategy": "subprocess",
    }


def test_workflow_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(WorkflowFileError, match="No such file"):
        load_workflow_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(WorkflowFileError, match="invalid JSON"):
        load_workflow_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text('{"nodes": 3}')
    with pytest.raises(WorkflowFileError, match="nodes"):
        load_workflow_file(tmp_path / "list.json")


@pytest.mark.parametrize("value", [5, "5", "text", True, None, [1, "a"], {"k": 1.5}])
def test_param_values_round_trip_through_the_form(value: Any) -> None:
    shown = show_value(value)
    assert (parse_value(shown) if shown else None) == value
