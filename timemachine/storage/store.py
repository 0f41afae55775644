"""The state machines of the Raft groups, each in one SQLite file.

`VnodeStore` holds the jobs of one shard (`IJobStore`); `ClusterStore` holds the routes
and cluster settings of the meta group (`IClusterStore`). Both share `_SQLiteStore`: one
SQLAlchemy Core engine used only on one thread (buildbot's ``db/pool.py`` shape): the
store's own, or an `IOThread` a node shares among its stores. Public methods hop to
that thread; the ``_thd_*`` methods are plain synchronous SQLAlchemy and turn rows
into model objects before returning, so no `Result` ever crosses threads.

Durability comes from the write-ahead log, not from SQLite: each batch of committed
entries is one SQLite transaction that also stores ``applied_index``, and on start the
shard log replays every entry above it. That is why ``synchronous=NORMAL`` is enough
here: a power cut may lose the last few SQLite commits, never an acknowledged write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple
from urllib.parse import quote

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool
from twisted.internet import defer
from zope.interface import implementer

from timemachine.domain.commands import (
    Configure,
    DeleteJob,
    DeleteRoute,
    JobOutcome,
    JobVersion,
    OutcomeKind,
    PurgeJobs,
    PutJobs,
    PutRoute,
)
from timemachine.domain.errors import InvalidField, StorageError
from timemachine.domain.jobs import Job, JobStatus, status_after_delivery
from timemachine.domain.records import from_record
from timemachine.domain.routes import Route
from timemachine.interfaces import IClusterStore, IJobStore
from timemachine.storage.durable import fsync_path
from timemachine.storage.iothread import IOThread

# ---- schema ---------------------------------------------------------------------


def _meta_table(metadata: MetaData) -> Table:
    # Key/value rows: ``schema_version``, ``store`` (which kind of store made the file)
    # and ``applied_index``.
    return Table(
        "meta",
        metadata,
        Column("key", String, primary_key=True),
        Column("value", String, nullable=False),
    )


vnode_metadata = MetaData()

jobs_table = Table(
    "jobs",
    vnode_metadata,
    Column("collection", String, nullable=False),
    Column("id", String, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("trigger_ms", BigInteger, nullable=False),
    Column("due_ms", BigInteger, nullable=False),
    Column("meta", Text, nullable=False),
    Column("route", String, nullable=False),
    Column("status", String, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("fired_at_ms", BigInteger),
    PrimaryKeyConstraint("collection", "id"),
)
# The executor's scan (`VnodeStore.due`): equality on status, range and order on due_ms.
jobs_status_due_index = Index("ix_jobs_status_due", jobs_table.c.status, jobs_table.c.due_ms)

vnode_meta_table = _meta_table(vnode_metadata)

cluster_metadata = MetaData()

routes_table = Table(
    "routes",
    cluster_metadata,
    Column("id", String, primary_key=True),
    # Every field of the `Route` as JSON: routes are read whole, never queried by field.
    Column("spec", Text, nullable=False),
)

config_table = Table(
    "config",
    cluster_metadata,
    Column("id", Integer, primary_key=True),
    Column("shards", Integer, nullable=False),
    Column("replicas", Integer, nullable=False),
    Column("placement", Text, nullable=False),
    CheckConstraint("id = 1", name="config_single_row"),
)

cluster_meta_table = _meta_table(cluster_metadata)

# The order in which `_job_from_row` unpacks a row of `jobs`.
_JOB_COLUMNS = (
    jobs_table.c.collection,
    jobs_table.c.id,
    jobs_table.c.trigger_ms,
    jobs_table.c.meta,
    jobs_table.c.route,
    jobs_table.c.version,
    jobs_table.c.status,
    jobs_table.c.due_ms,
    jobs_table.c.attempts,
    jobs_table.c.last_error,
    jobs_table.c.fired_at_ms,
)

# A replace starts the job over: every column is rewritten, nothing of the old row stays.
_UPSERT_JOB = sqlite_insert(jobs_table)
_UPSERT_JOB = _UPSERT_JOB.on_conflict_do_update(
    index_elements=[jobs_table.c.collection, jobs_table.c.id],
    set_={
        c.name: _UPSERT_JOB.excluded[c.name]
        for c in jobs_table.c
        if c.name not in ("collection", "id")
    },
)


# The statements of every apply, compiled once from the schema above and run on the
# driver's connection inside SQLAlchemy's transaction. Executing a Core statement costs
# ~100 us of Python per call (cache-key build, events, result setup) against ~15 us for
# SQLite itself; applies are the write path of every request and every firing, so
# they skip that layer. Everything else goes through Core.
_NAMED_PARAMS = sqlite_dialect.dialect(paramstyle="named")


def _sql(statement) -> str:
    return str(statement.compile(dialect=_NAMED_PARAMS))


_UPSERT_JOB_SQL = _sql(_UPSERT_JOB)
_DELETE_JOB_SQL = _sql(
    delete(jobs_table)
    .where(jobs_table.c.collection == bindparam("collection"))
    .where(jobs_table.c.id == bindparam("id"))
)
# Retention removes a finished (fired or failed) job only at the version that
# finished: a replace that landed after the leader picked it is a new, scheduled
# version, and stays.
_PURGE_JOB_SQL = _sql(
    delete(jobs_table)
    .where(jobs_table.c.collection == bindparam("collection"))
    .where(jobs_table.c.id == bindparam("id"))
    .where(jobs_table.c.version == bindparam("version"))
    .where(jobs_table.c.status != bindparam("scheduled"))
)


def _outcome_sql(*columns: str) -> str:
    """UPDATE of ``columns`` (params ``new_<column>``) of the one scheduled version."""
    return _sql(
        update(jobs_table)
        .where(jobs_table.c.collection == bindparam("collection"))
        .where(jobs_table.c.id == bindparam("id"))
        .where(jobs_table.c.version == bindparam("version"))
        .where(jobs_table.c.status == bindparam("scheduled"))
        .values({name: bindparam(f"new_{name}") for name in columns})
        .returning(*_JOB_COLUMNS)
    )


_OUTCOME_SQL = {
    OutcomeKind.FIRED: _outcome_sql("status", "fired_at_ms", "attempts"),
    OutcomeKind.RETRY: _outcome_sql("status", "due_ms", "attempts", "last_error"),
    # at_ms (when it gave up) is not kept: a Job has no field for it, and writing it
    # into due_ms would give that column two meanings.
    OutcomeKind.FAILED: _outcome_sql("status", "attempts", "last_error"),
}


def _set_applied_sql(meta_table: Table) -> str:
    return _sql(
        update(meta_table)
        .where(meta_table.c.key == bindparam("key"))
        .values(value=bindparam("value"))
    )


def _driver_cursor(conn: Connection) -> sqlite3.Cursor:
    return conn.connection.driver_connection.cursor()


def _job_from_row(row: Sequence[Any]) -> Job:
    # _JOB_COLUMNS follows the field order of Job.
    collection, job_id, trigger_ms, meta, route, version, status, *rest = row
    return Job(collection, job_id, trigger_ms, meta, route, version, JobStatus(status), *rest)


def _status_value(status) -> str | None:
    # Status filters come from clients (``?status=...``): a bad one is their error.
    if status is None:
        return None
    try:
        return JobStatus(status).value
    except ValueError:
        raise InvalidField(
            "status", "must be one of " + ", ".join(s.value for s in JobStatus)
        ) from None


def due_query(before_ms: int, limit: int, from_ms: int = 0):
    """The statement behind `VnodeStore.due` (exposed so a test can EXPLAIN it)."""
    return (
        select(*_JOB_COLUMNS)
        .where(jobs_table.c.status == JobStatus.SCHEDULED.value)
        .where(jobs_table.c.due_ms >= from_ms)
        .where(jobs_table.c.due_ms < before_ms)
        .order_by(jobs_table.c.due_ms)
        .limit(limit)
    )


# ---- plumbing shared by both stores ------------------------------------------------


class _Applied(NamedTuple):
    """What a batch did, handed from the store's thread to the reactor."""

    applied_index: int
    results: list[Any]
    commands: list[Any]  # the commands actually applied (skipped ones left out)


