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

Admission. Ray holds a job it cannot place as PENDING, and a PENDING job ignores stop
requests until it leaves that state (ray-project/ray#58353). So we never hand Ray a job it
cannot place: each job asks for CPUs/GPUs/memory (``resources`` of run_job; by default
``NODEJOB_RAY_NUM_CPUS`` = 1 CPU), and ``_Capacity`` books our running jobs onto the
cluster's alive nodes (their totals from the state API). A job that fits no node fails at
once; one that fits but finds no room waits, first come first served, before submission
(cancelling it then is instant: Ray never saw it). Capacity used by other Ray users is not
counted; a job of ours can still be PENDING then, and is handled below.

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
fast while an end is expected, backing off to 2 s otherwise) until Ray reports SUCCEEDED,
FAILED or STOPPED. The worker's terminal line gives the outcome; without one, Ray's exit
code or ``message`` does (the rest of the log is read first, through ``/logs``, since the
tail lags about a second). Then the outcome is recorded in the handle and the Ray job
deleted. Cancel: ``POST /api/jobs/{id}/stop`` (SIGTERM, then SIGKILL after ``kill_grace_s``,
passed to Ray as RAY_JOB_STOP_WAIT_TIME_S), repeated until Ray reports the job terminal; a
PENDING job stops the moment it leaves PENDING, and ends ``cancelled`` here once it has.

Must not import ray, apsw, docker or the server.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import logging
import math
import re
import ssl
import urllib.parse
import zipfile
from typing import TYPE_CHECKING, Any, ClassVar, Final

import httpx
import trio
import trio_websocket

from nodejob.executions.base import JobExecution, Outcome
from nodejob.executions.process import passed_env
from nodejob.executions.stream import (
    LineAssembler,
    StreamIngester,
    describe_exit,
    record_outcome,
    recorded_outcome,
)
from nodejob.protocol import ExecutionStrategy, JobStatus, MessageType, ProtocolError, dumps

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path


logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S: Final = 30.0
"""One REST call or WebSocket handshake."""
UNREACHABLE_LIMIT_S: Final = 120.0
"""How long a followed job tolerates a dashboard that does not answer (or answers 5xx)."""
RETRY_MIN_S: Final = 0.2
RETRY_MAX_S: Final = 5.0
STATUS_POLL_MIN_S: Final = 0.1
STATUS_POLL_MAX_S: Final = 2.0
STOP_RETRY_S: Final = 1.0
NODES_TTL_S: Final = 10.0
"""Admission re-reads the cluster's nodes this often (nodes come and go)."""
CLOSE_TIMEOUT_S: Final = 2.0
MAX_FRAME_CHARS: Final = 64 * 1024 * 1024
STDERR_LINES: Final = 20
REQUEST_FILE: Final = "request.json"
WORKER_MODES: Final = ("bundle", "installed")
RAY_TERMINAL: Final = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
RESOURCES: Final = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
"""run_job ``resources`` keys -> Ray resource names (memory in bytes)."""
_RAY_LINE: Final = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\t[A-Z]+ \S+:\d+ -- |Running entrypoint for job "
)
"""Lines Ray itself writes into a job's log (its logger's format, and the entrypoint line)."""
_OURS: Final = b'{"type":"'
"""How every line of the worker begins (nodejob.worker.LineWriter)."""


class RayError(RuntimeError):
    """The Ray dashboard refused a call or could not be reached; the message says which."""


class Unplaceable(RuntimeError):
    """No node of the cluster could ever hold the job's request."""


# -- the Ray Jobs REST API -------------------------------------------------------------------


