"""The ``docker`` strategy: each job runs ``nodejob worker`` in its own container.

The container runs ``NODEJOB_DOCKER_IMAGE`` (any image with Python 3.11+: the worker bundle,
a pure-Python zip of nodejob's worker and trio, is bind-mounted read-only, as is the job's
request file ``NODEJOB_HOME/jobs/JOB_ID/request.json``; its spool ``stream.jsonl`` next to it
is mounted writable) with secure defaults: no network unless the job asks (``resources:
{"network": true}``) or the server is configured so, memory, CPU and process limits, a
non-root user, a read-only root filesystem with a small ``/tmp``, no capabilities,
no-new-privileges, and an init process that forwards signals. It is labelled
``nodejob.job_id`` and named ``nodejob-JOB_ID`` (``engine.container_options``).

Following: a thread iterates the container's stdout log (``logs(stream=True, follow=True)``)
and hands the frames to trio in batches (one wakeup per burst, not one thread hop per line);
the log is pushed by the engine as it is written, so lines arrive within milliseconds, where
polling ``logs(since=...)`` would add a poll interval of latency and a request per poll. After
a restart the server reads the log again from its start and the message log drops the seqs it
already has. The log is the live stream, the spool the durable one: once the container has
exited, a log that ended without the worker's terminal line (the engine loses what a container
wrote while it was down, if the container exits before it is back) is topped up from the spool
(jobfiles.py), and only then does the exit code give the outcome. Cancel: ``stop`` (SIGTERM, then
SIGKILL after ``kill_grace_s``). The container and the job's directory are removed once its
messages are committed and its outcome is recorded.

The engine may go away while a container runs (dockerd restarted, crashed): following then asks
it again with backoff for ``docker_reconnect_s`` and, once it answers, reads the log again from
its start. A container that ran on (``--live-restore``) is followed on, nothing lost or doubled;
one that the engine stopped makes the job ``failed`` with "the container was stopped while the
Docker engine stopped or restarted (exit code N)", unless the worker finished first or nodejob
itself was stopping it (a cancel: then ``cancelled``). An engine that does not come back in time
fails the job ("lost the Docker engine ..."), a cancelled one with "cancelled, but the container
could not be verified stopped: ...", unless the spool shows the worker ended first: its own
outcome then stands. ``sweep_containers`` removes what jobs left behind.

With ``engine.py`` (clients, calls in threads, the container's options, the log pump, the
sweep), the only module that imports docker.
"""

from __future__ import annotations

import functools
import logging
import shutil
from typing import TYPE_CHECKING, Any, ClassVar, Final

import trio

from nodejob.executions import engine, jobfiles
from nodejob.executions.base import ExecutionUnavailable, JobExecution, Outcome
from nodejob.executions.process import job_dir, passed_env
from nodejob.executions.stream import (
    StreamIngester,
    record_outcome,
    recorded_outcome,
    until_stored,
)
from nodejob.protocol import ExecutionStrategy, JobStatus, ProtocolError

try:
    import docker
    import docker.errors
except ImportError as exc:  # pragma: no cover - docker is a dependency; a trimmed build may lack it
    raise ExecutionUnavailable(
        "the docker strategy needs the Docker SDK: pip install docker"
    ) from exc

if TYPE_CHECKING:
    from pathlib import Path


