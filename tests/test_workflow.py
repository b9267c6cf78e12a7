"""The workflow engine: graph validation, every standard node, concurrency, failure, cancel.

Runs the real engine against a small real Emitter that records messages; sleeping nodes run
under trio's autojump MockClock, so time is virtual and assertions never depend on the wall
clock.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
import textwrap
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio

from nodejob.workflow import (
    Graph,
    GraphError,
    InputSpec,
    Node,
    NodeContext,
    NodeFailed,
    NodeRegistry,
    default_registry,
    nodes,
    run_graph,
    validate_graph,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STANDARD_TYPES = [
    f"nodejob.{name}"
    for name in ("Input", "Output", "Constant", "Add", "Format", "Sleep", "Emit", "Fail")
]


class Recorder:
    """A real Emitter: keeps every message with the (virtual) time it arrived."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.drains = 0
        self._arrived = trio.Event()

    def emit(self, message: dict[str, Any]) -> None:
        assert "job_id" not in message
        assert "seq" not in message
        self.messages.append(message)
        self.times.append(trio.current_time())
        self._arrived.set()
        self._arrived = trio.Event()

    async def drain(self) -> None:
        self.drains += 1
        await trio.lowlevel.checkpoint()

    def of(self, **fields: Any) -> list[dict[str, Any]]:
        return [m for m in self.messages if all(m.get(k) == v for k, v in fields.items())]

    def index(self, **fields: Any) -> int:
        return self.messages.index(self.of(**fields)[0])

    def statuses(self, node_id: str) -> list[str]:
        return [m["status"] for m in self.of(type="node_update", node_id=node_id)]

    async def wait_for(self, **fields: Any) -> None:
        while True:
            arrived = self._arrived
            if self.of(**fields):
                return
            await arrived.wait()


def node(node_id: str, type_name: str, **data: Any) -> dict[str, Any]:
    if "." not in type_name:
        type_name = f"nodejob.{type_name}"
    return {"id": node_id, "type": type_name, "data": data}


def edge(source: str, target: str, handle: str, source_handle: str = "output") -> dict[str, Any]:
    return {
        "source": source,
        "sourceHandle": source_handle,
        "target": target,
        "targetHandle": handle,
    }


async def run(
    nodes: list[dict[str, Any]],
    edges: Sequence[dict[str, Any]] = (),
    params: dict[str, Any] | None = None,
    registry: NodeRegistry | None = None,
) -> tuple[dict[str, Any], Recorder]:
    recorder = Recorder()
    graph = validate_graph({"nodes": nodes, "edges": list(edges)}, registry)
    outputs = await run_graph(graph, params or {}, recorder)
    return outputs, recorder


async def run_failing(
    nodes: list[dict[str, Any]],
    edges: Sequence[dict[str, Any]] = (),
) -> tuple[NodeFailed, Recorder]:
    recorder = Recorder()
    graph = validate_graph({"nodes": nodes, "edges": list(edges)})
    with pytest.raises(NodeFailed) as caught:
        await run_graph(graph, {}, recorder)
    return caught.value, recorder


async def run_cancelled(
    graph: Graph, recorder: Recorder, **started: Any
) -> tuple[trio.CancelScope, bool]:
    """Run `graph` until a message matching `started` arrives, then cancel it from outside."""
    scope = trio.CancelScope()
    returned = False

    async def runner() -> None:
        nonlocal returned
        with scope:
            await run_graph(graph, {}, recorder)
            returned = True

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner)
            await recorder.wait_for(**started)
            scope.cancel()
    return scope, returned


# --- validation ------------------------------------------------------------------------------

C1 = node("a", "Constant", value=1)
ADD_B = node("b", "Add", b=1)

