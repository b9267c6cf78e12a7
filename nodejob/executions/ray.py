"""The ``ray`` strategy: each job runs ``nodejob worker`` as a Ray job, through the Ray Jobs API.

The server talks to a Ray cluster's dashboard (``NODEJOB_RAY_ADDRESS``) over plain HTTP
(httpx) and WebSocket (trio-websocket); it never imports ``ray``. docs/howto-ray.md is the
user's guide; this is how it works.

Submission. The job's request (``{"job_id", "first_seq", "graph", "params"}``) travels as a
tiny ``working_dir`` package uploaded to the cluster (never on the command line, which Ray
prints in its log and which is bounded by ARG_MAX). The entrypoint ``exec python3 -m
nodejob.worker --request request.json`` uses either the nodejob installed on the nodes
(``NODEJOB_RAY_WORKER=installed``) or, by default, the worker bundle shipped as a
``py_modules`` package (content-addressed: uploaded once per nodejob build). Our job id is
the ``submission_id``, and the handle records it *before* the submission: Ray answers a
duplicate with HTTP 500 "already exists", which we take as "already submitted", so
submitting again after a crash or an ambiguous error is always safe.

Restarts. Wherever a kill cuts a job, the next server carries on (tests/test_crash.py kills
at each point): still ``starting``, nothing was sent to Ray (the ``running`` update is
committed before anything is), and recovery fails it; no handle yet (waiting for room), it is
admitted and submitted anew; a handle not yet ``submitted``, it is submitted again, and Ray's
"already exists" says the earlier request got through; ``submitted``, it is followed, its log
re-read from the start; an outcome recorded, that is the outcome.

Admission. Ray holds a job it cannot place as PENDING, and a PENDING job ignores stop
requests until it leaves that state (ray-project/ray#58353). So we never hand Ray a job it
cannot place: each job asks for CPUs/GPUs/memory (``resources`` of run_job; by default
``NODEJOB_RAY_NUM_CPUS`` = 1 CPU), and ``ray_cluster.Capacity`` books our running jobs
onto the cluster's alive nodes (their totals from the state API). A job that fits no node
fails at once; one that fits but finds no room waits, first come first served, before
submission (cancelling it then is instant: Ray never saw it). Capacity used by other Ray
users is not counted; a job of ours can still be PENDING then, and is handled below.

Streaming. ``/api/jobs/{id}/logs/tail`` (a WebSocket) replays the job's log from its first
byte on every attach; frames split lines anywhere (``LineAssembler``) and the log holds more
than our lines: Ray's own ("Running entrypoint for job ...") and the worker's stderr. Our
lines are recognised by shape (a JSON object opening with ``{"type":"``) and go through
``StreamIngester`` (idempotent by seq, so a re-attach or a restart re-reads safely). The
other lines are NOT turned into ``log_update`` messages: the worker numbers the job's
messages (first_seq, first_seq + 1, ...) without knowing of them, so a seq the server gave a
Ray line would collide with the worker's next one, and a re-read after a restart could not
tell which seq a Ray line had got. They are logged here at debug level (``source`` ray or
stderr), and the last stderr lines explain a worker that died without its terminal line.

Ending. A watcher polls ``GET /api/jobs/{id}`` (Ray has no event for status changes;
fast while an end is expected, backing off to 1 s otherwise) until Ray reports SUCCEEDED,
FAILED or STOPPED. The worker's terminal line gives the outcome; without one, Ray's exit
code or ``message`` does (the rest of the log is read first, through ``/logs``, since the
tail lags about a second). Then the outcome is recorded in the handle. The Ray job's
record is deleted later, by a sweep (``sweep_finished``, at most once a minute, run inside
some job's follow): Ray's job monitor notices a supervisor's exit up to ~2 s after the job's
end and writes back, as FAILED, a record deleted before that, so records are deleted only
once they have settled (SETTLE_S).

Cancel: ``POST /api/jobs/{id}/stop`` (SIGTERM, then SIGKILL after ``kill_grace_s``, passed
to Ray as RAY_JOB_STOP_WAIT_TIME_S), repeated until Ray reports the job terminal; a PENDING
job stops the moment it leaves PENDING, and ends ``cancelled`` here once it has.

Must not import ray, apsw, docker or the server.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import time
from typing import TYPE_CHECKING, Any, ClassVar, Final

import trio
import trio_websocket

from nodejob.executions.base import JobExecution, Outcome
from nodejob.executions.process import passed_env
from nodejob.executions.ray_cluster import (
    RAY_TERMINAL,
    RETRY_MAX_S,
    RETRY_MIN_S,
    RayError,
    RayJobs,
    Unplaceable,
    capacity_of,
    job_resources,
    zip_package,
)
from nodejob.executions.stream import (
    LineAssembler,
    StreamIngester,
    describe_exit,
    record_outcome,
    recorded_outcome,
)
from nodejob.protocol import ExecutionStrategy, JobStatus, MessageType, ProtocolError, dumps

if TYPE_CHECKING:
    from pathlib import Path

    from nodejob.store import Store

logger = logging.getLogger(__name__)

STATUS_POLL_MIN_S: Final = 0.1
STATUS_POLL_MAX_S: Final = 1.0
STOP_RETRY_S: Final = 1.0
SETTLE_S: Final = 30.0
"""A finished job's Ray record is deleted only this long after its end: Ray's job monitor
writes back (as FAILED) a record deleted before it noticed the end (see RayJobs.delete)."""
STDERR_LINES: Final = 20
REQUEST_FILE: Final = "request.json"
WORKER_MODES: Final = ("bundle", "installed")
_RAY_LINE: Final = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\t[A-Z]+ \S+:\d+ -- |Running entrypoint for job "
)
"""Lines Ray itself writes into a job's log (its logger's format, and the entrypoint line)."""
_OURS: Final = b'{"type":"'
"""How every line of the worker begins (nodejob.worker.LineWriter)."""


# -- the log ----------------------------------------------------------------------------------


class _RayLog:
    """A Ray job's log, read from its start any number of times: our lines to the ingester,
    the rest (Ray's own lines and the worker's stderr) to this server's debug log, once.

    A re-read (``restart``) meets the same lines in the same order: the ingester drops seqs
    it has, and the first ``_others_seen`` other lines are not logged again.
    """

    def __init__(self, ingester: StreamIngester) -> None:
        self.ingester = ingester
        self.stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self._others_seen = 0
        self._others = 0
        self._lines = LineAssembler()

    def restart(self) -> None:
        self._lines = LineAssembler()
        self._others = 0

    def feed(self, chunk: bytes) -> None:
        """Take a chunk of the log. Raises ProtocolError as StreamIngester.feed_line does."""
        for line in self._lines.feed(chunk):
            self._line(line)

    def end(self) -> None:
        """The whole log was read: its last line, even without a newline, is complete."""
        rest = self._lines.end()
        if rest.strip():
            self._line(rest)

    def _line(self, line: bytes) -> None:
        start = line.find(_OURS)
        if start >= 0 and line.rstrip().endswith(b"}"):
            if start > 0:  # stderr text without a newline, then one of our lines
                self._other(line[:start])
            self.ingester.feed_line(line[start:])
        else:
            self._other(line)

    def _other(self, line: bytes) -> None:
        self._others += 1
        if self._others <= self._others_seen:
            return
        self._others_seen += 1
        text = line.decode("utf-8", "replace").rstrip()
        source = "ray" if _RAY_LINE.match(text) else "stderr"
        logger.debug("job %s: %s: %s", self.ingester.job_id, source, text)
        if source == "stderr" and text.strip():
            self.stderr.append(text.strip())


# -- the execution ----------------------------------------------------------------------------


class _Doorbell:
    """Level-triggered: ``ring`` wakes the next (or current) ``wait``."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def ring(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class RayExecution(JobExecution):
    strategy: ClassVar[ExecutionStrategy] = ExecutionStrategy.RAY
    survives_restart: ClassVar[bool] = True
    admits_itself: ClassVar[bool] = True  # `starting` while it waits for room on the cluster

    _cancel_requested = False
    _stopping = False
    _wait_scope: trio.CancelScope | None = None
    _nursery: trio.Nursery | None = None
    _ray: RayJobs | None = None
    _bell: _Doorbell | None = None
    _handle: dict[str, Any] | None = None

    async def run(self) -> Outcome:
        if self._cancel_requested:
            return Outcome(JobStatus.CANCELLED)
        config = self.config
        try:
            wanted = job_resources(self.job.resources, config.ray_num_cpus)
            if config.ray_worker not in WORKER_MODES:
                raise ValueError(
                    f"NODEJOB_RAY_WORKER must be one of {', '.join(WORKER_MODES)}, "
                    f"not {config.ray_worker!r}"
                )
        except ValueError as exc:
            return Outcome(JobStatus.FAILED, error=str(exc))
        async with RayJobs(config.ray_address, config.ray_token) as ray:
            try:
                await ray.version()
            except RayError as exc:
                return Outcome(JobStatus.FAILED, error=str(exc))
            capacity = capacity_of(ray.address)
            try:
                with trio.CancelScope() as self._wait_scope:
                    await capacity.admit(self.job.id, wanted, ray, self._note)
            except (Unplaceable, RayError) as exc:
                return Outcome(JobStatus.FAILED, error=str(exc))
            finally:
                self._wait_scope = None
            try:
                if self._cancelled():  # while it waited: Ray never saw it
                    return Outcome(JobStatus.CANCELLED)
                self.launching()
                first_seq = await self.first_worker_seq()
                self._handle = {
                    "address": ray.address,
                    "submission_id": self.job.id,
                    "first_seq": first_seq,
                    "resources": wanted,
                    "submitted": False,
                }
                await self.store.set_handle(self.job.id, self._handle)
                return await self._submit_and_follow(ray)
            finally:
                capacity.release(self.job.id)

    async def resume(self) -> Outcome:
        handle = dict(self.job.handle or {})
        done = recorded_outcome(handle)
        if done is not None:  # its record goes with a later sweep
            return done
        if not handle.get("submission_id"):  # the server stopped before it submitted
            return await self.run()
        self._handle = handle
        async with RayJobs(handle["address"], self.config.ray_token) as ray:
            capacity = capacity_of(ray.address)
            capacity.hold(self.job.id, handle.get("resources") or {})
            try:
                return await self._submit_and_follow(ray)
            finally:
                capacity.release(self.job.id)

    async def request_cancel(self) -> None:
        self._cancel_requested = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        self._start_stop()

    def _cancelled(self) -> bool:
        """Whether a cancel was requested (a call: mypy would narrow the attribute)."""
        return self._cancel_requested

    def _note(self, text: str) -> None:
        """A message of ours before the worker exists (seqs are still the server's)."""
        message = {"type": MessageType.LOG_UPDATE.value, "node_id": None, "content": text}
        self.log.append(self.job.id, {**message, "severity": "info"})

    # -- submitting -----------------------------------------------------------------------

    async def _submit_and_follow(self, ray: RayJobs) -> Outcome:
        handle = self._handle
        assert handle is not None
        if not handle.get("submitted"):
            # "Not submitted" may be stale: a server can die after Ray took the job and before
            # recording so; and a failed submission may have reached Ray all the same.
            if self._cancel_requested:
                if not await self._known(ray):
                    return Outcome(JobStatus.CANCELLED)
            else:
                try:
                    await self._submit(ray, handle)
                except RayError as exc:
                    if not await self._known(ray):
                        return Outcome(
                            JobStatus.FAILED, error=f"cannot submit the job to Ray: {exc}"
                        )
            handle["submitted"] = True
            await self.store.set_handle(self.job.id, handle)
        return await self._follow(ray)

    async def _known(self, ray: RayJobs) -> bool:
        """Whether Ray has this job (False also when Ray cannot say)."""
        try:
            return await ray.info(self.job.id) is not None
        except RayError:
            return False

    async def _submit(self, ray: RayJobs, handle: dict[str, Any]) -> None:
        request = {
            "job_id": self.job.id,
            "first_seq": handle["first_seq"],
            "graph": self.job.graph or {},
            "params": self.job.params,
        }
        package = zip_package({REQUEST_FILE: dumps(request).encode()})
        digest = hashlib.sha256(package).hexdigest()[:32]
        runtime_env: dict[str, Any] = {
            "working_dir": await ray.ensure_package(f"_ray_pkg_{digest}.zip", lambda: package),
            "env_vars": {
                **passed_env(self.config),
                "NODEJOB_JOB_ID": self.job.id,
                # Ray's grace between SIGTERM and SIGKILL when stopping (whole seconds).
                "RAY_JOB_STOP_WAIT_TIME_S": str(max(1, round(self.config.kill_grace_s))),
            },
        }
        if self.config.ray_worker == "bundle":
            runtime_env["py_modules"] = [await _bundle_package(ray, self.config.home)]
        wanted = handle.get("resources") or {}
        body: dict[str, Any] = {
            "entrypoint": f"exec {self.config.ray_worker_command} --request {REQUEST_FILE}",
            "submission_id": handle["submission_id"],
            "runtime_env": runtime_env,
            "metadata": {"nodejob_job_id": self.job.id, "nodejob_user_id": self.job.user_id},
        }
        if "CPU" in wanted:
            body["entrypoint_num_cpus"] = wanted["CPU"]
        if "GPU" in wanted:
            body["entrypoint_num_gpus"] = wanted["GPU"]
        if "memory" in wanted:
            body["entrypoint_memory"] = int(wanted["memory"])
        if not await ray.submit(body):
            logger.info("job %s: Ray already had it (submitted before a restart)", self.job.id)

    # -- following ------------------------------------------------------------------------

    async def _follow(self, ray: RayJobs) -> Outcome:
        """Ingest the Ray job's log until Ray reports it terminal; then record the outcome
        (the Ray record itself goes with a later sweep).

        Cancellation: stops following (the server is stopping); the Ray job runs on.
        """
        submission_id = self.job.id
        ingester = StreamIngester(self.log, self.job.id, source=f"Ray job {submission_id}")
        log = _RayLog(ingester)
        state: dict[str, Any] = {"info": None, "broken": None}
        try:
            async with trio.open_nursery() as nursery:
                self._nursery, self._ray, self._bell = nursery, ray, _Doorbell()
                if self._cancel_requested:
                    self._start_stop()
                if capacity_of(ray.address).sweep_due():  # while this job runs; no latency
                    nursery.start_soon(self._sweep, ray)
                nursery.start_soon(self._tail, ray, log, state)
                await self._watch(ray, ingester, state)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery, self._ray, self._bell = None, None, None
        info, broken = state["info"], state["broken"]
        if broken is None and ingester.outcome is None and info is not None:
            # Ray says it is over, so its log is complete; the tail may lag behind it.
            log.restart()
            try:
                log.feed((await ray.logs(submission_id)).encode())
                log.end()
            except ProtocolError as exc:
                broken = f"the worker's stream is broken: {exc}"
            except RayError as exc:
                logger.warning("job %s: cannot read the end of its Ray log: %s", self.job.id, exc)
        outcome = self._outcome(ingester.outcome, info, broken, log)
        await record_outcome(self.log, self.store, self.job.id, self._handle or {}, outcome)
        return outcome

    async def _tail(self, ray: RayJobs, log: _RayLog, state: dict[str, Any]) -> None:
        """Read the log tail into ``log``, attaching again (from the start) if it breaks off."""
        assert self._bell is not None
        delay = RETRY_MIN_S
        while True:
            log.restart()
            try:
                async with ray.tail(self.job.id) as ws:
                    while True:
                        try:
                            frame = await ws.get_message()
                        except trio_websocket.ConnectionClosed:
                            break
                        log.feed(frame.encode() if isinstance(frame, str) else frame)
                        await self.log.drain()
                        if log.ingester.outcome is not None:
                            self._bell.ring()  # the worker has said its last word
                            return
                        delay = RETRY_MIN_S
            except ProtocolError as exc:
                state["broken"] = f"the worker's stream is broken: {exc}"
                self._start_stop()
                return
            except RayError as exc:
                logger.debug("job %s: log tail: %s", self.job.id, exc)
            # Ray closes the tail a few seconds after the job ends: let the watcher look
            # now, and attach again (the log replays from its start) if it is not over.
            self._bell.ring()
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _watch(self, ray: RayJobs, ingester: StreamIngester, state: dict[str, Any]) -> None:
        """Poll Ray's status until the job is terminal (or gone); Ray has no status events."""
        assert self._bell is not None
        capacity = capacity_of(ray.address)
        delay = STATUS_POLL_MIN_S
        said_last_word: float | None = None
        while True:
            try:
                info = await ray.info(self.job.id)
            except RayError as exc:
                state["broken"] = f"lost the Ray cluster: {exc}"
                return
            state["info"] = info
            if info is None or info.get("status") in RAY_TERMINAL:
                return
            if info.get("driver_node_id"):
                capacity.moved(self.job.id, str(info["driver_node_id"]))
            now = trio.current_time()
            if ingester.outcome is not None and said_last_word is None:
                said_last_word = now
            if said_last_word is not None and now - said_last_word > self.config.kill_grace_s:
                self._start_stop()  # it has said its last word but does not exit
            expecting = said_last_word is not None or self._stopping
            with trio.move_on_after(delay) as timer:
                await self._bell.wait()
            rung = not timer.cancelled_caught
            delay = STATUS_POLL_MIN_S if expecting or rung else min(delay * 2, STATUS_POLL_MAX_S)

    async def _sweep(self, ray: RayJobs) -> None:
        try:
            deleted = await sweep_finished(ray, self.store)
        except RayError as exc:
            logger.warning("sweep of the Ray cluster at %s failed: %s", ray.address, exc)
        else:
            logger.debug("swept %d finished jobs from %s", len(deleted), ray.address)

    def _start_stop(self) -> None:
        if self._nursery is not None and self._ray is not None and not self._stopping:
            self._stopping = True
            self._nursery.start_soon(self._stop, self._ray)
            if self._bell is not None:
                self._bell.ring()

    async def _stop(self, ray: RayJobs) -> None:
        """Ask Ray to stop the job, again each second until the watcher sees it terminal
        (the follow nursery then cancels this): Ray acts on a stop of a PENDING job only
        once it leaves PENDING, and a stop sent before its supervisor exists is lost."""
        while True:
            try:
                await ray.stop(self.job.id)
            except RayError as exc:
                logger.warning("job %s: Ray stop failed: %s", self.job.id, exc)
            await trio.sleep(STOP_RETRY_S)

    def _outcome(
        self,
        said: Outcome | None,
        info: dict[str, Any] | None,
        broken: str | None,
        log: _RayLog,
    ) -> Outcome:
        if broken is not None:
            return Outcome(JobStatus.FAILED, error=broken)
        if said is not None:
            return said
        if self._cancel_requested:
            return Outcome(JobStatus.CANCELLED)
        if info is None:
            return Outcome(
                JobStatus.FAILED,
                error=f"Ray job {self.job.id} is gone (deleted outside nodejob, "
                "or the Ray cluster restarted)",
            )
        detail = log.stderr[-1][:500] if log.stderr else ""
        code = info.get("driver_exit_code")
        if isinstance(code, int):
            return Outcome(JobStatus.FAILED, error=describe_exit(code, detail))
        status = str(info.get("status"))
        if status == "STOPPED":
            return Outcome(JobStatus.FAILED, error="the Ray job was stopped outside nodejob")
        message = str(info.get("message") or "").strip().split("\n", 1)[0]
        message = message.split(", last available logs", 1)[0][:1000]
        error = f"Ray job {status.lower()}: {message or 'no message'}"
        return Outcome(JobStatus.FAILED, error=f"{error}: {detail}" if detail else error)


