"""A node with a damaged shard store: that shard is unavailable, the others serve.

Real parts: the SQLite file of one shard of a real node is overwritten at its start
between two runs (the node's Raft log is shared by all shards: its damage stops the
whole node, see tests.integration.test_repair).
"""

import os

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from tests.support import NodeTestCase, tree_bytes


class DamagedShardTests(NodeTestCase):
    shards = 4

    @defer.inlineCallbacks
    def damage_a_shard(self):
        """Jobs on every shard, then the header of one shard's store overwritten.

        Returns (damaged shard, the job ids stored on each shard, the store file).
        """
        yield self.route()
        far = self.now_ms() + 3_600_000
        jobs = [{"id": f"job-{i}", "trigger_ms": far, "route": "hook"} for i in range(40)]
        for job in jobs:
            code, answer = yield self.call("POST", "/job/c", job)
            self.assertEqual(code, 200, answer)
        ring = self.node.coordinator.ring
        ids_of = {shard: [] for shard in range(self.shards)}
        for job in jobs:
            ids_of[ring.shard_for(job["id"])].append(job["id"])
        yield self.stop_node()
        damaged = max(ids_of, key=lambda shard: len(ids_of[shard]))
        path = os.path.join(self.data_dir, "shards", str(damaged), "jobs.sqlite")
        with open(path, "r+b") as f:
            f.write(b"not a database!!")
        return damaged, ids_of, path

    @defer.inlineCallbacks
    def test_a_damaged_shard_is_unavailable_and_the_others_serve(self):
        damaged, ids_of, path = yield self.damage_a_shard()
        store_before = tree_bytes(os.path.join(self.data_dir, "shards", str(damaged)))
        logged = []
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        globalLogPublisher.addObserver(logged.append)
        yield self.start_node()

        # The log says which shard and file.
        (event,) = [e for e in logged if e.get("log_format", "").startswith("shard {shard} is")]
        self.assertEqual(event["shard"], damaged)
        self.assertIn(path, str(event["error"]))
        where = path

        code, answer = yield self.call("GET", "/ready")
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"))
        self.assertIn(f"shard {damaged}: ", answer["error"])
        self.assertIn(where, answer["error"])

        response = yield self.http.get(self.base + "/metrics")
        metrics = (yield response.content()).decode()
        self.assertIn("\ntimemachine_shards_unavailable 1.0\n", metrics)

        code, answer = yield self.call("GET", "/cluster/shards")
        self.assertEqual(code, 200, answer)
        by_shard = {entry["shard"]: entry for entry in answer["shards"]}
        self.assertEqual(by_shard[damaged]["status"], "unavailable")
        self.assertIn(where, by_shard[damaged]["error"])
        for shard, entry in by_shard.items():
            if shard != damaged:
                self.assertEqual(entry["status"], "serving")
                self.assertEqual(entry["jobs"], len(ids_of[shard]))

        # The damaged shard's jobs: reads and writes get 503 E_UNAVAILABLE.
        victim = ids_of[damaged][0]
        for method, url, body in [
            ("GET", f"/job/c/{victim}", None),
            ("DELETE", f"/job/c/{victim}", None),
            ("POST", "/job/c", {"id": victim, "trigger_ms": self.now_ms(), "route": "hook"}),
            ("GET", "/job/c", None),
        ]:
            code, answer = yield self.call(method, url, body)
            self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"), (method, url))
            self.assertIn(f"shard {damaged} is unavailable", answer["error"])

        # The others serve reads, writes and batches; a batch answers per item.
        healthy = next(s for s in ids_of if s != damaged and ids_of[s])
        code, answer = yield self.call("GET", f"/job/c/{ids_of[healthy][0]}")
        self.assertEqual(code, 200, answer)
        batch = [
            {"id": job_id, "trigger_ms": self.now_ms() + 60_000, "route": "hook"}
            for job_id in (victim, ids_of[healthy][0])
        ]
        code, answer = yield self.call("POST", "/job/c", batch)
        self.assertEqual(code, 200, answer)
        self.assertEqual(
            [(r["status"], r.get("code")) for r in answer["results"]],
            [("error", "E_UNAVAILABLE"), ("ok", None)],
        )

        # Reshaping the shards would delete the damaged one's files: refused.
        code, answer = yield self.call("POST", "/cluster/configure", {"shards": 2})
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"), answer)

        yield self.stop_node()
        store_after = tree_bytes(os.path.join(self.data_dir, "shards", str(damaged)))
        self.assertEqual(store_after, store_before)
