"""Tests for the sans-I/O Raft core, driving a few `RaftCore`s by hand.

`Net` is a deliberately tiny harness (the seeded, fault-injecting simulation is
`timemachine.raft.sim`): it runs each member's Ready loop against a `MemoryStorage`,
queues the messages, and delivers them one at a time, FIFO, dropping those a partition
or a test's filter forbids. Every message delivered is kept so tests can count them.
"""

from __future__ import annotations

import json
import random
from collections import deque
from collections.abc import Callable

from twisted.trial import unittest

from timemachine.domain.errors import CorruptLog, LogBehindCommit
from timemachine.raft.core import RaftCore
from timemachine.raft.storage import MemoryStorage
from timemachine.raft.types import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    ReadState,
    SnapshotTemporarilyUnavailable,
)

MT = MessageType


class Net:
    """A few cores, their storages and state machines, and a FIFO network."""

    def __init__(self, n: int = 3, *, seed: int = 1, storages=None, **options) -> None:
        self.options = options
        self.seed = seed
        ids = list(range(1, n + 1))
        if storages is None:
            storages = {i: MemoryStorage(ConfState(voters=frozenset(ids))) for i in ids}
        self.storages: dict[int, MemoryStorage] = dict(storages)
        self.cores: dict[int, RaftCore] = {}
        self.sm: dict[int, list[bytes]] = {}
        self.reads: dict[int, list[ReadState]] = {}
        self.inbox: deque[Message] = deque()
        self.delivered: list[Message] = []
        self.isolated: set[int] = set()
        self.down: set[int] = set()
        self.drop: Callable[[Message], bool] | None = None
        for i in ids:
            self.start(i)

    # -- members --------------------------------------------------------------------------

    def start(self, i: int, storage: MemoryStorage | None = None) -> RaftCore:
        """(Re)start member ``i`` from what its storage holds; the state machine is
        rebuilt from the snapshot and the committed entries the core hands out again."""
        if storage is not None:
            self.storages[i] = storage
        st = self.storages[i]
        rng = random.Random(self.seed * 1000 + i * 7 + len(self.delivered))
        self.cores[i] = RaftCore(i, st, rng, **self.options)
        snap = st.snapshot()
        self.sm[i] = [d.encode("latin-1") for d in json.loads(snap.data)] if snap.data else []
        self.reads[i] = []
        self.down.discard(i)
        return self.cores[i]

    def crash(self, i: int) -> None:
        """Stop ``i``; only its storage survives."""
        self.down.add(i)
        self.inbox = deque(m for m in self.inbox if m.to != i)

    def snapshot(self, i: int, compact: bool = True) -> None:
        """Member ``i`` snapshots its state machine (and compacts its log)."""
        core, st = self.cores[i], self.storages[i]
        data = json.dumps([d.decode("latin-1") for d in self.sm[i]]).encode()
        st.create_snapshot(core.applied_index, core.conf, data)
        if compact:
            st.compact(core.applied_index)

    # -- the Ready loop and the network -------------------------------------------------------

    def process(self, i: int) -> None:
        """Run member ``i``'s Ready loop: persist, send, apply, advance."""
        core, st = self.cores[i], self.storages[i]
        while core.has_ready():
            rd = core.ready()
            st.write_chunks(rd.snapshot_chunks)
            snapshot = None if rd.snapshot is None else st.received(rd.snapshot)
            if snapshot is not None:
                st.apply_snapshot(snapshot)
            st.append(rd.entries)
            if rd.hard_state is not None:
                st.set_hard_state(rd.hard_state)
            self.inbox.extend(rd.messages)
            if snapshot is not None:
                data = snapshot.data
                self.sm[i] = [d.encode("latin-1") for d in json.loads(data)] if data else []
            for e in rd.committed:
                if e.kind == EntryKind.NORMAL and e.data:
                    self.sm[i].append(e.data)
            self.reads[i].extend(rd.read_states)
            core.advance()

    def blocked(self, m: Message) -> bool:
        if m.to in self.down or m.frm in self.down or m.to not in self.cores:
            return True
        if (m.to in self.isolated) != (m.frm in self.isolated):
            return True
        if m.to in self.isolated and m.frm in self.isolated:
            return True
        return self.drop is not None and self.drop(m)

    def step_one(self) -> Message | None:
        """Deliver the next message (after running every Ready loop); None when idle."""
        for i in self.cores:
            if i not in self.down:
                self.process(i)
        while self.inbox:
            m = self.inbox.popleft()
            if self.blocked(m):
                continue
            self.delivered.append(m)
            self.cores[m.to].step(m)
            return m
        return None

    def deliver_all(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if self.step_one() is None:
                return
        raise AssertionError("network did not go quiet")

    def tick(self, n: int = 1) -> None:
        """``n`` rounds of: every live member ticks, then every message is delivered."""
        for _ in range(n):
            for i, c in self.cores.items():
                if i not in self.down:
                    c.tick()
            self.deliver_all()

    # -- queries ---------------------------------------------------------------------------

    def leaders(self) -> list[int]:
        return [i for i, c in self.cores.items() if i not in self.down and c.state == "leader"]

    def leader(self) -> int | None:
        """The live leader of the highest term, if any."""
        best = None
        for i in self.leaders():
            if best is None or self.cores[i].term > self.cores[best].term:
                best = i
        return best

    def elect_unacknowledged(self) -> int:
        """Elect a leader whose appends are never acknowledged (heartbeats are), so
        its no-op does not commit; returns it."""
        self.drop = lambda m: m.type == MT.APPEND_RESP
        lead = None
        while lead is None:
            self.tick()
            lead = self.leader()
        return lead

    def elect(self, max_ticks: int = 200) -> int:
        """Tick until the connected majority has a leader; returns it."""
        for _ in range(max_ticks):
            lead = self.leader()
            if lead is not None and lead not in self.isolated:
                return lead
            self.tick()
        raise AssertionError("no leader elected")

    def count(self, type: MessageType, frm=None, to=None) -> int:
        return sum(
            1
            for m in self.delivered
            if m.type == type and (frm is None or m.frm == frm) and (to is None or m.to == to)
        )


def storage_with(voters, terms: list[int], hs_term: int, commit: int = 0) -> MemoryStorage:
    """A member's storage holding entries of ``terms`` (from index 1)."""
    st = MemoryStorage(ConfState(voters=frozenset(voters)))
    st.append([Entry(i + 1, t, b"e%d.%d" % (i + 1, t)) for i, t in enumerate(terms)])
    st.set_hard_state(HardState(term=hs_term, vote=None, commit=commit))
    return st


class ElectionTests(unittest.TestCase):
    def test_single_member_leads_and_commits(self):
        net = Net(1)
        lead = net.elect()
        self.assertEqual(lead, 1)
        self.assertTrue(net.cores[1].propose(b"a"))
        net.deliver_all()
        self.assertEqual(net.sm[1], [b"a"])
        self.assertEqual(net.cores[1].commit_index, 2)  # the no-op, then "a"

    def test_three_members_elect_one_leader(self):
        net = Net(3)
        lead = net.elect()
        terms = {c.term for c in net.cores.values()}
        self.assertEqual(len(terms), 1)
        for i, c in net.cores.items():
            self.assertEqual(c.leader, lead)
            self.assertEqual(c.state, "leader" if i == lead else "follower")
        # The leader's no-op commits everywhere.
        net.tick()
        self.assertEqual({c.commit_index for c in net.cores.values()}, {1})

    def test_election_timeout_randomized_in_range(self):
        core = RaftCore(1, MemoryStorage(ConfState(voters=frozenset({1, 2, 3}))), random.Random(5))
        seen = set()
        for term in range(1, 200):
            core.become_follower(term, None)
            seen.add(core.randomized_election_timeout)
        self.assertEqual(seen, set(range(10, 20)))

    def test_same_seed_same_history(self):
        def run():
            net = Net(5, seed=9)
            net.elect()
            return [(m.type, m.frm, m.to, m.term) for m in net.delivered]

        self.assertEqual(run(), run())

    def test_reelection_after_leader_crash(self):
        net = Net(3)
        old = net.elect()
        net.crash(old)
        new = net.elect()
        self.assertNotEqual(new, old)
        self.assertGreater(net.cores[new].term, net.cores[old].term)

    def test_illegal_transitions_refused(self):
        core = RaftCore(1, MemoryStorage(ConfState(voters=frozenset({1, 2, 3}))), random.Random(1))
        self.assertRaises(RuntimeError, core.become_leader)
        core.become_pre_candidate()
        self.assertRaises(RuntimeError, core.become_leader)
        core.become_candidate()
        core.become_leader()
        self.assertRaises(RuntimeError, core.become_candidate)
        self.assertRaises(RuntimeError, core.become_pre_candidate)

    def test_learner_and_non_member_never_campaign(self):
        st = MemoryStorage(ConfState(voters=frozenset({1}), learners=frozenset({2})))
        core = RaftCore(2, st, random.Random(1))
        for _ in range(100):
            core.tick()
        self.assertEqual(core.state, "learner")
        self.assertFalse(core.has_ready())

    def test_pre_vote_keeps_partitioned_member_from_disrupting(self):
        net = Net(3)
        lead = net.elect()
        term = net.cores[lead].term
        f = next(i for i in net.cores if i != lead)
        net.isolated = {f}
        net.tick(100)
        # The cut-off member could not win a pre-vote, so its term never grew...
        self.assertEqual(net.cores[f].term, term)
        self.assertEqual(net.cores[f].state, "pre_candidate")
        net.isolated = set()
        net.tick(5)
        # ...and rejoining it disturbs nobody.
        self.assertEqual(net.leader(), lead)
        self.assertEqual({c.term for c in net.cores.values()}, {term})
        self.assertEqual(net.cores[f].leader, lead)

    def test_without_pre_vote_partitioned_member_disrupts(self):
        # The contrast: plain Raft lets a rejoining member depose a healthy leader.
        net = Net(3, pre_vote=False, check_quorum=False)
        lead = net.elect()
        term = net.cores[lead].term
        f = next(i for i in net.cores if i != lead)
        net.isolated = {f}
        net.tick(100)
        self.assertGreater(net.cores[f].term, term + 3)
        net.isolated = set()
        net.tick(2 * net.cores[lead].election_tick)
        self.assertGreater(net.cores[lead].term, term)

    def test_check_quorum_leader_steps_down(self):
        net = Net(3)
        lead = net.elect()
        net.isolated = {lead}
        net.tick(2 * net.cores[lead].election_tick)
        self.assertEqual(net.cores[lead].state, "follower")
        self.assertIsNone(net.cores[lead].leader)

    def test_member_in_lease_ignores_vote_requests(self):
        net = Net(3)
        lead = net.elect()
        f = next(i for i in net.cores if i != lead)
        core = net.cores[f]
        term = core.term
        core.step(Message(MT.VOTE, frm=99, to=f, term=term + 5, index=100, log_term=100))
        self.assertEqual(core.term, term)
        self.assertEqual(core.leader, lead)
        self.assertEqual(core.msgs, [])

    def test_stale_term_messages_rejected(self):
        net = Net(3)
        lead = net.elect()
        f = next(i for i in net.cores if i != lead)
        core = net.cores[f]
        term = core.term
        last = core.log.last_index()
        stale = Message(
            MT.APPEND, frm=99, to=f, term=term - 1, index=last, entries=(Entry(last + 1, 0),)
        )
        core.step(stale)
        self.assertEqual(core.log.last_index(), last)
        [resp] = core.msgs
        self.assertEqual((resp.type, resp.term, resp.to), (MT.APPEND_RESP, term, 99))


class RepairedLogTests(unittest.TestCase):
    """A member whose log a repair cut (it lost entries it had acknowledged) neither
    votes nor campaigns until it holds an entry committed in its leader's term."""

    def cut_and_restart(self, net: Net, i: int, keep: int) -> RaftCore:
        """Member ``i`` restarts from its storage cut after entry ``keep``, catching up."""
        old = net.storages[i]
        hs, conf = old.initial_state()
        cut = MemoryStorage(conf)
        cut.append(old.entries(1, keep + 1))
        cut.set_hard_state(HardState(hs.term, hs.vote, min(hs.commit, keep)))
        net.storages[i] = cut
        core = net.start(i)
        core.catching_up = True
        return core

    def test_a_cut_member_does_not_help_elect_a_leader_that_lacks_what_it_lost(self):
        net = Net(3)
        lead = net.elect()
        a, b = (i for i in net.cores if i != lead)
        kept = net.cores[lead].log.last_index()
        # x is committed by the leader and a alone; b is cut off.
        net.isolated = {b}
        net.cores[lead].propose(b"x")
        net.deliver_all()
        self.assertIn(b"x", net.sm[lead])
        # a loses x to a repair; the leader dies; b comes back.
        net.crash(lead)
        self.cut_and_restart(net, a, kept)
        net.isolated = set()
        net.tick(10 * net.cores[a].election_tick)
        # b lacks x: with a's vote it would lead and x would be lost.
        self.assertEqual(net.leaders(), [])
        # The old leader returns: it holds x, and is elected with b's vote.
        net.start(lead)
        new = net.elect()
        self.assertIn(new, (lead, b))
        net.tick(3)
        self.assertFalse(net.cores[a].catching_up)
        for i in net.cores:
            self.assertIn(b"x", net.sm[i], i)

    def test_it_votes_again_once_it_holds_an_entry_of_its_leaders_term(self):
        net = Net(3)
        lead = net.elect()
        a = next(i for i in net.cores if i != lead)
        kept = net.cores[lead].log.last_index()
        net.cores[lead].propose(b"x")
        net.deliver_all()
        core = self.cut_and_restart(net, a, kept)
        net.tick(2)
        self.assertFalse(core.catching_up)
        self.assertIn(b"x", net.sm[a])
        # And it can lead, when its leader goes.
        net.crash(lead)
        net.tick(10 * core.election_tick)
        self.assertIsNotNone(net.leader())

    def test_the_only_voter_is_never_held_back(self):
        net = Net(1)
        lead = net.elect()
        kept = net.cores[lead].log.last_index()
        net.cores[lead].propose(b"x")
        net.deliver_all()
        core = self.cut_and_restart(net, lead, kept)
        self.assertEqual(net.elect(), lead)
        self.assertFalse(core.catching_up)


class ReplicationTests(unittest.TestCase):
    def test_replicate_and_commit(self):
        net = Net(3)
        lead = net.elect()
        for k in range(10):
            self.assertTrue(net.cores[lead].propose(b"v%d" % k))
        net.deliver_all()
        want = [b"v%d" % k for k in range(10)]
        self.assertEqual(net.sm[lead], want)
        net.tick()  # the followers learn the commit index from the heartbeat round
        for i in net.cores:
            self.assertEqual(net.sm[i], want)
            self.assertEqual(net.cores[i].commit_index, 11)

    def test_follower_refuses_proposals(self):
        net = Net(3)
        lead = net.elect()
        f = next(i for i in net.cores if i != lead)
        self.assertFalse(net.cores[f].propose(b"x"))

    def test_agreement_with_one_follower_down_and_none_without_quorum(self):
        net = Net(3)
        lead = net.elect()
        f1, f2 = (i for i in net.cores if i != lead)
        net.crash(f1)
        net.cores[lead].propose(b"a")
        net.deliver_all()
        self.assertEqual(net.sm[lead], [b"a"])
        net.crash(f2)
        commit = net.cores[lead].commit_index
        net.cores[lead].propose(b"b")
        net.deliver_all()
        self.assertEqual(net.cores[lead].commit_index, commit)
        self.assertEqual(net.sm[lead], [b"a"])

    def test_batching_and_bounded_pipeline(self):
        net = Net(3, max_msg_entries=8, max_inflight=3)
        lead = net.elect()
        net.tick()
        f = next(i for i in net.cores if i != lead)
        held: list[Message] = []
        net.drop = lambda m: m.to == f and m.type == MT.APPEND and not held.append(m)
        for k in range(100):
            net.cores[lead].propose(b"%d" % k)
            net.deliver_all()
        # In replicate state at most max_inflight appends are out at once.
        with_entries = [m for m in held if m.entries]
        self.assertEqual(len(with_entries), 3)
        net.drop = None
        for m in held:
            net.cores[f].step(m)
        net.deliver_all()
        net.tick(2)
        self.assertEqual(len(net.sm[f]), 100)
        self.assertTrue(all(len(m.entries) <= 8 for m in net.delivered if m.type == MT.APPEND))

    def test_appends_bounded_by_bytes(self):
        # One append in flight at a time: the entries proposed meanwhile wait, and go
        # out in batches as the acknowledgements come back.
        net = Net(3, max_msg_entries=64, max_msg_bytes=250, max_inflight=1)
        lead = net.elect()
        net.tick()
        for k in range(40):
            net.cores[lead].propose(b"%03d" % k + b"x" * 97)  # 100 bytes each
        net.tick(3)
        appends = [m for m in net.delivered if m.type == MT.APPEND and m.entries]
        self.assertEqual(max(len(m.entries) for m in appends), 2)
        for i in net.cores:
            self.assertEqual(len(net.sm[i]), 40)
        # One entry larger than the bound still goes, alone.
        net.cores[lead].propose(b"y" * 1000)
        net.tick(2)
        self.assertTrue(all(net.sm[i][-1] == b"y" * 1000 for i in net.cores))

    def test_committed_entries_bounded_by_bytes(self):
        net = Net(1, max_committed_bytes=250)
        net.elect()
        core = net.cores[1]
        for k in range(10):
            core.propose(b"%03d" % k + b"x" * 97)
        batches = []
        while core.has_ready():
            rd = core.ready()
            net.storages[1].append(rd.entries)
            if rd.committed:
                batches.append([e.data for e in rd.committed])
            core.advance()
        self.assertEqual([len(b) for b in batches], [2, 2, 2, 2, 2])
        self.assertEqual([d[:3] for b in batches for d in b], [b"%03d" % k for k in range(10)])

    def test_log_ending_below_its_commit_index_is_refused(self):
        st = storage_with({1, 2, 3}, [1, 1, 1], hs_term=1, commit=5)
        with self.assertRaises(LogBehindCommit) as caught:
            RaftCore(1, st, random.Random(1))
        self.assertIsInstance(caught.exception, CorruptLog)
        self.assertIn("commit index 5", str(caught.exception))
        self.assertIn("last log entry 3", str(caught.exception))

    def test_restart_from_storage_keeps_log_and_commit(self):
        net = Net(3)
        lead = net.elect()
        for k in range(5):
            net.cores[lead].propose(b"%d" % k)
        net.deliver_all()
        net.tick()
        for i in list(net.cores):
            net.crash(i)
        for i in list(net.cores):
            net.start(i)
        for c in net.cores.values():
            self.assertEqual(c.commit_index, 6)
            self.assertEqual(c.log.last_index(), 6)
        net.deliver_all()
        for i in net.cores:
            self.assertEqual(net.sm[i], [b"%d" % k for k in range(5)])
        lead = net.elect()
        net.cores[lead].propose(b"after")
        net.deliver_all()
        net.tick()  # the heartbeat round tells the commit index
        self.assertTrue(all(net.sm[i][-1] == b"after" for i in net.cores))

    def test_figure8_counts_only_current_term(self):
        # Member 1 holds entry 2 of term 2 that member 2 also has; member 3 lacks it.
        # Member 1 wins term 4; once 1 and 3 hold entry 2, it is on a majority, but a
        # leader of term 4 must not commit it until an entry of term 4 is there too.
        storages = {
            1: storage_with({1, 2, 3}, [1, 2], hs_term=3, commit=1),
            2: storage_with({1, 2, 3}, [1, 2], hs_term=3, commit=1),
            3: storage_with({1, 2, 3}, [1], hs_term=3, commit=1),
        }
        net = Net(3, storages=storages, max_msg_entries=1)
        net.isolated = {2}
        # Only 1 can win: 3's log is behind, 2 is cut off.
        for _ in range(100):
            if net.cores[1].state == "leader":
                break
            for c in net.cores.values():
                c.tick()
            while net.cores[1].state != "leader" and net.step_one() is not None:
                pass
        leader = net.cores[1]
        self.assertEqual(leader.state, "leader")
        self.assertEqual(leader.term, 4)
        saw_majority_old_term = False
        while net.step_one() is not None:
            if leader.prs[3].match == 2:
                saw_majority_old_term = True
                self.assertEqual(leader.commit_index, 1)
        self.assertTrue(saw_majority_old_term)
        self.assertEqual(leader.commit_index, 3)

    def test_conflict_backtracking_in_few_round_trips(self):
        # 1 and 3 hold 30 entries of term 3 after a common prefix; 2 holds 30 of term 2.
        prefix = [1] * 5
        good = prefix + [3] * 30
        bad = prefix + [2] * 30
        storages = {
            1: storage_with({1, 2, 3}, good, hs_term=3, commit=5),
            2: storage_with({1, 2, 3}, bad, hs_term=3, commit=5),
            3: storage_with({1, 2, 3}, good, hs_term=3, commit=5),
        }
        net = Net(3, storages=storages)
        net.isolated = {2}
        lead = net.elect()
        net.tick()
        net.isolated = set()
        before = len(net.delivered)
        net.tick(1)
        net.deliver_all()
        appends = [m for m in net.delivered[before:] if m.type == MT.APPEND and m.to == 2]
        rejects = [
            m
            for m in net.delivered[before:]
            if m.type == MT.APPEND_RESP and m.frm == 2 and m.reject
        ]
        # One rejection skips the whole divergent term; the next append repairs it.
        self.assertEqual(len(rejects), 1)
        self.assertLessEqual(len(appends), 3)
        self.assertEqual(
            [e.term for e in net.cores[2].log.all_entries()],
            [e.term for e in net.cores[lead].log.all_entries()],
        )


class AppendEconomyTests(unittest.TestCase):
    """No append that carries nothing new: one append per follower per agreement (the
    entries); the commit index rides on the next append or heartbeat round."""

    def _steady(self):
        net = Net(3)
        lead = net.elect()
        net.tick(2)  # every follower replicating, commit index known everywhere
        return net, lead, [i for i in net.cores if i != lead]

    def appends_to(self, net: Net, f: int, since: int) -> list[Message]:
        return [m for m in net.delivered[since:] if m.type == MT.APPEND and m.to == f]

    def test_heartbeat_answer_sends_no_append_while_entries_in_flight(self):
        net, lead, followers = self._steady()
        core = net.cores[lead]
        since = len(net.delivered)
        core.tick()  # a heartbeat round goes out first...
        core.propose(b"x")  # ...then the entries: the heartbeat answers come back first
        net.deliver_all()
        self.assertGreater(net.count(MT.HEARTBEAT_RESP), 0)
        for f in followers:
            # The entries alone: no empty append prompted by the heartbeat answer that
            # overtook the acknowledgement, none for the new commit index.
            self.assertEqual([len(m.entries) for m in self.appends_to(net, f, since)], [1])
            self.assertEqual(net.sm[f][-1:], [])
        net.tick()
        for f in followers:
            self.assertEqual(net.sm[f][-1], b"x")
            self.assertEqual(net.cores[f].commit_index, core.commit_index)
            self.assertEqual([len(m.entries) for m in self.appends_to(net, f, since)], [1])

    def test_lost_append_is_recovered_by_a_later_heartbeat_round(self):
        net, lead, (f, _) = self._steady()
        lost: list[Message] = []
        net.drop = lambda m: m.to == f and m.type == MT.APPEND and not lost and not lost.append(m)
        net.cores[lead].propose(b"x")
        net.deliver_all()
        self.assertEqual(len(lost), 1)
        net.drop = None
        # The next heartbeat round's answer shows the append went missing: probe again.
        net.tick()
        self.assertEqual(net.sm[f][-1], b"x")
        self.assertEqual(net.cores[f].commit_index, net.cores[lead].commit_index)

    def test_commit_index_rides_on_entries_under_load(self):
        net, lead, followers = self._steady()
        since = len(net.delivered)
        for k in range(10):
            net.cores[lead].propose(b"v%d" % k)
        net.deliver_all()
        net.tick()
        for f in followers:
            self.assertEqual(net.sm[f][-10:], [b"v%d" % k for k in range(10)])
            got = self.appends_to(net, f, since)
            # One append per entry, none empty (not one per acknowledgement that moved
            # the commit index): the heartbeat round told the final commit index.
            self.assertEqual(sum(1 for m in got if m.entries), 10)
            self.assertEqual(sum(1 for m in got if not m.entries), 0)
            self.assertEqual(net.cores[f].commit_index, net.cores[lead].commit_index)


class SnapshotTests(unittest.TestCase):
    def test_lagging_follower_gets_snapshot_in_chunks(self):
        net = Net(3, snapshot_chunk_bytes=1000)
        lead = net.elect()
        f = next(i for i in net.cores if i != lead)
        net.isolated = {f}
        for k in range(50):
            net.cores[lead].propose(b"%03d" % k * 40)
        net.deliver_all()
        net.snapshot(lead)
        size = len(net.storages[lead].snapshot().data)
        self.assertGreater(size, 3000)
        for k in range(3):
            net.cores[lead].propose(b"tail%d" % k)
        net.deliver_all()
        net.isolated = set()
        net.tick(3)
        chunks = [m for m in net.delivered if m.type == MT.SNAPSHOT and m.to == f]
        self.assertEqual(len(chunks), -(-size // 1000))
        self.assertEqual([m.offset for m in chunks], [k * 1000 for k in range(len(chunks))])
        self.assertTrue(chunks[-1].done)
        self.assertEqual(net.sm[f], net.sm[lead])
        self.assertEqual(net.storages[f].snapshot().index, net.storages[lead].snapshot().index)
        net.cores[lead].propose(b"more")
        net.deliver_all()
        net.tick()  # the heartbeat round tells the commit index
        self.assertEqual(net.sm[f], net.sm[lead])

    def test_a_follower_hands_each_chunk_out_as_it_arrives_and_holds_none(self):
        net = Net(3, snapshot_chunk_bytes=1000)
        lead, f, _ = self.lagging_follower_with_big_snapshot(net, proposals=50, repeat=40)
        sent = net.storages[lead].snapshot()
        core = net.cores[f]
        readys = []
        ready = core.ready

        def recording():
            readys.append(ready())
            return readys[-1]

        core.ready = recording
        net.tick(3)
        chunks = [c for rd in readys for c in rd.snapshot_chunks]
        self.assertGreater(len(chunks), 3)
        self.assertEqual(b"".join(c.data for c in chunks), sent.data)
        self.assertEqual([c.last for c in chunks], [False] * (len(chunks) - 1) + [True])
        # Each chunk leaves in a Ready of its own, with the answer that it was written.
        for rd in readys:
            answers = [m for m in rd.messages if m.type == MT.SNAPSHOT_RESP]
            if rd.snapshot_chunks and not rd.snapshot_chunks[-1].last:
                [chunk] = rd.snapshot_chunks
                self.assertEqual([m.offset for m in answers], [chunk.offset + len(chunk.data)])
        # The install carries the point, not the data: that is what the chunks wrote.
        [install] = [rd for rd in readys if rd.snapshot is not None and rd.snapshot.index]
        self.assertEqual((install.snapshot.index, install.snapshot.data), (sent.index, b""))
        self.assertTrue(install.snapshot_chunks[-1].last)
        self.assertEqual(net.sm[f], net.sm[lead])

    def test_a_snapshot_still_being_prepared_is_sent_once_ready(self):
        net = Net(3, snapshot_chunk_bytes=1000)
        lead = net.elect()
        f = next(i for i in net.cores if i != lead)
        net.isolated = {f}
        for k in range(20):
            net.cores[lead].propose(b"%03d" % k)
        net.deliver_all()
        net.snapshot(lead)
        storage = net.storages[lead]
        prepared = storage.snapshot()
        asked = []

        def snapshot():
            asked.append(len(asked))
            if len(asked) <= 2:
                raise SnapshotTemporarilyUnavailable("still copying")
            return prepared

        storage.snapshot = snapshot
        net.isolated = set()
        net.tick(1)
        self.assertEqual([m for m in net.delivered if m.type == MT.SNAPSHOT], [])
        net.tick(5)
        self.assertGreater(len(asked), 2)
        self.assertEqual(net.sm[f], net.sm[lead])

    def test_install_restarts_after_crash_midway(self):
        net = Net(3, snapshot_chunk_bytes=500)
        lead = net.elect()
        f = next(i for i in net.cores if i != lead)
        net.isolated = {f}
        for k in range(40):
            net.cores[lead].propose(b"%03d" % k * 30)
        net.deliver_all()
        net.snapshot(lead)
        net.isolated = set()
        # Let two chunks arrive, then crash the follower with the install half done.
        got = 0
        while got < 2:
            m = net.step_one()
            if m is None:
                for c in net.cores.values():
                    c.tick()
                continue
            got += m.type == MT.SNAPSHOT and m.to == f
        self.assertIsNone(net.storages[f].snapshot().data or None)
        net.crash(f)
        net.tick(3)
        net.start(f)
        net.tick(3 * net.cores[lead].election_tick)
        self.assertEqual(net.sm[f], net.sm[lead])
        self.assertEqual(net.cores[f].commit_index, net.cores[lead].commit_index)

    def test_lost_chunk_is_retransmitted(self):
        net = Net(3, snapshot_chunk_bytes=200)
        lead = net.elect()
        f = next(i for i in net.cores if i != lead)
        net.isolated = {f}
        for _ in range(20):
            net.cores[lead].propose(b"x" * 50)
        net.deliver_all()
        net.snapshot(lead)
        net.isolated = set()
        dropped = []

        def drop_second_chunk(m):
            if m.type == MT.SNAPSHOT and m.offset == 200 and not dropped:
                dropped.append(m)
                return True
            return False

        net.drop = drop_second_chunk
        net.tick(3 * net.cores[lead].election_tick)
        self.assertEqual(len(dropped), 1)
        self.assertEqual(net.sm[f], net.sm[lead])

    def lagging_follower_with_big_snapshot(
        self, net: Net, proposals: int = 60, repeat: int = 10
    ) -> tuple[int, int, int]:
        """A leader whose compacted log forces a snapshot of ``size`` bytes on the
        follower ``f``, isolated while it was made; returns (lead, f, size)."""
        lead = net.elect()
        f = next(i for i in net.cores if i != lead)
        net.isolated = {f}
        for k in range(proposals):
            net.cores[lead].propose(b"%03d" % k * repeat)
        net.deliver_all()
        net.snapshot(lead)
        net.isolated = set()
        return lead, f, len(net.storages[lead].snapshot().data)

    def deliver_wave(self, net: Net) -> None:
        """One round trip's worth: deliver what is queued now (not what it causes)."""
        for i in net.cores:
            if i not in net.down:
                net.process(i)
        wave, net.inbox = net.inbox, deque()
        for m in wave:
            if not net.blocked(m):
                net.delivered.append(m)
                net.cores[m.to].step(m)

    def test_snapshot_chunks_are_pipelined(self):
        # Regression (soak seeds 1110, 3450, ...: "after healing a proposal did not
        # commit everywhere"): the leader sent one chunk per round trip, so with small
        # chunks a big snapshot took longer to send than the application took to
        # compact past it; the follower then needed a newer snapshot, from offset 0,
        # for ever. Chunks are now pipelined, a window of max_snapshot_inflight.
        net = Net(3, snapshot_chunk_bytes=8, max_snapshot_inflight=16)
        lead, f, size = self.lagging_follower_with_big_snapshot(net)
        n_chunks = -(-size // 8)
        self.assertGreater(n_chunks, 200)
        net.cores[lead].tick()  # a heartbeat: its answer shows f needs the snapshot
        waves = 0
        while net.storages[f].snapshot().index != net.storages[lead].snapshot().index:
            out = [m for m in net.inbox if m.type == MT.SNAPSHOT and m.frm == lead]
            self.assertLessEqual(len(out), 16, "no more than the window in flight")
            self.deliver_wave(net)
            waves += 1
            self.assertLess(waves, 200, "snapshot not installed")
        # About two waves (chunk, answer) per window, plus the probe that found f.
        self.assertLessEqual(waves, 2 * -(-n_chunks // 16) + 8)
        chunks = [m for m in net.delivered if m.type == MT.SNAPSHOT and m.to == f]
        self.assertEqual([m.offset for m in chunks], [k * 8 for k in range(n_chunks)])
        net.deliver_all()
        self.assertEqual(net.sm[f], net.sm[lead])

    def test_gap_reports_go_back_once(self):
        # A lost chunk makes every later chunk of the window a gap report; the leader
        # goes back to the gap once, not once per report (no storm of resends).
        net = Net(3, snapshot_chunk_bytes=8, max_snapshot_inflight=16)
        lead, f, size = self.lagging_follower_with_big_snapshot(net)
        dropped = []

        def drop_one(m):
            if m.type == MT.SNAPSHOT and m.offset == 80 and not dropped:
                dropped.append(m)
                return True
            return False

        net.drop = drop_one
        net.tick(3 * net.cores[lead].election_tick)
        self.assertEqual(len(dropped), 1)
        self.assertEqual(net.sm[f], net.sm[lead])
        n_chunks = -(-size // 8)
        sent = net.count(MT.SNAPSHOT, frm=lead, to=f) + len(dropped)
        self.assertLessEqual(sent, n_chunks + 16)
        gaps = [m for m in net.delivered if m.type == MT.SNAPSHOT_RESP and m.reject]
        self.assertGreater(len(gaps), 1)

    def test_chunks_resent_after_lost_answers(self):
        # Every answer to the first window is lost: the retransmission timer resends
        # from what the follower confirmed, and the transfer completes.
        net = Net(3, snapshot_chunk_bytes=8, max_snapshot_inflight=4)
        lead, f, _ = self.lagging_follower_with_big_snapshot(net)
        lost = []

        def drop_answers(m):
            if m.type == MT.SNAPSHOT_RESP and len(lost) < 4:
                lost.append(m)
                return True
            return False

        net.drop = drop_answers
        net.tick(6 * net.cores[lead].election_tick)
        self.assertEqual(len(lost), 4)
        self.assertEqual(net.sm[f], net.sm[lead])


class MembershipTests(unittest.TestCase):
    def add_member(self, net: Net, i: int) -> RaftCore:
        net.storages[i] = MemoryStorage()
        return net.start(i)

    def change(self, net: Net, lead: int, kind: ConfChangeKind, node: int) -> None:
        self.assertTrue(net.cores[lead].propose_conf_change(ConfChange(kind, node)))
        net.deliver_all()
        net.tick()

    def test_learner_add_catch_up_promote_remove(self):
        net = Net(3)
        lead = net.elect()
        for k in range(5):
            net.cores[lead].propose(b"%d" % k)
        net.deliver_all()
        self.add_member(net, 4)
        self.change(net, lead, ConfChangeKind.ADD_LEARNER, 4)
        self.assertEqual(net.cores[lead].conf.learners, frozenset({4}))
        self.assertEqual(net.cores[4].state, "learner")
        self.assertEqual(net.sm[4], net.sm[lead])
        # A second change waits for the first to apply: here it has, so one may follow;
        # but not two at once.
        # A learner does not count for the quorum: with two voters down, nothing commits.
        others = [i for i in (1, 2, 3) if i != lead]
        for i in others:
            net.crash(i)
        commit = net.cores[lead].commit_index
        net.cores[lead].propose(b"no quorum")
        net.deliver_all()
        self.assertEqual(net.cores[lead].commit_index, commit)
        self.assertEqual(net.cores[4].log.last_index(), net.cores[lead].log.last_index())
        for i in others:
            net.start(i)
        lead = net.elect()
        # Promote: 4 votes and counts from now on.
        self.change(net, lead, ConfChangeKind.PROMOTE, 4)
        self.assertEqual(net.cores[lead].conf.voters, frozenset({1, 2, 3, 4}))
        self.assertEqual(net.cores[4].state, "follower")
        net.cores[lead].propose(b"four voters")
        net.deliver_all()
        net.tick()  # the heartbeat round tells the commit index
        self.assertEqual(net.sm[4][-1], b"four voters")
        # Remove it again.
        self.change(net, lead, ConfChangeKind.REMOVE, 4)
        for i in (1, 2, 3):
            self.assertEqual(net.cores[i].conf, ConfState(voters=frozenset({1, 2, 3})))

    def test_joiner_with_empty_storage_gets_first_membership(self):
        # The log never held the bootstrap membership (it is the snapshot at index 0),
        # so a member joining with empty storage is sent that snapshot first.
        net = Net(3)
        lead = net.elect()
        net.cores[lead].propose(b"a")
        net.deliver_all()
        joiner = self.add_member(net, 4)
        self.change(net, lead, ConfChangeKind.ADD_LEARNER, 4)
        self.assertEqual(net.count(MT.SNAPSHOT, to=4), 1)
        self.assertEqual(joiner.conf, net.cores[lead].conf)
        self.assertEqual(net.sm[4], [b"a"])
        self.change(net, lead, ConfChangeKind.PROMOTE, 4)
        self.assertEqual(joiner.conf.voters, frozenset({1, 2, 3, 4}))

    def test_one_conf_change_at_a_time(self):
        net = Net(3)
        lead = net.elect()
        net.tick()
        core = net.cores[lead]
        self.assertTrue(core.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, 4)))
        self.assertFalse(core.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, 5)))
        net.deliver_all()
        net.tick()
        self.assertTrue(core.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, 5)))
        # Changes that make no sense are refused.
        net.deliver_all()
        self.assertFalse(core.propose_conf_change(ConfChange(ConfChangeKind.PROMOTE, 9)))
        self.assertFalse(core.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, 1)))
        f = next(i for i in net.cores if i != lead)
        self.assertFalse(net.cores[f].propose_conf_change(ConfChange(ConfChangeKind.REMOVE, 1)))

    def test_new_leader_waits_for_its_noop_before_conf_change(self):
        # Single-server changes are only safe once the leader committed an entry of its
        # own term (the fix to the bug found in single-server membership changes).
        net = Net(3)
        lead = net.elect_unacknowledged()
        core = net.cores[lead]
        self.assertEqual(core.commit_index, 0)
        self.assertFalse(core.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, 7)))
        net.drop = None
        net.tick()
        self.assertEqual(core.applied_index, 1)
        self.assertTrue(core.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, 7)))

    def test_leader_removes_itself(self):
        net = Net(3)
        lead = net.elect()
        net.tick()
        core = net.cores[lead]
        self.assertTrue(core.propose_conf_change(ConfChange(ConfChangeKind.REMOVE, lead)))
        net.deliver_all()
        self.assertNotEqual(core.state, "leader")
        self.assertFalse(core.propose(b"x"))
        net.crash(lead)
        new = net.elect()
        self.assertNotEqual(new, lead)
        self.assertEqual(net.cores[new].conf.voters, frozenset({1, 2, 3}) - {lead})
        self.assertTrue(net.cores[new].propose(b"after removal"))
        net.deliver_all()
        net.tick()  # the heartbeat round tells the commit index
        for i in net.cores:
            if i != lead:
                self.assertEqual(net.sm[i][-1], b"after removal")

    def test_removed_leader_hands_over_at_once(self):
        net = Net(3)
        lead = net.elect()
        net.tick()
        net.cores[lead].propose_conf_change(ConfChange(ConfChangeKind.REMOVE, lead))
        net.deliver_all()
        # TIMEOUT_NOW went to an up-to-date voter, which took over without waiting.
        self.assertEqual(net.count(MT.TIMEOUT_NOW, frm=lead), 1)
        new = net.leader()
        self.assertIsNotNone(new)
        self.assertNotEqual(new, lead)


