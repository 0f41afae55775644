"""A seeded, deterministic simulation of a Raft group, and the invariants it must keep.

`SimCluster` drives N `RaftCore` members over a simulated network and simulated disks:

* **Time** is a tick counter. ``tick()`` delivers the messages that are due, then ticks
  every live member. No wall clock, no reactor, no global ``random``: one
  ``random.Random(seed)`` drives the network, and each core gets its own
  ``random.Random`` derived from the seed, the member id and its incarnation, so a run
  is a pure function of ``(seed, config, steps)``.
* **The network** delays every message by ``delay`` ticks (inclusive range), drops,
  duplicates and — when ``reorder`` is on — reorders them; ``partition(groups)`` cuts
  every link between groups (also for messages already in flight). Messages to a
  crashed member are lost.
* **The disk** of a member is its `MemoryStorage` (written only with what a Ready asks
  to persist, in the steps of `timemachine.raft.disk.MemberDisk.persist`: an installed
  snapshot, then the entries in one WAL batch whose first record carries the hard
  state, then the hard-state file) plus its state machine. ``crash(i)`` throws the core
  away; ``restart(i)`` builds a new core from the disk alone. ``crash(i, at=...)`` arms
  a crash *inside* the next Ready handling (or the next one holding a conf change or a
  snapshot, with ``when=``), so the parts of a Ready that were not yet persisted, sent
  or applied are lost; what the disk holds then is what ``MemberDisk.load`` would read
  back (`CRASH_POINTS`).
* **Clocks** run at different rates with ``max_clock_drift`` > 0: each member ticks at
  its own rate in ``[1 / (1 + max_clock_drift), 1]`` ticks per simulated tick (drawn
  from its own seeded generator), and the cores are told that bound for their leases.
* **The state machine** records the data of applied NORMAL entries (its *applied
  history*; leader no-ops and conf changes only move ``applied_index``). Every
  ``snapshot_every`` applied entries it is snapshotted and the log is compacted, so a
  lagging member has to be sent an InstallSnapshot. By default it is durable on every
  apply (as the vnode store commits ``applied_index`` with the data, DESIGN.md); with
  ``durable_state_machine=False`` it survives a crash only as its last snapshot and
  the core re-delivers the rest.
* **Membership**: ``add_node()`` starts an empty member and asks the leader to add it
  as a learner, then — once it has caught up — to promote it; ``remove_node(i)`` asks
  the leader to remove it. The cluster keeps re-asking whoever is leader until the
  wanted membership is reached, because a proposal can be lost with its leader.

``check()`` raises `AssertionError` if any of these ever failed: at most one leader per
term; log matching (two entries with the same index and term hold the same data and
follow the same term); leader completeness (a leader's log holds every entry that was
committed in an earlier term); state-machine safety (every member applies the same
entry at an index, applies each index once and in order, so applied histories are
prefixes of one another); commit indexes and persisted terms never go back; applied
entries never change. Every tick also checks the leases: at most one member holds one,
and a holder has applied every entry committed before that tick. Its message carries
the seed and the trace of steps taken, which `SimCluster.replay` runs again to the same
failure::

    c = SimCluster(n=5, seed=42)
    c.run_until(lambda: c.leader() is not None, 100)
    c.propose(b"x")
    c.partition([[0, 1], [2, 3, 4]])
    ...
    c.check()
"""

from __future__ import annotations

import heapq
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from timemachine.raft.core import RaftCore
from timemachine.raft.hardstate import latest
from timemachine.raft.storage import MemoryStorage
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
    RaftError,
    ReadState,
    Ready,
    Snapshot,
)

__all__ = [
    "CRASH_POINTS",
    "CRASH_WHEN",
    "ChaosResult",
    "SimCluster",
    "chaos_run",
    "decode_history",
    "encode_history",
]

#: Where an armed crash stops the handling of a Ready (see `SimCluster.crash`), with
#: the steps of ``MemberDisk.persist``: nothing of it done; only an installed snapshot
#: persisted (the log it replaces still on disk: loading completes the install); the
#: WAL batch torn, only the first half of the entries durable (with the hard state
#: their first record carries, which vouches only for what survived); the WAL batch
#: durable, the hard-state file not replaced yet; all of it persisted; persisted and
#: sent; persisted, sent and applied, but the core not told (no ``advance()``).
CRASH_POINTS = (
    "before_persist",
    "after_snapshot",
    "torn_entries",
    "after_entries",
    "after_persist",
    "after_send",
    "after_apply",
)

#: The Readys a crash armed with ``when=`` waits for.
CRASH_WHEN: dict[str, Callable[[Ready], bool]] = {
    "conf_change": lambda rd: any(e.kind == EntryKind.CONF_CHANGE for e in rd.entries),
    "snapshot": lambda rd: rd.snapshot is not None,
}

# The crash points the soak first drew from (see `chaos_run`).
_FIRST_SOAK_CRASH_POINTS = (
    "before_persist",
    "after_entries",
    "after_persist",
    "after_send",
    "after_apply",
)

# How far a crash point gets through persisting a Ready.
_PERSIST_STEP = {"after_snapshot": "snapshot", "torn_entries": "torn", "after_entries": "wal"}

_RECORD = struct.Struct(">QQI")


def encode_history(records: Iterable[tuple[int, int, bytes]]) -> bytes:
    """Encode an applied history, ``(index, term, data)`` records, as snapshot data."""
    out = bytearray()
    for index, term, data in records:
        out += _RECORD.pack(index, term, len(data))
        out += data
    return bytes(out)