class RayJobs:
    """The Ray Jobs API of one dashboard: REST through httpx, the log tail by WebSocket.

    Transport errors and 5xx answers are retried with backoff for up to UNREACHABLE_LIMIT_S
    (the dashboard restarts with its head; a followed job should outlive that), then raise
    RayError. Use as ``async with RayJobs(...) as ray``.

    Resource handling: on exit, closes the HTTP connections (shielded, also when cancelled).
    """

    def __init__(self, address: str, token: str = "") -> None:
        self.address = address.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(
            base_url=self.address, headers=self._headers, timeout=REQUEST_TIMEOUT_S
        )

    async def __aenter__(self) -> RayJobs:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool = True,
        final: Callable[[httpx.Response], bool] = lambda r: r.status_code < 500,
        **kwargs: Any,
    ) -> httpx.Response:
        """One call; transport errors and non-``final`` answers are retried (if ``retry``)."""
        deadline = trio.current_time() + UNREACHABLE_LIMIT_S
        delay = RETRY_MIN_S
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                error = f"no answer from the Ray dashboard at {self.address} ({exc!r})"
            else:
                if final(response):
                    if response.status_code in (401, 403):
                        raise RayError(
                            f"the Ray dashboard at {self.address} refused nodejob "
                            f"(HTTP {response.status_code}): set NODEJOB_RAY_TOKEN"
                        )
                    return response
                error = f"{method} {path}: HTTP {response.status_code}: {_last_line(response)}"
            if not retry or trio.current_time() + delay > deadline:
                raise RayError(error)
            logger.warning("Ray dashboard: %s; retrying in %.1f s", error, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def version(self) -> str:
        """Ray's version; fails at once (no retry) if nothing answers at the address."""
        response = await self._request("GET", "/api/version", retry=False)
        _expect(response, 200)
        return str(response.json().get("ray_version", "?"))

    async def info(self, submission_id: str) -> dict[str, Any] | None:
        """The job's details (``status``, ``message``, ``driver_exit_code``, ...); None if
        Ray does not know it."""
        response = await self._request("GET", f"/api/jobs/{submission_id}")
        if response.status_code == 404:
            return None
        _expect(response, 200)
        info: dict[str, Any] = response.json()
        return info

    async def submit(self, body: dict[str, Any]) -> bool:
        """Submit a job; False if one with its submission_id already exists (Ray's 500)."""
        response = await self._request(
            "POST", "/api/jobs/", json=body, final=lambda r: r.status_code < 500 or _exists(r)
        )
        if _exists(response):
            return False
        _expect(response, 200)
        return True

    async def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job; whether Ray found it running (fire and forget on its side)."""
        response = await self._request("POST", f"/api/jobs/{submission_id}/stop")
        if response.status_code == 404:
            return False
        _expect(response, 200)
        return bool(response.json().get("stopped"))

    async def delete(self, submission_id: str) -> None:
        """Forget a terminal job (its info; the log file stays on its node)."""
        # Not retried on a 5xx: Ray answers 500 for a job that is not terminal yet.
        response = await self._request("DELETE", f"/api/jobs/{submission_id}", final=lambda r: True)
        if response.status_code != 404:
            _expect(response, 200)

    async def logs(self, submission_id: str) -> str:
        """The job's whole log so far."""
        response = await self._request("GET", f"/api/jobs/{submission_id}/logs")
        _expect(response, 200)
        return str(response.json().get("logs", ""))

    async def ensure_package(self, name: str, data: Callable[[], bytes]) -> str:
        """Upload ``data()`` as package ``name`` unless the cluster has it; its ``gcs://`` URI.

        Asking also pins an existing package for a while, so it survives until the job that
        names it is submitted.
        """
        response = await self._request("GET", f"/api/packages/gcs/{name}")
        if response.status_code != 200:
            content = await trio.to_thread.run_sync(data)
            _expect(await self._request("PUT", f"/api/packages/gcs/{name}", content=content), 200)
        return f"gcs://{name}"

    async def nodes(self) -> dict[str, dict[str, float]] | None:
        """Resource totals of the alive nodes, by node id; None if the state API is missing."""
        response = await self._request("GET", "/api/v0/nodes", params={"detail": 1, "limit": 10000})
        try:
            _expect(response, 200)
            rows = response.json()["data"]["result"]["result"]
            return {
                str(row["node_id"]): {k: float(v) for k, v in row["resources_total"].items()}
                for row in rows
                if row.get("state") == "ALIVE"
            }
        except (RayError, KeyError, TypeError, ValueError) as exc:
            logger.warning("cannot read the nodes of the Ray cluster at %s: %s", self.address, exc)
            return None

    @contextlib.asynccontextmanager
    async def tail(self, submission_id: str) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        """The job's log as a WebSocket of text frames, from its first byte; closed by Ray
        a few seconds after the job ends.

        Resource handling: owns its TCP stream and always closes it (trio-websocket's own
        ``open_websocket_url`` leaves it to the garbage collector after a server-side close).
        Raises RayError if the connection or the handshake fails.
        """
        parts = urllib.parse.urlsplit(self.address)
        secure = parts.scheme == "https"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        resource = f"{parts.path.rstrip('/')}/api/jobs/{submission_id}/logs/tail"
        headers = [(k.lower().encode(), v.encode()) for k, v in self._headers.items()]
        stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                if secure:
                    context = ssl.create_default_context()
                    stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context)
                else:
                    stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            raise RayError(f"cannot reach the Ray dashboard at {self.address} ({exc!r})") from None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(REQUEST_TIMEOUT_S):
                        ws = await trio_websocket.wrap_client_stream(
                            nursery,
                            stream,
                            host if port in (80, 443) else f"{host}:{port}",
                            resource,
                            extra_headers=headers,
                            max_message_size=MAX_FRAME_CHARS,
                        )
                except (trio_websocket.HandshakeError, trio.TooSlowError, OSError) as exc:
                    raise RayError(f"log tail of Ray job {submission_id}: {exc!r}") from None
                try:
                    yield ws
                finally:
                    if trio.current_effective_deadline() != -math.inf:
                        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                            await ws.aclose()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _single(group) from None
        finally:
            await trio.aclose_forcefully(stream)


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception in a nursery's group (the caller's own, say ProtocolError), so that
    callers can catch it by type; the group itself if it holds more than one."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group


