"""The one-line connection banner every screen shows: connected, or lost and retrying.

A lost connection is normal (the server restarts; jobs keep running there), so the banner says
what is happening and what the TUI does about it, in words that need no colour.
"""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from nodejob_tui.model import Connection, ConnState


class ConnectionBar(Static):
    """Shows a `Connection`; CSS classes ``-ok`` / ``-lost`` style it."""

    def show(self, conn: Connection) -> None:
        self.set_class(conn.state is ConnState.CONNECTED, "-ok")
        self.set_class(conn.state in (ConnState.DISCONNECTED, ConnState.REFUSED), "-lost")
        self.update(describe(conn))


def describe(conn: Connection) -> Text:
    match conn.state:
        case ConnState.CONNECTED:
            return Text.assemble(("● connected ", "green"), (conn.url, "dim"))
        case ConnState.CONNECTING:
            return Text.assemble("… connecting to ", (conn.url, "dim"))
        case ConnState.REFUSED:
            return Text(f"✗ refused by {conn.url}: {conn.detail}  (check --token)", style="bold")
        case _:
            retry = f"retrying in {conn.retry_in_s:.1f}s" if conn.retry_in_s else "retrying"
            attempt = f", attempt {conn.attempts}" if conn.attempts > 1 else ""
            reason = f" ({conn.detail})" if conn.detail and conn.detail != "connection lost" else ""
            return Text(
                f"✗ connection lost{reason} · {retry}{attempt} · jobs keep running", style="bold"
            )
