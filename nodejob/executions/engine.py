"""The Docker engine as the ``docker`` strategy uses it: clients, calls, log pumps, sweeps.

The only modules that import docker are this one and ``container.py`` (the execution), so a
server that runs no docker job never loads the SDK. Every SDK call runs in a worker thread
(``trio.to_thread.run_sync(..., abandon_on_cancel=True)`` under a CapacityLimiter): ``call``.
``client`` connects at once, so an unreachable engine is a clear ExecutionUnavailable, never a
hang; ``listens`` tells an engine that is going away from one that answers; ``Backoff`` paces
the attempts to reach one that went away (``reach_container``, ``stop_container``);
``container_options`` is what a job's container is made of; ``LogPump`` hands a container's log to trio in batches; ``state`` and ``exit_reason``
read how it ended; ``sweep_containers`` removes what jobs of this home left behind.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import socket
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any, Final, TypeVar

import trio

from nodejob.executions.base import ExecutionUnavailable
from nodejob.executions.stream import describe_exit

try:
    import docker
    import docker.errors
    import docker.types
except ImportError as exc:  # pragma: no cover - docker is a dependency; a trimmed build may lack it
    raise ExecutionUnavailable(
        "the docker strategy needs the Docker SDK: pip install docker"
    ) from exc

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from nodejob.config import Config
    from nodejob.store import Store

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S: Final = 10.0
"""Timeout of ordinary SDK calls (log streams have none)."""
LABEL: Final = "nodejob.job_id"
HOME_LABEL: Final = "nodejob.home"
RECONNECT_FIRST_S: Final = 0.1
RECONNECT_MAX_S: Final = 2.0
"""Pauses between attempts to reach an engine that went away double from the first to the
max: a quick restart is noticed within a fraction of a second, a long outage costs a
request every two seconds per job."""
BUNDLE_TARGET: Final = "/nodejob/worker.pyz"
REQUEST_TARGET: Final = "/nodejob/request.json"
SPOOL_TARGET: Final = "/nodejob/stream.jsonl"
"""Where a container sees the worker bundle, its request and its spool (bind mounts)."""
TMPFS: Final = {"/tmp": "rw,noexec,nosuid,size=64m"}
STDERR_TAIL_LINES: Final = 20
_CALLS: Final = trio.lowlevel.RunVar[trio.CapacityLimiter]("docker_calls")
STREAMS: Final = trio.lowlevel.RunVar[trio.CapacityLimiter]("docker_streams")
_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def limiter(var: trio.lowlevel.RunVar[trio.CapacityLimiter], size: int) -> trio.CapacityLimiter:
    try:
        return var.get()
    except LookupError:
        limiter = trio.CapacityLimiter(size)
        var.set(limiter)
        return limiter


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one blocking SDK call in a thread (abandoned, not waited for, on cancel)."""
    return await trio.to_thread.run_sync(
        functools.partial(fn, *args, **kwargs), abandon_on_cancel=True, limiter=limiter(_CALLS, 8)
    )


def client(base_url: str) -> Any:
    """A DockerClient for ``base_url`` ('' = DOCKER_HOST or the local socket), cached.

    Connects at once (the SDK asks the engine's API version), so an unreachable engine is an
    ExecutionUnavailable here, after at most CONNECT_TIMEOUT_S, never a hang later.
    """
    with _clients_lock:
        client = _clients.get(base_url)
        if client is not None:
            return client
        where = address(base_url)
        try:
            if where.startswith("unix://"):
                _check_socket(where.removeprefix("unix://"))
            if base_url:
                client = docker.DockerClient(base_url=base_url, timeout=CONNECT_TIMEOUT_S)
            else:
                client = docker.from_env(timeout=CONNECT_TIMEOUT_S)
        except (docker.errors.DockerException, OSError) as exc:
            raise ExecutionUnavailable(
                f"no Docker engine reachable at {where} ({exc}); start one, or point "
                "NODEJOB_DOCKER_HOST / DOCKER_HOST at it"
            ) from None
        _clients[base_url] = client
        return client


def address(base_url: str) -> str:
    return base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def listens(base_url: str) -> bool:
    """(In a thread.) Whether the engine accepts a new connection; True where no probe fits.

    A new connection, not an API call: an engine shutting down closes its listening socket
    first and then stops its containers, still answering on connections already open, so a
    pooled client cannot tell that it is going away.
    """
    where = address(base_url)
    try:
        if where.startswith("unix://"):
            _check_socket(where.removeprefix("unix://"))
        elif where.startswith(("tcp://", "http://", "https://")):
            url = urllib.parse.urlsplit(where)
            port = url.port or (2376 if url.scheme == "https" else 2375)
            socket.create_connection((url.hostname or "", port), CONNECT_TIMEOUT_S).close()
    except OSError:
        return False
    return True


