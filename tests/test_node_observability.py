"""What a node tells about itself: ``GET /metrics`` and ``GET /cluster/shards``.

Real nodes in this process, scraped over HTTP and parsed by Prometheus' own parser.
The two-node tests run each node on its own loopback address (127.0.2.1, 127.0.2.2),
its REST and peer ports both there.
"""

import json
import os

from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support import NodeTestCase
from timemachine.cluster.groupstats import COMMIT_BUCKETS
from timemachine.cluster.ring import shard_of
from timemachine.domain.errors import StorageError
from timemachine.node import Node
from timemachine.raft.types import ConfChange, ConfChangeKind

RAFT_FAMILIES = {
    "timemachine_raft_term": "gauge",
    "timemachine_raft_leader": "gauge",
    "timemachine_raft_lease": "gauge",
    "timemachine_raft_leader_known": "gauge",
    "timemachine_raft_commit_index": "gauge",
    "timemachine_raft_applied_index": "gauge",
    "timemachine_raft_apply_lag": "gauge",
    "timemachine_raft_stopped": "gauge",
    "timemachine_raft_leader_changes": "counter",
    "timemachine_raft_proposals": "counter",
    "timemachine_raft_proposals_failed": "counter",
    "timemachine_raft_snapshots_sent": "counter",
    "timemachine_raft_snapshots_received": "counter",
    "timemachine_raft_commit_seconds": "histogram",
}
PEER_FAMILIES = {"timemachine_peer_connected": "gauge"} | {
    f"timemachine_peer_{name}": "counter"
    for name in (
        "frames_sent", "frames_received", "bytes_sent", "bytes_received",
        "raft_messages_sent", "raft_messages_received", "raft_messages_dropped",
        "requests_sent", "requests_received", "request_timeouts", "request_failures",
        "reconnects",
    )
}


class Scrape:
    """One ``/metrics`` answer, parsed: family types, and sample values by name and
    labels."""

    def __init__(self, text: str):
        self.types = {}
        self.samples = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name, frozenset(sample.labels.items())] = sample.value

    def value(self, name: str, **labels) -> float:
        return self.samples[name, frozenset(labels.items())]

    def labels_of(self, name: str) -> list[dict]:
        return [dict(labels) for sample, labels in self.samples if sample == name]


def group_labels(shard: int | None) -> dict:
    """The labels of shard ``shard``'s group (None: the meta group, 0)."""
    if shard is None:
        return {"group": "0"}
    return {"group": str(shard + 1), "shard": str(shard)}


@defer.inlineCallbacks
def get(http, url: str):
    response = yield http.get(url)
    content = yield response.content()
    return response, content


