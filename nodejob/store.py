"""The SQLite store: users, jobs, the message ring and saved workflows.

The only module that imports apsw. One writer connection, used by one thread at a time (the
message log's group commit and the few other writes share it through ``_write_limiter``), and
reader connections for queries, so a long replay never waits behind a commit. Blocking calls
run through ``trio.to_thread``; a handful of point lookups by primary key (microseconds) run
inline on the event loop, where a thread hop would cost more than the query.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.resources
import os
import secrets
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import apsw
import apsw.bestpractice
import trio

from nodejob.protocol import TERMINAL, JobStatus, dumps, iso, loads

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

SCHEMA_VERSION: Final = 1
BUSY_TIMEOUT_MS: Final = 10_000


class StoreError(RuntimeError):
    """The database cannot be used (wrong version, corrupt, not a database): a clear message."""


class StoreUnavailable(StoreError):
    """A write could not be done now (the database is locked by another process, the disk is
    full, an I/O error): nothing was written, and trying again later may work.

    ``reason`` is SQLite's word for it, without the database's path (fit for a client).
    """

    def __init__(self, path: Path, reason: object) -> None:
        super().__init__(f"{path}: {reason}")
        self.reason = str(reason)


_TRANSIENT: Final = (apsw.BusyError, apsw.LockedError, apsw.FullError, apsw.IOError)


class Entry(NamedTuple):
    """One message of a job's log: its seq, its type and its exact JSON text."""

    seq: int
    type: str
    text: str


@dataclass(frozen=True, slots=True)
class User:
    id: str
    name: str


_JOB_COLUMNS: Final = (
    "id, user_id, job_type, status, workflow_id, execution_strategy, params, graph, created_at,"
    " started_at, finished_at, error, result, cost, last_seq, timeout_seconds, resources, handle"
)


@dataclass(slots=True)
class JobRecord:
    """A job's row: the truth about its state (DESIGN invariant 3)."""

    id: str
    user_id: str
    job_type: str
    status: JobStatus
    workflow_id: str | None
    execution_strategy: str
    params: dict[str, Any]
    graph: dict[str, Any] | None
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    cost: float | None = None
    last_seq: int = 0
    timeout_seconds: float | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    handle: dict[str, Any] | None = None

    @property
    def is_finished(self) -> bool:
        return self.status in TERMINAL

    def to_api(self) -> dict[str, Any]:
        """The job object of the REST API."""
        return {
            "id": self.id,
            "user_id": self.user_id,
            "job_type": self.job_type,
            "status": self.status.value,
            "workflow_id": self.workflow_id,
            "execution_strategy": self.execution_strategy,
            "params": self.params,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "error": self.error,
            "result": self.result,
            "cost": self.cost,
            "last_seq": self.last_seq,
        }

    def insert_row(self) -> tuple[Any, ...]:
        return (
            self.id,
            self.user_id,
            self.job_type,
            self.status.value,
            self.workflow_id,
            self.execution_strategy,
            dumps(self.params),
            dumps(self.graph) if self.graph is not None else None,
            self.created_at,
            self.started_at,
            self.finished_at,
            self.error,
            dumps(self.result) if self.result is not None else None,
            self.cost,
            self.last_seq,
            self.timeout_seconds,
            dumps(self.resources),
            dumps(self.handle) if self.handle is not None else None,
        )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> JobRecord:
        return cls(
            id=row[0],
            user_id=row[1],
            job_type=row[2],
            status=JobStatus(row[3]),
            workflow_id=row[4],
            execution_strategy=row[5],
            params=loads(row[6]),
            graph=loads(row[7]) if row[7] is not None else None,
            created_at=row[8],
            started_at=row[9],
            finished_at=row[10],
            error=row[11],
            result=loads(row[12]) if row[12] is not None else None,
            cost=row[13],
            last_seq=row[14],
            timeout_seconds=row[15],
            resources=loads(row[16]) if row[16] else {},
            handle=loads(row[17]) if row[17] is not None else None,
        )


@dataclass(slots=True)
class Batch:
    """One group commit: new job rows, messages, row updates and ring trims, in one transaction."""

    new_jobs: list[JobRecord] = field(default_factory=list)
    messages: list[tuple[str, int, str, str]] = field(default_factory=list)
    updates: dict[str, dict[str, Any]] = field(default_factory=dict)
    trims: dict[str, int] = field(default_factory=dict)
    """job_id -> delete messages with seq <= this."""

    def __bool__(self) -> bool:
        return bool(self.new_jobs or self.messages or self.updates)