async def sweep_finished(ray: RayJobs, store: Store, settle_s: float = SETTLE_S) -> list[str]:
    """Delete the Ray records of nodejob jobs that ended over ``settle_s`` ago (by Ray's
    ``end_time``, on our clock). Returns their ids.

    Only records whose id is a finished ``ray`` job of ``store`` submitted to this address
    are touched; other users' jobs never are. Idempotent: it also removes a record that
    Ray's job monitor wrote back after an early delete, and what a crash left behind.
    """
    deleted: list[str] = []
    cutoff_ms = (time.time() - settle_s) * 1000
    for info in await ray.jobs():
        submission_id, end_ms = info.get("submission_id"), info.get("end_time")
        if (
            not isinstance(submission_id, str)
            or info.get("status") not in RAY_TERMINAL
            or not isinstance(end_ms, int | float)
            or end_ms > cutoff_ms
        ):
            continue
        row = await store.get_job(submission_id)
        if (
            row is None
            or not row.is_finished
            or row.execution_strategy != ExecutionStrategy.RAY
            or (row.handle or {}).get("address") != ray.address
        ):
            continue
        await ray.delete(submission_id)
        deleted.append(submission_id)
    return deleted


_bundles: dict[Path, tuple[Path, str]] = {}


def _bundle_name(home: Path) -> tuple[Path, str]:
    """(The worker bundle, its package name, from a hash of its bytes.) Blocking."""
    from nodejob.bundle import worker_bundle_path

    path = worker_bundle_path(home)
    known = _bundles.get(home)
    if known is None or known[0] != path:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
        known = _bundles[home] = (path, f"_ray_pkg_nodejob_worker_{digest}.zip")
    return known


async def _bundle_package(ray: RayJobs, home: Path) -> str:
    """The worker bundle as a ``py_modules`` package on the cluster (uploaded if missing).

    A .pyz is a zip: unpacked by Ray, its nodejob/ and trio/ land on the worker's PYTHONPATH.
    """
    from nodejob.bundle import BundleError

    try:
        path, name = await trio.to_thread.run_sync(_bundle_name, home)
    except BundleError as exc:
        raise RayError(f"cannot build the worker bundle: {exc}") from None
    return await ray.ensure_package(name, path.read_bytes)
