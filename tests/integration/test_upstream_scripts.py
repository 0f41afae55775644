"""Upstream's cluster workflow, call for call, against real ``twistd timemachine`` nodes.

Upstream (``aarthikrao/timeMachine``) runs a local cluster with its scripts:
``spawn.sh`` starts node1..N on their own, HTTP port 800N and peer port 810N;
``join.sh`` POSTs ``/cluster/join`` to node1 for nodes 2..N with only ``node_id`` and
``raft_address`` (each node's HTTP address is then its peer port - 100);
``configure.sh`` POSTs ``/cluster/configure``; ``status.sh`` GETs ``/cluster`` and
``/health`` of each node; its CLI reads ``/cluster/servers`` and finds each node's (and
the leader's) HTTP address as peer port - 100. Here the nodes are node1..3 on
127.0.0.1..3, on ports 800N/810N when those are free, else on another pair of bases
that keeps peer = HTTP + 100.
"""

import os
import signal

from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import (
    NodeProcess,
    PollingTestCase,
    call_json,
    numbered_port_base,
    start_node_process,
)

NODES = 3
#: The shard count every node bootstraps with (`NodeProcess`), which configure.sh keeps.
SHARDS = 4


def http_of_raft(address: str) -> str:
    """Upstream CLI's ``getHTTPAddressFromRaft``: the same host, port - 100."""
    host, _, port = address.rpartition(":")
    return f"{host}:{int(port) - 100}"


class UpstreamScriptsTests(PollingTestCase):
    timeout = 180

    def setUp(self):
        self.base_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.base_dir)
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    def call(self, address, method, path, body=None):
        # Bounded: a call that is never answered fails (and `until` asks again).
        return call_json(self.http, method, f"http://{address}{path}", body, timeout=10)

    @defer.inlineCallbacks
    def test_spawn_join_configure_status_and_the_cli(self):
        base = numbered_port_base(NODES, first=8000)
        nodes = {}
        # spawn.sh: every node on its own (each bootstraps a one-node cluster).
        for i in range(1, NODES + 1):
            node_id = f"node{i}"
            node = NodeProcess(
                os.path.join(self.base_dir, node_id), os.path.join(self.base_dir, f"{node_id}.log"),
                host=f"127.0.0.{i}", node_id=node_id,
            )
            node.http_port, node.peer_port = base + i, base + 100 + i
            nodes[node_id] = yield start_node_process(self, reactor, self.http, None, node=node)
        node1 = nodes["node1"].http_address

        # join.sh: node_id and raft_address only.
        for i in range(2, NODES + 1):
            code, answer = yield self.call(
                node1, "POST", "/cluster/join",
                {"node_id": f"node{i}", "raft_address": f"127.0.0.{i}:{base + 100 + i}"},
            )
            self.assertEqual((code, answer), (200, {"status": "ok", "node_id": f"node{i}"}))

        # The CLI: /cluster/servers of a seed node; HTTP addresses are peer port - 100.
        code, servers = yield self.call(node1, "GET", "/cluster/servers")
        self.assertEqual(code, 200, servers)
        self.assertEqual(
            sorted((s["ID"], s["Address"]) for s in servers["servers"]),
            [(f"node{i}", f"127.0.0.{i}:{base + 100 + i}") for i in range(1, NODES + 1)],
        )
        for server in servers["servers"]:
            self.assertEqual(server["http_address"], http_of_raft(server["Address"]))
            code, answer = yield self.call(http_of_raft(server["Address"]), "GET", "/health")
            self.assertEqual((code, answer), (200, {"status": "ok"}))
        leader = http_of_raft(servers["leader"])
        self.assertEqual(leader, node1)

        # configure.sh (the CLI sends it to the leader), right after join.sh.
        code, answer = yield self.call(
            leader, "POST", "/cluster/configure", {"shards": SHARDS, "replicas": NODES}
        )
        self.assertEqual((code, answer["shards"], answer["replicas"]), (200, SHARDS, NODES))

        @defer.inlineCallbacks
        def every_node_serves_every_shard():
            for node in nodes.values():
                code, answer = yield self.call(node.http_address, "GET", "/cluster/shards")
                if code != 200 or len(answer["shards"]) != SHARDS:
                    return False
                for entry in answer["shards"]:
                    if entry["status"] != "serving" or len(entry["replicas"]) != NODES:
                        return False
                    # The replicas moved in: every one votes in its group.
                    if sorted(entry["voters"]) != sorted(entry["replicas"]) or entry["learners"]:
                        return False
            return True

        yield self.until("every node serving a replica of every shard",
                         every_node_serves_every_shard, timeout=60.0)

        # status.sh: /health and /cluster of each node; one of them leads.
        states = []
        for node in nodes.values():
            code, answer = yield self.call(node.http_address, "GET", "/health")
            self.assertEqual((code, answer["status"]), (200, "ok"))
            code, answer = yield self.call(node.http_address, "GET", "/cluster")
            self.assertEqual(code, 200, answer)
            states.append(answer["state"])
        self.assertEqual(sorted(states), ["Follower"] * (NODES - 1) + ["Leader"])

        # The replicas are real: a job written through node3 outlives node1.
        code, answer = yield self.call(
            nodes["node3"].http_address, "POST", "/route",
            {"id": "hook", "type": "http", "webhook_url": "http://127.0.0.1:9/never"},
        )
        self.assertEqual(code, 200, answer)
        far = int(reactor.seconds() * 1000) + 3_600_000
        code, answer = yield self.call(
            nodes["node3"].http_address, "POST", "/job/c",
            {"id": "j1", "trigger_ms": far, "route": "hook"},
        )
        self.assertEqual(code, 200, answer)
        nodes["node1"].kill(signal.SIGKILL)
        yield self.until(
            "node2 reads the job without node1",
            lambda: self.call(nodes["node2"].http_address, "GET", "/job/c/j1").addCallback(
                lambda r: r[0] == 200 and r[1]["trigger_ms"] == far
            ),
        )
