"""The Raft adapter: the node's Raft groups on the reactor, each behind `IShardLog`.

`RaftHost` gives every group of a node the two things the sans-I/O core lacks: time
and a network. One `LoopingCall` ticks all groups (``tick_seconds`` per tick), counting
the ticks by the monotonic clock: when the reactor was late, or its timers (which follow
the wall clock) stalled because the wall clock stepped back, it ticks once per interval
that passed, so a leader never counts less time than went by. A lease is checked with
the ticks that passed since the last one counted (`RaftHost.pending_ticks`), so it is
never overestimated between two ticks either. Messages leave through one
``send(node_id, group, message)`` callable - the peer network, which coalesces a turn's
messages to one node into one frame - and arrive through `RaftHost.receive`.

`RaftGroup` runs one member's Ready loop, one Ready at a time, in the order the core
requires (``timemachine.raft.core``):

1. persist the Ready's snapshot, entries and hard state (``disk.persist``: one WAL
   batch, fsync'd with every other group's work of the same turn);
2. send its messages - only now, so no vote or acknowledgement leaves before the state
   it promises is durable;
3. start applying its committed entries to the state machine in one transaction (a
   batch) - once the previous Ready's apply is done, so at most one is in flight and
   they run in log order; when it is done, answer the proposals among them and tell
   subscribers;
4. ``advance``, without waiting for that apply.

So a Ready's persist overlaps the previous Ready's apply (etcd's server hands
committed entries to an apply loop and goes on; TiKV has its apply pool): measured
on a 3-node cluster, a proposal crosses about three Ready cycles before it is applied
on its leader, and each cycle waited for a store transaction as well as an fsync. The
core then counts entries applied that the store has not applied yet, so a lease is
held only once the *store* applied the first entry of the term (`is_leader`); a
snapshot is installed only once the applies before it are done.

Work arriving meanwhile (proposals, messages, ticks) accumulates in the core and goes
out in the next Ready, so under load each fsync and each store transaction carries
many proposals.

A Ready whose only news is a higher commit index is not persisted (etcd: ``MustSync``
is false): a commit index lost in a crash is learnt again from the leader, and one the
state machine applied is recovered from the store's ``applied_index`` on open.

Proposals are answered once applied, with the store's result. A proposal whose index
is applied carrying another term was overwritten by a newer leader: it failed and is
safe to retry (`Unavailable`). One still unanswered after ``proposal_timeout`` - the
node lost leadership and cannot tell whether the entry will commit - fails with
`Unavailable` too; DESIGN.md's jobs are replaced whole by a retry, so retrying is safe.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from timemachine.cluster.groupstats import GroupCounters, GroupStatus
from timemachine.domain.codec import decode_command, encode_command
from timemachine.domain.errors import AlreadyConfigured, CorruptLog, StorageError, Unavailable
from timemachine.interfaces import IShardLog
from timemachine.raft.core import LEADER, RaftCore, changed_conf, decode_conf_change
from timemachine.raft.types import (
    ConfChange,
    ConfState,
    EntryKind,
    HardState,
    Message,
    Ready,
    Snapshot,
    SnapshotTemporarilyUnavailable,
)
from timemachine.storage.durable import fsync_path
from timemachine.storage.sqlite import unlink_if_exists

#: Seconds per Raft tick. With `ELECTION_TICKS` a leader is suspected gone after 1-2 s
#: of silence (randomized), and its lease lasts about 0.8 s past a heartbeat round.
TICK_SECONDS = 0.1
ELECTION_TICKS = 10
HEARTBEAT_TICKS = 1
#: Seconds a proposal may wait for its entry to apply before it fails as `Unavailable`.
PROPOSAL_TIMEOUT = 10.0
#: Seconds after which an unanswered ReadIndex request is sent again (etcd: 0.5 s).
READ_RETRY_SECONDS = 0.5
#: Compaction: after this many applied entries, snapshot at the store's durable index
#: and let the disk cut the log below it (less the tail it keeps for followers).
COMPACT_EVERY_ENTRIES = 10_000


class SnapshotFile:
    """The data of a snapshot this node sends: a copy of its store, read chunk by
    chunk as the core sends it (``len`` and slices, like the bytes it stands for).

    The file stays open, so a newer copy may replace the name while a transfer of this
    one is still under way. A chunk is one ``pread`` of at most 64 KiB from a file the
    store thread wrote moments before (in the page cache): microseconds on the reactor.
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, key: slice) -> bytes:
        start, stop, _ = key.indices(self._size)
        return os.pread(self._fd, max(0, stop - start), start)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


def write_snapshot_chunks(receiving: str, incoming: str, chunks, installing: bool) -> None:
    """Write a Ready's snapshot chunks to the file at ``receiving``. When the Ready
    installs a snapshot, its data ends at the Ready's last ``last`` chunk: that file
    is made durable as ``incoming``. A snapshot's data that is not installed (the log
    had it, or a newer one replaced it in the same Ready) is removed. Blocks.

    Only the chunk in hand is in memory, however large the store a leader sends.
    """
    final = max((n for n, chunk in enumerate(chunks) if chunk.last), default=None)
    for n, chunk in enumerate(chunks):
        fd = os.open(receiving, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, chunk.offset)
            view = memoryview(chunk.data)
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:], chunk.offset + written)
            if installing and n == final:
                os.fsync(fd)
        finally:
            os.close(fd)
        if installing and n == final:
            os.replace(receiving, incoming)
            fsync_path(os.path.dirname(os.path.abspath(incoming)))
        elif chunk.last:
            unlink_if_exists(receiving)
    if installing and final is None:
        raise StorageError(f"{incoming}: a snapshot to install came without its data")


