"""The sans-I/O Raft core (etcd's ``raft.go`` + ``rawnode.go`` + ``tracker/progress.go``).

`RaftCore` never touches a socket, a file, the reactor or the wall clock. It is driven
by three inputs - `RaftCore.tick` (time, counted in ticks), `RaftCore.step` (a message
from a peer) and the proposal calls - and hands its work out as a `Ready`::

    while core.has_ready():
        rd = core.ready()
        write(rd.snapshot_chunks)                 # a snapshot being received, to a file
        if rd.snapshot is not None:               # even at index 0: see below
            storage.apply_snapshot(rd.snapshot)   # its data: what the chunks wrote
        storage.append(rd.entries)
        if rd.hard_state: storage.set_hard_state(rd.hard_state)   # fsync if rd.must_sync
        send(rd.messages)
        apply(rd.snapshot, rd.committed)        # the state machine
        core.advance()

Persistence before sending (Raft thesis §3.8, etcd's ``msgsAfterAppend``): a vote grant
or an append acknowledgement promises state that must be durable first. The core puts
such a response in the same `Ready` as the entries / hard state it depends on; since
the application persists a Ready completely before sending any of its messages, no
promise leaves before the state it promises. The leader counts its own entries as
stored at once: its append messages to followers travel in the same Ready as the
entries, so a follower's acknowledgement implies the leader's write was done.

Membership changes are one server at a time and take effect when *applied*: the core
applies a ``CONF_CHANGE`` entry to `RaftCore.conf` in `advance` after handing it out in
``Ready.committed``. A leader may have at most one conf change proposed and not yet
applied, and none until the entries of its predecessors are applied (etcd's
``pendingConfIndex``), which keeps successive configurations overlapping.

Leases: with ``check_quorum`` a follower that heard from a leader within
``election_tick`` ticks ignores (pre-)vote requests, and a node ignores them for its
first ``election_tick`` ticks after a (re)start, since it forgot whom it heard from. So
once a quorum acknowledged a heartbeat the leader sent at tick ``t``, no other leader
can be elected before those members count ``election_tick`` ticks after it arrived.
Clocks do not run at the same rate, though (Raft thesis §6.4.1): ``max_clock_drift`` is
the bound assumed on how much faster one member's clock may run than another's (0.1:
while the leader counts 100 ticks, no member counts more than 110). `lease_valid`
trusts a heartbeat round for ``k`` ticks after it was sent only while
``(k + 1) * (1 + max_clock_drift) < election_tick - 1``: one tick for the leader's
partial tick, one for the follower's. A drift beyond the bound can give two members a
lease at once; it never breaks the safety of the log.

A lease is also held only once the leader applied the first entry of its term (its
no-op, `lease_applied_index`): every entry an earlier leader committed is below it, so
a state machine acting alone under the lease lacks no acknowledged write.

Batches are bounded by count and by bytes of entry data: an append message carries at
most ``max_msg_entries`` entries and ``max_msg_bytes`` bytes, a Ready at most
``max_committed_bytes`` bytes of committed entries (each at least one entry, however
large).
"""

from __future__ import annotations

import enum
import json
import random
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from timemachine.domain.errors import LogBehindCommit
from timemachine.raft.log import RaftLog
from timemachine.raft.types import (
    CompactedError,
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    NodeId,
    ReadState,
    Ready,
    Snapshot,
    SnapshotChunk,
    SnapshotTemporarilyUnavailable,
    Storage,
)

FOLLOWER = "follower"
CANDIDATE = "candidate"
PRE_CANDIDATE = "pre_candidate"
LEADER = "leader"
LEARNER = "learner"

# The context of a VOTE sent on a leader's TIMEOUT_NOW: it may break a lease, because
# the leader that granted the lease asked for the election itself.
CAMPAIGN_TRANSFER = b"transfer"

MT = MessageType


def encode_conf_change(change: ConfChange) -> bytes:
    """The ``Entry.data`` of a ``CONF_CHANGE`` entry (JSON: node ids are ints or strings)."""
    return json.dumps({"kind": int(change.kind), "node": change.node}).encode()


def decode_conf_change(data: bytes) -> ConfChange:
    """The `ConfChange` held in a ``CONF_CHANGE`` entry's data."""
    d = json.loads(data)
    return ConfChange(ConfChangeKind(d["kind"]), d["node"])


def _sorted_ids(ids: Iterable[NodeId]) -> list[NodeId]:
    """Ids in a stable order: set order of strings changes from run to run."""
    ids = list(ids)
    try:
        return sorted(ids)
    except TypeError:
        return sorted(ids, key=repr)


def _encode_round(n: int) -> bytes:
    return n.to_bytes(8, "big")


def _decode_round(context: bytes) -> int:
    return int.from_bytes(context, "big") if len(context) == 8 else 0


# -- per-follower replication state (etcd tracker/progress.go, inflights.go) -------------


