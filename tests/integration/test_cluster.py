"""A cluster of real ``twistd timemachine`` processes, each on its own loopback address.

As upstream's scripts run it: every node starts on its own (bootstrapping alone), then
node1 is asked to admit the others (``join.sh``), or a node starts with ``--join``.
The meta group then holds every member: its state (routes, members) is the same on
every node, any call reaches its leader, and it survives the loss of its leader.
"""

import itertools
import os
import shutil
import signal

from twisted.internet import defer, reactor, task

from tests.support import HOLD, ClusterTestCase, HTTPReceiver, Partition, start_node_process
from timemachine.cluster.placement import target_placement
from timemachine.cluster.ring import shard_of
from timemachine.cluster.shards import DROPPED_FILE
from timemachine.node import JOINING_MARKER

HOSTS = [f"127.0.7.{n}" for n in range(2, 7)]


class ClusterTests(ClusterTestCase):
    hosts = HOSTS

    @defer.inlineCallbacks
    def test_nodes_started_alone_join_share_the_meta_state_and_survive_its_leader(self):
        node1 = yield self.start(1)
        node2 = yield self.start(2)
        # As join.sh: node1 admits node2, a node that bootstrapped alone and is empty.
        code, answer = yield self.call(
            "node1", "POST", "/cluster/join",
            {"node_id": "node2", "raft_address": node2.peer_address,
             "http_address": node2.http_address},
        )
        self.assertEqual(code, 200, answer)
        # node3 asks on its own, through a member that is not the leader.
        yield self.start(3, until="/health", extra=["--join", node2.http_address])

        @defer.inlineCallbacks
        def three_voters():
            answer = yield self.servers("node3")
            return answer is not None and sorted(
                (s["ID"], s["Suffrage"]) for s in answer["servers"]
            ) == [("node1", "Voter"), ("node2", "Voter"), ("node3", "Voter")]

        yield self.until("three voters, as node3 sees them", three_voters)
        # node2 gave up its own cluster; with the joined one's state here, a restart
        # needs no marker to keep it from bootstrapping (see node.JOINING_MARKER).
        marker = os.path.join(node2.data_dir, JOINING_MARKER)
        yield self.until("node2's joining marker gone", lambda: not os.path.exists(marker))
        answer = yield self.servers("node2")
        self.assertEqual(answer["leader"], node1.peer_address)
        addresses = {s["ID"]: (s["Address"], s["http_address"]) for s in answer["servers"]}
        self.assertEqual(addresses["node3"], (self.nodes["node3"].peer_address,
                                              self.nodes["node3"].http_address))

        # A route written on a follower is the meta leader's, and every node sees it.
        yield self.route_nowhere("node3")
        for node_id in ("node1", "node2", "node3"):
            yield self.until(
                f"the route on {node_id}",
                lambda n=node_id: self.call(n, "GET", "/route/hook").addCallback(
                    lambda r: r[0] == 200
                ),
            )
        # A job written on node2 goes to its shard's replica (all on node1 here), and
        # node3 reads it through that replica.
        far = int(reactor.seconds() * 1000) + 3_600_000
        code, answer = yield self.call(
            "node2", "POST", "/job/c", {"id": "j1", "trigger_ms": far, "route": "hook"}
        )
        self.assertEqual(code, 200, answer)
        code, answer = yield self.call("node3", "GET", "/job/c/j1")
        self.assertEqual((code, answer["trigger_ms"]), (200, far), answer)

        # The meta leader dies: the two others elect one and keep taking cluster writes.
        node1.kill(signal.SIGKILL)

        @defer.inlineCallbacks
        def new_leader():
            answer = yield self.servers("node2")
            return answer is not None and answer["leader"] not in ("", node1.peer_address)

        yield self.until("a new meta leader", new_leader)

        @defer.inlineCallbacks
        def route_written():
            code, _ = yield self.call(
                "node2", "POST", "/route",
                {"id": "after", "type": "http", "webhook_url": "http://127.0.0.1:9/x"},
            )
            return code == 200

        yield self.until("a route written without node1", route_written)
        code, _ = yield self.call("node3", "GET", "/route/after")
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_a_route_written_through_a_follower_is_usable_there_at_once(self):
        yield self.start(1)
        node2 = yield self.start(2)
        code, answer = yield self.call(
            "node1", "POST", "/cluster/join",
            {"node_id": "node2", "raft_address": node2.peer_address,
             "http_address": node2.http_address},
        )
        self.assertEqual(code, 200, answer)
        yield self.until(
            "node2 follows node1's meta group",
            lambda: self.servers("node2").addCallback(
                lambda a: a is not None and len(a["servers"]) == 2
            ),
        )
        # Serving once it opened its view of the shard map, as /ready tells.
        yield self.until(
            "node2 ready", lambda: self.call("node2", "GET", "/ready").addCallback(
                lambda r: r[0] == 200
            ),
        )
        far = int(reactor.seconds() * 1000) + 3_600_000
        # node2 passes each route on to the meta leader (node1), then takes a job
        # naming it, as a client does that writes a route and then its jobs.
        for n in range(20):
            code, answer = yield self.call(
                "node2", "POST", "/route",
                {"id": f"r{n}", "type": "http", "webhook_url": "http://127.0.0.1:9/never"},
            )
            self.assertEqual(code, 200, answer)
            code, answer = yield self.call(
                "node2", "POST", "/job/c", {"id": f"j{n}", "trigger_ms": far, "route": f"r{n}"}
            )
            self.assertEqual(code, 200, (n, answer))

    @defer.inlineCallbacks
    def test_a_node_holding_jobs_is_refused_with_the_reason(self):
        yield self.start(1)
        node2 = yield self.start(2)
        code, _ = yield self.call(
            "node2", "POST", "/route",
            {"id": "mine", "type": "http", "webhook_url": "http://127.0.0.1:9/"},
        )
        self.assertEqual(code, 200)
        code, answer = yield self.call(
            "node1", "POST", "/cluster/join",
            {"node_id": "node2", "raft_address": node2.peer_address},
        )
        self.assertEqual((code, answer["code"]), (400, "E_CONFIGURED"), answer)
        self.assertIn("routes", answer["error"])
        answer = yield self.servers("node1")
        self.assertEqual([s["ID"] for s in answer["servers"]], ["node1"])
        code, _ = yield self.call("node2", "GET", "/route/mine")
        self.assertEqual(code, 200)


