"""Who is calling: bearer tokens, the WebSocket token options, and the Origin check.

REST callers send ``Authorization: Bearer TOKEN``; a WebSocket handshake may carry the header or
``?token=``. The token is checked by the store alone (hashed lookup), so a ``user_id`` sent by a
client never matters. The Origin check keeps a web page on another site from driving the local
server through the caller's browser. This module must not import apsw, the manager or quart's
request globals: handlers pass it the headers and addresses they have.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Final, NoReturn
from urllib.parse import urlsplit

from quart import abort

if TYPE_CHECKING:
    from collections.abc import Iterable

    from nodejob.store import Store, User

MISSING_TOKEN: Final = "missing token"
INVALID_TOKEN: Final = "invalid token"
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
_LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost", "[::1]")


def unauthorized(detail: str) -> NoReturn:
    """Abort the current request or handshake with 401 ``{"detail": detail}``."""
    abort(401, detail)


def bearer_token(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header value; None when there is no header.

    A header that is present but not a bearer token yields ``""``, which never authenticates.
    """
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return token.strip()


async def authenticate(store: Store, token: str | None) -> User:
    """The user a token belongs to; aborts with 401 ``missing token`` / ``invalid token``."""
    if token is None:
        unauthorized(MISSING_TOKEN)
    user = await store.authenticate(token) if token else None
    if user is None:
        unauthorized(INVALID_TOKEN)
    return user


def origin_allowed(
    origin: str,
    *,
    scheme: str,
    server: tuple[str, int | None] | None,
    host_header: str | None,
    extra: Iterable[str] = (),
) -> bool:
    """True if a browser ``Origin`` may open a WebSocket to this server.

    Allowed: the server's own address as the client reached it (``server`` is the local socket
    address of this connection), its loopback aliases when it listens on loopback, and the
    configured ``allowed_origins``. The ``Host`` header counts only when it names that same
    port on a loopback or IP-literal host, so a DNS-rebinding page (``Host: evil.example``)
    is still refused.
    """
    wanted = _normalise(origin)
    if wanted is None:
        return False
    if any(_normalise(o) == wanted for o in extra):
        return True
    if server is None:
        return False
    _, o_host, o_port = wanted
    host, port = server
    if o_port != port:
        return False
    own = {_host_literal(host)}
    if _is_loopback(host):
        own.update(_LOOPBACK_NAMES)
    if host_header:
        parsed = urlsplit(f"//{host_header}")
        h = (parsed.hostname or "").lower()
        if _is_ip(h) and (parsed.port or _DEFAULT_PORTS.get(scheme, 80)) == port:
            own.add(_host_literal(h))
    return o_host in own


def _normalise(origin: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = _DEFAULT_PORTS[parts.scheme]
    return parts.scheme, _host_literal(parts.hostname.lower()), port or default


def _host_literal(host: str) -> str:
    host = host.strip("[]").lower()
    return f"[{host}]" if ":" in host else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
