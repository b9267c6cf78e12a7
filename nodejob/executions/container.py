"""The ``docker`` strategy: each job runs ``nodejob worker`` in its own container.

The container runs ``NODEJOB_DOCKER_IMAGE`` (any image with Python 3.11+: the worker bundle,
a pure-Python zip of nodejob's worker and trio, is bind-mounted read-only, as is the job's
request file ``NODEJOB_HOME/jobs/JOB_ID/request.json``) with secure defaults: no network
unless the job asks (``resources: {"network": true}``) or the server is configured so, memory,
CPU and process limits, a non-root user, a read-only root filesystem with a small ``/tmp``, no
capabilities, no-new-privileges, and an init process that forwards signals. It is labelled
``nodejob.job_id`` and named ``nodejob-JOB_ID``.

Following: a thread iterates the container's stdout log (``logs(stream=True, follow=True)``)
and hands the frames to trio in batches (one wakeup per burst, not one thread hop per line);
the log is pushed by the engine as it is written, so lines arrive within milliseconds, where
polling ``logs(since=...)`` would add a poll interval of latency and a request per poll. The
container's log is the durable stream: after a restart the server reads it again from its
start and the message log drops the seqs it already has. The exit code gives the outcome when
there is no terminal line. Cancel: ``stop`` (SIGTERM, then SIGKILL after ``kill_grace_s``).
The container is removed once its messages are committed and its outcome is recorded.

The only module that imports docker. Every SDK call runs in a worker thread
(``trio.to_thread.run_sync(..., abandon_on_cancel=True)`` under a CapacityLimiter).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import shutil
import socket
import threading
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar

import trio

from nodejob.executions.base import ExecutionUnavailable, JobExecution, Outcome
from nodejob.executions.process import job_dir, passed_env
from nodejob.executions.stream import (
    StreamIngester,
    describe_exit,
    record_outcome,
    recorded_outcome,
)
from nodejob.protocol import ExecutionStrategy, JobStatus, ProtocolError, dumps

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

logger = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT_S: Final = 10.0
"""Timeout of ordinary SDK calls (log streams have none)."""
BUNDLE_TARGET: Final = "/nodejob/worker.pyz"
REQUEST_TARGET: Final = "/nodejob/request.json"
LABEL: Final = "nodejob.job_id"
TMPFS: Final = {"/tmp": "rw,noexec,nosuid,size=64m"}
STDERR_TAIL_LINES: Final = 20
_CALLS: Final = trio.lowlevel.RunVar[trio.CapacityLimiter]("docker_calls")
_STREAMS: Final = trio.lowlevel.RunVar[trio.CapacityLimiter]("docker_streams")
_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()


def _limiter(var: trio.lowlevel.RunVar[trio.CapacityLimiter], size: int) -> trio.CapacityLimiter:
    try:
        return var.get()
    except LookupError:
        limiter = trio.CapacityLimiter(size)
        var.set(limiter)
        return limiter


async def _call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run one blocking SDK call in a thread (abandoned, not waited for, on cancel)."""
    return await trio.to_thread.run_sync(
        functools.partial(fn, *args, **kwargs), abandon_on_cancel=True, limiter=_limiter(_CALLS, 8)
    )


def _client(base_url: str) -> Any:
    """A DockerClient for ``base_url`` ('' = DOCKER_HOST or the local socket), cached.

    Connects at once (the SDK asks the engine's API version), so an unreachable engine is an
    ExecutionUnavailable here, after at most CONNECT_TIMEOUT_S, never a hang later.
    """
    with _clients_lock:
        client = _clients.get(base_url)
        if client is not None:
            return client
        where = base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
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


