"""Compaction of a shard log: real WAL segments and a real SQLite store."""

import os
import shutil
import sqlite3

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support import shard_log
from timemachine.cluster.compaction import Compactor
from timemachine.domain.commands import PutJobs
from timemachine.domain.jobs import JobSpec
from timemachine.metrics import Metrics


def put(job_id):
    return PutJobs((JobSpec("c", job_id, 2_000_000_000_000, "{}", "r"),))


def segment_files(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".wal"))


def applied_index_of_file_alone(path, scratch):
    """The applied_index a power cut would leave if the store's -wal never reached
    the disk: the database file copied on its own."""
    shutil.copyfile(path, scratch)
    con = sqlite3.connect(scratch)
    try:
        return int(con.execute("SELECT value FROM meta WHERE key = 'applied_index'").fetchone()[0])
    finally:
        con.close()


class CompactionTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.wal_dir = os.path.join(self.directory, "wal")
        self.store_path = os.path.join(self.directory, "jobs.sqlite")
        self.metrics = Metrics()

    @defer.inlineCallbacks
    def open_log(self, segment_bytes=64 * 1024 * 1024, **options):
        log = shard_log(
            self.directory, reactor, compaction=dict(metrics=self.metrics, **options),
            segment_bytes=segment_bytes,
        )
        yield log.open()
        self.addCleanup(log.close)
        return log, log.wal, log.compactor

    @defer.inlineCallbacks
    def propose_all(self, log, ids):
        for job_id in ids:
            yield log.propose(put(job_id))

    @defer.inlineCallbacks
    def test_cut_keeps_the_tail_and_what_the_database_file_lacks(self):
        log, wal, compactor = yield self.open_log(segment_bytes=400, tail=5, every_entries=10)
        yield self.propose_all(log, [f"j{i}" for i in range(60)])
        yield compactor.compact()
        durable = applied_index_of_file_alone(self.store_path, self.mktemp())
        self.assertEqual(durable, 60)
        # Everything from durable - tail + 1 on is still readable...
        kept = yield wal.read(durable - 4, 61)
        self.assertEqual([r.index for r in kept], list(range(durable - 4, 61)))
        # ... and history below it went with its segments.
        self.assertGreater(wal.first_index, 40)
        self.assertLessEqual(wal.first_index, durable - 4)
        self.assertLessEqual(len(segment_files(self.wal_dir)), 3)

    @defer.inlineCallbacks
    def test_compacts_after_every_entries_without_being_asked(self):
        log, wal, compactor = yield self.open_log(segment_bytes=400, tail=5, every_entries=10)
        self.assertEqual(compactor.compactions, 1)  # once at open
        yield self.propose_all(log, [f"j{i}" for i in range(60)])
        yield compactor.stop()
        self.assertGreaterEqual(compactor.compactions, 3)
        self.assertGreater(wal.first_index, 1)
        # A power cut now leaves the database file alone: the log still holds every
        # entry above what that file has, so nothing acknowledged is lost.
        durable = applied_index_of_file_alone(self.store_path, self.mktemp())
        self.assertLessEqual(wal.first_index, durable + 1)

    @defer.inlineCallbacks
    def test_compacts_after_every_bytes(self):
        log, wal, compactor = yield self.open_log(
            segment_bytes=400, tail=1, every_entries=10**6, every_bytes=400
        )
        yield self.propose_all(log, [f"j{i}" for i in range(60)])
        yield compactor.stop()
        self.assertGreaterEqual(compactor.compactions, 3)
        self.assertGreater(wal.first_index, 1)

    @defer.inlineCallbacks
    def test_a_large_segment_does_not_keep_history(self):
        """Segments far larger than the log: the cut seals the active one, and the
        next compaction deletes it whole."""
        log, wal, compactor = yield self.open_log(tail=2)
        yield self.propose_all(log, [f"a{i}" for i in range(20)])
        yield compactor.compact()
        yield self.propose_all(log, [f"b{i}" for i in range(20)])
        yield compactor.compact()
        self.assertEqual(wal.first_index, 21)
        self.assertEqual(len(segment_files(self.wal_dir)), 1)
        self.assertEqual(wal.last_index, 40)

    @defer.inlineCallbacks
    def test_restart_after_compaction_resumes_from_the_store(self):
        log, _, _ = yield self.open_log(segment_bytes=400, tail=3, every_entries=10)
        yield self.propose_all(log, [f"j{i}" for i in range(40)])
        yield log.close()
        log, wal, _ = yield self.open_log(segment_bytes=400, tail=3, every_entries=10)
        self.assertEqual(log.applied_index, 40)
        self.assertGreater(wal.first_index, 1)
        index, _ = yield log.propose(put("next"))
        self.assertEqual(index, 41)
        self.assertEqual((yield log.store.count()), 41)
        self.assertIsNotNone((yield log.store.get("c", "j0")))

    @defer.inlineCallbacks
    def test_disk_gauges(self):
        log, wal, compactor = yield self.open_log(tail=3)
        yield self.propose_all(log, ["a", "b"])
        yield compactor.compact()
        text = self.metrics.render().decode()
        self.assertIn(f'timemachine_log_bytes{{log="shard 0"}} {float(wal.bytes_on_disk)}', text)
        self.assertGreater(compactor.store_bytes, 0)
        self.assertIn(f'timemachine_store_bytes{{store="shard 0"}} {float(compactor.store_bytes)}',
                      text)
        yield log.close()
        self.assertNotIn('log="shard 0"', self.metrics.render().decode())

    def test_the_tail_keeps_at_least_one_entry(self):
        self.assertRaises(ValueError, Compactor, "shard 0", None, None, tail=0)
