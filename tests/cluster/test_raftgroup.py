"""The Raft adapter on the real reactor, over real Raft engines and real stores.

The members of a multi-member group here talk through `_Link`, an in-process stand-in
for the peer network that delivers each message on a later reactor turn and can cut
pairs of nodes apart; `tests.peer` tests the real network on its own.
"""

import os
import random
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from timemachine.cluster.raftgroup import (
    EngineDisk,
    NotLeader,
    RaftGroup,
    RaftHost,
    write_snapshot_chunks,
)
from timemachine.domain.commands import DeleteJob, PutJobs
from timemachine.domain.errors import CorruptLog, StorageError, Unavailable
from timemachine.domain.jobs import JobSpec
from timemachine.interfaces import IShardLog
from timemachine.raft.engine import RaftEngine
from timemachine.raft.types import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    MessageType,
    SnapshotChunk,
)
from timemachine.storage.iothread import IOThread
from timemachine.storage.store import VnodeStore

# Elections in 0.5-1 s: all members share one reactor here, and after a stall each
# ticks the time that passed at once, so a shorter timeout elects anew on any hiccup.
FAST = dict(tick_seconds=0.05)


def _spec(job_id, trigger_ms=4_000_000_000_000):
    return JobSpec("c", job_id, trigger_ms, '{"n": 1}', "hook")


class _Link:
    """Delivers messages between in-process hosts on a later turn; drops cut pairs."""

    def __init__(self):
        self.hosts = {}
        self.cut = set()

    def sender(self, frm):
        def send(to, group, incarnation, message):
            if frozenset((frm, to)) in self.cut or to not in self.hosts:
                return
            reactor.callLater(0, self.hosts[to].receive, group, incarnation, message)

        return send

    def isolate(self, node):
        self.cut |= {frozenset((node, other)) for other in self.hosts if other != node}

    def heal(self):
        self.cut.clear()


def _until(predicate, timeout=10.0, step=0.01):
    """Fire once ``predicate()`` holds, polling the real reactor; fail after timeout."""
    d = defer.Deferred()
    deadline = reactor.seconds() + timeout

    def poll():
        if predicate():
            loop.stop()
            d.callback(None)
        elif reactor.seconds() > deadline:
            loop.stop()
            d.errback(AssertionError(f"not within {timeout} s: {predicate}"))

    loop = task.LoopingCall(poll)
    loop.start(step)
    return d


class _Member:
    """One node's member of group 1: its host, disk, store and Raft group."""

    def __init__(self, testcase, directory, node_id, link, bootstrap, keep_entries=1000,
                 host_options=(), **options):
        self.testcase = testcase
        self.directory = directory
        self.node_id = node_id
        self.link = link
        self.bootstrap = bootstrap
        self.keep_entries = keep_entries
        self.host_options = {**FAST, **dict(host_options)}
        self.options = options
        self.group = None

    @defer.inlineCallbacks
    def start(self, catching_up=False):
        self.io = IOThread(reactor, f"raft-{self.node_id}")
        self.io.start()
        self.host = RaftHost(reactor, self.node_id, self.link.sender(self.node_id),
                             random.Random(self.node_id), **self.host_options)
        self.host.catching_up = catching_up
        self.link.hosts[self.node_id] = self.host
        self.engine = RaftEngine(os.path.join(self.directory, "raft"), reactor, self.io,
                                 keep_entries=self.keep_entries)
        yield self.engine.open()
        disk = EngineDisk(self.engine, 1)
        store = VnodeStore(os.path.join(self.directory, "jobs.sqlite"), reactor)
        self.group = RaftGroup(self.host, 1, f"shard 0 on {self.node_id}", disk, store,
                               self.io, bootstrap=self.bootstrap, **self.options)
        yield self.group.open()
        self.host.start()

    @defer.inlineCallbacks
    def stop(self):
        if self.group is None:
            return
        group, self.group = self.group, None
        self.host.stop()
        self.link.hosts.pop(self.node_id, None)
        yield group.close()
        yield self.engine.close()
        self.io.stop()