def decode_history(blob: bytes) -> list[tuple[int, int, bytes]]:
    """The inverse of `encode_history`."""
    records = []
    pos = 0
    while pos < len(blob):
        index, term, size = _RECORD.unpack_from(blob, pos)
        pos += _RECORD.size
        records.append((index, term, bytes(blob[pos : pos + size])))
        pos += size
    return records


@dataclass
class _StateMachine:
    """What a member has applied: its index and the history of NORMAL entries."""

    applied_index: int = 0
    records: list[tuple[int, int, bytes]] = field(default_factory=list)

    def copy(self) -> _StateMachine:
        return _StateMachine(self.applied_index, list(self.records))


@dataclass
class _Member:
    """One simulated server: its disk (storage + state machine) and, while up, a core."""

    id: int
    storage: MemoryStorage
    sm: _StateMachine
    core: RaftCore | None = None
    incarnation: int = 0
    # The state machine as last snapshotted: what survives a crash when the state
    # machine is not durable on every apply.
    sm_at_snapshot: _StateMachine = field(default_factory=_StateMachine)
    # Highest commit index the current incarnation has shown (it must never go back).
    seen_commit: int = 0
    # What the disk holds (the persisted hard state never goes back either).
    disk_hard_state: HardState = field(default_factory=HardState)
    read_states: list[ReadState] = field(default_factory=list)
    armed_crash: tuple[str, Callable[[Ready], bool] | None] | None = None
    # Membership the cluster drives towards: "voter", "removed", or None (founder).
    wanted: str | None = None
    retired: bool = False  # removed from the group and shut down for good
    last_conf_proposal: int = -(10**9)
    verified_history: int = 0  # how much of the applied history check() compared
    # Its clock: core ticks per simulated tick, and the fraction of a tick accrued.
    rate: float = 1.0
    clock: float = 0.0


@dataclass(order=True)
class _InFlight:
    deliver_at: int
    seq: int
    msg: Message = field(compare=False)