class TransferTests(unittest.TestCase):
    def test_transfer_to_follower(self):
        net = Net(3)
        lead = net.elect()
        net.tick()
        to = next(i for i in net.cores if i != lead)
        self.assertTrue(net.cores[lead].transfer_leadership(to))
        self.assertFalse(net.cores[lead].propose(b"refused while transferring"))
        net.deliver_all()
        self.assertEqual(net.leader(), to)
        self.assertEqual(net.cores[lead].state, "follower")
        self.assertTrue(net.cores[to].propose(b"x"))
        net.deliver_all()
        net.tick()  # the heartbeat round tells the commit index
        self.assertEqual(net.sm[lead][-1], b"x")

    def test_transfer_to_lagging_follower_catches_it_up_first(self):
        net = Net(3)
        lead = net.elect()
        to = next(i for i in net.cores if i != lead)
        net.isolated = {to}
        for k in range(10):
            net.cores[lead].propose(b"%d" % k)
        net.deliver_all()
        net.isolated = set()
        self.assertTrue(net.cores[lead].transfer_leadership(to))
        net.tick(3)
        self.assertEqual(net.leader(), to)
        self.assertEqual(len(net.sm[to]), 10)

    def test_transfer_aborts_after_election_timeout(self):
        net = Net(3)
        lead = net.elect()
        net.tick()
        to = next(i for i in net.cores if i != lead)
        net.crash(to)
        self.assertTrue(net.cores[lead].transfer_leadership(to))
        self.assertFalse(net.cores[lead].propose(b"x"))
        net.tick(net.cores[lead].election_tick)
        self.assertEqual(net.leader(), lead)
        self.assertTrue(net.cores[lead].propose(b"x"))

    def test_transfer_refused_off_leader_or_to_non_voter(self):
        net = Net(3)
        lead = net.elect()
        f = next(i for i in net.cores if i != lead)
        self.assertFalse(net.cores[f].transfer_leadership(lead))
        self.assertFalse(net.cores[lead].transfer_leadership(lead))
        self.assertFalse(net.cores[lead].transfer_leadership(42))


