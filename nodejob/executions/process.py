"""The ``subprocess`` strategy: each job runs in its own ``nodejob worker`` process group.

The worker is started with ``sys.executable`` in a new session (so a Ctrl-C at the server's
terminal never reaches it), with a scrubbed environment, its stdout going to a spool file
``NODEJOB_HOME/jobs/JOB_ID/stream.jsonl`` that the server tails into the message log
(inotify wakes the reader on Linux; elsewhere it polls). The worker runs under a small
supervisor process (``--status-file``) that records its exit status in ``exit.json``, so
even a server that restarted meanwhile can say how a worker died.

Re-adoption (DESIGN invariant 4): the job row's handle holds the supervisor's pid, its start
time (``/proc/PID/stat`` field 22) and the boot id, written before the worker gets its
request. A restarted server finds the worker alive only if all three match (a reused pid is
never mistaken for the worker), re-reads the spool from its start (the log drops seqs it
already has) and follows it to the end. A worker that died without its terminal line fails
the job with its exit status or signal. The spool directory is removed once the job's
messages are committed and its outcome is recorded in the handle.

Cancel: SIGTERM to the process group (the worker cancels its graph and prints ``cancelled``),
SIGKILL after ``kill_grace_s``; the outcome is returned only once the group is gone.

Storage faults: the two job-row writes made here (the handle at launch, the outcome at the
end) are retried while the database refuses them (locked by another process, disk full), as
the message log retries its commits: such a fault delays a job, it does not fail it. The
worker itself waits for space when its spool's disk is full (nodejob/worker.py).

Must not import apsw, docker or the server.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

import trio

import nodejob
from nodejob.executions.base import JobExecution, Outcome
from nodejob.executions.stream import (
    StreamIngester,
    describe_exit,
    record_outcome,
    recorded_outcome,
    until_stored,
)
from nodejob.protocol import ExecutionStrategy, JobStatus, ProtocolError, dumps, loads

if TYPE_CHECKING:
    from collections.abc import Mapping

    from nodejob.config import Config

logger = logging.getLogger(__name__)

JOBS_DIR: Final = "jobs"
SPOOL_NAME: Final = "stream.jsonl"
STDERR_NAME: Final = "stderr.log"
STATUS_NAME: Final = "exit.json"
READ_CHUNK_BYTES: Final = 256 * 1024
STDERR_TAIL_BYTES: Final = 4096
RESCAN_S: Final = 1.0
"""With inotify: re-read the spool at least this often anyway (a safety net)."""
POLL_MIN_S: Final = 0.005
POLL_MAX_S: Final = 0.2
"""Without inotify or pidfds: the polling interval backs off between these."""
REQUEST_TIMEOUT_S: Final = 30.0
GROUP_GONE_TIMEOUT_S: Final = 10.0
PASSED_ENV: Final = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH"}
    | {"PYTHONHOME", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "SSL_CERT_FILE", "SSL_CERT_DIR"}
)
"""What a subprocess worker inherits from the server's environment (plus LC_*, worker_env)."""
_IN_MODIFY: Final = 0x2
_HAVE_PROC: Final = os.path.exists("/proc/self/stat")


def job_dir(home: Path, job_id: str) -> Path:
    """Where a job's request, spool and exit status live: ``HOME/jobs/JOB_ID``."""
    return home / JOBS_DIR / job_id


