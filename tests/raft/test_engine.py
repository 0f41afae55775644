"""The node-wide Raft log: what `persist` wrote, `open` and `storage` give back, for
every group of a node in one WAL - crashes, corruption and segment deletion included."""

import os
import random

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from timemachine.domain.errors import CorruptLog, LogBehindCommit, StorageError
from timemachine.raft.engine import (
    SNAPSHOT_DIRECTORY,
    WAL_DIRECTORY,
    GroupStorage,
    LogRecord,
    RaftEngine,
    RecordKind,
    decode_record,
    encode_record,
)
from timemachine.raft.storage import SnapshotOutOfDateError
from timemachine.raft.types import ConfState, Entry, EntryKind, HardState, Ready, Snapshot
from timemachine.storage.iothread import IOThread
from timemachine.storage.wal import WriteAheadLog, segment_name, survey_log

CONF = ConfState(frozenset({1, 2, 3}))


def entries(first, last, term, tag=b"x"):
    return tuple(Entry(i, term, tag + b"%d" % i) for i in range(first, last + 1))


def state_of(storage):
    """Everything a restart must give back of one group's storage."""
    first, last = storage.first_index(), storage.last_index()
    return (
        storage.snapshot(),
        storage.hard_state,
        first,
        storage.term(first - 1),
        storage.entries(first, last + 1) if last >= first else [],
    )


@defer.inlineCallbacks
def _read_all(directory):
    """Every record of the WAL in ``directory``."""
    wal = WriteAheadLog(directory, reactor)
    yield wal.open()
    try:
        records = yield wal.read(wal.first_index or 1, wal.last_index + 1)
    finally:
        yield wal.close()
    return records


class _EngineCase(unittest.TestCase):
    """An engine directory in a temp dir, and its engine (re)opened on demand."""

    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.io = IOThread(reactor, "raft-engine-test")
        self.io.start()
        self.addCleanup(self.io.stop)
        self.engine = None
        self.fsyncs = []

    def new_engine(self, **options):
        engine = RaftEngine(
            self.directory, reactor, self.io, on_fsync=self.fsyncs.append, **options
        )
        self.addCleanup(engine.close)
        return engine

    @defer.inlineCallbacks
    def reopen(self, **options):
        if self.engine is not None:
            yield self.engine.close()
        self.engine = None
        engine = self.new_engine(**options)
        yield engine.open()
        self.engine = engine
        return engine

    @property
    def wal_directory(self):
        return os.path.join(self.directory, WAL_DIRECTORY)

    def segment_files(self):
        return [
            os.path.join(self.wal_directory, name)
            for name in sorted(os.listdir(self.wal_directory))
        ]

    def snapshot_file(self, group):
        return os.path.join(self.directory, SNAPSHOT_DIRECTORY, f"{group}.snapshot")


class RecordTests(unittest.TestCase):
    def test_a_record_round_trips_with_int_str_and_no_votes(self):
        for vote in (2, "node-2", None):
            record = LogRecord(
                7,
                RecordKind.APPEND,
                HardState(3, vote, 9),
                (Entry(9, 3, b"\x00data"), Entry(10, 3, b"{}", EntryKind.CONF_CHANGE)),
            )
            self.assertEqual(decode_record(encode_record(record)), record)
        restart = LogRecord(0, RecordKind.RESTART, HardState(4, None, 10), (), 10, 4)
        self.assertEqual(decode_record(encode_record(restart)), restart)

    def test_a_payload_that_is_no_record_is_refused(self):
        self.assertRaises(ValueError, decode_record, b"\x08")
        self.assertRaises(ValueError, decode_record, b"\x10\x63")  # kind 99


class EngineTests(_EngineCase):
    @defer.inlineCallbacks
    def test_a_new_group_starts_from_its_bootstrap_membership(self):
        engine = yield self.reopen()
        self.assertEqual(engine.groups(), [])
        storage = engine.storage(3, bootstrap=CONF)
        self.assertEqual(storage.initial_state(), (HardState(), CONF))
        self.assertEqual(storage.last_index(), 0)
        self.assertIs(engine.storage(3), storage)

    @defer.inlineCallbacks
    def test_entries_and_hard_state_survive_a_restart(self):
        engine = yield self.reopen()
        conf_change = Entry(4, 1, b'{"kind": 0}', EntryKind.CONF_CHANGE)
        engine.storage(0, CONF)
        yield engine.persist(
            0, Ready(hard_state=HardState(1, 2, 3), entries=(*entries(1, 3, 1), conf_change))
        )
        engine.storage(1, CONF)
        yield engine.persist(1, Ready(hard_state=HardState(5, "n2", 0)))
        engine = yield self.reopen()
        self.assertEqual(engine.groups(), [0, 1])
        storage = engine.storage(0, CONF)
        self.assertEqual(storage.initial_state(), (HardState(1, 2, 3), CONF))
        self.assertEqual(storage.entries(1, 5), [*entries(1, 3, 1), conf_change])
        self.assertEqual(engine.storage(1, CONF).hard_state, HardState(5, "n2", 0))

    @defer.inlineCallbacks
    def test_the_storage_holds_a_persist_once_it_is_durable(self):
        engine = yield self.reopen()
        storage = engine.storage(0, CONF)
        d = engine.persist(0, Ready(hard_state=HardState(1, 1, 0), entries=entries(1, 2, 1)))
        self.assertEqual(storage.last_index(), 0)
        yield d
        self.assertEqual(storage.entries(1, 3), list(entries(1, 2, 1)))
        self.assertEqual(storage.hard_state, HardState(1, 1, 0))
        # Written by the engine only: a direct write would bypass the disk.
        self.assertIsInstance(storage, GroupStorage)
        self.assertRaises(TypeError, storage.append, list(entries(3, 3, 1)))
        self.assertRaises(TypeError, storage.set_hard_state, HardState(2, 1, 0))

    @defer.inlineCallbacks
    def test_a_ready_that_does_not_follow_the_log_is_refused_before_any_write(self):
        engine = yield self.reopen()
        self.assertRaises(RuntimeError, engine.persist, 0, Ready(entries=entries(1, 1, 1)))
        engine.storage(0, CONF)
        yield engine.persist(0, Ready(entries=entries(1, 3, 1)))
        self.assertRaises(ValueError, engine.persist, 0, Ready(entries=entries(5, 6, 1)))
        self.assertRaises(
            ValueError, engine.persist, 0, Ready(entries=(Entry(4, 1), Entry(6, 1)))
        )
        engine = yield self.reopen()
        self.assertEqual(engine.storage(0, CONF).last_index(), 3)

    @defer.inlineCallbacks
    def test_a_conflicting_suffix_is_replaced(self):
        engine = yield self.reopen()
        engine.storage(0, CONF)
        yield engine.persist(0, Ready(entries=entries(1, 6, 1)))
        yield engine.persist(
            0, Ready(entries=entries(4, 5, 2, b"new"), hard_state=HardState(2, 3, 0))
        )
        engine = yield self.reopen()
        storage = engine.storage(0, CONF)
        self.assertEqual(storage.last_index(), 5)
        self.assertEqual(storage.entries(1, 6), [*entries(1, 3, 1), *entries(4, 5, 2, b"new")])
        self.assertEqual(storage.hard_state, HardState(2, 3, 0))

    @defer.inlineCallbacks
    def test_an_installed_snapshot_replaces_the_log(self):
        engine = yield self.reopen()
        engine.storage(2, CONF)
        yield engine.persist(2, Ready(entries=entries(1, 4, 1)))
        learners = ConfState(frozenset({1, 2}), frozenset({"n4"}))
        snapshot = Snapshot(10, 3, learners, b"\x00state machine\n bytes")
        yield engine.persist(2, Ready(snapshot=snapshot, hard_state=HardState(3, None, 10)))
        yield engine.persist(2, Ready(entries=entries(11, 12, 3)))
        engine = yield self.reopen()
        storage = engine.storage(2, CONF)
        self.assertEqual(storage.snapshot(), snapshot)
        self.assertEqual(storage.initial_state(), (HardState(3, None, 10), learners))
        self.assertEqual((storage.first_index(), storage.last_index()), (11, 12))
        self.assertEqual(storage.entries(11, 13), list(entries(11, 12, 3)))

    @defer.inlineCallbacks
    def test_compaction_keeps_the_snapshot_and_the_entries_after_it(self):
        engine = yield self.reopen()
        storage = engine.storage(0, CONF)
        yield engine.persist(0, Ready(entries=entries(1, 8, 1), hard_state=HardState(1, 1, 8)))
        yield engine.compact(0, Snapshot(5, 1, CONF, b"five"))
        self.assertEqual(storage.snapshot().index, 5)
        with self.assertRaises(SnapshotOutOfDateError):
            engine.compact(0, Snapshot(5, 1, CONF, b"five again"))
        self.assertRaises(ValueError, engine.compact, 0, Snapshot(7, 2, CONF, b""))
        self.assertRaises(ValueError, engine.compact, 0, Snapshot(9, 1, CONF, b""))
        yield engine.compact(0, Snapshot(6, 1, CONF, b"six"))  # refusals changed nothing
        self.assertEqual(storage.snapshot().index, 6)
        engine = yield self.reopen()
        storage = engine.storage(0, CONF)
        self.assertEqual(storage.snapshot(), Snapshot(6, 1, CONF, b"six"))
        self.assertEqual(storage.entries(7, 9), list(entries(7, 8, 1)))

    @defer.inlineCallbacks
    def test_a_removed_group_is_forgotten_with_its_snapshot(self):
        engine = yield self.reopen()
        for group in (1, 2):
            engine.storage(group, CONF)
            yield engine.persist(group, Ready(entries=entries(1, 4, 1)))
            yield engine.compact(group, Snapshot(3, 1, CONF, b"three"))
        yield engine.remove_group(1)
        self.assertFalse(os.path.exists(self.snapshot_file(1)))
        self.assertEqual(engine.groups(), [2])
        engine = yield self.reopen()
        self.assertEqual(engine.groups(), [2])
        # The group can come back, from nothing.
        storage = engine.storage(1, CONF)
        self.assertEqual((storage.snapshot().index, storage.last_index()), (0, 0))
        yield engine.persist(1, Ready(entries=entries(1, 1, 5)))
        engine = yield self.reopen()
        self.assertEqual(engine.storage(1, CONF).entries(1, 2), list(entries(1, 1, 5)))
        self.assertEqual(engine.storage(2, CONF).snapshot().index, 3)


    @defer.inlineCallbacks
    def test_a_persist_behind_an_install_waits_for_it(self):
        engine = yield self.reopen()
        storage = engine.storage(0, CONF)
        yield engine.persist(0, Ready(entries=entries(1, 3, 1)))
        snapshot = Snapshot(10, 2, CONF, b"ten")
        installed = engine.persist(0, Ready(snapshot=snapshot, hard_state=HardState(2, 1, 10)))
        # Not waited for: its record must still come after the install's.
        after = engine.persist(0, Ready(entries=entries(11, 12, 2)))
        yield defer.gatherResults([installed, after])
        self.assertEqual((storage.first_index(), storage.last_index()), (11, 12))
        engine = yield self.reopen()
        storage = engine.storage(0, CONF)
        self.assertEqual(storage.snapshot(), snapshot)
        self.assertEqual(storage.entries(11, 13), list(entries(11, 12, 2)))


class MultiGroupTests(_EngineCase):
    @defer.inlineCallbacks
    def test_the_persists_of_one_turn_share_one_fsync(self):
        engine = yield self.reopen()
        groups = range(13)
        for group in groups:
            engine.storage(group, CONF)
        before = len(self.fsyncs)
        yield defer.gatherResults(
            [
                engine.persist(g, Ready(hard_state=HardState(1, 1, 0), entries=entries(1, 2, 1)))
                for g in groups
            ]
        )
        self.assertEqual(len(self.fsyncs) - before, 1)
        engine = yield self.reopen()
        self.assertEqual(engine.groups(), list(groups))
        for group in groups:
            self.assertEqual(engine.storage(group, CONF).entries(1, 3), list(entries(1, 2, 1)))

    @defer.inlineCallbacks
    def test_a_conflict_replaces_entries_of_its_own_group_only(self):
        engine = yield self.reopen()
        for group in (0, 1):
            engine.storage(group, CONF)
        yield defer.gatherResults(
            [engine.persist(g, Ready(entries=entries(1, 6, 1, b"g%d-" % g))) for g in (0, 1)]
        )
        yield engine.persist(1, Ready(entries=entries(3, 3, 2, b"new")))
        engine = yield self.reopen()
        self.assertEqual(engine.storage(0).entries(1, 7), list(entries(1, 6, 1, b"g0-")))
        self.assertEqual(
            engine.storage(1).entries(1, 4),
            [*entries(1, 2, 1, b"g1-"), *entries(3, 3, 2, b"new")],
        )

    @defer.inlineCallbacks
    def test_many_groups_recover_as_they_were(self):
        # Small segments and short lags: segments go and groups are rewritten meanwhile.
        options = dict(
            keep_entries=3, segment_bytes=2048, rewrite_lag_bytes=4096, rewrite_max_bytes=4096
        )
        engine = yield self.reopen(**options)
        rng = random.Random(7)
        groups = list(range(13))
        storages = {g: engine.storage(g, CONF) for g in groups}
        terms = dict.fromkeys(groups, 1)
        for turn in range(120):
            persists = []
            for g in groups:
                storage = storages[g]
                if g % 3 == 0 and turn % 10:
                    continue  # quiet groups
                last = storage.last_index()
                first = max(storage.first_index(), storage.hard_state.commit + 1)
                if rng.random() < 0.2 and last >= first:
                    terms[g] += 1  # a new leader replaces an uncommitted suffix
                    at = rng.randint(first, last)
                else:
                    at = last + 1
                new = entries(at, at + rng.randint(0, 3), terms[g], b"t%d-" % turn)
                commit = max(storage.hard_state.commit, at - 1)
                ready = Ready(hard_state=HardState(terms[g], g, commit), entries=new)
                persists.append(engine.persist(g, ready))
            yield defer.gatherResults(persists)
            for g in groups:
                storage = storages[g]
                commit = storage.hard_state.commit
                if commit - storage.snapshot().index > 8:
                    snapshot = Snapshot(commit, storage.term(commit), CONF, b"at %d" % commit)
                    yield engine.compact(g, snapshot)
        before = {g: state_of(storages[g]) for g in groups}
        self.assertLess(len(self.segment_files()), 12)
        engine = yield self.reopen(**options)
        self.assertEqual({g: state_of(engine.storage(g, CONF)) for g in groups}, before)


class CrashTests(_EngineCase):
    """What a crash leaves, made with real files: a cut segment, a write that fails."""

    @defer.inlineCallbacks
    def test_a_torn_batch_loses_whole_records_never_a_hard_state_alone(self):
        engine = yield self.reopen()
        for group in (0, 1, 2):
            engine.storage(group, CONF)
            yield engine.persist(
                group, Ready(entries=entries(1, 2, 1), hard_state=HardState(1, 2, 2))
            )
        # One turn, one batch: three records, the last for group 2.
        promote = Entry(4, 1, b'{"kind": 1, "node": 4}', EntryKind.CONF_CHANGE)
        ready = Ready(entries=(*entries(3, 3, 1), promote), hard_state=HardState(1, 2, 4))
        yield defer.gatherResults([engine.persist(g, ready) for g in (0, 1, 2)])
        yield engine.close()
        self.engine = None
        [segment] = survey_log(self.wal_directory).segments
        with open(segment.path, "r+b") as f:
            f.truncate(segment.offsets[-1] + 30)  # group 2's record cut in its middle
        engine = yield self.reopen()
        for group in (0, 1):
            storage = engine.storage(group, CONF)
            self.assertEqual(storage.entries(3, 5), [*entries(3, 3, 1), promote])
            self.assertEqual(storage.hard_state, HardState(1, 2, 4))
        # Group 2 is as it was before that turn: entries and hard state together.
        storage = engine.storage(2, CONF)
        self.assertEqual(storage.last_index(), 2)
        self.assertEqual(storage.hard_state, HardState(1, 2, 2))

    @defer.inlineCallbacks
    def test_a_corrupt_record_refuses_the_whole_engine(self):
        engine = yield self.reopen()
        for group in (0, 1, 0):
            storage = engine.storage(group, CONF)
            at = storage.last_index() + 1
            yield engine.persist(group, Ready(entries=(Entry(at, 1, b"abc"),)))
        yield engine.close()
        self.engine = None
        [segment] = survey_log(self.wal_directory).segments
        middle = segment.offsets[1]
        with open(segment.path, "r+b") as f:
            f.seek(middle + 30)
            byte = f.read(1)
            f.seek(middle + 30)
            f.write(bytes([byte[0] ^ 0x01]))
        engine = self.new_engine()
        error = yield self.assertFailure(engine.open(), CorruptLog)
        self.assertEqual((error.path, error.offset), (segment.path, middle))
        self.assertRaises(RuntimeError, engine.storage, 0)

    @defer.inlineCallbacks
    def test_an_undecodable_record_is_named_by_its_file_offset_and_sequence(self):
        wal = WriteAheadLog(self.wal_directory, reactor)
        yield wal.open()
        good = encode_record(LogRecord(0, RecordKind.APPEND, HardState(1, 1, 0), entries(1, 1, 1)))
        yield defer.gatherResults([wal.append(1, 0, good), wal.append(2, 0, b"\x08")])
        yield wal.close()
        [segment] = survey_log(self.wal_directory).segments
        engine = self.new_engine()
        error = yield self.assertFailure(engine.open(), CorruptLog)
        self.assertEqual((error.path, error.offset), (segment.path, segment.offsets[1]))
        self.assertIn(f"{segment.path}: record 2 at byte {segment.offsets[1]}", str(error))
        self.assertIn("Raft state is unavailable", str(error))

    @defer.inlineCallbacks
    def test_a_log_ending_below_its_commit_index_refuses_that_group_only(self):
        # One record per segment, so a lost segment takes exactly one record.
        engine = yield self.reopen(segment_bytes=1)
        engine.storage(1, CONF)
        engine.storage(2, CONF)
        yield engine.persist(1, Ready(entries=entries(1, 5, 1), hard_state=HardState(1, 2, 0)))
        yield engine.persist(2, Ready(entries=entries(1, 1, 1)))
        yield engine.persist(1, Ready(hard_state=HardState(1, 2, 5)))
        yield engine.close()
        self.engine = None
        first, _, third = self.segment_files()
        os.unlink(first)  # the segment holding group 1's entries is gone
        engine = yield self.reopen(segment_bytes=1, keep_entries=0)
        self.assertEqual(engine.groups(), [1, 2])
        error = self.assertRaises(LogBehindCommit, engine.storage, 1)
        self.assertIsInstance(error, CorruptLog)
        message = str(error)
        self.assertIn("group 1: commit index 5", message)
        self.assertIn("ends at entry 0", message)
        self.assertIn(f"record 3: {third} at byte 0", message)
        self.assertEqual((error.path, error.offset), (third, 0))
        self.assertEqual(engine.storage(2, CONF).entries(1, 2), list(entries(1, 1, 1)))
        # Its records stay pinned: nothing that explains the damage is deleted, while
        # group 2's older segment goes.
        yield engine.persist(2, Ready(entries=entries(2, 2, 1)))
        yield engine.compact(2, Snapshot(2, 1, CONF, b""))
        self.assertEqual(self.segment_files()[0], third)

    @defer.inlineCallbacks
    def test_an_install_cut_short_is_completed_when_the_engine_opens(self):
        engine = yield self.reopen(segment_bytes=1)
        # Group 9's record comes first and stays: no segment of group 0 is deleted,
        # so only the records themselves can keep the old entries from coming back.
        engine.storage(9, CONF)
        yield engine.persist(9, Ready(entries=entries(1, 1, 1)))
        engine.storage(0, CONF)
        yield engine.persist(0, Ready(entries=entries(1, 12, 1), hard_state=HardState(1, 2, 2)))
        # The RESTART record cannot be written: its segment's name is taken by a
        # directory. The snapshot file, written first, is on disk.
        blocker = os.path.join(self.wal_directory, segment_name(3))
        os.mkdir(blocker)
        snapshot = Snapshot(10, 3, CONF, b"leader's state")
        ready = Ready(snapshot=snapshot, hard_state=HardState(3, None, 10))
        yield self.assertFailure(engine.persist(0, ready), StorageError)
        self.assertEqual(len(self.flushLoggedErrors(IsADirectoryError)), 1)
        self.assertTrue(os.path.exists(self.snapshot_file(0)))
        yield engine.close()
        self.engine = None
        os.rmdir(blocker)
        engine = yield self.reopen(segment_bytes=1)
        storage = engine.storage(0, CONF)
        self.assertEqual(storage.snapshot(), snapshot)
        self.assertEqual((storage.first_index(), storage.last_index()), (11, 10))
        self.assertEqual(storage.hard_state, HardState(1, 2, 2))
        # The install is complete on disk too: the old entries never come back, not
        # even as a tail below a later snapshot this member takes.
        yield engine.persist(0, Ready(entries=entries(11, 12, 3, b"new")))
        yield engine.compact(0, Snapshot(12, 3, CONF, b"twelve"))
        engine = yield self.reopen(segment_bytes=1)
        storage = engine.storage(0, CONF)
        self.assertEqual((storage.first_index(), storage.term(11)), (12, 3))
        self.assertEqual(storage.entries(12, 13), list(entries(12, 12, 3, b"new")))
        self.assertIn(os.path.join(self.wal_directory, segment_name(2)), self.segment_files())


    @defer.inlineCallbacks
    def test_a_first_install_cut_short_leaves_the_group_with_its_snapshot(self):
        engine = yield self.reopen()
        engine.storage(4)
        os.makedirs(self.wal_directory, exist_ok=True)
        blocker = os.path.join(self.wal_directory, segment_name(1))
        os.mkdir(blocker)
        snapshot = Snapshot(0, 0, CONF, b"")  # a leader's bootstrap snapshot
        yield self.assertFailure(engine.persist(4, Ready(snapshot=snapshot)), StorageError)
        self.flushLoggedErrors(IsADirectoryError)
        yield engine.close()
        self.engine = None
        os.rmdir(blocker)
        engine = yield self.reopen()
        self.assertEqual(engine.groups(), [4])
        self.assertEqual(engine.storage(4).initial_state(), (HardState(), CONF))
        # The install was completed in the log: it holds without the file's mark now.
        engine = yield self.reopen()
        self.assertEqual(engine.groups(), [4])

    @defer.inlineCallbacks
    def test_a_removal_cut_short_is_finished_when_the_engine_opens(self):
        engine = yield self.reopen()
        # Group 8's first record keeps every segment, the REMOVE record included.
        engine.storage(8, CONF)
        yield engine.persist(8, Ready(entries=entries(1, 1, 1)))
        engine.storage(3, CONF)
        yield engine.persist(3, Ready(entries=entries(1, 2, 1)))
        yield engine.compact(3, Snapshot(2, 1, CONF, b"two"))
        with open(self.snapshot_file(3), "rb") as f:
            saved = f.read()
        yield engine.remove_group(3)
        yield engine.close()
        self.engine = None
        # What a crash after the REMOVE record, before the file's deletion, leaves.
        with open(self.snapshot_file(3), "wb") as f:
            f.write(saved)
        engine = yield self.reopen()
        self.assertEqual(engine.groups(), [8])
        self.assertFalse(os.path.exists(self.snapshot_file(3)))
        self.assertEqual(engine.storage(3, CONF).snapshot().index, 0)


class SegmentTests(_EngineCase):
    """Segments go once no group needs them, quiet groups included."""

    @defer.inlineCallbacks
    def test_compaction_keeps_a_tail_of_entries_below_the_snapshot(self):
        # One record per segment, so the cut falls exactly where it is asked to.
        options = dict(keep_entries=3, segment_bytes=1)
        engine = yield self.reopen(**options)
        engine.storage(0, CONF)
        for k in range(1, 21):
            yield engine.persist(0, Ready(entries=entries(k, k, 1), hard_state=HardState(1, 1, k)))
        yield engine.compact(0, Snapshot(15, 1, CONF, b"fifteen"))
        self.assertEqual(len(self.segment_files()), 9)  # entries 12..20
        engine = yield self.reopen(**options)
        storage = engine.storage(0, CONF)
        self.assertEqual(storage.snapshot().index, 15)
        # Entry 12 stays as the point the log matches from; 13..15 can still be sent.
        self.assertEqual(storage.first_index(), 13)
        self.assertEqual(storage.term(12), 1)
        self.assertEqual(storage.entries(13, 21), list(entries(13, 20, 1)))
        self.assertEqual(storage.hard_state, HardState(1, 1, 20))

    @defer.inlineCallbacks
    def drive_active_group(self, engine, rounds, quiet_round=None):
        """Group 1 persists an entry per round and compacts every 5; ``quiet_round``
        (if any) runs in each round after group 1's persist."""
        storage = engine.storage(1, CONF)
        for k in range(storage.last_index() + 1, storage.last_index() + rounds + 1):
            d = engine.persist(
                1, Ready(entries=(Entry(k, 1, b"%040d" % k),), hard_state=HardState(1, 1, k))
            )
            if quiet_round is not None:
                yield quiet_round(k)
            yield d
            if k % 5 == 0:
                yield engine.compact(1, Snapshot(k, 1, CONF, b"state %d" % k))

    @defer.inlineCallbacks
    def test_segments_go_while_a_quiet_group_is_rewritten_forward(self):
        options = dict(
            keep_entries=2, segment_bytes=512, rewrite_lag_bytes=1024, rewrite_max_bytes=4096
        )
        engine = yield self.reopen(**options)
        quiet = engine.storage(5, CONF)
        yield engine.persist(
            5, Ready(entries=entries(1, 3, 1, b"quiet"), hard_state=HardState(1, 1, 3))
        )
        yield self.drive_active_group(engine, 30)
        peak = engine.bytes_on_disk
        yield self.drive_active_group(engine, 170)
        # Group 5's record sat in the first segment: it is gone, and the log is short.
        files = self.segment_files()
        self.assertNotIn(os.path.join(self.wal_directory, segment_name(1)), files)
        self.assertLessEqual(len(files), 6)
        self.assertLess(engine.bytes_on_disk, 2 * peak)
        before = {g: state_of(engine.storage(g)) for g in (1, 5)}
        self.assertEqual(before[5][4], list(entries(1, 3, 1, b"quiet")))
        engine = yield self.reopen(**options)
        # Group 5 is not opened now: it is rewritten from what open read back.
        yield self.drive_active_group(engine, 100)
        self.assertNotIn(files[0], self.segment_files())
        engine = yield self.reopen(**options)
        self.assertEqual(state_of(engine.storage(5, CONF)), before[5])
        self.assertEqual(engine.storage(5).entries(1, 4), quiet.entries(1, 4))

    @defer.inlineCallbacks
    def test_an_empty_rewrite_after_an_install_is_followed_by_appends(self):
        # Group 0, installed then compacted to nothing, is rewritten as an empty log,
        # which its later appends must extend. Only empty groups are rewritten here,
        # and group 9's record keeps every segment: replay reads the whole story.
        options = dict(
            keep_entries=0, segment_bytes=64, rewrite_lag_bytes=1, rewrite_max_bytes=0
        )
        engine = yield self.reopen(**options)
        for group in (9, 7, 0):
            engine.storage(group, CONF)
        yield engine.persist(9, Ready(entries=entries(1, 1, 1)))
        snapshot = Snapshot(10, 2, CONF, b"ten")
        yield engine.persist(0, Ready(snapshot=snapshot, hard_state=HardState(2, 1, 10)))
        yield engine.persist(0, Ready(entries=entries(11, 12, 2), hard_state=HardState(2, 1, 12)))
        yield engine.compact(0, Snapshot(12, 2, CONF, b"twelve"))
        yield engine.persist(7, Ready(entries=entries(1, 1, 1)))
        yield task.deferLater(reactor, 0.05, lambda: None)  # the maintenance turn
        yield engine.persist(0, Ready(entries=entries(13, 13, 2)))
        engine = yield self.reopen(**options)
        storage = engine.storage(0, CONF)
        self.assertEqual(storage.snapshot().index, 12)
        self.assertEqual(storage.entries(13, 14), list(entries(13, 13, 2)))
        yield engine.close()
        self.engine = None
        records = [decode_record(r.payload) for r in (yield _read_all(self.wal_directory))]
        self.assertEqual(
            [record.kind for record in records if record.group == 0],
            [RecordKind.RESTART, RecordKind.APPEND, RecordKind.REWRITE, RecordKind.APPEND],
        )

    @defer.inlineCallbacks
    def test_rewrites_do_not_feed_on_one_another(self):
        # Each rewrite moves the head past the other groups' pins; counting those bytes
        # as lag would rewrite the groups in turn forever.
        options = dict(segment_bytes=64, rewrite_lag_bytes=1, rewrite_max_bytes=10_000)
        engine = yield self.reopen(**options)
        for group in (1, 2, 3):
            engine.storage(group, CONF)
            yield engine.persist(group, Ready(entries=entries(1, 2, 1)))
        yield task.deferLater(reactor, 0.1, lambda: None)
        settled = len(self.fsyncs)  # one per WAL batch written
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len(self.fsyncs), settled)

    @defer.inlineCallbacks
    def test_a_group_whose_hard_state_alone_moves_keeps_its_entries(self):
        # No rewrites: the pins alone must keep group 7's entries.
        options = dict(keep_entries=2, segment_bytes=512, rewrite_lag_bytes=2**40)
        engine = yield self.reopen(**options)
        yield self.drive_active_group(engine, 30)
        engine.storage(7, CONF)
        ready = Ready(entries=entries(1, 5, 1, b"seven"), hard_state=HardState(1, 1, 5))
        yield engine.persist(7, ready)
        pinned = self.segment_files()[-1]  # holds group 7's record

        def vote(k):
            return engine.persist(7, Ready(hard_state=HardState(1 + k, f"n{k}", 5)))

        yield self.drive_active_group(engine, 120, quiet_round=vote)
        files = self.segment_files()
        # The segments before group 7's entries went; the one holding them stays.
        self.assertNotEqual(files[0], os.path.join(self.wal_directory, segment_name(1)))
        self.assertEqual(files[0], pinned)
        engine = yield self.reopen(**options)
        storage = engine.storage(7, CONF)
        self.assertEqual(storage.entries(1, 6), list(entries(1, 5, 1, b"seven")))
        self.assertEqual(storage.hard_state, HardState(151, "n150", 5))