class SimCluster:
    """N Raft cores, a simulated network and simulated disks, deterministic for a seed.

    Members are numbered ``0 .. n-1``; `add_node` hands out the next numbers. Every
    public step is recorded in `trace`; `replay` runs a trace again. The core options
    (election and heartbeat ticks, batch bounds by count and bytes, ``max_clock_drift``)
    are passed to every core; ``max_clock_drift`` also sets how far apart the members'
    clock rates are drawn (`set_clock_rate` sets one).
    """

    def __init__(
        self,
        n: int = 5,
        seed: int = 42,
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
        max_clock_drift: float = 0.0,
        snapshot_every: int | None = None,
        durable_state_machine: bool = True,
        auto_check: bool = True,
        catch_up_lag: int = 4,
    ) -> None:
        self.seed = seed
        self._core_options = {
            "election_tick": election_tick,
            "heartbeat_tick": heartbeat_tick,
            "pre_vote": pre_vote,
            "check_quorum": check_quorum,
            "max_msg_entries": max_msg_entries,
            "max_msg_bytes": max_msg_bytes,
            "max_committed_bytes": max_committed_bytes,
            "max_inflight": max_inflight,
            "snapshot_chunk_bytes": snapshot_chunk_bytes,
            "max_clock_drift": max_clock_drift,
        }
        self.config = {
            "n": n,
            **self._core_options,
            "snapshot_every": snapshot_every,
            "durable_state_machine": durable_state_machine,
            "auto_check": auto_check,
            "catch_up_lag": catch_up_lag,
        }
        self.election_tick = election_tick
        self.max_clock_drift = max_clock_drift
        self.snapshot_every = snapshot_every
        self.durable_state_machine = durable_state_machine
        self.auto_check = auto_check
        # How far behind the leader's commit a learner may be and still be promoted.
        self.catch_up_lag = catch_up_lag
        self.rng = random.Random(seed)
        self.now = 0
        self.trace: list[tuple] = []

        # network
        self.drop = 0.0
        self.duplicate = 0.0
        self.delay = (1, 1)
        self.reorder = False
        self._groups: dict[int, int] | None = None  # member -> partition group
        self._in_flight: list[_InFlight] = []
        self._seq = 0
        self._link_clock: dict[tuple[int, int], int] = {}
        #: messages handed to the network, by type
        self.sent: Counter = Counter()
        #: messages that reached a live member, by type
        self.delivered: Counter = Counter()
        #: messages lost (drop, partition, crashed or unknown receiver)
        self.lost = 0
        #: entries applied, summed over members (no-ops and conf changes included)
        self.applied_entries = 0

        # invariants
        self.violations: list[str] = []
        self._leader_of_term: dict[int, int] = {}
        self._entry_at: dict[tuple[int, int], tuple[int, bytes, int | None]] = {}
        self._applied_at: dict[int, tuple[int, int, bytes]] = {}  # index -> term, kind, data
        self._applied_hi = 0
        self._index_of_data: dict[bytes, int] = {}
        self._reported: set[tuple[int, int]] = set()  # (term, leader) already reported
        self._commit_term: dict[int, int] = {}
        self._commit_tagged = 0
        self._completeness_ptr: dict[tuple[int, int, int], int] = {}

        voters = frozenset(range(n))
        self.members: dict[int, _Member] = {}
        self._next_id = n
        for i in range(n):
            self.members[i] = self._new_member(i, voters)
            self._start(self.members[i])

    # ------------------------------------------------------------------ replay

    @classmethod
    def replay(cls, seed: int, trace: list[tuple], **config: Any) -> SimCluster:
        """Run ``trace`` (from `trace` of an earlier run with the same seed and config)
        again; the invariant violation it led to is raised again by its ``check``."""
        c = cls(seed=seed, **config)
        for step in trace:
            name, *args = step
            if name == "tick":
                for _ in range(args[0]):
                    c.tick()
            elif name == "set_network":
                c.set_network(**args[0])
            elif name == "crash":
                c.crash(*args)
            else:
                getattr(c, name)(*args)
        c.check()
        return c

    def _record(self, *step: Any) -> None:
        # Runs of ticks are folded into one step so a trace stays readable.
        if step[0] == "tick" and self.trace and self.trace[-1][0] == "tick":
            self.trace[-1] = ("tick", self.trace[-1][1] + 1)
        else:
            self.trace.append(step)

    # ------------------------------------------------------------------ members

    def _new_member(self, node_id: int, voters: frozenset) -> _Member:
        # A founding member's disk starts with the membership and nothing else, as a
        # freshly bootstrapped server's would; a joining member's with nothing at all.
        storage = MemoryStorage(ConfState(voters=voters))
        m = _Member(node_id, storage, _StateMachine())
        if self.max_clock_drift:
            # Its own generator: the network's draws stay what they were without drift.
            rng = random.Random(f"{self.seed}/clock/{node_id}")
            slowest = 1 / (1 + self.max_clock_drift)
            m.rate = rng.choice((slowest, 1.0, rng.uniform(slowest, 1.0)))
        return m

    def _start(self, m: _Member) -> None:
        m.incarnation += 1
        snap = m.storage.snapshot()
        if not self.durable_state_machine:
            m.sm = m.sm_at_snapshot.copy()
        if snap.index > m.sm.applied_index:
            # The log was compacted past what the state machine holds (a crash between
            # persisting and installing a snapshot): the application loads the
            # snapshot itself before it starts the core, as etcd's raftexample does.
            self._install(m, snap)
        hs, _ = m.storage.initial_state()
        m.disk_hard_state = hs
        m.seen_commit = hs.commit
        rng = random.Random(f"{self.seed}/{m.id}/{m.incarnation}")
        m.core = RaftCore(m.id, m.storage, rng, applied=m.sm.applied_index, **self._core_options)
        m.read_states = []
        self._drain(m)

    def _live(self) -> list[_Member]:
        return [m for _, m in sorted(self.members.items()) if m.core is not None]

    # ------------------------------------------------------------------ queries

    def leader(self) -> int | None:
        """The live leader of the highest term, or None. (A deposed leader cut off in a
        minority may still believe it leads a lower term until check-quorum stops it.)"""
        best = None
        for m in self._live():
            if m.core.state == "leader" and (best is None or m.core.term > best.core.term):
                best = m
        return None if best is None else best.id

    def leaders(self) -> list[int]:
        """Every live member that believes it is leader."""
        return [m.id for m in self._live() if m.core.state == "leader"]

    def state(self, i: int) -> str:
        """The role of member ``i``: "leader", "follower", "candidate" or "learner", or
        "crashed" while it is down. A pre-vote candidate counts as a candidate here;
        ``members[i].core.state`` tells the two apart."""
        m = self.members[i]
        if m.core is None:
            return "crashed"
        return "candidate" if m.core.state == "pre_candidate" else m.core.state

    def term(self, i: int) -> int:
        """Member ``i``'s current term (its persisted one while it is down)."""
        m = self.members[i]
        return m.disk_hard_state.term if m.core is None else m.core.term

    def commit_index(self, i: int) -> int:
        """Member ``i``'s commit index (the persisted one while it is down)."""
        m = self.members[i]
        return m.disk_hard_state.commit if m.core is None else m.core.commit_index

    def applied(self, i: int) -> list[bytes]:
        """The applied history of member ``i``: data of its applied NORMAL entries."""
        return [data for _, _, data in self.members[i].sm.records]

    def applied_index(self, i: int) -> int:
        """The index of the last entry member ``i`` applied."""
        return self.members[i].sm.applied_index

    def conf(self, i: int) -> ConfState:
        """Member ``i``'s applied membership."""
        m = self.members[i]
        return m.storage.initial_state()[1] if m.core is None else m.core.conf

    def alive(self) -> list[int]:
        """Ids of the members that are up."""
        return [m.id for m in self._live()]

    def voters(self) -> frozenset:
        """The membership as the leader (or else the lowest live member) has applied it."""
        lead = self.leader()
        live = self._live()
        if lead is None and not live:
            return frozenset()
        return self.conf(lead if lead is not None else live[0].id).voters

    def lease_valid(self, i: int) -> bool:
        """Whether member ``i`` holds a valid leader lease."""
        m = self.members[i]
        return m.core is not None and m.core.lease_valid()

    def read_states(self, i: int) -> list[ReadState]:
        """ReadIndex answers member ``i`` got since it (re)started."""
        return list(self.members[i].read_states)

    def message_count(self, *types: MessageType) -> int:
        """Messages sent so far, of the given types (all types when none given)."""
        if not types:
            return sum(self.sent.values())
        return sum(self.sent[t] for t in types)

    def n_committed(self, data: bytes) -> int:
        """How many members have applied ``data`` (6.824's ``nCommitted``)."""
        return sum(1 for m in self.members.values() if data in self.applied(m.id))

    # ------------------------------------------------------------------ steps

    def tick(self) -> None:
        """One tick: deliver the due messages, then tick every live member (each as
        often as its clock rate says: once, or not at all this time), then check the
        leases."""
        self._record("tick", 1)
        self.now += 1
        committed_before = self._commit_tagged
        while self._in_flight and self._in_flight[0].deliver_at <= self.now:
            self._deliver(heapq.heappop(self._in_flight).msg)
        for m in self._live():
            m.clock += m.rate
            if m.clock >= 1 and m.core is not None:  # an armed crash may have stopped it
                m.clock -= 1
                m.core.tick()
                self._drain(m)
        self._drive_membership()
        self._check_leases(committed_before)
        if self.auto_check:
            self.check()

    def run(self, ticks: int) -> None:
        """``ticks`` ticks."""
        for _ in range(ticks):
            self.tick()

    def run_until(self, predicate: Callable[[], bool], max_ticks: int) -> bool:
        """Tick until ``predicate()`` holds (checked before each tick too); False if it
        did not within ``max_ticks``."""
        for _ in range(max_ticks):
            if predicate():
                return True
            self.tick()
        return predicate()

    def propose(self, data: bytes) -> bool:
        """Propose ``data`` to the current leader; False if there is none or it refused."""
        self._record("propose", data)
        lead = self.leader()
        return lead is not None and self.propose_to(lead, data, _record=False)

    def propose_to(self, i: int, data: bytes, *, _record: bool = True) -> bool:
        """Propose ``data`` to member ``i`` whatever it believes it is."""
        if _record:
            self._record("propose_to", i, data)
        m = self.members[i]
        if m.core is None:
            return False
        ok = m.core.propose(data)
        self._drain(m)
        return ok

    def transfer_leadership(self, to: int) -> bool:
        """Ask the current leader to hand leadership to ``to``."""
        self._record("transfer_leadership", to)
        lead = self.leader()
        if lead is None:
            return False
        m = self.members[lead]
        ok = m.core.transfer_leadership(to)
        self._drain(m)
        return ok

    def read_index(self, i: int, context: bytes) -> bool:
        """Ask member ``i`` for a ReadIndex; the answer shows in `read_states`."""
        self._record("read_index", i, context)
        m = self.members[i]
        if m.core is None:
            return False
        ok = m.core.read_index(context)
        self._drain(m)
        return ok

    def partition(self, groups: list[list[int]]) -> None:
        """Cut every link between the groups; a member in no group is cut off alone."""
        self._record("partition", [list(g) for g in groups])
        self._groups = {}
        for g, members in enumerate(groups):
            for i in members:
                self._groups[i] = g

    def heal(self) -> None:
        """Undo `partition`."""
        self._record("heal")
        self._groups = None

    def set_network(
        self,
        drop: float = 0.0,
        duplicate: float = 0.0,
        delay: tuple[int, int] = (1, 1),
        reorder: bool = False,
    ) -> None:
        """Set the loss and duplication probabilities, the delay range (in ticks, at
        least 1) and whether messages on one link may overtake one another."""
        self._record(
            "set_network",
            {"drop": drop, "duplicate": duplicate, "delay": tuple(delay), "reorder": reorder},
        )
        if delay[0] < 1 or delay[1] < delay[0]:
            raise ValueError(f"bad delay range {delay!r}")
        self.drop, self.duplicate, self.delay, self.reorder = drop, duplicate, tuple(delay), reorder

    def set_clock_rate(self, i: int, rate: float) -> None:
        """Make member ``i``'s clock run at ``rate`` core ticks per simulated tick; the
        rate must be within the drift the cores assume, ``[1 / (1 + drift), 1]``."""
        self._record("set_clock_rate", i, rate)
        slowest = 1 / (1 + self.max_clock_drift)
        if not slowest - 1e-12 <= rate <= 1:
            raise ValueError(f"clock rate {rate} outside [{slowest}, 1]")
        self.members[i].rate = rate

    def crash(self, i: int, at: str | None = None, when: str | None = None) -> None:
        """Crash member ``i``: its core and unpersisted state are gone, its disk stays.

        With ``at`` (one of `CRASH_POINTS`) the crash is armed instead, and happens
        in the middle of the member's next Ready handling, at that point; with
        ``when`` (a key of `CRASH_WHEN`) of the next Ready holding a conf change or a
        snapshot.
        """
        self._record("crash", i, at, when)
        m = self.members[i]
        if at is not None:
            if at not in CRASH_POINTS:
                raise ValueError(f"unknown crash point {at!r}")
            if when is not None and when not in CRASH_WHEN:
                raise ValueError(f"unknown crash condition {when!r}")
            m.armed_crash = (at, None if when is None else CRASH_WHEN[when])
            return
        m.core = None
        m.armed_crash = None

    def crash_when(self, i: int, at: str, when: Callable[[Ready], bool]) -> None:
        """Arm a crash of member ``i`` at point ``at`` of the first Ready for which
        ``when(ready)`` holds (not recorded in the trace: predicates do not replay)."""
        if at not in CRASH_POINTS:
            raise ValueError(f"unknown crash point {at!r}")
        self.members[i].armed_crash = (at, when)

    def disarm_crashes(self) -> None:
        """Cancel every crash armed by `crash` ``at=`` or `crash_when` not fired yet."""
        self._record("disarm_crashes")
        for m in self.members.values():
            m.armed_crash = None

    def restart(self, i: int) -> None:
        """Start member ``i`` again from its disk (no-op if it is up or retired)."""
        self._record("restart", i)
        m = self.members[i]
        if m.core is None and not m.retired:
            self._start(m)

    def add_node(self) -> int:
        """Start a new, empty member and have it added (learner, caught up, promoted)."""
        self._record("add_node")
        node_id = self._next_id
        self._next_id += 1
        m = self._new_member(node_id, frozenset())
        m.wanted = "voter"
        self.members[node_id] = m
        self._start(m)
        self._drive_membership()
        return node_id

    def remove_node(self, i: int) -> None:
        """Have member ``i`` removed from the group (it is shut down once it is out)."""
        self._record("remove_node", i)
        self.members[i].wanted = "removed"
        self._drive_membership()

    def membership_settled(self) -> bool:
        """Whether the leader's applied membership is what add/remove asked for."""
        lead = self.leader()
        if lead is None:
            return False
        conf = self.members[lead].core.conf
        for m in self.members.values():
            if m.wanted == "voter" and m.id not in conf.voters:
                return False
            if m.wanted == "removed" and (m.id in conf.voters or m.id in conf.learners):
                return False
        return True

    def _drive_membership(self) -> None:
        lead_id = self.leader()
        if lead_id is None:
            return
        lead = self.members[lead_id]
        conf = lead.core.conf
        for m in sorted(self.members.values(), key=lambda m: m.id):
            if m.wanted == "removed" and m.id not in conf.voters | conf.learners:
                if m.id != lead_id and not m.retired:
                    # Out of the group for good: shut it down so it cannot disrupt.
                    m.core = None
                    m.retired = True
                continue
            change = None
            if m.wanted == "voter" and m.id not in conf.voters:
                if m.id not in conf.learners:
                    change = ConfChange(ConfChangeKind.ADD_LEARNER, m.id)
                elif (
                    m.core is not None
                    and m.sm.applied_index + self.catch_up_lag >= lead.core.commit_index
                ):
                    change = ConfChange(ConfChangeKind.PROMOTE, m.id)
            elif m.wanted == "removed":
                change = ConfChange(ConfChangeKind.REMOVE, m.id)
            # Re-ask at most once per election timeout: the core refuses a second
            # change while one is pending, and a lost one is re-asked in time.
            if change is not None and self.now - m.last_conf_proposal >= self.election_tick:
                m.last_conf_proposal = self.now
                lead.core.propose_conf_change(change)
                self._drain(lead)
                return

    # ------------------------------------------------------------------ network

    def _connected(self, a: int, b: int) -> bool:
        if self._groups is None:
            return True
        ga, gb = self._groups.get(a), self._groups.get(b)
        return ga is not None and ga == gb

    def _send(self, msg: Message) -> None:
        self.sent[msg.type] += 1
        if not self._connected(msg.frm, msg.to) or self.rng.random() < self.drop:
            self.lost += 1
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            at = self.now + self.rng.randint(*self.delay)
            if not self.reorder:
                # FIFO per link: never deliver before what was sent on it earlier.
                link = (msg.frm, msg.to)
                at = max(at, self._link_clock.get(link, 0))
                self._link_clock[link] = at
            self._seq += 1
            heapq.heappush(self._in_flight, _InFlight(at, self._seq, msg))

    def _deliver(self, msg: Message) -> None:
        m = self.members.get(msg.to)
        if m is None or m.core is None or not self._connected(msg.frm, msg.to):
            self.lost += 1
            return
        self.delivered[msg.type] += 1
        m.core.step(msg)
        self._drain(m)

    # ------------------------------------------------------------------ the app loop

    def _drain(self, m: _Member) -> None:
        """Handle Readys of ``m`` until it has none, as the Twisted adapter would."""
        while m.core is not None and m.core.has_ready():
            self._observe(m)
            rd = m.core.ready()
            crash_at = None
            if m.armed_crash is not None:
                point, when = m.armed_crash
                if when is None or when(rd):
                    crash_at = point
            if crash_at == "before_persist":
                return self._crash_now(m)
            m.storage.write_chunks(rd.snapshot_chunks)
            if rd.snapshot is not None:
                rd = replace(rd, snapshot=m.storage.received(rd.snapshot))
            self._persist(m, rd, _PERSIST_STEP.get(crash_at, "all"))
            if crash_at in _PERSIST_STEP or crash_at == "after_persist":
                return self._crash_now(m)
            for msg in rd.messages:
                self._send(msg)
            if crash_at == "after_send":
                return self._crash_now(m)
            if rd.snapshot is not None and rd.snapshot.index > 0:
                self._install(m, rd.snapshot)
            for e in rd.committed:
                self._apply(m, e)
            m.read_states.extend(rd.read_states)
            if crash_at == "after_apply":
                return self._crash_now(m)
            m.core.advance()
            self._maybe_snapshot(m)
        self._observe(m)
        return None

    def _crash_now(self, m: _Member) -> None:
        m.core = None
        m.armed_crash = None

    def _persist(self, m: _Member, rd: Ready, upto: str) -> None:
        """Persist ``rd`` as ``MemberDisk.persist`` does, up to step ``upto``: "snapshot",
        "torn" (half the WAL batch), "wal" (the whole batch) or "all" (the file too);
        the disk is left as ``MemberDisk.load`` would read it back."""
        # Even at index 0: a joining member learns the group's first membership from
        # the leader's bootstrap snapshot, which is not in the log. (Stopped right after
        # the snapshot, the disk still holds the old log; loading completes the install.)
        if rd.snapshot is not None:
            m.storage.apply_snapshot(rd.snapshot)
        if upto == "snapshot":
            return
        entries = rd.entries[: len(rd.entries) // 2] if upto == "torn" else rd.entries
        if entries and self._check_new_entries(m, entries):
            m.storage.append(list(entries))
        hs = rd.hard_state
        if hs is None:
            return
        if upto != "all":
            if not entries:
                return
            # Only the WAL batch's first record holds the hard state: it vouches for the
            # commit of the entries of its batch that survived, no further.
            hs = HardState(hs.term, hs.vote, min(hs.commit, entries[-1].index))
        old = m.disk_hard_state
        if hs.term < old.term:
            self._violation(f"member {m.id} persisted term {hs.term} after {old.term}")
        if hs.commit < old.commit:
            self._violation(f"member {m.id} persisted commit {hs.commit} after {old.commit}")
        if hs.term == old.term and old.vote is not None and hs.vote != old.vote:
            self._violation(
                f"member {m.id} changed its vote in term {hs.term}: {old.vote}->{hs.vote}"
            )
        # What loading reads back from the file and the WAL's copy.
        hs = latest(old, hs)
        m.storage.set_hard_state(hs)
        m.disk_hard_state = hs

    def _install(self, m: _Member, snap: Snapshot) -> None:
        """Load ``snap`` into ``m``'s state machine."""
        if snap.index < m.sm.applied_index:
            self._violation(
                f"member {m.id} was handed snapshot {snap.index} below applied "
                f"{m.sm.applied_index} (applied entries would change)"
            )
            return
        records = decode_history(snap.data)
        # What was applied must be a prefix of what the snapshot holds.
        if records[: len(m.sm.records)] != m.sm.records:
            self._violation(f"member {m.id}: snapshot {snap.index} rewrites applied history")
        for index, term, data in records:
            self._register_applied(m, index, term, EntryKind.NORMAL, data)
        m.sm = _StateMachine(snap.index, records)
        m.sm_at_snapshot = m.sm.copy()

    def _apply(self, m: _Member, e: Entry) -> None:
        if e.index != m.sm.applied_index + 1:
            what = "again" if e.index <= m.sm.applied_index else "out of order"
            self._violation(
                f"member {m.id} applied entry {e.index} {what} (applied {m.sm.applied_index})"
            )
            if e.index <= m.sm.applied_index:
                return
        self._register_applied(m, e.index, e.term, e.kind, e.data)
        m.sm.applied_index = e.index
        self.applied_entries += 1
        if e.kind == EntryKind.NORMAL and e.data:
            m.sm.records.append((e.index, e.term, e.data))

    def _register_applied(self, m: _Member, index: int, term: int, kind: int, data: bytes) -> None:
        if kind == EntryKind.NORMAL and data:
            # The sim's proposals are unique, so one payload at two indexes means a
            # command was applied twice.
            first = self._index_of_data.setdefault(data, index)
            if first != index:
                self._violation(
                    f"member {m.id} applied {data!r} at {index}, already applied at {first}"
                )
        known = self._applied_at.get(index)
        if known is None:
            self._applied_at[index] = (term, int(kind), data)
            while self._applied_hi + 1 in self._applied_at:
                self._applied_hi += 1
        elif known[0] != term or (kind == EntryKind.NORMAL and known[2] != data):
            self._violation(
                f"state machine safety: member {m.id} applied {(term, data)!r} at {index}, "
                f"another applied {(known[0], known[2])!r}"
            )

    def _maybe_snapshot(self, m: _Member) -> None:
        if self.snapshot_every is None or m.core is None:
            return
        applied = m.sm.applied_index
        if applied - m.storage.snapshot().index < self.snapshot_every:
            return
        if applied > m.storage.last_index():
            return
        snap = m.storage.create_snapshot(applied, m.core.conf, encode_history(m.sm.records))
        m.storage.compact(applied)
        m.sm_at_snapshot = _StateMachine(snap.index, list(m.sm.records))

    # ------------------------------------------------------------------ invariants

    def _violation(self, what: str) -> None:
        self.violations.append(f"tick {self.now}: {what}")

    def _check_new_entries(self, m: _Member, entries: tuple[Entry, ...]) -> bool:
        """Log matching, checked as entries reach a disk: an (index, term) pair always
        names the same entry, which always follows the same term. False if the entries
        would leave a hole in the log."""
        first = entries[0].index
        if first - 1 > m.storage.last_index():
            self._violation(
                f"member {m.id} persists entry {first} past its last {m.storage.last_index()}"
            )
            return False
        try:
            prev_term = m.storage.term(first - 1)
        except CompactedError:
            prev_term = None  # below the snapshot: committed, checked on apply
        for e in entries:
            key = (e.index, e.term)
            got = (int(e.kind), e.data, prev_term)
            known = self._entry_at.get(key)
            if known is None:
                self._entry_at[key] = got
            elif known[:2] != got[:2] or (
                known[2] is not None and prev_term is not None and known[2] != prev_term
            ):
                self._violation(
                    f"log matching: member {m.id} holds {got!r} at {key}, another {known!r}"
                )
            prev_term = e.term
        return True

    def _observe(self, m: _Member) -> None:
        """Election safety, commit monotonicity and the commit-term bookkeeping."""
        core = m.core
        if core is None:
            return
        if core.commit_index < m.seen_commit:
            self._violation(
                f"member {m.id} commit index went back {m.seen_commit}->{core.commit_index}"
            )
        m.seen_commit = max(m.seen_commit, core.commit_index)
        if core.state == "leader":
            other = self._leader_of_term.setdefault(core.term, m.id)
            if other != m.id and (core.term, m.id) not in self._reported:
                self._reported.add((core.term, m.id))
                self._violation(f"two leaders in term {core.term}: {other} and {m.id}")
            while self._commit_tagged < core.commit_index:
                self._commit_tagged += 1
                self._commit_term[self._commit_tagged] = core.term

    def _check_leases(self, committed_before: int) -> None:
        """At most one lease holder now, and a holder's state machine has applied every
        entry committed before this tick (what it serves alone lacks no write)."""
        holders = [m for m in self._live() if m.core.lease_valid()]
        if len(holders) > 1:
            self._violation(f"lease held by {[m.id for m in holders]} at once")
        for m in holders:
            if m.sm.applied_index < committed_before:
                self._violation(
                    f"lease holder {m.id} has applied {m.sm.applied_index}, but entries up "
                    f"to {committed_before} were committed before"
                )

    def _check_leader_completeness(self, m: _Member) -> None:
        core = m.core
        key = (m.id, core.term, m.incarnation)
        i = self._completeness_ptr.get(key, m.storage.snapshot().index + 1)
        last = m.storage.last_index()
        snap_index = m.storage.snapshot().index
        while i <= self._applied_hi:
            committed_in = self._commit_term.get(i)
            if committed_in is not None and committed_in < core.term and i > snap_index:
                term = self._applied_at[i][0]
                try:
                    have = m.storage.term(i) if i <= last else None
                except RaftError:
                    have = None
                if have != term:
                    self._violation(
                        f"leader completeness: leader {m.id} of term {core.term} lacks entry "
                        f"{i} (term {term}) committed in term {committed_in}; has {have}"
                    )
                    break
            i += 1
        self._completeness_ptr[key] = i

    def _check_histories(self) -> None:
        """Applied histories are prefixes of one another (state-machine safety)."""
        members = list(self.members.values())
        longest = max(members, key=lambda m: len(m.sm.records)).sm.records
        for m in members:
            recs = m.sm.records
            start = min(m.verified_history, len(recs))
            if recs[start:] != longest[start : len(recs)]:
                self._violation(
                    f"state machine safety: applied history of member {m.id} is not a "
                    "prefix of the longest"
                )
            m.verified_history = len(recs)

    def check(self) -> None:
        """Raise AssertionError, with the seed and a replayable trace, on any violation."""
        if not self.violations:
            for m in self._live():
                if m.core.state == "leader":
                    self._check_leader_completeness(m)
            self._check_histories()
        if self.violations:
            raise AssertionError(self.failure_report())

    def failure_report(self, what: str = "Raft invariant violated") -> str:
        """The violations, the seed, the config and the trace that replays them."""
        config = {k: v for k, v in self.config.items() if k != "n"}
        return (
            f"{what} (seed={self.seed}, tick {self.now}):\n  "
            + "\n  ".join(self.violations[:10])
            + f"\nreplay: SimCluster.replay(seed={self.seed}, trace=TRACE, "
            f"n={self.config['n']}, **{config!r})\nTRACE = {self.trace!r}"
        )


class _LeftBehind:
    """`chaos_run`'s left-behind episode (issue 6, 3a), driven by what happens.

    At tick ``start`` a founder X of a 3-node group is cut off and two nodes are added;
    once the group has 5 voters, X is reconnected with a crash armed in the Ready that
    persists a conf change (the WAL batch durable, the hard-state file not, or the batch
    torn); once X is down it restarts into a partition with the founder that does not
    lead, and for a while every member that believes it leads is given proposals, as
    clients of a stale leader would. The other faults wait while it runs.
    """

    def __init__(self, c: SimCluster, rng: random.Random, start: int) -> None:
        self.c, self.rng, self.start = c, rng, start
        self.member: int | None = None
        self.phase = "waiting"
        self.proposing_until = 0

    def step(self, t: int) -> None:
        c = self.c
        if self.phase == "waiting" and t >= self.start:
            self.phase = "done"
            live = [i for i in range(3) if i in c.members and not c.members[i].retired]
            if len(c.members) == 3 and len(live) == 3:
                self.member = live[self.rng.randrange(3)]
                new = [c.add_node(), c.add_node()]
                rest = [i for i in live if i != self.member] + new
                c.partition([[self.member], rest])
                self.phase = "growing"
        elif self.phase == "growing" and len(c.voters()) >= 5:
            c.heal()
            point = self.rng.choice(("after_entries", "torn_entries"))
            c.crash(self.member, at=point, when="conf_change")
            self.phase = "armed"
        elif self.phase == "armed" and c.state(self.member) == "crashed":
            c.restart(self.member)
            lead = c.leader()
            others = [i for i in range(3) if i not in (self.member, lead)]
            pair = [self.member, others[0]]
            c.partition([pair, [i for i in c.members if i not in pair]])
            self.phase = "split"
            self.proposing_until = t + 30
        elif self.phase == "split" and t <= self.proposing_until and t % 5 == 0:
            for lead in c.leaders():
                c.propose_to(lead, f"{c.seed}/behind/{t}/{lead}".encode())

    def running(self, t: int) -> bool:
        """Whether the episode is under way at tick ``t``."""
        return self.phase in ("growing", "armed") or (
            self.phase == "split" and t <= self.proposing_until
        )


@dataclass
class ChaosResult:
    """What one `chaos_run` did."""

    seed: int
    n: int
    ticks: int
    proposed: int
    committed: int  # distinct log indexes applied by some member
    cluster: SimCluster = field(repr=False)


def chaos_run(
    seed: int,
    *,
    n: int | None = None,
    ticks: int = 150,
    faults: bool = True,
    membership: bool = True,
    propose_rate: float = 0.3,
) -> ChaosResult:
    """One randomized run: faults for ``ticks`` ticks, then heal and prove liveness.

    The scenario's choices come from their own ``random.Random`` seeded from ``seed``,
    so the cluster's network randomness is untouched by them and a run is a pure
    function of its arguments. With ``faults`` it mixes crashes (in the middle of a
    Ready too, at every point of `CRASH_POINTS`, some of them waiting for a Ready that
    holds a conf change or a snapshot), restarts, partitions, lossy/duplicating/
    reordering links, membership changes and leadership transfers, on members whose
    clocks drift apart (up to the bound the cores are given) and with small byte bounds
    on batches; some runs of 3 nodes also play the left-behind episode of issue 6, 3a
    (`_LeftBehind`) at a random time. Every tick ends with ``check()``. Then every
    fault is healed, and it
    asserts that a leader is elected, the asked-for membership is reached, and a fresh
    proposal is applied on every live member.
    """
    rng = random.Random(f"chaos/{seed}")
    # The choices added since the first soak draw from a second generator, so the
    # scenarios of seeds found earlier (regression tests name them) stay as they were.
    more = random.Random(f"chaos/{seed}/more")
    n = n if n is not None else rng.choice((3, 5))
    c = SimCluster(
        n=n,
        seed=seed,
        snapshot_every=rng.choice((None, 3, 10)) if faults else None,
        durable_state_machine=rng.random() < 0.5,
        max_msg_entries=rng.choice((1, 4, 64)),
        snapshot_chunk_bytes=rng.choice((8, 64 * 1024)),
        max_msg_bytes=more.choice((16, 64, 1024 * 1024)),
        max_committed_bytes=more.choice((16, 1024 * 1024)),
        max_clock_drift=more.choice((0.0, 0.05, 0.3)) if faults else 0.0,
    )
    if faults:
        c.set_network(
            drop=rng.choice((0.0, 0.05, 0.15)),
            duplicate=rng.choice((0.0, 0.05, 0.1)),
            delay=(1, rng.choice((1, 2, 4))),
            reorder=rng.random() < 0.5,
        )
    proposed = 0

    def member_ids(pred: Callable[[_Member], bool]) -> list[int]:
        return [m.id for _, m in sorted(c.members.items()) if not m.retired and pred(m)]

    # In some runs of 3 nodes, an episode among the random faults: a founder is cut
    # off while the group grows by two, crashes while persisting the conf changes it
    # catches up on, and restarts into a partition with the other founder that does
    # not lead (issue 6, 3a).
    behind = None
    if faults and membership and n == 3 and more.random() < 0.3:
        behind = _LeftBehind(c, more, start=more.randint(5, 30))

    for t in range(ticks):
        if behind is not None:
            behind.step(t)
        if rng.random() < propose_rate:
            c.propose(f"{seed}/{proposed}".encode())
            proposed += 1
        if faults and not (behind is not None and behind.running(t)):
            ev = rng.random()
            up = member_ids(lambda m: m.core is not None)
            down = member_ids(lambda m: m.core is None)
            if ev < 0.02 and up:
                at = rng.choice((None, None, *_FIRST_SOAK_CRASH_POINTS))
                if at is not None and more.random() < 0.5:
                    at = more.choice(CRASH_POINTS)
                when = more.choice((None, None, *CRASH_WHEN)) if at is not None else None
                c.crash(rng.choice(up), at=at, when=when)
            elif ev < 0.045 and down:
                c.restart(rng.choice(down))
            elif ev < 0.055:
                ids = member_ids(lambda m: True)
                rng.shuffle(ids)
                cut = rng.randint(1, len(ids) - 1)
                c.partition([ids[:cut], ids[cut:]])
            elif ev < 0.07:
                c.heal()
            elif ev < 0.075 and membership and len(member_ids(lambda m: True)) < 7:
                c.add_node()
            elif ev < 0.08 and membership:
                voters = [i for i in c.voters() if c.members[i].wanted != "removed"]
                if len(voters) > 3:
                    c.remove_node(rng.choice(voters))
            elif ev < 0.085 and up:
                c.transfer_leadership(rng.choice(up))
        c.tick()

    # Heal everything; from here on the group must make progress.
    c.heal()
    c.set_network()
    c.disarm_crashes()
    for i in member_ids(lambda m: m.core is None):
        c.restart(i)
    limit = 60 * c.election_tick
    if not c.run_until(lambda: c.leader() is not None and c.membership_settled(), limit):
        raise AssertionError(c.failure_report("no leader or membership not settled after healing"))
    for attempt in range(10):
        final = f"{seed}/final/{attempt}".encode()
        if c.propose(final) and c.run_until(
            lambda final=final: all(final in c.applied(i) for i in c.alive()),
            10 * c.election_tick,
        ):
            break
        # No leader, or one that refuses proposals for now (a leadership transfer
        # in progress): give it time.
        c.run(c.election_tick)
        c.run_until(lambda: c.leader() is not None, limit)
    else:
        raise AssertionError(c.failure_report("after healing a proposal did not commit everywhere"))
    c.check()
    return ChaosResult(seed, n, c.now, proposed, c._applied_hi, c)