class _SendingStorage:
    """The core's view of the member's persisted log (the engine's `GroupStorage`).

    Its `snapshot`, once `serving`, is the copy of the store this node sends (prepared
    on demand by ``prepare``; `SnapshotTemporarilyUnavailable` until it exists). Its
    `initial_state` reports a commit index at least ``applied``: commit-only changes
    are not persisted, and what the store applied was committed.
    """

    def __init__(self, storage, prepare: Callable[[], Snapshot], applied: int):
        self.persisted = storage
        # The core reads these on every step: bound here, not found by `__getattr__`.
        self.first_index = storage.first_index
        self.last_index = storage.last_index
        self.term = storage.term
        self.entries = storage.entries
        self._prepare = prepare
        self._applied = applied
        self.serving = False

    def __getattr__(self, name):
        return getattr(self.persisted, name)

    def initial_state(self) -> tuple[HardState, ConfState]:
        saved, conf = self.persisted.initial_state()
        if saved.commit >= self._applied:
            return saved, conf
        return HardState(saved.term, saved.vote, self._applied), conf

    def snapshot(self) -> Snapshot:
        if not self.serving:
            return self.persisted.snapshot()
        return self._prepare()


class NotLeader(Unavailable):
    """This member cannot take proposals; ``leader`` is the node it believes leads."""

    def __init__(self, message: str, leader: str | None):
        super().__init__(message)
        self.leader = leader


