"""Node types: the Node base class, the standard nodes of DESIGN.md and the NodeRegistry.

A node type is a Node subclass naming its `type`, its `inputs` and its `outputs`; its `run`
receives a NodeContext and the input values as keyword arguments. Plug-ins add types through
the entry-point group `nodejob.nodes`. This module imports only the stdlib, trio and
nodejob.protocol, because the out-of-process worker loads it too: never apsw, quart, httpx,
rich or docker.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import string
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

import trio

from nodejob.protocol import MessageType

if TYPE_CHECKING:
    from nodejob.workflow.runner import NodeContext

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "nodejob.nodes"
PROGRESS_INTERVAL_S: Final = 0.1
"""Sleep reports node_progress this often."""
DRAIN_EVERY: Final = 100
MAX_RESULT_CHARS: Final = 4 * 1024 * 1024
"""Largest string or list Add and Format may produce: a job must not exhaust the server."""
MAX_FORMAT_WIDTH: Final = 10_000
"""Largest width or precision in a Format template's field specs."""
"""Emit awaits the emitter's backpressure after this many messages."""
OUTPUT_TYPE: Final = "nodejob.Output"

_FILLER: Final = "nodejob emits a log line. "


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One input of a node type. `default` is shared between runs: nodes must not mutate it."""

    required: bool = False
    default: Any = None


REQUIRED: Final = InputSpec(required=True)
OPTIONAL: Final = InputSpec()


class Node:
    """Base class of every node type, standard or plug-in.

    A subclass sets `type` (a dotted name such as "nodejob.Add"), `inputs` (name -> InputSpec)
    and, unless it has exactly one output called "output", `outputs`. It defines

        async def run(self, ctx: NodeContext, **inputs) -> Any

    (spelling out its inputs as keyword-only parameters is fine). The runner passes every
    declared input: the edge value, else the `data` value, else the InputSpec default. With one
    output the return value is that output's value; with several it is a mapping from output
    name to value; with none it is only reported as the node's result.

    A plug-in may define a plain `def run` instead, for blocking work: the runner then calls it
    in a worker thread (`trio.to_thread.run_sync(..., abandon_on_cancel=True)`), so a cancelled
    job ends at once while the thread finishes on its own. From that thread the context's
    emit/progress/log/set_output still work (they hop to the trio thread); `ctx.drain` is for
    async nodes only. An instance is created per node per run.
    """

    type: ClassVar[str]
    inputs: ClassVar[Mapping[str, InputSpec]] = MappingProxyType({})
    outputs: ClassVar[tuple[str, ...]] = ("output",)
    # Declared as a callable, not as a method, so that subclasses may name their inputs as
    # keyword-only parameters and may be sync, without breaking mypy's override check.
    run: Callable[..., Any]


# --- the standard nodes ----------------------------------------------------------------------


class Input(Node):
    """The job parameter `name` if the job has it, else `value`."""

    type = "nodejob.Input"
    inputs = {"name": REQUIRED, "value": OPTIONAL}

    async def run(self, ctx: NodeContext, *, name: Any, value: Any) -> Any:
        _require_string("name", name)
        return ctx.params.get(name, value)


class Output(Node):
    """Publishes `value` as the job's `result.outputs[name]` (an output_update message)."""

    type = OUTPUT_TYPE
    inputs = {"name": REQUIRED, "value": REQUIRED}
    outputs = ()

    async def run(self, ctx: NodeContext, *, name: Any, value: Any) -> Any:
        _require_string("name", name)
        ctx.set_output(name, value)
        return value


class Constant(Node):
    type = "nodejob.Constant"
    inputs = {"value": REQUIRED}

    async def run(self, ctx: NodeContext, *, value: Any) -> Any:
        return value


class Add(Node):
    type = "nodejob.Add"
    inputs = {"a": REQUIRED, "b": REQUIRED}

    async def run(self, ctx: NodeContext, *, a: Any, b: Any) -> Any:
        if isinstance(a, str | list) and isinstance(b, str | list):
            size = len(a) + len(b)
            if size > MAX_RESULT_CHARS:
                raise ValueError(f"result too large: {size} items (limit {MAX_RESULT_CHARS})")
        return a + b


class Format(Node):
    """`template.format(**values)`."""

    type = "nodejob.Format"
    inputs = {"template": REQUIRED, "values": InputSpec(default=MappingProxyType({}))}

    async def run(self, ctx: NodeContext, *, template: Any, values: Any) -> Any:
        _require_string("template", template)
        if not isinstance(values, Mapping):
            raise TypeError("values must be an object")
        _check_format_widths(template)
        try:
            result: str = template.format(**values)
        except KeyError as exc:
            raise ValueError(f"template field {exc.args[0]!r} is not in values") from None
        if len(result) > MAX_RESULT_CHARS:
            raise ValueError(f"result too large: {len(result)} characters")
        return result


def _check_format_widths(template: str) -> None:
    """Refuse field widths/precisions that would allocate huge strings ("{a:>999999999}")."""
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"invalid template: {exc}") from None
    for _, _, spec, _ in fields:
        if spec and "{" in spec:
            raise ValueError("nested replacement fields in a format spec are not supported")
        for digits in re.findall(r"\d+", spec or ""):
            if int(digits) > MAX_FORMAT_WIDTH:
                raise ValueError(f"format width {digits} is over the limit of {MAX_FORMAT_WIDTH}")