INVALID = {
    "not an object": ([], "graph must be an object"),
    "nodes not a list": ({"nodes": {}}, "graph.nodes must be a list"),
    "edges not a list": ({"edges": "x"}, "graph.edges must be a list"),
    "node not an object": ({"nodes": ["a"]}, "node 0: must be an object"),
    "id not a string": ({"nodes": [C1, {"id": 3}]}, "node 1: id must be a string"),
    "empty id": ({"nodes": [{"id": ""}]}, "node 0: id must not be empty"),
    "duplicate id": ({"nodes": [C1, C1]}, "duplicate node id 'a'"),
    "type missing": ({"nodes": [{"id": "a"}]}, "node 'a': type must be a string"),
    "unknown type": (
        {"nodes": [C1, node("b", "Nope")]},
        "node 'b': unknown node type 'nodejob.Nope'",
    ),
    "data not an object": (
        {"nodes": [{"id": "a", "type": "nodejob.Constant", "data": [1]}]},
        "node 'a': data must be an object",
    ),
    "data key is not an input": (
        {"nodes": [node("a", "Constant", valeu=1)]},
        "node 'a': nodejob.Constant has no input 'valeu' (inputs: value)",
    ),
    "missing required input": (
        {"nodes": [node("x", "Add", a=1)]},
        "node 'x': missing required input 'b'",
    ),
    "edge not an object": ({"nodes": [C1], "edges": [7]}, "edge 0: must be an object"),
    "edge without source": (
        {"nodes": [C1, ADD_B], "edges": [{"target": "b", "targetHandle": "a"}]},
        "edge 0: source must be a string",
    ),
    "edge without targetHandle": (
        {"nodes": [C1, ADD_B], "edges": [{"source": "a", "target": "b"}]},
        "edge 0: targetHandle must be a string",
    ),
    "missing source node": (
        {"nodes": [ADD_B], "edges": [edge("zz", "b", "a")]},
        "edge 0: source node 'zz' does not exist",
    ),
    "missing target node": (
        {
            "nodes": [C1, node("b", "Add"), node("c", "Add", b=2)],
            "edges": [edge("a", "b", "a"), edge("a", "b", "b"), edge("b", "zz", "a")],
        },
        "edge 2: target node 'zz' does not exist",
    ),
    "missing output handle": (
        {"nodes": [C1, ADD_B], "edges": [edge("a", "b", "a", source_handle="foo")]},
        "edge 0: node 'a' has no output 'foo' (outputs: output)",
    ),
    "node without outputs as source": (
        {
            "nodes": [C1, node("o", "Output", name="x"), ADD_B],
            "edges": [edge("a", "o", "value"), edge("o", "b", "a")],
        },
        "edge 1: node 'o' has no output 'output' (outputs: none)",
    ),
    "missing input handle": (
        {"nodes": [C1, ADD_B], "edges": [edge("a", "b", "a"), edge("a", "b", "q")]},
        "edge 1: node 'b' has no input 'q' (inputs: a, b)",
    ),
    "input fed twice": (
        {"nodes": [C1, ADD_B], "edges": [edge("a", "b", "a"), edge("a", "b", "a")]},
        "edge 1: input 'a' of node 'b' is already fed by edge 0",
    ),
    "two outputs with one name": (
        {
            "nodes": [
                node("o1", "Output", name="x", value=1),
                node("o2", "Output", name="x", value=2),
            ]
        },
        "node 'o2': output name 'x' is already used by node 'o1'",
    ),
    "cycle of two": (
        {
            "nodes": [node("a", "Add", b=1), ADD_B],
            "edges": [edge("a", "b", "a"), edge("b", "a", "a")],
        },
        "cycle: a -> b -> a",
    ),
    "self loop": (
        {"nodes": [node("a", "Add", b=1)], "edges": [edge("a", "a", "a")]},
        "cycle: a -> a",
    ),
    "cycle behind an entry node": (
        {
            "nodes": [C1, node("b", "Add"), node("c", "Add", b=1), node("d", "Add", b=1)],
            "edges": [
                edge("a", "b", "a"),
                edge("d", "b", "b"),
                edge("b", "c", "a"),
                edge("c", "d", "a"),
            ],
        },
        "cycle: b -> c -> d -> b",
    ),
}


