"""Workflow files for the "new job" form: the graph, its label and its ``nodejob.Input`` params.

A file holds the graph itself (``{"nodes", "edges"}``) or ``{"graph", "workflow_id", "params"}``,
as ``nodejob run FILE.json`` reads it. Param values typed in the form are JSON when they parse,
else plain strings (``--param NAME=VALUE`` does the same). Standard library only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

INPUT_TYPE: Final = "nodejob.Input"

JsonObject = dict[str, Any]


class WorkflowFileError(ValueError):
    """The file cannot be read or holds no graph; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class InputParam:
    """One ``nodejob.Input`` node: the param ``name`` and the value used when none is given."""

    name: str
    default: Any = None
    node_id: str = ""


@dataclass(slots=True)
class WorkflowFile:
    path: Path
    graph: JsonObject
    workflow_id: str | None = None
    params: JsonObject = field(default_factory=dict)
    """Param values the file itself gives (they pre-fill the form)."""
    inputs: list[InputParam] = field(default_factory=list)

    def run_data(self, params: JsonObject, strategy: str | None = None) -> JsonObject:
        """The ``run_job`` data that runs this graph with ``params``."""
        data: JsonObject = {"graph": self.graph, "params": params}
        if self.workflow_id is not None:
            data["workflow_id"] = self.workflow_id
        if strategy:
            data["execution_strategy"] = strategy
        return data


def load_workflow_file(path: str | Path) -> WorkflowFile:
    """Read a workflow file; raises `WorkflowFileError` naming the problem."""
    path = Path(path).expanduser()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WorkflowFileError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise WorkflowFileError(f"{path}: not a UTF-8 text file") from None
    except ValueError as exc:
        raise WorkflowFileError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise WorkflowFileError(f"{path}: expected a JSON object")
    graph = document.get("graph")
    params: JsonObject = {}
    workflow_id = None
    if isinstance(graph, dict):
        if isinstance(document.get("params"), dict):
            params = dict(document["params"])
        label = document.get("workflow_id") or document.get("id")
        workflow_id = label if isinstance(label, str) else None
    else:
        graph = document
    nodes = graph.get("nodes")
    if not isinstance(nodes, list) or not isinstance(graph.get("edges", []), list):
        raise WorkflowFileError(
            f'{path}: invalid graph: expected an object with "nodes" and "edges" lists'
        )
    # Like a saved workflow's id, the file's name labels its jobs in the list (only a label:
    # the graph is what runs).
    return WorkflowFile(path, graph, workflow_id or path.stem, params, _inputs(nodes))


def _inputs(nodes: list[Any]) -> list[InputParam]:
    found: dict[str, InputParam] = {}
    for node in nodes:
        if not isinstance(node, dict) or node.get("type") != INPUT_TYPE:
            continue
        data = node.get("data")
        if not isinstance(data, dict):
            data = {}
        name = data.get("name")
        if isinstance(name, str) and name and name not in found:
            found[name] = InputParam(name, data.get("value"), str(node.get("id") or ""))
    return list(found.values())


def parse_value(text: str) -> Any:
    """A typed-in value: JSON when it parses (``5``, ``true``, ``[1]``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def show_value(value: Any) -> str:
    """The form's text for a value, so that `parse_value` gives the value back."""
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
        return json.dumps(value)  # "5" must stay a string, not become 5
    return json.dumps(value, ensure_ascii=False)
