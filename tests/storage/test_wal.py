"""Tests for timemachine.storage.wal: real segment files in temporary directories.

The writer thread is real, so these tests run on the real reactor and wait for the
thread round trips; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.support import fill_disk_under, flip_byte, tree_bytes
from timemachine.domain.errors import CorruptLog, StorageError
from timemachine.interfaces import IWriteAheadLog, WALRecord
from timemachine.storage.wal import (
    WriteAheadLog,
    plan_repair,
    repair_log,
    segment_name,
)

HEADER = 24  # length, CRC32C, index, term
PAYLOAD = 10
RECORD = HEADER + PAYLOAD  # every record of these tests has a payload of PAYLOAD bytes


def payload(index: int, tag: bytes = b"r") -> bytes:
    """A PAYLOAD-byte payload naming its record."""
    return (tag + b"%09d" % index)[:PAYLOAD]


def record(index: int, term: int = 1, tag: bytes = b"r") -> WALRecord:
    return WALRecord(index, term, payload(index, tag))


def segment_files(directory: str) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".wal"))


class WriteAheadLogTests(unittest.TestCase):
    """One log per test, in its own directory; every log opened is closed."""

    def setUp(self):
        self.directory = self.mktemp()

    @defer.inlineCallbacks
    def open_wal(self, directory=None, **kwargs):
        """Open a log on ``directory`` (the test's by default), closed at cleanup."""
        wal = WriteAheadLog(directory or self.directory, reactor, **kwargs)
        yield wal.open()
        self.addCleanup(wal.close)
        return wal

    @defer.inlineCallbacks
    def append_all(self, wal, records):
        """Append ``records`` in one reactor turn and wait until all are durable."""
        yield defer.gatherResults([wal.append(*r) for r in records], consumeErrors=True)

    @defer.inlineCallbacks
    def written(self, records, **kwargs):
        """A log holding ``records``, closed, and the list of its segment files."""
        wal = yield self.open_wal(**kwargs)
        yield self.append_all(wal, records)
        yield wal.close()
        return segment_files(self.directory)

    # -- basics -----------------------------------------------------------------------

    def test_provides_interface(self):
        wal = WriteAheadLog(self.directory, reactor)
        self.assertTrue(verifyObject(IWriteAheadLog, wal))

    def test_constructor_does_no_io(self):
        wal = WriteAheadLog(self.directory, reactor)
        self.assertFalse(os.path.exists(self.directory))
        self.assertRaises(RuntimeError, wal.append, 1, 1, b"x")
        self.assertIsNone(self.successResultOf(wal.close()))

    @defer.inlineCallbacks
    def test_close_twice(self):
        wal = yield self.open_wal()
        first, second = wal.close(), wal.close()
        yield defer.gatherResults([first, second])
        yield wal.close()

    @defer.inlineCallbacks
    def test_empty(self):
        wal = yield self.open_wal()
        self.assertEqual((wal.first_index, wal.last_index), (None, 0))
        self.assertEqual((yield wal.read(1, 100)), [])

    @defer.inlineCallbacks
    def test_round_trip(self):
        wal = yield self.open_wal()
        records = [record(i, term=i // 2) for i in range(1, 6)]
        yield self.append_all(wal, records)
        self.assertEqual((wal.first_index, wal.last_index), (1, 5))
        self.assertEqual((yield wal.read(1, 6)), records)
        self.assertEqual((yield wal.read(2, 4)), records[1:3])
        self.assertEqual((yield wal.read(4, 100)), records[3:])
        self.assertEqual((yield wal.read(0, 2)), records[:1])
        self.assertEqual((yield wal.read(6, 9)), [])
        self.assertEqual((yield wal.read(3, 3)), [])

    @defer.inlineCallbacks
    def test_empty_log_accepts_any_first_index(self):
        wal = yield self.open_wal()
        yield wal.append(42, 7, b"")
        self.assertEqual((wal.first_index, wal.last_index), (42, 42))
        self.assertEqual((yield wal.read(1, 100)), [WALRecord(42, 7, b"")])
        self.assertEqual(segment_files(self.directory), [segment_name(42)])

    @defer.inlineCallbacks
    def test_wrong_index_raises(self):
        wal = yield self.open_wal()
        self.assertRaises(ValueError, wal.append, 0, 1, b"x")
        yield wal.append(1, 1, b"x")
        self.assertRaises(ValueError, wal.append, 3, 1, b"x")
        self.assertRaises(ValueError, wal.append, 1, 1, b"x")
        self.assertRaises(ValueError, wal.append, 2, -1, b"x")
        self.assertEqual(wal.last_index, 1)
        yield wal.append(2, 1, b"y")
        self.assertEqual((yield wal.read(1, 3)), [(1, 1, b"x"), (2, 1, b"y")])

    @defer.inlineCallbacks
    def test_reopen_keeps_records(self):
        records = [record(i) for i in range(1, 11)]
        yield self.written(records)
        wal = yield self.open_wal()
        self.assertEqual((wal.first_index, wal.last_index), (1, 10))
        self.assertEqual((yield wal.read(1, 11)), records)
        yield wal.append(11, 2, b"more")
        self.assertEqual((yield wal.read(11, 12)), [(11, 2, b"more")])

    @defer.inlineCallbacks
    def test_close_writes_pending_appends(self):
        wal = WriteAheadLog(self.directory, reactor)
        yield wal.open()
        appended = [wal.append(*record(i)) for i in range(1, 4)]
        yield wal.close()
        self.assertEqual([d.called for d in appended], [True] * 3)
        failure = self.failureResultOf(wal.append(*record(4)), StorageError)
        self.assertIn("closed", str(failure.value))
        wal = yield self.open_wal()
        self.assertEqual((yield wal.read(1, 10)), [record(i) for i in range(1, 4)])

    @defer.inlineCallbacks
    def test_read_detects_corrupt_record(self):
        """A record that rots on disk after it was written is reported, not returned."""
        wal = yield self.open_wal()
        yield self.append_all(wal, [record(i) for i in range(1, 4)])
        with open(os.path.join(self.directory, segment_name(1)), "r+b") as f:
            f.seek(RECORD + HEADER)
            f.write(b"X")
        yield self.assertFailure(wal.read(1, 4), CorruptLog)
        self.assertEqual((yield wal.read(1, 2)), [record(1)])

    # -- group commit -----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_one_turn_one_fsync(self):
        """Appends of one reactor turn share one fsync and fire in index order."""
        fsyncs = []
        wal = yield self.open_wal(on_fsync=fsyncs.append)
        fired = []
        appended = []
        for i in range(1, 501):
            d = wal.append(*record(i))
            d.addCallback(lambda _, i=i: fired.append(i))
            appended.append(d)
        yield defer.gatherResults(appended)
        self.assertEqual(fired, list(range(1, 501)))
        self.assertEqual(len(fsyncs), 1)
        self.assertIsInstance(fsyncs[0], float)
        self.assertGreaterEqual(fsyncs[0], 0.0)

    @defer.inlineCallbacks
    def test_appends_during_a_flush_are_grouped(self):
        """Appends of every turn during which a flush runs go into one next flush."""
        fsyncs = []
        wal = yield self.open_wal(on_fsync=fsyncs.append)
        first = [wal.append(i, 1, b"x" * 1024) for i in range(1, 1001)]
        during = []

        def append_while_flushing():
            # One append per reactor turn for as long as the first flush is not
            # reported back; the first call comes in the turn that starts the flush.
            if not first[-1].called:
                during.append(wal.append(wal.last_index + 1, 1, b"later"))
                reactor.callLater(0, append_while_flushing)

        reactor.callLater(0, append_while_flushing)
        yield defer.gatherResults(first + during)
        # during grows until first[-1] fires, so wait for the appends made meanwhile.
        yield defer.gatherResults(during)
        self.assertGreaterEqual(len(during), 1)
        self.assertEqual(len(fsyncs), 2)
        self.assertEqual(wal.last_index, 1000 + len(during))
        records = yield wal.read(1001, wal.last_index + 1)
        self.assertEqual([r.payload for r in records], [b"later"] * len(during))

    @defer.inlineCallbacks
    def test_reactor_runs_while_a_large_batch_is_written(self):
        """The write and fsync of 20 MiB happen off the reactor: it keeps turning."""
        fsyncs = []
        wal = yield self.open_wal(on_fsync=fsyncs.append)
        ticks = []
        kilobyte = b"k" * 1024
        appended = [wal.append(i, 1, kilobyte) for i in range(1, 20001)]
        ticks_when_fired = []
        appended[0].addCallback(lambda _: ticks_when_fired.append(len(ticks)))
        appended[-1].addCallback(lambda _: ticks_when_fired.append(len(ticks)))
        # Started after the appends, so a log that wrote on the reactor thread would
        # fire them all before the first tick.
        ticker = task.LoopingCall(lambda: ticks.append(None))
        ticker.clock = reactor
        ticker.start(0, now=False)
        try:
            yield defer.gatherResults(appended)
        finally:
            ticker.stop()
        self.assertEqual(len(ticks_when_fired), 2)
        self.assertGreater(ticks_when_fired[0], 0)
        self.assertEqual(len(fsyncs), 1)
        self.assertEqual((yield wal.read(20000, 20001)), [(20000, 1, kilobyte)])

    # -- segments ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_rotation(self):
        """Segments take whole records up to segment_bytes and are named by their first."""
        records = [record(i) for i in range(1, 11)]
        files = yield self.written(records, segment_bytes=3 * RECORD)
        self.assertEqual(files, [segment_name(i) for i in (1, 4, 7, 10)])
        for name in files[:-1]:
            self.assertEqual(os.path.getsize(os.path.join(self.directory, name)), 3 * RECORD)
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        self.assertEqual((yield wal.read(1, 11)), records)
        self.assertEqual((yield wal.read(3, 8)), records[2:7])
        # A later append rotates too, in a batch that spans two segments.
        more = [record(i) for i in range(11, 15)]
        yield self.append_all(wal, more)
        self.assertEqual(segment_files(self.directory)[-2:], [segment_name(10), segment_name(13)])
        self.assertEqual((yield wal.read(9, 15)), records[8:] + more)
        # Every record can be found on its own: the offset index is right.
        for r in records + more:
            self.assertEqual((yield wal.read(r.index, r.index + 1)), [r])

    @defer.inlineCallbacks
    def test_record_bigger_than_a_segment(self):
        wal = yield self.open_wal(segment_bytes=100)
        yield self.append_all(wal, [(1, 1, b"a" * 500), (2, 1, b"b"), (3, 1, b"c" * 500)])
        self.assertEqual(segment_files(self.directory), [segment_name(i) for i in (1, 2, 3)])
        self.assertEqual(
            [r.payload for r in (yield wal.read(1, 4))], [b"a" * 500, b"b", b"c" * 500]
        )

    # -- recovery ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_torn_tail(self):
        """A last record cut at any byte is dropped; the log continues at its index.

        Two layouts: the last record alone in its segment (a cut can leave an empty
        segment file), and the last record behind others in its segment.
        """
        for count in (4, 6):
            pristine = self.mktemp()
            records = [record(i) for i in range(1, count + 1)]
            wal = yield self.open_wal(pristine, segment_bytes=3 * RECORD)
            yield self.append_all(wal, records)
            yield wal.close()
            last_segment = segment_name(4)
            size = os.path.getsize(os.path.join(pristine, last_segment))
            for cut in range(size - RECORD, size):
                directory = self.mktemp()
                shutil.copytree(pristine, directory)
                os.truncate(os.path.join(directory, last_segment), cut)
                wal = yield self.open_wal(directory, segment_bytes=3 * RECORD)
                self.assertEqual((wal.first_index, wal.last_index), (1, count - 1), cut)
                self.assertEqual((yield wal.read(1, 100)), records[:-1], cut)
                yield wal.append(count, 2, b"again")
                self.assertEqual(
                    (yield wal.read(count - 1, 100)), [records[-2], (count, 2, b"again")]
                )
                yield wal.close()
                self.assertEqual(segment_files(directory), [segment_name(1), segment_name(4)], cut)
                wal = yield self.open_wal(directory, segment_bytes=3 * RECORD)
                self.assertEqual(wal.last_index, count, cut)
                yield wal.close()

    @defer.inlineCallbacks
    def test_a_flipped_bit_in_the_first_segment_refuses_to_open_and_deletes_nothing(self):
        """The issue's finding: 58 fsync'd records and 7 later segments were cut silently.

        Eight segments of eight records; one bit of record 7 flips. The log must refuse
        to open, naming the file, the offset and the records around the damage, and
        leave every file as it was.
        """
        records = [record(i) for i in range(1, 65)]
        files = yield self.written(records, segment_bytes=8 * RECORD)
        self.assertEqual(len(files), 8)
        first = os.path.join(self.directory, segment_name(1))
        flip_byte(first, 6 * RECORD + HEADER + 2)
        before = tree_bytes(self.directory)
        wal = WriteAheadLog(self.directory, reactor, segment_bytes=8 * RECORD)
        self.addCleanup(wal.close)
        error = yield self.assertFailure(wal.open(), CorruptLog)
        self.assertEqual((error.path, error.offset), (first, 6 * RECORD))
        self.assertEqual(error.intact_records, 6)
        self.assertEqual(error.records_beyond, 57)
        self.assertEqual(len(error.segments_beyond), 7)
        self.assertIn(f"{first} at byte {6 * RECORD}", str(error))
        self.assertEqual(tree_bytes(self.directory), before)

    @defer.inlineCallbacks
    def assert_refused(self, offset_in, segment_first, intact, beyond, **kwargs):
        """Opening the test's log fails with CorruptLog at ``offset_in`` of a segment.

        Nothing in the directory changes; the error carries the counts it reports.
        """
        before = tree_bytes(self.directory)
        wal = WriteAheadLog(self.directory, reactor, **kwargs)
        self.addCleanup(wal.close)
        error = yield self.assertFailure(wal.open(), CorruptLog)
        path = os.path.join(self.directory, segment_name(segment_first))
        self.assertEqual((error.path, error.offset), (path, offset_in), str(error))
        self.assertEqual((error.intact_records, error.records_beyond), (intact, beyond))
        self.assertEqual(tree_bytes(self.directory), before)
        return error

    @defer.inlineCallbacks
    def test_any_flipped_bit_of_a_middle_record_of_the_last_segment_refuses(self):
        """Valid records follow: no position of the flip makes it look like a torn write.

        Record 5 of a one-segment log of 10; its length, checksum, index, term and
        payload each get flipped, the low and the high bit of every byte.
        """
        pristine = self.mktemp()
        wal = yield self.open_wal(pristine)
        yield self.append_all(wal, [record(i) for i in range(1, 11)])
        yield wal.close()
        start = 4 * RECORD
        for offset in range(start, start + RECORD):
            for mask in (0x01, 0x80):
                self.directory = self.mktemp()
                shutil.copytree(pristine, self.directory)
                flip_byte(os.path.join(self.directory, segment_name(1)), offset, mask)
                yield self.assert_refused(start, 1, 4, 5)

    @defer.inlineCallbacks
    def test_a_bad_last_record_is_damage_unless_it_is_unwritten(self):
        """A complete last record failing its checksum is bit rot; zeros are a tear.

        A torn write leaves sectors unwritten, which read as zeros: a last record
        (or the file's tail) of zeros is cut when the log opens, and logged.
        """
        records = [record(i) for i in range(1, 5)]
        yield self.written(records)
        path = os.path.join(self.directory, segment_name(1))
        flip_byte(path, 3 * RECORD + HEADER + 1)
        yield self.assert_refused(3 * RECORD, 1, 3, 0)

        # The same record with its bytes never written: zeros up to the end.
        with open(path, "r+b") as f:
            f.seek(3 * RECORD)
            f.write(bytes(RECORD))
            f.write(bytes(1000))  # a file extended past its data, still zero
        logged = []
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        globalLogPublisher.addObserver(logged.append)
        wal = yield self.open_wal()
        self.assertEqual(wal.last_index, 3)
        self.assertEqual(os.path.getsize(path), 3 * RECORD)
        cuts = [e for e in logged if "torn last write" in e.get("log_format", "")]
        self.assertEqual(
            [(e["path"], e["offset"], e["size"], e["records"]) for e in cuts],
            [(path, 3 * RECORD, RECORD + 1000, 3)],
        )

    @defer.inlineCallbacks
    def test_a_few_zero_bytes_at_a_sector_end_do_not_make_a_tear(self):
        """Zeros a torn write leaves fill the rest of a sector, not a byte or two.

        The last record starts one byte before a sector boundary, so that byte is the
        high byte of its length: zero. A flipped bit in its payload must still be
        damage (etcd's rule, any all-zero piece of the record, would call it a tear).
        """
        first = WALRecord(1, 1, b"p" * (511 - HEADER))
        yield self.written([first, record(2)])
        flip_byte(os.path.join(self.directory, segment_name(1)), 511 + HEADER + 2)
        yield self.assert_refused(511, 1, 1, 0)

    @defer.inlineCallbacks
    def test_a_segment_cut_short_before_a_later_one_refuses(self):
        """Only the last segment can be torn: a later one exists, so this is damage."""
        yield self.written([record(i) for i in range(1, 11)], segment_bytes=3 * RECORD)
        os.truncate(os.path.join(self.directory, segment_name(4)), 3 * RECORD - 5)
        error = yield self.assert_refused(2 * RECORD, 4, 5, 4, segment_bytes=3 * RECORD)
        self.assertEqual(len(error.segments_beyond), 2)

    @defer.inlineCallbacks
    def test_a_gap_between_segments_refuses(self):
        yield self.written([record(i) for i in range(1, 11)], segment_bytes=3 * RECORD)
        os.unlink(os.path.join(self.directory, segment_name(4)))
        error = yield self.assert_refused(0, 7, 3, 4, segment_bytes=3 * RECORD)
        self.assertIn("record 4 is missing", str(error))

    @defer.inlineCallbacks
    def test_repair_cuts_at_the_first_bad_record_and_reports_what_went(self):
        records = [record(i) for i in range(1, 11)]
        yield self.written(records, segment_bytes=3 * RECORD)
        flip_byte(os.path.join(self.directory, segment_name(4)), RECORD + HEADER + 3)
        before = tree_bytes(self.directory)
        # A store that applied up to 7: the records left after the cut (1..4) cannot
        # continue it, so they go too; only 8..10 were never applied.
        plan = plan_repair(self.directory, applied_index=7)
        self.assertEqual((plan.empty_log, plan.lost_indexes), (True, (8, 10)))
        self.assertIn("lost for good: indexes 8..10", "\n".join(plan.describe()))
        self.assertEqual(tree_bytes(self.directory), before)

        plan = plan_repair(self.directory, applied_index=2)
        self.assertEqual((plan.empty_log, plan.lost_indexes), (False, (5, 10)))
        damage = plan.survey.damage
        self.assertEqual(
            (damage.index, damage.intact_records, damage.records_beyond,
             damage.last_index_beyond, damage.bytes_beyond),
            (5, 4, 5, 10, 6 * RECORD),
        )
        self.assertEqual(
            damage.segments_beyond,
            tuple(os.path.join(self.directory, segment_name(i)) for i in (7, 10)),
        )
        self.assertIn("indexes 5..10", damage.describe())
        self.assertEqual(tree_bytes(self.directory), before)
        repair_log(plan)
        self.assertEqual(segment_files(self.directory), [segment_name(1), segment_name(4)])
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        self.assertEqual((yield wal.read(1, 11)), records[:4])
        yield wal.append(*record(5, tag=b"n"))
        yield wal.close()
        # An intact log that continues its store: the repair has nothing to do.
        plan = plan_repair(self.directory, applied_index=5)
        self.assertFalse(plan.changes_anything)

    # -- truncation -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_truncate_suffix_across_segments(self):
        records = [record(i) for i in range(1, 11)]
        yield self.written(records, segment_bytes=3 * RECORD)
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        d = wal.truncate_suffix(5)
        # last_index drops at once, so the replacing record can follow right away.
        self.assertEqual(wal.last_index, 4)
        appended = wal.append(*record(5, term=2, tag=b"n"))
        yield d
        yield appended
        self.assertEqual(segment_files(self.directory), [segment_name(i) for i in (1, 4)])
        expected = [*records[:4], record(5, term=2, tag=b"n")]
        self.assertEqual((yield wal.read(1, 11)), expected)
        # At a segment boundary: the segment starting there goes as a whole.
        yield wal.truncate_suffix(4)
        self.assertEqual(segment_files(self.directory), [segment_name(1)])
        yield wal.append(*record(4, term=3, tag=b"m"))
        self.assertEqual(segment_files(self.directory), [segment_name(1), segment_name(4)])
        yield wal.close()
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        self.assertEqual((yield wal.read(1, 11)), [*records[:3], record(4, term=3, tag=b"m")])

    @defer.inlineCallbacks
    def test_truncate_suffix_follows_pending_appends(self):
        wal = yield self.open_wal()
        appended = [wal.append(*record(i)) for i in range(1, 6)]
        truncated = wal.truncate_suffix(3)
        appended.append(wal.append(*record(3, term=2, tag=b"n")))
        yield defer.gatherResults([*appended, truncated])
        self.assertEqual((yield wal.read(1, 10)), [record(1), record(2), record(3, 2, b"n")])

    @defer.inlineCallbacks
    def test_truncate_suffix_everything(self):
        wal = yield self.open_wal()
        yield self.append_all(wal, [record(i) for i in range(1, 4)])
        yield wal.truncate_suffix(1)
        self.assertEqual((wal.first_index, wal.last_index), (None, 0))
        self.assertEqual(segment_files(self.directory), [])
        yield wal.append(*record(7))
        self.assertEqual((wal.first_index, wal.last_index), (7, 7))
        self.assertEqual((yield wal.read(1, 10)), [record(7)])

    @defer.inlineCallbacks
    def test_drop_prefix(self):
        records = [record(i) for i in range(1, 11)]
        yield self.written(records, segment_bytes=3 * RECORD)
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        # Segment 4 holds 5 and 6 too, so it stays.
        yield wal.drop_prefix(5)
        self.assertEqual(wal.first_index, 4)
        self.assertEqual(segment_files(self.directory), [segment_name(i) for i in (4, 7, 10)])
        # The active segment stays while it holds records at or above the index.
        yield wal.drop_prefix(10)
        self.assertEqual((wal.first_index, wal.last_index), (10, 10))
        self.assertEqual(segment_files(self.directory), [segment_name(10)])
        self.assertEqual((yield wal.read(1, 11)), records[9:])
        yield wal.close()
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        self.assertEqual((wal.first_index, wal.last_index), (10, 10))
        # Everything below the index: the log is empty at once and takes any index.
        d = wal.drop_prefix(21)
        self.assertEqual((wal.first_index, wal.last_index), (None, 0))
        appended = wal.append(*record(21))
        yield defer.gatherResults([d, appended])
        self.assertEqual((wal.first_index, wal.last_index), (21, 21))
        self.assertEqual(segment_files(self.directory), [segment_name(21)])
        yield wal.close()
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        self.assertEqual((wal.first_index, wal.last_index), (21, 21))

    @defer.inlineCallbacks
    def test_drop_prefix_with_seal_starts_a_new_segment(self):
        """A compaction cut inside the active segment seals it: the next append opens
        a new segment, and a later cut past the sealed one deletes it whole."""
        records = [record(i) for i in range(1, 6)]
        wal = yield self.open_wal(segment_bytes=100 * RECORD)
        yield self.append_all(wal, records)
        yield wal.drop_prefix(4)
        self.assertEqual(segment_files(self.directory), [segment_name(1)])
        yield wal.drop_prefix(4, seal=True)
        yield self.append_all(wal, [record(6), record(7)])
        self.assertEqual(segment_files(self.directory), [segment_name(1), segment_name(6)])
        self.assertEqual(wal.bytes_on_disk, 7 * RECORD)
        yield wal.drop_prefix(7, seal=True)
        self.assertEqual(wal.first_index, 6)
        self.assertEqual(segment_files(self.directory), [segment_name(6)])
        self.assertEqual(wal.bytes_on_disk, 2 * RECORD)
        self.assertEqual((yield wal.read(1, 10)), [record(6), record(7)])
        # Segment 6 still holds 7, at the index: sealed, so 8 starts another one.
        yield wal.append(*record(8))
        self.assertEqual(segment_files(self.directory), [segment_name(6), segment_name(8)])
        # A seal with nothing below the index in the active segment changes nothing.
        yield wal.drop_prefix(8, seal=True)
        yield wal.append(*record(9))
        self.assertEqual(segment_files(self.directory), [segment_name(8)])

    @defer.inlineCallbacks
    def test_bytes_on_disk_follows_appends_drops_and_reopen(self):
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        self.assertEqual(wal.bytes_on_disk, 0)
        yield self.append_all(wal, [record(i) for i in range(1, 8)])
        self.assertEqual(wal.bytes_on_disk, 7 * RECORD)
        yield wal.drop_prefix(5)
        self.assertEqual(wal.bytes_on_disk, 4 * RECORD)
        yield wal.close()
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        self.assertEqual(wal.bytes_on_disk, 4 * RECORD)

    @defer.inlineCallbacks
    def test_truncate_below_pending_drop_raises(self):
        records = [record(i) for i in range(1, 11)]
        wal = yield self.open_wal(segment_bytes=3 * RECORD)
        yield self.append_all(wal, records)
        d = wal.drop_prefix(8)
        self.assertRaises(ValueError, wal.truncate_suffix, 5)
        yield d
        self.assertEqual(wal.first_index, 7)
        yield wal.truncate_suffix(8)
        self.assertEqual((yield wal.read(1, 11)), records[6:7])

    # -- failures ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_write_failure(self):
        """A failed write (a real ENOSPC, see `fill_disk_under`) errbacks its batch and
        every later change; reopening recovers what was durable."""
        wal = yield self.open_wal()
        yield wal.append(*record(1))
        fill_disk_under(os.path.join(self.directory, segment_name(1)))

        batch = [wal.append(*record(i)) for i in range(2, 5)]
        for d in batch:
            error = yield self.assertFailure(d, StorageError)
            self.assertIn("No space left", str(error))
        # The log reports the first failure once, with its cause.
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.failureResultOf(wal.append(*record(5)), StorageError)
        self.failureResultOf(wal.truncate_suffix(1), StorageError)
        self.failureResultOf(wal.drop_prefix(1), StorageError)
        # What was durable before the failure can still be read.
        self.assertEqual((yield wal.read(1, 10)), [record(1)])
        yield wal.close()
        wal = yield self.open_wal()
        self.assertEqual((wal.first_index, wal.last_index), (1, 1))
        yield wal.append(*record(2))
        self.assertEqual((yield wal.read(1, 10)), [record(1), record(2)])