class OneNodeTests(NodeTestCase):
    shards = 3

    @defer.inlineCallbacks
    def scrape(self):
        response, content = yield get(self.http, self.base + "/metrics")
        self.assertEqual(response.code, 200)
        return Scrape(content.decode())

    @defer.inlineCallbacks
    def test_metrics_show_every_group_and_a_put_counts_as_a_proposal(self):
        yield self.route()
        before = yield self.scrape()
        for name, kind in RAFT_FAMILIES.items():
            self.assertEqual(before.types.get(name), kind, name)
        groups = [group_labels(None)] + [group_labels(s) for s in range(self.shards)]
        self.assertCountEqual(before.labels_of("timemachine_raft_term"), groups)
        for labels in groups:
            self.assertEqual(before.value("timemachine_raft_leader", **labels), 1)
            self.assertEqual(before.value("timemachine_raft_lease", **labels), 1)
            self.assertGreaterEqual(before.value("timemachine_raft_term", **labels), 1)
            self.assertEqual(before.value("timemachine_raft_leader_changes_total", **labels), 1)
        # A one-node cluster has no peers.
        self.assertEqual(before.labels_of("timemachine_peer_connected"), [])

        shard = shard_of("pay-1", self.shards)
        labels = group_labels(shard)
        body = {"trigger_ms": self.now_ms() + 3_600_000, "route": "hook", "meta": {"n": 1}}
        code, answer = yield self.call("PUT", "/job/orders/pay-1", body)
        self.assertEqual(code, 200, answer)
        after = yield self.scrape()
        for name in ("timemachine_raft_proposals_total", "timemachine_raft_commit_seconds_count"):
            self.assertEqual(
                after.value(name, **labels), before.value(name, **labels) + 1, name
            )
        self.assertEqual(after.value("timemachine_raft_proposals_failed_total", **labels), 0)
        self.assertGreater(after.value("timemachine_raft_commit_seconds_sum", **labels), 0)
        buckets = sorted(
            (float(sample["le"]), after.value("timemachine_raft_commit_seconds_bucket", **sample))
            for sample in after.labels_of("timemachine_raft_commit_seconds_bucket")
            if sample.get("group") == labels["group"]
        )
        self.assertEqual([le for le, _ in buckets], [*COMMIT_BUCKETS, float("inf")])
        counts = [count for _, count in buckets]
        self.assertEqual(counts, sorted(counts))
        self.assertEqual(counts[-1], after.value("timemachine_raft_commit_seconds_count", **labels))
        # The route went through the meta group.
        self.assertGreater(after.value("timemachine_raft_proposals_total", group="0"), 0)
        applied = after.value("timemachine_raft_applied_index", **labels)
        self.assertEqual(applied, answer["offset"])
        self.assertEqual(after.value("timemachine_raft_commit_index", **labels), applied)
        self.assertEqual(after.value("timemachine_raft_apply_lag", **labels), 0)

        code, view = yield self.call("GET", "/cluster/shards")
        self.assertEqual(code, 200, view)
        entry = view["shards"][shard]
        self.assertEqual(entry["applied_index"], applied)
        self.assertEqual(
            (entry["role"], entry["leader"], entry["lease"], entry["voters"], entry["learners"]),
            ("leader", "node1", True, ["node1"], []),
        )
        self.assertEqual(entry["term"], after.value("timemachine_raft_term", **labels))
        self.assertEqual(entry["commit_index"], applied)

    @defer.inlineCallbacks
    def test_a_shard_whose_replica_stopped_is_unavailable_with_the_reason(self):
        yield self.route()
        shard = shard_of("pay-2", self.shards)
        _, store = self.node.shard_logs[shard]
        store.apply = lambda batch: defer.fail(OSError("the disk is gone"))
        body = {"trigger_ms": self.now_ms() + 3_600_000, "route": "hook"}
        code, answer = yield self.call("PUT", "/job/orders/pay-2", body)
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"))
        self.flushLoggedErrors(OSError, StorageError)
        code, view = yield self.call("GET", "/cluster/shards")
        self.assertEqual(code, 200, view)
        entry = view["shards"][shard]
        self.assertEqual(entry["status"], "unavailable")
        self.assertIn("the disk is gone", entry["error"])
        # As for a store that refused to open: nothing this replica says can be trusted.
        for key in ("leader", "applied_index", "jobs", "term", "role", "voters"):
            self.assertIsNone(entry[key], key)
        scrape = yield self.scrape()
        labels = group_labels(shard)
        self.assertEqual(scrape.value("timemachine_raft_stopped", **labels), 1)
        self.assertEqual(scrape.value("timemachine_raft_proposals_failed_total", **labels), 1)
        others = [s for s in range(self.shards) if s != shard]
        for other in others:
            self.assertEqual(view["shards"][other]["status"], "serving")


    @defer.inlineCallbacks
    def test_a_shard_shows_its_groups_membership_apart_from_the_shard_map(self):
        # The first step of a replica move: a learner the map does not name yet (here
        # a node that does not exist, so nothing ever reaches it).
        shard = 1
        group, _ = self.node.shard_logs[shard]
        yield group.change_membership(ConfChange(ConfChangeKind.ADD_LEARNER, "node9"))
        code, view = yield self.call("GET", "/cluster/shards")
        self.assertEqual(code, 200, view)
        entry = view["shards"][shard]
        self.assertEqual(entry["replicas"], ["node1"])
        self.assertEqual((entry["voters"], entry["learners"]), (["node1"], ["node9"]))
        self.assertEqual((entry["status"], entry["role"]), ("serving", "leader"))
        # The leader sends to it from its next heartbeat on; each message is dropped.
        for _ in range(200):
            scrape = yield self.scrape()
            if {"peer": "node9"} in scrape.labels_of("timemachine_peer_connected"):
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(scrape.value("timemachine_peer_connected", peer="node9"), 0)
        self.assertGreater(
            scrape.value("timemachine_peer_raft_messages_dropped_total", peer="node9"), 0
        )

