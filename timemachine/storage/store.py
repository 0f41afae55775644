"""The state machines of the logs: the queries and commands of each kind of store.

`VnodeStore` holds the jobs of one shard (`IJobStore`); `ClusterStore` holds the routes
and cluster settings of the meta group (`IClusterStore`). Both are a `_SQLiteStore`: a
state machine (applied_index, batches of commands) in one `SQLiteFile`
(`timemachine.storage.sqlite`: the engine, its thread, crash-safe copies), with the
tables of `timemachine.storage.schema`. Public methods hop to the file's thread; the
``_thd_*`` methods are plain synchronous SQLAlchemy and turn rows into domain objects
before returning, so no `Result` ever crosses threads.

Durability comes from the write-ahead log, not from SQLite: each batch of committed
entries is one SQLite transaction that also stores ``applied_index``, and on start the
shard log replays every entry above it. That is why ``synchronous=NORMAL`` is enough
here: a power cut may lose the last few SQLite commits, never an acknowledged write.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import sqlite3
from typing import Any, NamedTuple
from urllib.parse import quote

from google.protobuf.message import DecodeError
from sqlalchemy import MetaData, Table, bindparam, delete, func, insert, select, text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from twisted.internet import defer
from zope.interface import implementer

from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain.codec import command_from_pb, command_to_pb
from timemachine.domain.commands import (
    Configure,
    DeleteJob,
    DeleteRoute,
    JobOutcome,
    JobVersion,
    MemberLeaving,
    OutcomeKind,
    PurgeJobs,
    PutJobs,
    PutMember,
    PutRoute,
    RemoveMember,
)
from timemachine.domain.errors import InvalidField, StorageError
from timemachine.domain.jobs import (
    JOB_FIELDS,
    Job,
    JobStatus,
    job_from_row,
    job_row,
    status_after_delivery,
)
from timemachine.domain.records import from_record
from timemachine.domain.routes import Route
from timemachine.interfaces import IClusterStore, IJobStore
from timemachine.storage.durable import write_atomically
from timemachine.storage.iothread import IOThread
from timemachine.storage.schema import (
    JOB_COLUMNS,
    SCHEMA_VERSION,
    cluster_meta_table,
    cluster_metadata,
    config_table,
    jobs_table,
    leaving_table,
    member_incarnations_table,
    members_table,
    routes_table,
    vnode_meta_table,
    vnode_metadata,
)
from timemachine.storage.sqlite import (
    SQLiteFile,
    compiled,
    compiled_positional,
    driver_cursor,
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


# The statements of every apply, compiled once from the schema (see `compiled`):
# applies are the write path of every request and every firing. Everything else goes
# through Core.
_UPSERT_JOB_SQL, _UPSERT_JOB_PARAMS = compiled_positional(_UPSERT_JOB)
# A job's row (`job_row`) as the upsert binds it, in its parameters' order.
_UPSERT_JOB_VALUES = operator.itemgetter(*(JOB_FIELDS.index(p) for p in _UPSERT_JOB_PARAMS))
_DELETE_JOB_SQL = compiled(
    delete(jobs_table)
    .where(jobs_table.c.collection == bindparam("collection"))
    .where(jobs_table.c.id == bindparam("id"))
)
# Retention removes a finished (fired or failed) job only at the version that
# finished: a replace that landed after the leader picked it is a new, scheduled
# version, and stays.
_PURGE_JOB_SQL = compiled(
    delete(jobs_table)
    .where(jobs_table.c.collection == bindparam("collection"))
    .where(jobs_table.c.id == bindparam("id"))
    .where(jobs_table.c.version == bindparam("version"))
    .where(jobs_table.c.status != bindparam("scheduled"))
)


def _outcome_sql(*columns: str) -> str:
    """UPDATE of ``columns`` (params ``new_<column>``) of the one scheduled version."""
    return compiled(
        update(jobs_table)
        .where(jobs_table.c.collection == bindparam("collection"))
        .where(jobs_table.c.id == bindparam("id"))
        .where(jobs_table.c.version == bindparam("version"))
        .where(jobs_table.c.status == bindparam("scheduled"))
        .values({name: bindparam(f"new_{name}") for name in columns})
        .returning(*JOB_COLUMNS)
    )


_OUTCOME_SQL = {
    OutcomeKind.FIRED: _outcome_sql("status", "fired_at_ms", "attempts"),
    OutcomeKind.RETRY: _outcome_sql("status", "due_ms", "attempts", "last_error"),
    # at_ms (when it gave up) is not kept: a Job has no field for it, and writing it
    # into due_ms would give that column two meanings.
    OutcomeKind.FAILED: _outcome_sql("status", "attempts", "last_error"),
}


def _set_applied_sql(meta_table: Table) -> str:
    return compiled(
        update(meta_table)
        .where(meta_table.c.key == bindparam("key"))
        .values(value=bindparam("value"))
    )


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
        select(*JOB_COLUMNS)
        .where(jobs_table.c.status == JobStatus.SCHEDULED.value)
        .where(jobs_table.c.due_ms >= from_ms)
        .where(jobs_table.c.due_ms < before_ms)
        .order_by(jobs_table.c.due_ms)
        .limit(limit)
    )


# ---- what both stores share: a state machine in a SQLite file --------------------


class _Applied(NamedTuple):
    """What a batch did, handed from the store's thread to the reactor."""

    applied_index: int
    results: list[Any]
    commands: list[Any]  # (command, result) of those applied (skipped ones left out)