class RaftGroupTestCase(unittest.TestCase):
    def members(self, count, **options):
        ids = [f"node{i}" for i in range(1, count + 1)]
        conf = ConfState(frozenset(ids))
        self.link = link = _Link()
        self.base = self.mktemp()
        members = [_Member(self, os.path.join(self.base, i), i, link, conf, **options)
                   for i in ids]
        for m in members:
            os.makedirs(m.directory)
            self.addCleanup(m.stop)
        return link, members

    def new_member(self, node_id, bootstrap=None, **options):
        """A member that was never part of the group: it waits for a snapshot."""
        member = _Member(self, os.path.join(self.base, node_id), node_id, self.link,
                         bootstrap, **options)
        os.makedirs(member.directory)
        self.addCleanup(member.stop)
        return member

    @defer.inlineCallbacks
    def leading_member(self, **options):
        """A group of one member, started; fires with it once it leads."""
        _, [member] = self.members(1, **options)
        yield member.start()
        yield _until(member.group.is_leader)
        return member

    @defer.inlineCallbacks
    def start_all(self, count=3, **options):
        link, members = self.members(count, **options)
        for m in members:
            yield m.start()
        yield _until(lambda: self.leader(members) is not None)
        return link, members

    @defer.inlineCallbacks
    def write(self, leader, count, prefix="j"):
        """Propose ``count`` jobs one after the other; fire with the last index."""
        last = None
        for n in range(count):
            last, _ = yield leader.group.propose(PutJobs((_spec(f"{prefix}{n}"),)))
        return last

    def leader(self, members):
        leading = [m for m in members if m.group is not None and m.group.is_leader()]
        return leading[0] if len(leading) == 1 else None


class OneMemberTests(RaftGroupTestCase):
    @defer.inlineCallbacks
    def test_a_lone_member_leads_at_once_and_commits_on_its_own_fsync(self):
        _, [member] = self.members(1)
        yield member.start()
        self.assertTrue(IShardLog.providedBy(member.group))
        yield _until(member.group.is_leader)
        index, stored = yield member.group.propose(PutJobs((_spec("a"), _spec("b"))))
        self.assertEqual([job.id for job in stored], ["a", "b"])
        self.assertEqual(member.group.applied_index, index)
        job = yield member.group.store.get("c", "a")
        self.assertEqual(job.version, index)

    @defer.inlineCallbacks
    def test_a_restart_keeps_every_answered_write_and_goes_on(self):
        member = yield self.leading_member()
        answered = []
        for n in range(20):
            index, _ = yield member.group.propose(PutJobs((_spec(f"j{n}"),)))
            answered.append(index)
        found = yield member.group.propose(DeleteJob("c", "j0"))
        self.assertTrue(found[1])
        yield member.stop()
        yield member.start()
        yield _until(member.group.is_leader)
        self.assertGreaterEqual(member.group.applied_index, found[0])
        self.assertIsNone((yield member.group.store.get("c", "j0")))
        job = yield member.group.store.get("c", "j19")
        self.assertEqual(job.version, answered[-1])
        index, _ = yield member.group.propose(PutJobs((_spec("after"),)))
        self.assertGreater(index, found[0])

    @defer.inlineCallbacks
    def test_proposals_of_one_turn_share_a_ready(self):
        member = yield self.leading_member()
        persisted = []
        disk = member.group._disk
        real_persist = disk.persist

        def persist(ready):
            persisted.append(len(ready.entries))
            return real_persist(ready)

        disk.persist = persist
        answers = [member.group.propose(PutJobs((_spec(f"j{n}"),))) for n in range(50)]
        yield defer.gatherResults(answers)
        self.assertEqual(persisted[0], 50)

    @defer.inlineCallbacks
    def test_a_ready_is_persisted_while_the_last_ones_apply_runs(self):
        member = yield self.leading_member()
        group = member.group
        held = _hold_applies(self, group.store)
        storage = group._storage
        applied = group.applied_index
        first = group.propose(PutJobs((_spec("a"),)))
        # Durable and committed (a lone member), its apply held.
        yield _until(lambda: storage.last_index() == applied + 1)
        second = group.propose(PutJobs((_spec("b"),)))
        # The next Ready is persisted while that apply still waits.
        yield _until(lambda: storage.last_index() == applied + 2)
        self.assertFalse(first.called)
        held.callback(None)
        (index_a, _), (index_b, _) = yield defer.gatherResults([first, second])
        self.assertEqual((index_b, group.applied_index), (index_a + 1, index_b))

    @defer.inlineCallbacks
    def test_no_lease_until_the_store_applied_the_terms_first_entry(self):
        member = yield self.leading_member()
        yield member.stop()
        yield member.start()
        group = member.group
        held = _hold_applies(self, group.store)
        # The new term's no-op is durable and committed, and the core has moved past
        # it; the store has not applied it.
        core = group.core
        yield _until(lambda: group.leads and core.log.applied >= core.lease_applied_index)
        self.assertFalse(group.is_leader())
        held.callback(None)
        yield _until(group.is_leader)

    @defer.inlineCallbacks
    def test_a_closed_group_refuses_and_fails_what_waits(self):
        member = yield self.leading_member()
        group = member.group
        yield member.stop()
        yield self.assertFailure(group.propose(PutJobs((_spec("x"),))), Unavailable)


