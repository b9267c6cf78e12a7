"""The attached screen's node panel: one row per node with its status and a progress bar."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.containers import Horizontal, VerticalScroll
from textual.widgets import Label, ProgressBar

from nodejob_tui.widgets.status import status_text

if TYPE_CHECKING:
    from collections.abc import Iterable

    from textual.app import ComposeResult

    from nodejob_tui.model import NodeState


class NodeRow(Horizontal):
    """``name  [bar] pct  ✓ completed``; a running node without a measure gets a busy bar."""

    def __init__(self, node: NodeState) -> None:
        super().__init__(classes="node-row")
        self.node = node

    def compose(self) -> ComposeResult:
        yield Label(self.node.node_id, classes="node-name", markup=False)
        yield ProgressBar(total=100, show_eta=False, classes="node-bar")
        yield Label("", classes="node-state")

    def on_mount(self) -> None:
        self.show(self.node)

    def show(self, node: NodeState) -> None:
        self.node = node
        bar = self.query_one(ProgressBar)
        fraction = node.fraction
        if fraction is None and node.status == "running":
            bar.update(total=None)  # busy: it runs, but says nothing about how far
        else:
            bar.update(total=100, progress=round((fraction or 0.0) * 100, 1))
        state = status_text(node.status)
        if node.error:
            state.append(f" {node.error}")
        self.query_one(".node-state", Label).update(state)
        self.query_one(".node-name", Label).tooltip = node.node_type or None


class NodeList(VerticalScroll):
    """Rows for nodes in the order they were declared or first seen."""

    can_focus = False

    def show(self, nodes: Iterable[NodeState]) -> None:
        rows = {row.node.node_id: row for row in self.query(NodeRow)}
        new = []
        for node in nodes:
            row = rows.get(node.node_id)
            if row is None:
                new.append(NodeRow(node))
            elif row.is_mounted:
                row.show(node)
        if new:
            self.mount_all(new)
        self.display = bool(rows or new)