class _Loaded(NamedTuple):
    """What open/restore read, handed from the store's thread to the reactor."""

    applied_index: int
    state: Any  # store-specific in-memory state (None for VnodeStore)


class _SQLiteStore:
    """A state machine in one `SQLiteFile`; subclasses define the schema and commands.

    Attributes touched only on the store's thread are ``_thd_applied_index`` and the
    file's connection; everything else belongs to the reactor. The reactor-side
    ``applied_index`` moves when an apply's Deferred fires, after the commit, while the
    thread keeps its own copy so that batches queued back to back skip correctly.
    """

    _metadata: MetaData
    _meta: Table
    _kind: str
    SCHEMA_VERSION = SCHEMA_VERSION

    def __init__(self, path: str, reactor, io: IOThread | None = None):
        self.path = path
        self._db = SQLiteFile(path, reactor, io)
        self._thd_applied_index = 0
        self.applied_index = 0

    # -- reactor side

    def open(self):
        """Create or open the file, check its schema version, load applied_index."""
        if self._db.started:
            return defer.fail(StorageError(f"{self.path}: store already open"))
        self._db.start()
        d = self._db.run(self._thd_open)

        def failed(failure):
            self._db.stop()
            return failure

        d.addCallbacks(self._loaded, failed)
        return d

    def close(self):
        """Close the database and stop the store's thread (a no-op when not open)."""
        if not self._db.started:
            return defer.succeed(None)
        d = self._db.run(self._db.thd_disconnect)
        d.addBoth(self._after_close)
        return d

    def apply(self, entries):
        """Apply ``[(index, command), ...]`` in one transaction; see the interfaces.

        ``applied_index`` (and any in-memory view) changes on the reactor when the
        returned Deferred fires, i.e. only ever to committed state.
        """
        d = self._db.run(self._thd_apply, list(entries))
        d.addCallback(self._applied)
        return d

    def snapshot(self, path):
        """Write a consistent copy of the database to ``path`` (atomically replaced);
        fire with the applied_index the copy holds."""
        return self._db.run(self._thd_snapshot, path)

    def checkpoint(self):
        """Make every applied entry durable; fire with the applied_index now durable.

        A log must not be cut above what a power cut would leave of the store, and
        commits run with ``synchronous=NORMAL`` (see `SQLiteFile.thd_checkpoint`).
        """
        return self._db.run(self._thd_checkpoint)

    def disk_bytes(self):
        """Fire with the bytes the store's files take on disk (database, -wal, -shm)."""
        return self._db.run(self._db.thd_disk_bytes)

    def restore(self, path):
        """Replace the database with the copy at ``path``, reopen, reload the state.

        A copy made by another kind of store, or with an unknown schema version, is
        refused with `StorageError` before anything is changed.
        """
        d = self._db.run(self._thd_restore, path)
        d.addCallback(self._loaded)
        return d

    def _after_close(self, result):
        self._db.stop()
        return result

    def _loaded(self, loaded: _Loaded) -> None:
        self.applied_index = loaded.applied_index
        self._install_state(loaded.state)

    def _applied(self, applied: _Applied) -> list[Any]:
        self.applied_index = applied.applied_index
        self._commands_applied(applied.commands)
        return applied.results

    # Hooks run on the reactor, after a commit (subclasses keep their in-memory views).

    def _install_state(self, state) -> None:
        pass

    def _commands_applied(self, commands) -> None:
        """``commands``: ``(command, result)`` of each command the batch applied."""

    # -- store thread side

    def _thd_open(self) -> _Loaded:
        self._db.thd_connect()
        try:
            with self._db.thd_transaction() as conn:
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
                # Tables added since the file was made (the cluster's members): new
                # tables only, which leaves every older row as it was.
                self._metadata.create_all(conn, checkfirst=True)
                loaded = _Loaded(int(meta["applied_index"]), self._thd_load_state(conn))
        except BaseException:
            self._db.thd_disconnect()
            raise
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

    def _thd_apply(self, entries) -> _Applied:
        results: list[Any] = []
        commands: list[Any] = []
        last = self._thd_applied_index
        with self._db.thd_transaction() as conn:
            for index, command in entries:
                if index <= last:
                    # Already applied (a replay after a crash): applying it again would
                    # e.g. resurrect a job deleted by a later entry.
                    results.append(None)
                    continue
                if command is None:
                    # A Raft entry that is not a command (a leader's no-op, a membership
                    # change): it only moves applied_index.
                    results.append(None)
                else:
                    results.append(self._thd_apply_command(conn, index, command))
                    commands.append((command, results[-1]))
                last = index
            if last != self._thd_applied_index:
                driver_cursor(conn).execute(
                    self._set_applied_sql, {"key": "applied_index", "value": str(last)}
                )
        # Only after the commit: a batch that raised leaves the thread's index as it was.
        self._thd_applied_index = last
        return _Applied(last, results, commands)

    def _thd_apply_command(self, conn: Connection, index: int, command) -> Any:
        raise NotImplementedError

    def _thd_load_state(self, conn: Connection) -> Any:
        return None

    def _thd_snapshot(self, path: str) -> int:
        self._db.thd_copy_to(path)
        return self._thd_applied_index

    def _thd_checkpoint(self) -> int:
        self._db.thd_checkpoint()
        return self._thd_applied_index

    def _thd_restore(self, path: str) -> _Loaded:
        self._db.thd_replace_with(path, lambda copy: self._check_snapshot(copy, path))
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


