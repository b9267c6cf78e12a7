"""What nodejob says to, and knows of, a Ray cluster: the Jobs API client and admission.

``RayJobs`` speaks the Ray Jobs REST API of a cluster's dashboard (httpx) and reads a job's
log tail (a WebSocket, trio-websocket); nothing here imports ``ray``. ``Capacity`` is the
admission ledger of the ``ray`` strategy (nodejob/executions/ray.py): Ray holds a job it
cannot place as PENDING, where it ignores stop requests (ray-project/ray#58353), so nodejob
books its running jobs onto the cluster's alive nodes and submits a job only once one has
room for it.

Must not import ray, apsw, docker or the server.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import urllib.parse
import zipfile
from typing import TYPE_CHECKING, Any, Final

import httpx
import trio
import trio_websocket

from nodejob.connection import ConnectError, open_websocket

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_S: Final = 30.0
"""One REST call or WebSocket handshake."""
UNREACHABLE_LIMIT_S: Final = 120.0
"""How long a followed job tolerates a dashboard that does not answer (or answers 5xx)."""
RETRY_MIN_S: Final = 0.2
RETRY_MAX_S: Final = 5.0
NODES_TTL_S: Final = 10.0
"""Admission re-reads the cluster's nodes this often (nodes come and go)..."""
NODES_EMPTY_TTL_S: Final = 1.0
"""... and this often while the cluster has no alive node."""
SWEEP_INTERVAL_S: Final = 60.0
"""Finished jobs' records are swept from a cluster at most this often (nodejob/executions/ray.py)."""
CLOSE_TIMEOUT_S: Final = 2.0
MAX_FRAME_CHARS: Final = 64 * 1024 * 1024
RAY_TERMINAL: Final = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
RESOURCES: Final = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
"""run_job ``resources`` keys -> Ray resource names (memory in bytes)."""


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
                        hint = (
                            "it wants a token: set NODEJOB_RAY_TOKEN"
                            if response.status_code == 401
                            else "NODEJOB_RAY_TOKEN is not its token"
                        )
                        raise RayError(
                            f"the Ray dashboard at {self.address} refused nodejob "
                            f"(HTTP {response.status_code}; {hint})"
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
        """Forget a terminal job (its info; the log file stays on its node).

        Mind Ray's job monitor: it notices a job's supervisor exit up to ~2 s after the job's
        end, and if the job's record is gone by then, it writes a new one (FAILED, "Job
        supervisor actor died"). Delete only records that ended well before.
        """
        # Not retried on a 5xx: Ray answers 500 for a job that is not terminal yet.
        response = await self._request("DELETE", f"/api/jobs/{submission_id}", final=lambda r: True)
        if response.status_code != 404:
            _expect(response, 200)

    async def jobs(self) -> list[dict[str, Any]]:
        """Every job the cluster has a record of (one request; not retried)."""
        response = await self._request("GET", "/api/jobs/", retry=False)
        _expect(response, 200)
        jobs: list[dict[str, Any]] = response.json()
        return jobs

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
        scheme = "wss" if parts.scheme == "https" else "ws"
        path = f"{parts.path.rstrip('/')}/api/jobs/{submission_id}/logs/tail"
        url = urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))
        headers = [(k.lower().encode(), v.encode()) for k, v in self._headers.items()]
        try:
            async with open_websocket(
                url, self.address, extra_headers=headers, max_message_size=MAX_FRAME_CHARS
            ) as ws:
                yield ws
        except (ConnectError, trio_websocket.HandshakeError) as exc:
            raise RayError(f"log tail of Ray job {submission_id}: {exc!r}") from None


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


def zip_package(files: dict[str, bytes]) -> bytes:
    """A deterministic zip of ``files`` (equal contents, equal bytes, equal package name)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, files[name], zipfile.ZIP_DEFLATED)
    return buffer.getvalue()


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


class Capacity:
    """Our own jobs' share of one Ray cluster (admission: Ray must never hold them PENDING).

    Each running job of ours holds its request on one node: the node Ray runs its driver on
    once known, until then the first node with room. Waiting jobs queue first come, first
    served. Work that other Ray users run is not seen (see the module docstring). Also paces
    the sweep of finished jobs' records (``sweep_due``).
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.nodes: dict[str, dict[str, float]] | None = None
        self._fetched = -math.inf
        self._holds: dict[str, tuple[str | None, dict[str, float]]] = {}
        self._queue: list[str] = []
        self._changed = trio.Event()
        self._swept = -math.inf

    def sweep_due(self) -> bool:
        """True at most once per SWEEP_INTERVAL_S (the caller then sweeps)."""
        if trio.current_time() - self._swept < SWEEP_INTERVAL_S:
            return False
        self._swept = trio.current_time()
        return True

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
        none of the alive nodes. Calls ``waiting`` once, with a reason, if the job has to
        wait (for room, or for a cluster that has no alive node yet).

        Cancellation: leaves the queue; nothing is held.
        """
        if not wanted:
            return
        self._queue.append(job_id)
        told = False
        try:
            while True:
                # No alive node (the cluster is starting, say): look again soon.
                ttl = NODES_TTL_S if self.nodes else NODES_EMPTY_TTL_S
                if trio.current_time() - self._fetched > ttl:
                    self.nodes = await ray.nodes()
                    self._fetched = trio.current_time()
                if self.nodes is None:  # no state API: leave placement to Ray alone
                    self._holds[job_id] = (None, wanted)
                    return
                self._place_unplaced()
                if self.nodes and self._place(wanted, room=False) is None:
                    shapes = collections.Counter(
                        _describe({k: v for k, v in node.items() if k in RESOURCES.values()})
                        for node in self.nodes.values()
                    )
                    have = "; ".join(f"{n} x {shape}" for shape, n in sorted(shapes.items()))
                    raise Unplaceable(
                        f"no node of the Ray cluster at {self.address} can run this job: it "
                        f"asks for {_describe(wanted)}; the nodes have {have}"
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
                        if self.nodes
                        else f"waiting for the Ray cluster at {self.address} to have a node"
                    )
                with trio.move_on_after(ttl):
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


CAPACITY: Final = trio.lowlevel.RunVar[dict[str, Capacity]]("nodejob_ray_capacity")


def capacity_of(address: str) -> Capacity:
    try:
        known = CAPACITY.get()
    except LookupError:
        known = {}
        CAPACITY.set(known)
    return known.setdefault(address, Capacity(address))