class ProgressState(enum.Enum):
    """How the leader sends to one follower.

    PROBE: one append at a time until the follower's log position is found.
    REPLICATE: optimistic pipelining, bounded by the inflight window.
    SNAPSHOT: the follower needs a snapshot; appends wait until it is installed.
    """

    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """The last indices of appends sent and not yet acknowledged, at most ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._q: deque[int] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def add(self, index: int) -> None:
        """An append ending at ``index`` was sent."""
        self._q.append(index)

    def full(self) -> bool:
        """Whether the window is full (sending must wait)."""
        return len(self._q) >= self.capacity

    def free_le(self, index: int) -> None:
        """Appends up to ``index`` were acknowledged."""
        while self._q and self._q[0] <= index:
            self._q.popleft()

    def free_first_one(self) -> None:
        """Let one more append out (a heartbeat answer shows the follower is alive)."""
        if self._q:
            self._q.popleft()

    def reset(self) -> None:
        """Forget everything in flight."""
        self._q.clear()


class Progress:
    """The leader's view of one follower's log (etcd's ``tracker.Progress``)."""

    def __init__(self, next_index: int, max_inflight: int, is_learner: bool = False) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        # PROBE: an append is out; wait for its answer (or a heartbeat answer).
        self.probe_sent = False
        self.inflights = Inflights(max_inflight)
        self.pending_snapshot = 0
        self.recent_active = False
        self.is_learner = is_learner
        # The snapshot being sent in chunks: the offset the follower confirmed holding,
        # the offset of the next chunk to send (chunks in [snap_offset, snap_next) are in
        # flight), the offset we last went back to on a gap report (one go-back per
        # position, so a burst of gap reports does not resend the window again and
        # again), and how many ticks passed without a chunk sent (to retransmit).
        self.snap: Snapshot | None = None
        self.snap_offset = 0
        self.snap_next = 0
        self.snap_rewound: int | None = None
        self.snap_idle = 0
        # The latest heartbeat round the follower answered (lease and ReadIndex).
        self.acked_round = 0
        # The heartbeat round current when the last append went out: a heartbeat
        # answer of a later round was sent after that append arrived (or was lost).
        self.append_round = 0

    def __repr__(self) -> str:
        return (
            f"Progress({self.state.value}, match={self.match}, next={self.next}, "
            f"inflight={len(self.inflights)}, paused={self.is_paused()})"
        )

    def _reset_state(self, state: ProgressState) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()
        self.snap = None
        self.snap_offset = 0
        self.snap_next = 0
        self.snap_rewound = None
        self.snap_idle = 0

    def become_probe(self) -> None:
        """Go back to probing, from after what is known to match."""
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        """The follower's position is known: pipeline appends."""
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snap: Snapshot) -> None:
        """Send ``snap``; appends wait until the follower has it."""
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snap.index
        self.snap = snap

    def maybe_update(self, n: int) -> bool:
        """The follower holds everything up to ``n``; returns whether ``match`` grew."""
        updated = False
        if self.match < n:
            self.match = n
            updated = True
            self.probe_sent = False
        self.next = max(self.next, n + 1)
        return updated

    def maybe_decr_to(self, rejected: int, match_hint: int) -> bool:
        """The append after ``rejected`` was refused; back ``next`` off.

        Returns False for a stale rejection (one answering an append already superseded).
        """
        if rejected <= self.match and match_hint < self.match:
            # The follower's log ends before entries it acknowledged: it lost them (a
            # repair cut its log), and is sent them again. A stale refusal looks the
            # same, and costs only a resend of what it already holds.
            self.match = match_hint
            self.next = match_hint + 1
            self.probe_sent = False
            return True
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        """Whether no append may be sent now."""
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return self.inflights.full()
        return True


@dataclass(slots=True)
class _ReadRequest:
    """A ReadIndex request waiting for a quorum to answer heartbeat round ``round``."""

    frm: NodeId
    context: bytes
    index: int
    round: int


# -- the core -------------------------------------------------------------------------------