class ThreeMemberTests(RaftGroupTestCase):
    @defer.inlineCallbacks
    def test_one_leader_and_every_store_applies_the_write(self):
        _, members = yield self.start_all()
        leader = self.leader(members)
        index, _ = yield leader.group.propose(PutJobs((_spec("a"),)))
        yield _until(lambda: all(m.group.applied_index >= index for m in members))
        for m in members:
            job = yield m.group.store.get("c", "a")
            self.assertEqual(job.version, index)

    @defer.inlineCallbacks
    def test_a_follower_refuses_proposals_naming_the_leader(self):
        _, members = yield self.start_all()
        leader = self.leader(members)
        follower = next(m for m in members if m is not leader)
        yield _until(lambda: follower.group.leader == leader.node_id)
        failure = yield self.assertFailure(
            follower.group.propose(PutJobs((_spec("a"),))), NotLeader
        )
        self.assertEqual(failure.leader, leader.node_id)

    @defer.inlineCallbacks
    def test_a_leader_whose_timers_stalled_holds_no_lease(self):
        # The reactor's timers follow the wall clock: stepped back, they stall while
        # time goes on. The ticks not counted yet count against the lease all the same.
        ahead = {}
        _, members = self.members(3)
        for m in members:
            m.host_options["monotonic"] = lambda n=m.node_id: time.monotonic() + ahead.get(n, 0)
            yield m.start()
        yield _until(lambda: self.leader(members) is not None)
        leader = self.leader(members)
        ahead[leader.node_id] = 5.0
        self.assertFalse(leader.group.is_leader())

    @defer.inlineCallbacks
    def _started_and_heard(self, monotonic_ahead=None):
        """Three members, each telling ``told[node]`` of its leadership, their clocks
        ahead by ``monotonic_ahead[node]`` seconds (read as they tick); fires with
        the members and ``told`` once one leads and was told so (`is_leader` can hold
        a moment before the group's next turn tells its listeners)."""
        monotonic_ahead = {} if monotonic_ahead is None else monotonic_ahead
        _, members = self.members(3)
        told = {}
        for m in members:
            m.host_options["monotonic"] = (
                lambda n=m.node_id: time.monotonic() + monotonic_ahead.get(n, 0)
            )
            yield m.start()
            told[m.node_id] = []
            m.group.on_leadership(told[m.node_id].append)

        def told_leader():
            leader = self.leader(members)
            return leader is not None and told[leader.node_id] == [True]

        yield _until(told_leader)
        return members, told

    @defer.inlineCallbacks
    def test_a_lease_that_lapses_while_the_member_goes_on_leading_is_not_reported(self):
        ahead = {}
        members, told = yield self._started_and_heard(ahead)
        leader = self.leader(members)
        term = leader.group.core.term
        self.assertEqual(told[leader.node_id], [True])
        # Its timers run late by more than the lease: the lease lapses until the
        # ticks it missed are counted and a heartbeat round is answered again.
        ahead[leader.node_id] = 0.4
        self.assertFalse(leader.group.is_leader())
        yield _until(leader.group.is_leader)
        self.assertEqual(leader.group.core.term, term)
        self.assertEqual(told[leader.node_id], [True])

    @defer.inlineCallbacks
    def test_a_leader_that_steps_down_is_reported_once(self):
        members, told = yield self._started_and_heard()
        old = self.leader(members)
        self.link.isolate(old.node_id)
        yield _until(lambda: not old.group.leads)
        others = [m for m in members if m is not old]
        yield _until(lambda: self.leader(others) is not None)
        self.assertEqual(told[old.node_id], [True, False])
        self.assertEqual(told[self.leader(others).node_id], [True])

    @defer.inlineCallbacks
    def test_a_leader_that_closes_is_reported_no_longer_leading(self):
        members, told = yield self._started_and_heard()
        leader = self.leader(members)
        yield leader.stop()
        self.assertEqual(told[leader.node_id], [True, False])

    @defer.inlineCallbacks
    def test_a_wait_for_another_leader_ends_when_the_transfer_gives_up(self):
        link, members = yield self.start_all()
        leader = self.leader(members)
        away = next(m for m in members if m is not leader)
        # The successor never hears of the transfer: after an election timeout the
        # leader takes proposals again, and what waited for the new leader goes to it.
        link.cut.add(frozenset((leader.node_id, away.node_id)))
        self.assertTrue(leader.group.transfer_leadership(away.node_id))
        waited = yield leader.group.wait_for_leader(besides=leader.node_id)
        self.assertEqual(waited, leader.node_id)
        yield leader.group.propose(PutJobs((_spec("a"),)))

    @defer.inlineCallbacks
    def test_a_read_while_no_leader_is_known_waits_for_one(self):
        _, members = self.members(3)
        for m in members:
            yield m.start()
        # Asked before the first election: it waits for it instead of failing.
        member = members[1]
        self.assertIsNone(member.group.leader)
        yield member.group.read_barrier()
        self.assertIsNotNone(member.group.leader)

    @defer.inlineCallbacks
    def test_a_read_gives_up_when_no_leader_is_known_in_time(self):
        _, members = self.members(3)
        # One member of three: it never learns of a leader, and stops waiting for one.
        yield members[0].start()
        error = yield self.assertFailure(members[0].group.read_barrier(), Unavailable)
        self.assertNotIsInstance(error, NotLeader)  # the refusal of a read not waited for

    @defer.inlineCallbacks
    def test_an_isolated_leader_loses_its_lease_and_the_others_take_over(self):
        link, members = yield self.start_all()
        old = self.leader(members)
        index, _ = yield old.group.propose(PutJobs((_spec("before"),)))
        link.isolate(old.node_id)
        yield _until(lambda: not old.group.is_leader())
        others = [m for m in members if m is not old]
        yield _until(lambda: self.leader(others) is not None)
        new = self.leader(others)
        # The write the old leader answered survived the change of leader.
        job = yield new.group.store.get("c", "before")
        self.assertEqual(job.version, index)
        # A write to the cut-off leader cannot commit.
        stranded = old.group.propose(PutJobs((_spec("lost"),)))
        index2, _ = yield new.group.propose(PutJobs((_spec("after"),)))
        link.heal()
        yield _until(lambda: old.group.applied_index >= index2)
        self.assertIsNone((yield old.group.store.get("c", "lost")))
        job = yield old.group.store.get("c", "after")
        self.assertEqual(job.version, index2)
        # Its entry was replaced by the new leader's: the proposal failed, retryably.
        yield self.assertFailure(stranded, Unavailable)

    @defer.inlineCallbacks
    def test_a_member_restarted_after_missing_writes_catches_up(self):
        _, members = yield self.start_all()
        leader = self.leader(members)
        away = next(m for m in members if m is not leader)
        yield away.stop()
        last = None
        for n in range(30):
            last, _ = yield leader.group.propose(PutJobs((_spec(f"j{n}"),)))
        yield away.start()
        yield _until(lambda: away.group.applied_index >= last)
        job = yield away.group.store.get("c", "j29")
        self.assertEqual(job.version, last)

    @defer.inlineCallbacks
    def test_linearizable_reads_on_a_follower_wait_for_the_leaders_commit(self):
        _, members = yield self.start_all()
        leader = self.leader(members)
        follower = next(m for m in members if m is not leader)
        index, _ = yield leader.group.propose(PutJobs((_spec("seen"),)))
        yield follower.group.read_barrier()
        self.assertGreaterEqual(follower.group.applied_index, index)
        job = yield follower.group.store.get("c", "seen")
        self.assertEqual(job.version, index)

    @defer.inlineCallbacks
    def test_a_read_whose_leader_is_lost_fails_retryably_in_time(self):
        link, members = yield self.start_all(host_options={"proposal_timeout": 0.5})
        leader = self.leader(members)
        follower = next(m for m in members if m is not leader)
        yield _until(lambda: follower.group.leader == leader.node_id)
        link.isolate(follower.node_id)
        # The ReadIndex request to the leader it still knows is dropped.
        yield self.assertFailure(follower.group.read_barrier(), Unavailable)

    @defer.inlineCallbacks
    def test_a_read_sent_to_a_lost_leader_is_asked_again_of_the_next(self):
        link, members = yield self.start_all(host_options={"proposal_timeout": 5.0})
        old = self.leader(members)
        follower = next(m for m in members if m is not old)
        yield _until(lambda: follower.group.leader == old.node_id)
        index, _ = yield old.group.propose(PutJobs((_spec("seen"),)))
        link.isolate(old.node_id)
        # Sent to the old leader, and lost; the majority elects another meanwhile.
        yield follower.group.read_barrier()
        self.assertNotEqual(follower.group.leader, old.node_id)
        self.assertGreaterEqual(follower.group.applied_index, index)

    @defer.inlineCallbacks
    def test_a_leader_hands_over_to_its_successor(self):
        _, members = yield self.start_all()
        old = self.leader(members)
        index, _ = yield old.group.propose(PutJobs((_spec("seen"),)))
        yield _until(lambda: old.group.successor() is not None)
        successor = old.group.successor()
        self.assertIn(successor, {m.node_id for m in members} - {old.node_id})
        self.assertTrue(old.group.transfer_leadership(successor))
        new = next(m for m in members if m.node_id == successor)
        yield _until(lambda: new.group.is_leader())
        self.assertFalse(old.group.leads)
        job = yield new.group.store.get("c", "seen")
        self.assertEqual(job.version, index)

    @defer.inlineCallbacks
    def test_a_follower_acknowledges_entries_only_once_they_are_durable(self):
        _, members = yield self.start_all()
        leader = self.leader(members)
        follower = next(m for m in members if m is not leader)
        durable = [0]
        early = []
        disk, host = follower.group._disk, follower.host
        real_persist, real_send = disk.persist, host.send

        def persist(ready):
            d = real_persist(ready)
            if ready.entries:
                last = ready.entries[-1].index
                d.addCallback(lambda _: durable.__setitem__(0, max(durable[0], last)))
            return d

        def send(group, message):
            acked = message.type == MessageType.APPEND_RESP and not message.reject
            if acked and message.index > durable[0]:
                early.append(message)
            real_send(group, message)

        disk.persist, host.send = persist, send
        for n in range(20):
            yield leader.group.propose(PutJobs((_spec(f"j{n}"),)))
        self.assertGreater(durable[0], 0)
        self.assertEqual(early, [])