class ReadTests(unittest.TestCase):
    def test_leader_read_index_after_heartbeat_round(self):
        net = Net(3)
        lead = net.elect()
        net.tick()
        core = net.cores[lead]
        core.propose(b"a")
        net.deliver_all()
        self.assertTrue(core.read_index(b"r1"))
        self.assertEqual(core.read_states, [])  # not before a quorum confirms
        hb_before = net.count(MT.HEARTBEAT_RESP, to=lead)
        net.deliver_all()
        self.assertGreater(net.count(MT.HEARTBEAT_RESP, to=lead), hb_before)
        self.assertEqual(net.reads[lead], [ReadState(core.commit_index, b"r1")])

    def test_follower_read_index_forwarded(self):
        net = Net(3)
        lead = net.elect()
        net.tick()
        f = next(i for i in net.cores if i != lead)
        self.assertTrue(net.cores[f].read_index(b"r2"))
        net.deliver_all()
        self.assertEqual(net.reads[f], [ReadState(net.cores[lead].commit_index, b"r2")])

    def test_read_index_waits_for_commit_in_term(self):
        net = Net(3)
        lead = net.elect_unacknowledged()
        core = net.cores[lead]
        self.assertEqual(core.commit_index, 0)
        self.assertTrue(core.read_index(b"early"))
        net.tick(2)
        self.assertEqual(net.reads[lead], [])
        net.drop = None
        net.tick(2)
        self.assertEqual(net.reads[lead], [ReadState(1, b"early")])

    def test_partitioned_leader_cannot_answer_reads(self):
        net = Net(3)
        lead = net.elect()
        net.tick()
        net.isolated = {lead}
        net.cores[lead].read_index(b"stale?")
        net.tick(5)
        self.assertEqual(net.reads[lead], [])

    def test_lease(self):
        net = Net(5)
        lead = net.elect()
        old = net.cores[lead]
        self.assertFalse(old.lease_valid() and old.commit_index == 0)
        net.tick(2)
        self.assertTrue(old.lease_valid())
        net.isolated = {lead}
        lost_at = None
        for t in range(1, 40):
            net.tick()
            if lost_at is None and not old.lease_valid():
                lost_at = t
            new = [i for i in net.leaders() if i != lead]
            if new:
                # Nobody else leads while the old leader still trusts its lease.
                self.assertIsNotNone(lost_at)
                self.assertFalse(old.lease_valid())
        self.assertIsNotNone(lost_at)
        self.assertLess(lost_at, old.election_tick)
        self.assertTrue(net.leaders())

    def test_no_lease_before_an_entry_of_the_leaders_term_is_applied(self):
        # A new leader whose no-op is not acknowledged yet may hold entries its
        # predecessor committed but not know it: heartbeats alone grant no lease.
        net = Net(3)
        lead = net.elect_unacknowledged()
        core = net.cores[lead]
        net.tick(3)
        self.assertEqual(core.lease_applied_index, 1)
        self.assertEqual(core.commit_index, 0)
        self.assertFalse(core.lease_valid())
        net.drop = None
        net.tick(2)
        self.assertGreaterEqual(core.applied_index, core.lease_applied_index)
        self.assertTrue(core.lease_valid())
        f = next(i for i in net.cores if i != lead)
        self.assertEqual(net.cores[f].lease_applied_index, 0)

    def test_lease_shrinks_with_the_clock_drift_allowed(self):
        lost = {}
        for drift in (0.0, 0.5):
            net = Net(5, max_clock_drift=drift)
            lead = net.elect()
            net.tick(2)
            core = net.cores[lead]
            self.assertTrue(core.lease_valid())
            net.isolated = {lead}
            for t in range(1, 20):
                net.tick()
                if not core.lease_valid():
                    lost[drift] = t
                    break
        # The last acknowledged round was sent as the leader was cut off: trusted for
        # k ticks while (k + 1) * (1 + drift) < election_tick - 1.
        self.assertEqual(lost, {0.0: 8, 0.5: 5})

    def test_lease_counts_ticks_that_passed_but_were_not_handed_in(self):
        # Its host knows that time went by before it ticks the core (a stalled timer):
        # the lease is judged as if those ticks had been counted.
        net = Net(5)
        lead = net.elect()
        net.tick(2)
        core = net.cores[lead]
        net.isolated = {lead}
        net.tick()
        self.assertTrue(core.lease_valid())
        lost_at = next(k for k in range(1, 20) if not core.lease_valid(pending_ticks=k))
        for _ in range(lost_at - 1):
            net.tick()
        self.assertTrue(core.lease_valid())
        net.tick()
        self.assertFalse(core.lease_valid())

    def test_lease_invalid_without_check_quorum_or_while_transferring(self):
        net = Net(3, check_quorum=False)
        lead = net.elect()
        net.tick(2)
        self.assertFalse(net.cores[lead].lease_valid())
        net = Net(3)
        lead = net.elect()
        net.tick(2)
        self.assertTrue(net.cores[lead].lease_valid())
        f = next(i for i in net.cores if i != lead)
        net.crash(f)
        net.cores[lead].transfer_leadership(f)
        self.assertFalse(net.cores[lead].lease_valid())


