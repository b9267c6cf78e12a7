"""Running a validated Graph: one trio nursery, one task per node, started when its inputs arrive.

run_graph reports everything through an Emitter (node_update, node_progress, output_update,
log_update, without job_id or seq: the caller adds those) and returns the job's outputs. A node
becomes ready when its last input edge delivers, so there is no polling, no event per edge and
no task parked for a node that is not ready. This module imports only the stdlib, trio,
nodejob.protocol and its sibling modules, because the out-of-process worker runs it too:
never apsw, quart, httpx, rich or docker.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

import trio

from nodejob.protocol import MessageType, NodeStatus
from nodejob.workflow.nodes import DRAIN_EVERY

if TYPE_CHECKING:
    from nodejob.workflow.graph import Graph, GraphNode
    from nodejob.workflow.nodes import Node

SEVERITIES: Final = frozenset({"info", "warning", "error"})


class Emitter(Protocol):
    """Where a running graph's messages go."""

    def emit(self, message: dict[str, Any]) -> None:
        """Accept one message (a fresh dict, the caller's to keep); synchronous and cheap."""

    async def drain(self) -> None:
        """Return once the consumer has caught up: the emitter's backpressure."""


class NodeFailed(Exception):
    """A node raised; the job fails with `message`, which is also str(exc)."""

    def __init__(self, node_id: str, message: str) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.message = message

    def __reduce__(self) -> tuple[type[NodeFailed], tuple[str, str]]:
        return (type(self), (self.node_id, self.message))


class NodeContext:
    """What a node's `run` gets besides its inputs: its identity, the job params, messages."""

    __slots__ = ("_emitter", "_outputs", "node_id", "node_type", "params")

    def __init__(
        self,
        node_id: str,
        node_type: str,
        params: dict[str, Any],
        emitter: Emitter,
        outputs: dict[str, Any],
    ) -> None:
        self.node_id = node_id
        self.node_type = node_type
        self.params = params
        self._emitter = emitter
        self._outputs = outputs

    def emit(self, type: str, **fields: Any) -> None:  # noqa: A002 - the message's own word
        """Send a message of `type` with `fields`; node_id is added."""
        self._send({"type": type, "node_id": self.node_id, **fields})

    def progress(self, progress: float, total: float) -> None:
        self._send(
            {
                "type": MessageType.NODE_PROGRESS.value,
                "node_id": self.node_id,
                "progress": progress,
                "total": total,
            }
        )

    def log(self, content: str, severity: str = "info") -> None:
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of info, warning, error, not {severity!r}")
        self._send(
            {
                "type": MessageType.LOG_UPDATE.value,
                "node_id": self.node_id,
                "content": content,
                "severity": severity,
            }
        )

    def set_output(self, name: str, value: Any) -> None:
        """Make `value` the job's `result.outputs[name]` and emit output_update.

        Raises ValueError if another node of this run already set `name`.
        """
        self._store_output(name, value)

    async def drain(self) -> None:
        """Wait for the emitter's consumer to catch up; also a trio checkpoint.

        Cancellation: raises trio.Cancelled when the node is cancelled.
        """
        await self._emitter.drain()
        await trio.lowlevel.checkpoint()

    def _send(self, message: dict[str, Any]) -> None:
        self._emitter.emit(message)

    def _store_output(self, name: str, value: Any) -> None:
        if name in self._outputs:
            raise ValueError(f"output {name!r} was already set by another node")
        self._emitter.emit(  # first: a value too large to send is refused here, not kept
            {
                "type": MessageType.OUTPUT_UPDATE.value,
                "node_id": self.node_id,
                "output_name": name,
                "value": value,
            }
        )
        self._outputs[name] = value


class _ThreadContext(NodeContext):
    """The context of a sync node: every call hops from the worker thread to the trio thread.

    Once the node has ended (completed, failed or abandoned on cancel) the context is closed,
    so a thread that outlives its node can no longer add messages to the job: its calls raise
    RuntimeError instead.
    """

    __slots__ = ("_closed", "_sent")

    def __init__(
        self,
        node_id: str,
        node_type: str,
        params: dict[str, Any],
        emitter: Emitter,
        outputs: dict[str, Any],
    ) -> None:
        super().__init__(node_id, node_type, params, emitter, outputs)
        self._closed = False
        self._sent = 0

    def close(self) -> None:
        self._closed = True

    def set_output(self, name: str, value: Any) -> None:
        trio.from_thread.run_sync(self._guarded, self._store_output, name, value)

    def _send(self, message: dict[str, Any]) -> None:
        self._sent += 1
        trio.from_thread.run_sync(self._guarded, self._emitter.emit, message)
        if self._sent % DRAIN_EVERY == 0:
            trio.from_thread.run(self._drain_guarded)

    def _guarded(self, function: Callable[..., None], *args: Any) -> None:
        # Runs in the trio thread, so the check and the call cannot interleave with close().
        if self._closed:
            raise RuntimeError(f"node {self.node_id!r} has ended; its thread cannot emit")
        function(*args)

    async def _drain_guarded(self) -> None:
        if not self._closed:
            await self._emitter.drain()


