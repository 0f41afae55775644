"""SQLite plumbing: one file, one SQLAlchemy engine, used from one thread only.

The shape of buildbot's ``db/pool.py``: the reactor hands work to the file's thread
with `SQLiteFile.run` and gets a Deferred back; the ``thd_*`` methods run on that
thread and are plain synchronous SQLAlchemy. Database and disk failures become
`StorageError`. The thread is the file's own, or an `IOThread` a node shares among its
stores (either way one thread, so SQLite always sees the same one).

What the file holds (schema, commands, applied_index) is the business of the stores
in `timemachine.storage.store`; this module knows only how to keep a SQLite file open,
consistent and crash-safe.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable

from sqlalchemy import create_engine, event
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool
from twisted.internet import defer

from timemachine.domain.errors import StorageError
from timemachine.storage.durable import fsync_path
from timemachine.storage.iothread import IOThread

# Statements on the write path are compiled once and run on the driver's connection
# inside SQLAlchemy's transaction: executing a Core statement costs ~100 us of Python
# per call (cache-key build, events, result setup) against ~15 us for SQLite itself.
_NAMED_PARAMS = sqlite_dialect.dialect(paramstyle="named")
_POSITIONAL_PARAMS = sqlite_dialect.dialect(paramstyle="qmark")


def compiled(statement) -> str:
    """The SQL text of a Core statement, with ``:name`` parameters."""
    return str(statement.compile(dialect=_NAMED_PARAMS))


def compiled_positional(statement) -> tuple[str, tuple[str, ...]]:
    """The SQL text of a Core statement with ``?`` parameters, and their names in
    order. For statements run for many rows at once: the driver binds a tuple in
    about two thirds of the CPU a dict of the same values takes."""
    statement = statement.compile(dialect=_POSITIONAL_PARAMS)
    return str(statement), tuple(statement.positiontup)


def driver_cursor(conn: Connection) -> sqlite3.Cursor:
    """A cursor of the driver's connection under ``conn`` (inside its transaction)."""
    return conn.connection.driver_connection.cursor()


def unlink_if_exists(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class SQLiteFile:
    """One SQLite file in WAL journal mode, behind one thread.

    ``SQLiteFile(path, reactor, io)`` does no I/O. `start` takes the thread; the
    ``thd_*`` methods, run through `run`, open, use and close the database on it.
    """

    def __init__(self, path: str, reactor, io: IOThread | None = None):
        self.path = path
        self._reactor = reactor
        self._shared_io = io
        self._io: IOThread | None = None
        self._shutdown_trigger = None
        self._engine: Engine | None = None
        self._connection: Connection | None = None

    # -- reactor side

    @property
    def started(self) -> bool:
        return self._io is not None

    def start(self) -> None:
        """Take the file's thread (the shared one, or a new one of its own)."""
        if self._shared_io is not None:
            self._io = self._shared_io
        else:
            self._io = IOThread(self._reactor, f"sqlite({self.path})")
            self._io.start()
        # A safety net like buildbot's: a file left open must not keep the process
        # alive after the reactor stops (its worker thread is not a daemon).
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self.stop
        )

    def stop(self) -> None:
        """Let the thread go (joined when it is the file's own: its queue ran first)."""
        if self._shutdown_trigger is not None:
            # Removing a trigger while the shutdown phase runs it is refused; ignore.
            with contextlib.suppress(ValueError, KeyError):
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        io, self._io = self._io, None
        if io is not None and io is not self._shared_io:
            io.stop()

    def run(self, f: Callable, *args):
        """Fire with ``f(*args)`` run on the file's thread."""
        if self._io is None:
            return defer.fail(StorageError(f"{self.path}: store is not open"))
        return self._io.call(self._thd_call, f, *args)

    def _thd_call(self, f: Callable, *args):
        # Programming errors (ValueError for an unknown command) pass through unchanged.
        try:
            return f(*args)
        except (DBAPIError, sqlite3.Error, OSError) as e:
            raise StorageError(f"{self.path}: {e}") from e

    # -- the file's thread

    def thd_connect(self) -> None:
        """Create the engine (the file is created if missing)."""
        # StaticPool: the one thread uses one connection for the life of the file, so
        # the pragmas are set once and no call pays for a reconnect.
        engine = create_engine(URL.create("sqlite", database=self.path), poolclass=StaticPool)

        @event.listens_for(engine, "connect")
        def on_connect(dbapi_connection, _record):
            # Let SQLAlchemy, not the driver, delimit transactions (the pysqlite recipe
            # in SQLAlchemy's SQLite docs), so reads are transactions too.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL: the shard log's WAL is the source of durability and a store
            # replays from it above its applied_index (see timemachine.storage.store).
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def on_begin(connection):
            connection.exec_driver_sql("BEGIN")

        self._engine = engine

    def thd_disconnect(self) -> None:
        """Close the connection and dispose of the engine (a no-op when closed)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _thd_engine(self) -> Engine:
        if self._engine is None:
            # Only after a restore whose reopen failed: the file is not usable.
            raise StorageError(f"{self.path}: database is closed")
        return self._engine

    @contextlib.contextmanager
    def thd_transaction(self):
        """The file's one connection, in a transaction committed on exit.

        The connection is kept for the life of the file: checking one out of the
        engine for every call costs more than many of the statements it runs.
        """
        if self._connection is None:
            self._connection = self._thd_engine().connect()
        with self._connection.begin():
            yield self._connection

    def _thd_driver_execute(self, sql: str, *params):
        raw = self._thd_engine().raw_connection()
        try:
            return raw.driver_connection.execute(sql, *params).fetchall()
        finally:
            raw.close()

    def thd_checkpoint(self) -> None:
        """Make every commit durable and empty the -wal file.

        Commits run with ``synchronous=NORMAL``, so the last ones may live only in the
        OS cache. SQLite syncs its WAL before a checkpoint and the database file after
        it, and TRUNCATE also empties the -wal file, so the file takes no more disk
        than its data.
        """
        [(busy, _, _)] = self._thd_driver_execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if busy:
            raise StorageError(f"{self.path}: checkpoint could not complete (database busy)")

    def thd_disk_bytes(self) -> int:
        """The bytes the file takes on disk (database, -wal, -shm)."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(self.path + suffix)
        return total

    def thd_copy_to(self, path: str) -> None:
        """Write a consistent, compact copy of the database to ``path``, atomically."""
        # VACUUM INTO reads in one transaction, so the copy is consistent, and leaves a
        # self-contained file (no -wal beside it). It neither overwrites nor fsyncs,
        # hence the temporary name, the fsync and the rename.
        tmp = f"{path}.tmp"
        unlink_if_exists(tmp)
        self._thd_driver_execute("VACUUM INTO ?", (tmp,))
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(os.path.dirname(os.path.abspath(path)))

    def thd_replace_with(self, path: str, check: Callable[[str], None]) -> None:
        """Replace the database with a copy of the file at ``path``; leaves it closed.

        ``check(copy)`` runs on the copy first and raises to refuse it, before
        anything of the current database is changed.
        """
        tmp = f"{self.path}.restore"
        unlink_if_exists(tmp)
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        try:
            check(tmp)
        except BaseException:
            unlink_if_exists(tmp)
            raise
        self.thd_disconnect()
        # Closing the last connection checkpointed our -wal; drop what may remain
        # *before* the rename, so the new file can never meet a stale log.
        for suffix in ("-wal", "-shm"):
            unlink_if_exists(self.path + suffix)
        os.replace(tmp, self.path)
        fsync_path(os.path.dirname(os.path.abspath(self.path)))
