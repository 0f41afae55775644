"""The one-member shard log: propose -> durable append -> commit -> apply -> answer."""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.support import fill_disk_under, shard_log, tree_bytes
from timemachine.cluster.shardlog import LOCAL_TERM
from timemachine.domain.codec import encode_command
from timemachine.domain.commands import DeleteJob, PutJobs
from timemachine.domain.errors import CorruptLog, StorageError, Unavailable
from timemachine.domain.jobs import JobSpec
from timemachine.interfaces import IShardLog
from timemachine.storage.wal import WriteAheadLog, segment_name


def put(job_id):
    return PutJobs((JobSpec("c", job_id, 2_000_000_000_000, "{}", "r"),))


class ShardLogTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        self.log = None

    @defer.inlineCallbacks
    def open_log(self):
        log = shard_log(self.directory, reactor)
        yield log.open()
        self.addCleanup(log.close)
        self.log = log
        return log

    @defer.inlineCallbacks
    def test_answers_after_apply_and_tells_listeners(self):
        log = yield self.open_log()
        verifyObject(IShardLog, log)
        heard = []
        log.subscribe(lambda index, command, result: heard.append((index, command)))
        answers = yield defer.gatherResults([log.propose(put("a")), log.propose(put("b"))])
        self.assertEqual([index for index, _ in answers], [1, 2])
        self.assertEqual([jobs[0].version for _, jobs in answers], [1, 2])
        self.assertEqual([index for index, _ in heard], [1, 2])
        self.assertEqual(log.applied_index, 2)
        index, existed = yield log.propose(DeleteJob("c", "a"))
        self.assertEqual((index, existed), (3, True))
        self.assertIsNone((yield log.store.get("c", "a")))

    @defer.inlineCallbacks
    def test_open_replays_the_wal_above_the_applied_index_once(self):
        log = yield self.open_log()
        yield log.propose(put("a"))
        yield log.close()
        # Entries made durable but never applied (a crash between the two).
        wal = WriteAheadLog(os.path.join(self.directory, "wal"), reactor)
        yield wal.open()
        yield wal.append(2, LOCAL_TERM, encode_command(put("b")))
        yield wal.append(3, LOCAL_TERM, encode_command(DeleteJob("c", "a")))
        yield wal.close()
        log = yield self.open_log()
        self.assertEqual(log.applied_index, 3)
        self.assertIsNone((yield log.store.get("c", "a")))
        self.assertEqual((yield log.store.get("c", "b")).version, 2)
        index, _ = yield log.propose(put("c"))
        self.assertEqual(index, 4)

    @defer.inlineCallbacks
    def test_a_failed_fsync_fails_the_write_and_every_later_one(self):
        log = yield self.open_log()
        yield log.propose(put("a"))
        fill_disk_under(os.path.join(self.directory, "wal", segment_name(1)))
        yield self.assertFailure(log.propose(put("b")), StorageError)
        self.flushLoggedErrors(OSError, StorageError)
        self.assertFalse(log.is_leader())
        yield self.assertFailure(log.propose(put("c")), StorageError)
        self.assertIsNone((yield log.store.get("c", "b")))
        self.assertEqual(log.applied_index, 1)

    @defer.inlineCallbacks
    def test_close_waits_for_proposals_in_flight_then_refuses(self):
        log = yield self.open_log()
        proposed = log.propose(put("a"))
        yield log.close()
        index, _ = yield proposed
        self.assertEqual(index, 1)
        yield self.assertFailure(log.propose(put("b")), Unavailable)

    @defer.inlineCallbacks
    def assert_refused_to_open(self, fragment):
        """The shard log refuses to open, closing its WAL and store, changing nothing."""
        before = tree_bytes(self.directory)
        log = shard_log(self.directory, reactor)
        self.addCleanup(log.close)
        error = yield self.assertFailure(log.open(), CorruptLog)
        self.assertIn(fragment, str(error))
        self.assertEqual(error.path, os.path.join(self.directory, "wal"))
        self.assertEqual(tree_bytes(self.directory), before)
        return error

    @defer.inlineCallbacks
    def test_a_store_ahead_of_its_log_refuses_to_open(self):
        """Entries 4 and 5 were applied, then lost from the log: that is corruption."""
        log = yield self.open_log()
        for job_id in "abcde":
            yield log.propose(put(job_id))
        yield log.close()
        wal = WriteAheadLog(os.path.join(self.directory, "wal"), reactor)
        yield wal.open()
        yield wal.truncate_suffix(4)
        yield wal.close()
        error = yield self.assert_refused_to_open(
            "has applied index 5, beyond the log's last entry 3"
        )
        self.assertEqual(error.intact_records, 3)

    @defer.inlineCallbacks
    def test_a_log_starting_above_the_store_refuses_to_open(self):
        log = yield self.open_log()
        for job_id in "abc":
            yield log.propose(put(job_id))
        yield log.close()
        wal = WriteAheadLog(os.path.join(self.directory, "wal"), reactor)
        yield wal.open()
        yield wal.drop_prefix(4)
        yield wal.append(6, LOCAL_TERM, encode_command(put("f")))
        yield wal.close()
        yield self.assert_refused_to_open("entries 4..5 are missing")