def _check_socket(path: str) -> None:
    """Connect to a unix socket once; OSError if nothing listens there.

    Done before the SDK tries, because its unix transport leaves the socket of a failed
    connection unclosed.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CONNECT_TIMEOUT_S)
        probe.connect(path)


async def reach_container(config: Config, container_id: str, job_id: str) -> Any:
    """The container, asking with backoff while the engine does not answer (a server
    restarted with the engine may start first), for ``config.docker_reconnect_s`` at most.

    Raises docker.errors.NotFound at once; the last failure once the time is up.
    """
    backoff = Backoff(config.docker_reconnect_s)
    warned = False
    while True:
        try:
            docker_client = await call(client, config.docker_host)
            return await call(docker_client.containers.get, container_id)
        except docker.errors.NotFound:
            raise
        except (docker.errors.DockerException, ExecutionUnavailable, OSError) as exc:
            if not warned:
                logger.warning(
                    "job %s: cannot re-adopt container %s yet (%s); asking again for up to %g s",
                    job_id,
                    container_id[:12],
                    exc,
                    config.docker_reconnect_s,
                )
                warned = True
            if not await backoff.wait():
                raise


async def stop_container(container: Any, grace_s: float, job_id: str) -> None:
    """docker stop: SIGTERM to the worker, SIGKILL after ``grace_s``; a kill if stop fails.

    While the engine does not answer, asks again with backoff, without end: a cancel during an
    engine restart must still stop the work. Cancellation: the caller's way to give up.
    """
    grace = max(1, round(grace_s))
    backoff = Backoff(math.inf)
    warned = False
    while True:
        try:
            await call(container.stop, timeout=grace)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError:
            logger.exception("job %s: docker stop failed; killing", job_id)
            with contextlib.suppress(docker.errors.DockerException, OSError):
                await call(container.kill)
        except (docker.errors.DockerException, OSError) as exc:
            if not warned:
                logger.warning("job %s: cannot stop the container yet: %s", job_id, exc)
                warned = True
            await backoff.wait()
            continue
        return


class Backoff:
    """Pauses between attempts to reach an engine that went away, for ``within`` s in all."""

    def __init__(self, within: float) -> None:
        self.started = trio.current_time()
        self._deadline = self.started + within
        self._delay = RECONNECT_FIRST_S

    async def wait(self) -> bool:
        """Sleep until the next attempt; False, at once, when the time is up."""
        left = self._deadline - trio.current_time()
        if left <= 0:
            return False
        await trio.sleep(min(self._delay, left))
        self._delay = min(2 * self._delay, RECONNECT_MAX_S)
        return True


def container_options(
    config: Config,
    job_id: str,
    *,
    bundle: Path,
    request: Path,
    spool: Path,
    environment: dict[str, str],
    network: str,
) -> dict[str, Any]:
    """The arguments of ``containers.create`` for a job's container (see container.py).

    The worker bundle and the request are mounted read-only, the spool (a file the server
    made writable for the container's user: jobfiles.py) read-write; nothing else of the host.
    """
    return {
        "image": config.docker_image,
        "command": [
            *("python3", "-I", BUNDLE_TARGET, "worker"),
            *("--request", REQUEST_TARGET, "--tee", SPOOL_TARGET),
        ],
        "name": f"nodejob-{job_id}",
        "labels": {LABEL: job_id, HOME_LABEL: str(config.home)},
        "environment": environment,
        "mounts": [
            docker.types.Mount(BUNDLE_TARGET, str(bundle), type="bind", read_only=True),
            docker.types.Mount(REQUEST_TARGET, str(request), type="bind", read_only=True),
            docker.types.Mount(SPOOL_TARGET, str(spool), type="bind", read_only=False),
        ],
        "user": config.docker_user,
        "working_dir": "/tmp",
        "network_mode": network,
        "mem_limit": config.docker_memory,
        "memswap_limit": config.docker_memory,  # no swap beyond the memory limit
        "nano_cpus": int(config.docker_cpus * 1e9),
        "pids_limit": config.docker_pids,
        "read_only": True,
        "tmpfs": TMPFS,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "init": True,  # forwards SIGTERM to the worker and reaps
        "log_config": docker.types.LogConfig(type="json-file"),  # readable again after restarts
    }


class LogPump:
    """A container's stdout log, read by a thread and handed to trio in batches.

    The thread appends frames to a deque and schedules one wakeup of the trio side when it
    has none pending; the trio side takes everything queued per wakeup. Appending before
    checking ``_scheduled`` (and the trio side clearing it before it drains) means no frame
    is ever left behind without a wakeup.
    """

    def __init__(self, container: Any) -> None:
        self._container = container
        self._frames: collections.deque[bytes] = collections.deque()
        self._token = trio.lowlevel.current_trio_token()
        self._event = trio.Event()
        self._scheduled = False
        self._stream: Any = None
        self._closed = False
        self.done = False
        self.error: Exception | None = None

    def read(self) -> None:
        """(In a thread.) Follow the log until the container's stdout ends or ``close``."""
        try:
            stream = self._container.logs(stream=True, follow=True, stdout=True, stderr=False)
            self._stream = stream
            if self._closed:
                stream.close()
                return
            for frame in stream:
                self._frames.append(frame)
                self._poke()
        except Exception as exc:  # raised on the trio side, outside the reader's nursery
            self.error = exc
        finally:
            self.done = True
            self._poke()

    def _poke(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            with contextlib.suppress(trio.RunFinishedError):  # the server has stopped
                self._token.run_sync_soon(self._wake)

    def _wake(self) -> None:
        self._scheduled = False
        self._event.set()

    def take(self) -> list[bytes]:
        """(In trio.) Everything queued so far."""
        self._event = trio.Event()
        frames = list(self._frames)
        for _ in frames:
            self._frames.popleft()
        return frames

    async def wait(self) -> None:
        await self._event.wait()

    def close(self) -> None:
        """Stop following: the reading thread's blocked read ends at once."""
        self._closed = True
        if self._stream is not None:
            self._stream.close()


def state(container: Any) -> dict[str, Any]:
    """(In a thread.) The container's ``State`` now; {} if it is gone."""
    try:
        container.reload()
    except docker.errors.NotFound:
        return {}
    found: dict[str, Any] = container.attrs.get("State", {})
    return found


async def exit_reason(container: Any, memory_limit: str) -> str:
    """Why a worker ended without its terminal line: exit code, OOM kill, stderr."""
    try:
        result = await call(container.wait, timeout=CONNECT_TIMEOUT_S)
        ended = await call(state, container)
        raw = await call(container.logs, stdout=False, stderr=True, tail=STDERR_TAIL_LINES)
    except (docker.errors.DockerException, OSError) as exc:
        return f"worker ended without a result (its container cannot be inspected: {exc})"
    code = int(result.get("StatusCode", -1))
    if ended.get("OOMKilled"):
        return f"worker killed: out of memory (limit {memory_limit})"
    lines = [line.strip() for line in raw.decode("utf-8", "replace").splitlines()]
    detail = next((line for line in reversed(lines) if line), "")[:500]
    if code > 128:  # the container's init reports a signal as 128 + its number
        return describe_exit(128 - code, detail)
    return describe_exit(code, detail)


async def sweep_containers(store: Store, config: Config) -> int:
    """Remove the containers that jobs of ``config.home`` left behind; return how many.

    A container labelled with this home goes once its job has finished or is unknown to the
    database: one whose create request was still in flight in the engine when a server died,
    or one that could not be removed while the engine was away. A container of an unfinished
    job, or of another home, is never touched. A missing engine costs one connection attempt
    and a debug line.
    """
    try:
        docker_client = await call(client, config.docker_host)
        labels = [LABEL, f"{HOME_LABEL}={config.home}"]
        found = await call(docker_client.api.containers, all=True, filters={"label": labels})
    except (docker.errors.DockerException, ExecutionUnavailable, OSError) as exc:
        logger.debug("container sweep skipped: %s", exc)
        return 0
    removed = 0
    for info in found:
        job_id = str((info.get("Labels") or {}).get(LABEL, ""))
        job = await store.get_job(job_id)
        if job is not None and not job.is_finished:
            continue
        if await _remove_leftover(docker_client, info["Id"], job_id, job is not None):
            removed += 1
    return removed


async def _remove_leftover(client: Any, container_id: str, job_id: str, known: bool) -> bool:
    try:
        await call(client.api.remove_container, container_id, force=True)
    except docker.errors.NotFound:
        return False  # removed meanwhile (by its job, or by hand)
    except docker.errors.APIError as exc:
        logger.warning("could not remove leftover container %s: %s", container_id[:12], exc)
        return False
    except (docker.errors.DockerException, OSError) as exc:  # the engine went away: next pass
        logger.debug("could not remove leftover container %s: %s", container_id[:12], exc)
        return False
    whose = "finished" if known else "unknown"
    logger.info("removed container %s of %s job %s", container_id[:12], whose, job_id)
    return True