async def run_graph(graph: Graph, params: dict[str, Any], emitter: Emitter) -> dict[str, Any]:
    """Run every node of `graph`, each as soon as all its edge inputs have arrived.

    Returns the outputs (Output node name -> value). Emits node_update running when a node
    starts, then completed (with `result`), failed (with `error`) or cancelled.

    Raises NodeFailed for the first node that raises: that node is reported failed (error =
    str(exc), else the exception's class name), every other running node is cancelled and
    reported cancelled, and nodes not yet started never start.

    Cancellation: a cancel from outside cancels every running node, each reported cancelled,
    and trio.Cancelled propagates. Sync plug-in nodes are abandoned in their threads.
    """
    run = _GraphRun(graph, params, emitter)
    await run.run()
    return run.outputs


class _GraphRun:
    """The state of one run_graph call."""

    def __init__(self, graph: Graph, params: dict[str, Any], emitter: Emitter) -> None:
        self.graph = graph
        self.params = params
        self.emitter = emitter
        self.outputs: dict[str, Any] = {}
        self.values: dict[str, Mapping[str, Any]] = {}
        self.waiting = {node.id: len(node.sources) for node in graph.nodes.values()}
        self.failure: NodeFailed | None = None
        self.nursery: trio.Nursery | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            for node in self.graph.nodes.values():
                if not node.sources:
                    nursery.start_soon(self.run_node, node)
        if self.failure is not None:
            raise self.failure

    async def run_node(self, node: GraphNode) -> None:
        # A node scheduled just before a cancel must not report running, then cancelled.
        await trio.lowlevel.checkpoint_if_cancelled()
        inputs = dict(node.constants)
        for name, (source, handle) in node.sources.items():
            inputs[name] = self.values[source][handle]
        self.report(node, NodeStatus.RUNNING)
        try:
            result = await self.call(node, inputs)
            values = _output_values(node.node_class, result)
            self.report(node, NodeStatus.COMPLETED, result=result)
        except Exception as exc:
            self.fail(node, exc)
            return
        except BaseException:  # trio.Cancelled, or a group of them from a node's own nursery
            self.report(node, NodeStatus.CANCELLED)
            raise
        self.values[node.id] = values
        for target in self.graph.dependents[node.id]:
            self.waiting[target] -= 1
            if self.waiting[target] == 0:
                assert self.nursery is not None
                self.nursery.start_soon(self.run_node, self.graph.nodes[target])

    async def call(self, node: GraphNode, inputs: dict[str, Any]) -> Any:
        instance = node.node_class()
        if inspect.iscoroutinefunction(node.node_class.run):
            ctx = NodeContext(node.id, node.type, self.params, self.emitter, self.outputs)
            return await instance.run(ctx, **inputs)
        thread_ctx = _ThreadContext(node.id, node.type, self.params, self.emitter, self.outputs)
        try:
            return await trio.to_thread.run_sync(
                functools.partial(instance.run, thread_ctx, **inputs), abandon_on_cancel=True
            )
        finally:
            thread_ctx.close()

    def fail(self, node: GraphNode, exc: Exception) -> None:
        message = str(exc) or type(exc).__name__
        self.report(node, NodeStatus.FAILED, error=message)
        if self.failure is None:
            self.failure = NodeFailed(node.id, message)
            self.failure.__cause__ = exc
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()

    def report(self, node: GraphNode, status: NodeStatus, **fields: Any) -> None:
        self.emitter.emit(
            {
                "type": MessageType.NODE_UPDATE.value,
                "node_id": node.id,
                "node_type": node.type,
                "status": status.value,
                **fields,
            }
        )


def _output_values(node_class: type[Node], result: Any) -> Mapping[str, Any]:
    """Map what run returned onto the node's output handles."""
    outputs = node_class.outputs
    if len(outputs) == 1:
        return {outputs[0]: result}
    if not outputs:
        return {}
    if not isinstance(result, Mapping) or any(name not in result for name in outputs):
        raise TypeError(
            f"{node_class.__qualname__}.run must return a mapping with keys {', '.join(outputs)}"
        )
    return {name: result[name] for name in outputs}
