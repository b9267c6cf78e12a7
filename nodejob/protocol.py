"""The wire vocabulary: job states, message types, commands and their JSON codec.

Everything a client and the server say to each other is defined here, so the CLI, the TUI,
the worker and the server agree by construction. This module must not import trio, quart,
apsw or anything else with a runtime: the TUI and the worker import it too.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

MAX_FRAME_BYTES: Final = 1024 * 1024
"""A WebSocket frame or REST body over this many bytes is refused (1009 / 413)."""


class JobStatus(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL: Final = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
"""States a job never leaves."""


class NodeStatus(enum.StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class MessageType(enum.StrEnum):
    JOB_UPDATE = "job_update"
    NODE_UPDATE = "node_update"
    NODE_PROGRESS = "node_progress"
    OUTPUT_UPDATE = "output_update"
    LOG_UPDATE = "log_update"
    GAP = "gap"


class ExecutionStrategy(enum.StrEnum):
    THREADED = "threaded"
    SUBPROCESS = "subprocess"
    DOCKER = "docker"
    RAY = "ray"


class Command(enum.StrEnum):
    RUN_JOB = "run_job"
    RECONNECT_JOB = "reconnect_job"
    CANCEL_JOB = "cancel_job"
    UNSUBSCRIBE = "unsubscribe"


EXIT_COMPLETED: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CANCELLED: Final = 3
EXIT_DETACHED: Final = 130

EXIT_BY_STATUS: Final = {
    JobStatus.COMPLETED: EXIT_COMPLETED,
    JobStatus.FAILED: EXIT_FAILED,
    JobStatus.CANCELLED: EXIT_CANCELLED,
}


class ProtocolError(ValueError):
    """A client sent something the protocol does not allow; the message says what."""


MAX_MESSAGE_BYTES: Final = 1024 * 1024
"""The largest stream message, encoded: the WebSocket frame limit a client is asked to
accept (RFC 6455 clients commonly default to 1 MiB), so every stored message can be sent."""


class MessageTooLarge(ProtocolError):
    """A job tried to emit a message over MAX_MESSAGE_BYTES; nothing was logged."""


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
"""Strict JSON: NaN and Infinity are not JSON, and a client must never receive them."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def dumps(obj: Any) -> str:
    """Compact JSON, the one encoding used on the wire, in the log and in the database."""
    # One encoder for the process: json.dumps with options builds a new one per call.
    return _ENCODER.encode(obj)


def encode_message(message: dict[str, Any]) -> str:
    """``dumps(message)``, refused with MessageTooLarge past MAX_MESSAGE_BYTES of UTF-8.

    The length of the text bounds its UTF-8 size from below and a quarter of it from above,
    so only messages near the limit are encoded to bytes to be measured.
    """
    text = _ENCODER.encode(message)
    if len(text) > MAX_MESSAGE_BYTES // 4:
        size = len(text.encode())
        if size > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(
                f"a {message.get('type', 'job')} message of {size:,} bytes is over the "
                f"limit of {MAX_MESSAGE_BYTES:,} bytes per message"
            )
    return text


def loads(text: str | bytes) -> Any:
    """Strict JSON decoding: NaN, Infinity and -Infinity are refused (ValueError)."""
    return json.loads(text, parse_constant=_no_constants)


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> ISO 8601 UTC with a trailing ``Z`` (None stays None)."""
    if ts is None:
        return None
    text = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def gap_message(job_id: str, from_seq: int, to_seq: int) -> dict[str, Any]:
    """The synthetic message telling a reader that seqs ``from_seq..to_seq`` are gone.

    Its ``seq`` is ``to_seq`` so that a reader's cursor moves past the hole.
    """
    return {
        "type": MessageType.GAP.value,
        "job_id": job_id,
        "seq": to_seq,
        "from_seq": from_seq,
        "to_seq": to_seq,
    }


def is_terminal_update(message: dict[str, Any]) -> bool:
    """True for the job_update that ends a job's stream."""
    return message.get("type") == MessageType.JOB_UPDATE and message.get("status") in TERMINAL


@dataclass(slots=True)
class RunJobRequest:
    """What a client asks to run: the ``run_job`` data of DESIGN.md."""

    workflow_id: str | None = None
    user_id: str = ""
    auth_token: str | None = None
    job_type: str = "workflow"
    params: dict[str, Any] = field(default_factory=dict)
    graph: dict[str, Any] | None = None
    execution_strategy: ExecutionStrategy | None = None
    timeout_seconds: float | None = None
    resources: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_data(cls, data: Any) -> RunJobRequest:
        """Parse and type-check ``run_job`` data; raises ProtocolError naming the field."""
        if not isinstance(data, dict):
            raise ProtocolError("data must be an object")
        workflow_id = _optional(data, "workflow_id", str)
        graph = _optional(data, "graph", dict)
        if graph is None and workflow_id is None:
            raise ProtocolError("run_job needs a graph or a workflow_id")
        params = _optional(data, "params", dict) or {}
        job_type = _optional(data, "job_type", str) or "workflow"
        strategy_text = _optional(data, "execution_strategy", str)
        strategy = None
        if strategy_text is not None:
            try:
                strategy = ExecutionStrategy(strategy_text)
            except ValueError:
                choices = ", ".join(s.value for s in ExecutionStrategy)
                raise ProtocolError(
                    f"execution_strategy must be one of {choices}, not {strategy_text!r}"
                ) from None
        timeout = data.get("timeout_seconds")
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0
        ):
            raise ProtocolError("timeout_seconds must be a positive number")
        resources = _optional(data, "resources", dict) or {}
        return cls(
            workflow_id=workflow_id,
            auth_token=_optional(data, "auth_token", str),
            job_type=job_type,
            params=params,
            graph=graph,
            execution_strategy=strategy,
            timeout_seconds=float(timeout) if timeout is not None else None,
            resources=resources,
        )


@dataclass(slots=True)
class ProcessingContext:
    """Who a job runs for; passed alongside a RunJobRequest."""

    user_id: str
    auth_token: str | None = None
    workflow_id: str | None = None


def _optional(data: dict[str, Any], name: str, kind: type) -> Any:
    value = data.get(name)
    if value is not None and not isinstance(value, kind):
        raise ProtocolError(f"{name} must be {_KIND_NAMES.get(kind, kind.__name__)}")
    return value


_KIND_NAMES: Final = {str: "a string", dict: "an object", int: "an integer", list: "a list"}


def require(data: dict[str, Any], name: str, kind: type) -> Any:
    """A required field of a command's data, type-checked (bool is not an int here)."""
    value = data.get(name)
    if value is None:
        raise ProtocolError(f"missing field: {name}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{name} must be {_KIND_NAMES.get(kind, kind.__name__)}")
    return value


def parse_command(text: str) -> tuple[Command, dict[str, Any]]:
    """Decode one client frame into (command, data); raises ProtocolError with a reason."""
    try:
        frame = loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON: {exc.msg} at position {exc.pos}") from None
    except ValueError as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("invalid JSON: nested too deeply") from None
    if not isinstance(frame, dict):
        raise ProtocolError("a command must be a JSON object")
    name = frame.get("command")
    if not isinstance(name, str):
        raise ProtocolError("missing field: command")
    try:
        command = Command(name)
    except ValueError:
        raise ProtocolError(f"unknown command: {name}") from None
    data = frame.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError("data must be an object")
    return command, data


def error_reply(message: str, command: str | None = None) -> dict[str, Any]:
    return {"type": "error", "message": message, "command": command}