@pytest.mark.parametrize(("graph", "message"), INVALID.values(), ids=INVALID.keys())
def test_invalid_graphs_are_rejected_with_node_and_problem(graph: object, message: str) -> None:
    with pytest.raises(GraphError) as caught:
        validate_graph(graph)
    assert str(caught.value) == message


@pytest.mark.parametrize("graph", [{}, {"nodes": [], "edges": []}, {"nodes": None}])
async def test_an_empty_graph_is_valid_and_completes_with_no_outputs(graph: object) -> None:
    recorder = Recorder()
    assert await run_graph(validate_graph(graph), {}, recorder) == {}
    assert recorder.messages == []


def test_validated_graph_is_in_topological_order_with_resolved_inputs() -> None:
    graph = validate_graph(
        {
            "nodes": [node("out", "Output", name="sum"), ADD_B, node("a", "Constant", value=2)],
            "edges": [
                {"source": "a", "target": "b", "targetHandle": "a"},  # sourceHandle defaulted
                {"source": "b", "sourceHandle": None, "target": "out", "targetHandle": "value"},
            ],
        }
    )
    assert list(graph.nodes) == ["a", "b", "out"]
    assert dict(graph.nodes["b"].constants) == {"b": 1}
    assert dict(graph.nodes["b"].sources) == {"a": ("a", "output")}
    assert graph.dependents["a"] == ("b",)


# --- messages and the standard nodes ---------------------------------------------------------

HELLO = json.loads((EXAMPLES / "hello.json").read_text())


async def test_hello_emits_exactly_these_messages_in_order() -> None:
    recorder = Recorder()
    outputs = await run_graph(validate_graph(HELLO), {}, recorder)
    assert outputs == {"sum": 5}

    def update(node_id: str, node_type: str, status: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": "node_update",
            "node_id": node_id,
            "node_type": f"nodejob.{node_type}",
            "status": status,
            **fields,
        }

    assert recorder.messages == [
        update("a", "Constant", "running"),
        update("a", "Constant", "completed", result=2),
        update("b", "Add", "running"),
        update("b", "Add", "completed", result=5),
        update("out", "Output", "running"),
        {"type": "output_update", "node_id": "out", "output_name": "sum", "value": 5},
        update("out", "Output", "completed", result=5),
    ]


@pytest.mark.parametrize(
    ("params", "data", "expected"),
    [
        ({"x": 7}, {"value": 1}, 7),
        ({}, {"value": 1}, 1),
        ({}, {}, None),
        ({"x": None}, {"value": 1}, None),
    ],
)
async def test_input_is_the_job_param_else_its_value(
    params: dict[str, Any], data: dict[str, Any], expected: Any
) -> None:
    outputs, _ = await run(
        [node("in", "Input", name="x", **data), node("out", "Output", name="x")],
        [edge("in", "out", "value")],
        params=params,
    )
    assert outputs == {"x": expected}


async def test_an_edge_input_overrides_data() -> None:
    outputs, _ = await run(
        [
            node("five", "Constant", value=5),
            node("b", "Add", a=100, b=1),
            node("o", "Output", name="r"),
        ],
        [edge("five", "b", "a"), edge("b", "o", "value")],
    )
    assert outputs == {"r": 6}