#: How every SQLite database file begins.
SQLITE_HEADER = b"SQLite format 3\x00"


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
        return self._db.run(self._thd_get, collection, job_id)

    def due(self, before_ms, limit, from_ms=0):
        """Fire with up to ``limit`` scheduled jobs with from_ms <= due_ms < before_ms,
        earliest first, as rows (`timemachine.domain.jobs.job_row`): the executor
        holds a window of them."""
        return self._db.run(self._thd_due, before_ms, limit, from_ms)

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
        return self._db.run(self._thd_list_jobs, collection, status, limit, cursor)

    def expired(self, fired_before_ms, failed_before_ms, limit):
        """Fire with up to ``limit`` `JobVersion` of jobs whose retention has ended.

        Fired jobs count from ``fired_at_ms``; failed jobs from their last due time
        (when the attempt that gave up started: the store keeps no give-up time).
        Either bound may be None to skip that kind.
        """
        return self._db.run(self._thd_expired, fired_before_ms, failed_before_ms, limit)

    def count(self, status=None):
        """Fire with the number of jobs, or of jobs in ``status`` when not None."""
        try:
            status = _status_value(status)
        except InvalidField as e:
            return defer.fail(e)
        return self._db.run(self._thd_count, status)

    # -- store thread side

    def _thd_apply_command(self, conn, index, command):
        if isinstance(command, PutJobs):
            return self._thd_put_jobs(conn, index, command)
        if isinstance(command, DeleteJob):
            cursor = driver_cursor(conn)
            cursor.execute(_DELETE_JOB_SQL, {"collection": command.collection, "id": command.id})
            return cursor.rowcount > 0
        if isinstance(command, JobOutcome):
            return self._thd_outcome(conn, command)
        if isinstance(command, PurgeJobs):
            cursor = driver_cursor(conn)
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
        rows = {job.key: _UPSERT_JOB_VALUES(job_row(job)) for job in jobs}
        driver_cursor(conn).executemany(_UPSERT_JOB_SQL, list(rows.values()))
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
        row = driver_cursor(conn).execute(_OUTCOME_SQL[outcome.kind], values).fetchone()
        return None if row is None else job_from_row(row)

    def _thd_get(self, collection, job_id):
        with self._db.thd_transaction() as conn:
            row = conn.execute(
                select(*JOB_COLUMNS)
                .where(jobs_table.c.collection == collection)
                .where(jobs_table.c.id == job_id)
            ).first()
        return None if row is None else job_from_row(row)

    def _thd_due(self, before_ms, limit, from_ms):
        with self._db.thd_transaction() as conn:
            query = due_query(before_ms, limit, from_ms)
            return [tuple(row) for row in conn.execute(query)]

    def _thd_list_jobs(self, collection, status, limit, cursor):
        query = select(*JOB_COLUMNS).where(jobs_table.c.collection == collection)
        if status is not None:
            query = query.where(jobs_table.c.status == status)
        if cursor is not None:
            query = query.where(jobs_table.c.id > cursor)
        # One row more than asked tells whether another page exists.
        query = query.order_by(jobs_table.c.id).limit(limit + 1)
        with self._db.thd_transaction() as conn:
            jobs = [job_from_row(row) for row in conn.execute(query)]
        if len(jobs) > limit:
            jobs = jobs[:limit]
            return jobs, jobs[-1].id
        return jobs, None

    def _thd_expired(self, fired_before_ms, failed_before_ms, limit):
        found: list[JobVersion] = []
        columns = (jobs_table.c.collection, jobs_table.c.id, jobs_table.c.version)
        with self._db.thd_transaction() as conn:
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
        with self._db.thd_transaction() as conn:
            return conn.execute(query).scalar_one()


