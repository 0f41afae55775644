"""The component seams of a node (see DESIGN.md, "Components").

Every method that touches a disk, a thread or the network returns a Deferred; the
contract of each is in its docstring, and every implementation is checked with
``zope.interface.verify.verifyObject`` in the tests.
"""

from __future__ import annotations

from typing import NamedTuple

from zope.interface import Attribute, Interface


class WALRecord(NamedTuple):
    """One record of a write-ahead log: a Raft log entry."""

    index: int
    term: int
    payload: bytes


class IWriteAheadLog(Interface):
    """A segmented, checksummed, append-only log on disk, fsync'd in groups.

    Indexes are consecutive: each append takes ``last_index + 1`` (any index >= 1 when
    the log is empty, e.g. after a snapshot dropped everything).
    """

    first_index = Attribute("Index of the first record kept, or None when empty.")
    last_index = Attribute("Index of the last record appended (durable or not), 0 when empty.")
    bytes_on_disk = Attribute("Bytes of durable records in the segment files.")

    def open():
        """Recover the log from its directory.

        Keeps every complete, checksummed record before the first torn or corrupt one,
        cuts the file there and deletes everything after it. Fires with None.
        """

    def append(index, term, payload):
        """Append one record; fire with None once it is fsync'd.

        All appends made in one reactor turn are written and fsync'd together in a
        thread. Raises ValueError at once for an index that does not follow last_index.
        """

    def read(start, stop):
        """Fire with the durable records whose index is in ``[start, stop)``, in order."""

    def truncate_suffix(index):
        """Drop every record with index >= ``index`` (a Raft conflict); durable when fired."""

    def drop_prefix(index, seal=False):
        """Allow records below ``index`` to go: deletes the segments holding only those.

        With ``seal``, the next append starts a new segment when the last one holds
        records below ``index``, so that a later call can delete it whole.
        """

    def close():
        """Finish pending writes and close the files; fires when done."""


class IJobStore(Interface):
    """The state machine of a shard: its jobs, in one SQLite file on its own thread.

    Committed commands are applied in batches; each batch is one transaction that also
    stores ``applied_index``, so replaying the log after a crash applies each entry once.
    """

    applied_index = Attribute("Index of the last applied log entry (0 for a new store).")

    def open():
        """Create or open the database, check its schema version, load applied_index."""

    def close():
        """Close the database and stop the store's thread."""

    def apply(entries):
        """Apply ``[(index, command), ...]`` in one transaction, in order.

        Entries at or below applied_index are skipped (result None). Fires with one
        result per entry: PutJobs -> list of stored `Job`; DeleteJob -> bool (was there);
        JobOutcome -> the updated `Job`, or None when stale (another version or absent);
        PurgeJobs -> the number of jobs removed. A None command (a Raft entry that
        carries none: a leader's no-op, a membership change) only moves applied_index.
        """

    def expired(fired_before_ms, failed_before_ms, limit):
        """Fire with up to ``limit`` `JobVersion` of fired/failed jobs past retention."""

    def checkpoint():
        """Make every applied entry durable; fire with the applied_index now durable."""

    def disk_bytes():
        """Fire with the bytes the store's files take on disk."""

    def get(collection, job_id):
        """Fire with the `Job`, or None."""

    def due(before_ms, limit, from_ms=0):
        """Fire with up to ``limit`` scheduled jobs with from_ms <= due_ms < before_ms,
        earliest first."""

    def list_jobs(collection, status, limit, cursor):
        """Fire with ``(jobs, next_cursor)``: jobs of a collection ordered by id.

        ``status`` filters (None for all); ``cursor`` is the last id of the previous page
        (None to start); ``next_cursor`` is None on the last page.
        """

    def count(status):
        """Fire with the number of jobs, or of jobs in ``status`` when not None."""

    def snapshot(path):
        """Write a consistent copy of the database to ``path``; fire with the
        applied_index of the copy."""

    def restore(path):
        """Replace the database with the copy at ``path`` (a Raft snapshot install)."""


class IClusterStore(Interface):
    """The state machine of the meta group: routes and cluster settings."""

    applied_index = Attribute("Index of the last applied log entry.")
    config = Attribute("The current `Configure` command, or None before bootstrap.")

    def open():
        """Create or open the database and load routes and config into memory."""

    def close():
        """Close the database."""

    def apply(entries):
        """Apply ``[(index, command), ...]`` in one transaction.

        PutRoute -> the `Route`; DeleteRoute -> bool (was there); Configure -> the config;
        PutMember, MemberLeaving -> the command; RemoveMember -> bool (was there).
        """

    def checkpoint():
        """Make every applied entry durable; fire with the applied_index now durable."""

    def disk_bytes():
        """Fire with the bytes the store's files take on disk."""

    def route(route_id):
        """The `Route` with this id, or None (from memory, no I/O)."""

    def routes():
        """All routes, ordered by id (from memory, no I/O)."""

    def member(node_id):
        """The `PutMember` of a node of the cluster, or None (from memory, no I/O)."""

    def members():
        """Every member, ordered by node id (from memory, no I/O)."""

    def leaving():
        """The members being removed (`MemberLeaving`), as a frozenset of node ids."""

    def staying():
        """The node ids of the members not being removed, in order."""


class IRing(Interface):
    """Where a key lives: ``shard = xxhash64(job_id) % shards``."""

    shards = Attribute("Number of shards.")

    def shard_for(job_id):
        """The shard of a job id."""

    def replicas(shard):
        """The node ids holding a replica of ``shard``."""


class IShardLog(Interface):
    """A replicated log in front of one state machine (a shard store or the meta store).

    Every write goes propose -> durable append -> commit -> apply -> answer. A one-member
    group commits on the local fsync; a Raft group on a majority's.
    """

    applied_index = Attribute("Index of the last entry applied to the state machine.")

    def open():
        """Recover the log, replay committed entries above the store's applied_index."""

    def close():
        """Stop accepting proposals, finish those in progress, close the log."""

    def propose(command):
        """Fire with ``(index, result)`` once ``command`` is committed and applied.

        ``result`` is what the store's ``apply`` gave for it. Fails with
        `timemachine.errors.Unavailable` when this node cannot lead the group now.
        """

    def subscribe(listener):
        """Call ``listener(index, command, result)`` on the reactor after each apply."""

    def is_leader():
        """True while this node leads the group and holds its lease (may fire jobs)."""

    def stats():
        """This member's view of its group now, and its counters: a
        `timemachine.cluster.groupstats.GroupStatus`."""


class IPublisher(Interface):
    """Delivers one job to its route and classifies the outcome; never errbacks."""

    def deliver(route, job, attempt):
        """Fire with a `Delivered`, `RetryLater` or `Failed` (timemachine.firing.publisher)."""

    def close():
        """Close pooled connections; fires when done."""


class IExecutor(Interface):
    """Fires the due jobs of the shards this node leads, on time."""

    def add_shard(shard, store, log):
        """Start firing ``shard``: load its due window, follow its applies."""

    def remove_shard(shard):
        """Stop firing ``shard`` (leadership lost); in-flight deliveries finish."""

    def pending():
        """Number of jobs held in memory, waiting for their time."""

    def stop():
        """Stop firing; fires once in-flight deliveries have been recorded."""