class TwoNodeTests(unittest.TestCase):
    """node1 bootstraps, node2 joins it; the shard map is then made over both."""

    timeout = 120

    def setUp(self):
        self.base = self.mktemp()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.nodes = {}

    @defer.inlineCallbacks
    def start(self, number: int, join: str | None = None):
        host = f"127.0.2.{number}"
        node = Node(
            reactor,
            f"node{number}",
            os.path.join(self.base, f"node{number}"),
            shards=2,
            http_endpoint=f"tcp:0:interface={host}",
            peer_endpoint=f"tcp:0:interface={host}",
            advertise=f"{host}:0",
            join=join,
            tick_seconds=0.05,
        )
        yield node.startService()
        self.addCleanup(lambda: node.running and node.stopService())
        self.nodes[node.node_id] = node
        return node

    def url(self, node_id: str, path: str) -> str:
        node = self.nodes[node_id]
        return f"http://{node.port.getHost().host}:{node.port.getHost().port}{path}"

    @defer.inlineCallbacks
    def call(self, node_id: str, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        response = yield self.http.request(method, self.url(node_id, path), data=data)
        content = yield response.content()
        return response.code, json.loads(content)

    @defer.inlineCallbacks
    def scrape(self, node_id: str):
        response, content = yield get(self.http, self.url(node_id, "/metrics"))
        self.assertEqual(response.code, 200)
        return Scrape(content.decode())

    @defer.inlineCallbacks
    def shards(self, node_id: str):
        code, answer = yield self.call(node_id, "GET", "/cluster/shards")
        self.assertEqual(code, 200, answer)
        return answer["shards"]

    @defer.inlineCallbacks
    def until(self, what: str, check, rounds: int = 600):
        """Poll ``check()`` (a Deferred of a bool) until it holds (bounded)."""
        for _ in range(rounds):
            if (yield check()):
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"never: {what}")

    @defer.inlineCallbacks
    def two_nodes(self):
        yield self.start(1)
        node1 = self.nodes["node1"]
        yield self.start(2, join=f"127.0.2.1:{node1.port.getHost().port}")

        @defer.inlineCallbacks
        def two_voters():
            _, answer = yield self.call("node1", "GET", "/cluster/servers")
            return sorted(s["Suffrage"] for s in answer["servers"]) == ["Voter", "Voter"]

        yield self.until("node2 votes", two_voters)

    @defer.inlineCallbacks
    def configure(self, shards: int, replicas: int):
        code, answer = yield self.call(
            "node1", "POST", "/cluster/configure", {"shards": shards, "replicas": replicas}
        )
        self.assertEqual(code, 200, answer)

        @defer.inlineCallbacks
        def every_node_knows_every_leader():
            for node_id in self.nodes:
                code, answer = yield self.call(node_id, "GET", "/cluster/shards")
                if code == 503:
                    return False  # it has not applied the new map yet: a retry
                self.assertEqual(code, 200, answer)
                view = answer["shards"]
                if len(view) != shards or any(
                    e["status"] == "unavailable" or (e["status"] == "serving") != (
                        node_id in e["replicas"]
                    )
                    for e in view
                ):
                    return False
            return True

        yield self.until("every replica serving", every_node_knows_every_leader)

    @defer.inlineCallbacks
    def test_a_shard_held_elsewhere_and_the_peers_counters(self):
        yield self.two_nodes()
        yield self.configure(4, 1)
        view = yield self.shards("node1")
        elsewhere = [e for e in view if e["replicas"] == ["node2"]]
        self.assertTrue(elsewhere, view)
        for entry in elsewhere:
            self.assertEqual(entry["status"], "elsewhere")
            for key in ("leader", "applied_index", "jobs", "term", "commit_index", "role",
                        "voters", "learners"):
                self.assertIsNone(entry[key], key)
            self.assertFalse(entry["lease"])
        for entry in view:
            if entry["replicas"] == ["node1"]:
                self.assertEqual((entry["status"], entry["role"]), ("serving", "leader"))
        # node1 only exports the groups it holds a member of.
        scrape = yield self.scrape("node1")
        held = {str(e["shard"]) for e in view if e["replicas"] == ["node1"]}
        self.assertEqual(
            {labels.get("shard") for labels in scrape.labels_of("timemachine_raft_term")},
            held | {None},
        )
        for name, kind in PEER_FAMILIES.items():
            self.assertEqual(scrape.types.get(name), kind, name)
        self.assertEqual(scrape.labels_of("timemachine_peer_connected"), [{"peer": "node2"}])
        self.assertEqual(scrape.value("timemachine_peer_connected", peer="node2"), 1)
        other = yield self.scrape("node2")
        for name in (
            "timemachine_peer_bytes_sent_total", "timemachine_peer_raft_messages_sent_total"
        ):
            self.assertGreater(scrape.value(name, peer="node2"), 0, name)
            self.assertGreater(other.value(name, peer="node1"), 0, name)
        # node1 asked node2 before admitting it (a ping).
        self.assertGreater(scrape.value("timemachine_peer_requests_sent_total", peer="node2"), 0)
        self.assertGreater(
            other.value("timemachine_peer_requests_received_total", peer="node1"), 0
        )

    @defer.inlineCallbacks
    def test_leaders_elsewhere_then_no_leader_once_the_other_node_stops(self):
        yield self.two_nodes()
        yield self.configure(6, 2)
        for node_id, other in (("node1", "node2"), ("node2", "node1")):
            for entry in (yield self.shards(node_id)):
                self.assertEqual(entry["status"], "serving")
                self.assertEqual((entry["voters"], entry["learners"]), (["node1", "node2"], []))
                self.assertGreaterEqual(entry["term"], 1)
                if entry["leader"] == node_id:
                    self.assertEqual(entry["role"], "leader")
                else:
                    # Led from the other node: this one follows it.
                    self.assertEqual(
                        (entry["leader"], entry["role"], entry["lease"]),
                        (other, "follower", False),
                    )
        yield self.nodes["node2"].stopService()

        @defer.inlineCallbacks
        def no_leader_known():
            view = yield self.shards("node1")
            return all(e["leader"] is None for e in view)

        yield self.until("node1 knows no shard leader", no_leader_known)
        for entry in (yield self.shards("node1")):
            self.assertEqual(entry["status"], "unavailable")
            self.assertNotIn("error", entry)
            self.assertIn(entry["role"], ("follower", "pre_candidate", "candidate"))
            self.assertFalse(entry["lease"])
            self.assertEqual(entry["voters"], ["node1", "node2"])
        scrape = yield self.scrape("node1")
        self.assertEqual(scrape.value("timemachine_peer_connected", peer="node2"), 0)
        for shard in range(6):
            labels = group_labels(shard)
            self.assertEqual(scrape.value("timemachine_raft_leader_known", **labels), 0)
            self.assertEqual(scrape.value("timemachine_raft_leader", **labels), 0)
            changes = scrape.value("timemachine_raft_leader_changes_total", **labels)
            self.assertGreaterEqual(changes, 1)