class RaftCore:
    """One member of a Raft group, as a deterministic state machine.

    Membership and hard state come from ``storage.initial_state()`` (and its snapshot).
    The state machine is assumed to start from ``storage.snapshot()``; ``applied`` may
    say it already holds more (entries up to it are not handed out again, and conf
    changes among them are re-applied here). ``rng`` draws the randomized election
    timeouts; nothing else is random.

    A member joining with empty storage (no membership at all) refuses appends after
    index 0, so the leader sends it its snapshot first - even the bootstrap one at
    index 0 - which carries the membership the log does not.
    """

    def __init__(
        self,
        id: NodeId,
        storage: Storage,
        rng: random.Random,
        *,
        election_tick: int = 10,
        heartbeat_tick: int = 1,
        pre_vote: bool = True,
        check_quorum: bool = True,
        max_msg_entries: int = 64,
        max_msg_bytes: int = 1024 * 1024,
        max_committed_bytes: int = 8 * 1024 * 1024,
        max_inflight: int = 256,
        snapshot_chunk_bytes: int = 64 * 1024,
        max_snapshot_inflight: int = 16,
        max_clock_drift: float = 0.1,
        applied: int = 0,
        catching_up: bool = False,
    ) -> None:
        if heartbeat_tick <= 0 or election_tick <= heartbeat_tick:
            raise ValueError("need 0 < heartbeat_tick < election_tick")
        limits = (
            max_msg_entries,
            max_msg_bytes,
            max_committed_bytes,
            max_inflight,
            snapshot_chunk_bytes,
            max_snapshot_inflight,
        )
        if min(limits) <= 0:
            raise ValueError(
                "max_msg_entries, max_msg_bytes, max_committed_bytes, max_inflight, "
                "snapshot_chunk_bytes, max_snapshot_inflight must be > 0"
            )
        if not 0 <= max_clock_drift < 1:
            raise ValueError(f"max_clock_drift must be in [0, 1), not {max_clock_drift}")
        self.id = id
        self.storage = storage
        self.rng = rng
        self.election_tick = election_tick
        self.heartbeat_tick = heartbeat_tick
        self.pre_vote = pre_vote
        self.check_quorum = check_quorum
        self.max_msg_entries = max_msg_entries
        self.max_msg_bytes = max_msg_bytes
        self.max_committed_bytes = max_committed_bytes
        self.max_clock_drift = max_clock_drift
        self.max_inflight = max_inflight
        self.snapshot_chunk_bytes = snapshot_chunk_bytes
        self.max_snapshot_inflight = max_snapshot_inflight

        self.log = RaftLog(storage)
        hs, cs = storage.initial_state()
        self.conf: ConfState = cs
        self.term = hs.term
        self.vote: NodeId | None = hs.vote
        # The state machine starts from the storage's snapshot (even when the log was
        # not compacted up to it): entries it covers are committed and never handed out
        # again; ``applied`` may only say the state machine holds more than that.
        snap_index = storage.snapshot().index
        self.log.committed = max(self.log.committed, snap_index)
        if hs.commit > self.log.last_index():
            # Entries this member was told are committed are gone: clamping would let
            # it vote and lead without them.
            raise LogBehindCommit(
                f"member {id!r}: commit index {hs.commit} is past the last log entry "
                f"{self.log.last_index()}"
            )
        self.log.commit_to(hs.commit)
        applied = max(applied, self.log.first_index() - 1, snap_index)
        if applied > self.log.committed:
            raise ValueError(f"applied {applied} is past the commit index {self.log.committed}")
        # The storage's membership is the snapshot's; conf changes the state machine
        # applied after it are in the log.
        lo = max(self.log.first_index(), snap_index + 1)
        for e in self.log.slice(lo, applied + 1):
            if e.kind == EntryKind.CONF_CHANGE:
                self.conf = changed_conf(self.conf, decode_conf_change(e.data))
        self.log.applied = applied

        # A member whose log a repair cut may lack entries it acknowledged: counted in
        # their majorities, it would vote as if it never had them. It neither votes nor
        # campaigns until it holds an entry committed in its leader's term (every
        # entry committed before is in its log then), unless it is the only voter.
        self.catching_up = catching_up

        self.lead: NodeId | None = None
        self._role = FOLLOWER
        self._step_role: Callable[[Message], None] = self._step_follower
        self._tick_role: Callable[[], None] = self._tick_election
        self.prs: dict[NodeId, Progress] = {}
        self.msgs: list[Message] = []
        self.read_states: list[ReadState] = []
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = election_tick
        self.lead_transferee: NodeId | None = None
        self.pending_conf_index = 0
        self._term_start = 0  # the index of a leader's first entry of its term
        self._votes: dict[NodeId, bool] = {}
        self._now = 0  # ticks since start: the clock of the lease
        self._hb_round = 0
        self._round_sent: deque[tuple[int, int]] = deque()  # (round, tick sent)
        self._reads: list[_ReadRequest] = []
        self._reads_before_commit: list[tuple[NodeId, bytes]] = []
        self._sent_timeout_now = False
        # The snapshot being received: its key and the bytes of it handed out to write.
        self._snap_recv: tuple[tuple, int] | None = None
        self.snapshot_chunks: list[SnapshotChunk] = []
        # A restarted member forgot the leader it heard from: it honours that leader's
        # lease for one election timeout anyway (see the module docstring).
        self._boot_guard = True
        self._prev_hs = hs
        self._outstanding: tuple[Entry | None, Snapshot | None, tuple[Entry, ...]] | None = None
        self.become_follower(self.term, None)

    def __repr__(self) -> str:
        return (
            f"RaftCore(id={self.id!r}, {self.state}, term={self.term}, lead={self.lead!r}, "
            f"last={self.log.last_index()}, commit={self.log.committed}, "
            f"applied={self.log.applied})"
        )

    # -- public read-only state -------------------------------------------------------------

    @property
    def state(self) -> str:
        """ "leader", "follower", "candidate", "pre_candidate" or "learner"."""
        if self._role == FOLLOWER and self.id in self.conf.learners:
            return LEARNER
        return self._role

    @property
    def leader(self) -> NodeId | None:
        """The leader of the current term, if known."""
        return self.lead

    @property
    def commit_index(self) -> int:
        """The highest index known committed."""
        return self.log.committed

    @property
    def applied_index(self) -> int:
        """The highest index the application acknowledged applying (via `advance`)."""
        return self.log.applied

    @property
    def hard_state(self) -> HardState:
        """Term, vote and commit as they are now (persisted or not)."""
        return HardState(self.term, self.vote, self.log.committed)

    def _quorum(self) -> int:
        return len(self.conf.voters) // 2 + 1

    def _promotable(self) -> bool:
        return self.id in self.conf.voters and not self._withholding_votes()

    def _withholding_votes(self) -> bool:
        return self.catching_up and self.conf.voters != {self.id}

    def _note_caught_up(self) -> None:
        committed = self.log.committed
        if committed > 0 and self.log.term_or_zero(committed) == self.term:
            self.catching_up = False

    # -- inputs -------------------------------------------------------------------------------

    def tick(self) -> None:
        """One unit of logical time."""
        self._now += 1
        self._tick_role()

    def propose(self, data: bytes) -> bool:
        """Append ``data`` to the log; False unless leader and not transferring leadership."""
        if self._role != LEADER or self.lead_transferee is not None or self.id not in self.prs:
            return False
        self._append_entry([(bytes(data), EntryKind.NORMAL)])
        self._bcast_append()
        return True

    def propose_conf_change(self, change: ConfChange) -> bool:
        """Propose one membership change; False unless leader with no change pending.

        Refused too when it would change nothing, or leave the group without voters.
        """
        if self._role != LEADER or self.lead_transferee is not None:
            return False
        if self.pending_conf_index > self.log.applied:
            return False
        voters, learners = self.conf.voters, self.conf.learners
        node = change.node
        if change.kind == ConfChangeKind.ADD_LEARNER:
            ok = node not in voters and node not in learners
        elif change.kind == ConfChangeKind.PROMOTE:
            ok = node in learners
        else:
            ok = (node in voters and len(voters) > 1) or node in learners
        if not ok:
            return False
        self._append_entry([(encode_conf_change(change), EntryKind.CONF_CHANGE)])
        self.pending_conf_index = self.log.last_index()
        self._bcast_append()
        return True

    def campaign(self) -> None:
        """Start an election now rather than after an election timeout (etcd's
        ``Campaign``): a one-member group elects itself at once on start."""
        self._hup(transfer=False)

    def transfer_leadership(self, to: NodeId) -> bool:
        """Hand leadership to voter ``to``: catch it up, then tell it to campaign now.

        Proposals are refused meanwhile; the transfer is abandoned after an election
        timeout if ``to`` has not taken over.
        """
        if self._role != LEADER or to == self.id or to not in self.conf.voters:
            return False
        if to not in self.prs:
            return False
        if self.lead_transferee == to:
            return True
        self.lead_transferee = to
        # The transfer gets one election timeout from now.
        self.election_elapsed = 0
        if self.prs[to].match == self.log.last_index():
            self._send_timeout_now(to)
        else:
            self._send_append(to)
        return True

    def read_index(self, context: bytes) -> bool:
        """Ask for a linearizable read point, answered as a `ReadState` tagged ``context``.

        The leader confirms it still leads with a heartbeat round first (and waits for
        an entry of its own term to commit); a follower forwards to the leader. False if
        no leader is known.
        """
        if self._role == LEADER:
            self._leader_read(self.id, bytes(context))
            return True
        if self.lead is None:
            return False
        self._send(MT.READ_INDEX, self.lead, context=bytes(context))
        return True

    @property
    def lease_applied_index(self) -> int:
        """The index a lease holder must have applied before it acts alone: the first
        entry of its term, above every entry committed by earlier leaders (0 when not
        leader). `lease_valid` waits for `advance` to acknowledge it; an application
        whose state machine runs ahead of ``advance`` may compare its own index."""
        return self._term_start if self._role == LEADER else 0

    def lease_valid(self, pending_ticks: int = 0) -> bool:
        """Whether this leader may act alone (serve reads, fire) from its state machine,
        counting ``pending_ticks`` that have passed but were not yet handed to `tick`.

        It may once it has applied the first entry of its term (`lease_applied_index`),
        and while a quorum answered a heartbeat round it sent recently enough that no
        other leader can have been elected since, whatever the clocks' drift within
        ``max_clock_drift`` (see the module docstring). Always False without
        check-quorum (followers then grant no lease), while a leadership transfer may
        have started in this term, and on non-leaders.
        """
        if self._role != LEADER or not self.check_quorum or self._sent_timeout_now:
            return False
        if self.lead_transferee is not None:
            return False
        if self.log.applied < self._term_start:
            return False
        r = self._quorum_round()
        if r is None:
            return True
        for rnd, sent in self._round_sent:
            if rnd == r:
                elapsed = self._now + pending_ticks - sent
                return (elapsed + 1) * (1 + self.max_clock_drift) < self.election_tick - 1
        return False

    def step(self, m: Message) -> None:
        """Take one message from a peer."""
        if m.to != self.id:
            return
        if m.term > self.term:
            if m.type in (MT.PRE_VOTE, MT.VOTE):
                force = m.type == MT.VOTE and m.context == CAMPAIGN_TRANSFER
                if not force and self._in_lease():
                    # A leader is alive: don't let a disconnected node's election in.
                    return
            if m.type == MT.PRE_VOTE:
                pass  # a pre-vote never changes our term
            elif m.type == MT.PRE_VOTE_RESP and not m.reject:
                pass  # granted pre-votes carry the future term; we adopt it on winning
            elif m.type in (MT.APPEND, MT.HEARTBEAT, MT.SNAPSHOT):
                self.become_follower(m.term, m.frm)
            else:
                self.become_follower(m.term, None)
        elif m.term < self.term:
            if (self.check_quorum or self.pre_vote) and m.type in (MT.APPEND, MT.HEARTBEAT):
                # A deposed leader (maybe cut off while we moved on): tell it our term
                # so it steps down; with pre-vote it may never see a higher vote.
                self._send(MT.APPEND_RESP, m.frm)
            elif m.type == MT.PRE_VOTE:
                self._send(MT.PRE_VOTE_RESP, m.frm, reject=True)
            return

        if m.type in (MT.PRE_VOTE, MT.VOTE):
            self._handle_vote_request(m)
            return
        self._step_role(m)

    # -- Ready / advance -------------------------------------------------------------------

    def has_ready(self) -> bool:
        """Whether `ready` has work to hand out (False while a Ready awaits `advance`)."""
        if self._outstanding is not None:
            return False
        return bool(
            self.msgs
            or self.snapshot_chunks
            or self.read_states
            or self.log.unstable.entries
            or self.log.unstable.snapshot is not None
            or self.hard_state != self._prev_hs
            or self.log.has_next_committed_entries()
        )

    def ready(self) -> Ready:
        """The work to do now; raises RuntimeError until the previous one is advanced."""
        if self._outstanding is not None:
            raise RuntimeError("ready() called again before advance()")
        hs = self.hard_state
        entries = tuple(self.log.unstable_entries())
        snap = self.log.unstable.snapshot
        committed = tuple(self.log.next_committed_entries(self.max_committed_bytes))
        prev = self._prev_hs
        rd = Ready(
            hard_state=hs if hs != prev else None,
            entries=entries,
            snapshot=snap,
            committed=committed,
            messages=tuple(self.msgs),
            read_states=tuple(self.read_states),
            must_sync=bool(entries)
            or snap is not None
            or hs.term != prev.term
            or hs.vote != prev.vote,
            snapshot_chunks=tuple(self.snapshot_chunks),
        )
        self.msgs = []
        self.snapshot_chunks = []
        self.read_states = []
        self._prev_hs = hs
        self._outstanding = (entries[-1] if entries else None, snap, committed)
        return rd

    def advance(self) -> None:
        """The last Ready was done: persisted, sent and applied."""
        if self._outstanding is None:
            raise RuntimeError("advance() without a ready() to acknowledge")
        last, snap, committed = self._outstanding
        self._outstanding = None
        if snap is not None:
            self.log.stable_snap_to(snap.index)
            if snap.index > self.log.applied:
                self.log.applied_to(snap.index)
        if last is not None:
            self.log.stable_to(last.index, last.term)
        for e in committed:
            if e.index <= self.log.applied:
                continue
            self.log.applied_to(e.index)
            if e.kind == EntryKind.CONF_CHANGE:
                self._apply_conf_change(decode_conf_change(e.data))

    # -- role transitions ------------------------------------------------------------------

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = None
        self.lead = None
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = self.election_tick + self.rng.randrange(
            self.election_tick
        )
        self.lead_transferee = None
        self._sent_timeout_now = False
        self._votes = {}
        self._reads = []
        self._reads_before_commit = []
        last = self.log.last_index()
        self.prs = {}
        for n in _sorted_ids(self.conf.voters | self.conf.learners):
            pr = Progress(last + 1, self.max_inflight, is_learner=n in self.conf.learners)
            if n == self.id:
                pr.match = last
            self.prs[n] = pr

    def become_follower(self, term: int, lead: NodeId | None) -> None:
        """Follow ``lead`` (None: unknown) in ``term``; legal from every role."""
        self._reset(term)
        self.lead = lead
        self._role = FOLLOWER
        self._step_role = self._step_follower
        self._tick_role = self._tick_election

    def become_pre_candidate(self) -> None:
        """Ask for pre-votes: term and vote stay as they are until a quorum agrees."""
        if self._role == LEADER:
            raise RuntimeError("invalid transition leader -> pre_candidate")
        self._votes = {}
        self.lead = None
        self._boot_guard = False
        self._role = PRE_CANDIDATE
        self._step_role = self._step_candidate
        self._tick_role = self._tick_election

    def become_candidate(self) -> None:
        """Start an election in a new term, voting for ourselves."""
        if self._role == LEADER:
            raise RuntimeError("invalid transition leader -> candidate")
        self._reset(self.term + 1)
        self.vote = self.id
        self._boot_guard = False
        self._role = CANDIDATE
        self._step_role = self._step_candidate
        self._tick_role = self._tick_election

    def become_leader(self) -> None:
        """Lead: only a candidate that won its election may."""
        if self._role != CANDIDATE:
            raise RuntimeError(f"invalid transition {self._role} -> leader")
        self._reset(self.term)
        self.lead = self.id
        self._role = LEADER
        # Held back, it could campaign only as the group's one voter: nothing to wait for.
        self.catching_up = False
        self._step_role = self._step_leader
        self._tick_role = self._tick_heartbeat
        self.prs[self.id].recent_active = True
        # The no-op of our term: commits (Figure 8) everything before it.
        self._append_entry([(b"", EntryKind.NORMAL)])
        self._term_start = self.log.last_index()
        # No conf change until the no-op is applied: the previous leader may have left
        # one committed-but-unapplied (etcd's pendingConfIndex), and a single-server
        # change is only safe once the leader has committed an entry of its own term.
        self.pending_conf_index = self._term_start

    # -- ticks -----------------------------------------------------------------------------

    def _tick_election(self) -> None:
        self.election_elapsed += 1
        if self.election_elapsed >= self.election_tick:
            self._boot_guard = False
        if self._promotable() and self.election_elapsed >= self.randomized_election_timeout:
            self.election_elapsed = 0
            self._hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        for pr in self.prs.values():
            if pr.state is ProgressState.SNAPSHOT:
                pr.snap_idle += 1
        if self.election_elapsed >= self.election_tick:
            self.election_elapsed = 0
            if self.check_quorum and not self._quorum_active():
                self.become_follower(self.term, None)
                return
            self.lead_transferee = None  # the transfer took too long: accept proposals again
        if self.heartbeat_elapsed >= self.heartbeat_tick:
            self.heartbeat_elapsed = 0
            self._bcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = 0
        for n, pr in self.prs.items():
            if n == self.id:
                active += n in self.conf.voters
                continue
            if pr.recent_active and n in self.conf.voters:
                active += 1
            pr.recent_active = False
        return active >= self._quorum()

    def _in_lease(self) -> bool:
        return (
            self.check_quorum
            and self.election_elapsed < self.election_tick
            and (self.lead is not None or self._boot_guard)
        )

    # -- elections ---------------------------------------------------------------------------

    def _hup(self, transfer: bool) -> None:
        if self._role == LEADER or not self._promotable():
            return
        # A committed conf change not applied yet may change who votes: wait for it.
        if self.log.committed > self.log.applied:
            lo = max(self.log.applied + 1, self.log.first_index())
            for e in self.log.slice(lo, self.log.committed + 1):
                if e.kind == EntryKind.CONF_CHANGE:
                    return
        if self.pre_vote and not transfer:
            self._campaign(pre=True)
        else:
            self._campaign(pre=False, transfer=transfer)

    def _campaign(self, pre: bool, transfer: bool = False) -> None:
        if pre:
            self.become_pre_candidate()
            vote_type, term = MT.PRE_VOTE, self.term + 1
        else:
            self.become_candidate()
            vote_type, term = MT.VOTE, self.term
        if self._poll(self.id, True) == "won":
            self._won(pre)
            return
        context = CAMPAIGN_TRANSFER if transfer else b""
        last = self.log.last_index()
        last_term = self.log.last_term()
        for n in _sorted_ids(self.conf.voters):
            if n != self.id:
                self._send(vote_type, n, term=term, index=last, log_term=last_term, context=context)

    def _won(self, pre: bool) -> None:
        if pre:
            self._campaign(pre=False)
        else:
            self.become_leader()
            self._bcast_append()

    def _poll(self, n: NodeId, granted: bool) -> str:
        self._votes.setdefault(n, granted)
        yes = sum(1 for v, g in self._votes.items() if g and v in self.conf.voters)
        no = sum(1 for v, g in self._votes.items() if not g and v in self.conf.voters)
        q = self._quorum()
        if yes >= q:
            return "won"
        if no >= q:
            return "lost"
        return "pending"

    def _handle_vote_request(self, m: Message) -> None:
        resp = MT.PRE_VOTE_RESP if m.type == MT.PRE_VOTE else MT.VOTE_RESP
        can_vote = not self._withholding_votes() and (
            self.vote == m.frm
            or (self.vote is None and self.lead is None)
            or (m.type == MT.PRE_VOTE and m.term > self.term)
        )
        if can_vote and self.log.is_up_to_date(m.index, m.log_term):
            # Grants carry the term asked about, so the candidate counts them.
            self._send(resp, m.frm, term=m.term)
            if m.type == MT.VOTE:
                self.election_elapsed = 0
                self.vote = m.frm
        else:
            self._send(resp, m.frm, reject=True)

    # -- per-role message handling ------------------------------------------------------------

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t in (MT.APPEND, MT.HEARTBEAT, MT.SNAPSHOT):
            self.election_elapsed = 0
            self.lead = m.frm
            if t == MT.APPEND:
                self._handle_append(m)
            elif t == MT.HEARTBEAT:
                self._handle_heartbeat(m)
            else:
                self._handle_snapshot(m)
            if self.catching_up:
                self._note_caught_up()
        elif t == MT.TIMEOUT_NOW:
            if self._promotable():
                self._hup(transfer=True)
        elif t == MT.READ_INDEX_RESP:
            self.read_states.append(ReadState(m.index, m.context))

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MT.APPEND, MT.HEARTBEAT, MT.SNAPSHOT):
            # Someone won this term: follow it.
            self.become_follower(m.term, m.frm)
            self._step_follower(m)
            return
        my_resp = MT.PRE_VOTE_RESP if self._role == PRE_CANDIDATE else MT.VOTE_RESP
        if t != my_resp:
            return
        result = self._poll(m.frm, not m.reject)
        if result == "won":
            self._won(self._role == PRE_CANDIDATE)
        elif result == "lost":
            # Term may have moved with a rejection's higher term already; stay there.
            self.become_follower(self.term, None)

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t == MT.READ_INDEX:
            self._leader_read(m.frm, m.context)
            return
        pr = self.prs.get(m.frm)
        if pr is None:
            return
        if t == MT.APPEND_RESP:
            self._handle_append_resp(m, pr)
        elif t == MT.HEARTBEAT_RESP:
            self._handle_heartbeat_resp(m, pr)
        elif t == MT.SNAPSHOT_RESP:
            self._handle_snapshot_resp(m, pr)

    # -- follower side of replication ----------------------------------------------------------

    def _handle_append(self, m: Message) -> None:
        if m.index == 0 and self._is_blank():
            # Entries from index 1 would not tell us the group's first membership (it is
            # in the leader's snapshot at index 0): ask for the snapshot. A member with
            # a log never refuses an append after index 0, so this refusal is unambiguous.
            self._send(MT.APPEND_RESP, m.frm, index=0, reject=True)
            return
        if m.index < self.log.committed:
            self._send(MT.APPEND_RESP, m.frm, index=self.log.committed)
            return
        last_new = self.log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._send(MT.APPEND_RESP, m.frm, index=last_new)
            return
        # Tell the leader where our log could match: the last index whose term is at
        # most the term of its entry at m.index (skips whole terms per round trip).
        hint_index = min(m.index, self.log.last_index())
        hint_index, hint_term = self.log.find_conflict_by_term(hint_index, m.log_term)
        self._send(
            MT.APPEND_RESP,
            m.frm,
            index=m.index,
            reject=True,
            reject_hint=hint_index,
            log_term=hint_term,
        )

    def _handle_heartbeat(self, m: Message) -> None:
        commit, last = m.commit, self.log.last_index()
        if commit > last and self.catching_up:
            # The leader counts on entries this member lost to the repair: a refusal
            # that says where its log ends makes it send them again.
            self._send(MT.APPEND_RESP, m.frm, index=commit, reject=True, reject_hint=last)
            commit = last
        self.log.commit_to(commit)
        self._send(MT.HEARTBEAT_RESP, m.frm, context=m.context)

    def _handle_snapshot(self, m: Message) -> None:
        chunk = m.snapshot
        if chunk is None:
            return
        if chunk.index <= self.log.committed and not self._is_blank():
            # Already have it (a retransmission after we finished): say where we are.
            self._snap_recv = None
            self._send(MT.APPEND_RESP, m.frm, index=self.log.committed)
            return
        key = (m.frm, m.term, chunk.index, chunk.term)
        recv = self._snap_recv
        held = recv[1] if recv is not None and recv[0] == key else None
        if held is not None and m.offset < held:
            # A duplicate of a chunk we hold: don't restart, just report our position.
            self._send(MT.SNAPSHOT_RESP, m.frm, index=chunk.index, offset=held)
            return
        if m.offset != 0 and m.offset != held:
            # A gap (a chunk lost or overtaken, or we restarted mid-install): ask from
            # what we hold. A rejection, so the leader (which pipelines chunks) can tell
            # it from an acknowledgement and go back.
            self._send(
                MT.SNAPSHOT_RESP, m.frm, index=chunk.index, offset=held or 0, reject=True
            )
            return
        # The chunk goes to the application's file; the answer leaves after it is
        # written (the same Ready), so the leader never moves past unwritten bytes.
        received = m.offset + len(chunk.data)
        self.snapshot_chunks.append(SnapshotChunk(m.offset, chunk.data, m.done))
        if not m.done:
            self._snap_recv = (key, received)
            self._send(MT.SNAPSHOT_RESP, m.frm, index=chunk.index, offset=received)
            return
        self._snap_recv = None
        snap = Snapshot(chunk.index, chunk.term, chunk.conf)
        if self._restore(snap):
            self._send(MT.APPEND_RESP, m.frm, index=self.log.last_index())
        else:
            self._send(MT.APPEND_RESP, m.frm, index=self.log.committed)

    def _is_blank(self) -> bool:
        """A member that joined with empty storage: it lacks even the first membership."""
        return not self.conf.voters and not self.conf.learners and self.log.last_index() == 0

    def _restore(self, snap: Snapshot) -> bool:
        blank = self._is_blank()
        if snap.index <= self.log.committed and not blank:
            return False
        if not blank and self.log.match_term(snap.index, snap.term):
            # Our log already has the snapshot's last entry: just commit up to it.
            self.log.commit_to(snap.index)
            return False
        self.log.restore(snap)
        self.conf = snap.conf
        return True

    # -- leader side of replication -----------------------------------------------------------

    def _append_entry(self, items: list[tuple[bytes, EntryKind]]) -> None:
        li = self.log.last_index()
        ents = [Entry(li + 1 + i, self.term, data, kind) for i, (data, kind) in enumerate(items)]
        last = self.log.append(ents)
        self.prs[self.id].maybe_update(last)
        self._maybe_commit()

    def _maybe_commit(self) -> bool:
        voters = self.conf.voters
        matches = sorted((self.prs[n].match for n in voters if n in self.prs), reverse=True)
        q = self._quorum()
        if len(matches) < q:
            return False
        # Only an entry of our own term is committed by counting (Figure 8).
        if not self.log.maybe_commit(matches[q - 1], self.term):
            return False
        if self._reads_before_commit and self._committed_in_term():
            pending, self._reads_before_commit = self._reads_before_commit, []
            for frm, ctx in pending:
                self._leader_read(frm, ctx)
        return True

    def _committed_in_term(self) -> bool:
        return self.log.term_or_zero(self.log.committed) == self.term

    def _bcast_append(self) -> None:
        for n in self.prs:
            if n != self.id:
                self._send_append(n)

    def _bcast_commit(self) -> None:
        """The commit index advanced: tell the followers, frugally.

        Entries waiting to be sent carry it, and followers still probing get their
        probe as before. A replicating follower with nothing new to receive learns it
        from the next heartbeat (or append): no client waits on a follower's apply
        (reads go through the leader, and a follower's read barrier is confirmed by a
        heartbeat round that carries the commit index), while an empty append and its
        answer per follower per agreement cost the cluster a third of its messages.
        """
        last = self.log.last_index()
        for n, pr in self.prs.items():
            if n == self.id:
                continue
            if pr.state is not ProgressState.REPLICATE:
                self._send_append(n)
            elif pr.next <= last:
                self._send_append(n, send_if_empty=False)

    def _send_append(self, to: NodeId, send_if_empty: bool = True) -> bool:
        pr = self.prs[to]
        if pr.is_paused():
            return False
        prev = pr.next - 1
        try:
            prev_term = self.log.term(prev)
            ents = self.log.entries(pr.next, self.max_msg_entries, self.max_msg_bytes)
        except CompactedError:
            return self._send_snapshot(to, pr)
        if not ents and not send_if_empty:
            return False
        self._send(
            MT.APPEND,
            to,
            index=prev,
            log_term=prev_term,
            entries=tuple(ents),
            commit=self.log.committed,
        )
        pr.append_round = self._hb_round
        if pr.state is ProgressState.REPLICATE:
            if ents:
                last = ents[-1].index
                pr.next = last + 1
                pr.inflights.add(last)
        elif pr.state is ProgressState.PROBE:
            pr.probe_sent = True
        return True

    def _send_snapshot(self, to: NodeId, pr: Progress) -> bool:
        if not pr.recent_active:
            return False
        try:
            snap = self.log.snapshot()
        except SnapshotTemporarilyUnavailable:
            return False  # asked again on the follower's next answer
        pr.become_snapshot(snap)
        self._send_snapshot_chunks(to, pr)
        return True

    def _send_snapshot_chunks(self, to: NodeId, pr: Progress) -> None:
        """Send chunks from ``pr.snap_next`` while the window has room.

        Chunks are pipelined: up to ``max_snapshot_inflight`` of them may be out beyond
        what the follower confirmed, so a transfer takes about
        ``size / (chunk * window)`` round trips, not ``size / chunk``. (Sending one chunk
        per round trip made a large snapshot take so long that the application had
        compacted past it before it arrived: the follower then needed a newer snapshot,
        from scratch, for ever.) An empty snapshot is one empty chunk.
        """
        snap = pr.snap
        assert snap is not None
        size = len(snap.data)
        step = self.snapshot_chunk_bytes
        window_end = pr.snap_offset + step * self.max_snapshot_inflight
        while pr.snap_next < max(size, 1) and pr.snap_next < window_end:
            off = pr.snap_next
            data = snap.data[off : off + step]
            self._send(
                MT.SNAPSHOT,
                to,
                snapshot=Snapshot(snap.index, snap.term, snap.conf, data),
                offset=off,
                done=off + len(data) >= size,
            )
            pr.snap_next = off + max(len(data), 1)
            pr.snap_idle = 0

    def _resend_snapshot_from(self, to: NodeId, pr: Progress, offset: int) -> None:
        """Go back to ``offset`` (the follower holds exactly that much) and resend."""
        pr.snap_offset = offset
        pr.snap_next = offset
        self._send_snapshot_chunks(to, pr)

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        if m.reject:
            if m.index == 0:
                if pr.state is not ProgressState.SNAPSHOT:
                    self._send_snapshot(m.frm, pr)
                return
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, next_probe):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.frm)
            return
        updated = pr.maybe_update(m.index)
        if pr.state is ProgressState.SNAPSHOT and m.index >= pr.pending_snapshot:
            # Installed (also a snapshot at index 0, which moves no match index).
            pr.become_probe()
            pr.become_replicate()
            updated = True
        if not updated:
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        if self._maybe_commit():
            self._bcast_commit()
        # Pipelining: keep sending while the window has room.
        while m.frm in self.prs and self._send_append(m.frm, send_if_empty=False):
            pass
        if m.frm == self.lead_transferee and pr.match == self.log.last_index():
            self._send_timeout_now(m.frm)

    def _handle_heartbeat_resp(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        pr.probe_sent = False
        pr.acked_round = max(pr.acked_round, _decode_round(m.context))
        if pr.state is ProgressState.REPLICATE and pr.inflights.full():
            pr.inflights.free_first_one()
        if pr.state is ProgressState.SNAPSHOT:
            # A chunk (or its answer) may be lost: resend after a quiet spell.
            if pr.snap is not None and pr.snap_idle >= max(2, self.election_tick // 2):
                pr.snap_rewound = None
                self._resend_snapshot_from(m.frm, pr, pr.snap_offset)
        elif pr.match < self.log.last_index():
            if pr.next <= self.log.last_index():
                # Entries not sent yet (a probe's answer is awaited, or the window was
                # full): send them.
                self._send_append(m.frm)
            elif _decode_round(m.context) > pr.append_round:
                # Everything was sent, and the follower answered a heartbeat sent after
                # our last append, yet did not acknowledge it: that append or its
                # answer was lost (or, on a reordering network, is late). Probe with an
                # empty append (a gap makes the follower refuse it, and we back off).
                # While the append may still be on its way, a heartbeat answer sends
                # nothing: that was most of the empty appends per agreement.
                self._send_append(m.frm)
        self._release_reads()

    def _handle_snapshot_resp(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        if pr.state is not ProgressState.SNAPSHOT or pr.snap is None:
            return
        if m.index != pr.snap.index:
            return
        if not m.reject:
            # The follower holds m.offset bytes. Only an answer that moves the offset
            # opens the window further; duplicates and stale answers send nothing.
            if m.offset > pr.snap_offset:
                pr.snap_offset = m.offset
                pr.snap_next = max(pr.snap_next, m.offset)
                self._send_snapshot_chunks(m.frm, pr)
            return
        # A chunk arrived past what the follower holds (one before it was lost or is
        # late), or the follower lost what it had (restart): it holds exactly m.offset.
        # Go back there once per position; a chunk lost again is left to the timer.
        lost = m.offset < pr.snap_offset
        if lost or (m.offset < pr.snap_next and pr.snap_rewound != m.offset):
            pr.snap_rewound = m.offset
            self._resend_snapshot_from(m.frm, pr, m.offset)
        elif m.offset > pr.snap_offset:
            pr.snap_offset = m.offset

    def _send_timeout_now(self, to: NodeId) -> None:
        self._sent_timeout_now = True
        self._send(MT.TIMEOUT_NOW, to)

    def _bcast_heartbeat(self) -> None:
        self._hb_round += 1
        self._round_sent.append((self._hb_round, self._now))
        # Rounds sent longer than an election timeout ago can grant no lease any more.
        while len(self._round_sent) > 1 and self._round_sent[0][1] < self._now - self.election_tick:
            self._round_sent.popleft()
        ctx = _encode_round(self._hb_round)
        for n, pr in self.prs.items():
            if n != self.id:
                commit = min(pr.match, self.log.committed)
                self._send(MT.HEARTBEAT, n, commit=commit, context=ctx)

    def _quorum_round(self) -> int | None:
        """The latest heartbeat round answered by a quorum of voters (None: we alone are one)."""
        rounds = []
        for n in self.conf.voters:
            if n == self.id:
                continue
            pr = self.prs.get(n)
            rounds.append(pr.acked_round if pr is not None else 0)
        rounds.sort(reverse=True)
        need = self._quorum() - (1 if self.id in self.conf.voters else 0)
        if need <= 0:
            return None
        if need > len(rounds):
            return 0
        return rounds[need - 1]

    # -- ReadIndex --------------------------------------------------------------------------

    def _leader_read(self, frm: NodeId, context: bytes) -> None:
        if not self._committed_in_term():
            # Our commit index may lag the previous leader's until our no-op commits.
            self._reads_before_commit.append((frm, context))
            return
        if self._quorum_round() is None:
            self._answer_read(frm, context, self.log.committed)
            return
        self._reads.append(_ReadRequest(frm, context, self.log.committed, self._hb_round + 1))
        self._bcast_heartbeat()

    def _release_reads(self) -> None:
        if not self._reads:
            return
        r = self._quorum_round()
        while self._reads and (r is None or self._reads[0].round <= r):
            req = self._reads.pop(0)
            self._answer_read(req.frm, req.context, req.index)

    def _answer_read(self, frm: NodeId, context: bytes, index: int) -> None:
        if frm == self.id:
            self.read_states.append(ReadState(index, context))
        else:
            self._send(MT.READ_INDEX_RESP, frm, index=index, context=context)

    # -- membership ----------------------------------------------------------------------------

    def _apply_conf_change(self, change: ConfChange) -> None:
        self.conf = changed_conf(self.conf, change)
        if self._role != LEADER:
            return
        members = self.conf.voters | self.conf.learners
        for n in _sorted_ids(members):
            if n not in self.prs:
                pr = Progress(self.log.last_index() + 1, self.max_inflight)
                # New members count as active, or check-quorum could depose us before
                # they had a chance to answer.
                pr.recent_active = True
                self.prs[n] = pr
            self.prs[n].is_learner = n in self.conf.learners
        for n in list(self.prs):
            if n not in members:
                del self.prs[n]
        if self.id not in self.conf.voters:
            # Removed (or demoted): hand over to the most up-to-date voter, and step down.
            best = None
            for n in _sorted_ids(self.conf.voters):
                pr = self.prs.get(n)
                if pr is not None and pr.match == self.log.last_index():
                    best = n
                    break
            if best is not None:
                self._send_timeout_now(best)
            self.become_follower(self.term, None)
            return
        if self.lead_transferee is not None and self.lead_transferee not in self.conf.voters:
            self.lead_transferee = None
        if self._maybe_commit():
            self._bcast_commit()
        else:
            for n in self.prs:
                if n != self.id:
                    self._send_append(n, send_if_empty=False)

    # -- sending ---------------------------------------------------------------------------

    def _send(self, type: MessageType, to: NodeId, term: int | None = None, **fields) -> None:
        self.msgs.append(
            Message(
                type=type,
                frm=self.id,
                to=to,
                term=self.term if term is None else term,
                **fields,
            )
        )


def changed_conf(conf: ConfState, change: ConfChange) -> ConfState:
    """``conf`` after ``change`` (changes that make no sense leave it as it is)."""
    voters, learners = set(conf.voters), set(conf.learners)
    node = change.node
    if change.kind == ConfChangeKind.ADD_LEARNER:
        if node not in voters:
            learners.add(node)
    elif change.kind == ConfChangeKind.PROMOTE:
        if node in learners:
            learners.discard(node)
            voters.add(node)
    else:
        voters.discard(node)
        learners.discard(node)
    return ConfState(frozenset(voters), frozenset(learners))
