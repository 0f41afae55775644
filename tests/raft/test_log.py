"""Tests for the Raft log storage (`MemoryStorage`) and the core's view of it (`RaftLog`)."""

from __future__ import annotations

from twisted.trial import unittest

from timemachine.raft.log import RaftLog
from timemachine.raft.storage import MemoryStorage, SnapshotOutOfDateError
from timemachine.raft.types import (
    CompactedError,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    UnavailableError,
)


def ents(*terms: int, start: int = 1) -> list[Entry]:
    """Entries from index ``start`` with the given terms."""
    return [Entry(start + i, t, b"%d" % (start + i)) for i, t in enumerate(terms)]


class MemoryStorageTests(unittest.TestCase):
    def test_empty(self):
        st = MemoryStorage(ConfState(voters=frozenset({1, 2})))
        self.assertEqual(st.first_index(), 1)
        self.assertEqual(st.last_index(), 0)
        self.assertEqual(st.term(0), 0)
        self.assertEqual(st.initial_state(), (HardState(), ConfState(voters=frozenset({1, 2}))))
        self.assertRaises(UnavailableError, st.term, 1)

    def test_append_truncates_conflicting_suffix(self):
        st = MemoryStorage()
        st.append(ents(1, 1, 1, 2))
        st.append([Entry(3, 3), Entry(4, 3), Entry(5, 3)])
        self.assertEqual([e.term for e in st.entries(1, 6)], [1, 1, 3, 3, 3])
        self.assertEqual(st.last_index(), 5)

    def test_append_gap_refused(self):
        st = MemoryStorage()
        st.append(ents(1))
        self.assertRaises(ValueError, st.append, [Entry(5, 1)])

    def test_entries_bounds_and_size(self):
        st = MemoryStorage()
        st.append([Entry(i, 1, b"xx") for i in range(1, 6)])
        self.assertEqual(len(st.entries(1, 6, max_bytes=5)), 2)
        self.assertEqual(len(st.entries(1, 6, max_bytes=0)), 1)  # at least one
        self.assertRaises(UnavailableError, st.entries, 1, 7)

    def test_snapshot_and_compact(self):
        st = MemoryStorage()
        st.append(ents(1, 1, 2, 2, 3))
        conf = ConfState(voters=frozenset({1}))
        snap = st.create_snapshot(3, conf, b"state")
        self.assertEqual((snap.index, snap.term, snap.data), (3, 2, b"state"))
        self.assertRaises(ValueError, st.compact, 4)  # the snapshot covers only 3
        st.compact(3)
        self.assertEqual(st.first_index(), 4)
        self.assertEqual(st.term(3), 2)
        self.assertRaises(CompactedError, st.term, 2)
        self.assertRaises(CompactedError, st.entries, 3, 5)
        self.assertRaises(CompactedError, st.compact, 3)
        self.assertEqual([e.index for e in st.entries(4, 6)], [4, 5])
        self.assertRaises(SnapshotOutOfDateError, st.create_snapshot, 2, conf, b"")
        self.assertEqual(st.initial_state()[1], conf)

    def test_apply_snapshot_replaces_log(self):
        st = MemoryStorage()
        st.append(ents(1, 1))
        st.apply_snapshot(Snapshot(10, 4, ConfState(voters=frozenset({1, 2})), b"s"))
        self.assertEqual((st.first_index(), st.last_index(), st.term(10)), (11, 10, 4))
        self.assertRaises(SnapshotOutOfDateError, st.apply_snapshot, Snapshot(9, 4))
        st.append([Entry(11, 5)])
        self.assertEqual(st.last_index(), 11)


