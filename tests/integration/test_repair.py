"""A damaged log, end to end: real ``twistd timemachine`` and ``timemachine repair``.

A flipped byte in the middle of a shard log: the node reports that shard unavailable
with the file and offset, serves the others and deletes nothing; ``repair --dry-run``
says what a cut would lose; after ``repair`` the node serves the shard again. A damaged
meta log stops the node from starting, naming the file and offset.
"""

import os
import signal
import subprocess

from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import (
    NodeProcess,
    call_json,
    flip_byte,
    start_node_process,
    timemachine_command,
    tree_bytes,
)
from timemachine.cluster.ring import Ring


class RepairTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        self.node = None

    @defer.inlineCallbacks
    def start_node(self, until="/ready"):
        """A node on the test's data dir, once ``until`` answers 200."""
        self.node = yield start_node_process(self, reactor, self.http, self.data_dir, until)

    def stop_node(self):
        self.node.kill(signal.SIGTERM)
        self.assertIn(self.node.process.returncode, (0, -signal.SIGTERM))

    def call(self, method, path, body=None):
        return call_json(self.http, method, self.node.url + path, body)

    def repair(self, *args):
        """``timemachine repair`` on the test's data dir, as a user runs it."""
        return subprocess.run(
            [*timemachine_command(), "repair", "--data-dir", self.data_dir, *args],
            capture_output=True, text=True, timeout=60, check=False,
        )

    @defer.inlineCallbacks
    def store_jobs(self, count=40):
        """A route and ``count`` far-off jobs, one log record each; their ids by shard."""
        yield self.start_node()
        code, _ = yield self.call(
            "POST", "/route", {"id": "hook", "type": "http",
                               "webhook_url": "http://127.0.0.1:9/never"},
        )
        self.assertEqual(code, 200)
        far = int(reactor.seconds() * 1000) + 3_600_000
        ring = Ring.single_node("node1", 4)
        ids_of = {shard: [] for shard in range(4)}
        for i in range(count):
            job = {"id": f"job-{i}", "trigger_ms": far, "route": "hook"}
            code, answer = yield self.call("POST", "/job/c", job)
            self.assertEqual(code, 200, answer)
            ids_of[ring.shard_for(job["id"])].append(job["id"])
        self.stop_node()
        return ids_of

    def only_segment(self, wal):
        (name,) = [n for n in os.listdir(wal) if n.endswith(".wal")]
        return os.path.join(wal, name)

    @defer.inlineCallbacks
    def test_a_damaged_shard_is_reported_repaired_on_request_and_serves_again(self):
        ids_of = yield self.store_jobs()
        damaged = max(ids_of, key=lambda shard: len(ids_of[shard]))
        wal = os.path.join(self.data_dir, "shards", str(damaged), "wal")
        segment = self.only_segment(wal)
        flip_byte(segment, os.path.getsize(segment) // 2)
        wal_before = tree_bytes(wal)

        yield self.start_node(until="/health")
        code, answer = yield self.call("GET", "/ready")
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"))
        self.assertIn(f"shard {damaged}: ", answer["error"])
        self.assertIn(f"{segment} at byte ", answer["error"])
        code, answer = yield self.call("GET", "/cluster/shards")
        entry = answer["shards"][damaged]
        self.assertEqual(entry["status"], "unavailable")
        self.assertIn(f"{segment} at byte ", entry["error"])
        victim = ids_of[damaged][0]
        code, answer = yield self.call(
            "POST", "/job/c", {"id": victim, "trigger_ms": 2_000_000_000_000, "route": "hook"}
        )
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"))
        for shard, ids in ids_of.items():
            if shard != damaged and ids:
                code, answer = yield self.call("GET", f"/job/c/{ids[0]}")
                self.assertEqual(code, 200, answer)
        self.stop_node()
        log = self.node.log_tail()
        self.assertIn(f"shard {damaged} is unavailable", log)
        self.assertIn(f"{segment} at byte ", log)
        self.assertIn("intact records before it", log)
        self.assertEqual(tree_bytes(wal), wal_before)

        dry = self.repair("--shard", str(damaged), "--dry-run")
        self.assertEqual(dry.returncode, 1, dry.stderr)
        self.assertIn(f"damage: {segment} at byte ", dry.stdout)
        self.assertIn("a cut there would lose", dry.stdout)
        # Every job was applied before the stop: the store keeps them all.
        self.assertIn("no acknowledged write is lost", dry.stdout)
        self.assertIn("dry run: nothing was changed", dry.stdout)
        self.assertEqual(tree_bytes(wal), wal_before)

        done = self.repair("--shard", str(damaged))
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("repaired", done.stdout)
        self.assertNotEqual(tree_bytes(wal), wal_before)
        again = self.repair("--shard", str(damaged), "--dry-run")
        self.assertEqual(again.returncode, 0, again.stdout)
        self.assertIn("nothing to repair", again.stdout)

        yield self.start_node()
        for job_id in ids_of[damaged]:
            code, answer = yield self.call("GET", f"/job/c/{job_id}")
            self.assertEqual(code, 200, answer)
        code, answer = yield self.call(
            "POST", "/job/c", {"id": victim, "trigger_ms": 2_000_000_000_000, "route": "hook"}
        )
        self.assertEqual(code, 200, answer)
        code, answer = yield self.call("GET", "/cluster/shards")
        self.assertEqual({s["status"] for s in answer["shards"]}, {"serving"})

    @defer.inlineCallbacks
    def test_a_damaged_meta_log_stops_the_node_naming_the_damage(self):
        yield self.store_jobs(count=2)
        wal = os.path.join(self.data_dir, "meta", "wal")
        segment = self.only_segment(wal)
        # The first of its two records (the configuration, then the route).
        flip_byte(segment, 30)
        before = tree_bytes(wal)
        node = NodeProcess(self.data_dir, os.path.abspath(self.mktemp()) + ".log")
        node.start()
        self.addCleanup(node.kill)
        self.assertEqual(node.process.wait(timeout=60), 1)
        log = node.log_tail()
        self.assertIn("refuses to start", log)
        self.assertIn(f"{segment} at byte 0", log)
        self.assertIn("--meta --dry-run", log)
        self.assertEqual(tree_bytes(wal), before)
        dry = self.repair("--meta", "--dry-run")
        self.assertEqual(dry.returncode, 1, dry.stderr)
        self.assertIn(f"damage: {segment} at byte 0", dry.stdout)