class _Loaded(NamedTuple):
    """What open/restore read, handed from the store's thread to the reactor."""

    applied_index: int
    state: Any  # store-specific in-memory state (None for VnodeStore)


def _unlink_if_exists(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _SQLiteStore:
    """One SQLite file behind one thread; subclasses define the schema and commands.

    Attributes touched only on the store's thread are the engine and
    ``_thd_applied_index``; everything else belongs to the reactor. The reactor-side
    ``applied_index`` moves when an apply's Deferred fires, after the commit, while the
    thread keeps its own copy so that batches queued back to back skip correctly.
    """

    _metadata: MetaData
    _meta: Table
    _kind: str
    SCHEMA_VERSION = 1

    def __init__(self, path: str, reactor, io: IOThread | None = None):
        self.path = path
        self._reactor = reactor
        # The store's thread: a node shares one among its stores; alone, a store has
        # its own. Either way one thread, so SQLite always sees the same one.
        self._shared_io = io
        self._io: IOThread | None = None
        self._shutdown_trigger = None
        self._engine: Engine | None = None
        self._connection: Connection | None = None
        self._thd_applied_index = 0
        self.applied_index = 0

    # -- reactor side

    def open(self):
        """Create or open the file, check its schema version, load applied_index."""
        if self._io is not None:
            return defer.fail(StorageError(f"{self.path}: store already open"))
        if self._shared_io is not None:
            self._io = self._shared_io
        else:
            self._io = IOThread(self._reactor, f"{type(self).__name__}({self.path})")
            self._io.start()
        # A safety net like buildbot's: a store left open must not keep the process
        # alive after the reactor stops (its worker thread is not a daemon).
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self._release_io
        )
        d = self._run(self._thd_open)

        def failed(failure):
            self._release_io()
            return failure

        d.addCallbacks(self._loaded, failed)
        return d

    def close(self):
        """Close the database and stop the store's thread (a no-op when not open)."""
        if self._io is None:
            return defer.succeed(None)
        d = self._run(self._thd_close)
        d.addBoth(self._after_close)
        return d

    def apply(self, entries):
        """Apply ``[(index, command), ...]`` in one transaction; see the interfaces.

        ``applied_index`` (and any in-memory view) changes on the reactor when the
        returned Deferred fires, i.e. only ever to committed state.
        """
        d = self._run(self._thd_apply, list(entries))
        d.addCallback(self._applied)
        return d

    def snapshot(self, path):
        """Write a consistent copy of the database to ``path`` (atomically replaced)."""
        return self._run(self._thd_snapshot, path)

    def checkpoint(self):
        """Make every applied entry durable; fire with the applied_index now durable.

        Commits run with ``synchronous=NORMAL``, so the last ones may live only in the
        OS cache; a log must not be cut above what a power cut would leave. SQLite
        syncs its WAL before a checkpoint and the database file after it, and
        TRUNCATE also empties the -wal file, so the store takes no more disk than
        its data.
        """
        return self._run(self._thd_checkpoint)

    def disk_bytes(self):
        """Fire with the bytes the store's files take on disk (database, -wal, -shm)."""
        return self._run(self._thd_disk_bytes)

    def restore(self, path):
        """Replace the database with the copy at ``path``, reopen, reload the state.

        A copy made by another kind of store, or with an unknown schema version, is
        refused with `StorageError` before anything is changed.
        """
        d = self._run(self._thd_restore, path)
        d.addCallback(self._loaded)
        return d

    def _run(self, f: Callable, *args):
        if self._io is None:
            return defer.fail(StorageError(f"{self.path}: store is not open"))
        return self._io.call(self._thd_call, f, *args)

    def _release_io(self):
        if self._shutdown_trigger is not None:
            # Removing a trigger while the shutdown phase runs it is refused; ignore.
            with contextlib.suppress(ValueError, KeyError):
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        io, self._io = self._io, None
        if io is not None and io is not self._shared_io:
            # Joins a thread that has nothing left to do: its queue ran before us.
            io.stop()

    def _after_close(self, result):
        self._release_io()
        return result

    def _loaded(self, loaded: _Loaded) -> None:
        self.applied_index = loaded.applied_index
        self._install_state(loaded.state)

    def _applied(self, applied: _Applied) -> list[Any]:
        self.applied_index = applied.applied_index
        self._commands_applied(applied.commands, applied.results)
        return applied.results

    # Hooks run on the reactor, after a commit (subclasses keep their in-memory views).

    def _install_state(self, state) -> None:
        pass

    def _commands_applied(self, commands, results) -> None:
        pass

    # -- store thread side

    def _thd_call(self, f: Callable, *args):
        # Database and disk failures become StorageError; programming errors (ValueError
        # for an unknown command) pass through unchanged.
        try:
            return f(*args)
        except (DBAPIError, sqlite3.Error, OSError) as e:
            raise StorageError(f"{self.path}: {e}") from e

    def _thd_make_engine(self) -> Engine:
        # StaticPool: the one thread uses one connection for the life of the store, so
        # the pragmas are set once and no call pays for a reconnect.
        engine = create_engine(URL.create("sqlite", database=self.path), poolclass=StaticPool)

        @event.listens_for(engine, "connect")
        def on_connect(dbapi_connection, _record):
            # Let SQLAlchemy, not the driver, delimit transactions (the pysqlite recipe
            # in SQLAlchemy's SQLite docs), so reads are transactions too.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL: see the module docstring; the WAL of the shard log is the source
            # of durability and the store replays from it above applied_index.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def on_begin(connection):
            connection.exec_driver_sql("BEGIN")

        return engine

    def _thd_engine(self) -> Engine:
        if self._engine is None:
            # Only after a restore whose reopen failed: the file is not usable.
            raise StorageError(f"{self.path}: database is closed")
        return self._engine

    def _thd_open(self) -> _Loaded:
        engine = self._thd_make_engine()
        try:
            with engine.begin() as conn:
                tables = set(
                    conn.execute(
                        text("SELECT name FROM sqlite_master WHERE type = 'table'")
                    ).scalars()
                )
                if not tables:
                    self._metadata.create_all(conn)
                    conn.execute(
                        insert(self._meta),
                        [
                            {"key": "schema_version", "value": str(self.SCHEMA_VERSION)},
                            {"key": "store", "value": self._kind},
                            {"key": "applied_index", "value": "0"},
                        ],
                    )
                elif "meta" not in tables:
                    raise StorageError(f"{self.path}: not a timeMachine {self._kind} store")
                meta = dict(conn.execute(select(self._meta.c.key, self._meta.c.value)).all())
                self._check_meta(meta, self.path)
                loaded = _Loaded(int(meta["applied_index"]), self._thd_load_state(conn))
        except BaseException:
            engine.dispose()
            raise
        self._engine = engine
        self._thd_applied_index = loaded.applied_index
        return loaded

    def _check_meta(self, meta: dict, where: str) -> None:
        if meta.get("store") != self._kind:
            raise StorageError(
                f"{where}: holds a {meta.get('store')!r} store, not a {self._kind!r} store"
            )
        if meta.get("schema_version") != str(self.SCHEMA_VERSION):
            raise StorageError(
                f"{where}: unknown schema version {meta.get('schema_version')!r} "
                f"(this code knows {self.SCHEMA_VERSION})"
            )

    def _thd_close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    @contextlib.contextmanager
    def _thd_transaction(self):
        """The store's one connection, in a transaction committed on exit.

        The connection is kept for the life of the store: checking one out of the
        engine for every call costs more than many of the statements it runs.
        """
        if self._connection is None:
            self._connection = self._thd_engine().connect()
        with self._connection.begin():
            yield self._connection

    def _thd_apply(self, entries) -> _Applied:
        results: list[Any] = []
        commands: list[Any] = []
        last = self._thd_applied_index
        with self._thd_transaction() as conn:
            for index, command in entries:
                if index <= last:
                    # Already applied (a replay after a crash): applying it again would
                    # e.g. resurrect a job deleted by a later entry.
                    results.append(None)
                    continue
                results.append(self._thd_apply_command(conn, index, command))
                commands.append(command)
                last = index
            if last != self._thd_applied_index:
                _driver_cursor(conn).execute(
                    self._set_applied_sql, {"key": "applied_index", "value": str(last)}
                )
        # Only after the commit: a batch that raised leaves the thread's index as it was.
        self._thd_applied_index = last
        return _Applied(last, results, commands)

    def _thd_apply_command(self, conn: Connection, index: int, command) -> Any:
        raise NotImplementedError

    def _thd_load_state(self, conn: Connection) -> Any:
        return None

    def _thd_checkpoint(self) -> int:
        raw = self._thd_engine().raw_connection()
        try:
            cursor = raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            busy, _, _ = cursor.fetchone()
        finally:
            raw.close()
        if busy:
            raise StorageError(f"{self.path}: checkpoint could not complete (database busy)")
        return self._thd_applied_index

    def _thd_disk_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(self.path + suffix)
        return total

    def _thd_snapshot(self, path: str) -> None:
        # VACUUM INTO reads in one transaction, so the copy is consistent, and leaves a
        # compact, self-contained file (no -wal beside it). It neither overwrites nor
        # fsyncs, hence the temporary name, the fsync and the rename.
        tmp = f"{path}.tmp"
        _unlink_if_exists(tmp)
        raw = self._thd_engine().raw_connection()
        try:
            raw.driver_connection.execute("VACUUM INTO ?", (tmp,))
        finally:
            raw.close()
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))

    def _thd_restore(self, path: str) -> _Loaded:
        tmp = f"{self.path}.restore"
        _unlink_if_exists(tmp)
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        try:
            self._check_snapshot(tmp, path)
        except BaseException:
            _unlink_if_exists(tmp)
            raise
        self._thd_close()
        # Closing the last connection checkpointed our -wal; drop what may remain
        # *before* the rename, so the new file can never meet a stale log.
        for suffix in ("-wal", "-shm"):
            _unlink_if_exists(self.path + suffix)
        os.replace(tmp, self.path)
        fsync_path(os.path.dirname(os.path.abspath(self.path)))
        return self._thd_open()

    def _check_snapshot(self, copy: str, origin: str) -> None:
        uri = f"file:{quote(copy)}?mode=rw"
        try:
            con = sqlite3.connect(uri, uri=True)
            try:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
            finally:
                con.close()
        except sqlite3.Error as e:
            raise StorageError(f"{origin}: not a usable snapshot: {e}") from e
        self._check_meta(meta, origin)