class ReplicatedClusterTests(ClusterTestCase):
    """Three nodes, every shard on all three: jobs survive the loss of any one."""

    hosts = HOSTS

    @defer.inlineCallbacks
    def three_nodes_configured(self, shards=6):
        yield self.joined(3)
        # As configure.sh, sent to a node that passes it on to the meta leader.
        yield self.configure("node3", shards, 3)

    @defer.inlineCallbacks
    def configured_with_receiver(self, via):
        """Three configured nodes and a route ``hook`` (written through ``via``) to a
        receiver; fires with the receiver."""
        yield self.three_nodes_configured()
        receiver = yield self.route_to_receiver(via)
        return receiver

    @defer.inlineCallbacks
    def test_a_leadership_transfer_repeats_no_delivery_in_flight(self):
        receiver = yield self.configured_with_receiver("node1")
        receiver.script("/hook", [HOLD])
        due = int(reactor.seconds() * 1000) + 500
        yield self.create_batch("node1", [{"id": "t1", "trigger_ms": due, "route": "hook"}])
        yield receiver.wait_for(1)
        shard = shard_of("t1", 6)
        leader = (yield self.shard_leaders("node1"))[shard]
        to = next(n for n in sorted(self.nodes) if n != leader)
        # Handed over while the delivery is held: its outcome is recorded first, so
        # the new leader finds the job fired.
        transfer = self.call(leader, "POST", f"/cluster/shards/{shard}/leader", {"node_id": to})
        yield task.deferLater(reactor, 1.0, lambda: None)
        receiver.release(200)
        code, answer = yield transfer
        self.assertEqual((code, answer.get("leader")), (200, to), answer)
        yield self.until(
            "t1 fired, as its new leader reads it",
            lambda: self.call(to, "GET", "/job/c/t1").addCallback(
                lambda r: r[1].get("status") == "fired"
            ),
        )
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(len(receiver.requests), 1, [r.headers for r in receiver.requests])

    @defer.inlineCallbacks
    def test_reads_and_writes_during_leadership_transfers_wait_for_the_new_leader(self):
        yield self.three_nodes_configured(shards=3)
        yield self.route_nowhere("node1")
        far = int(reactor.seconds() * 1000) + 3_600_000
        yield self.create_batch(
            "node1", [{"id": f"j{n}", "trigger_ms": far, "route": "hook"} for n in range(30)]
        )
        refused = []
        running = [True]

        @defer.inlineCallbacks
        def client(node_id, number):
            n = 0
            while running[0]:
                n += 1
                job_id = f"j{n % 30}"
                for method, path, body in (
                    ("GET", f"/job/c/{job_id}", None),
                    ("POST", "/job/c", {"id": job_id, "trigger_ms": far, "route": "hook"}),
                ):
                    code, answer = yield self.call(node_id, method, path, body)
                    if code != 200:
                        refused.append((node_id, method, code, answer))

        clients = [client(node_id, k) for node_id in sorted(self.nodes) for k in range(2)]
        # Each shard's leadership goes round the three nodes twice.
        for _ in range(6):
            for entry in (yield self.shard_entries("node1")):
                if entry["leader"] is None:
                    continue
                to = next(n for n in entry["voters"] if n != entry["leader"])
                yield self.call(
                    entry["leader"], "POST", f"/cluster/shards/{entry['shard']}/leader",
                    {"node_id": to},
                )
            yield task.deferLater(reactor, 0.5, lambda: None)
        running[0] = False
        yield defer.gatherResults(clients)
        self.assertEqual(refused, [])

    @defer.inlineCallbacks
    def test_a_follower_lists_every_job_its_leader_acknowledged(self):
        yield self.three_nodes_configured(shards=1)
        yield self.route_nowhere("node1")
        leader = (yield self.shard_leaders("node1"))[0]
        follower = next(n for n in sorted(self.nodes) if n != leader)
        far = int(reactor.seconds() * 1000) + 3_600_000
        for n in range(20):
            # Acknowledged by the leader once applied there; the follower may not have
            # applied it yet, unless its read asks the leader first.
            stored = yield self.create_once(
                leader, "c", {"id": f"j{n:02}", "trigger_ms": far, "route": "hook"}
            )
            self.assertTrue(stored)
            code, answer = yield self.call(follower, "GET", "/job/c?limit=100")
            self.assertEqual(code, 200, answer)
            self.assertEqual(
                [job["id"] for job in answer["jobs"]], [f"j{k:02}" for k in range(n + 1)]
            )

    @defer.inlineCallbacks
    def test_a_follower_reads_every_route_its_meta_leader_acknowledged(self):
        yield self.three_nodes_configured(shards=1)
        answer = yield self.servers("node1")
        leader = next(s["ID"] for s in answer["servers"] if s["Address"] == answer["leader"])
        follower = next(n for n in sorted(self.nodes) if n != leader)
        for n in range(20):
            yield self.route_nowhere(leader, f"r{n:02}")
            code, answer = yield self.call(follower, "GET", f"/route/r{n:02}")
            self.assertEqual(code, 200, (n, answer))
            code, answer = yield self.call(follower, "GET", "/route")
            self.assertEqual(
                [r["id"] for r in answer["routes"]], [f"r{k:02}" for k in range(n + 1)]
            )

    @defer.inlineCallbacks
    def test_a_follower_cut_off_from_the_meta_leader_does_not_show_old_members(self):
        yield self.joined(3)
        answer = yield self.servers("node1")
        leader = next(s["ID"] for s in answer["servers"] if s["Address"] == answer["leader"])
        follower = next(n for n in sorted(self.nodes) if n != leader)
        # The follower hears nothing from the leader; what it sends still arrives.
        partition = Partition()
        self.addCleanup(partition.remove)
        partition.cut(self.nodes[leader].host, self.nodes[follower].host, one_way=True)
        yield self.join(4, via=leader)
        # Its meta state lacks node4: it must not answer with it as the cluster.
        code, answer = yield self.call(follower, "GET", "/cluster/servers")
        self.assertEqual((code, answer.get("code")), (503, "E_UNAVAILABLE"), answer)
        partition.heal()
        yield self.until(
            f"node4 among the servers {follower} shows",
            lambda: self.servers(follower).addCallback(
                lambda a: a is not None and "node4" in [s["ID"] for s in a["servers"]]
            ),
        )

    @defer.inlineCallbacks
    def test_jobs_fire_on_time_and_a_killed_node_loses_none(self):
        receiver = yield self.configured_with_receiver("node2")
        due = int(reactor.seconds() * 1000) + 5000
        ids = [f"job-{i}" for i in range(60)]
        for i, job_id in enumerate(ids):
            # A 503 (a shard leader handing over, moved by leader spreading) is retried.
            node_id = f"node{i % 3 + 1}"
            job = {"id": job_id, "trigger_ms": due, "route": "hook"}
            yield self.until(
                f"{job_id} stored through {node_id}",
                lambda n=node_id, j=job: self.create_once(n, "c", j),
            )
        # Before they fire, the node leading the most shards dies.
        victim = yield self.busiest_leader("node2")
        self.nodes[victim].kill(signal.SIGKILL)
        yield receiver.wait_for(60)
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assert_delivered(receiver, dict.fromkeys(ids, due))
        alive = next(n for n in ("node1", "node2", "node3") if n != victim)
        code, answer = yield self.call(alive, "GET", "/job/c/job-7")
        self.assertEqual((code, answer["status"]), (200, "fired"), answer)

    @defer.inlineCallbacks
    def test_a_partitioned_leader_stops_and_the_majority_takes_over(self):
        receiver = yield self.configured_with_receiver("node1")
        victim = yield self.busiest_leader("node1")
        majority = [n for n in self.nodes if n != victim]
        # Jobs the cut-off leader holds, due after its lease (~0.8 s) has run out but
        # around when it notices it lost its quorum: only the new leaders may fire them.
        early_due = int((reactor.seconds() + 1.5) * 1000)
        held = [f"b{i}" for i in range(30)]
        yield self.create_batch(
            victim, [{"id": job_id, "trigger_ms": early_due, "route": "hook"} for job_id in held]
        )
        partition = Partition()
        self.addCleanup(partition.remove)
        partition.cut(self.nodes[victim].host, [self.nodes[n].host for n in majority])
        cut_at = reactor.seconds()

        # The majority elects new leaders and takes writes (503s while it does).
        due = int((cut_at + 4) * 1000)
        ids = [f"p{i}" for i in range(30)]
        for i, job_id in enumerate(ids):
            job = {"id": job_id, "trigger_ms": due, "route": "hook"}
            node_id = majority[i % 2]
            yield self.until(
                f"{job_id} stored through {node_id}",
                lambda n=node_id, j=job: self.create_once(n, "c", j),
            )
        # The cut-off node accepts no write: it cannot reach a majority.
        code, answer = yield self.call(
            victim, "POST", "/job/c", {"id": "lost", "trigger_ms": due, "route": "hook"}
        )
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"), answer)
        yield receiver.wait_for(len(ids) + len(held))
        # Ten seconds of partition in all, then heal.
        yield task.deferLater(reactor, max(0.0, cut_at + 10 - reactor.seconds()), lambda: None)
        partition.heal()

        # The minority catches up and serves as a follower: it reads the jobs the
        # majority wrote, and a write through it reaches the new leaders.
        yield self.until(
            f"{victim} reads a job written while it was cut off",
            lambda: self.call(victim, "GET", "/job/c/p7").addCallback(
                lambda r: r[0] == 200 and r[1]["status"] == "fired"
            ),
        )
        yield self.until(
            f"a write through {victim}",
            lambda: self.call(
                victim, "POST", "/job/c",
                {"id": "after", "trigger_ms": due + 600_000, "route": "hook"},
            ).addCallback(lambda r: r[0] == 200),
        )
        # The write it was sent during the cut was never stored (503 while its
        # shard's leader is still being learnt, then 404).
        yield self.until(
            f"{victim} answers that the job written to it during the cut is absent",
            lambda: self.call(victim, "GET", "/job/c/lost").addCallback(
                lambda r: r[0] == 404
            ),
        )
        # The cut-off leader fired nothing once its lease ran out.
        self.assert_delivered(receiver, {**dict.fromkeys(held, early_due),
                                         **dict.fromkeys(ids, due)})

    @defer.inlineCallbacks
    def test_a_rolling_restart_under_load_loses_nothing_and_answers_only_retries(self):
        receiver = yield self.configured_with_receiver("node1")
        due_of, refused = {}, []
        done = []

        @defer.inlineCallbacks
        def store(n):
            """Job ``r<n>``, due in 3 s, through one node after another until one
            stores it; any answer but 200, 404 (GET) or a retryable 503 is refused."""
            job = {"id": f"r{n}", "trigger_ms": int((reactor.seconds() + 3) * 1000),
                   "route": "hook"}
            for attempt in range(600):
                node_id = f"node{(n + attempt) % 3 + 1}"
                try:
                    code, answer = yield self.call(node_id, "GET", f"/job/c/{job['id']}")
                    if code == 404:
                        code, answer = yield self.call(node_id, "POST", "/job/c", job)
                except Exception:
                    code = None  # the node is stopping or starting: the next one is asked
                if code == 200:
                    due_of[job["id"]] = job["trigger_ms"]
                    return
                if code not in (None, 503):
                    refused.append((node_id, code, answer))
                yield task.deferLater(reactor, 0.05, lambda: None)
            refused.append((job["id"], "never stored"))

        @defer.inlineCallbacks
        def load():
            n = 0
            while not done:
                yield store(n)
                n += 1

        @defer.inlineCallbacks
        def leaders_spread():
            leaders = yield self.shard_leaders("node1")
            return sorted(leaders.count(n) for n in self.nodes) == [2, 2, 2]

        # Each node leads shards when it is stopped (so each has some to hand over).
        yield self.until("shard leaders spread evenly", leaders_spread)
        loading = load()
        for node_id in ("node1", "node2", "node3"):
            node = self.nodes[node_id]
            node.kill(signal.SIGTERM)
            self.assertIn(node.process.returncode, (0, -signal.SIGTERM), node.log_tail())
            # It led some groups (the meta group, shards): it handed them over first.
            self.assertIn("handed over the leadership of", node.log_tail())
            stored = len(due_of)
            yield self.until(f"writes without {node_id}",
                             lambda n=stored: defer.succeed(len(due_of) >= n + 5))
            yield start_node_process(self, reactor, self.http, node.data_dir, node=node)
            yield self.until(f"{node_id} caught up", self.groups_as_placed)
        done.append(True)
        yield loading
        self.assertEqual(refused, [])

        # node3, restarted last, led nothing when it came back (it had handed its
        # groups over): the meta leader moves leaderships until each node leads 2.
        yield self.until("shard leaders spread evenly again", leaders_spread)
        yield receiver.wait_for(len(due_of))
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assert_delivered(receiver, due_of)

    @defer.inlineCallbacks
    def test_a_paused_leader_fires_nothing_when_it_wakes(self):
        receiver = yield self.configured_with_receiver("node1")
        victim = yield self.busiest_leader("node1")
        majority = [n for n in self.nodes if n != victim]
        due = int((reactor.seconds() + 1.5) * 1000)
        held = [f"b{i}" for i in range(30)]
        yield self.create_batch(
            victim, [{"id": job_id, "trigger_ms": due, "route": "hook"} for job_id in held]
        )
        process = self.pause(victim)
        paused_at = reactor.seconds()
        # The others take over its shards and fire what it held.
        yield receiver.wait_for(len(held))
        later = int((reactor.seconds() + 1) * 1000)
        yield self.until(
            "a write through the majority",
            lambda: self.call(
                majority[0], "POST", "/job/c", {"id": "w", "trigger_ms": later, "route": "hook"}
            ).addCallback(lambda r: r[0] == 200),
        )
        yield receiver.wait_for(len(held) + 1)
        yield task.deferLater(
            reactor, max(0.0, paused_at + 10 - reactor.seconds()), lambda: None
        )
        # It wakes with every held job overdue and its clock ten seconds behind.
        process.send_signal(signal.SIGCONT)
        yield task.deferLater(reactor, 3.0, lambda: None)
        self.assert_delivered(receiver, {**dict.fromkeys(held, due), "w": later})
        yield self.until(
            f"{victim} serves again as a follower",
            lambda: self.call(victim, "GET", "/job/c/w").addCallback(
                lambda r: r[0] == 200 and r[1]["status"] == "fired"
            ),
        )


