"""The workflow engine: validate a node graph, run its nodes concurrently, report by messages.

Used by the server (threaded jobs, validation before a job starts) and by the out-of-process
worker, so this package imports only the stdlib, trio and nodejob.protocol: never apsw, quart,
httpx, rich or docker.
"""

from nodejob.workflow.graph import Edge, Graph, GraphError, GraphNode, validate_graph
from nodejob.workflow.nodes import (
    STANDARD_NODES,
    InputSpec,
    Node,
    NodeRegistry,
    default_registry,
)
from nodejob.workflow.runner import Emitter, NodeContext, NodeFailed, run_graph

__all__ = [
    "STANDARD_NODES",
    "Edge",
    "Emitter",
    "Graph",
    "GraphError",
    "GraphNode",
    "InputSpec",
    "Node",
    "NodeContext",
    "NodeFailed",
    "NodeRegistry",
    "default_registry",
    "run_graph",
    "validate_graph",
]
