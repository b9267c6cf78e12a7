"""Listening sockets whose connections notice a peer that is gone.

A WebSocket follower can vanish without a word: its host powered off, its network cut, its
process stopped (SIGSTOP, a laptop lid). The server then holds the connection, its cursor and
whatever its send is blocked on, until TCP gives up: about 15 minutes of retransmissions, or
never for a connection that is merely idle. Two kernel settings bound that, at no cost per
message and with no change to the protocol:

- TCP keepalive probes an idle connection after ``timeout / 2`` and every ``timeout / 6``
  after that, so an idle peer that is gone is noticed;
- ``TCP_USER_TIMEOUT`` aborts a connection whose sent data (or zero-window probes: a reader
  that stopped reading altogether) stayed unacknowledged for ``timeout``.

A live client's kernel answers both by itself, however quiet the client is. Hypercorn
creates the listening sockets, and an accepted socket inherits these options from its
listening socket (Linux), so setting them once on each listening socket covers every
connection. docs/explanation.md says why this and not a WebSocket ping.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import hypercorn.config

if TYPE_CHECKING:
    from hypercorn.config import Sockets

KEEPALIVE_PROBES = 3


def watch_peers(sock: socket.socket, timeout_s: float) -> None:
    """Make connections accepted on ``sock`` drop a peer silent for ``timeout_s`` (0: never)."""
    if timeout_s <= 0 or sock.type != socket.SOCK_STREAM:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; other systems keep their own defaults
        idle = max(1, round(timeout_s / 2))
        interval = max(1, round(timeout_s / (2 * KEEPALIVE_PROBES)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(timeout_s * 1000))


class ListenConfig(hypercorn.config.Config):
    """Hypercorn's configuration, with listening sockets that watch their peers."""

    peer_timeout_s: float = 0.0

    def create_sockets(self) -> Sockets:
        sockets = super().create_sockets()
        for sock in (*sockets.secure_sockets, *sockets.insecure_sockets):
            watch_peers(sock, self.peer_timeout_s)
        return sockets