async def test_constant_add_and_format() -> None:
    outputs, recorder = await run(
        [
            node("c", "Constant", value={"nested": [1, 2]}),
            node("s", "Add", a="node", b="job"),
            node("greet", "Format", template="{hi}, {who}!", values={"hi": "Hello", "who": "you"}),
            node("plain", "Format", template="no {{fields}}"),
            node("o1", "Output", name="c"),
            node("o2", "Output", name="s"),
            node("o3", "Output", name="greet"),
            node("o4", "Output", name="plain"),
        ],
        [
            edge("c", "o1", "value"),
            edge("s", "o2", "value"),
            edge("greet", "o3", "value"),
            edge("plain", "o4", "value"),
        ],
    )
    assert outputs == {
        "c": {"nested": [1, 2]},
        "s": "nodejob",
        "greet": "Hello, you!",
        "plain": "no {fields}",
    }
    published = {m["output_name"]: m["value"] for m in recorder.of(type="output_update")}
    assert published == outputs


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (node("n", "Add", a=1, b="x"), "unsupported operand type(s) for +: 'int' and 'str'"),
        (node("n", "Format", template="{who}"), "template field 'who' is not in values"),
        (node("n", "Sleep", seconds=-1), "seconds must be a non-negative number, not -1"),
        (node("n", "Emit", count="many"), "count must be a non-negative integer, not 'many'"),
        (node("n", "Input", name=3), "name must be a string, not int"),
    ],
)
async def test_a_node_error_fails_the_job_with_its_message(
    bad: dict[str, Any], message: str
) -> None:
    failure, recorder = await run_failing([bad])
    assert (failure.node_id, failure.message, str(failure)) == ("n", message, message)
    assert recorder.of(type="node_update", node_id="n", status="failed")[0]["error"] == message


