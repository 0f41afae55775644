"""``timemachine dev-cluster N``, run as a user runs it: a real process and its nodes."""

import os
import re
import signal
import socket
import subprocess

from treq.client import HTTPClient
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import REPO, call_json, numbered_port_base, timemachine_command

NODES = 3
SHARDS = 4
READY_LINE = "Ctrl-C stops every node"


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _children(pid: int) -> set[int]:
    """The PIDs whose parent is ``pid``, from /proc."""
    children = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.add(int(entry))
    return children


class DevClusterTests(unittest.TestCase):
    timeout = 180

    def setUp(self):
        self.base_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.base_dir)
        self.data_dir = os.path.join(self.base_dir, "data")
        self.output = os.path.join(self.base_dir, "dev-cluster.out")
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        self.process = None
        self.node_pids: set[int] = set()
        self.addCleanup(self._kill_leftovers)

    def _kill_leftovers(self):
        """A failed test must not leave processes behind: each one by its PID."""
        for pid in self.node_pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def start(self, *options, sigint_ignored=False):
        """Run ``timemachine dev-cluster *options``; ``sigint_ignored`` starts it as a
        shell starts a background job (``&``), with SIGINT ignored."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        with open(self.output, "wb") as out:
            self.process = subprocess.Popen(
                [*timemachine_command(), "dev-cluster", *options],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                cwd=self.base_dir,
                preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
                if sigint_ignored else None,
            )

    def read_output(self) -> str:
        with open(self.output) as f:
            return f.read()

    def started_pids(self) -> dict[str, int]:
        """``nodeI -> pid`` as the command printed them when it started the nodes."""
        found = re.findall(r"^  (node\d+): pid (\d+), log ", self.read_output(), re.M)
        pids = {node_id: int(pid) for node_id, pid in found}
        self.node_pids.update(pids.values())
        return pids

    @defer.inlineCallbacks
    def until(self, what, check, timeout=90.0):
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() > deadline:
                self.fail(f"not within {timeout} s: {what}\n{self.read_output()}")
            yield task.deferLater(reactor, 0.1, lambda: None)

    def exited(self):
        return self.until("dev-cluster exits", lambda: self.process.poll() is not None)

    @defer.inlineCallbacks
    def test_forms_the_cluster_and_sigint_stops_every_node(self):
        base = numbered_port_base(NODES)
        self.start(str(NODES), "--http-base", str(base), "--peer-base", str(base + 100),
                   "--data-dir", self.data_dir, "--shards", str(SHARDS))

        def ready_or_exited():
            return READY_LINE in self.read_output() or self.process.poll() is not None

        yield self.until("the cluster is ready", ready_or_exited)
        self.assertIsNone(self.process.poll(), self.read_output())
        pids = self.started_pids()
        self.assertEqual(sorted(pids), [f"node{i}" for i in range(1, NODES + 1)])
        # Every process it started is one of the nodes it printed.
        self.assertEqual(_children(self.process.pid), set(pids.values()))
        output = self.read_output()
        for i in range(1, NODES + 1):
            self.assertIn(
                f"node{i}  http://127.0.0.{i}:{base + i}  peer 127.0.0.{i}:{base + 100 + i}  "
                f"pid {pids[f'node{i}']}  log {os.path.join(self.data_dir, f'node{i}.log')}",
                output,
            )

        code, answer = yield call_json(
            self.http, "GET", f"http://127.0.0.1:{base + 1}/cluster/servers"
        )
        self.assertEqual(code, 200, answer)
        self.assertEqual(
            sorted((s["ID"], s["Address"], s["http_address"], s["Suffrage"])
                   for s in answer["servers"]),
            [(f"node{i}", f"127.0.0.{i}:{base + 100 + i}", f"127.0.0.{i}:{base + i}", "Voter")
             for i in range(1, NODES + 1)],
        )
        for i in range(1, NODES + 1):
            code, answer = yield call_json(
                self.http, "GET", f"http://127.0.0.{i}:{base + i}/cluster/shards"
            )
            self.assertEqual(code, 200, answer)
            self.assertEqual(len(answer["shards"]), SHARDS)
            for entry in answer["shards"]:
                # --replicas defaults to min(3, N): every node holds every shard.
                self.assertEqual(
                    (sorted(entry["replicas"]), entry["status"]),
                    ([f"node{n}" for n in range(1, NODES + 1)], "serving"),
                    entry,
                )

        self.process.send_signal(signal.SIGINT)
        yield self.exited()
        self.assertEqual(self.process.returncode, 0, self.read_output())
        for node_id, pid in pids.items():
            self.assertFalse(_alive(pid), f"{node_id} (pid {pid}) still runs")
        self.assertIn("stopping node1, node2, node3", self.read_output())

    @defer.inlineCallbacks
    def test_sigint_stops_it_when_started_as_a_background_job(self):
        base = numbered_port_base(1)
        self.start("1", "--http-base", str(base), "--peer-base", str(base + 100),
                   "--data-dir", self.data_dir, "--shards", "1", sigint_ignored=True)
        yield self.until("the cluster is ready",
                         lambda: READY_LINE in self.read_output()
                         or self.process.poll() is not None)
        pids = self.started_pids()
        self.assertEqual(list(pids), ["node1"], self.read_output())
        self.process.send_signal(signal.SIGINT)
        yield self.exited()
        self.assertEqual(self.process.returncode, 0, self.read_output())
        self.assertFalse(_alive(pids["node1"]), "node1 still runs")

    @defer.inlineCallbacks
    def test_a_node_that_fails_to_start_stops_the_others(self):
        base = numbered_port_base(NODES)
        os.makedirs(self.data_dir)
        with open(os.path.join(self.data_dir, "node2"), "w"):
            pass  # node2's data dir is a file: node2 cannot start
        self.start(str(NODES), "--http-base", str(base), "--peer-base", str(base + 100),
                   "--data-dir", self.data_dir, "--shards", str(SHARDS))
        yield self.exited()
        pids = self.started_pids()
        output = self.read_output()
        self.assertEqual(self.process.returncode, 1, output)
        self.assertEqual(sorted(pids), [f"node{i}" for i in range(1, NODES + 1)])
        self.assertIn("timemachine dev-cluster: node2: exited (exit status 1)", output)
        # The end of node2's log, with why it failed.
        self.assertIn(f"--- the end of {os.path.join(self.data_dir, 'node2.log')} ---", output)
        self.assertIn("NotADirectoryError", output)
        self.assertNotIn(READY_LINE, output)
        for node_id, pid in pids.items():
            self.assertFalse(_alive(pid), f"{node_id} (pid {pid}) still runs")

    @defer.inlineCallbacks
    def test_a_port_in_use_is_named_and_no_node_starts(self):
        base = numbered_port_base(2)
        with socket.socket() as taken:
            taken.bind(("127.0.0.2", base + 100 + 2))
            taken.listen()
            self.start("2", "--http-base", str(base), "--peer-base", str(base + 100),
                       "--data-dir", self.data_dir)
            yield self.exited()
        output = self.read_output()
        self.assertEqual(self.process.returncode, 1, output)
        self.assertIn(
            f"timemachine dev-cluster: node2: its peer address 127.0.0.2:{base + 102} is in use",
            output,
        )
        self.assertEqual(self.started_pids(), {})