def _check_socket(path: str) -> None:
    """Connect to a unix socket once; OSError if nothing listens there.

    Done before the SDK tries, because its unix transport leaves the socket of a failed
    connection unclosed.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(CONNECT_TIMEOUT_S)
        probe.connect(path)


class _LogPump:
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


class DockerExecution(JobExecution):
    strategy: ClassVar[ExecutionStrategy] = ExecutionStrategy.DOCKER
    survives_restart: ClassVar[bool] = True

    _cancel_requested = False
    _stopping = False
    _nursery: trio.Nursery | None = None
    _container: Any = None
    _handle: dict[str, Any] | None = None

    @property
    def directory(self) -> Path:
        return job_dir(self.config.home, self.job.id)

    async def run(self) -> Outcome:
        if self._cancel_requested:
            return Outcome(JobStatus.CANCELLED)
        first_seq = await self.first_worker_seq()
        try:
            client = await _call(_client, self.config.docker_host)
            with trio.CancelScope(shield=True):  # a created container must get its handle
                container = await self._launch(client, first_seq)
        except ExecutionUnavailable as exc:
            return Outcome(JobStatus.FAILED, error=str(exc))
        except docker.errors.ImageNotFound:
            image = self.config.docker_image
            return Outcome(
                JobStatus.FAILED,
                error=f"docker image {image} not found: pull or build it first (docker pull {image})",
            )
        except (docker.errors.DockerException, OSError) as exc:
            return Outcome(JobStatus.FAILED, error=f"cannot start the container: {exc}")
        return await self._follow(container)

    async def resume(self) -> Outcome:
        self._handle = dict(self.job.handle or {})
        done = recorded_outcome(self._handle)
        if done is not None:
            await self._remove(self._handle.get("container_id"))
            return done
        container_id = self._handle.get("container_id")
        if not container_id:
            # Killed between creating the container and recording its id: the container may
            # exist under its name (never started); remove it with the job's spool directory.
            await self._remove(f"nodejob-{self.job.id}")
            return Outcome(
                JobStatus.FAILED, error="the server stopped before the container started"
            )
        try:
            client = await _call(_client, self.config.docker_host)
            container = await _call(client.containers.get, container_id)
        except docker.errors.NotFound:
            return Outcome(
                JobStatus.FAILED,
                error=f"container {container_id[:12]} is gone (removed outside nodejob)",
            )
        return await self._follow(container)

    async def request_cancel(self) -> None:
        self._cancel_requested = True
        self._start_stop()

    def _start_stop(self) -> None:
        if self._nursery is not None and not self._stopping:
            self._stopping = True
            self._nursery.start_soon(self._stop, self._container)

    async def _stop(self, container: Any) -> None:
        """docker stop: SIGTERM to the worker, SIGKILL after the grace period."""
        grace = max(1, round(self.config.kill_grace_s))
        try:
            await _call(container.stop, timeout=grace)
        except docker.errors.NotFound:
            pass
        except (docker.errors.DockerException, OSError):
            logger.exception("job %s: docker stop failed; killing", self.job.id)
            with contextlib.suppress(docker.errors.DockerException, OSError):
                await _call(container.kill)

    async def _launch(self, client: Any, first_seq: int) -> Any:
        from nodejob.bundle import BundleError, worker_bundle_path

        try:
            bundle = await trio.to_thread.run_sync(worker_bundle_path, self.config.home)
        except BundleError as exc:
            raise OSError(f"cannot build the worker bundle: {exc}") from None
        directory = self.directory
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, mode=0o700)
        request = directory / "request.json"
        request.write_text(
            dumps(
                {
                    "job_id": self.job.id,
                    "first_seq": first_seq,
                    "graph": self.job.graph or {},
                    "params": self.job.params,
                }
            ),
            encoding="utf-8",
        )
        request.chmod(0o644)  # the container's user reads it; the directory keeps others out
        config = self.config
        network = config.docker_network
        if self.job.resources.get("network") is True:
            network = "bridge" if network == "none" else network
        container = await _call(
            client.containers.create,
            config.docker_image,
            ["python3", "-I", BUNDLE_TARGET, "worker", "--request", REQUEST_TARGET],
            name=f"nodejob-{self.job.id}",
            labels={LABEL: self.job.id, "nodejob.home": str(config.home)},
            environment={**passed_env(config), "NODEJOB_JOB_ID": self.job.id},
            mounts=[
                docker.types.Mount(BUNDLE_TARGET, str(bundle), type="bind", read_only=True),
                docker.types.Mount(REQUEST_TARGET, str(request), type="bind", read_only=True),
            ],
            user=config.docker_user,
            working_dir="/tmp",
            network_mode=network,
            mem_limit=config.docker_memory,
            memswap_limit=config.docker_memory,  # no swap beyond the memory limit
            nano_cpus=int(config.docker_cpus * 1e9),
            pids_limit=config.docker_pids,
            read_only=True,
            tmpfs=TMPFS,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            init=True,  # forwards SIGTERM to the worker and reaps
            log_config=docker.types.LogConfig(type="json-file"),  # readable again after restarts
        )
        self._handle = {"container_id": container.id, "dir": str(directory)}
        try:
            await self.store.set_handle(self.job.id, self._handle)
            await _call(container.start)
        except BaseException:
            await _call(container.remove, force=True)
            raise
        return container

    async def _follow(self, container: Any) -> Outcome:
        """Ingest the container's log until the container has exited; then settle, clean up.

        Cancellation: stops following (the server is stopping); the container runs on.
        """
        self._container = container
        ingester = StreamIngester(self.log, self.job.id, source=f"container {container.short_id}")
        broken: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._cancel_requested:
                    self._start_stop()
                try:
                    while True:  # again if the stream broke off while the container runs
                        broken = await self._ingest_log(container, ingester, nursery)
                        state = await _call(self._state, container)
                        if broken is not None or not state.get("Running"):
                            break
                except (docker.errors.DockerException, OSError) as exc:
                    broken = f"lost the Docker engine while following the container: {exc}"
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
        if broken is None:
            ingester.end()
        outcome = ingester.outcome
        if broken is not None:
            outcome = Outcome(JobStatus.FAILED, error=broken)
        elif outcome is None:
            if self._cancel_requested:
                outcome = Outcome(JobStatus.CANCELLED)
            else:
                outcome = Outcome(JobStatus.FAILED, error=await self._exit_reason(container))
        await record_outcome(self.log, self.store, self.job.id, self._handle or {}, outcome)
        await self._remove(container.id)
        return outcome

    async def _ingest_log(
        self, container: Any, ingester: StreamIngester, nursery: trio.Nursery
    ) -> str | None:
        """Read the container's log from its start to its end; a reason if it is broken."""
        ingester.restart()
        pump = _LogPump(container)
        try:
            async with trio.open_nursery() as reader:
                reader.start_soon(
                    functools.partial(
                        trio.to_thread.run_sync,
                        pump.read,
                        abandon_on_cancel=True,
                        limiter=_limiter(_STREAMS, 10_000),
                    )
                )
                straggler = False
                broken: str | None = None
                while True:
                    done = pump.done
                    try:
                        for frame in pump.take():
                            ingester.feed(frame)
                    except ProtocolError as exc:
                        self._start_stop()
                        broken = f"the worker's stream is broken: {exc}"
                    await self.log.drain()
                    if ingester.outcome is not None and not straggler:
                        straggler = True  # it has said its last word: it must exit now
                        nursery.start_soon(self._kill_straggler, container)
                    if done or broken is not None:
                        reader.cancel_scope.cancel()  # abandons the reading thread, if any
                        break
                    await pump.wait()
        finally:
            pump.close()
        if pump.error is not None and broken is None:
            raise pump.error
        return broken

    async def _kill_straggler(self, container: Any) -> None:
        await trio.sleep(self.config.kill_grace_s)
        self._start_stop()

    @staticmethod
    def _state(container: Any) -> dict[str, Any]:
        try:
            container.reload()
        except docker.errors.NotFound:
            return {}
        state: dict[str, Any] = container.attrs.get("State", {})
        return state

    async def _exit_reason(self, container: Any) -> str:
        """Why a worker ended without its terminal line: exit code, OOM kill, stderr."""
        try:
            result = await _call(container.wait, timeout=CONNECT_TIMEOUT_S)
            state = await _call(self._state, container)
            raw = await _call(container.logs, stdout=False, stderr=True, tail=STDERR_TAIL_LINES)
        except (docker.errors.DockerException, OSError) as exc:
            return f"worker ended without a result (its container cannot be inspected: {exc})"
        code = int(result.get("StatusCode", -1))
        if state.get("OOMKilled"):
            return f"worker killed: out of memory (limit {self.config.docker_memory})"
        lines = [line.strip() for line in raw.decode("utf-8", "replace").splitlines()]
        detail = next((line for line in reversed(lines) if line), "")[:500]
        if code > 128:  # the container's init reports a signal as 128 + its number
            return describe_exit(128 - code, detail)
        return describe_exit(code, detail)

    async def _remove(self, container_id: str | None) -> None:
        if container_id:
            try:
                client = await _call(_client, self.config.docker_host)
                await _call(client.api.remove_container, container_id, force=True)
            except docker.errors.NotFound:
                pass
            except (docker.errors.DockerException, ExecutionUnavailable, OSError):
                logger.warning("job %s: could not remove container %s", self.job.id, container_id)
        shutil.rmtree(self.directory, ignore_errors=True)
