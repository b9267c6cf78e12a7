"""Modal dialogs: confirm a cancel, ask for a workflow file, fill its params, and the prefix key.

Each dialog dismisses with its answer (None when the user backs out with Escape); the app
decides what to do with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from nodejob.protocol import ExecutionStrategy
from nodejob_tui.workflow_file import (
    WorkflowFile,
    WorkflowFileError,
    load_workflow_file,
    parse_value,
    show_value,
)

if TYPE_CHECKING:
    from textual import events
    from textual.app import ComposeResult

JsonObject = dict[str, Any]


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question; ``y`` / ``n`` / Escape answer it from the keyboard."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "yes"),
        Binding("n,escape", "answer(False)", "no"),
    ]

    DEFAULT_CLASSES = "dialog"

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="box"):
            yield Label(self.question, markup=False)
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", id="yes", variant="error")
                yield Button("No (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class PathScreen(ModalScreen[WorkflowFile | None]):
    """Asks for a workflow file and loads it; stays open with the reason if it cannot."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "back", "back")]
    DEFAULT_CLASSES = "dialog"

    def compose(self) -> ComposeResult:
        with Vertical(classes="box"):
            yield Label("New job: path of a workflow file (JSON)")
            yield Input(placeholder="examples/hello.json", id="path")
            yield Static("", id="path-error", classes="error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        path = event.value.strip()
        if not path:
            return
        try:
            workflow = load_workflow_file(path)
        except WorkflowFileError as exc:
            self.query_one("#path-error", Static).update(str(exc))
            return
        self.dismiss(workflow)

    def action_back(self) -> None:
        self.dismiss(None)


class ParamsScreen(ModalScreen[JsonObject | None]):
    """A form for the workflow's ``nodejob.Input`` params and the execution strategy.

    Dismisses with the ``run_job`` data. Values are JSON when they parse, else text; an empty
    field leaves the param out, so the node's own default applies.
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "back"),
        Binding("ctrl+s", "start", "start"),
    ]

    DEFAULT_CLASSES = "dialog"

    def __init__(self, workflow: WorkflowFile) -> None:
        super().__init__()
        self.workflow = workflow

    def compose(self) -> ComposeResult:
        workflow = self.workflow
        with Vertical(classes="box"):
            yield Label(f"New job from {workflow.path.name}", markup=False)
            if not workflow.inputs:
                yield Label("(this workflow has no nodejob.Input params)", classes="hint")
            with Grid(id="params"):
                for index, param in enumerate(workflow.inputs):
                    yield Label(param.name, markup=False)
                    yield Input(
                        show_value(workflow.params.get(param.name)),
                        placeholder=f"default: {show_value(param.default) or 'none'}",
                        id=f"param-{index}",
                        name=param.name,
                    )
                yield Label("strategy")
                yield Select(
                    [(s.value, s.value) for s in ExecutionStrategy],
                    value=ExecutionStrategy.THREADED.value,
                    allow_blank=False,
                    id="strategy",
                )
            with Horizontal(classes="buttons"):
                yield Button("Start (^s)", id="start", variant="success")
                yield Button("Back (esc)", id="back")

    def on_mount(self) -> None:
        inputs = self.query(Input)
        (inputs.first() if inputs else self.query_one("#start", Button)).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        inputs = list(self.query(Input))
        index = inputs.index(event.input)
        if index + 1 < len(inputs):
            inputs[index + 1].focus()
        else:
            self.action_start()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()
        else:
            self.action_back()

    def params(self) -> JsonObject:
        params = dict(self.workflow.params)
        for box in self.query(Input):
            if box.name is None:
                continue
            if box.value.strip():
                params[box.name] = parse_value(box.value.strip())
            else:
                params.pop(box.name, None)
        return params

    def action_start(self) -> None:
        strategy = self.query_one("#strategy", Select).value
        chosen = strategy if isinstance(strategy, str) else None
        self.dismiss(self.workflow.run_data(self.params(), chosen))

    def action_back(self) -> None:
        self.dismiss(None)


class PrefixScreen(ModalScreen[str]):
    """After ``Ctrl-b``, as in tmux: the next key is a command (``d`` detaches)."""

    def compose(self) -> ComposeResult:
        yield Static("^b  d detach · any other key: back", id="prefix-hint")

    def on_key(self, event: events.Key) -> None:
        event.stop()
        event.prevent_default()
        self.dismiss(event.key)