logger = logging.getLogger(__name__)

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
    _broken = False
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
            error = str(exc)
        except docker.errors.ImageNotFound:
            image = self.config.docker_image
            error = f"docker image {image} not found: pull or build it first (docker pull {image})"
        except (docker.errors.DockerException, OSError) as exc:
            error = f"cannot start the container: {exc}"
        else:
            return await self._follow(container)
        shutil.rmtree(self.directory, ignore_errors=True)  # a container, if any, is the sweep's
        return Outcome(JobStatus.FAILED, error=error)

    async def resume(self) -> Outcome:
        self._handle = dict(self.job.handle or {})
        done = recorded_outcome(self._handle)
        if done is not None:
            await self._remove(self._handle.get("container_id"))
            return done
        container_id = self._handle.get("container_id")
        if not container_id:
            # Killed before it recorded a container: one may exist under its name, created but
            # never started. Nothing ran: remove it (and the job's files), launch afresh.
            await self._remove(f"nodejob-{self.job.id}")
            return await self.run()
        try:
            container = await engine.reach_container(self.config, container_id, self.job.id)
            if (await engine.call(engine.state, container)).get("Status") == "created":
                # Killed between recording the container and starting it: start it now (its
                # request still holds, first_seq included: nothing was logged since).
                await engine.call(container.start)
        except docker.errors.NotFound:
            error = f"container {container_id[:12]} is gone (removed outside nodejob)"
            return await self._end_without_container(container_id, error)
        except (docker.errors.DockerException, ExecutionUnavailable, OSError) as exc:
            within = self.config.docker_reconnect_s
            error = f"lost the Docker engine: {exc} (not back within {within:g} s)"
            return await self._end_without_container(container_id, error)
        return await self._follow(container)

    async def _end_without_container(self, container_id: str, error: str) -> Outcome:
        """Re-adoption found no container to follow: the spool may still say how it ended
        (the container exited, then went); else the job fails with ``error``. The container,
        if the engine still has one, is the sweep's."""
        source = f"container {container_id[:12]}"
        ingester = StreamIngester(self.log, self.job.id, source=source)
        await jobfiles.top_up(ingester, self.directory, self.log)
        outcome = ingester.end() or Outcome(JobStatus.FAILED, error=error)
        await record_outcome(self.log, self.store, self.job.id, self._handle or {}, outcome)
        shutil.rmtree(self.directory, ignore_errors=True)
        return outcome

    async def request_cancel(self) -> None:
        self._cancel_requested = True
        self._start_stop()

    def _start_stop(self) -> None:
        if self._nursery is not None and not self._stopping:
            self._stopping = True
            self._nursery.start_soon(self._stop, self._container)

    async def _stop(self, container: Any) -> None:
        """``engine.stop_container``; following owns this task and ends it when it gives up
        on the engine (after ``docker_reconnect_s``)."""
        try:
            await engine.stop_container(container, self.config.kill_grace_s, self.job.id)
        finally:
            self._stopping = False  # a later request (after an engine restart) stops it again

    async def _launch(self, client: Any, first_seq: int) -> Any:
        from nodejob.bundle import BundleError, worker_bundle_path

        try:
            bundle = await trio.to_thread.run_sync(worker_bundle_path, self.config.home)
        except BundleError as exc:
            raise OSError(f"cannot build the worker bundle: {exc}") from None
        directory = self.directory
        request, spool = jobfiles.prepare(
            directory,
            {
                "job_id": self.job.id,
                "first_seq": first_seq,
                "graph": self.job.graph or {},
                "params": self.job.params,
            },
        )
        network = self.config.docker_network
        if self.job.resources.get("network") is True:
            network = "bridge" if network == "none" else network
        options = engine.container_options(
            self.config,
            self.job.id,
            bundle=bundle,
            request=request,
            spool=spool,
            environment={**passed_env(self.config), "NODEJOB_JOB_ID": self.job.id},
            network=network,
        )
        with trio.CancelScope(shield=True):  # a created container must get its handle, or go
            try:
                container = await engine.call(client.containers.create, **options)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: the name is taken
                    raise
                # By this job's own container, created for a server that died before it
                # recorded it (the create was still in flight): never started. Replace it.
                await engine.call(client.api.remove_container, options["name"], force=True)
                container = await engine.call(client.containers.create, **options)
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
        if not self._broken and ingester.outcome is None:
            await jobfiles.top_up(ingester, self.directory, self.log)
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
                state = await engine.call(engine.state, container)
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
                state = await engine.call(engine.state, container)
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
        outcome = None if self._broken else ingester.end()
        if failure is not None:
            if outcome is not None:  # the worker had ended (its spool says): that stands
                return outcome
            if self._cancel_requested and self._gone:
                return Outcome(JobStatus.CANCELLED)  # no container, nothing runs
            if self._cancel_requested and self._lost:
                failure = f"cancelled, but the container could not be verified stopped: {failure}"
            return Outcome(JobStatus.FAILED, error=failure)
        if self._cancel_requested:
            return outcome or Outcome(JobStatus.CANCELLED)
        stopped = outcome is None or outcome.status is JobStatus.CANCELLED
        if stopped and await self._stopped_by_engine():
            code = (self._last_state or {}).get("ExitCode", "unknown")
            return Outcome(JobStatus.FAILED, error=f"{ENGINE_STOPPED} (exit code {code})")
        if outcome is None:
            reason = await engine.exit_reason(container, self.config.docker_memory)
            return Outcome(JobStatus.FAILED, error=reason)
        return outcome

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
                        self._broken = True
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
