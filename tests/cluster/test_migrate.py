"""A data directory of a one-node build (a log per shard) starts on the Raft log."""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support import start_local_node
from timemachine.cluster.migrate import MIGRATED_SUFFIX
from timemachine.cluster.ring import Ring
from timemachine.domain.codec import encode_command
from timemachine.domain.commands import PutJobs, PutRoute
from timemachine.domain.jobs import JobSpec
from timemachine.domain.routes import Route
from timemachine.storage.store import ClusterStore, VnodeStore
from timemachine.storage.wal import WriteAheadLog

FAR = 4_000_000_000_000


def _spec(job_id):
    return JobSpec("c", job_id, FAR, '{"n": 1}', "hook")


@defer.inlineCallbacks
def _old_log(directory, store_class, store_name, commands, applied):
    """A one-node build's log of ``commands`` (term 1), its store applied to ``applied``."""
    os.makedirs(directory, exist_ok=True)
    wal = WriteAheadLog(os.path.join(directory, "wal"), reactor)
    yield wal.open()
    for index, command in enumerate(commands, start=1):
        yield wal.append(index, 1, encode_command(command))
    yield wal.close()
    store = store_class(os.path.join(directory, store_name), reactor)
    yield store.open()
    yield store.apply(list(enumerate(commands[:applied], start=1)))
    yield store.close()


class MigrationTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        ring = Ring.single_node("node1", 2)
        self.on_shard = {0: [], 1: []}
        for n in range(12):
            self.on_shard[ring.shard_for(f"j{n}")].append(f"j{n}")
        meta = [ring.config, PutRoute(Route("hook", "http", webhook_url="http://127.0.0.1:9/"))]
        # The stores lag their logs, as after a crash: the migration replays the rest.
        yield _old_log(os.path.join(self.data_dir, "meta"), ClusterStore, "cluster.sqlite",
                       meta, applied=1)
        for shard, ids in self.on_shard.items():
            commands = [PutJobs((_spec(job_id),)) for job_id in ids]
            yield _old_log(os.path.join(self.data_dir, "shards", str(shard)), VnodeStore,
                           "jobs.sqlite", commands, applied=len(commands) // 2)

    @defer.inlineCallbacks
    def start(self):
        node = yield start_local_node(reactor, self.data_dir, shards=2)
        self.addCleanup(node.stopService)
        return node

    @defer.inlineCallbacks
    def test_every_acknowledged_write_is_served_and_the_old_logs_are_kept(self):
        node = yield self.start()
        self.assertIsNotNone((yield node.coordinator.get_route("hook")))
        for ids in self.on_shard.values():
            for job_id in ids:
                job = yield node.coordinator.get_job("c", job_id)
                self.assertEqual(job.trigger_ms, FAR)
        index = yield node.coordinator.put_job(_spec("new"))
        self.assertGreater(index, 0)
        for directory in ("meta", "shards/0", "shards/1"):
            path = os.path.join(self.data_dir, directory, "wal")
            self.assertFalse(os.path.exists(path), path)
            self.assertTrue(os.path.isdir(path + MIGRATED_SUFFIX), path)
        yield node.stopService()
        again = yield start_local_node(reactor, self.data_dir, shards=2)
        self.addCleanup(again.stopService)
        job = yield again.coordinator.get_job("c", "new")
        self.assertEqual(job.version, index)
        job = yield again.coordinator.get_job("c", self.on_shard[1][-1])
        self.assertEqual(job.trigger_ms, FAR)