COMPACTING = dict(compact_every=40, keep_entries=5)


class RepairedLogTests(RaftGroupTestCase):
    @defer.inlineCallbacks
    def test_a_member_started_after_a_repair_votes_once_it_caught_up(self):
        _, members = yield self.start_all()
        leader = self.leader(members)
        away = next(m for m in members if m is not leader)
        yield away.stop()
        yield away.start(catching_up=True)
        self.assertTrue(away.group.core.catching_up)
        self.assertFalse(away.host.caught_up())
        yield self.write(leader, 3)
        yield _until(away.host.caught_up)

    @defer.inlineCallbacks
    def test_a_lone_member_started_after_a_repair_leads_at_once(self):
        _, [member] = self.members(1)
        yield member.start(catching_up=True)
        yield _until(member.group.is_leader)
        self.assertTrue(member.host.caught_up())


class ShardMapTests(RaftGroupTestCase):
    @defer.inlineCallbacks
    def test_a_group_of_another_shard_map_takes_no_message_of_this_one(self):
        # node3 applied a new shard map first: its group 1 is the new map's (blank,
        # waiting for its leader), while the others still run the old map's group 1,
        # whose leader matched node3's old log and tells it of a commit past its end.
        _, members = yield self.start_all()
        leader = self.leader(members)
        index = yield self.write(leader, 3)
        old = next(m for m in members if m is not leader)
        yield _until(lambda: old.group.applied_index >= index)
        yield old.stop()
        new_map = _Member(self, os.path.join(self.base, "new-map"), old.node_id, self.link,
                          None, incarnation=7)
        os.makedirs(new_map.directory)
        self.addCleanup(new_map.stop)
        yield new_map.start()
        dropped = new_map.host.unknown_group_messages
        yield _until(lambda: new_map.host.unknown_group_messages >= dropped + 10)
        self.assertTrue(new_map.group.blank)
        self.assertEqual((new_map.group.core.term, new_map.group.core.leader), (0, None))


