"""Workflow graphs: untrusted JSON in, a validated, immutable Graph out.

validate_graph checks a graph (from a WebSocket frame, a REST body, a saved workflow or the
worker's stdin) against the node registry before any job starts, and raises GraphError with a
message that names the node or edge and the problem. It does no I/O and imports only the
stdlib and the node registry: never apsw, quart, httpx, rich or docker.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeAlias

from nodejob.workflow.nodes import OUTPUT_TYPE, Node, NodeRegistry, default_registry

if TYPE_CHECKING:
    from collections.abc import Mapping

_NodeClass: TypeAlias = type[Node]  # the dataclasses below have a field called `type`


class GraphError(ValueError):
    """A graph is malformed; the message names the node or edge and the problem."""


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    source_handle: str
    target: str
    target_handle: str


@dataclass(frozen=True, slots=True)
class GraphNode:
    """One node, resolved: its class, its constant inputs and where its other inputs come from."""

    id: str
    type: str
    node_class: _NodeClass
    constants: Mapping[str, Any]
    """Inputs not fed by an edge: the `data` value, else the InputSpec default."""
    sources: Mapping[str, tuple[str, str]]
    """Inputs fed by an edge: input name -> (source node id, source handle)."""


@dataclass(frozen=True, slots=True)
class Graph:
    nodes: Mapping[str, GraphNode]
    """By id, in a topological order (declaration order among independent nodes)."""
    edges: tuple[Edge, ...]
    dependents: Mapping[str, tuple[str, ...]]
    """Node id -> the target of each of its outgoing edges (one entry per edge)."""


@dataclass(slots=True)
class _RawNode:
    type: str
    node_class: _NodeClass
    data: dict[str, Any]


def validate_graph(graph: object, registry: NodeRegistry | None = None) -> Graph:
    """Check `graph` (the JSON of DESIGN.md "Workflow graphs") and resolve it into a Graph.

    Raises GraphError for anything that could not run: a malformed structure, an unknown node
    type, a `data` key that is not an input, an edge to a missing node or handle, an input fed
    twice, a missing required input, two Output nodes with one name, or a cycle. `{}` is a
    valid, empty graph. `registry` defaults to default_registry().
    """
    if registry is None:
        registry = default_registry()
    if not isinstance(graph, dict):
        raise GraphError("graph must be an object")
    raw_nodes = _parse_nodes(_list(graph, "nodes"), registry)
    edges = _parse_edges(_list(graph, "edges"), raw_nodes)
    sources: dict[str, dict[str, tuple[str, str]]] = {node_id: {} for node_id in raw_nodes}
    for edge in edges:
        sources[edge.target][edge.target_handle] = (edge.source, edge.source_handle)
    _check_required(raw_nodes, sources)
    _check_output_names(raw_nodes, sources)
    order = _topological_order(raw_nodes, edges)
    dependents: dict[str, list[str]] = {node_id: [] for node_id in raw_nodes}
    for edge in edges:
        dependents[edge.source].append(edge.target)
    nodes = {}
    for node_id in order:
        raw = raw_nodes[node_id]
        fed = sources[node_id]
        constants = {
            name: raw.data.get(name, spec.default)
            for name, spec in raw.node_class.inputs.items()
            if name not in fed
        }
        nodes[node_id] = GraphNode(
            id=node_id,
            type=raw.type,
            node_class=raw.node_class,
            constants=MappingProxyType(constants),
            sources=MappingProxyType(fed),
        )
    return Graph(
        nodes=MappingProxyType(nodes),
        edges=tuple(edges),
        dependents=MappingProxyType({key: tuple(value) for key, value in dependents.items()}),
    )


def _list(graph: dict[str, Any], key: str) -> list[Any]:
    value = graph.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise GraphError(f"graph.{key} must be a list")
    return value


def _parse_nodes(raw_nodes: list[Any], registry: NodeRegistry) -> dict[str, _RawNode]:
    nodes: dict[str, _RawNode] = {}
    for index, raw in enumerate(raw_nodes):
        if not isinstance(raw, dict):
            raise GraphError(f"node {index}: must be an object")
        node_id = raw.get("id")
        if not isinstance(node_id, str):
            raise GraphError(f"node {index}: id must be a string")
        if not node_id:
            raise GraphError(f"node {index}: id must not be empty")
        if node_id in nodes:
            raise GraphError(f"duplicate node id {node_id!r}")
        type_name = raw.get("type")
        if not isinstance(type_name, str):
            raise GraphError(f"node {node_id!r}: type must be a string")
        node_class = registry.get(type_name)
        if node_class is None:
            raise GraphError(f"node {node_id!r}: unknown node type {type_name!r}")
        data = raw.get("data")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise GraphError(f"node {node_id!r}: data must be an object")
        for key in data:
            if key not in node_class.inputs:
                raise GraphError(
                    f"node {node_id!r}: {type_name} has no input {key!r} "
                    f"(inputs: {_names(node_class.inputs)})"
                )
        nodes[node_id] = _RawNode(type_name, node_class, data)
    return nodes


def _parse_edges(raw_edges: list[Any], nodes: dict[str, _RawNode]) -> list[Edge]:
    edges: list[Edge] = []
    fed_by: dict[tuple[str, str], int] = {}
    for index, raw in enumerate(raw_edges):
        if not isinstance(raw, dict):
            raise GraphError(f"edge {index}: must be an object")
        source_handle = raw.get("sourceHandle")
        if source_handle is None:
            source_handle = "output"
        for key, value in (
            ("source", raw.get("source")),
            ("target", raw.get("target")),
            ("sourceHandle", source_handle),
            ("targetHandle", raw.get("targetHandle")),
        ):
            if not isinstance(value, str):
                raise GraphError(f"edge {index}: {key} must be a string")
        edge = Edge(raw["source"], source_handle, raw["target"], raw["targetHandle"])
        for role, node_id in (("source", edge.source), ("target", edge.target)):
            if node_id not in nodes:
                raise GraphError(f"edge {index}: {role} node {node_id!r} does not exist")
        if edge.source_handle not in nodes[edge.source].node_class.outputs:
            raise GraphError(
                f"edge {index}: node {edge.source!r} has no output {edge.source_handle!r} "
                f"(outputs: {_names(nodes[edge.source].node_class.outputs)})"
            )
        if edge.target_handle not in nodes[edge.target].node_class.inputs:
            raise GraphError(
                f"edge {index}: node {edge.target!r} has no input {edge.target_handle!r} "
                f"(inputs: {_names(nodes[edge.target].node_class.inputs)})"
            )
        earlier = fed_by.setdefault((edge.target, edge.target_handle), index)
        if earlier != index:
            raise GraphError(
                f"edge {index}: input {edge.target_handle!r} of node {edge.target!r} "
                f"is already fed by edge {earlier}"
            )
        edges.append(edge)
    return edges


def _check_required(
    nodes: dict[str, _RawNode], sources: dict[str, dict[str, tuple[str, str]]]
) -> None:
    for node_id, raw in nodes.items():
        for name, spec in raw.node_class.inputs.items():
            if spec.required and name not in raw.data and name not in sources[node_id]:
                raise GraphError(f"node {node_id!r}: missing required input {name!r}")


def _check_output_names(
    nodes: dict[str, _RawNode], sources: dict[str, dict[str, tuple[str, str]]]
) -> None:
    """Two Output nodes with one constant name would race for one result key."""
    owners: dict[str, str] = {}
    for node_id, raw in nodes.items():
        name = raw.data.get("name")
        if raw.type != OUTPUT_TYPE or "name" in sources[node_id] or not isinstance(name, str):
            continue
        owner = owners.setdefault(name, node_id)
        if owner != node_id:
            raise GraphError(
                f"node {node_id!r}: output name {name!r} is already used by node {owner!r}"
            )


def _topological_order(nodes: dict[str, _RawNode], edges: list[Edge]) -> list[str]:
    """Kahn's algorithm, declaration order first; raises GraphError naming a cycle."""
    pending = dict.fromkeys(nodes, 0)
    successors: dict[str, list[str]] = {node_id: [] for node_id in nodes}
    for edge in edges:
        pending[edge.target] += 1
        successors[edge.source].append(edge.target)
    ready = deque(node_id for node_id, count in pending.items() if count == 0)
    order: list[str] = []
    while ready:
        node_id = ready.popleft()
        order.append(node_id)
        for target in successors[node_id]:
            pending[target] -= 1
            if pending[target] == 0:
                ready.append(target)
    if len(order) < len(nodes):
        raise GraphError("cycle: " + " -> ".join(_find_cycle(pending, edges)))
    return order


def _find_cycle(pending: dict[str, int], edges: list[Edge]) -> list[str]:
    """A cycle among the nodes Kahn's algorithm could not order, as a closed path.

    Each such node has a predecessor that is also unordered, so walking predecessors must
    revisit a node; the walk from that node back to itself, reversed, is a cycle.
    """
    stuck = {node_id for node_id, count in pending.items() if count}
    predecessor: dict[str, str] = {}
    for edge in edges:
        if edge.source in stuck and edge.target in stuck:
            predecessor.setdefault(edge.target, edge.source)
    walk = [next(node_id for node_id in pending if node_id in stuck)]
    seen = {walk[0]: 0}
    while True:
        node_id = predecessor[walk[-1]]
        if node_id in seen:
            cycle = [*walk[seen[node_id] :], node_id]
            return cycle[::-1]
        seen[node_id] = len(walk)
        walk.append(node_id)


def _names(names: Mapping[str, Any] | tuple[str, ...]) -> str:
    return ", ".join(names) or "none"
