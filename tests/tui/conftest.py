"""Fixtures of the TUI tests (see support.py for how they are arranged)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.tui.support import ServerProcess

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real ``nodejob serve --port 0`` with its own home, stopped at the end."""
    proc = ServerProcess(home=tmp_path / "home", log=tmp_path / "server")
    proc.start()
    try:
        yield proc
    finally:
        proc.close()