class SnapshotTests(RaftGroupTestCase):
    @defer.inlineCallbacks
    def test_compaction_cuts_the_log_and_a_restart_keeps_everything(self):
        member = yield self.leading_member(**COMPACTING)
        last = yield self.write(member, 200)
        yield member.group.compact()
        storage = member.group._storage
        self.assertGreater(storage.first_index(), 100)
        self.assertGreater(storage.snapshot().index, 100)
        yield member.stop()
        yield member.start()
        yield _until(member.group.is_leader)
        self.assertGreaterEqual(member.group.applied_index, last)
        for n in (0, 150, 199):
            self.assertIsNotNone((yield member.group.store.get("c", f"j{n}")))
        after, _ = yield member.group.propose(PutJobs((_spec("after"),)))
        self.assertGreater(after, last)

    @defer.inlineCallbacks
    def test_a_follower_behind_the_cut_gets_the_leaders_store(self):
        _, members = yield self.start_all(**COMPACTING)
        leader = self.leader(members)
        away = next(m for m in members if m is not leader)
        yield away.stop()
        last = yield self.write(leader, 200)
        yield leader.group.compact()
        self.assertGreater(leader.group._storage.first_index(), 100)
        yield away.start()
        yield _until(lambda: away.group.applied_index >= last)
        self.assertEqual(away.group.store.applied_index, away.group.applied_index)
        for n in (0, 100, 199):
            job = yield away.group.store.get("c", f"j{n}")
            self.assertIsNotNone(job, f"j{n}")
        more = yield self.write(leader, 5, prefix="more")
        yield _until(lambda: away.group.applied_index >= more)
        self.assertIsNotNone((yield away.group.store.get("c", "more4")))

    @defer.inlineCallbacks
    def test_a_new_member_joins_as_learner_from_a_snapshot_and_is_promoted(self):
        _, members = yield self.start_all(**COMPACTING)
        leader = self.leader(members)
        last = yield self.write(leader, 120)
        yield leader.group.compact()
        newcomer = self.new_member("node4", **COMPACTING)
        yield newcomer.start()
        yield leader.group.change_membership(ConfChange(ConfChangeKind.ADD_LEARNER, "node4"))
        self.assertIn("node4", leader.group.conf.learners)
        yield _until(lambda: newcomer.group.applied_index >= last)
        yield leader.group.change_membership(ConfChange(ConfChangeKind.PROMOTE, "node4"))
        self.assertIn("node4", leader.group.conf.voters)
        yield _until(lambda: "node4" in newcomer.group.conf.voters)
        for n in (0, 119):
            self.assertIsNotNone((yield newcomer.group.store.get("c", f"j{n}")))

    @defer.inlineCallbacks
    def test_an_install_cut_short_by_a_crash_is_finished_on_open(self):
        _, members = yield self.start_all(**COMPACTING)
        leader = self.leader(members)
        away = next(m for m in members if m is not leader)
        yield away.stop()
        last = yield self.write(leader, 200)
        yield leader.group.compact()
        # The first restore fails as a crash would cut it: after the snapshot's point
        # is in the Raft state, before the store holds the data.
        real_restore = VnodeStore.restore
        calls = []

        def restore(store, path):
            calls.append(path)
            if len(calls) == 1:
                return defer.fail(OSError("power cut"))
            return real_restore(store, path)

        self.patch(VnodeStore, "restore", restore)
        yield away.start()
        yield _until(lambda: away.group._broken is not None)
        self.flushLoggedErrors(OSError)
        yield away.stop()
        self.assertTrue(os.path.exists(os.path.join(away.directory, "jobs.sqlite.incoming")))
        yield away.start()
        self.assertEqual(len(calls), 2)
        yield _until(lambda: away.group.applied_index >= last)
        self.assertIsNotNone((yield away.group.store.get("c", "j0")))

    @defer.inlineCallbacks
    def test_a_store_behind_its_raft_snapshot_without_the_data_refuses_to_open(self):
        _, members = yield self.start_all(**COMPACTING)
        leader = self.leader(members)
        away = next(m for m in members if m is not leader)
        yield away.stop()
        yield self.write(leader, 200)
        yield leader.group.compact()
        self.patch(VnodeStore, "restore", lambda store, path: defer.fail(OSError("cut")))
        yield away.start()
        yield _until(lambda: away.group._broken is not None)
        self.flushLoggedErrors(OSError)
        yield away.stop()
        os.remove(os.path.join(away.directory, "jobs.sqlite.incoming"))
        failure = yield self.assertFailure(away.start(), CorruptLog)
        self.assertIn("behind the Raft snapshot", str(failure))
        away.group = None
        away.host.stop()
        yield away.engine.close()
        away.io.stop()