def passed_env(config: Config, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The server variables named in ``config.worker_env`` (and present)."""
    names = {name.strip() for name in config.worker_env.split(",") if name.strip()}
    return {name: environ[name] for name in names if name in environ}


def worker_environment(config: Config, job_id: str) -> dict[str, str]:
    """A subprocess worker's environment: the harmless basics, never the server's secrets."""
    env = {k: v for k, v in os.environ.items() if k in PASSED_ENV or k.startswith("LC_")}
    env.update(passed_env(config))
    env["NODEJOB_JOB_ID"] = job_id
    return env


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of ``pid``; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # the name in parentheses may hold spaces
    return fields[0].decode(), int(fields[19])  # fields 3 (state) and 22 (starttime)


@functools.cache
def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            return file.read().strip()
    except OSError:
        return ""


class _Worker:
    """A worker's supervisor process (the leader of its process group), as this server sees it.

    ``verified``: seen alive with the recorded start time, so its pid is a group id that is
    ours to signal (a pid in use as a group id is never handed out again).
    """

    def __init__(self, pid: int, pidfd: int | None, *, alive: bool) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.exited = not alive
        self.verified = alive
        self.returncode: int | None = None
        """The leader's exit status, when this process was its parent and reaped it."""

    @classmethod
    def adopt(cls, handle: Mapping[str, Any]) -> _Worker:
        """The worker of a handle written by an earlier server (or this one)."""
        pid = int(handle["pid"])
        pidfd = _pidfd_open(pid)  # first: the checks below then vouch for what it refers to
        if _HAVE_PROC:
            stat = proc_stat(pid)
            same = (
                stat is not None
                and stat[1] == handle.get("start_time")
                and handle.get("boot_id", "") == boot_id()
            )
            alive = same and stat is not None and stat[0] != "Z"
        else:
            same = alive = _pid_exists(pid)
        if not alive and pidfd is not None:
            os.close(pidfd)
            pidfd = None
        worker = cls(pid, pidfd, alive=alive)
        if same and not alive:
            worker.reap()  # our own zombie: this process started it before a manager restart
        return worker

    async def wait(self) -> None:
        """Return once the leader has exited (and reap it if it is this process's child)."""
        if self.pidfd is not None:
            await trio.lowlevel.wait_readable(self.pidfd)
        else:
            delay = POLL_MIN_S
            while _pid_exists(self.pid) and self.returncode is None:
                await trio.sleep(delay)  # no pidfd: an external process, nothing to wait on
                delay = min(delay * 2, POLL_MAX_S)
                self.reap()
        self.reap()
        self.exited = True

    def reap(self) -> None:
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)

    def signal_group(self, signum: int) -> None:
        """Signal the worker's group while its leader lives (later, see ``clear_group``)."""
        if self.verified and not self.exited:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signum)

    async def clear_group(self) -> None:
        """Once the leader is gone: kill what is left of its group, wait until none is left."""
        if not self.verified or not _group_exists(self.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        delay = POLL_MIN_S
        with trio.move_on_after(GROUP_GONE_TIMEOUT_S) as scope:
            while _group_exists(self.pid):  # processes we do not parent: no event to wait on
                await trio.sleep(delay)
                delay = min(delay * 2, POLL_MAX_S)
        if scope.cancelled_caught:
            logger.warning("process group %d still has processes after SIGKILL", self.pid)

    def close(self) -> None:
        if self.pidfd is not None:
            trio.lowlevel.notify_closing(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


def _pidfd_open(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # gone, or no pidfds on this system
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _group_exists(pgid: int) -> bool:
    """Whether process group ``pgid`` has a process that is not a zombie."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):  # EPERM: not ours any more
        return False
    if not _HAVE_PROC:
        return True
    # kill() counts zombies, which linger until their parent (init, for an orphan) reaps them.
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as file:
                    data = file.read()
            except OSError:
                continue
            fields = data[data.rindex(b")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != b"Z":  # fields 5 (pgrp) and 3 (state)
                return True
    return False


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


class _SpoolTail:
    """A growing spool file: read what is there, then wait until it changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None
        self._inotify: int | None = None
        self._poll = POLL_MIN_S
        if sys.platform == "linux" and path.exists():
            with contextlib.suppress(OSError, AttributeError):
                fd = _libc().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
                if fd >= 0 and _libc().inotify_add_watch(fd, os.fsencode(path), _IN_MODIFY) < 0:
                    os.close(fd)
                    fd = -1
                self._inotify = fd if fd >= 0 else None

    def read_chunk(self) -> bytes:
        """The next bytes written since the last read; b"" at the current end."""
        if self._file is None:
            try:
                self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open
            except FileNotFoundError:
                return b""
        chunk: bytes = self._file.read(READ_CHUNK_BYTES)
        if chunk:
            self._poll = POLL_MIN_S
        return chunk

    async def changed(self) -> None:
        """Return when the file may have grown (an inotify event, or a timer without one)."""
        if self._inotify is None:
            await trio.sleep(self._poll)
            self._poll = min(self._poll * 2, POLL_MAX_S)
            return
        with trio.move_on_after(RESCAN_S):
            await trio.lowlevel.wait_readable(self._inotify)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._inotify, 4096):
                pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._inotify is not None:
            trio.lowlevel.notify_closing(self._inotify)
            os.close(self._inotify)
            self._inotify = None


class _Wakeup:
    """A level-triggered doorbell: ``clear`` before looking, ``wait`` after."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    def clear(self) -> None:
        if self._event.is_set():
            self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class SubprocessExecution(JobExecution):
    strategy: ClassVar[ExecutionStrategy] = ExecutionStrategy.SUBPROCESS
    survives_restart: ClassVar[bool] = True

    _cancel_requested = False
    _terminating = False
    _nursery: trio.Nursery | None = None
    _worker: _Worker | None = None
    _handle: dict[str, Any] | None = None

    @property
    def directory(self) -> Path:
        return job_dir(self.config.home, self.job.id)

    async def run(self) -> Outcome:
        if self._cancel_requested:
            return Outcome(JobStatus.CANCELLED)
        first_seq = await self.first_worker_seq()
        request = {
            "job_id": self.job.id,
            "first_seq": first_seq,
            "graph": self.job.graph or {},
            "params": self.job.params,
        }
        try:
            worker = await self._launch(dumps(request).encode())
        except OSError as exc:
            shutil.rmtree(self.directory, ignore_errors=True)
            return Outcome(JobStatus.FAILED, error=f"cannot start the worker: {exc}")
        return await self._follow(worker)

    async def resume(self) -> Outcome:
        handle = self.job.handle
        if not handle:
            # The server stopped before it recorded a worker, so no worker got the request (one
            # without it exits): nothing ran, and the job is launched now, as if for the first
            # time (its seqs go on after the ones already logged).
            return await self.run()
        self._handle = dict(handle)
        done = recorded_outcome(handle)
        if done is not None:  # the worker ended and its messages were committed
            shutil.rmtree(self.directory, ignore_errors=True)
            return done
        return await self._follow(_Worker.adopt(handle))

    async def request_cancel(self) -> None:
        self._cancel_requested = True
        self._start_terminate()

    def _start_terminate(self) -> None:
        if self._nursery is not None and self._worker is not None and not self._terminating:
            self._terminating = True
            self._nursery.start_soon(self._terminate, self._worker)

    async def _terminate(self, worker: _Worker) -> None:
        worker.signal_group(signal.SIGTERM)
        await trio.sleep(self.config.kill_grace_s)
        worker.signal_group(signal.SIGKILL)

    async def _kill_straggler(self, worker: _Worker) -> None:
        await trio.sleep(self.config.kill_grace_s)
        worker.signal_group(signal.SIGKILL)

    # -- starting -------------------------------------------------------------------------

    async def _launch(self, request: bytes) -> _Worker:
        directory = self.directory
        shutil.rmtree(directory, ignore_errors=True)  # a leftover of a launch that never ran
        directory.mkdir(parents=True, mode=0o700)
        argv = [*await self._worker_command(), "--status-file", str(directory / STATUS_NAME)]
        pid, request_pipe = _spawn(argv, worker_environment(self.config, self.job.id), directory)
        worker = _Worker(pid, _pidfd_open(pid), alive=True)
        stat = proc_stat(pid) if _HAVE_PROC else None
        self._handle = {
            "pid": pid,
            "start_time": stat[1] if stat is not None else None,
            "boot_id": boot_id(),
            "dir": str(directory),
        }
        try:
            # Shielded per attempt: once the handle is written, the worker must get its
            # request, whatever cancellation came meanwhile (the next server re-adopts it).
            await until_stored(
                self.job.id,
                functools.partial(self.store.set_handle, self.job.id, self._handle),
                shield=True,
            )
        except BaseException:
            worker.signal_group(signal.SIGKILL)  # no handle, no re-adoption: it must not run
            os.close(request_pipe)
            shutil.rmtree(directory, ignore_errors=True)
            raise
        # Only now does the worker get its request (a worker without one exits, status 2).
        with trio.CancelScope(shield=True):
            async with trio.lowlevel.FdStream(request_pipe) as pipe:
                with (
                    trio.move_on_after(REQUEST_TIMEOUT_S),
                    contextlib.suppress(trio.BrokenResourceError),
                ):
                    await pipe.send_all(request)
        return worker

    async def _worker_command(self) -> list[str]:
        """``python -m nodejob worker`` of this very nodejob; from a zipapp, the worker bundle."""
        if not sys.executable:
            raise OSError("sys.executable is unknown: cannot start a Python worker")
        package = Path(nodejob.__file__).parent
        if (package / "worker.py").is_file():
            try:
                from_cwd = package.parent.resolve() == Path.cwd().resolve()
            except OSError:
                from_cwd = False
            # -P (no cwd on sys.path) unless this nodejob itself is only found through the cwd.
            return [sys.executable, *([] if from_cwd else ["-P"]), "-m", "nodejob", "worker"]
        from nodejob.bundle import BundleError, worker_bundle_path

        try:
            bundle = await trio.to_thread.run_sync(worker_bundle_path, self.config.home)
        except BundleError as exc:
            raise OSError(str(exc)) from None
        return [sys.executable, "-I", str(bundle), "worker"]

    # -- following ------------------------------------------------------------------------

    async def _follow(self, worker: _Worker) -> Outcome:
        """Ingest the spool until the worker has exited; then settle and clean up.

        Cancellation: stops following (the server is stopping); the worker runs on.
        """
        directory = self.directory
        tail = _SpoolTail(directory / SPOOL_NAME)
        ingester = StreamIngester(self.log, self.job.id, source=f"spool {tail.path}")
        broken: str | None = None
        wakeup = _Wakeup()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery, self._worker = nursery, worker
                nursery.start_soon(self._wake_on_exit, worker, wakeup)
                nursery.start_soon(self._wake_on_change, tail, wakeup)
                if self._cancel_requested:
                    self._start_terminate()
                straggler = False
                while True:
                    wakeup.clear()
                    exited = worker.exited  # before reading: a read after the exit is complete
                    while broken is None and (chunk := tail.read_chunk()):
                        try:
                            ingester.feed(chunk)
                        except ProtocolError as exc:
                            broken = f"the worker's stream is broken: {exc}"
                            self._start_terminate()
                        await self.log.drain()
                        await trio.lowlevel.checkpoint()
                    if exited:
                        break
                    if ingester.outcome is not None and not straggler:
                        straggler = True  # it has said its last word: it must exit now
                        nursery.start_soon(self._kill_straggler, worker)
                    await wakeup.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            tail.close()
            worker.close()
        if broken is None:
            ingester.end()
        outcome = ingester.outcome
        if broken is not None:
            outcome = Outcome(JobStatus.FAILED, error=broken)
        elif outcome is None:
            outcome = (
                Outcome(JobStatus.CANCELLED)
                if self._cancel_requested
                else Outcome(JobStatus.FAILED, error=self._exit_reason(worker))
            )
        await worker.clear_group()
        handle = self._handle or {}
        await record_outcome(self.log, self.store, self.job.id, handle, outcome)
        shutil.rmtree(directory, ignore_errors=True)
        return outcome

    async def _wake_on_exit(self, worker: _Worker, wakeup: _Wakeup) -> None:
        if not worker.exited:
            await worker.wait()
        wakeup.set()

    async def _wake_on_change(self, tail: _SpoolTail, wakeup: _Wakeup) -> None:
        while True:
            await tail.changed()
            wakeup.set()

    def _exit_reason(self, worker: _Worker) -> str:
        """Why a worker ended without its terminal line, from its supervisor's record."""
        returncode = worker.returncode
        try:
            recorded = loads((self.directory / STATUS_NAME).read_bytes())
            returncode = int(recorded["returncode"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        if returncode is None:
            return "worker ended without a result (exit status unknown)"
        return describe_exit(returncode, self._stderr_tail())

    def _stderr_tail(self) -> str:
        """The last line the worker wrote to stderr (say, the exception), or ''."""
        try:
            with open(self.directory / STDERR_NAME, "rb") as file:
                file.seek(max(0, file.seek(0, os.SEEK_END) - STDERR_TAIL_BYTES))
                text = file.read().decode("utf-8", "replace")
        except OSError:
            return ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1][:500] if lines else ""


def _spawn(argv: list[str], env: dict[str, str], directory: Path) -> tuple[int, int]:
    """Start the worker in a new session, stdout to the spool, stderr to its log.

    Returns its pid and the write end of its stdin, where the request goes. posix_spawn
    (vfork-like) costs about a millisecond whatever the server's size: no thread needed.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
    stdin, request_pipe = os.pipe()
    to_close = [stdin]
    try:
        to_close.append(os.open(directory / SPOOL_NAME, flags, 0o600))
        to_close.append(os.open(directory / STDERR_NAME, flags, 0o600))
        to_close = [_above_stdio(fd) for fd in to_close]
        actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()]
        actions += [(os.POSIX_SPAWN_DUP2, fd, n) for n, fd in enumerate(to_close)]
        pid = os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=actions,
            setsid=True,  # its own session and process group: no Ctrl-C from our terminal
            setsigmask=(),
            setsigdef=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE),
        )
    except BaseException:
        os.close(request_pipe)
        raise
    finally:
        for fd in to_close:
            os.close(fd)
    return pid, request_pipe


def _inheritable_fds() -> list[int]:
    """The server's inheritable descriptors above 2, which a worker must not get.

    Python opens everything close-on-exec, but not everything in the server is: hypercorn
    marks its listening socket inheritable, and a worker holding it would keep the port busy
    after the server stopped (a restart could not bind it again). (glibc ignores a close
    action for a descriptor closed meanwhile by another thread.)
    """
    try:
        names = os.listdir("/proc/self/fd" if _HAVE_PROC else "/dev/fd")
    except OSError:
        return []
    fds = []
    for name in names:
        fd = int(name)
        with contextlib.suppress(OSError):  # the directory's own descriptor, now closed
            if fd > 2 and os.get_inheritable(fd):
                fds.append(fd)
    return fds


def _above_stdio(fd: int) -> int:
    """``fd``, moved to 3 or above so that the child's dup2 onto 0-2 cannot clobber it."""
    if fd > 2:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved
