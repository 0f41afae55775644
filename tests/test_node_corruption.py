"""A node with a damaged shard store, or one whose disk fills: that shard is
unavailable, the others serve.

Real parts: the SQLite file of one shard of a real node is overwritten at its start
between two runs (the node's Raft log is shared by all shards: its damage stops the
whole node, see tests.integration.test_repair); a store's open file is swapped for
/dev/full while the node runs.
"""

import os

from twisted.internet import defer
from twisted.logger import globalLogPublisher

from tests.support import NodeTestCase, fill_disk_under, tree_bytes
from timemachine.domain.errors import StorageError


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


class FullDiskTests(NodeTestCase):
    """A disk that fills under a running store (a real ENOSPC: `fill_disk_under`)."""

    shards = 2

    @defer.inlineCallbacks
    def test_a_shard_stopped_by_a_full_disk_is_unavailable_and_the_others_serve(self):
        yield self.route()
        far = self.now_ms() + 3_600_000
        ring = self.node.coordinator.ring
        ids = {ring.shard_for(f"j{n}"): f"j{n}" for n in range(20)}
        for job_id in ids.values():
            code, answer = yield self.call(
                "POST", "/job/c", {"id": job_id, "trigger_ms": far, "route": "hook"}
            )
            self.assertEqual(code, 200, answer)
        full, healthy = 0, 1
        path = os.path.join(self.data_dir, "shards", str(full), "jobs.sqlite-wal")
        fill_disk_under(path)

        # The write that meets the full disk stops the shard's member, and is a retry.
        job_id = next(f"a{n}" for n in range(100) if ring.shard_for(f"a{n}") == full)
        code, answer = yield self.call(
            "POST", "/job/c", {"id": job_id, "trigger_ms": far, "route": "hook"}
        )
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"), answer)
        self.flushLoggedErrors(StorageError)

        # The node says so where a load balancer and an operator look.
        code, answer = yield self.call("GET", "/ready")
        self.assertEqual((code, answer.get("code")), (503, "E_UNAVAILABLE"), answer)
        self.assertIn(f"shard {full}: ", answer["error"])
        self.assertIn("full", answer["error"])
        response = yield self.http.get(self.base + "/metrics")
        metrics = (yield response.content()).decode()
        self.assertIn("\ntimemachine_shards_unavailable 1.0\n", metrics)
        code, answer = yield self.call("GET", f"/job/c/{ids[full]}")
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"), answer)
        self.assertIn(f"shard {full} is unavailable", answer["error"])
        # The other shard reads and writes.
        code, answer = yield self.call("GET", f"/job/c/{ids[healthy]}")
        self.assertEqual(code, 200, answer)
        job_id = next(f"h{n}" for n in range(100) if ring.shard_for(f"h{n}") == healthy)
        code, answer = yield self.call(
            "POST", "/job/c", {"id": job_id, "trigger_ms": far, "route": "hook"}
        )
        self.assertEqual(code, 200, answer)

    @defer.inlineCallbacks
    def test_a_meta_store_stopped_by_a_full_disk_makes_the_node_unready(self):
        yield self.route()
        fill_disk_under(os.path.join(self.data_dir, "meta", "cluster.sqlite-wal"))
        code, answer = yield self.call(
            "POST", "/route", {"id": "more", "type": "http", "webhook_url": "http://127.0.0.1:9/"}
        )
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"), answer)
        self.flushLoggedErrors(StorageError)
        code, answer = yield self.call("GET", "/ready")
        self.assertEqual((code, answer.get("code")), (503, "E_UNAVAILABLE"), answer)
        self.assertIn("meta group stopped", answer["error"])
        self.assertIn("full", answer["error"])
