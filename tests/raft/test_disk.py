"""A Raft member's persistent state: what `persist` wrote, `load` gives back."""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from timemachine.raft.disk import MemberDisk
from timemachine.raft.types import ConfState, Entry, EntryKind, HardState, Ready, Snapshot
from timemachine.storage.iothread import IOThread

CONF = ConfState(frozenset({1, 2, 3}))


def entries(first, last, term, tag=b"x"):
    return tuple(Entry(i, term, tag + b"%d" % i) for i in range(first, last + 1))


class MemberDiskTests(unittest.TestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.io = IOThread(reactor, "member-disk-test")
        self.io.start()
        self.addCleanup(self.io.stop)
        self.disk = None

    @defer.inlineCallbacks
    def reopen(self):
        if self.disk is not None:
            yield self.disk.close()
        self.disk = MemberDisk(self.directory, reactor, self.io)
        self.addCleanup(self.disk.close)
        storage = yield self.disk.load(bootstrap=CONF)
        return storage

    @defer.inlineCallbacks
    def test_a_new_member_starts_from_its_bootstrap_membership(self):
        storage = yield self.reopen()
        self.assertEqual(storage.initial_state(), (HardState(), CONF))
        self.assertEqual(storage.last_index(), 0)

    @defer.inlineCallbacks
    def test_entries_and_hard_state_survive_a_restart(self):
        yield self.reopen()
        conf_change = Entry(4, 1, b'{"kind": 0}', EntryKind.CONF_CHANGE)
        yield self.disk.persist(
            Ready(hard_state=HardState(1, 2, 3), entries=(*entries(1, 3, 1), conf_change))
        )
        storage = yield self.reopen()
        self.assertEqual(storage.initial_state()[0], HardState(1, 2, 3))
        self.assertEqual(storage.entries(1, 5), [*entries(1, 3, 1), conf_change])

    @defer.inlineCallbacks
    def test_a_conflicting_suffix_is_replaced(self):
        yield self.reopen()
        yield self.disk.persist(Ready(entries=entries(1, 6, 1)))
        yield self.disk.persist(
            Ready(entries=entries(4, 5, 2, b"new"), hard_state=HardState(2, 3, 0))
        )
        storage = yield self.reopen()
        self.assertEqual(storage.last_index(), 5)
        self.assertEqual(storage.entries(1, 6), [*entries(1, 3, 1), *entries(4, 5, 2, b"new")])

    @defer.inlineCallbacks
    def test_an_installed_snapshot_replaces_the_log(self):
        yield self.reopen()
        yield self.disk.persist(Ready(entries=entries(1, 4, 1)))
        learners = ConfState(frozenset({1, 2}), frozenset({"n4"}))
        snapshot = Snapshot(10, 3, learners, b"\x00state machine\n bytes")
        yield self.disk.persist(Ready(snapshot=snapshot, hard_state=HardState(3, None, 10)))
        yield self.disk.persist(Ready(entries=entries(11, 12, 3)))
        storage = yield self.reopen()
        self.assertEqual(storage.snapshot(), snapshot)
        self.assertEqual(storage.initial_state(), (HardState(3, None, 10), learners))
        self.assertEqual((storage.first_index(), storage.last_index()), (11, 12))
        self.assertEqual(storage.entries(11, 13), list(entries(11, 12, 3)))

    @defer.inlineCallbacks
    def test_compaction_keeps_the_snapshot_and_the_entries_after_it(self):
        yield self.reopen()
        yield self.disk.persist(Ready(entries=entries(1, 8, 1), hard_state=HardState(1, 1, 8)))
        yield self.disk.compact(Snapshot(5, 1, CONF, b"five"))
        storage = yield self.reopen()
        self.assertEqual(storage.snapshot().index, 5)
        self.assertEqual(storage.entries(6, 9), list(entries(6, 8, 1)))