class MovingReplicaTests(ClusterTestCase):
    """Replicas of shards holding jobs move between nodes by Raft membership change
    (learner, snapshot, promotion, removal) while the shards go on serving."""

    hosts = HOSTS

    @defer.inlineCallbacks
    def jobs_everywhere(self, ids, nodes):
        """Every job of ``ids`` reads back through each of ``nodes``. A 503 is a retry:
        the leader spreader may be moving a shard's leadership (right after a member
        left, it does), and a read during the hand-over finds no leader."""
        for node_id in nodes:
            for job_id in ids:
                for _ in range(50):
                    code, answer = yield self.call(node_id, "GET", f"/job/c/{job_id}")
                    if code != 503:
                        break
                    yield task.deferLater(reactor, 0.1, lambda: None)
                self.assertEqual(code, 200, (node_id, job_id, answer))

    @defer.inlineCallbacks
    def test_raising_the_replication_factor_copies_every_shard_while_writes_go_on(self):
        receiver = HTTPReceiver(reactor)
        receiver.start()
        self.addCleanup(receiver.stop)
        yield self.joined(3)
        yield self.configure("node2", 6, 1)
        code, answer = yield self.call(
            "node1", "POST", "/route",
            {"id": "hook", "type": "http", "webhook_url": receiver.url("/hook")},
        )
        self.assertEqual(code, 200, answer)
        due = int((reactor.seconds() + 20) * 1000)
        before = [f"before-{i}" for i in range(60)]
        yield self.create_batch(
            "node1", [{"id": job_id, "trigger_ms": due, "route": "hook"} for job_id in before]
        )

        # Three replicas per shard now: each group takes two learners, which copy the
        # shard's store, are promoted, and the writes sent meanwhile all land.
        code, answer = yield self.call(
            "node3", "POST", "/cluster/configure", {"shards": 6, "replicas": 3}
        )
        self.assertEqual((code, answer.get("replicas")), (200, 3), answer)
        during = [f"during-{i}" for i in range(30)]
        for i, job_id in enumerate(during):
            job = {"id": job_id, "trigger_ms": due, "route": "hook"}
            node_id = f"node{i % 3 + 1}"
            yield self.until(
                f"{job_id} stored through {node_id}",
                lambda n=node_id, j=job: self.create_once(n, "c", j),
            )
        yield self.until("three voters in every group", self.groups_as_placed, timeout=60.0)
        yield self.jobs_everywhere(before + during, ["node1", "node2", "node3"])
        # No node can leave now: its shards would keep two of their three replicas.
        code, answer = yield self.call("node1", "POST", "/cluster/remove", {"node_id": "node2"})
        self.assertEqual((code, answer["code"]), (400, "E_INVALID"), answer)
        self.assertIn("lower replicas to 2", answer["error"])
        answer = yield self.servers("node3")
        self.assertEqual(len(answer["servers"]), 3)

        # Every shard has three copies: one node may die before the jobs fire.
        victim = yield self.busiest_leader("node1")
        self.nodes[victim].kill(signal.SIGKILL)
        yield receiver.wait_for(len(before) + len(during))
        yield task.deferLater(reactor, 1.0, lambda: None)
        self.assert_delivered(receiver, dict.fromkeys(before + during, due))

    @defer.inlineCallbacks
    def test_a_joining_node_takes_its_share_and_a_removed_one_hands_its_replicas_on(self):
        yield self.joined(3)
        yield self.configure("node1", 6, 2)
        yield self.route_nowhere("node1")
        ids = [f"job-{i}" for i in range(40)]
        yield self.create_far("node2", ids)

        # node4 joins: 12 replicas over 4 nodes, 3 each; some move to it.
        yield self.join(4)
        yield self.until("replicas moved to node4", self.groups_as_placed, timeout=60.0)
        entries = yield self.shard_entries("node4")
        held = [e["shard"] for e in entries if e["status"] != "elsewhere"]
        self.assertEqual(len(held), 3, entries)
        for node_id in ("node1", "node2", "node3"):
            entries = yield self.shard_entries(node_id)
            mine = [e["shard"] for e in entries if e["status"] != "elsewhere"]
            self.assertEqual(len(mine), 3, (node_id, entries))
            # A replica given away is deleted from its old node.
            on_disk = sorted(os.listdir(os.path.join(self.nodes[node_id].data_dir, "shards")))
            self.assertEqual(on_disk, sorted(str(s) for s in mine), node_id)
        yield self.jobs_everywhere(ids, ["node4"])

        # node3 leaves: its replicas move to the others first.
        code, answer = yield self.call(
            "node1", "POST", "/cluster/remove", {"node_id": "node3"}
        )
        self.assertEqual(code, 200, answer)
        answer = yield self.servers("node1")
        self.assertEqual(sorted(s["ID"] for s in answer["servers"]), ["node1", "node2", "node4"])
        self.nodes.pop("node3").kill(signal.SIGKILL)
        yield self.until("node3's replicas moved", self.groups_as_placed, timeout=60.0)
        yield self.jobs_everywhere(ids, ["node1", "node2", "node4"])

    @defer.inlineCallbacks
    def test_a_replica_placed_back_on_a_node_that_dropped_it_joins_the_running_group(self):
        # node1 bootstrapped its 4 shards alone, the first member of each group; node2
        # and node3 join and take some, and node1 deletes its copies.
        yield self.joined(3)
        yield self.until("shards moved to node2, node3", self.groups_as_placed, timeout=60.0)
        entries = yield self.shard_entries("node1")
        current = tuple(tuple(e["replicas"]) for e in entries)
        yield self.route_nowhere("node1")
        ids = [f"j{n}" for n in range(40)]
        yield self.create_far("node2", ids)
        # Two replicas of every shard place one of them back on node1, as the meta
        # leader computes it. Its one holder is paused: node1's replica must wait for
        # it, blank. Started anew from the group's first member, node1 alone, it would
        # be a second group of the shard, leading itself at once, with none of its jobs.
        placement = target_placement(4, 2, ["node1", "node2", "node3"], current)
        shard, (holder,) = next(
            (s, was) for s, was in enumerate(current)
            if "node1" not in was and "node1" in placement[s]
        )
        process = self.pause(holder)
        code, answer = yield self.call(
            "node1", "POST", "/cluster/configure", {"shards": 4, "replicas": 2}
        )
        self.assertEqual(code, 200, answer)

        @defer.inlineCallbacks
        def opened():
            return (yield self.shard_entries("node1"))[shard]["status"] != "elsewhere"

        yield self.until(f"node1 opened a replica of shard {shard}", opened)
        yield task.deferLater(reactor, 4.0, lambda: None)  # past any election timeout
        entry = (yield self.shard_entries("node1"))[shard]
        self.assertNotEqual(entry["leader"], "node1", entry)
        process.send_signal(signal.SIGCONT)
        yield self.until("every replica as placed", self.groups_as_placed, timeout=60.0)
        entries = yield self.shard_entries("node1")
        self.assertEqual(
            entries[shard]["jobs"], sum(shard_of(i, 4) == shard for i in ids), entries[shard]
        )
        yield self.jobs_everywhere(ids, ["node1", "node2", "node3"])

    @defer.inlineCallbacks
    def test_a_damaged_record_of_dropped_replicas_keeps_the_replica_closed_and_says_so(self):
        yield self.joined(2)
        yield self.until("half the shards moved to node2", self.groups_as_placed, timeout=60.0)
        entries = yield self.shard_entries("node1")
        given = [e["shard"] for e in entries if "node1" not in e["replicas"]]
        self.assertEqual(len(given), 2, entries)
        record = os.path.join(self.nodes["node1"].data_dir, DROPPED_FILE)
        with open(record, "wb") as f:
            f.write(b'{"map_index": ')
        # Placed back on node1, those shards may not start their groups from node1
        # alone, and whether they may cannot be read: they stay closed, named.
        code, answer = yield self.call(
            "node1", "POST", "/cluster/configure", {"shards": 4, "replicas": 2}
        )
        self.assertEqual(code, 200, answer)

        @defer.inlineCallbacks
        def closed():
            entries = yield self.shard_entries("node1")
            return all(entries[s]["status"] == "unavailable" for s in given)

        yield self.until("node1's replicas of the shards it dropped closed", closed)
        entries = yield self.shard_entries("node1")
        for shard in range(4):
            if shard in given:
                self.assertIn(record, entries[shard]["error"], entries[shard])
            else:
                self.assertEqual(entries[shard]["status"], "serving", entries[shard])
        with open(record, "rb") as f:
            self.assertEqual(f.read(), b'{"map_index": ')  # left as it was found

    @defer.inlineCallbacks
    def placed(self, via):
        """The nodes ``via``'s shard map places replicas on."""
        entries = yield self.shard_entries(via)
        return {node for entry in entries for node in entry["replicas"]}

    def until_placed_nowhere(self, node_id):
        """Wait until node1's shard map places no replica on ``node_id``."""
        @defer.inlineCallbacks
        def nowhere():
            return node_id not in (yield self.placed("node1"))

        return self.until(f"{node_id} placed with no replica", nowhere)

    @defer.inlineCallbacks
    def leaving(self, via):
        answer = yield self.servers(via)
        return sorted(s["ID"] for s in answer["servers"] if s["leaving"])

    @defer.inlineCallbacks
    def test_a_member_back_on_an_empty_data_dir_is_refused_until_removed_and_joined_again(self):
        yield self.joined(4)
        yield self.configure("node1", 3, 3)
        yield self.route_nowhere("node1")
        ids = [f"j{n}" for n in range(30)]
        yield self.create_far("node2", ids)
        node3 = self.nodes["node3"]
        node3.kill(signal.SIGKILL)
        shutil.rmtree(node3.data_dir)  # its votes and its Raft log are gone
        others = ("node1", "node2", "node4")
        logged = {node_id: len(self.log_of(node_id)) for node_id in others}
        # Started alone, as spawn.sh does: it bootstraps a cluster of its own.
        yield start_node_process(self, reactor, self.http, node3.data_dir, node=node3)

        def refused_everywhere():
            return defer.succeed(all(
                "refusing peer node3" in self.log_of(node_id)[logged[node_id]:]
                for node_id in others
            ) and all(  # and node3 was told why
                f"peer {node_id} refuses this node: its data dir is not the one"
                in self.log_of("node3")
                for node_id in others
            ))

        yield self.until("every member refuses node3, saying why", refused_everywhere)
        answer = yield self.servers("node3")
        self.assertEqual([s["ID"] for s in answer["servers"]], ["node3"])  # it learnt nothing
        join = {"node_id": "node3", "raft_address": node3.peer_address,
                "http_address": node3.http_address}
        code, answer = yield self.call("node1", "POST", "/cluster/join", join)
        self.assertEqual((code, answer["code"]), (400, "E_CONFIGURED"), answer)
        self.assertIn("POST /cluster/remove", answer["error"])

        # Removed (its replicas move to node4), then joined again: a new member.
        code, answer = yield self.call("node1", "POST", "/cluster/remove", {"node_id": "node3"})
        self.assertEqual(code, 200, answer)
        code, answer = yield self.call("node1", "POST", "/cluster/join", join)
        self.assertEqual(code, 200, answer)
        yield self.until("every replica as placed", self.groups_as_placed, timeout=90.0)
        entries = yield self.shard_entries("node3")
        held = [e for e in entries if e["status"] != "elsewhere"]
        self.assertTrue(held, entries)
        for entry in held:
            expected = sum(1 for job_id in ids if shard_of(job_id, 3) == entry["shard"])
            self.assertEqual(entry["jobs"], expected, entry)

    @defer.inlineCallbacks
    def test_a_node_being_removed_gets_no_replica_back_until_it_joins_again(self):
        yield self.joined(4)
        yield self.configure("node1", 4, 3)
        # Each shard of node4 lacks one other node, which its replica moves to. One of
        # them, paused, never catches up: the removal waits for it, and meanwhile
        # another member joins.
        entries = yield self.shard_entries("node1")
        paused = next(
            node for entry in entries if "node4" in entry["replicas"]
            for node in ("node2", "node3") if node not in entry["replicas"]
        )
        process = self.pause(paused)
        removal = self.call("node1", "POST", "/cluster/remove", {"node_id": "node4"})

        yield self.until_placed_nowhere("node4")
        self.assertEqual((yield self.leaving("node1")), ["node4"])
        # Counted without node4, three replicas need every other member.
        code, answer = yield self.call("node1", "POST", "/cluster/remove", {"node_id": "node3"})
        self.assertEqual((code, answer["code"]), (400, "E_INVALID"), answer)
        self.assertIn("lower replicas to 2", answer["error"])
        yield self.join(5)
        placed = yield self.placed("node1")
        self.assertEqual(placed, {"node1", "node2", "node3", "node5"})

        # node4 asked to join again: its removal is called off, its share comes back.
        node4 = self.nodes["node4"]
        code, answer = yield self.call(
            "node1", "POST", "/cluster/join",
            {"node_id": "node4", "raft_address": node4.peer_address,
             "http_address": node4.http_address},
        )
        self.assertEqual(code, 200, answer)
        code, answer = yield removal
        self.assertEqual((code, answer["code"]), (400, "E_CONFIGURED"), answer)
        self.assertIn("called off", answer["error"])
        process.send_signal(signal.SIGCONT)
        self.assertEqual((yield self.leaving("node1")), [])
        self.assertIn("node4", (yield self.placed("node1")))
        yield self.until("every replica as placed", self.groups_as_placed, timeout=60.0)

    @defer.inlineCallbacks
    def test_a_removal_whose_meta_leader_died_is_finished_by_the_next(self):
        yield self.joined(5)
        yield self.configure("node1", 4, 3)
        yield self.route_nowhere("node1")
        ids = [f"j{n}" for n in range(20)]
        yield self.create_far("node2", ids)
        # A node a replica of node5 moves to is paused: the removal waits for it, and
        # its meta leader dies meanwhile.
        entries = yield self.shard_entries("node1")
        paused = next(
            node for entry in entries if "node5" in entry["replicas"]
            for node in ("node2", "node3", "node4") if node not in entry["replicas"]
        )
        process = self.pause(paused)
        removal = self.call("node1", "POST", "/cluster/remove", {"node_id": "node5"})
        removal.addErrback(lambda _: None)  # its node is killed before it answers

        yield self.until_placed_nowhere("node5")
        self.nodes["node1"].kill(signal.SIGKILL)
        process.send_signal(signal.SIGCONT)
        survivor = next(n for n in ("node2", "node3", "node4") if n != paused)

        @defer.inlineCallbacks
        def removed():
            answer = yield self.servers(survivor)
            return answer is not None and "node5" not in [s["ID"] for s in answer["servers"]]

        yield self.until("node5 removed by the next meta leader", removed, timeout=90.0)
        yield self.jobs_everywhere(ids, [survivor])

    @defer.inlineCallbacks
    def test_the_meta_leader_asked_to_remove_itself_hands_over_and_is_removed(self):
        yield self.joined(3)
        yield self.configure("node1", 4, 2)
        code, answer = yield self.call("node1", "GET", "/cluster")
        leader = answer["leader_id"]
        code, answer = yield self.call(leader, "POST", "/cluster/remove", {"node_id": leader})
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"), answer)
        self.assertIn("the new leader finishes removing it", answer["error"])
        others = sorted(n for n in self.nodes if n != leader)

        @defer.inlineCallbacks
        def removed():
            answer = yield self.servers(others[0])
            return answer is not None and [s["ID"] for s in answer["servers"]] == others

        yield self.until(f"{leader} removed by the next meta leader", removed, timeout=90.0)
        placed = yield self.placed(others[0])
        self.assertEqual(placed, set(others))

    @defer.inlineCallbacks
    def test_a_read_through_a_node_without_the_shard_is_answered_by_a_live_replica(self):
        yield self.joined(4)
        yield self.configure("node1", 6, 3)
        yield self.route_nowhere("node1")
        placement = [entry["replicas"] for entry in (yield self.shard_entries("node1"))]
        # A shard some node holds no replica of; its first replica, asked first, dies.
        shard, outside = next(
            (s, node) for s, nodes in enumerate(placement)
            for node in sorted(self.nodes) if node not in nodes
        )
        job_id = next(f"j{n}" for n in itertools.count() if shard_of(f"j{n}", 6) == shard)
        far = int(reactor.seconds() * 1000) + 3_600_000
        yield self.create_batch(outside, [{"id": job_id, "trigger_ms": far, "route": "hook"}])
        self.nodes[placement[shard][0]].kill(signal.SIGKILL)
        yield self.until(
            f"{outside} reads {job_id} from a live replica of shard {shard}",
            lambda: self.call(outside, "GET", f"/job/c/{job_id}").addCallback(
                lambda r: r[0] == 200
            ),
        )

    @defer.inlineCallbacks
    def listed(self, node_id, limit):
        """Every job id of collection ``c`` as ``node_id`` lists them, page by page;
        None when a page is not answered 200."""
        ids, cursor = [], None
        while True:
            query = f"?limit={limit}" + ("" if cursor is None else f"&cursor={cursor}")
            code, answer = yield self.call(node_id, "GET", f"/job/c{query}")
            if code != 200:
                return None
            ids.extend(job["id"] for job in answer["jobs"])
            cursor = answer["next_cursor"]
            if cursor is None:
                return ids

    @defer.inlineCallbacks
    def test_a_node_without_every_shard_lists_every_job_and_survives_a_replica_lost(self):
        yield self.joined(4)
        yield self.configure("node1", 6, 3)
        yield self.route_nowhere("node1")
        placement = [entry["replicas"] for entry in (yield self.shard_entries("node1"))]
        ids = sorted(f"j{n:02}" for n in range(40))
        yield self.create_far("node1", ids)
        for node_id in sorted(self.nodes):
            lacking = [s for s, nodes in enumerate(placement) if node_id not in nodes]
            self.assertTrue(lacking, (node_id, placement))
            self.assertEqual((yield self.listed(node_id, 7)), ids, node_id)
        # The replica a node asks first for a shard it lacks dies: the next one lists it.
        shard, outside = next(
            (s, node) for s, nodes in enumerate(placement)
            for node in sorted(self.nodes) if node not in nodes
        )
        self.nodes[placement[shard][0]].kill(signal.SIGKILL)
        yield self.until(
            f"{outside} lists every job with {placement[shard][0]} down",
            lambda: self.listed(outside, 7).addCallback(lambda listed: listed == ids),
        )

    @defer.inlineCallbacks
    def test_a_new_replica_still_without_its_snapshot_counts_no_jobs_for_its_shard(self):
        yield self.joined(3)
        yield self.configure("node1", 3, 1)
        yield self.route_nowhere("node1")
        placement = [entry["replicas"] for entry in (yield self.shard_entries("node1"))]
        shard = next(s for s, nodes in enumerate(placement) if nodes == ["node3"])
        job_id = next(f"j{n}" for n in itertools.count() if shard_of(f"j{n}", 3) == shard)
        far = int(reactor.seconds() * 1000) + 3_600_000
        yield self.create_batch("node1", [{"id": job_id, "trigger_ms": far, "route": "hook"}])
        # node3, the only holder of the job, dies; its shard is placed on a second node
        # too, which opens a blank replica that no leader will ever fill.
        self.nodes["node3"].kill(signal.SIGKILL)
        code, answer = yield self.call(
            "node1", "POST", "/cluster/configure", {"shards": 3, "replicas": 2}
        )
        self.assertEqual(code, 200, answer)
        # A new shard count would delete every shard's files: the blank replica's
        # empty store must not pass for the shard's jobs.
        code, answer = yield self.call(
            "node1", "POST", "/cluster/configure", {"shards": 6, "replicas": 2}
        )
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"), answer)
        code, answer = yield self.call("node1", "GET", "/cluster")
        self.assertEqual(answer["shards"], 3, answer)

    @defer.inlineCallbacks
    def test_a_node_away_while_the_map_was_remade_drops_its_old_replicas(self):
        # Logs compact soon: node3 comes back to the meta state as a snapshot, which
        # shows it only the last of the maps made while it was away.
        yield self.joined(3, extra=["--compact-every", "5", "--keep-entries", "2"])
        yield self.configure("node1", 2, 3)
        yield self.route_nowhere("node1")
        # The old map's groups get a log well ahead of a new group's, then the cluster
        # is empty again.
        far = int(reactor.seconds() * 1000) + 3_600_000
        for n in range(20):
            yield self.create_batch("node1", [{"id": f"j{n}", "trigger_ms": far, "route": "hook"}])
            code, answer = yield self.call("node1", "DELETE", f"/job/c/j{n}")
            self.assertEqual(code, 200, answer)
        node3 = self.nodes["node3"]
        node3.kill(signal.SIGKILL)
        # Remade twice meanwhile, back to as many shards as node3 holds.
        for shards in (4, 2):
            code, answer = yield self.call(
                "node1", "POST", "/cluster/configure", {"shards": shards, "replicas": 3}
            )
            self.assertEqual(code, 200, answer)
        yield start_node_process(self, reactor, self.http, node3.data_dir, node=node3)

        # node3's replicas of shards 0 and 1 are the new groups', not the old ones.
        @defer.inlineCallbacks
        def as_the_leaders():
            views = {}
            for node_id in ("node1", "node3"):
                _, answer = yield self.call(node_id, "GET", "/cluster/shards")
                views[node_id] = [(e["applied_index"], e["term"]) for e in answer["shards"]]
            return views["node1"] == views["node3"]

        yield self.until("node3 in the new groups", as_the_leaders)
