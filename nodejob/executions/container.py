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

The engine may go away while a container runs (dockerd restarted, crashed): following then asks
it again with backoff for ``docker_reconnect_s`` and, once it answers, reads the log again from
its start. A container that ran on (``--live-restore``) is followed on, nothing lost or doubled;
one that the engine stopped makes the job ``failed`` with "the container was stopped while the
Docker engine stopped or restarted (exit code N)", unless the worker finished first or nodejob
itself was stopping it (a cancel: then ``cancelled``). An engine that does not come back in time
fails the job ("lost the Docker engine ..."), a cancelled one with "cancelled, but the container
could not be verified stopped: ...". ``sweep_containers`` removes what jobs left behind.

With ``engine.py`` (clients, calls in threads, the log pump, the sweep), the only module that
imports docker.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import shutil
from typing import TYPE_CHECKING, Any, ClassVar, Final

import trio

from nodejob.executions import engine
from nodejob.executions.base import ExecutionUnavailable, JobExecution, Outcome
from nodejob.executions.process import job_dir, passed_env
from nodejob.executions.stream import (
    StreamIngester,
    describe_exit,
    record_outcome,
    recorded_outcome,
    until_stored,
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
    from pathlib import Path


logger = logging.getLogger(__name__)

BUNDLE_TARGET: Final = "/nodejob/worker.pyz"
REQUEST_TARGET: Final = "/nodejob/request.json"
TMPFS: Final = {"/tmp": "rw,noexec,nosuid,size=64m"}
STDERR_TAIL_LINES: Final = 20
ENGINE_STOPPED: Final = "the container was stopped while the Docker engine stopped or restarted"


class DockerExecution(JobExecution):
    strategy: ClassVar[ExecutionStrategy] = ExecutionStrategy.DOCKER
    survives_restart: ClassVar[bool] = True

    _cancel_requested = False
    _stopping = False
    _nursery: trio.Nursery | None = None
    _container: Any = None
    _handle: dict[str, Any] | None = None
    _outage: engine.Backoff | None = None
    """Set while the engine fails us; cleared once the container's log flows again."""
    _exited_while_away = False
    """The engine, back, said the container had exited: it may well have stopped it."""
    _gone = False
    _lost = False
    _last_state: dict[str, Any] | None = None
    """The container's state when following ended: it had exited."""

    @property
    def directory(self) -> Path:
        return job_dir(self.config.home, self.job.id)

    async def run(self) -> Outcome:
        if self._cancel_requested:
            return Outcome(JobStatus.CANCELLED)
        first_seq = await self.first_worker_seq()
        try:
            client = await engine.call(engine.client, self.config.docker_host)
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
            container = await self._reach_container(container_id)
        except docker.errors.NotFound:
            return Outcome(
                JobStatus.FAILED,
                error=f"container {container_id[:12]} is gone (removed outside nodejob)",
            )
        except (docker.errors.DockerException, ExecutionUnavailable, OSError) as exc:
            within = self.config.docker_reconnect_s
            error = f"lost the Docker engine: {exc} (not back within {within:g} s)"
            return Outcome(JobStatus.FAILED, error=error)
        return await self._follow(container)

    async def _reach_container(self, container_id: str) -> Any:
        """The container, asking with backoff while the engine does not answer (a server
        restarted with the engine may start first), for ``docker_reconnect_s`` at most."""
        backoff = engine.Backoff(self.config.docker_reconnect_s)
        warned = False
        while True:
            try:
                client = await engine.call(engine.client, self.config.docker_host)
                return await engine.call(client.containers.get, container_id)
            except docker.errors.NotFound:
                raise
            except (docker.errors.DockerException, ExecutionUnavailable, OSError) as exc:
                if not warned:
                    logger.warning(
                        "job %s: cannot re-adopt container %s yet (%s); asking again for up "
                        "to %g s",
                        self.job.id,
                        container_id[:12],
                        exc,
                        self.config.docker_reconnect_s,
                    )
                    warned = True
                if not await backoff.wait():
                    raise

    async def request_cancel(self) -> None:
        self._cancel_requested = True
        self._start_stop()

    def _start_stop(self) -> None:
        if self._nursery is not None and not self._stopping:
            self._stopping = True
            self._nursery.start_soon(self._stop, self._container)

    async def _stop(self, container: Any) -> None:
        """docker stop: SIGTERM to the worker, SIGKILL after the grace period.

        While the engine does not answer, asks again with backoff: a cancel during an engine
        restart must still stop the work. Following owns this task and ends it when it gives
        up on the engine (after ``docker_reconnect_s``).
        """
        grace = max(1, round(self.config.kill_grace_s))
        backoff = engine.Backoff(math.inf)
        warned = False
        try:
            while True:
                try:
                    await engine.call(container.stop, timeout=grace)
                except docker.errors.NotFound:
                    pass
                except docker.errors.APIError:
                    logger.exception("job %s: docker stop failed; killing", self.job.id)
                    with contextlib.suppress(docker.errors.DockerException, OSError):
                        await engine.call(container.kill)
                except (docker.errors.DockerException, OSError) as exc:
                    if not warned:
                        logger.warning(
                            "job %s: cannot stop the container yet: %s", self.job.id, exc
                        )
                        warned = True
                    await backoff.wait()
                    continue
                return
        finally:
            self._stopping = False  # a later request (after an engine restart) stops it again

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
        create = functools.partial(
            engine.call,
            client.containers.create,
            config.docker_image,
            ["python3", "-I", BUNDLE_TARGET, "worker", "--request", REQUEST_TARGET],
            name=f"nodejob-{self.job.id}",
            labels={engine.LABEL: self.job.id, engine.HOME_LABEL: str(config.home)},
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
        with trio.CancelScope(shield=True):  # a created container must get its handle, or go
            container = await create()
        self._handle = {"container_id": container.id, "dir": str(directory)}
        try:
            store_handle = functools.partial(self.store.set_handle, self.job.id, self._handle)
            await until_stored(self.job.id, store_handle, shield=True)
        except BaseException:  # cancelled while the database refused the write: no handle
            with trio.CancelScope(shield=True):
                await engine.call(container.remove, force=True)
            raise
        with trio.CancelScope(shield=True):  # recorded: it starts, for this server or the next
            await engine.call(container.start)
        return container

    async def _follow(self, container: Any) -> Outcome:
        """Ingest the container's log until the container has exited; then settle, clean up.

        Cancellation: stops following (the server is stopping); the container runs on.
        """
        self._container = container
        ingester = StreamIngester(self.log, self.job.id, source=f"container {container.short_id}")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._cancel_requested:
                    self._start_stop()
                failure = await self._follow_to_end(container, ingester, nursery)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
        outcome = await self._settle(container, ingester, failure)
        await record_outcome(self.log, self.store, self.job.id, self._handle or {}, outcome)
        await self._remove(container.id)
        return outcome

    async def _follow_to_end(
        self, container: Any, ingester: StreamIngester, nursery: trio.Nursery
    ) -> str | None:
        """Read the log until the container has exited: None, or why following failed."""
        while True:  # again if the stream broke off while the container runs
            try:
                broken = await self._ingest_log(container, ingester, nursery)
                if broken is not None:
                    return broken
                state = await engine.call(self._state, container)
            except (docker.errors.DockerException, OSError) as exc:
                failure = await self._reach_again(container, exc)
                if failure is not None:
                    return failure
                continue  # ran on or exited meanwhile: either way, its log from the start
            if not state.get("Running"):
                self._last_state = state
                return None

    async def _reach_again(self, container: Any, error: Exception) -> str | None:
        """The engine failed us with ``error``: ask about the container until it answers.

        None once it does; else why following ends: the container is gone, or the engine did
        not answer within ``docker_reconnect_s`` of first failing (the log flowing again
        starts a new count).
        """
        if self._outage is None:
            self._outage = engine.Backoff(self.config.docker_reconnect_s)
            logger.warning(
                "job %s: lost the Docker engine while following container %s (%s); "
                "asking again for up to %g s",
                self.job.id,
                container.short_id,
                error,
                self.config.docker_reconnect_s,
            )
        while await self._outage.wait():
            try:
                state = await engine.call(self._state, container)
            except (docker.errors.DockerException, OSError) as exc:
                error = exc
                continue
            if not state:
                self._gone = True
                return (
                    f"container {container.short_id} is gone: "
                    "removed while the Docker engine was unreachable"
                )
            logger.warning(
                "job %s: the Docker engine answers again after %.1f s; container %s %s",
                self.job.id,
                trio.current_time() - self._outage.started,
                container.short_id,
                state.get("Status"),
            )
            self._exited_while_away = not state.get("Running")
            if self._cancel_requested:
                self._start_stop()  # unless a stop is still under way: it may have been lost
            return None
        self._lost = True
        return (
            f"lost the Docker engine while following the container: {error} "
            f"(not back within {self.config.docker_reconnect_s:g} s)"
        )

    async def _settle(
        self, container: Any, ingester: StreamIngester, failure: str | None
    ) -> Outcome:
        """The job's outcome, once following has ended (early, with a ``failure``, or not)."""
        if failure is not None:
            if self._cancel_requested and self._gone:
                return Outcome(JobStatus.CANCELLED)  # no container, nothing runs
            if self._cancel_requested and self._lost:
                failure = f"cancelled, but the container could not be verified stopped: {failure}"
            return Outcome(JobStatus.FAILED, error=failure)
        outcome = ingester.end()
        if self._cancel_requested:
            return outcome or Outcome(JobStatus.CANCELLED)
        stopped = outcome is None or outcome.status is JobStatus.CANCELLED
        if stopped and await self._stopped_by_engine():
            code = (self._last_state or {}).get("ExitCode", "unknown")
            return Outcome(JobStatus.FAILED, error=f"{ENGINE_STOPPED} (exit code {code})")
        return outcome or Outcome(JobStatus.FAILED, error=await self._exit_reason(container))

    async def _stopped_by_engine(self) -> bool:
        """Whether the engine, going away, stopped a container that nodejob did not stop: an
        engine shutting down (without live-restore) stops its containers, whose workers take
        the SIGTERM for a cancel."""
        if self._exited_while_away:
            return True
        listens = await trio.to_thread.run_sync(
            engine.listens, self.config.docker_host, abandon_on_cancel=True
        )
        return not listens

    async def _ingest_log(
        self, container: Any, ingester: StreamIngester, nursery: trio.Nursery
    ) -> str | None:
        """Read the container's log from its start to its end; a reason if it is broken."""
        ingester.restart()
        pump = engine.LogPump(container)
        try:
            async with trio.open_nursery() as reader:
                reader.start_soon(
                    functools.partial(
                        trio.to_thread.run_sync,
                        pump.read,
                        abandon_on_cancel=True,
                        limiter=engine.limiter(engine.STREAMS, 10_000),
                    )
                )
                straggler = False
                broken: str | None = None
                while True:
                    done = pump.done
                    try:
                        frames = pump.take()
                        if frames:
                            self._outage = None  # the engine is back, the log flows
                        for frame in frames:
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
            result = await engine.call(container.wait, timeout=engine.CONNECT_TIMEOUT_S)
            state = await engine.call(self._state, container)
            raw = await engine.call(
                container.logs, stdout=False, stderr=True, tail=STDERR_TAIL_LINES
            )
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
                client = await engine.call(engine.client, self.config.docker_host)
                await engine.call(client.api.remove_container, container_id, force=True)
            except docker.errors.NotFound:
                pass
            except (docker.errors.DockerException, ExecutionUnavailable, OSError) as exc:
                logger.warning(
                    "job %s: could not remove container %s (%s); a later sweep will",
                    self.job.id,
                    container_id,
                    exc,
                )
        shutil.rmtree(self.directory, ignore_errors=True)
