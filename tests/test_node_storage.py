"""A whole node's storage lifecycle: logs compacted, finished jobs purged (real parts)."""

import os

from twisted.internet import defer, reactor, task

from tests.support import NodeTestCase


def segment_files(directory):
    return [name for name in os.listdir(directory) if name.endswith(".wal")]


class StorageLifecycleTests(NodeTestCase):
    shards = 2
    node_options = {
        "wal_segment_bytes": 4096,
        "retain_fired_ms": 0,
        "group_options": {"compact_every": 50},
        "raft_log_options": {"keep_entries": 10},
        "retention_options": {"sweep_s": 0.05, "batch": 40},
    }

    @defer.inlineCallbacks
    def stored_jobs(self):
        code, answer = yield self.call("GET", "/cluster/shards")
        self.assertEqual(code, 200, answer)
        return sum(shard["jobs"] for shard in answer["shards"])

    @defer.inlineCallbacks
    def wait_until_no_jobs(self, rounds=500):
        for _ in range(rounds):
            if (yield self.stored_jobs()) == 0:
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail(f"{(yield self.stored_jobs())} jobs still stored")

    def raft_log(self):
        return os.path.join(self.data_dir, "raft", "wal")

    @defer.inlineCallbacks
    def test_fired_jobs_are_purged_and_the_logs_stay_a_few_segments(self):
        yield self.route()
        start = self.now_ms() + 200
        for round_ in range(3):
            batch = [
                {"id": f"job-{round_}-{i}", "trigger_ms": start + i, "route": "hook",
                 "meta": {"n": i}}
                for i in range(100)
            ]
            code, answer = yield self.call("POST", "/job/orders", batch)
            self.assertEqual(code, 200, answer)
        yield self.receiver.wait_for(300)
        yield self.wait_until_no_jobs()
        code, answer = yield self.call("GET", "/job/orders/job-1-7")
        self.assertEqual((code, answer["code"]), (404, "E_NOT_FOUND"))
        self.assertEqual(self.node.retention.purged, 300)
        # 300 creates, 300 outcomes and the purges of the shards and the meta group
        # went through the one Raft log; what is left is each group's tail and the
        # entries since its last cut (quiet groups are copied forward).
        # Where the last compactions fell decides between 3 and 5 segments; a log that
        # kept its history holds 12 here.
        self.assertLessEqual(len(segment_files(self.raft_log())), 6)
        metrics = self.node.metrics.render().decode()
        self.assertIn("timemachine_jobs_purged_total 300.0", metrics)
        self.assertIn('timemachine_log_bytes{log="raft"}', metrics)
        self.assertIn('timemachine_store_bytes{store="meta"}', metrics)
        yield self.restart()
        self.assertEqual((yield self.stored_jobs()), 0)
        code, answer = yield self.call("GET", "/job/orders/job-2-9")
        self.assertEqual(code, 404)
        answer = yield self.job("orders", "after", self.now_ms() + 60_000)
        self.assertEqual(answer["status"], "ok")