class RaftHost:
    """The Raft groups of one node: one clock ticks them, one transport carries them."""

    log = Logger()

    def __init__(
        self,
        reactor,
        node_id: str,
        send: Callable[[str, int, int, Message], None],
        rng: random.Random,
        tick_seconds: float = TICK_SECONDS,
        election_ticks: int = ELECTION_TICKS,
        heartbeat_ticks: int = HEARTBEAT_TICKS,
        proposal_timeout: float = PROPOSAL_TIMEOUT,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.reactor = reactor
        self.node_id = node_id
        self.rng = rng
        self.tick_seconds = tick_seconds
        self.election_ticks = election_ticks
        self.heartbeat_ticks = heartbeat_ticks
        self.proposal_timeout = proposal_timeout
        self._send = send
        self._monotonic = monotonic
        # The monotonic time up to which ticks were handed to the groups.
        self._ticked_to: float | None = None
        #: Whether a repair cut this node's Raft log: members started meanwhile
        #: withhold their votes until they have caught up (`RaftCore.catching_up`).
        self.catching_up = False
        self._groups: dict[int, RaftGroup] = {}
        self._ticker: task.LoopingCall | None = None
        # Members with work for the end of this reactor turn, in the order they asked,
        # and the one timed call that runs them all (not one per member).
        self._due: dict[RaftGroup, None] = {}
        self._pass: IDelayedCall | None = None
        #: Messages for groups this node does not host (yet, or any more), or of
        #: another shard map's group of the same number.
        self.unknown_group_messages = 0

    def start(self) -> None:
        """Start ticking."""
        self._ticked_to = self._monotonic()
        self._ticker = task.LoopingCall(self._tick)
        self._ticker.clock = self.reactor
        self._ticker.start(self.tick_seconds, now=False)

    def pending_ticks(self) -> int:
        """Ticks that have passed by the monotonic clock and are not yet counted."""
        if self._ticked_to is None:
            return 0
        return int((self._monotonic() - self._ticked_to) / self.tick_seconds)

    def stop(self) -> None:
        """Stop ticking (the groups are closed by their owners)."""
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None

    def groups(self) -> dict[int, RaftGroup]:
        """The groups hosted, by group number."""
        return dict(self._groups)

    def caught_up(self) -> bool:
        """Whether no hosted member withholds its votes after a repair any more."""
        return not any(
            g.core is not None and g.core.catching_up for g in self._groups.values()
        )

    def add(self, group: RaftGroup) -> None:
        if group.group in self._groups:
            raise ValueError(f"group {group.group} is already hosted")
        self._groups[group.group] = group

    def discard(self, group: RaftGroup) -> None:
        if self._groups.get(group.group) is group:
            del self._groups[group.group]
        self._due.pop(group, None)
        if not self._due and self._pass is not None:
            self._pass.cancel()
            self._pass = None

    def process_soon(self, member: RaftGroup) -> None:
        """Run ``member``'s Ready loop at the end of this reactor turn."""
        self._due[member] = None
        if self._pass is None:
            self._pass = self.reactor.callLater(0, self._process_due)

    def _process_due(self) -> None:
        self._pass = None
        due, self._due = self._due, {}
        for member in due:
            try:
                member._process()
            except Exception:
                # One member's bug must not leave the others' work undone.
                self.log.failure("Ready loop of {name} failed", name=member.name)

    def receive(self, group: int, incarnation: int, message: Message) -> None:
        """Hand a message from a peer to the member of ``group`` on this node, if it
        belongs to the same shard map (``incarnation``) as the sender's."""
        member = self._groups.get(group)
        if member is None or member.incarnation != incarnation:
            self.unknown_group_messages += 1
            return
        member.step(message)

    def send(self, member: RaftGroup, message: Message) -> None:
        self._send(message.to, member.group, member.incarnation, message)

    def _tick(self) -> None:
        count = self.pending_ticks()
        if count <= 0:
            return  # the timer ran early by the monotonic clock
        self._ticked_to += count * self.tick_seconds
        for member in list(self._groups.values()):
            member.tick(count)


#: Appended to a store's file names when it is set aside for a rebuild from peers.
SET_ASIDE_SUFFIX = ".before-repair"
#: The directory of a node's data dir where stores set aside are kept, one
#: subdirectory per group (``shard-N``, ``meta``); nothing on the node deletes it.
SET_ASIDE_DIR = "set-aside"


def _set_aside(path: str, directory: str) -> str:
    """Move the SQLite file at ``path`` (and its -wal, -shm) into ``directory``, as
    the first free name of its own name + `SET_ASIDE_SUFFIX` (then ``.1``, ``.2``,
    ...), durably; that path. Blocks."""
    os.makedirs(directory, exist_ok=True)
    aside = os.path.join(directory, os.path.basename(path) + SET_ASIDE_SUFFIX)
    number, first = 0, aside
    while os.path.exists(aside):
        number += 1
        aside = f"{first}.{number}"
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(path + suffix, aside + suffix)
    fsync_path(os.path.abspath(directory))
    fsync_path(os.path.dirname(os.path.abspath(path)))
    return aside


def _untouched(storage) -> bool:
    """Whether a member's storage holds nothing persisted: no term, entry or snapshot."""
    hard_state, _ = storage.initial_state()
    return hard_state == HardState() and storage.last_index() == 0 and (
        storage.snapshot().index == 0
    )


class EngineDisk:
    """One group's part of the node-wide `RaftEngine`: the disk of a `RaftGroup`.

    The engine is the node's (opened and closed by it); the view only routes a
    group's calls to it with the group's number.
    """

    def __init__(self, engine, group: int):
        self._engine = engine
        self._group = group

    def load(self, bootstrap: ConfState | None = None):
        """Fire with the group's storage (`CorruptLog` when its state is damaged)."""
        try:
            return defer.succeed(self._engine.storage(self._group, bootstrap))
        except Exception:
            return defer.fail()

    def persist(self, ready: Ready):
        return self._engine.persist(self._group, ready)

    def compact(self, snapshot: Snapshot):
        return self._engine.compact(self._group, snapshot)

    def remove(self):
        """Forget the group's Raft state durably (this node no longer holds a replica)."""
        return self._engine.remove_group(self._group)

    def close(self):
        return defer.succeed(None)


@implementer(IShardLog)
class RaftGroup:
    """This node's member of one Raft group, in front of its state machine.

    ``disk`` persists the member's Raft state (an `EngineDisk`: ``load(bootstrap)`` ->
    the storage the core reads, ``persist(ready)`` and ``compact(snapshot)``, which
    show what they made durable to that storage, ``close()``); ``store`` is the state
    machine (a shard's `JobStore` or the meta group's `ClusterStore`); ``io`` an
    `IOThread` for the snapshot files. ``bootstrap`` is the membership of a group that
    has never persisted anything (None: wait to be sent a snapshot). ``set_aside_dir``
    is where a store ahead of a repaired Raft log is kept (default: beside it).

    Snapshots are what the store's ``snapshot(path)`` writes: a shard store copies its
    SQLite file, the meta group's store writes its state as protobuf. A member
    snapshots by recording only the point (index, term, membership) every
    `COMPACT_EVERY_ENTRIES` entries, and its disk
    cuts the log below it; the store is that point's state, made durable by a
    checkpoint.
    When a follower needs a snapshot, the leader sends a fresh copy of its store (as
    etcd sends its live backend) at the copy's own applied index, which is at or past
    the point, so the entries after it are still in the log. A follower installs it in
    three durable steps (its chunks are written to ``<store>.receiving`` as they
    arrive, so it never holds the store in memory): the data to ``<store>.incoming``,
    the snapshot's point into its Raft state, the store replaced by the data; `open`
    finishes an install a crash interrupted, and refuses loudly a store behind its Raft
    snapshot with no data to catch up from.
    """

    log = Logger()

    def __init__(
        self,
        host: RaftHost,
        group: int,
        name: str,
        disk,
        store,
        io,
        bootstrap: ConfState | None = None,
        compact_every: int = COMPACT_EVERY_ENTRIES,
        incarnation: int = 0,
        set_aside_dir: str | None = None,
    ):
        self.host = host
        self.group = group
        #: The shard map this member belongs to (its ``map_index``; 0: the meta group).
        self.incarnation = incarnation
        self.name = name
        self._disk = disk
        self._store = store
        self._io = io
        self._bootstrap = bootstrap
        self._compact_every = compact_every
        # Where a store ahead of a repaired log is kept: out of the shard's directory,
        # which goes when the replica moves off the node.
        self._set_aside_dir = set_aside_dir or os.path.dirname(os.path.abspath(store.path))
        self._applied_since_compaction = 0
        self._compacting: defer.Deferred | None = None
        #: Bytes of the store's files on disk, as of the last compaction (a gauge).
        self.store_bytes = 0
        self._storage = None  # the persisted log, a MemoryStorage
        # The copy of the store sent to followers that need a snapshot.
        self._sent_copy = f"{store.path}.snapshot"
        self._sending: Snapshot | None = None
        self._preparing: defer.Deferred | None = None
        # A leader's snapshot received and durable, not yet in the store; while its
        # chunks arrive, they are written to the other file.
        self._incoming = f"{store.path}.incoming"
        self._receiving = f"{store.path}.receiving"
        self.core: RaftCore | None = None
        self._listeners: list[Callable] = []
        self._leadership_listeners: list[Callable[[bool], None]] = []
        # index -> (term, answer, deadline)
        self._answers: dict[int, tuple[int, defer.Deferred, float]] = {}
        # ReadIndex context -> (answer, deadline, when to ask again)
        self._reads: dict[bytes, tuple[defer.Deferred, float, float]] = {}
        self._read_states: list = []
        self._next_read = 0
        self._scheduled = False
        self._busy = False
        # The apply in flight (a Ready's committed entries); fires with None when done.
        self._applying: defer.Deferred = defer.succeed(None)
        self._open = False
        self._broken: StorageError | None = None
        # The term in which the leadership listeners were told this member leads, or
        # None: they hear of a lease gained once per term, not of each short lapse.
        self._led_term: int | None = None
        self._leading_waiters: list[defer.Deferred] = []
        # (waiter, a leader it does not wait for) of `wait_for_leader`
        self._leader_waiters: list[tuple[defer.Deferred, str | None]] = []
        self._restore_listeners: list[Callable[[], None]] = []
        self._failure_listeners: list[Callable[[StorageError], None]] = []
        self._idle: list[defer.Deferred] = []
        self.counters = GroupCounters()
        self._leader_term = 0  # the last term in which a leader was learnt

    # -- IShardLog -------------------------------------------------------------------

    @property
    def store(self):
        """The state machine this group applies to."""
        return self._store

    @property
    def applied_index(self) -> int:
        return self._store.applied_index

    @defer.inlineCallbacks
    def open(self):
        """Load the member's Raft state and its store, join the host, start working.

        Entries committed but not yet applied to the store are applied by the first
        Readys, as the core hands them out again above the store's ``applied_index``.
        """
        storage = yield self._load()
        try:
            yield self._store.open()
            yield self._finish_install(storage.snapshot())
            applied = self._store.applied_index
            if applied > storage.last_index() and applied > storage.snapshot().index:
                storage = yield self._catch_up_with_store(storage, applied)
                applied = self._store.applied_index
            self._start_core(applied)
        except Exception:
            yield self._store.close()
            yield self._disk.close()
            raise
        self._open = True
        self.host.add(self)
        self._campaign_if_alone()
        self._schedule()
        # Once on open: what a restart replayed is cut, and the gauges are set.
        self.compact()

    @defer.inlineCallbacks
    def _load(self):
        """The member's persisted Raft state (a bootstrap membership made durable)."""
        storage = yield self._disk.load(self._bootstrap)
        self._storage = storage
        if self._bootstrap is not None and _untouched(storage):
            # The first membership must be durable too: a restart passes none.
            yield self._disk.persist(
                Ready(snapshot=Snapshot(0, 0, self._bootstrap), must_sync=True)
            )
        return storage

    @defer.inlineCallbacks
    def _catch_up_with_store(self, storage, applied: int):
        """The store applied entries the Raft log no longer holds (a repair cut them);
        fire with the storage to start from.

        They were committed - the store applies nothing else - so a member alone in
        its group restarts from the store, as from a snapshot at its applied index.
        A member with other replicas has peers that hold the entries: while the node
        catches up after the repair (its members withhold their votes: a blank member
        would grant any candidate), it is rebuilt from them; otherwise it refuses.
        """
        conf = self._conf_at(storage.last_index())
        if conf.voters == {self.host.node_id} and not conf.learners:
            yield self._adopt_store(storage, applied, conf)
            return storage
        if not self.host.catching_up:
            raise CorruptLog(
                f"{self.name}: its store {self._store.path} has applied index {applied}, "
                f"beyond the Raft log's last entry {storage.last_index()}; rebuild this "
                "replica from its peers",
                path=self._store.path,
            )
        # What was applied is never deleted to make a start succeed: the store is kept
        # under another name, though its peers hold it too.
        yield self._store.close()
        aside = yield self._io.call(_set_aside, self._store.path, self._set_aside_dir)
        self.log.warn(
            "{name}: its store applied entries the repaired Raft log no longer holds; "
            "it is set aside as {aside}, and the replica is rebuilt from its peers",
            name=self.name,
            aside=aside,
        )
        yield self._disk.remove()
        self._bootstrap = None
        storage = yield self._load()
        yield self._store.open()
        return storage

    @defer.inlineCallbacks
    def _adopt_store(self, storage, applied: int, conf: ConfState):
        """Restart the group alone in it from its store, as from a snapshot at the
        store's applied index."""
        hard_state, _ = storage.initial_state()
        self.log.warn(
            "{name}: its store has applied entries up to {applied} that the Raft log no "
            "longer holds (it ends at {last}): the group restarts from the store",
            name=self.name,
            applied=applied,
            last=storage.last_index(),
        )
        point = Snapshot(applied, max(1, hard_state.term), conf, b"")
        yield self._disk.persist(
            Ready(
                snapshot=point,
                hard_state=HardState(point.term, hard_state.vote, applied),
                must_sync=True,
            )
        )

    def _start_core(self, applied: int) -> None:
        host = self.host
        sending = _SendingStorage(self._storage, self._snapshot_to_send, applied)
        self.core = RaftCore(
            host.node_id,
            sending,
            random.Random(host.rng.random()),
            election_tick=host.election_ticks,
            heartbeat_tick=host.heartbeat_ticks,
            applied=applied,
            catching_up=host.catching_up,
        )
        sending.serving = True

    @property
    def alone(self) -> bool:
        """Whether this member is the group's only voter (it commits on its own fsync)."""
        return self.core.conf.voters == {self.host.node_id}

    def _campaign_if_alone(self) -> None:
        if self.alone:
            # No one to wait for.
            self.core.campaign()

    @property
    def blank(self) -> bool:
        """Whether this member knows no membership yet: it waits for a leader's
        snapshot (it is joining), or for `bootstrap`."""
        conf = self.core.conf
        return not conf.voters and not conf.learners

    @defer.inlineCallbacks
    def bootstrap(self, conf: ConfState):
        """Start the group as ``conf`` on a `blank` member that persisted nothing (a
        node started with ``--no-bootstrap``, then configured). Fails with
        `AlreadyConfigured` on any other member."""
        if not self._open or not self.blank or not _untouched(self._storage):
            raise AlreadyConfigured(f"{self.name} already has a membership")
        yield self._disk.persist(Ready(snapshot=Snapshot(0, 0, conf), must_sync=True))
        self._start_core(self._store.applied_index)
        self._campaign_if_alone()
        self._schedule()

    def subscribe(self, listener):
        self._listeners.append(listener)

    def on_leadership(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(True)`` when this member first holds the lease in a term,
        ``(False)`` when it stops leading that term (steps down, closes, fails), on
        the reactor.

        A lease that lapses for a moment while the member goes on leading the term (a
        heartbeat round answered late on a loaded machine) is not reported: no other
        member can lead that term, so what the listener built from this member's
        applies stays true. Whoever acts on the lease checks `is_leader` each time."""
        self._leadership_listeners.append(listener)

    def on_restore(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` after the store was replaced by a leader's snapshot (its
        subscribers heard of none of the commands that snapshot holds)."""
        self._restore_listeners.append(listener)

    def on_failure(self, listener: Callable[[StorageError], None]) -> None:
        """Call ``listener(error)`` when a disk or store failure stops this member."""
        self._failure_listeners.append(listener)

    @property
    def failed(self) -> StorageError | None:
        """The disk or store failure that stopped this member, or None."""
        return self._broken

    @defer.inlineCallbacks
    def start_over(self):
        """Forget this member's Raft state and its store, and reopen blank: it waits
        for a leader's snapshot (a node leaving the one-node cluster it started)."""
        yield self.close()
        yield self._disk.remove()
        for suffix in ("", "-wal", "-shm", ".snapshot", ".incoming", ".receiving"):
            yield self._io.call(unlink_if_exists, self._store.path + suffix)
        self._bootstrap = None
        self._broken = None
        yield self.open()

    def caught_up(self, node: str) -> bool:
        """On the leader: whether ``node``'s log reaches the commit index (a learner
        ready to vote)."""
        progress = self.core.prs.get(node) if self.core is not None else None
        return progress is not None and progress.match >= self.core.log.committed

    def wait_leading(self):
        """Fire once this member holds the lease (at once if it does)."""
        if self.is_leader():
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._leading_waiters.append(waiter)
        return waiter

    def wait_for_leader(self, besides: str | None = None):
        """Fire with the leader this member knows (other than ``besides``, unless that
        is this member and it takes proposals again: its transfer gave up): at once if
        it knows one, else once it learns of one. A leadership transfer takes
        milliseconds, an election at most the longest election timeout, so a read or
        write that meets either waits instead of failing; `Unavailable` (a retry) when
        no leader is known by then, or the member stops."""
        if not self._open or self._broken is not None:
            return defer.fail(Unavailable(f"{self.name} is not serving"))
        leader = self._leader_for(besides)
        if leader is not None:
            return defer.succeed(leader)
        waiter = defer.Deferred()
        # Waiters that timed out leave here too, not only once a leader is known: a
        # node cut off for long is asked again and again meanwhile.
        self._leader_waiters = [(w, b) for w, b in self._leader_waiters if not w.called]
        self._leader_waiters.append((waiter, besides))

        def none_in_time(_, timeout):
            raise Unavailable(f"{self.name} has no leader now; retry")

        host = self.host
        waiter.addTimeout(
            2 * host.election_ticks * host.tick_seconds, host.reactor,
            onTimeoutCancel=none_in_time,
        )
        return waiter

    def _leader_for(self, besides: str | None) -> str | None:
        """The leader a `wait_for_leader` waiter (not waiting for ``besides``) is
        given now, or None."""
        core = self.core
        leader = core.leader
        if leader is None:
            return None
        if leader != besides:
            return leader
        taking_proposals = (
            leader == self.host.node_id and core.state == LEADER and core.lead_transferee is None
        )
        return leader if taking_proposals else None

    def is_leader(self) -> bool:
        core = self.core
        return (
            self._open
            and self._broken is None
            and core is not None
            and core.state == LEADER
            and core.lease_valid(self.host.pending_ticks())
            # The core counts an apply in flight as done; the store must have applied
            # the term's first entry (every earlier leader's commits) itself.
            and self._store.applied_index >= core.lease_applied_index
        )

    @property
    def leads(self) -> bool:
        """Whether this member is the group's leader now (it takes proposals; firing
        and lease reads also need `is_leader`)."""
        return self.core is not None and self.core.state == LEADER

    @property
    def leader(self) -> str | None:
        """The node this member believes leads the group, or None (also once closed)."""
        return None if self.core is None or not self._open else self.core.leader

    def stats(self) -> GroupStatus:
        """This member's state and counters now (for metrics and ``/cluster/shards``)."""
        core = self.core
        running = self._open and self._broken is None and core is not None
        conf = self.conf if core is not None else ConfState()
        return GroupStatus(
            group=self.group,
            name=self.name,
            role=core.state if running else None,
            term=core.term if core is not None else 0,
            leader=self.leader if running else None,
            lease=self.is_leader(),
            commit_index=core.commit_index if core is not None else 0,
            applied_index=self._store.applied_index,
            last_index=core.log.last_index() if core is not None else 0,
            voters=tuple(sorted(conf.voters)),
            learners=tuple(sorted(conf.learners)),
            error=None if self._broken is None else str(self._broken),
            counters=self.counters,
        )

    def propose(self, command):
        self.counters.proposals += 1
        if not self._open:
            return self._refuse(Unavailable(f"{self.name} is not serving"))
        if self._broken is not None:
            return self._refuse(self._broken)
        core = self.core
        if core.state != LEADER or not core.propose(encode_command(command)):
            return self._refuse(
                NotLeader(f"{self.name}: this node does not lead it now", core.leader)
            )
        return self._await(core.log.last_index())

    def change_membership(self, change: ConfChange):
        """Propose one membership change; fire with its index once applied.

        Fails with `NotLeader` off the leader, and `Unavailable` while another change
        is under way (one server at a time) or when it would change nothing.
        """
        self.counters.proposals += 1
        if not self._open:
            return self._refuse(Unavailable(f"{self.name} is not serving"))
        core = self.core
        if core.state != LEADER:
            return self._refuse(NotLeader(f"{self.name}: this node does not lead it", core.leader))
        if not core.propose_conf_change(change):
            return self._refuse(
                Unavailable(f"{self.name}: cannot {change.kind.name} {change.node} now")
            )
        d = self._await(core.log.last_index())
        d.addCallback(lambda answer: answer[0])
        return d

    def _refuse(self, error: Exception):
        self.counters.proposals_failed += 1
        return defer.fail(error)

    def successor(self) -> str | None:
        """On the leader: the voter that would take over soonest (heard from
        recently, furthest along), or None when there is none."""
        if self.core is None or self.core.state != LEADER:
            return None
        candidates = [
            (progress.match, node)
            for node, progress in self.core.prs.items()
            if node != self.host.node_id and node in self.core.conf.voters
            and progress.recent_active
        ]
        return max(candidates)[1] if candidates else None

    def transfer_leadership(self, node: str) -> bool:
        """Hand this group's leadership to voter ``node`` (it catches up first, then
        campaigns at once); False when this member does not lead or ``node`` cannot
        take it. Proposals are refused meanwhile; an election timeout ends an attempt
        that did not take."""
        if not self._open or self._broken is not None or self.core.state != LEADER:
            return False
        if not self.core.transfer_leadership(node):
            return False
        self._schedule()
        return True

    @defer.inlineCallbacks
    def hand_over(self, node: str, timeout: float):
        """`transfer_leadership` to ``node``, then fire with whether this member let
        go of the leadership within ``timeout`` seconds."""
        if not self.transfer_leadership(node):
            return False
        deadline = self.host.reactor.seconds() + timeout
        while self.leads and self.host.reactor.seconds() < deadline:
            yield task.deferLater(self.host.reactor, 0.05, lambda: None)
        return not self.leads

    def _await(self, index: int):
        answer = defer.Deferred()
        deadline = self.host.reactor.seconds() + self.host.proposal_timeout
        self._answers[index] = (self.core.term, answer, deadline)
        self._schedule()
        return answer

    @property
    def conf(self) -> ConfState:
        """The membership this member applies now."""
        return self.core.conf

    def read_barrier(self):
        """Fire once a read from the store sees every write acknowledged before the
        call (linearizable): at once under a valid lease, else after a ReadIndex round.

        A request unanswered after `READ_RETRY_SECONDS` is sent again, to the leader
        known then: the first may have gone to a leader since cut off or replaced.
        With no leader known it waits for one (`wait_for_leader`); fails with
        `Unavailable` when none is known in time, or none answered within
        ``proposal_timeout``.
        """
        return self._read_barrier(wait=True)

    def _read_barrier(self, wait: bool):
        if not self._open:
            return defer.fail(Unavailable(f"{self.name} is not serving"))
        core = self.core
        if self.is_leader() and self.applied_index >= core.lease_applied_index:
            return defer.succeed(None)
        self._next_read += 1
        context = self._next_read.to_bytes(8, "big")
        if not core.read_index(context):
            if wait:
                return self.wait_for_leader().addCallback(
                    lambda _: self._read_barrier(wait=False)
                )
            return defer.fail(NotLeader(f"{self.name} has no leader now", core.leader))
        waiter = defer.Deferred()
        now = self.host.reactor.seconds()
        self._reads[context] = (waiter, now + self.host.proposal_timeout, now + READ_RETRY_SECONDS)
        self._schedule()
        return waiter

    # -- driven by the host ----------------------------------------------------------

    def step(self, message: Message) -> None:
        if not self._open or self._broken is not None:
            return
        self.core.step(message)
        self._schedule()

    def tick(self, count: int = 1) -> None:
        if not self._open or self._broken is not None:
            return
        for _ in range(count):
            self.core.tick()
        self._expire_waiters()
        self._schedule()

    # -- the Ready loop --------------------------------------------------------------

    def _schedule(self) -> None:
        """Process the core's work at the end of this reactor turn (once per turn)."""
        if not self._scheduled and not self._busy and self._open and self._broken is None:
            self._scheduled = True
            self.host.process_soon(self)

    def _process(self) -> None:
        self._scheduled = False
        if self._busy or not self._open or self._broken is not None:
            return
        core = self.core
        if not core.has_ready():
            self._processed()
            return
        self._busy = True
        try:
            ready = core.ready()
        except Exception:
            self._busy = False
            self._fail(Failure())
            return
        self._handle(ready).addErrback(self._fail).addBoth(self._handled)

    def _handled(self, _) -> None:
        self._busy = False
        self._processed()

    def _processed(self) -> None:
        self._notify_leadership()
        if self.core.has_ready():
            self._schedule()
        self._maybe_idle()

    @defer.inlineCallbacks
    def _handle(self, rd: Ready):
        installing = rd.snapshot is not None and rd.snapshot.index > 0
        if installing:
            # The snapshot replaces the store: the entries before it are applied first.
            yield self._applying
            if self._broken is not None:
                return
        if rd.snapshot_chunks:
            yield self._io.call(
                write_snapshot_chunks, self._receiving, self._incoming,
                rd.snapshot_chunks, installing,
            )
        if rd.entries or rd.snapshot is not None or rd.must_sync:
            # Else only the commit index moved (see the module docstring). The disk
            # shows what it made durable to the core's storage itself.
            yield self._disk.persist(rd)
        for message in rd.messages:
            self.host.send(self, message)
        if installing:
            yield self._finish_install(rd.snapshot)
            self.counters.snapshots_received += 1
            for listener in self._restore_listeners:
                try:
                    listener()
                except Exception:
                    self.log.failure("restore listener of {name} failed", name=self.name)
        if rd.committed:
            # One apply in flight: this Ready's persist overlapped the previous one's.
            yield self._applying
            if self._broken is not None:
                return  # that apply failed: nothing after it is applied
            self._applying = self._apply(rd).addCallbacks(self._answer, self._apply_failed)
        self._read_states.extend(rd.read_states)
        self.core.advance()
        self._release_reads()

    def _answer(self, answers) -> None:
        """An apply is done: answer its proposals and the reads it makes possible."""
        for answer, outcome in answers:
            if isinstance(outcome, Exception):
                answer.errback(outcome)
            else:
                answer.callback(outcome)
        self._release_reads()
        # The store may have just applied the first entry of the term: the lease.
        self._notify_leadership()
        self._maybe_idle()

    def _apply_failed(self, failure: Failure) -> None:
        self._fail(failure)

    @defer.inlineCallbacks
    def _finish_install(self, snapshot: Snapshot):
        """Bring the store up to ``snapshot`` (the member's Raft snapshot) from the
        received data in ``<store>.incoming``, if it is behind."""
        if self._store.applied_index >= snapshot.index:
            yield self._io.call(unlink_if_exists, self._incoming)
            return
        exists = yield self._io.call(os.path.exists, self._incoming)
        if not exists:
            raise CorruptLog(
                f"{self.name}: its store {self._store.path} has applied index "
                f"{self._store.applied_index}, behind the Raft snapshot at {snapshot.index}, "
                f"and no received snapshot data ({self._incoming}) remains to catch up from",
                path=self._store.path,
            )
        yield self._store.restore(self._incoming)
        if self._store.applied_index != snapshot.index:
            raise StorageError(
                f"{self.name}: the snapshot data received for index {snapshot.index} "
                f"holds index {self._store.applied_index}"
            )
        yield self._io.call(unlink_if_exists, self._incoming)
        self.log.info(
            "{name}: installed the leader's snapshot at index {index}",
            name=self.name,
            index=snapshot.index,
        )

    def _conf_at(self, index: int) -> ConfState:
        """The membership as of entry ``index`` (at or past the persisted snapshot)."""
        storage = self._storage
        base = storage.snapshot()
        conf = base.conf
        if index > base.index:
            for entry in storage.entries(base.index + 1, index + 1):
                if entry.kind == EntryKind.CONF_CHANGE:
                    conf = changed_conf(conf, decode_conf_change(entry.data))
        return conf

    def _snapshot_to_send(self) -> Snapshot:
        """The snapshot for a follower: a copy of the store at or past the persisted
        snapshot's point, or `SnapshotTemporarilyUnavailable` while one is copied."""
        point = self._storage.snapshot().index
        sending = self._sending
        if sending is not None and sending.index >= point:
            # The core asks only as it begins a transfer.
            self.counters.snapshots_sent += 1
            return sending
        if self._preparing is None:
            self._preparing = self._prepare_copy()
        raise SnapshotTemporarilyUnavailable(f"{self.name}: copying the store")

    @defer.inlineCallbacks
    def _prepare_copy(self):
        try:
            index = yield self._store.snapshot(self._sent_copy)
            if self.core is None or not self._open:
                return
            data = yield self._io.call(SnapshotFile, self._sent_copy)
            term = self._storage.term(index)
            self._sending = Snapshot(index, term, self._conf_at(index), data)
        except Exception:
            self.log.failure("{name}: copying the store for a follower failed", name=self.name)
        finally:
            self._preparing = None

    def compact(self):
        """Snapshot at the store's durable index; let the disk cut the log below it.

        Fires when done; a compaction under way is joined. Failures are logged: the
        log keeps its entries and the next compaction tries again.
        """
        if self._compacting is None:
            self._applied_since_compaction = 0
            self._compacting = self._compact()
            self._compacting.addErrback(self._compaction_failed)
            self._compacting.addBoth(self._compaction_done)
        waiter = defer.Deferred()

        def finished(result):
            waiter.callback(None)
            return result

        self._compacting.addBoth(finished)
        return waiter

    def _compaction_failed(self, failure):
        self.log.failure(
            "{name}: compaction failed; the log keeps its entries", failure, name=self.name
        )

    def _compaction_done(self, result):
        self._compacting = None
        return result

    @defer.inlineCallbacks
    def _compact(self):
        durable = yield self._store.checkpoint()
        storage = self._storage
        point = min(durable, self.core.applied_index)
        if point > storage.snapshot().index:
            # The disk keeps a tail of entries below the point, for followers slightly
            # behind, and lets the rest go.
            snapshot = Snapshot(point, storage.term(point), self._conf_at(point), b"")
            yield self._disk.compact(snapshot)
        self.store_bytes = yield self._store.disk_bytes()

    @defer.inlineCallbacks
    def _apply(self, rd: Ready):
        """Apply the committed entries in one store transaction; fire with the answers
        to give (the core has advanced past them by then: its membership includes the
        changes among them)."""
        batch = []
        for entry in rd.committed:
            if entry.kind == EntryKind.NORMAL and entry.data:
                batch.append((entry.index, decode_command(entry.data)))
            else:
                batch.append((entry.index, None))
        results = yield self._store.apply(batch)
        now = self.host.reactor.seconds()
        self._applied_since_compaction += len(batch)
        if self._applied_since_compaction >= self._compact_every:
            self.compact()
        answers = []
        for entry, (index, command), result in zip(rd.committed, batch, results, strict=True):
            if command is not None:
                for listener in self._listeners:
                    try:
                        listener(index, command, result)
                    except Exception:
                        self.log.failure("listener of {name} failed", name=self.name)
            waiting = self._answers.pop(index, None)
            if waiting is None:
                continue
            term, answer, deadline = waiting
            if term == entry.term:
                answers.append((answer, (index, result)))
                # The deadline is the proposal's time plus the timeout.
                self.counters.commit_seconds.observe(
                    now - deadline + self.host.proposal_timeout
                )
            else:
                self.counters.proposals_failed += 1
                lost = Unavailable(
                    f"{self.name}: leadership changed before entry {index} committed"
                )
                answers.append((answer, lost))
        return answers

    def _release_reads(self) -> None:
        applied = self.applied_index
        waiting = []
        for state in self._read_states:
            if state.index <= applied:
                waiting_read = self._reads.pop(state.context, None)
                if waiting_read is not None:
                    waiting_read[0].callback(None)
            else:
                waiting.append(state)
        self._read_states = waiting

    def _expire_waiters(self) -> None:
        now = self.host.reactor.seconds()
        expired = [i for i, (_, _, deadline) in self._answers.items() if deadline <= now]
        self.counters.proposals_failed += len(expired)
        for index in expired:
            _, answer, _ = self._answers.pop(index)
            answer.errback(
                Unavailable(f"{self.name}: entry {index} did not commit in time; retry")
            )
        for context, (answer, deadline, retry_at) in list(self._reads.items()):
            if deadline <= now:
                del self._reads[context]
                answer.errback(
                    Unavailable(f"{self.name}: no leader confirmed a read in time; retry")
                )
            elif retry_at <= now:
                # A duplicate answer is harmless: the first releases the read.
                self.core.read_index(context)
                self._reads[context] = (answer, deadline, now + READ_RETRY_SECONDS)
        self._maybe_idle()

    def _notify_leadership(self) -> None:
        core = self.core
        if core.leader is not None and core.term != self._leader_term:
            self._leader_term = core.term
            self.counters.leader_changes += 1
        if core.leader is not None and self._leader_waiters:
            waiting = []
            for waiter, besides in self._leader_waiters:
                if waiter.called:
                    continue  # it timed out
                leader = self._leader_for(besides)
                if leader is None:
                    waiting.append((waiter, besides))
                else:
                    waiter.callback(leader)
            self._leader_waiters = waiting
        leading = self.is_leader()
        if leading and self._leading_waiters:
            waiters, self._leading_waiters = self._leading_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        if self._led_term is not None and not (
            self._open
            and self._broken is None
            and core.state == LEADER
            and core.term == self._led_term
        ):
            self._led_term = None
            self._tell_leadership(False)
        if leading and self._led_term is None:
            self._led_term = core.term
            self._tell_leadership(True)

    def _tell_leadership(self, leading: bool) -> None:
        for listener in self._leadership_listeners:
            try:
                listener(leading)
            except Exception:
                self.log.failure("leadership listener of {name} failed", name=self.name)

    def _fail(self, failure: Failure) -> None:
        """A disk or store failure: this member stops; its state on disk is what it was."""
        error = failure.value
        self._broken = (
            error if isinstance(error, StorageError) else StorageError(f"{self.name}: {error}")
        )
        self.log.failure("Raft group {name} stopped", failure, name=self.name)
        self._notify_leadership()
        for listener in self._failure_listeners:
            try:
                listener(self._broken)
            except Exception:
                self.log.failure("failure listener of {name} failed", name=self.name)
        self._fail_waiting(self._broken)
        self._maybe_idle()

    def _fail_waiting(self, error: Exception) -> None:
        """Fail the proposals, reads and waits for a leader under way with ``error``."""
        answers, self._answers = self._answers, {}
        self.counters.proposals_failed += len(answers)
        for _, answer, _ in answers.values():
            answer.errback(error)
        reads, self._reads = self._reads, {}
        for answer, _, _ in reads.values():
            answer.errback(error)
        waiters, self._leader_waiters = self._leader_waiters, []
        for waiter, _ in waiters:
            if not waiter.called:  # else it timed out
                waiter.errback(error)

    def _maybe_idle(self) -> None:
        if not self._answers and not self._busy:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def drain(self):
        """Fire once every proposal made so far is answered."""
        if not self._answers and not self._busy:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._idle.append(waiter)
        return waiter

    @defer.inlineCallbacks
    def close(self):
        """Leave the host, fail what waits, finish the Ready in progress, close."""
        if not self._open:
            return
        self._open = False
        self.host.discard(self)
        self._scheduled = False
        closing = Unavailable(f"{self.name} is closing")
        self._fail_waiting(closing)
        waiters, self._leading_waiters = self._leading_waiters, []
        for waiter in waiters:
            waiter.errback(closing)
        yield self.drain()
        yield self._applying  # a follower's apply has no proposal waiting on it
        if self._compacting is not None:
            yield self.compact()
        if self._preparing is not None:
            yield self._preparing
        if self._sending is not None:
            self._sending.data.close()
            self._sending = None
        self._notify_leadership()  # closed: no longer leading, if it was
        yield self._disk.close()
        yield self._store.close()