# ---- the shard store -----------------------------------------------------------------


@implementer(IJobStore)
class VnodeStore(_SQLiteStore):
    """The jobs of one shard: the state machine of the shard's Raft group.

    ``VnodeStore(path, reactor)`` does no I/O; `open` creates or opens the file.
    ``applied_index`` is updated on the reactor when an apply's Deferred fires.
    """

    _metadata = vnode_metadata
    _meta = vnode_meta_table
    _set_applied_sql = _set_applied_sql(vnode_meta_table)
    _kind = "vnode"

    def get(self, collection, job_id):
        """Fire with the `Job` stored under ``(collection, job_id)``, or None."""
        return self._run(self._thd_get, collection, job_id)

    def due(self, before_ms, limit, from_ms=0):
        """Fire with up to ``limit`` scheduled jobs with from_ms <= due_ms < before_ms,
        earliest first."""
        return self._run(self._thd_due, before_ms, limit, from_ms)

    def list_jobs(self, collection, status=None, limit=100, cursor=None):
        """Fire with ``(jobs, next_cursor)``: jobs of ``collection`` ordered by id.

        ``status`` (a `JobStatus` or its value) filters, None for all; ``cursor`` is
        the last id of the previous page; ``next_cursor`` is None on the last page.
        """
        try:
            status = _status_value(status)
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
                raise InvalidField("limit", "must be a positive integer")
        except InvalidField as e:
            return defer.fail(e)
        return self._run(self._thd_list_jobs, collection, status, limit, cursor)

    def expired(self, fired_before_ms, failed_before_ms, limit):
        """Fire with up to ``limit`` `JobVersion` of jobs whose retention has ended.

        Fired jobs count from ``fired_at_ms``; failed jobs from their last due time
        (when the attempt that gave up started: the store keeps no give-up time).
        Either bound may be None to skip that kind.
        """
        return self._run(self._thd_expired, fired_before_ms, failed_before_ms, limit)

    def count(self, status=None):
        """Fire with the number of jobs, or of jobs in ``status`` when not None."""
        try:
            status = _status_value(status)
        except InvalidField as e:
            return defer.fail(e)
        return self._run(self._thd_count, status)

    # -- store thread side

    def _thd_apply_command(self, conn, index, command):
        if isinstance(command, PutJobs):
            return self._thd_put_jobs(conn, index, command)
        if isinstance(command, DeleteJob):
            cursor = _driver_cursor(conn)
            cursor.execute(_DELETE_JOB_SQL, {"collection": command.collection, "id": command.id})
            return cursor.rowcount > 0
        if isinstance(command, JobOutcome):
            return self._thd_outcome(conn, command)
        if isinstance(command, PurgeJobs):
            cursor = _driver_cursor(conn)
            cursor.executemany(
                _PURGE_JOB_SQL,
                [
                    {
                        "collection": job.collection,
                        "id": job.id,
                        "version": job.version,
                        "scheduled": JobStatus.SCHEDULED.value,
                    }
                    for job in command.jobs
                ],
            )
            return cursor.rowcount
        raise ValueError(f"a shard store cannot apply {command!r}")

    def _thd_put_jobs(self, conn, index, command: PutJobs) -> list[Job]:
        jobs = [
            Job(
                collection=spec.collection,
                id=spec.id,
                trigger_ms=spec.trigger_ms,
                meta=spec.meta,
                route=spec.route,
                version=index,
                status=JobStatus.SCHEDULED,
                due_ms=spec.trigger_ms,
            )
            for spec in command.jobs
        ]
        # One row per key, the later spec winning, as if they were applied in order;
        # the result keeps one Job per spec so callers can pair them up.
        rows = {
            job.key: {
                "collection": job.collection,
                "id": job.id,
                "version": index,
                "trigger_ms": job.trigger_ms,
                "due_ms": job.due_ms,
                "meta": job.meta,
                "route": job.route,
                "status": JobStatus.SCHEDULED.value,
                "attempts": 0,
                "last_error": None,
                "fired_at_ms": None,
            }
            for job in jobs
        }
        _driver_cursor(conn).executemany(_UPSERT_JOB_SQL, list(rows.values()))
        return jobs

    def _thd_outcome(self, conn, outcome: JobOutcome) -> Job | None:
        values = {
            "new_status": status_after_delivery(outcome.kind.event).value,
            "new_attempts": outcome.attempts,
        }
        if outcome.kind == OutcomeKind.FIRED:
            values["new_fired_at_ms"] = outcome.at_ms
        elif outcome.kind == OutcomeKind.RETRY:
            values.update(new_due_ms=outcome.at_ms, new_last_error=outcome.last_error)
        else:
            values["new_last_error"] = outcome.last_error
        # Only the version that was fired, and only while still scheduled: an outcome
        # of a replaced job, or a second outcome of a finished one, changes nothing.
        values.update(
            collection=outcome.collection,
            id=outcome.id,
            version=outcome.version,
            scheduled=JobStatus.SCHEDULED.value,
        )
        row = _driver_cursor(conn).execute(_OUTCOME_SQL[outcome.kind], values).fetchone()
        return None if row is None else _job_from_row(row)

    def _thd_get(self, collection, job_id):
        with self._thd_transaction() as conn:
            row = conn.execute(
                select(*_JOB_COLUMNS)
                .where(jobs_table.c.collection == collection)
                .where(jobs_table.c.id == job_id)
            ).first()
        return None if row is None else _job_from_row(row)

    def _thd_due(self, before_ms, limit, from_ms):
        with self._thd_transaction() as conn:
            query = due_query(before_ms, limit, from_ms)
            return [_job_from_row(row) for row in conn.execute(query)]

    def _thd_list_jobs(self, collection, status, limit, cursor):
        query = select(*_JOB_COLUMNS).where(jobs_table.c.collection == collection)
        if status is not None:
            query = query.where(jobs_table.c.status == status)
        if cursor is not None:
            query = query.where(jobs_table.c.id > cursor)
        # One row more than asked tells whether another page exists.
        query = query.order_by(jobs_table.c.id).limit(limit + 1)
        with self._thd_transaction() as conn:
            jobs = [_job_from_row(row) for row in conn.execute(query)]
        if len(jobs) > limit:
            jobs = jobs[:limit]
            return jobs, jobs[-1].id
        return jobs, None

    def _thd_expired(self, fired_before_ms, failed_before_ms, limit):
        found: list[JobVersion] = []
        columns = (jobs_table.c.collection, jobs_table.c.id, jobs_table.c.version)
        with self._thd_transaction() as conn:
            if fired_before_ms is not None:
                # A job fires at or after it is due, so the (status, due_ms) index
                # narrows the scan to candidates; fired_at_ms decides.
                query = (
                    select(*columns)
                    .where(jobs_table.c.status == JobStatus.FIRED.value)
                    .where(jobs_table.c.due_ms <= fired_before_ms)
                    .where(jobs_table.c.fired_at_ms <= fired_before_ms)
                    .order_by(jobs_table.c.due_ms)
                    .limit(limit)
                )
                found.extend(JobVersion(*row) for row in conn.execute(query))
            if failed_before_ms is not None and len(found) < limit:
                query = (
                    select(*columns)
                    .where(jobs_table.c.status == JobStatus.FAILED.value)
                    .where(jobs_table.c.due_ms <= failed_before_ms)
                    .order_by(jobs_table.c.due_ms)
                    .limit(limit - len(found))
                )
                found.extend(JobVersion(*row) for row in conn.execute(query))
        return found

    def _thd_count(self, status):
        query = select(func.count()).select_from(jobs_table)
        if status is not None:
            query = query.where(jobs_table.c.status == status)
        with self._thd_transaction() as conn:
            return conn.execute(query).scalar_one()