class SnapshotChunkFileTests(unittest.TestCase):
    """How a follower writes a snapshot's chunks: to disk as they come, whole only at
    its last chunk, durable as ``.incoming`` only for the one it installs."""

    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        self.receiving = os.path.join(directory, "jobs.sqlite.receiving")
        self.incoming = os.path.join(directory, "jobs.sqlite.incoming")

    def read(self, path):
        with open(path, "rb") as f:
            return f.read()

    def test_chunks_written_over_several_readys_make_the_installed_file(self):
        write_snapshot_chunks(self.receiving, self.incoming, [SnapshotChunk(0, b"abc")], False)
        self.assertEqual(self.read(self.receiving), b"abc")
        self.assertFalse(os.path.exists(self.incoming))
        write_snapshot_chunks(
            self.receiving, self.incoming, [SnapshotChunk(3, b"def", last=True)], True
        )
        self.assertEqual(self.read(self.incoming), b"abcdef")
        self.assertFalse(os.path.exists(self.receiving))

    def test_a_snapshot_started_over_drops_what_the_earlier_one_wrote(self):
        write_snapshot_chunks(
            self.receiving, self.incoming, [SnapshotChunk(0, b"old-old-"), SnapshotChunk(8, b"x")],
            False,
        )
        chunks = [SnapshotChunk(0, b"new"), SnapshotChunk(3, b"!", last=True)]
        write_snapshot_chunks(self.receiving, self.incoming, chunks, True)
        self.assertEqual(self.read(self.incoming), b"new!")

    def test_a_newer_snapshot_begun_in_the_same_ready_does_not_mix_with_the_installed_one(self):
        chunks = [
            SnapshotChunk(0, b"first"),
            SnapshotChunk(5, b"-whole", last=True),
            SnapshotChunk(0, b"second"),
        ]
        write_snapshot_chunks(self.receiving, self.incoming, chunks, True)
        self.assertEqual(self.read(self.incoming), b"first-whole")
        self.assertEqual(self.read(self.receiving), b"second")

    def test_the_data_of_a_snapshot_not_installed_is_removed(self):
        chunks = [SnapshotChunk(0, b"had it", last=True)]
        write_snapshot_chunks(self.receiving, self.incoming, chunks, False)
        self.assertFalse(os.path.exists(self.receiving))
        self.assertFalse(os.path.exists(self.incoming))