class Sleep(Node):
    """Sleeps `seconds`, reporting node_progress about ten times a second; outputs `value`.

    Cancellation: ends at once (trio.sleep_until).
    """

    type = "nodejob.Sleep"
    inputs = {"seconds": REQUIRED, "value": OPTIONAL}

    async def run(self, ctx: NodeContext, *, seconds: Any, value: Any) -> Any:
        total = _number("seconds", seconds)
        start = now = trio.current_time()
        deadline = start + total
        tick = 0
        while now < deadline:
            ctx.progress(round(now - start, 3), total)
            await ctx.drain()  # backpressure: many ticking jobs must not outrun the writer
            # Ticks sit on a grid from the start, so a late wake-up neither drifts nor doubles.
            while start + tick * PROGRESS_INTERVAL_S <= now:
                tick += 1
            await trio.sleep_until(min(start + tick * PROGRESS_INTERVAL_S, deadline))
            now = trio.current_time()
        ctx.progress(total, total)
        return value


class Emit(Node):
    """Emits `count` log_update messages of `size` characters, `interval` seconds apart.

    Built for load: the content is built once, and every DRAIN_EVERY messages it awaits the
    emitter's backpressure, which is also where a cancel ends it.
    """

    type = "nodejob.Emit"
    inputs = {
        "count": REQUIRED,
        "size": InputSpec(default=100),
        "interval": InputSpec(default=0),
    }

    async def run(self, ctx: NodeContext, *, count: Any, size: Any, interval: Any) -> Any:
        total = int(_number("count", count, integer=True))
        length = int(_number("size", size, integer=True))
        pause = _number("interval", interval)
        content = (_FILLER * (length // len(_FILLER) + 1))[:length]
        emit, log_update = ctx.emit, MessageType.LOG_UPDATE.value
        for sent in range(1, total + 1):
            emit(log_update, content=content, severity="info")
            if sent % DRAIN_EVERY == 0:
                await ctx.drain()
            if pause and sent < total:
                await trio.sleep(pause)
        return total


class Fail(Node):
    """Fails the node, and so the job, with `message` as the error."""

    type = "nodejob.Fail"
    inputs = {"message": REQUIRED}
    outputs = ()

    async def run(self, ctx: NodeContext, *, message: Any) -> Any:
        raise RuntimeError(str(message))


STANDARD_NODES: Final[tuple[type[Node], ...]] = (
    Input,
    Output,
    Constant,
    Add,
    Format,
    Sleep,
    Emit,
    Fail,
)


def _require_string(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")


def _number(name: str, value: Any, *, integer: bool = False) -> float:
    """A non-negative number; numeric strings count, since CLI params arrive as text."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = int(value) if integer else float(value)
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or value < 0:
        kind = "integer" if integer else "number"
        raise ValueError(f"{name} must be a non-negative {kind}, not {value!r}")
    return value


# --- the registry ----------------------------------------------------------------------------

NodeT = TypeVar("NodeT", bound=type[Node])


class NodeRegistry:
    """Node types by their `type` name."""

    def __init__(self, node_classes: Iterable[type[Node]] = ()) -> None:
        self._classes: dict[str, type[Node]] = {}
        for node_class in node_classes:
            self.register(node_class)

    @classmethod
    def standard(cls) -> NodeRegistry:
        """The standard node types of DESIGN.md only."""
        return cls(STANDARD_NODES)

    @classmethod
    def with_plugins(cls) -> NodeRegistry:
        """The standard node types plus every entry point in the group `nodejob.nodes`.

        An entry point names a Node subclass or an iterable of them. A plug-in that fails to
        load or to register is logged as an error and skipped as a whole, so one broken
        package never stops the server.
        """
        registry = cls.standard()
        for entry_point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                registry._register_entry_point(entry_point)
            except Exception:
                logger.error(
                    "skipping node plug-in %r (%s): it does not load",
                    entry_point.name,
                    entry_point.value,
                    exc_info=True,
                )
        return registry

    def register(self, node_class: NodeT) -> NodeT:
        """Add a node type; returns it, so this also works as a class decorator.

        Raises TypeError for something that is not a well-formed Node subclass, ValueError if
        another class already has its type name (registering the same class twice is fine).
        """
        self._check(node_class)
        self._classes[node_class.type] = node_class
        return node_class

    def get(self, type_name: str) -> type[Node] | None:
        return self._classes.get(type_name)

    def types(self) -> list[str]:
        return sorted(self._classes)

    def _register_entry_point(self, entry_point: EntryPoint) -> None:
        loaded = entry_point.load()
        node_classes = [loaded] if isinstance(loaded, type) else list(loaded)
        for node_class in node_classes:  # all or nothing
            self._check(node_class)
        for node_class in node_classes:
            self.register(node_class)

    def _check(self, node_class: object) -> None:
        if not (isinstance(node_class, type) and issubclass(node_class, Node)):
            raise TypeError(f"{node_class!r} is not a Node subclass")
        name = getattr(node_class, "type", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{node_class.__qualname__}.type must be a non-empty string")
        if not callable(getattr(node_class, "run", None)):
            raise TypeError(f"{node_class.__qualname__} has no run method")
        if not all(isinstance(spec, InputSpec) for spec in node_class.inputs.values()):
            raise TypeError(f"{node_class.__qualname__}.inputs must map names to InputSpec")
        if not all(isinstance(output, str) for output in node_class.outputs):
            raise TypeError(f"{node_class.__qualname__}.outputs must be a tuple of names")
        existing = self._classes.get(name)
        if existing is not None and existing is not node_class:
            raise ValueError(
                f"node type {name!r} is already registered by "
                f"{existing.__module__}.{existing.__qualname__}"
            )


@functools.cache
def default_registry() -> NodeRegistry:
    """The process-wide registry: standard nodes and plug-ins, loaded once."""
    return NodeRegistry.with_plugins()