async def test_sleep_reports_progress_ten_times_a_second(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    outputs, recorder = await run(
        [node("nap", "Sleep", seconds="1", value="awake"), node("o", "Output", name="nap")],
        [edge("nap", "o", "value")],
    )
    assert outputs == {"nap": "awake"}
    progress = recorder.of(type="node_progress", node_id="nap")
    assert [m["progress"] for m in progress] == pytest.approx([i / 10 for i in range(10)] + [1])
    assert {m["total"] for m in progress} == {1}
    assert trio.current_time() - start == pytest.approx(1)


async def test_emit_sends_count_log_lines_of_size_and_drains_every_hundred() -> None:
    outputs, recorder = await run(
        [
            node("e", "Emit", count=250, size=7),
            node("d", "Emit", count=2),
            node("z", "Emit", count=0),
            node("o", "Output", name="n"),
        ],
        [edge("e", "o", "value")],
    )
    assert outputs == {"n": 250}
    lines = recorder.of(type="log_update", node_id="e")
    assert len(lines) == 250
    assert lines[0] == {
        "type": "log_update",
        "node_id": "e",
        "content": lines[0]["content"],
        "severity": "info",
    }
    assert {len(m["content"]) for m in lines} == {7}
    assert [len(m["content"]) for m in recorder.of(type="log_update", node_id="d")] == [100, 100]
    assert recorder.of(type="log_update", node_id="z") == []
    assert recorder.of(node_id="z", status="completed")[0]["result"] == 0
    assert recorder.drains == 2


async def test_emit_spaces_lines_by_interval(autojump_clock: trio.testing.MockClock) -> None:
    _, recorder = await run([node("e", "Emit", count=3, interval=0.5)])
    times = [
        t
        for m, t in zip(recorder.messages, recorder.times, strict=True)
        if m["type"] == "log_update"
    ]
    assert [t - times[0] for t in times] == pytest.approx([0, 0.5, 1.0])


async def test_fail_fails_the_job_with_exactly_its_message() -> None:
    failure, recorder = await run_failing([node("boom", "Fail", message="boom: exact text ")])
    assert (failure.node_id, failure.message, str(failure)) == (
        "boom",
        "boom: exact text ",
        "boom: exact text ",
    )
    assert recorder.messages[-1] == {
        "type": "node_update",
        "node_id": "boom",
        "node_type": "nodejob.Fail",
        "status": "failed",
        "error": "boom: exact text ",
    }
    assert pickle.loads(pickle.dumps(failure)).node_id == "boom"


async def test_two_outputs_setting_one_name_at_run_time_fail() -> None:
    failure, recorder = await run_failing(
        [
            node("name", "Constant", value="x"),
            node("o1", "Output", name="x", value=1),
            node("o2", "Output", value=2),
        ],
        [edge("name", "o2", "name")],
    )
    assert failure.message == "output 'x' was already set by another node"
    assert len(recorder.of(type="output_update")) == 1


# --- concurrency, failure and cancellation ---------------------------------------------------


async def test_independent_nodes_run_concurrently(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    outputs, recorder = await run(
        [
            node("s1", "Sleep", seconds=0.2, value=1),
            node("s2", "Sleep", seconds=0.2, value=2),
            node("o1", "Output", name="one"),
            node("o2", "Output", name="two"),
        ],
        [edge("s1", "o1", "value"), edge("s2", "o2", "value")],
    )
    assert outputs == {"one": 1, "two": 2}
    both_running = max(recorder.index(node_id=n, status="running") for n in ("s1", "s2"))
    first_done = min(recorder.index(node_id=n, status="completed") for n in ("s1", "s2"))
    assert both_running < first_done
    assert recorder.index(node_id="s1", status="completed") < recorder.index(
        node_id="o1", status="running"
    )
    # In virtual time, the two 0.2 s sleeps overlapped instead of adding up.
    assert trio.current_time() - start == pytest.approx(0.2)


async def test_a_failure_cancels_the_running_siblings_and_nothing_new_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failure, recorder = await run_failing(
        [
            node("slow", "Sleep", seconds=3600),
            node("later", "Output", name="never"),
            node("countdown", "Sleep", seconds=1, value="it broke"),
            node("boom", "Fail"),
        ],
        [edge("slow", "later", "value"), edge("countdown", "boom", "message")],
    )
    assert (failure.node_id, failure.message) == ("boom", "it broke")
    assert recorder.statuses("slow") == ["running", "cancelled"]
    assert recorder.statuses("boom") == ["running", "failed"]
    assert recorder.statuses("later") == []
    assert recorder.index(node_id="boom", status="failed") < recorder.index(
        node_id="slow", status="cancelled"
    )


async def test_an_outer_cancel_reports_running_nodes_cancelled_and_propagates() -> None:
    graph = validate_graph(
        {
            "nodes": [
                node("c", "Constant", value=1),
                node("slow", "Sleep", seconds=3600),
                node("emit", "Emit", count=10**9),
                node("later", "Output", name="never"),
            ],
            "edges": [edge("slow", "later", "value")],
        }
    )
    recorder = Recorder()
    scope, returned = await run_cancelled(graph, recorder, type="log_update", node_id="emit")
    assert scope.cancelled_caught
    assert not returned
    assert recorder.statuses("c") == ["running", "completed"]
    assert recorder.statuses("slow") == ["running", "cancelled"]
    assert recorder.statuses("emit") == ["running", "cancelled"]
    assert recorder.statuses("later") == []


# --- plug-in nodes ---------------------------------------------------------------------------


class Split(Node):
    type = "test.Split"
    inputs = {"value": InputSpec(required=True)}
    outputs = ("low", "high")

    async def run(self, ctx: NodeContext, *, value: int) -> Any:
        return {"low": value - 1, "high": value + 1} if value else "not a mapping"


class InThread(Node):
    """A sync node: it must run in a worker thread and still be able to talk."""

    type = "test.InThread"
    inputs = {"count": InputSpec(default=1)}

    def run(self, ctx: NodeContext, *, count: int) -> int:
        for number in range(count):
            ctx.log(f"line {number}", severity="warning")
        ctx.progress(1, 2)
        ctx.set_output("thread", threading.current_thread().name)
        return threading.get_ident()


def registry_with(*node_classes: type[Node]) -> NodeRegistry:
    registry = NodeRegistry.standard()
    for node_class in node_classes:
        registry.register(node_class)
    return registry


async def test_a_node_with_several_outputs_feeds_each_handle() -> None:
    outputs, _ = await run(
        [
            node("n", "Constant", value=10),
            node("s", "test.Split"),
            node("lo", "Output", name="lo"),
            node("hi", "Output", name="hi"),
        ],
        [
            edge("n", "s", "value"),
            edge("s", "lo", "value", "low"),
            edge("s", "hi", "value", "high"),
        ],
        registry=registry_with(Split),
    )
    assert outputs == {"lo": 9, "hi": 11}
    with pytest.raises(
        GraphError, match=r"^edge 0: node 's' has no output 'output' \(outputs: low, high\)$"
    ):
        validate_graph(
            {
                "nodes": [node("s", "test.Split", value=1), node("o", "Output", name="x")],
                "edges": [edge("s", "o", "value")],
            },
            registry_with(Split),
        )
    recorder = Recorder()
    graph = validate_graph({"nodes": [node("s", "test.Split", value=0)]}, registry_with(Split))
    with pytest.raises(NodeFailed, match=r"^Split\.run must return a mapping with keys low, high$"):
        await run_graph(graph, {}, recorder)


async def test_a_sync_plugin_node_runs_in_a_thread_and_can_emit() -> None:
    outputs, recorder = await run(
        [node("t", "test.InThread", count=250)], registry=registry_with(InThread)
    )
    assert outputs["thread"] != threading.current_thread().name
    result = recorder.of(node_id="t", status="completed")[0]["result"]
    assert result != threading.get_ident()
    types = [m["type"] for m in recorder.messages]
    assert types == ["node_update"] + ["log_update"] * 250 + [
        "node_progress",
        "output_update",
        "node_update",
    ]
    assert recorder.messages[1] == {
        "type": "log_update",
        "node_id": "t",
        "content": "line 0",
        "severity": "warning",
    }
    assert recorder.drains == 2


async def test_a_blocked_sync_node_is_abandoned_on_cancel_and_cannot_emit_afterwards() -> None:
    release, finished = threading.Event(), threading.Event()
    late_errors: list[str] = []

    class Stuck(Node):
        type = "test.Stuck"

        def run(self, ctx: NodeContext) -> None:
            ctx.log("waiting")
            release.wait()
            try:
                ctx.log("too late")
            except RuntimeError as exc:
                late_errors.append(str(exc))
            finally:
                finished.set()

    graph = validate_graph({"nodes": [node("stuck", "test.Stuck")]}, registry_with(Stuck))
    recorder = Recorder()
    scope, returned = await run_cancelled(graph, recorder, type="log_update")
    assert scope.cancelled_caught
    assert not returned
    assert recorder.statuses("stuck") == ["running", "cancelled"]
    release.set()
    with trio.fail_after(10):
        await trio.to_thread.run_sync(finished.wait, abandon_on_cancel=True)
    assert late_errors == ["node 'stuck' has ended; its thread cannot emit"]
    assert recorder.of(content="too late") == []


async def test_an_exception_without_text_is_reported_by_its_class_name() -> None:
    class Quiet(Node):
        type = "test.Quiet"

        async def run(self, ctx: NodeContext) -> None:
            raise LookupError

    recorder = Recorder()
    graph = validate_graph({"nodes": [node("q", "test.Quiet")]}, registry_with(Quiet))
    with pytest.raises(NodeFailed, match=r"^LookupError$"):
        await run_graph(graph, {}, recorder)
    assert recorder.messages[-1]["error"] == "LookupError"


def test_registry_registers_checks_and_refuses_clashes() -> None:
    registry = NodeRegistry.standard()
    assert registry.types() == sorted(STANDARD_TYPES)
    assert registry.get("nodejob.Nope") is None
    assert registry.register(Split) is Split
    registry.register(Split)  # the same class again is harmless

    class OtherAdd(Node):
        type = "nodejob.Add"

        async def run(self, ctx: NodeContext) -> None: ...

    with pytest.raises(
        ValueError,
        match=r"^node type 'nodejob\.Add' is already registered by nodejob\.workflow\.nodes\.Add$",
    ):
        registry.register(OtherAdd)
    with pytest.raises(TypeError, match="is not a Node subclass"):
        registry.register(dict)  # type: ignore[type-var]

    class Untyped(Node):
        async def run(self, ctx: NodeContext) -> None: ...

    with pytest.raises(TypeError, match=r"Untyped.type must be a non-empty string"):
        registry.register(Untyped)


def test_default_registry_is_cached_and_has_every_standard_node() -> None:
    assert default_registry() is default_registry()
    assert set(STANDARD_TYPES) <= set(default_registry().types())


PLUGIN_MODULE = """
from nodejob.workflow import InputSpec, Node

class Double(Node):
    type = "plugin.Double"
    inputs = {"value": InputSpec(required=True)}

    async def run(self, ctx, *, value):
        return value * 2

class Triple(Node):
    type = "plugin.Triple"
    inputs = {"value": InputSpec(required=True)}

    async def run(self, ctx, *, value):
        return value * 3

class Clash(Node):
    type = "nodejob.Add"

    async def run(self, ctx):
        return 0

MORE = [Triple]
NOT_A_NODE = 42
"""

PLUGIN_ENTRY_POINTS = """
[nodejob.nodes]
double = nodejob_test_plugin:Double
more = nodejob_test_plugin:MORE
missing = nodejob_test_plugin_absent:Nope
not_a_node = nodejob_test_plugin:NOT_A_NODE
clash = nodejob_test_plugin:Clash
"""


async def test_plugins_load_from_entry_points_and_broken_ones_are_logged_and_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "nodejob_test_plugin.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    dist_info = tmp_path / "nodejob_test_plugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: nodejob-test-plugin\nVersion: 1.0\n"
    )
    (dist_info / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with caplog.at_level(logging.ERROR, logger="nodejob.workflow.nodes"):
            registry = NodeRegistry.with_plugins()
    finally:
        sys.modules.pop("nodejob_test_plugin", None)
    assert {"plugin.Double", "plugin.Triple"} <= set(registry.types())
    assert registry.get("nodejob.Add") is nodes.Add
    skipped = {record.args[0] for record in caplog.records}  # type: ignore[index]
    assert skipped == {"missing", "not_a_node", "clash"}
    outputs, _ = await run(
        [node("d", "plugin.Double", value=21), node("o", "Output", name="x")],
        [edge("d", "o", "value")],
        registry=registry,
    )
    assert outputs == {"x": 42}


# --- the examples ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_every_example_is_a_valid_graph(path: Path) -> None:
    validate_graph(json.loads(path.read_text()))


async def test_sleepy_example_finishes_with_its_outputs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    graph = validate_graph(json.loads((EXAMPLES / "sleepy.json").read_text()))
    recorder = Recorder()
    start = trio.current_time()
    assert await run_graph(graph, {"seconds": "2"}, recorder) == {"mood": "rested", "lines": 20}
    assert len(recorder.of(type="log_update")) == 20
    assert trio.current_time() - start == pytest.approx(3.8)  # 20 lines 0.2 s apart outlast 2 s


async def test_fail_example_fails_and_cancels_its_long_nap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    graph = validate_graph(json.loads((EXAMPLES / "fail.json").read_text()))
    recorder = Recorder()
    with pytest.raises(NodeFailed) as caught:
        await run_graph(graph, {}, recorder)
    assert (caught.value.node_id, caught.value.message) == (
        "boom",
        "this workflow fails on purpose",
    )
    assert recorder.statuses("long_nap") == ["running", "cancelled"]


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{a:>999999999}", "format width 999999999"),
        ("{a:.{w}}", "nested replacement fields"),
    ],
)
async def test_format_refuses_templates_that_would_exhaust_memory(template, fragment) -> None:
    graph = validate_graph(
        {
            "nodes": [
                {
                    "id": "f",
                    "type": "nodejob.Format",
                    "data": {"template": template, "values": {"a": "x", "w": 10**9}},
                }
            ]
        }
    )
    with pytest.raises(NodeFailed, match=fragment):
        await run_graph(graph, {}, Recorder())


async def test_add_refuses_results_that_would_exhaust_memory() -> None:
    big = "x" * (3 * 1024 * 1024)
    graph = validate_graph(
        {"nodes": [{"id": "a", "type": "nodejob.Add", "data": {"a": big, "b": big}}]}
    )
    with pytest.raises(NodeFailed, match="result too large"):
        await run_graph(graph, {}, Recorder())