def _hold_applies(testcase, store):
    """Make ``store``'s apply transactions wait until the returned Deferred fires (the
    entries are durable, not applied); released at cleanup if the test did not."""
    held = defer.Deferred()
    real_apply = store.apply
    store.apply = lambda batch: held.addCallback(lambda _: real_apply(batch))
    testcase.addCleanup(lambda: None if held.called else held.callback(None))
    return held


class CounterTests(RaftGroupTestCase):
    """What a member counts about itself and reports in `RaftGroup.stats`."""

    @defer.inlineCallbacks
    def test_a_lone_leader_counts_its_proposals_and_their_commit_latency(self):
        member = yield self.leading_member()
        last = yield self.write(member, 12)
        status = member.group.stats()
        self.assertEqual((status.role, status.leader, status.lease), ("leader", "node1", True))
        self.assertEqual(status.voters, ("node1",))
        self.assertEqual((status.commit_index, status.applied_index), (last, last))
        self.assertEqual(status.apply_lag, 0)
        counters = status.counters
        self.assertEqual((counters.proposals, counters.proposals_failed), (12, 0))
        self.assertEqual(counters.leader_changes, 1)
        latency = counters.commit_seconds
        self.assertEqual(latency.total, 12)
        self.assertEqual(latency.cumulative()[-1], (float("inf"), 12))
        self.assertGreater(latency.sum, 0)

    @defer.inlineCallbacks
    def test_apply_lag_counts_the_entries_the_store_has_not_applied(self):
        member = yield self.leading_member()
        store = member.group.store
        held = _hold_applies(self, store)
        answer = member.group.propose(PutJobs((_spec("a"),)))
        yield _until(lambda: member.group.stats().last_index > store.applied_index)
        self.assertEqual(member.group.stats().apply_lag, 1)
        held.callback(None)
        yield answer
        self.assertEqual(member.group.stats().apply_lag, 0)

    @defer.inlineCallbacks
    def test_refused_and_stranded_proposals_fail_and_leaders_are_counted(self):
        link, members = yield self.start_all()
        old = self.leader(members)
        term = old.group.stats().term
        follower = next(m for m in members if m is not old)
        yield _until(lambda: follower.group.leader == old.node_id)
        yield self.assertFailure(follower.group.propose(PutJobs((_spec("a"),))), NotLeader)
        self.assertEqual(follower.group.stats().role, "follower")
        self.assertEqual(follower.group.stats().leader, old.node_id)
        self.assertEqual(
            (follower.group.counters.proposals, follower.group.counters.proposals_failed),
            (1, 1),
        )
        changes = {m.node_id: m.group.counters.leader_changes for m in members}
        link.isolate(old.node_id)
        others = [m for m in members if m is not old]
        yield _until(lambda: self.leader(others) is not None)
        stranded = old.group.propose(PutJobs((_spec("lost"),)))
        new = self.leader(others)
        yield new.group.propose(PutJobs((_spec("after"),)))
        link.heal()
        yield self.assertFailure(stranded, Unavailable)
        self.assertEqual(old.group.counters.proposals_failed, 1)
        self.assertEqual(new.group.counters.commit_seconds.total, 1)
        yield _until(lambda: old.group.leader == new.node_id)
        self.assertGreater(new.group.stats().term, term)
        for m in members:
            self.assertGreater(m.group.counters.leader_changes, changes[m.node_id], m.node_id)

    @defer.inlineCallbacks
    def test_a_snapshot_sent_and_installed_is_counted_on_both_sides(self):
        _, members = yield self.start_all(**COMPACTING)
        leader = self.leader(members)
        away = next(m for m in members if m is not leader)
        yield away.stop()
        last = yield self.write(leader, 200)
        yield leader.group.compact()
        self.assertEqual(leader.group.counters.snapshots_sent, 0)
        yield away.start()
        # Counted once the install is finished, just after the store holds the data.
        yield _until(lambda: away.group.counters.snapshots_received == 1)
        self.assertGreaterEqual(away.group.applied_index, last)
        self.assertGreaterEqual(leader.group.counters.snapshots_sent, 1)
        self.assertEqual(away.group.counters.snapshots_sent, 0)

    @defer.inlineCallbacks
    def test_proposals_that_expire_or_meet_a_store_failure_are_counted_failed(self):
        member = yield self.leading_member()
        group = member.group
        held = _hold_applies(self, group.store)
        member.host.proposal_timeout = 0.05
        late = group.propose(PutJobs((_spec("late"),)))
        failure = yield self.assertFailure(late, Unavailable)
        self.assertIn("did not commit in time", str(failure))
        self.assertEqual(group.counters.proposals_failed, 1)
        member.host.proposal_timeout = 60.0
        stuck = group.propose(PutJobs((_spec("stuck"),)))
        held.errback(OSError("the disk is gone"))
        yield self.assertFailure(stuck, StorageError)
        self.flushLoggedErrors(OSError)
        status = group.stats()
        self.assertIn("the disk is gone", status.error)
        self.assertEqual((status.role, status.lease), (None, False))
        self.assertEqual((group.counters.proposals, group.counters.proposals_failed), (2, 2))
        self.assertEqual(group.counters.commit_seconds.total, 0)

    @defer.inlineCallbacks
    def test_closing_fails_what_waits_and_a_closed_member_refuses_counted(self):
        member = yield self.leading_member()
        group = member.group
        held = _hold_applies(self, group.store)
        waiting = group.propose(PutJobs((_spec("w"),)))
        yield _until(lambda: group.stats().apply_lag == 1)
        stopping = member.stop()
        yield self.assertFailure(waiting, Unavailable)
        held.callback(None)
        yield stopping
        status = group.stats()
        self.assertEqual((status.role, status.leader, status.lease), (None, None, False))
        yield self.assertFailure(group.propose(PutJobs((_spec("x"),))), Unavailable)
        self.assertEqual((group.counters.proposals, group.counters.proposals_failed), (2, 2))