class ReadyTests(unittest.TestCase):
    def test_ready_twice_raises(self):
        core = RaftCore(1, MemoryStorage(ConfState(voters=frozenset({1}))), random.Random(1))
        for _ in range(30):
            core.tick()
        self.assertTrue(core.has_ready())
        core.ready()
        self.assertFalse(core.has_ready())
        self.assertRaises(RuntimeError, core.ready)
        core.advance()
        self.assertRaises(RuntimeError, core.advance)

    def test_vote_and_entries_in_same_ready_as_their_responses(self):
        net = Net(3)
        lead = net.elect()
        net.tick()
        f = next(i for i in net.cores if i != lead)
        core = net.cores[f]
        net.cores[lead].propose(b"p")
        # Deliver only the append to f, then look at f's Ready.
        for i in net.cores:
            net.process(i)
        m = next(m for m in net.inbox if m.to == f and m.type == MT.APPEND)
        core.step(m)
        rd = core.ready()
        self.assertEqual([e.data for e in rd.entries], [b"p"])
        self.assertTrue(rd.must_sync)
        [resp] = [x for x in rd.messages if x.type == MT.APPEND_RESP]
        self.assertEqual(resp.index, rd.entries[-1].index)
        core.advance()

    def test_hard_state_only_when_changed(self):
        core = RaftCore(1, MemoryStorage(ConfState(voters=frozenset({1}))), random.Random(1))
        for _ in range(30):
            core.tick()
        rd = core.ready()
        self.assertEqual(rd.hard_state.term, 1)
        self.assertEqual(rd.hard_state.vote, 1)
        core.advance()
        core.tick()
        if core.has_ready():
            self.assertIsNone(core.ready().hard_state)
            core.advance()