def _exists(response: httpx.Response) -> bool:
    return response.status_code == 500 and "already exists" in response.text


def _last_line(response: httpx.Response) -> str:
    """The gist of an error answer (Ray sends whole tracebacks): its last non-empty line."""
    lines = [line.strip() for line in response.text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(empty answer)"


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        request = response.request
        raise RayError(
            f"{request.method} {request.url.path}: HTTP {response.status_code}: "
            f"{_last_line(response)}"
        )


# -- admission --------------------------------------------------------------------------------


def job_resources(resources: dict[str, Any], default_cpus: float) -> dict[str, float]:
    """The Ray resources a job asks for (``CPU``, ``GPU``, ``memory`` in bytes) from its
    run_job ``resources``; ValueError naming a bad value. Other keys (docker's) are ignored."""
    wanted: dict[str, float] = {}
    for key, name in RESOURCES.items():
        value = resources.get(key)
        if value is None:
            value = default_cpus if key == "num_cpus" else 0
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"resources.{key} must be a number >= 0, not {value!r}")
        if value > 0:
            wanted[name] = float(value)
    return wanted


def _describe(resources: dict[str, float]) -> str:
    shown = [
        f"{name} {value / 2**30:g} GiB" if name == "memory" else f"{name} {value:g}"
        for name, value in sorted(resources.items())
    ]
    return ", ".join(shown) or "nothing"


class _Capacity:
    """Our own jobs' share of one Ray cluster (admission: Ray must never hold them PENDING).

    Each running job of ours holds its request on one node: the node Ray runs its driver on
    once known, until then the first node with room. Waiting jobs queue first come, first
    served. Work that other Ray users run is not seen (see the module docstring).
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.nodes: dict[str, dict[str, float]] | None = None
        self._fetched = -math.inf
        self._holds: dict[str, tuple[str | None, dict[str, float]]] = {}
        self._queue: list[str] = []
        self._changed = trio.Event()

    def _free(self, node: str) -> dict[str, float]:
        assert self.nodes is not None
        free = dict(self.nodes[node])
        for held_on, wanted in self._holds.values():
            if held_on == node:
                for name, amount in wanted.items():
                    free[name] = free.get(name, 0.0) - amount
        return free

    def _place(self, wanted: dict[str, float], *, room: bool = True) -> str | None:
        """The first node with room for ``wanted`` (or, ``room=False``, big enough at all)."""
        for node in sorted(self.nodes or {}):
            have = self._free(node) if room else (self.nodes or {})[node]
            if all(have.get(name, 0.0) >= amount - 1e-9 for name, amount in wanted.items()):
                return node
        return None

    async def admit(
        self, job_id: str, wanted: dict[str, float], ray: RayJobs, waiting: Callable[[str], None]
    ) -> None:
        """Return once ``wanted`` has room on some node (and hold it); Unplaceable if it fits
        no node at all. Calls ``waiting`` once, with a reason, if the job has to wait.

        Cancellation: leaves the queue; nothing is held.
        """
        if wanted:
            return
        self._queue.append(job_id)
        told = False
        try:
            while True:
                if trio.current_time() - self._fetched > NODES_TTL_S:
                    self.nodes = await ray.nodes()
                    self._fetched = trio.current_time()
                if self.nodes is None:  # no state API: leave placement to Ray alone
                    self._holds[job_id] = (None, wanted)
                    return
                self._place_unplaced()
                if self._place(wanted, room=False) is None:
                    biggest = max(self.nodes.values(), key=lambda r: r.get("CPU", 0), default={})
                    shown = {k: v for k, v in biggest.items() if k in RESOURCES.values()}
                    raise Unplaceable(
                        f"no node of the Ray cluster at {self.address} can run this job: it "
                        f"asks for {_describe(wanted)}; the biggest node has {_describe(shown)}"
                    )
                node = self._place(wanted) if self._queue[0] == job_id else None
                if node is not None:
                    self._holds[job_id] = (node, wanted)
                    return
                if not told:
                    told = True
                    ahead = self._queue.index(job_id)
                    waiting(
                        f"waiting for room on the Ray cluster: this job asks for "
                        f"{_describe(wanted)}; {len(self._holds)} running, {ahead} waiting ahead"
                    )
                with trio.move_on_after(NODES_TTL_S):
                    await self._changed.wait()
        finally:
            self._queue.remove(job_id)
            self._notify()

    def _place_unplaced(self) -> None:
        """Book re-adopted jobs whose node is not known yet on the first that fits."""
        for job_id, (node, wanted) in list(self._holds.items()):
            if node is None or node not in (self.nodes or {}):
                self._holds[job_id] = (
                    self._place(wanted) or self._place(wanted, room=False),
                    wanted,
                )

    def hold(self, job_id: str, wanted: dict[str, float]) -> None:
        """Book a job that Ray already has (re-adopted), room or not; placed when the
        nodes are next read, or where Ray says its driver runs."""
        if wanted:
            self._holds[job_id] = (None, wanted)

    def moved(self, job_id: str, node: str) -> None:
        """Ray runs the job's driver on ``node``: book it there."""
        held = self._holds.get(job_id)
        if held is not None and held[0] != node:
            self._holds[job_id] = (node, held[1])
            self._notify()

    def release(self, job_id: str) -> None:
        if self._holds.pop(job_id, None) is not None:
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


