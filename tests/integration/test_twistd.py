"""Real ``twistd timemachine`` processes: killed with -9, restarted on the same data dir."""

import json
import os
import signal
import subprocess
import sys

from treq.client import HTTPClient
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import HTTPReceiver, free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def twistd_command() -> list[str]:
    """``twistd`` of this interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


class NodeProcess:
    """One ``twistd -n timemachine`` process on free ports of 127.0.0.1."""

    def __init__(self, data_dir: str, log_file: str):
        self.data_dir = data_dir
        self.log_file = log_file
        self.http_port = free_port()
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self):
        env = dict(os.environ)
        # The plugin in twisted/plugins/ of this checkout, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [
                *twistd_command(), "-n", "--pidfile=", "--logfile", self.log_file,
                "timemachine", "--data-dir", self.data_dir, "--shards", "4",
                "--http", f"tcp:{self.http_port}:interface=127.0.0.1",
                "--peer", f"tcp:{free_port()}:interface=127.0.0.1",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )

    def kill(self, sig=signal.SIGKILL):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def log_tail(self) -> str:
        try:
            with open(self.log_file) as f:
                return f.read()[-3000:]
        except OSError:
            return ""


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

    @defer.inlineCallbacks
    def start_node(self):
        node = NodeProcess(self.data_dir, os.path.abspath(self.mktemp()) + ".log")
        node.start()
        self.addCleanup(node.kill)
        for _ in range(600):
            if node.process.poll() is not None:
                self.fail(f"node exited with {node.process.returncode}:\n{node.log_tail()}")
            try:
                response = yield self.http.get(node.url + "/ready")
                yield response.content()
                if response.code == 200:
                    return node
            except Exception:
                pass
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"node did not get ready:\n{node.log_tail()}")

    @defer.inlineCallbacks
    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        response = yield self.http.request(method, self.node.url + path, data=data)
        content = yield response.content()
        return response.code, json.loads(content)

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
