"""What the TUI knows about the user's jobs: rows, node states, logs, outputs and gaps.

A plain data model, fed by the backend (REST rows and stream messages) and read by the screens.
It applies each stream message once: a message whose seq is not above the job's last applied
seq is counted as a duplicate and ignored, so ``JobModel.last_seq`` is exactly the seq to
resume after. This module imports only the standard library and ``nodejob.protocol``: no trio,
no Textual, nothing of the server.
"""

from __future__ import annotations

import collections
import enum
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from nodejob.protocol import TERMINAL, JobStatus, MessageType, NodeStatus

SCROLLBACK_LINES: Final = 2000
"""Log lines kept per job (and shown by the attached screen's log pane)."""

_STATUS_RANK: Final = {
    JobStatus.STARTING: 0,
    JobStatus.RUNNING: 1,
    JobStatus.COMPLETED: 2,
    JobStatus.FAILED: 2,
    JobStatus.CANCELLED: 2,
}

JsonObject = dict[str, Any]


class ConnState(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    REFUSED = "refused"


@dataclass(slots=True)
class Connection:
    """The link to the server as the user should see it."""

    url: str
    state: ConnState = ConnState.CONNECTING
    detail: str = ""
    retry_in_s: float | None = None
    attempts: int = 0
    """Failed attempts since the last successful connection."""


@dataclass(slots=True)
class NodeState:
    node_id: str
    node_type: str = ""
    status: str = "pending"
    progress: float | None = None
    total: float | None = None
    error: str | None = None

    @property
    def fraction(self) -> float | None:
        """How far the node is (0..1), or None when it gives no measure yet."""
        if self.status == NodeStatus.COMPLETED:
            return 1.0
        if self.progress is not None and self.total:
            return max(0.0, min(1.0, self.progress / self.total))
        return None


class LineKind(enum.StrEnum):
    LOG = "log"
    NODE = "node"
    OUTPUT = "output"
    JOB = "job"
    GAP = "gap"


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of the attached screen's log pane: a stream message, rendered later."""

    seq: int
    kind: LineKind
    text: str
    node_id: str = ""
    severity: str = "info"


@dataclass(eq=False)
class JobModel:
    """One job: its row (REST) merged with everything its stream said."""

    job_id: str
    status: JobStatus = JobStatus.STARTING
    workflow_id: str | None = None
    strategy: str = ""
    params: JsonObject = field(default_factory=dict)
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    row_last_seq: int = 0
    """The job's last seq according to its row (the server's truth when fetched)."""
    graph: JsonObject | None = None
    """The graph, when known (jobs started here, or a server that exposes it)."""
    last_seq: int = 0
    """The highest seq applied from the stream: where a resumed stream starts."""
    nodes: dict[str, NodeState] = field(default_factory=dict)
    outputs: JsonObject = field(default_factory=dict)
    log: collections.deque[LogLine] = field(
        default_factory=lambda: collections.deque(maxlen=SCROLLBACK_LINES)
    )
    gaps: list[tuple[int, int]] = field(default_factory=list)
    duplicates: int = 0
    """Stream messages ignored because their seq was already applied (should stay 0)."""

    @property
    def is_finished(self) -> bool:
        return self.status in TERMINAL

    def merge_row(self, row: JsonObject) -> None:
        """Take what the REST job object says (a terminal status is never undone)."""
        self._set_status(row.get("status"))
        self.workflow_id = row.get("workflow_id") or self.workflow_id
        self.strategy = row.get("execution_strategy") or self.strategy
        if isinstance(row.get("params"), dict):
            self.params = row["params"]
        self.created_at = parse_time(row.get("created_at")) or self.created_at
        self.started_at = parse_time(row.get("started_at")) or self.started_at
        self.finished_at = parse_time(row.get("finished_at")) or self.finished_at
        self.error = row.get("error") or self.error
        if isinstance(row.get("last_seq"), int):
            self.row_last_seq = max(self.row_last_seq, row["last_seq"])
        if isinstance(row.get("graph"), dict):
            self.graph = row["graph"]
            self._declare_nodes()
        result = row.get("result")
        if isinstance(result, dict) and isinstance(result.get("outputs"), dict):
            self.outputs.update(result["outputs"])

    def set_graph(self, graph: JsonObject) -> None:
        self.graph = graph
        self._declare_nodes()

    def _declare_nodes(self) -> None:
        """List the graph's nodes up front (pending), in the graph's order."""
        nodes = self.graph.get("nodes") if self.graph else None
        if not isinstance(nodes, list):
            return
        declared: dict[str, NodeState] = {}
        for node in nodes:
            if isinstance(node, dict) and isinstance(node.get("id"), str):
                node_id = node["id"]
                declared[node_id] = self.nodes.get(node_id) or NodeState(
                    node_id, str(node.get("type") or "")
                )
        declared.update({k: v for k, v in self.nodes.items() if k not in declared})
        self.nodes = declared

    def _set_status(self, value: Any) -> None:
        try:
            status = JobStatus(value)
        except ValueError:
            return
        if self.is_finished and status != self.status:
            return  # terminal states never change; a stale row must not undo one
        if _STATUS_RANK[status] >= _STATUS_RANK[self.status]:
            self.status = status

    def apply(self, message: JsonObject) -> bool:
        """Apply one stream message; False (and counted) if its seq was already applied."""
        seq = message.get("seq")
        if not isinstance(seq, int):
            return False
        if seq <= self.last_seq:
            self.duplicates += 1
            return False
        self.last_seq = seq
        self.row_last_seq = max(self.row_last_seq, seq)
        kind = message.get("type")
        node_id = str(message.get("node_id") or "")
        if kind == MessageType.JOB_UPDATE:
            self._set_status(message.get("status"))
            text = str(message.get("status"))
            if message.get("error"):
                self.error = str(message["error"])
                text += f": {self.error}"
            result = message.get("result")
            if isinstance(result, dict) and isinstance(result.get("outputs"), dict):
                self.outputs.update(result["outputs"])
            self._add(seq, LineKind.JOB, f"job {text}")
        elif kind == MessageType.NODE_UPDATE:
            node = self._node(node_id, message.get("node_type"))
            node.status = str(message.get("status") or node.status)
            node.error = message.get("error") or node.error
            text = node.status + (f": {node.error}" if node.error else "")
            self._add(seq, LineKind.NODE, text, node_id)
        elif kind == MessageType.NODE_PROGRESS:
            node = self._node(node_id, None)
            node.progress = _number(message.get("progress"))
            node.total = _number(message.get("total"))
            if node.status == "pending":
                node.status = NodeStatus.RUNNING.value
        elif kind == MessageType.OUTPUT_UPDATE:
            name = str(message.get("output_name") or node_id)
            self.outputs[name] = message.get("value")
            self._add(
                seq, LineKind.OUTPUT, f"{name} = {short_value(message.get('value'))}", node_id
            )
        elif kind == MessageType.LOG_UPDATE:
            severity = str(message.get("severity") or "info")
            content = str(message.get("content") or "")
            self._add(seq, LineKind.LOG, content, node_id, severity)
        elif kind == MessageType.GAP:
            first = message.get("from_seq")
            last = message.get("to_seq", seq)
            if isinstance(first, int) and isinstance(last, int):
                self.gaps.append((first, last))
                text = f"messages {first}-{last} were trimmed on the server and cannot be replayed"
                self._add(seq, LineKind.GAP, text)
        return True

    def _node(self, node_id: str, node_type: Any) -> NodeState:
        node = self.nodes.get(node_id)
        if node is None:
            node = self.nodes[node_id] = NodeState(node_id)
        if node_type:
            node.node_type = str(node_type)
        return node

    def _add(
        self, seq: int, kind: LineKind, text: str, node_id: str = "", severity: str = "info"
    ) -> None:
        self.log.append(LogLine(seq, kind, text, node_id, severity))

    def progress(self) -> tuple[float, int, int] | None:
        """(fraction, nodes done, nodes known) over the nodes seen so far, None if none."""
        if not self.nodes:
            return None
        done = sum(1 for n in self.nodes.values() if n.status == NodeStatus.COMPLETED)
        fractions = [n.fraction or 0.0 for n in self.nodes.values()]
        return sum(fractions) / len(fractions), done, len(self.nodes)

    def duration(self, now: float) -> float | None:
        """Seconds from start to finish (or to ``now`` while it runs)."""
        start = self.started_at or self.created_at
        if start is None:
            return None
        end = self.finished_at if self.is_finished else now
        if end is None:
            return None
        return max(0.0, end - start)

    def run_data(self) -> JsonObject | None:
        """The ``run_job`` data that runs this job again, or None if its graph is unknown."""
        data: JsonObject = {"params": dict(self.params)}
        if self.graph is not None:
            data["graph"] = self.graph
        elif self.workflow_id is None:
            return None
        if self.workflow_id is not None:
            data["workflow_id"] = self.workflow_id
        if self.strategy:
            data["execution_strategy"] = self.strategy
        return data


@dataclass(slots=True)
class Changes:
    """What changed in a JobStore since the screens last looked."""

    jobs: set[str]
    connection: bool
    notices: list[str]
    gone: set[str] = field(default_factory=set)
    """Jobs the server says do not exist (for this user)."""


class JobStore:
    """Every job the TUI knows about, the connection state, and notices for the user.

    Writers record what they changed; the app collects it with `take` to refresh the screens.
    """

    def __init__(self, url: str) -> None:
        self.jobs: dict[str, JobModel] = {}
        self.connection = Connection(url)
        self._changed: set[str] = set()
        self._connection_changed = False
        self._notices: list[str] = []
        self._gone: set[str] = set()

    def job(self, job_id: str) -> JobModel:
        model = self.jobs.get(job_id)
        if model is None:
            model = self.jobs[job_id] = JobModel(job_id)
            self._changed.add(job_id)
        return model

    def merge_row(self, row: JsonObject) -> JobModel:
        job_id = str(row.get("id") or row.get("job_id"))
        model = self.job(job_id)
        model.merge_row(row)
        self._changed.add(job_id)
        return model

    def apply(self, message: JsonObject) -> JobModel | None:
        job_id = message.get("job_id")
        if not isinstance(job_id, str):
            return None
        model = self.job(job_id)
        if model.apply(message):
            self._changed.add(job_id)
        return model

    def forget(self, job_id: str) -> None:
        """Drop a job the server does not know (a mistyped id, another user's job)."""
        self.jobs.pop(job_id, None)
        self._changed.discard(job_id)
        self._gone.add(job_id)

    def set_connection(
        self, state: ConnState, detail: str = "", retry_in_s: float | None = None
    ) -> None:
        conn = self.connection
        if state is ConnState.DISCONNECTED:
            conn.attempts += 1
        elif state is ConnState.CONNECTED:
            conn.attempts = 0
        conn.state, conn.detail, conn.retry_in_s = state, detail, retry_in_s
        self._connection_changed = True

    def notice(self, text: str) -> None:
        """Something the user should read once (a failed request, say)."""
        self._notices.append(text)

    def take(self) -> Changes:
        """What changed since the last call; resets it."""
        changes = Changes(self._changed, self._connection_changed, self._notices, self._gone)
        self._changed, self._connection_changed, self._notices = set(), False, []
        self._gone = set()
        return changes


# -- parsing and short text ----------------------------------------------------------------------


def parse_time(text: Any) -> float | None:
    """ISO 8601 (``...Z``) -> epoch seconds; None for anything else."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def short_value(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else _json(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError):
        return repr(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