class RaftLogTests(unittest.TestCase):
    def make(self, *terms: int) -> RaftLog:
        st = MemoryStorage()
        st.append(ents(*terms))
        return RaftLog(st)

    def test_storage_and_unstable_as_one_log(self):
        log = self.make(1, 1)
        log.append([Entry(3, 2), Entry(4, 2)])
        self.assertEqual(log.last_index(), 4)
        self.assertEqual([e.index for e in log.slice(1, 5)], [1, 2, 3, 4])
        self.assertEqual([e.index for e in log.unstable_entries()], [3, 4])
        log.stable_to(4, 2)
        self.assertEqual(log.unstable_entries(), [])

    def test_stable_to_ignores_replaced_entries(self):
        log = self.make()
        log.append([Entry(1, 1), Entry(2, 1)])
        log.append([Entry(2, 2)])  # replaced after a Ready was taken
        log.stable_to(2, 1)
        self.assertEqual([e.term for e in log.unstable_entries()], [1, 2])

    def test_find_conflict(self):
        log = self.make(1, 2, 3)
        self.assertEqual(log.find_conflict([]), 0)
        self.assertEqual(log.find_conflict(ents(1, 2, 3)), 0)
        self.assertEqual(log.find_conflict(ents(2, 3, 4, start=2)), 4)
        self.assertEqual(log.find_conflict(ents(1, 4, 4)), 2)

    def test_maybe_append(self):
        log = self.make(1, 2, 3)
        self.assertIsNone(log.maybe_append(3, 2, 3, []))  # term mismatch
        self.assertIsNone(log.maybe_append(4, 3, 3, []))  # past the end
        self.assertEqual(log.maybe_append(3, 3, 3, [Entry(4, 4)]), 4)
        self.assertEqual(log.committed, 3)
        # A stale, shorter append keeps what follows it.
        self.assertEqual(log.maybe_append(2, 2, 3, [Entry(3, 3)]), 3)
        self.assertEqual(log.last_index(), 4)
        # A conflicting one replaces the suffix.
        self.assertEqual(log.maybe_append(3, 3, 3, [Entry(4, 5), Entry(5, 5)]), 5)
        self.assertEqual([e.term for e in log.all_entries()], [1, 2, 3, 5, 5])
        self.assertRaises(AssertionError, log.maybe_append, 1, 1, 3, [Entry(2, 9)])

    def test_commit_never_goes_back(self):
        log = self.make(1, 1, 1)
        log.commit_to(3)
        log.commit_to(1)
        self.assertEqual(log.committed, 3)
        self.assertRaises(AssertionError, log.commit_to, 4)

    def test_maybe_commit_only_current_term(self):
        log = self.make(1, 2)
        self.assertFalse(log.maybe_commit(2, 3))
        self.assertTrue(log.maybe_commit(2, 2))

    def test_next_committed_entries(self):
        log = self.make(1, 1, 1)
        log.commit_to(2)
        self.assertEqual([e.index for e in log.next_committed_entries()], [1, 2])
        log.applied_to(2)
        self.assertEqual(log.next_committed_entries(), [])
        self.assertRaises(AssertionError, log.applied_to, 3)

    def test_find_conflict_by_term(self):
        log = self.make(1, 1, 2, 2, 5, 5)
        self.assertEqual(log.find_conflict_by_term(6, 3), (4, 2))
        self.assertEqual(log.find_conflict_by_term(6, 5), (6, 5))
        self.assertEqual(log.find_conflict_by_term(6, 1), (2, 1))
        self.assertEqual(log.find_conflict_by_term(6, 0), (0, 0))

    def test_is_up_to_date(self):
        log = self.make(1, 2, 2)
        self.assertTrue(log.is_up_to_date(3, 2))
        self.assertTrue(log.is_up_to_date(1, 3))
        self.assertFalse(log.is_up_to_date(2, 2))
        self.assertFalse(log.is_up_to_date(9, 1))

    def test_restore_snapshot(self):
        log = self.make(1, 1)
        snap = Snapshot(7, 3, ConfState(voters=frozenset({1})), b"")
        log.restore(snap)
        self.assertEqual((log.first_index(), log.last_index(), log.committed), (8, 7, 7))
        self.assertEqual(log.term(7), 3)
        self.assertFalse(log.has_next_committed_entries())
        self.assertRaises(CompactedError, log.term, 5)
