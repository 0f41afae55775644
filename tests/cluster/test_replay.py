"""A log written under yesterday's rules replays, and its stores load, under today's.

The records below break rules the HTTP boundary enforces now (a webhook port out of
range, a job id with a space, a meta over the size limit, a timeout of 0); they stand
for anything written before a rule was tightened. A real Raft log, real SQLite stores.
"""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support import LocalGroup
from timemachine.domain.codec import decode_command, encode_command
from timemachine.domain.commands import Configure, PutJobs, PutRoute
from timemachine.domain.errors import InvalidField
from timemachine.domain.jobs import MAX_META_BYTES, JobSpec
from timemachine.domain.records import from_record
from timemachine.domain.routes import Route
from timemachine.storage.store import ClusterStore, VnodeStore

OLD_ROUTE = from_record(Route, "old", "http", webhook_url="http://hooks:99999/\tx", timeout_ms=0)
OLD_META = '"' + "x" * MAX_META_BYTES + '"'
OLD_JOB = from_record(JobSpec, "c", "old id", 2_000_000_000_000, OLD_META, "old")
# A shard count above today's limit: the cluster settings replay as written.
OLD_CONFIG = from_record(Configure, 5000, 1, ())


class RecordsTests(unittest.TestCase):
    def test_the_old_records_break_todays_rules(self):
        with self.assertRaises(InvalidField):
            Route(OLD_ROUTE.id, OLD_ROUTE.type, webhook_url=OLD_ROUTE.webhook_url)
        with self.assertRaises(InvalidField):
            JobSpec(
                *(getattr(OLD_JOB, f) for f in ("collection", "id", "trigger_ms", "meta", "route"))
            )
        with self.assertRaises(InvalidField):
            Configure(5000, 1)

    def test_decoding_does_not_validate(self):
        for command in [PutRoute(OLD_ROUTE), PutJobs((OLD_JOB,)), OLD_CONFIG]:
            self.assertEqual(decode_command(encode_command(command)), command)

    def test_from_record_takes_what_the_constructor_takes(self):
        self.assertEqual(
            from_record(Route, "r", "http", webhook_url="http://h/"),
            Route("r", "http", webhook_url="http://h/"),
        )
        with self.assertRaises(TypeError):
            from_record(Route, "r")
        with self.assertRaises(TypeError):
            from_record(Route, "r", "http", colour="red")
        with self.assertRaises(TypeError):
            from_record(Route, "r", "http", id="s")


class ReplayTests(unittest.TestCase):
    """Old records in the Raft log replay into a new store, which then reloads them."""

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())

    @defer.inlineCallbacks
    def replayed(self, make_store, commands, check):
        """Propose ``commands``, lose the store, reopen: ``check(log)`` after the
        replay from the log and again after a plain reload."""
        log = LocalGroup(self.directory, reactor, store=make_store())
        yield log.open()
        for command in commands:
            yield log.propose(command)
        path = log.store.path
        yield log.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        for _ in ("replayed from the Raft log", "loaded from the store"):
            log = LocalGroup(self.directory, reactor, store=make_store())
            yield log.open()
            try:
                yield check(log)
            finally:
                yield log.close()

    def test_meta_log_replays_and_its_store_reloads(self):
        path = os.path.join(self.directory, "cluster.sqlite")

        def check(log):
            self.assertEqual(log.store.route("old"), OLD_ROUTE)
            config = log.store.config
            self.assertEqual((config.shards, config.replicas), (OLD_CONFIG.shards, 1))
            return defer.succeed(None)

        return self.replayed(
            lambda: ClusterStore(path, reactor), [PutRoute(OLD_ROUTE), OLD_CONFIG], check
        )

    def test_shard_log_replays_a_job_of_yesterdays_rules(self):
        path = os.path.join(self.directory, "jobs.sqlite")

        @defer.inlineCallbacks
        def check(log):
            job = yield log.store.get("c", "old id")
            self.assertEqual(job.meta, OLD_META)

        return self.replayed(lambda: VnodeStore(path, reactor), [PutJobs((OLD_JOB,))], check)