# ---- the meta group's store ------------------------------------------------------------


class _ClusterState(NamedTuple):
    routes: dict[str, Route]
    config: Configure | None


def _config_from_row(row) -> Configure:
    shards, replicas, placement = row
    return from_record(
        Configure, shards, replicas, tuple(tuple(p) for p in json.loads(placement))
    )


@implementer(IClusterStore)
class ClusterStore(_SQLiteStore):
    """Routes and cluster settings: the state machine of the meta group (group 0).

    ``ClusterStore(path, reactor)`` does no I/O. After `open`, routes and ``config``
    are kept in memory and changed only on the reactor once an apply has committed, so
    `route` and `routes` are synchronous and never show uncommitted state.
    """

    _metadata = cluster_metadata
    _meta = cluster_meta_table
    _set_applied_sql = _set_applied_sql(cluster_meta_table)
    _kind = "cluster"

    def __init__(self, path, reactor, io: IOThread | None = None):
        super().__init__(path, reactor, io)
        self._routes: dict[str, Route] = {}
        self.config: Configure | None = None

    def route(self, route_id):
        """The `Route` with this id, or None (from memory, no I/O)."""
        return self._routes.get(route_id)

    def routes(self):
        """All routes, ordered by id (from memory, no I/O)."""
        return [self._routes[route_id] for route_id in sorted(self._routes)]

    # -- reactor side

    def _install_state(self, state: _ClusterState) -> None:
        self._routes = state.routes
        self.config = state.config

    def _commands_applied(self, commands, results) -> None:
        for command in commands:
            if isinstance(command, PutRoute):
                self._routes[command.route.id] = command.route
            elif isinstance(command, DeleteRoute):
                self._routes.pop(command.id, None)
            elif isinstance(command, Configure):
                self.config = command

    # -- store thread side

    def _thd_load_state(self, conn) -> _ClusterState:
        routes = {
            route_id: from_record(Route, **json.loads(spec))
            for route_id, spec in conn.execute(select(routes_table.c.id, routes_table.c.spec))
        }
        row = conn.execute(
            select(config_table.c.shards, config_table.c.replicas, config_table.c.placement)
        ).first()
        return _ClusterState(routes, None if row is None else _config_from_row(row))

    def _thd_apply_command(self, conn, index, command):
        if isinstance(command, PutRoute):
            route = command.route
            spec = json.dumps(dataclasses.asdict(route), sort_keys=True)
            upsert = sqlite_insert(routes_table).values(id=route.id, spec=spec)
            conn.execute(upsert.on_conflict_do_update(index_elements=["id"], set_={"spec": spec}))
            return route
        if isinstance(command, DeleteRoute):
            result = conn.execute(delete(routes_table).where(routes_table.c.id == command.id))
            return result.rowcount > 0
        if isinstance(command, Configure):
            values = {
                "shards": command.shards,
                "replicas": command.replicas,
                "placement": json.dumps([list(p) for p in command.placement]),
            }
            upsert = sqlite_insert(config_table).values(id=1, **values)
            conn.execute(upsert.on_conflict_do_update(index_elements=["id"], set_=values))
            return command
        raise ValueError(f"the cluster store cannot apply {command!r}")
