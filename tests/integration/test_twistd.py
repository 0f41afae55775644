"""Real ``twistd timemachine`` processes: killed with -9, restarted on the same data dir."""

import os
import signal

from treq.client import HTTPClient
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import HTTPReceiver, NodeProcess, call_json, start_node_process, tree_bytes


class KillNineTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.data_dir = os.path.abspath(self.mktemp())
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        self.receiver = HTTPReceiver(reactor)
        self.receiver.start()
        self.addCleanup(self.receiver.stop)
        self.node = yield self.start_node()

    def start_node(self):
        return start_node_process(self, reactor, self.http, self.data_dir)

    def call(self, method, path, body=None):
        return call_json(self.http, method, self.node.url + path, body)

    @defer.inlineCallbacks
    def test_acknowledged_jobs_fire_once_after_kill_9(self):
        code, _ = yield self.call(
            "POST", "/route", {"id": "hook", "type": "http", "webhook_url": self.receiver.url()}
        )
        self.assertEqual(code, 200)
        now = int(reactor.seconds() * 1000)
        early = [{"id": f"early-{i}", "trigger_ms": now, "route": "hook"} for i in range(50)]
        code, _ = yield self.call("POST", "/job/c", early)
        self.assertEqual(code, 200)
        yield self.receiver.wait_for(50)
        for job in early:  # their FIRED outcomes are durable before the kill
            for _ in range(200):
                _, state = yield self.call("GET", f"/job/c/{job['id']}")
                if state["status"] == "fired":
                    break
                yield task.deferLater(reactor, 0.02, lambda: None)
            self.assertEqual(state["status"], "fired")

        later = [
            {"id": f"later-{i}", "trigger_ms": now + 2500 + i, "route": "hook"}
            for i in range(200)
        ]
        code, answer = yield self.call("POST", "/job/c", later)
        self.assertEqual(code, 200)
        self.assertEqual({r["status"] for r in answer["results"]}, {"ok"})
        code, _ = yield self.call("POST", "/job/c", {"id": "single", "trigger_ms": now + 2500,
                                                     "route": "hook"})
        self.assertEqual(code, 200)
        self.node.kill(signal.SIGKILL)

        self.node = yield self.start_node()
        yield self.receiver.wait_for(50 + 200 + 1)
        yield task.deferLater(reactor, 0.5, lambda: None)  # room for a duplicate to show
        ids = [r.headers["x-timemachine-job-id"] for r in self.receiver.requests]
        expected = [j["id"] for j in early + later] + ["single"]
        self.assertEqual(sorted(ids), sorted(expected))
        for request in self.receiver.requests:
            job_id = request.headers["x-timemachine-job-id"]
            trigger = int(request.headers["x-timemachine-trigger-ms"])
            self.assertGreaterEqual(request.at * 1000, trigger, f"{job_id} fired early")

    @defer.inlineCallbacks
    def test_sigterm_stops_gracefully_and_restarts(self):
        code, _ = yield self.call(
            "POST", "/route", {"id": "hook", "type": "http", "webhook_url": self.receiver.url()}
        )
        self.assertEqual(code, 200)
        self.node.kill(signal.SIGTERM)
        # twistd ends by re-raising the signal it stopped for, after a clean shutdown.
        self.assertIn(self.node.process.returncode, (0, -signal.SIGTERM))
        self.assertIn("Server Shut Down.", self.node.log_tail())
        self.assertNotIn("Traceback", self.node.log_tail())
        self.node = yield self.start_node()
        code, route = yield self.call("GET", "/route/hook")
        self.assertEqual((code, route["webhook_url"]), (200, self.receiver.url()))


class StartFailureTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def started_until_it_exits(self, node):
        """Start ``node``; fire with its exit status once it ends (within 30 s)."""
        node.start()
        self.addCleanup(node.kill)
        for _ in range(300):
            if node.process.poll() is not None:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        return node.process.returncode

    @defer.inlineCallbacks
    def test_a_node_that_fails_before_its_reactor_runs_exits_with_status_1(self):
        # Its data dir is a file: the node fails in startService, which twistd calls
        # before it runs the reactor.
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        data_dir = os.path.join(base, "data")
        with open(data_dir, "w"):
            pass
        node = NodeProcess(data_dir, os.path.join(base, "node.log"))
        self.assertEqual((yield self.started_until_it_exits(node)), 1, node.log_tail())
        self.assertIn("node node1 failed to start", node.log_tail())

    @defer.inlineCallbacks
    def test_a_node_started_on_another_nodes_data_dir_refuses_and_touches_nothing(self):
        base = os.path.abspath(self.mktemp())
        data_dir = os.path.join(base, "node1")
        http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        node1 = yield start_node_process(self, reactor, http, data_dir)
        node1.kill(signal.SIGTERM)
        before = tree_bytes(data_dir)
        node2 = NodeProcess(data_dir, os.path.join(base, "node2.log"), node_id="node2")
        self.assertEqual((yield self.started_until_it_exits(node2)), 1, node2.log_tail())
        log = node2.log_tail()
        self.assertIn("node node2 refuses to start", log)
        identity = os.path.join(data_dir, "identity")
        self.assertIn(f"{identity}: this data dir belongs to node node1, not node2", log)
        self.assertEqual(tree_bytes(data_dir), before)