def hash_token(token: str) -> str:
    # Tokens are 256-bit random strings, so one round of SHA-256 is enough: nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def _connect(path: Path, *, configure: bool = True) -> apsw.Connection:
    try:
        connection = apsw.Connection(str(path))
        connection.set_busy_timeout(BUSY_TIMEOUT_MS)
        if configure:
            _configure(connection)
    except apsw.Error as exc:
        raise StoreError(f"{path}: cannot open the database: {_first_line(exc)}") from None
    return connection


def _configure(connection: apsw.Connection) -> None:
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA foreign_keys=ON")


def _first_line(exc: BaseException | str) -> str:
    """SQLite's messages can run to many lines (integrity reports): the first one, and how
    many more there were, so a start-up error stays one line."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    more = f" (and {len(lines) - 1} more problems)" if len(lines) > 1 else ""
    return lines[0].strip() + more


class Store:
    """The database of one nodejob home. Open with ``Store.open(path)``; close with ``close()``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Configured only once the version and integrity checks pass: switching a newer or
        # damaged database to WAL would already be writing to a file we refuse to use.
        self._writer = _connect(path, configure=False)
        try:
            self._migrate()
        except BaseException:
            self._writer.close()
            raise
        self._inline = _connect(path)
        self._reader = _connect(path)
        self._write_limiter = trio.CapacityLimiter(1)
        self._read_limiter = trio.CapacityLimiter(1)

    @classmethod
    def open_sync(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fresh = not path.exists()
        if fresh:
            # Create the file private before SQLite writes anything into it.
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        return cls(path)

    @classmethod
    async def open(cls, path: Path) -> Store:
        return await trio.to_thread.run_sync(cls.open_sync, path)

    def _migrate(self) -> None:
        try:
            version = int(self._writer.execute("PRAGMA user_version").fetchall()[0][0] or 0)
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: database schema version {version} is newer than this "
                    f"nodejob supports ({SCHEMA_VERSION}); upgrade nodejob"
                )
            check = self._writer.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                problems = "\n".join(str(row[0]) for row in check)
                raise StoreError(
                    f"{self.path}: database is damaged: {_first_line(problems)};"
                    " restore it from a backup or move it aside"
                )
            _configure(self._writer)
            schema = importlib.resources.files("nodejob").joinpath("schema.sql").read_text()
            with self._writer:
                self._writer.execute(schema)
                self._writer.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except apsw.NotADBError:
            raise StoreError(f"{self.path}: not a nodejob database (file is not SQLite)") from None
        except apsw.CorruptError as exc:
            raise StoreError(f"{self.path}: database is corrupt: {_first_line(exc)}") from None
        except _TRANSIENT as exc:
            raise StoreError(f"{self.path}: cannot prepare the database: {exc}") from None

    def close(self) -> None:
        for connection in (self._inline, self._reader, self._writer):
            connection.close()

    # -- writes ---------------------------------------------------------------------------

    def commit_batch_sync(self, batch: Batch) -> None:
        """Write one batch in one transaction (the group commit); StoreError if it cannot."""
        try:
            self._commit_batch(batch)
        except _TRANSIENT as exc:
            raise StoreUnavailable(self.path, exc) from exc

    def _commit_batch(self, batch: Batch) -> None:
        with self._writer:
            if batch.new_jobs:
                self._writer.executemany(
                    f"INSERT INTO jobs ({_JOB_COLUMNS}) VALUES ({', '.join('?' * 18)})",
                    [job.insert_row() for job in batch.new_jobs],
                )
            if batch.messages:
                self._writer.executemany(
                    "INSERT OR IGNORE INTO messages (job_id, seq, type, body) VALUES (?, ?, ?, ?)",
                    batch.messages,
                )
            # Most updates only move last_seq: one executemany for those; status changes are
            # rare (a few per job) and go one statement each.
            seqs_only = []
            for job_id, changes in batch.updates.items():
                if changes.keys() == {"last_seq"}:
                    seqs_only.append((changes["last_seq"], job_id))
                    continue
                columns = ", ".join(f"{name} = ?" for name in changes)
                self._writer.execute(
                    f"UPDATE jobs SET {columns} WHERE id = ?", (*changes.values(), job_id)
                )
            if seqs_only:
                self._writer.executemany("UPDATE jobs SET last_seq = ? WHERE id = ?", seqs_only)
            if batch.trims:
                self._writer.executemany(
                    "DELETE FROM messages WHERE job_id = ? AND seq <= ?",
                    [(job_id, upto) for job_id, upto in batch.trims.items()],
                )

    async def commit_batch(self, batch: Batch) -> None:
        async with self._write_limiter:
            await trio.to_thread.run_sync(self.commit_batch_sync, batch)

    async def _write(self, sql: str, bindings: Iterable[Any] = ()) -> None:
        """Run one write statement in its own transaction; StoreUnavailable if it cannot be
        done now (locked past the busy timeout, disk full)."""

        def run() -> None:
            try:
                with self._writer:
                    self._writer.execute(sql, tuple(bindings))
            except _TRANSIENT as exc:
                raise StoreUnavailable(self.path, exc) from exc

        async with self._write_limiter:
            await trio.to_thread.run_sync(run)

    def add_user_sync(self, name: str) -> tuple[User, str]:
        token = new_token()
        user = User(id=uuid.uuid4().hex, name=name)
        try:
            with self._writer:
                self._writer.execute(
                    "INSERT INTO users (id, name, token_hash, created_at) VALUES (?, ?, ?, ?)",
                    (user.id, name, hash_token(token), time.time()),
                )
        except apsw.ConstraintError:
            raise StoreError(f"user {name!r} already exists") from None
        except _TRANSIENT as exc:
            raise StoreUnavailable(self.path, exc) from None
        return user, token

    def ensure_local_user_sync(self, token_path: Path) -> None:
        """First start: create user ``local`` and write its token file (mode 0600)."""
        rows = self._writer.execute("SELECT id FROM users WHERE name = 'local'").fetchall()
        if rows and token_path.exists():
            return
        if rows:
            # The token file was lost: issue a new token for local rather than lock it out.
            token = new_token()
            with self._writer:
                self._writer.execute(
                    "UPDATE users SET token_hash = ? WHERE name = 'local'", (hash_token(token),)
                )
        else:
            _, token = self.add_user_sync("local")
        fd = os.open(token_path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(token + "\n")
        os.chmod(token_path, 0o600)

    async def ensure_local_user(self, token_path: Path) -> None:
        async with self._write_limiter:
            await trio.to_thread.run_sync(self.ensure_local_user_sync, token_path)

    async def put_workflow(
        self, user_id: str, workflow_id: str, name: str, graph: dict[str, Any]
    ) -> dict[str, Any]:
        now = time.time()
        await self._write(
            "INSERT INTO workflows (user_id, id, name, graph, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, id) DO UPDATE SET"
            " name = excluded.name, graph = excluded.graph, updated_at = excluded.updated_at",
            (user_id, workflow_id, name, dumps(graph), now, now),
        )
        return {"id": workflow_id, "name": name, "graph": graph, "updated_at": iso(now)}

    async def purge_messages(self, finished_before: float) -> None:
        """Retention: drop finished jobs' messages, except each job's terminal job_update."""
        await self._write(
            "DELETE FROM messages WHERE job_id IN (SELECT id FROM jobs WHERE finished_at < ?)"
            " AND seq < (SELECT last_seq FROM jobs WHERE jobs.id = messages.job_id)",
            (finished_before,),
        )

    async def set_handle(self, job_id: str, handle: dict[str, Any]) -> None:
        await self._write("UPDATE jobs SET handle = ? WHERE id = ?", (dumps(handle), job_id))

    # -- reads ----------------------------------------------------------------------------

    async def authenticate(self, token: str) -> User | None:
        """The user owning ``token``, or None. Inline: one primary-key lookup, no thread hop."""
        digest = hash_token(token)
        rows = self._inline.execute(
            "SELECT id, name, token_hash FROM users WHERE token_hash = ?", (digest,)
        ).fetchall()
        if not rows or not hmac.compare_digest(str(rows[0][2]), digest):
            return None
        return User(id=str(rows[0][0]), name=str(rows[0][1]))

    async def get_job(self, job_id: str) -> JobRecord | None:
        return self.get_job_sync(job_id)

    def get_job_sync(self, job_id: str) -> JobRecord | None:
        rows = self._inline.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
        ).fetchall()
        return JobRecord.from_row(rows[0]) if rows else None

    async def _read(self, sql: str, bindings: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            return self._reader.execute(sql, bindings).fetchall()

        async with self._read_limiter:
            return await trio.to_thread.run_sync(run)

    async def read_messages(self, job_id: str, after_seq: int, limit: int) -> list[Entry]:
        rows = await self._read(
            "SELECT seq, type, body FROM messages WHERE job_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (job_id, after_seq, limit),
        )
        return [Entry(*row) for row in rows]

    async def list_jobs(
        self,
        user_id: str,
        *,
        workflow_id: str | None = None,
        limit: int = 100,
        start_key: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """A page of the user's jobs, newest first, and the key of the next page (or None)."""
        where = ["user_id = ?"]
        bindings: list[Any] = [user_id]
        if workflow_id is not None:
            where.append("workflow_id = ?")
            bindings.append(workflow_id)
        if start_key is not None:
            created_at, job_id = _decode_key(start_key)
            where.append("(created_at, id) < (?, ?)")
            bindings += [created_at, job_id]
        rows = await self._read(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT ?",
            (*bindings, limit + 1),
        )
        jobs = [JobRecord.from_row(row) for row in rows[:limit]]
        more = len(rows) > limit
        return jobs, (_encode_key(jobs[-1]) if more and jobs else None)

    async def has_jobs_of(self, strategy: str) -> bool:
        """Whether any job ever ran under ``strategy`` (one scan at most, at start-up)."""
        rows = await self._read(
            "SELECT 1 FROM jobs WHERE execution_strategy = ? LIMIT 1", (strategy,)
        )
        return bool(rows)

    async def unfinished_jobs(self, user_id: str | None = None) -> list[JobRecord]:
        """Jobs in ``starting``/``running``: the user's, or everyone's when user_id is None."""
        # The partial index holds only unfinished jobs; left to itself, SQLite would walk the
        # user's whole history through jobs_by_user instead (21 ms at 100k jobs, vs 0.1 ms).
        sql = (
            f"SELECT {_JOB_COLUMNS} FROM jobs INDEXED BY jobs_unfinished"
            " WHERE status IN ('starting', 'running')"
        )
        bindings: tuple[Any, ...] = ()
        if user_id is not None:
            sql += " AND user_id = ?"
            bindings = (user_id,)
        rows = await self._read(sql + " ORDER BY created_at DESC, id DESC", bindings)
        return [JobRecord.from_row(row) for row in rows]

    async def get_workflow(self, user_id: str, workflow_id: str) -> dict[str, Any] | None:
        rows = await self._read(
            "SELECT id, name, graph, updated_at FROM workflows WHERE user_id = ? AND id = ?",
            (user_id, workflow_id),
        )
        return _workflow(rows[0]) if rows else None

    async def list_workflows(self, user_id: str) -> list[dict[str, Any]]:
        rows = await self._read(
            "SELECT id, name, graph, updated_at FROM workflows WHERE user_id = ? ORDER BY id",
            (user_id,),
        )
        return [_workflow(row) for row in rows]

    async def integrity_check(self) -> str:
        rows = await self._read("PRAGMA integrity_check", ())
        return str(rows[0][0])


def _workflow(row: Sequence[Any]) -> dict[str, Any]:
    return {"id": row[0], "name": row[1], "graph": loads(row[2]), "updated_at": iso(row[3])}


def _encode_key(job: JobRecord) -> str:
    raw = f"{job.created_at!r}:{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_key(key: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)).decode()
        created_at, job_id = raw.split(":", 1)
        return float(created_at), job_id
    except ValueError:
        raise ValueError("start_key is not a key this server handed out") from None


def add_user_cli(home: Path | str | None, name: str) -> int:
    """``nodejob users add NAME``: create a user and print its token as the last line."""
    from nodejob.config import Config

    config = Config.from_env(home=home)
    try:
        store = Store.open_sync(config.db_path)
        try:
            user, token = store.add_user_sync(name)
        finally:
            store.close()
    except StoreError as exc:
        print(f"nodejob: {exc}", file=sys.stderr)
        return 2
    print(f"created user {user.name} ({user.id}); token:")
    print(token)
    return 0
