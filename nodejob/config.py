"""Server configuration: defaults, ``NODEJOB_*`` environment variables, then flags.

A plain dataclass; no I/O beyond reading the environment. Must not import trio or apsw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from nodejob.protocol import ExecutionStrategy

DEFAULT_PORT: Final = 8787
DEFAULT_URL: Final = f"http://127.0.0.1:{DEFAULT_PORT}"


def default_home() -> Path:
    env = os.environ.get("NODEJOB_HOME")
    if env:
        return Path(env).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "nodejob"


@dataclass(slots=True)
class Config:
    home: Path = field(default_factory=default_home)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_jobs: int = 1000
    """Jobs running at once; more wait in ``starting`` (NODEJOB_MAX_JOBS)."""
    ring_size: int = 10_000
    """Messages kept per job (NODEJOB_RING_SIZE); older ones are trimmed."""
    cleanup_interval_s: float = 300.0
    cleanup_max_age_s: float = 3600.0
    retention_s: float = 7 * 24 * 3600.0
    """Finished jobs' messages are deleted from the DB after this long (rows stay)."""
    default_strategy: ExecutionStrategy = ExecutionStrategy.THREADED
    docker_image: str = "python:3.12-slim"
    docker_memory: str = "512m"
    docker_cpus: float = 1.0
    docker_pids: int = 256
    docker_network: str = "none"
    ray_address: str = "http://127.0.0.1:8265"
    ray_token: str = ""
    """Bearer token for a Ray dashboard with token auth (NODEJOB_RAY_TOKEN; RAY_AUTH_MODE=token)."""
    ray_worker: str = "bundle"
    """How Ray nodes get the worker (NODEJOB_RAY_WORKER): ``bundle`` ships nodejob's worker
    bundle through runtime_env py_modules; ``installed`` uses the nodejob on the nodes."""
    ray_worker_command: str = "python3 -m nodejob.worker"
    """The shell command that starts the worker on a Ray node (NODEJOB_RAY_WORKER_COMMAND);
    ``--request FILE`` is appended."""
    ray_num_cpus: float = 1.0
    """CPUs a ray job asks for when its ``resources`` name none (NODEJOB_RAY_NUM_CPUS)."""
    kill_grace_s: float = 5.0
    """Seconds between SIGTERM and SIGKILL when cancelling out-of-process work."""
    docker_host: str = ""
    """The Docker engine (NODEJOB_DOCKER_HOST); empty: DOCKER_HOST, else the local socket."""
    docker_user: str = "65534:65534"
    """uid:gid that docker workers run as (NODEJOB_DOCKER_USER); never root by default."""
    docker_reconnect_s: float = 120.0
    """How long a docker job waits for a Docker engine that went away (restarted, crashed)
    before it fails (NODEJOB_DOCKER_RECONNECT_S); asked again with backoff meanwhile."""
    worker_env: str = ""
    """Comma-separated names of server environment variables that out-of-process workers
    also get (NODEJOB_WORKER_ENV); workers otherwise see only a minimal environment."""
    allowed_origins: tuple[str, ...] = ()
    """Extra WebSocket Origins allowed besides the server's own (NODEJOB_ALLOWED_ORIGINS, comma-separated)."""
    peer_timeout_s: float = 60.0
    """A client connection whose peer stops acknowledging (host gone, network cut, or a
    reader that stopped reading) for this long is dropped (NODEJOB_PEER_TIMEOUT_S): TCP
    keepalive probes an idle one, TCP_USER_TIMEOUT bounds unacknowledged data."""

    @property
    def db_path(self) -> Path:
        return self.home / "nodejob.db"

    @property
    def token_path(self) -> Path:
        return self.home / "token"

    @classmethod
    def from_env(cls, **overrides: Any) -> Config:
        """Defaults < ``NODEJOB_*`` environment < ``overrides`` (None means not given)."""
        config = cls()
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"NODEJOB_{f.name.upper()}")
            if raw is not None and f.name != "home":
                values[f.name] = _coerce(f.name, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "home" in values:
            values["home"] = Path(values["home"]).expanduser()
        if "default_strategy" in values:
            values["default_strategy"] = ExecutionStrategy(values["default_strategy"])
        return replace(config, **values)


def _coerce(name: str, kind: str, raw: str) -> Any:
    """``raw`` as the field's declared type (a string: annotations are not evaluated)."""
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ValueError(f"NODEJOB_{name.upper()} must be a number, not {raw!r}") from None
    if name == "allowed_origins":
        return tuple(o.strip() for o in raw.split(",") if o.strip())
    return raw
