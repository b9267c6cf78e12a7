"""How a job or node status reads: a symbol and the word, coloured where colour is available.

The word is always there, so the TUI reads the same without colour (``NO_COLOR``, monochrome
terminals); the colour only helps the eye.
"""

from __future__ import annotations

from typing import Final

from rich.text import Text

SYMBOLS: Final = {
    "pending": "·",
    "starting": "○",
    "running": "●",
    "completed": "✓",
    "failed": "✗",
    "cancelled": "⊘",
}
STYLES: Final = {
    "pending": "dim",
    "starting": "yellow",
    "running": "bold cyan",
    "completed": "green",
    "failed": "bold #ff6b6b",  # light enough to stay legible when NO_COLOR greys it
    "cancelled": "#d78cff",
}


def status_text(status: str) -> Text:
    """``● running`` in the status's colour."""
    return Text(f"{SYMBOLS.get(status, '?')} {status}", style=STYLES.get(status, ""))