_CAPACITY: Final = trio.lowlevel.RunVar[dict[str, _Capacity]]("nodejob_ray_capacity")


def _capacity(address: str) -> _Capacity:
    try:
        known = _CAPACITY.get()
    except LookupError:
        known = {}
        _CAPACITY.set(known)
    return known.setdefault(address, _Capacity(address))


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
                return Outcome(JobStatus.FAILED, error=f"no Ray cluster reachable: {exc}")
            capacity = _capacity(ray.address)
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
                first_seq = self.log.last_seq(self.job.id) + 1
                # What came before must be on disk before a worker numbers what follows.
                await self.log.wait_committed(self.job.id, first_seq - 1)
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
        if done is not None:
            with contextlib.suppress(RayError):
                async with RayJobs(handle["address"], self.config.ray_token) as ray:
                    await ray.delete(handle["submission_id"])
            return done
        if not handle.get("submission_id"):  # the server stopped before it submitted
            return await self.run()
        self._handle = handle
        async with RayJobs(handle["address"], self.config.ray_token) as ray:
            capacity = _capacity(ray.address)
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
        submission_id = handle["submission_id"]
        if not handle.get("submitted"):
            if self._cancel_requested:
                return Outcome(JobStatus.CANCELLED)
            try:
                await self._submit(ray, handle)
            except RayError as exc:
                # An ambiguous failure (the answer was lost) may still have created it.
                with contextlib.suppress(RayError):
                    if await ray.info(submission_id) is not None:
                        return await self._follow(ray)
                return Outcome(JobStatus.FAILED, error=f"cannot submit the job to Ray: {exc}")
            handle["submitted"] = True
            await self.store.set_handle(self.job.id, handle)
        return await self._follow(ray)

    async def _submit(self, ray: RayJobs, handle: dict[str, Any]) -> None:
        request = {
            "job_id": self.job.id,
            "first_seq": handle["first_seq"],
            "graph": self.job.graph or {},
            "params": self.job.params,
        }
        package = _zip({REQUEST_FILE: dumps(request).encode()})
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
        """Ingest the Ray job's log until Ray reports it terminal; then settle and clean up.

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
        if info is not None and info.get("status") in RAY_TERMINAL:
            try:
                await ray.delete(submission_id)
            except RayError as exc:
                logger.warning("job %s: could not delete its Ray job: %s", self.job.id, exc)
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
        capacity = _capacity(ray.address)
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


def _zip(files: dict[str, bytes]) -> bytes:
    """A deterministic zip of ``files`` (equal contents, equal bytes, equal package name)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name], zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


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
