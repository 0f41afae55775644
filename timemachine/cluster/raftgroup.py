"""The Raft adapter: the node's Raft groups on the reactor, each behind `IShardLog`.

`RaftHost` gives every group of a node the two things the sans-I/O core lacks: time
and a network. One `LoopingCall` ticks all groups (``tick_seconds`` per tick; when the
reactor was late it ticks once per interval that passed, so a leader never counts less
time than went by and never overestimates its lease); messages leave through one
``send(node_id, group, message)`` callable - the peer network, which coalesces a turn's
messages to one node into one frame - and arrive through `RaftHost.receive`.

`RaftGroup` runs one member's Ready loop, one Ready at a time, in the order the core
requires (``timemachine.raft.core``):

1. persist the Ready's snapshot, entries and hard state (``disk.persist``: one WAL
   batch, fsync'd with every other group's work of the same turn);
2. send its messages - only now, so no vote or acknowledgement leaves before the state
   it promises is durable;
3. apply its committed entries to the state machine in one transaction (a batch), then
   answer the proposals among them and tell subscribers;
4. ``advance``.

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

import random
from collections.abc import Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from timemachine.domain.codec import decode_command, encode_command
from timemachine.domain.errors import CorruptLog, StorageError, Unavailable
from timemachine.interfaces import IShardLog
from timemachine.raft.core import LEADER, RaftCore
from timemachine.raft.types import ConfState, EntryKind, HardState, Message, Ready

#: Seconds per Raft tick. With `ELECTION_TICKS` a leader is suspected gone after 1-2 s
#: of silence (randomized), and its lease lasts about 0.8 s past a heartbeat round.
TICK_SECONDS = 0.1
ELECTION_TICKS = 10
HEARTBEAT_TICKS = 1
#: Seconds a proposal may wait for its entry to apply before it fails as `Unavailable`.
PROPOSAL_TIMEOUT = 10.0


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
        send: Callable[[str, int, Message], None],
        rng: random.Random,
        tick_seconds: float = TICK_SECONDS,
        election_ticks: int = ELECTION_TICKS,
        heartbeat_ticks: int = HEARTBEAT_TICKS,
        proposal_timeout: float = PROPOSAL_TIMEOUT,
    ):
        self.reactor = reactor
        self.node_id = node_id
        self.rng = rng
        self.tick_seconds = tick_seconds
        self.election_ticks = election_ticks
        self.heartbeat_ticks = heartbeat_ticks
        self.proposal_timeout = proposal_timeout
        self._send = send
        self._groups: dict[int, RaftGroup] = {}
        self._ticker: task.LoopingCall | None = None
        #: Messages for groups this node does not host (yet, or any more).
        self.unknown_group_messages = 0

    def start(self) -> None:
        """Start ticking."""
        self._ticker = task.LoopingCall.withCount(self._tick)
        self._ticker.clock = self.reactor
        self._ticker.start(self.tick_seconds, now=False)

    def stop(self) -> None:
        """Stop ticking (the groups are closed by their owners)."""
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None

    def groups(self) -> dict[int, RaftGroup]:
        """The groups hosted, by group number."""
        return dict(self._groups)

    def add(self, group: RaftGroup) -> None:
        if group.group in self._groups:
            raise ValueError(f"group {group.group} is already hosted")
        self._groups[group.group] = group

    def discard(self, group: RaftGroup) -> None:
        if self._groups.get(group.group) is group:
            del self._groups[group.group]

    def receive(self, group: int, message: Message) -> None:
        """Hand a message from a peer to the member of ``group`` on this node."""
        member = self._groups.get(group)
        if member is None:
            self.unknown_group_messages += 1
            return
        member.step(message)

    def send(self, group: int, message: Message) -> None:
        self._send(message.to, group, message)

    def _tick(self, count: int) -> None:
        for member in list(self._groups.values()):
            member.tick(count)


@implementer(IShardLog)
class RaftGroup:
    """This node's member of one Raft group, in front of its state machine.

    ``disk`` persists the member's Raft state (``load(bootstrap)`` -> MemoryStorage,
    ``persist(ready)``, ``close()``); ``store`` is the state machine (a shard's
    `JobStore` or the meta group's `ClusterStore`). ``bootstrap`` is the membership of
    a group that has never persisted anything (None: wait to be sent a snapshot).
    """

    log = Logger()

    def __init__(
        self,
        host: RaftHost,
        group: int,
        name: str,
        disk,
        store,
        bootstrap: ConfState | None = None,
    ):
        self.host = host
        self.group = group
        self.name = name
        self._disk = disk
        self._store = store
        self._bootstrap = bootstrap
        self.core: RaftCore | None = None
        self._listeners: list[Callable] = []
        self._leadership_listeners: list[Callable[[bool], None]] = []
        # index -> (term, answer, deadline)
        self._answers: dict[int, tuple[int, defer.Deferred, float]] = {}
        self._reads: dict[bytes, defer.Deferred] = {}
        self._read_states: list = []
        self._next_read = 0
        self._scheduled = None
        self._busy = False
        self._open = False
        self._broken: StorageError | None = None
        self._was_leader = False
        self._idle: list[defer.Deferred] = []

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
        storage = yield self._disk.load(self._bootstrap)
        try:
            yield self._store.open()
            applied = self._store.applied_index
            if applied > storage.last_index() and applied > storage.snapshot().index:
                raise CorruptLog(
                    f"{self.name}: its store has applied index {applied}, beyond the "
                    f"Raft log's last entry {storage.last_index()}"
                )
            saved = storage.hard_state
            if applied > saved.commit:
                # Commit-only changes are not persisted; what the store applied was
                # committed, whatever the saved copy says.
                storage.set_hard_state(HardState(saved.term, saved.vote, applied))
            host = self.host
            self.core = RaftCore(
                host.node_id,
                storage,
                random.Random(host.rng.random()),
                election_tick=host.election_ticks,
                heartbeat_tick=host.heartbeat_ticks,
                applied=applied,
            )
        except Exception:
            yield self._store.close()
            yield self._disk.close()
            raise
        self._open = True
        self.host.add(self)
        if self.core.conf.voters == {self.host.node_id}:
            # Alone in its group: no one to wait for.
            self.core.campaign()
        self._schedule()

    def subscribe(self, listener):
        self._listeners.append(listener)

    def on_leadership(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(True)`` when this member gains the lease, ``(False)`` when it
        loses it (`is_leader` changes), on the reactor."""
        self._leadership_listeners.append(listener)

    def is_leader(self) -> bool:
        core = self.core
        return (
            self._open
            and self._broken is None
            and core is not None
            and core.state == LEADER
            and core.lease_valid()
        )

    @property
    def leader(self) -> str | None:
        """The node this member believes leads the group, or None."""
        return None if self.core is None else self.core.leader

    def propose(self, command):
        if not self._open:
            return defer.fail(Unavailable(f"{self.name} is not serving"))
        if self._broken is not None:
            return defer.fail(self._broken)
        core = self.core
        if core.state != LEADER or not core.propose(encode_command(command)):
            return defer.fail(
                NotLeader(f"{self.name}: this node does not lead it now", core.leader)
            )
        index = core.log.last_index()
        answer = defer.Deferred()
        deadline = self.host.reactor.seconds() + self.host.proposal_timeout
        self._answers[index] = (core.term, answer, deadline)
        self._schedule()
        return answer

    def read_barrier(self):
        """Fire once a read from the store sees every write acknowledged before the
        call (linearizable): at once under a valid lease, else after a ReadIndex round.

        Fails with `NotLeader` when no leader is known.
        """
        if not self._open:
            return defer.fail(Unavailable(f"{self.name} is not serving"))
        core = self.core
        if self.is_leader() and self.applied_index >= core.lease_applied_index:
            return defer.succeed(None)
        self._next_read += 1
        context = self._next_read.to_bytes(8, "big")
        if not core.read_index(context):
            return defer.fail(NotLeader(f"{self.name} has no leader now", core.leader))
        waiter = defer.Deferred()
        self._reads[context] = waiter
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
        self._expire_answers()
        self._schedule()

    # -- the Ready loop --------------------------------------------------------------

    def _schedule(self) -> None:
        """Process the core's work at the end of this reactor turn (once per turn)."""
        if self._scheduled is None and not self._busy and self._open and self._broken is None:
            self._scheduled = self.host.reactor.callLater(0, self._process)

    @defer.inlineCallbacks
    def _process(self):
        self._scheduled = None
        if self._busy or not self._open or self._broken is not None:
            return
        core = self.core
        if core.has_ready():
            self._busy = True
            try:
                yield self._handle(core.ready())
            except Exception as e:
                self._fail(e)
            finally:
                self._busy = False
        self._notify_leadership()
        if core.has_ready():
            self._schedule()
        self._maybe_idle()

    @defer.inlineCallbacks
    def _handle(self, rd: Ready):
        if rd.entries or rd.snapshot is not None or rd.must_sync:
            # Else only the commit index moved (see the module docstring).
            yield self._disk.persist(rd)
        storage = self.core.storage
        if rd.snapshot is not None:
            storage.apply_snapshot(rd.snapshot)
        if rd.entries:
            storage.append(rd.entries)
        if rd.hard_state is not None:
            storage.set_hard_state(rd.hard_state)
        for message in rd.messages:
            self.host.send(self.group, message)
        if rd.snapshot is not None and rd.snapshot.index > 0:
            yield self._install(rd)
        if rd.committed:
            yield self._apply(rd)
        self._read_states.extend(rd.read_states)
        self.core.advance()
        self._release_reads()

    def _install(self, rd: Ready):
        raise StorageError(
            f"{self.name}: installing a snapshot from the leader is not supported yet "
            f"(snapshot at {rd.snapshot.index})"
        )

    @defer.inlineCallbacks
    def _apply(self, rd: Ready):
        batch = []
        for entry in rd.committed:
            if entry.kind == EntryKind.NORMAL and entry.data:
                batch.append((entry.index, decode_command(entry.data)))
            else:
                batch.append((entry.index, None))
        results = yield self._store.apply(batch)
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
            term, answer, _ = waiting
            if term == entry.term:
                answer.callback((index, result))
            else:
                answer.errback(
                    Unavailable(f"{self.name}: leadership changed before entry {index} committed")
                )

    def _release_reads(self) -> None:
        applied = self.applied_index
        waiting = []
        for state in self._read_states:
            if state.index <= applied:
                answer = self._reads.pop(state.context, None)
                if answer is not None:
                    answer.callback(None)
            else:
                waiting.append(state)
        self._read_states = waiting

    def _expire_answers(self) -> None:
        now = self.host.reactor.seconds()
        expired = [i for i, (_, _, deadline) in self._answers.items() if deadline <= now]
        for index in expired:
            _, answer, _ = self._answers.pop(index)
            answer.errback(
                Unavailable(f"{self.name}: entry {index} did not commit in time; retry")
            )
        self._maybe_idle()

    def _notify_leadership(self) -> None:
        leading = self.is_leader()
        if leading == self._was_leader:
            return
        self._was_leader = leading
        for listener in self._leadership_listeners:
            try:
                listener(leading)
            except Exception:
                self.log.failure("leadership listener of {name} failed", name=self.name)

    def _fail(self, error: Exception) -> None:
        """A disk or store failure: this member stops; its state on disk is what it was."""
        self._broken = (
            error if isinstance(error, StorageError) else StorageError(f"{self.name}: {error}")
        )
        self.log.failure("Raft group {name} stopped", name=self.name)
        self._notify_leadership()
        answers, self._answers = self._answers, {}
        for _, answer, _ in answers.values():
            answer.errback(self._broken)
        reads, self._reads = self._reads, {}
        for answer in reads.values():
            answer.errback(self._broken)
        self._maybe_idle()

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
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        closing = Unavailable(f"{self.name} is closing")
        answers, self._answers = self._answers, {}
        for _, answer, _ in answers.values():
            answer.errback(closing)
        reads, self._reads = self._reads, {}
        for answer in reads.values():
            answer.errback(closing)
        yield self.drain()
        if self._was_leader:
            self._was_leader = False
            for listener in self._leadership_listeners:
                listener(False)
        yield self._disk.close()
        yield self._store.close()