# ---- the meta group's store ------------------------------------------------------------


class _ClusterState(NamedTuple):
    routes: dict[str, Route]
    config: Configure | None
    members: dict[str, PutMember]
    leaving: set[str]


def _config_from_row(row) -> Configure:
    shards, replicas, shard_map = row
    shard_map = json.loads(shard_map)
    if isinstance(shard_map, list):  # written by a build that knew only the placement
        shard_map = {"placement": shard_map}
    return from_record(
        Configure,
        shards,
        replicas,
        tuple(tuple(p) for p in shard_map["placement"]),
        tuple(tuple(p) for p in shard_map.get("origin", ())),
        shard_map.get("map_index", 0),
    )


def _config_to_json(config: Configure) -> str:
    """The ``placement`` column: the placement, its origin once replicas moved, and
    the map's index."""
    shard_map = {"placement": [list(p) for p in config.placement], "map_index": config.map_index}
    if config.origin:
        shard_map["origin"] = [list(p) for p in config.origin]
    return json.dumps(shard_map)


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
        self._members: dict[str, PutMember] = {}
        self._leaving: set[str] = set()
        self.config: Configure | None = None

    def route(self, route_id):
        """The `Route` with this id, or None (from memory, no I/O)."""
        return self._routes.get(route_id)

    def routes(self):
        """All routes, ordered by id (from memory, no I/O)."""
        return [self._routes[route_id] for route_id in sorted(self._routes)]

    def member(self, node_id):
        """The `PutMember` of a node of the cluster, or None (from memory, no I/O)."""
        return self._members.get(node_id)

    def members(self):
        """Every member, ordered by node id (from memory, no I/O)."""
        return [self._members[node_id] for node_id in sorted(self._members)]

    def leaving(self):
        """The members being removed, as a frozenset of node ids (from memory, no I/O)."""
        return frozenset(self._leaving)

    def staying(self):
        """The node ids of the members not being removed, in order: those placement
        may give replicas and meta votes to."""
        return [node_id for node_id in sorted(self._members) if node_id not in self._leaving]

    # -- reactor side

    def _install_state(self, state: _ClusterState) -> None:
        self._routes = state.routes
        self.config = state.config
        self._members = state.members
        self._leaving = state.leaving

    def _commands_applied(self, commands) -> None:
        for command, result in commands:
            if isinstance(command, PutRoute):
                self._routes[command.route.id] = command.route
            elif isinstance(command, DeleteRoute):
                self._routes.pop(command.id, None)
            elif isinstance(command, Configure):
                self.config = result  # as stored, with its map_index
            elif isinstance(command, PutMember):
                known = self._members.get(command.node_id)
                if known is not None and known.incarnation and not command.incarnation:
                    command = dataclasses.replace(command, incarnation=known.incarnation)
                self._members[command.node_id] = command
            elif isinstance(command, RemoveMember):
                self._members.pop(command.node_id, None)
                self._leaving.discard(command.node_id)
            elif isinstance(command, MemberLeaving):
                if command.leaving:
                    self._leaving.add(command.node_id)
                else:
                    self._leaving.discard(command.node_id)

    # -- store thread side

    def _thd_load_state(self, conn) -> _ClusterState:
        routes = {
            route_id: from_record(Route, **json.loads(spec))
            for route_id, spec in conn.execute(select(routes_table.c.id, routes_table.c.spec))
        }
        row = conn.execute(
            select(config_table.c.shards, config_table.c.replicas, config_table.c.placement)
        ).first()
        members = {
            node_id: from_record(PutMember, node_id, peer, http, incarnation or "")
            for node_id, peer, http, incarnation in conn.execute(
                select(
                    members_table.c.node_id,
                    members_table.c.peer_address,
                    members_table.c.http_address,
                    member_incarnations_table.c.incarnation,
                ).outerjoin(
                    member_incarnations_table,
                    members_table.c.node_id == member_incarnations_table.c.node_id,
                )
            )
        }
        leaving = set(conn.execute(select(leaving_table.c.node_id)).scalars())
        config = None if row is None else _config_from_row(row)
        return _ClusterState(routes, config, members, leaving)

    def _thd_snapshot(self, path: str) -> int:
        """The meta state as protobuf (a `ClusterSnapshot`): the commands that rebuild
        it, not a copy of the database, so any build that reads the log reads it."""
        with self._db.thd_transaction() as conn:
            state = self._thd_load_state(conn)
        commands = [PutRoute(route) for route in state.routes.values()]
        commands += [] if state.config is None else [state.config]
        commands += list(state.members.values())
        commands += [MemberLeaving(node_id) for node_id in sorted(state.leaving)]
        snapshot = pb.ClusterSnapshot(
            applied_index=self._thd_applied_index,
            commands=[command_to_pb(command) for command in commands],
        )
        write_atomically(path, snapshot.SerializeToString())
        return self._thd_applied_index

    def _thd_restore(self, path: str) -> _Loaded:
        """Replace the meta state with a `ClusterSnapshot`'s, in one transaction."""
        with open(path, "rb") as f:
            data = f.read()
        if data.startswith(SQLITE_HEADER):
            return super()._thd_restore(path)  # sent by a build that copied its file
        try:
            snapshot = pb.ClusterSnapshot.FromString(data)
            commands = [command_from_pb(command) for command in snapshot.commands]
        except (DecodeError, ValueError, TypeError) as e:
            raise StorageError(f"{path}: not a usable meta snapshot: {e}") from e
        applied = snapshot.applied_index
        with self._db.thd_transaction() as conn:
            for table in (
                routes_table, config_table, members_table, member_incarnations_table,
                leaving_table,
            ):
                conn.execute(delete(table))
            for command in commands:
                self._thd_apply_command(conn, applied, command)
            driver_cursor(conn).execute(
                self._set_applied_sql, {"key": "applied_index", "value": str(applied)}
            )
            loaded = _Loaded(applied, self._thd_load_state(conn))
        self._thd_applied_index = applied
        return loaded

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
            if not command.origin and not command.map_index:
                # A new map, numbered here; as written (today's rules may be stricter).
                command = from_record(
                    Configure, command.shards, command.replicas, command.placement, (), index
                )
            values = {
                "shards": command.shards,
                "replicas": command.replicas,
                "placement": _config_to_json(command),
            }
            upsert = sqlite_insert(config_table).values(id=1, **values)
            conn.execute(upsert.on_conflict_do_update(index_elements=["id"], set_=values))
            return command
        if isinstance(command, PutMember):
            values = {
                "peer_address": command.peer_address,
                "http_address": command.http_address,
            }
            upsert = sqlite_insert(members_table).values(node_id=command.node_id, **values)
            conn.execute(upsert.on_conflict_do_update(index_elements=["node_id"], set_=values))
            if command.incarnation:
                values = {"incarnation": command.incarnation}
                upsert = sqlite_insert(member_incarnations_table).values(
                    node_id=command.node_id, **values
                )
                conn.execute(upsert.on_conflict_do_update(index_elements=["node_id"], set_=values))
            return command
        if isinstance(command, RemoveMember):
            for table in (leaving_table, member_incarnations_table):
                conn.execute(delete(table).where(table.c.node_id == command.node_id))
            result = conn.execute(
                delete(members_table).where(members_table.c.node_id == command.node_id)
            )
            return result.rowcount > 0
        if isinstance(command, MemberLeaving):
            if command.leaving:
                conn.execute(
                    sqlite_insert(leaving_table)
                    .values(node_id=command.node_id)
                    .on_conflict_do_nothing(index_elements=["node_id"])
                )
            else:
                conn.execute(
                    delete(leaving_table).where(leaving_table.c.node_id == command.node_id)
                )
            return command
        raise ValueError(f"the cluster store cannot apply {command!r}")
