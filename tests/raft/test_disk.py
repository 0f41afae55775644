"""A Raft member's persistent state: what `persist` wrote, `load` gives back."""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from timemachine.domain.errors import CorruptLog, LogBehindCommit, StorageError
from timemachine.raft.disk import MemberDisk
from timemachine.raft.types import ConfState, Entry, EntryKind, HardState, Ready, Snapshot
from timemachine.storage.iothread import IOThread

CONF = ConfState(frozenset({1, 2, 3}))


def entries(first, last, term, tag=b"x"):
    return tuple(Entry(i, term, tag + b"%d" % i) for i in range(first, last + 1))


class _MemberDiskCase(unittest.TestCase):
    """A member directory in a temp dir, and its disk (re)opened on demand."""

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

    def segment_files(self):
        wal = os.path.join(self.directory, "wal")
        return [os.path.join(wal, name) for name in sorted(os.listdir(wal))]


class MemberDiskTests(_MemberDiskCase):
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


# A WAL record of entry k < 10 made by entries(): header, kind byte, b"x%d" % k.
RECORD_BYTES = 24 + 1 + 2


class CrashBetweenStepsTests(_MemberDiskCase):
    """A crash between the steps of `MemberDisk.persist`, made by a real failure of the
    next step (the files are then exactly what such a crash leaves)."""

    def break_hard_state_file(self):
        """Make replacing hardstate.json fail: a directory where its temporary goes."""
        blocker = os.path.join(self.directory, "hardstate.json.tmp")
        os.mkdir(blocker)
        return lambda: os.rmdir(blocker)

    @defer.inlineCallbacks
    def test_the_hard_state_is_durable_with_the_entries_it_covers(self):
        yield self.reopen()
        yield self.disk.persist(Ready(entries=entries(1, 3, 1), hard_state=HardState(1, 2, 1)))
        repair = self.break_hard_state_file()
        promote = Entry(6, 1, b'{"kind": 1, "node": 4}', EntryKind.CONF_CHANGE)
        ready = Ready(entries=(*entries(4, 5, 1), promote), hard_state=HardState(1, 2, 6))
        yield self.assertFailure(self.disk.persist(ready), IsADirectoryError)
        repair()
        storage = yield self.reopen()
        self.assertEqual(storage.hard_state, HardState(1, 2, 6))
        self.assertEqual(storage.entries(4, 7), [*entries(4, 5, 1), promote])
        # A later hard state saved alone (a vote in a new term) wins over the WAL's copy.
        yield self.disk.persist(Ready(hard_state=HardState(2, 3, 6)))
        storage = yield self.reopen()
        self.assertEqual(storage.hard_state, HardState(2, 3, 6))

    @defer.inlineCallbacks
    def test_a_torn_batch_is_committed_only_as_far_as_it_survived(self):
        yield self.reopen()
        repair = self.break_hard_state_file()
        ready = Ready(entries=entries(1, 6, 1), hard_state=HardState(1, 2, 6))
        yield self.assertFailure(self.disk.persist(ready), IsADirectoryError)
        repair()
        yield self.disk.close()
        # Tear the batch: cut the segment in the middle of entry 5.
        [segment] = self.segment_files()
        with open(segment, "r+b") as f:
            f.truncate(os.path.getsize(segment) - RECORD_BYTES - RECORD_BYTES // 2)
        self.disk = None
        storage = yield self.reopen()
        self.assertEqual(storage.last_index(), 4)
        self.assertEqual(storage.hard_state, HardState(1, 2, 4))

    @defer.inlineCallbacks
    def test_a_log_ending_below_its_commit_index_refuses_to_load(self):
        yield self.reopen()
        yield self.disk.persist(Ready(entries=entries(1, 5, 1), hard_state=HardState(1, 2, 5)))
        yield self.disk.close()
        # Entry 5 gone, entry 4 torn: the log ends at entry 3.
        [segment] = self.segment_files()
        with open(segment, "r+b") as f:
            f.truncate(os.path.getsize(segment) - RECORD_BYTES - 3)
        self.disk = MemberDisk(self.directory, reactor, self.io)
        self.addCleanup(self.disk.close)
        error = yield self.assertFailure(self.disk.load(bootstrap=CONF), LogBehindCommit)
        self.assertIsInstance(error, CorruptLog)
        message = str(error)
        self.assertIn(os.path.join(self.directory, "hardstate.json"), message)
        self.assertIn("commit index 5", message)
        self.assertIn("ends at entry 3", message)
        self.assertIn(f"{segment} ends at byte {os.path.getsize(segment)}", message)
        self.assertEqual((error.path, error.offset), (segment, os.path.getsize(segment)))

    @defer.inlineCallbacks
    def test_an_install_cut_short_leaves_no_conflicting_entries_above_the_snapshot(self):
        yield self.reopen()
        yield self.disk.persist(Ready(entries=entries(1, 12, 1), hard_state=HardState(1, 2, 2)))
        # The log cannot be emptied once the WAL is closed: persist stops right after
        # the snapshot file was written.
        yield self.disk.close()
        snapshot = Snapshot(10, 3, CONF, b"leader's state")
        ready = Ready(snapshot=snapshot, hard_state=HardState(3, None, 10))
        yield self.assertFailure(self.disk.persist(ready), StorageError)
        self.disk = None
        storage = yield self.reopen()
        self.assertEqual(storage.snapshot(), snapshot)
        self.assertEqual((storage.first_index(), storage.last_index()), (11, 10))
        self.assertEqual(storage.hard_state, HardState(1, 2, 2))
        # The install is complete on disk too: the leader's entries follow the snapshot.
        yield self.disk.persist(Ready(entries=entries(11, 12, 3, b"new")))
        storage = yield self.reopen()
        self.assertEqual(storage.entries(11, 13), list(entries(11, 12, 3, b"new")))


class CompactionTests(_MemberDiskCase):
    @defer.inlineCallbacks
    def test_compaction_keeps_a_tail_of_entries_below_the_snapshot(self):
        # One record per segment, so the cut falls exactly where it is asked to.
        self.disk = MemberDisk(self.directory, reactor, self.io, keep_entries=3, segment_bytes=1)
        self.addCleanup(self.disk.close)
        yield self.disk.load(bootstrap=CONF)
        yield self.disk.persist(Ready(entries=entries(1, 20, 1), hard_state=HardState(1, 1, 20)))
        yield self.disk.compact(Snapshot(15, 1, CONF, b"fifteen"))
        self.assertEqual(len(self.segment_files()), 9)  # entries 12..20
        yield self.disk.close()
        self.disk = MemberDisk(self.directory, reactor, self.io, keep_entries=3, segment_bytes=1)
        self.addCleanup(self.disk.close)
        storage = yield self.disk.load(bootstrap=CONF)
        self.assertEqual(storage.snapshot().index, 15)
        # Entry 12 stays as the point the log matches from; 13..15 can still be sent.
        self.assertEqual(storage.first_index(), 13)
        self.assertEqual(storage.term(12), 1)
        self.assertEqual(storage.entries(13, 21), list(entries(13, 20, 1)))
        self.assertEqual(storage.hard_state, HardState(1, 1, 20))
