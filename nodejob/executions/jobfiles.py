"""A docker job's files on the host: the request its container reads, the spool it writes.

Both live in the job's directory ``NODEJOB_HOME/jobs/JOB_ID`` (0700, in a home that is 0700)
and are bind-mounted, one by one, into the container (``engine.container_options``).

The spool is the worker's copy of its stream (``nodejob worker --tee``), appended before each
line goes to stdout. The container's log is the live stream of a docker job but not a fully
durable one: with ``--live-restore``, stdout reaches the json-file log only through dockerd, and
what a container writes while dockerd is down is lost by the engine if the container exits
before dockerd is back — its last lines, the worker's terminal line among them. So once the
container has exited, a log that ended without the terminal line is topped up from the spool
(``top_up``): its lines go to the same StreamIngester, which skips the seqs it already has.

Permissions: the container runs as ``docker_user`` (65534 by default, rarely the server's
uid), so the request is made 0644 and the spool 0622: the server reads and writes it, anyone
else may only write it. That opens neither to other host users, who cannot enter the
directories above them; the container reaches each file only through its bind mount, which
the engine resolves. (Not a chown to the container's uid: the server need not be root, and
``docker_user`` may be a name only the image knows. Not an ACL: not every file system has
them. Not the whole directory mounted writable: the container could then replace its request
or fill the directory with other files.)

The copy is best effort on both sides: a worker stops copying at the first failed write (a
full disk, say) and its stream goes on (nodejob/worker.py); ``top_up`` takes an absent,
short or unreadable spool as "nothing more to add", never as a fault of the job.

Must not import apsw, docker or the server.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import TYPE_CHECKING, Any, Final

from nodejob.executions.process import READ_CHUNK_BYTES, SPOOL_NAME
from nodejob.protocol import ProtocolError, dumps

if TYPE_CHECKING:
    from pathlib import Path

    from nodejob.executions.stream import StreamIngester
    from nodejob.log import MessageLog

logger = logging.getLogger(__name__)

REQUEST_NAME: Final = "request.json"
REQUEST_MODE: Final = 0o644
SPOOL_MODE: Final = 0o622
"""Owner (the server) reads and writes; the container's user, whoever it is, only writes."""


def prepare(directory: Path, request: dict[str, Any]) -> tuple[Path, Path]:
    """Make the job's directory afresh with its request and an empty spool; their paths."""
    shutil.rmtree(directory, ignore_errors=True)  # a leftover of a launch that never ran
    directory.mkdir(parents=True, mode=0o700)
    return (
        _create(directory / REQUEST_NAME, REQUEST_MODE, dumps(request).encode()),
        _create(directory / SPOOL_NAME, SPOOL_MODE, b""),
    )


def _create(path: Path, mode: int, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, mode)  # exactly this mode, whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path


async def top_up(ingester: StreamIngester, directory: Path, log: MessageLog) -> None:
    """Feed the spool in ``directory`` to ``ingester`` from its start, until its end or the
    worker's terminal line (``ingester.outcome``), and log what it added.

    Call it once the worker has exited, with the ingester that read the container's log: an
    unfinished last line of the log is dropped (the spool has it whole, if at all). Nothing
    here fails the job: an absent or unreadable spool adds nothing, a line that is not a
    message is skipped (as in any stream), and one the ingester refuses (too long, a seq
    jump) ends the top-up with a warning.

    Cancellation: between chunks (``log.drain``); what was fed is ingested.
    """
    path = directory / SPOOL_NAME
    last_seq = ingester.last_seq
    try:
        file = open(path, "rb", buffering=0)  # noqa: ASYNC230, SIM115 - a local file, as process.py reads its spool
    except OSError as exc:
        logger.info("job %s: no spool to top up from (%s)", ingester.job_id, exc)
        return
    with file:
        ingester.restart()
        while ingester.outcome is None:
            try:
                chunk = file.read(READ_CHUNK_BYTES)
                if not chunk:
                    break
                ingester.feed(chunk)
            except (OSError, ProtocolError) as exc:
                logger.warning(
                    "job %s: stopped reading the spool %s: %s", ingester.job_id, path, exc
                )
                break
            await log.drain()
    if ingester.last_seq > last_seq or ingester.outcome is not None:
        logger.warning(
            "job %s: the log of %s ended at seq %d without the worker's last line; its spool "
            "brought seqs up to %d%s (the engine loses what a container writes while it is "
            "down if the container exits before it is back)",
            ingester.job_id,
            ingester.source,
            last_seq,
            ingester.last_seq,
            " and the worker's terminal line" if ingester.outcome is not None else "",
        )
