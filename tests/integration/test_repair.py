"""A damaged Raft log, end to end: real ``twistd timemachine`` and ``timemachine repair``.

A flipped byte in the middle of the node's Raft log (one log for all its groups): the
node refuses to start, naming the file and offset, and deletes nothing; ``repair
--dry-run`` says what a cut would lose; after ``repair`` the node serves every job its
stores hold.
"""

import os
import signal
import subprocess

from treq.client import HTTPClient
from twisted.internet import defer, reactor, task
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
from timemachine.node import REPAIRED_MARKER


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
    def test_a_damaged_raft_log_stops_the_node_is_repaired_on_request_and_serves_again(self):
        ids_of = yield self.store_jobs()
        wal = os.path.join(self.data_dir, "raft", "wal")
        segment = self.only_segment(wal)
        flip_byte(segment, os.path.getsize(segment) // 2)
        before = tree_bytes(wal)

        node = NodeProcess(self.data_dir, os.path.abspath(self.mktemp()) + ".log")
        node.start()
        self.addCleanup(node.kill)
        self.assertEqual(node.process.wait(timeout=60), 1)
        log = node.log_tail()
        self.assertIn("refuses to start", log)
        self.assertIn(f"{segment} at byte ", log)
        self.assertIn("--raft --dry-run", log)
        self.assertEqual(tree_bytes(wal), before)

        marker = os.path.join(self.data_dir, REPAIRED_MARKER)
        dry = self.repair("--raft", "--dry-run")
        self.assertEqual(dry.returncode, 1, dry.stderr)
        self.assertFalse(os.path.exists(marker))
        self.assertIn(f"damage: {segment} at byte ", dry.stdout)
        self.assertIn("a cut there would lose", dry.stdout)
        self.assertIn("dry run: nothing was changed", dry.stdout)
        self.assertEqual(tree_bytes(wal), before)

        done = self.repair("--raft")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("repaired", done.stdout)
        self.assertNotEqual(tree_bytes(wal), before)
        # Until they caught up, the node's members withhold their votes.
        self.assertTrue(os.path.exists(marker))
        again = self.repair("--raft", "--dry-run")
        self.assertEqual(again.returncode, 0, again.stdout)
        self.assertIn("nothing to repair", again.stdout)

        # Every job was applied to its store before the stop: the shards whose Raft
        # records were cut restart from their stores, and nothing is lost.
        yield self.start_node()
        for ids in ids_of.values():
            for job_id in ids:
                code, answer = yield self.call("GET", f"/job/c/{job_id}")
                self.assertEqual(code, 200, answer)
        code, answer = yield self.call(
            "POST", "/job/c", {"id": "after", "trigger_ms": 2_000_000_000_000, "route": "hook"}
        )
        self.assertEqual(code, 200, answer)
        code, answer = yield self.call("GET", "/cluster/shards")
        self.assertEqual({s["status"] for s in answer["shards"]}, {"serving"})
        # Each group's only voter: nothing to catch up with, the marker goes.
        deadline = reactor.seconds() + 30
        while os.path.exists(marker) and reactor.seconds() < deadline:
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertFalse(os.path.exists(marker))
        self.stop_node()
        self.assertIn("the group restarts from the store", self.node.log_tail())
