"""Issue 7's acceptance: a replicated cluster of real ``twistd`` nodes through faults.

Each node listens and dials from a loopback address of its own (127.0.3.x; the chaos
test 127.0.4.x), so nft rules cut it off for real. Nodes crash with kill -9, pause
with SIGSTOP, and come back on their data directories.

The promises checked: a write answered 200 is never lost; a job fires once, never
early, and repeats only around a fault, with the same ``Idempotency-Key``; a node back
from a crash catches up (from the log, or from a snapshot once the log moved on) and
serves, leads and fires as the others do; a shard with no majority answers 503 while
the others serve.
"""

import itertools
import json
import os
import random
import re
import signal
import subprocess

from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectError, ConnectionRefusedError
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from tests.support import (
    ClusterTestCase,
    Partition,
    fill_disk,
    flip_byte,
    small_disk_at,
    start_node_process,
    timemachine_command,
)
from timemachine.cluster.raftgroup import SET_ASIDE_DIR, SET_ASIDE_SUFFIX
from timemachine.cluster.ring import shard_of
from timemachine.node import REPAIRED_MARKER

HOSTS = [f"127.0.3.{n}" for n in range(1, 10)]
#: What a node logs when a shard's leader sent it a snapshot (the meta group's, sent to
#: a joining node, does not count).
SHARD_SNAPSHOT = re.compile(r"shard \d+: installed the leader's snapshot")


def ids_by_shard(prefix: str, shards: int, per_shard: int) -> dict[int, list[str]]:
    """``per_shard`` job ids for each shard, by the placement rule every node uses."""
    ids: dict[int, list[str]] = {shard: [] for shard in range(shards)}
    number = 0
    while any(len(held) < per_shard for held in ids.values()):
        job_id = f"{prefix}{number}"
        number += 1
        held = ids[shard_of(job_id, shards)]
        if len(held) < per_shard:
            held.append(job_id)
    return ids


def delivered_ids(receiver) -> set[str]:
    """The ids of the jobs ``receiver`` got."""
    return {r.headers["x-timemachine-job-id"] for r in receiver.requests}


def now_ms() -> int:
    return int(reactor.seconds() * 1000)


def sleep(seconds: float):
    return task.deferLater(reactor, max(0.0, seconds), lambda: None)


class _FaultsTestCase(ClusterTestCase):
    hosts = HOSTS

    @defer.inlineCallbacks
    def shards_seen_by(self, node_id):
        """``/cluster/shards`` of ``node_id``: shard -> its entry."""
        code, answer = yield self.call(node_id, "GET", "/cluster/shards")
        self.assertEqual(code, 200, answer)
        return {entry["shard"]: entry for entry in answer["shards"]}

    @defer.inlineCallbacks
    def create_all(self, count, job_of, via, parallel=16, patience=30.0):
        """POST ``count`` jobs, ``parallel`` at a time: job ``n``'s body is
        ``job_of(n)``, made as it is sent, and it goes through ``via[n % len(via)]``.
        Every one must be stored within ``patience`` seconds.

        A node may answer 503 while a shard changes leader (on a busy machine one can
        miss heartbeats): such a create is retried as `create_once` does, looking
        for the job before creating it again. Any other answer fails the test."""
        semaphore = defer.DeferredSemaphore(parallel)

        @defer.inlineCallbacks
        def create(number):
            node_id = via[number % len(via)]
            job = job_of(number)
            code, answer = yield self.call(node_id, "POST", "/job/c", job)
            deadline = reactor.seconds() + patience
            while code == 503 and reactor.seconds() < deadline:
                yield sleep(0.2)
                try:
                    if (yield self.create_once(node_id, "c", job)):
                        return None
                except (ConnectError, ResponseFailed, ResponseNeverReceived):
                    continue
            return None if code == 200 else (node_id, job["id"], code, answer)

        # Every create ends before any is judged: none outlives the test.
        failed = yield defer.gatherResults(
            [semaphore.run(create, number) for number in range(count)]
        )
        self.assertEqual([f for f in failed if f is not None], [])

    @defer.inlineCallbacks
    def leaders_spread(self, via, nodes, timeout=60.0):
        """Wait until ``nodes`` (every member, all up) lead every shard, as evenly as
        can be, as ``via`` sees it: the meta leader moves leaderships until they are,
        and then moves none (a transfer repeats the deliveries in flight)."""
        shards = len((yield self.shard_leaders(via)))
        even = sorted(shards // len(nodes) + (n < shards % len(nodes)) for n in range(len(nodes)))

        @defer.inlineCallbacks
        def spread():
            leaders = yield self.shard_leaders(via)
            return sorted(leaders.count(n) for n in nodes) == even

        yield self.until(f"shard leaders spread evenly over {nodes}", spread, timeout)

    @defer.inlineCallbacks
    def wait_delivered(self, receiver, ids, timeout=60.0):
        """Wait until every job of ``ids`` has been delivered at least once."""
        yield self.until(
            f"{len(ids)} jobs delivered", lambda: set(ids) <= delivered_ids(receiver), timeout
        )

    @defer.inlineCallbacks
    def led_by_the_living(self, via, alive):
        """Wait until ``via`` sees every shard it holds led by a node of ``alive``."""

        @defer.inlineCallbacks
        def led():
            seen = yield self.shards_seen_by(via)
            return all(
                entry["leader"] in alive
                for entry in seen.values()
                if entry["status"] != "elsewhere"
            )

        yield self.until(f"every shard led by one of {alive}, as {via} sees it", led)

    def restart(self, node_id, until="/ready"):
        node = self.nodes[node_id]
        return start_node_process(self, reactor, self.http, node.data_dir, until, node=node)


class RestartCatchUpTests(_FaultsTestCase):
    """A node killed while the others take writes comes back, catches up, and serves,
    leads and fires like the others."""

    shards = 6

    @defer.inlineCallbacks
    def kill_write_restart(self, writes, extra=()):
        """Three nodes (``extra`` options), node3 killed, ``writes`` jobs (one log entry
        each) written through the two others, node3 restarted; checks that it caught
        up and serves reads. Fires with the route's receiver."""
        yield self.nodes_configured(shards=self.shards, extra=extra)
        receiver = yield self.route_to_receiver("node1")
        self.nodes["node3"].kill()
        for via in ("node1", "node2"):
            yield self.led_by_the_living(via, ("node1", "node2"))
        far = now_ms() + 3_600_000
        ids = [f"j{number}" for number in range(writes)]
        yield self.create_all(
            writes, lambda n: {"id": ids[n], "trigger_ms": far, "route": "hook"},
            via=["node1", "node2"],
        )
        # What node3 logs from now on tells how it caught up (it may have been sent
        # snapshots before, when the shard map placed its replicas).
        self.restarted_at = len(self.log_of("node3"))
        yield self.restart("node3")
        expected = [0] * self.shards
        for job_id in ids:
            expected[shard_of(job_id, self.shards)] += 1

        @defer.inlineCallbacks
        def caught_up():
            mine = yield self.shards_seen_by("node3")
            views = {"node1": (yield self.shards_seen_by("node1")),
                     "node2": (yield self.shards_seen_by("node2"))}
            for shard, entry in mine.items():
                leader = entry["leader"]
                if entry["status"] != "serving" or leader not in ("node3", *views):
                    return False  # node3 serves, and has learnt of its leader
                if entry["jobs"] != expected[shard]:
                    return False
                # The leader spreader may hand node3 shards as soon as it is back: a
                # leader applied every entry before it leads, a follower must reach
                # its leader.
                if leader != "node3" and (
                    entry["applied_index"] != views[leader][shard]["applied_index"]
                ):
                    return False
            return True

        yield self.until("node3 caught up on every shard", caught_up, 60)
        for job_id in ids[:: max(1, writes // 50)]:
            code, answer = yield self.call("node3", "GET", f"/job/c/{job_id}")
            self.assertEqual((code, answer.get("trigger_ms")), (200, far), answer)
        return receiver

    @defer.inlineCallbacks
    def lead_and_fire(self, receiver):
        """Kill another node (the one leading most shards; again, after bringing it
        back, until node3 has won an election): node3 leads shards and fires their
        jobs."""
        for _ in range(3):
            victim = yield self.busiest_leader("node3")
            self.assertNotEqual(victim, "node3")
            self.nodes[victim].kill()
            survivor = next(n for n in ("node1", "node2") if n != victim)
            yield self.led_by_the_living("node3", ("node3", survivor))
            leaders = yield self.shards_seen_by("node3")
            leading = sorted(s for s, e in leaders.items() if e["leader"] == "node3")
            if leading:
                break
            # Each election the two left held went to the other: try again.
            yield self.restart(victim)
        self.assertTrue(leading, "node3 won no election in three rounds")
        due = now_ms() + 3000
        fire = [ids[0] for ids in ids_by_shard("f", self.shards, 1).values()]
        yield self.create_all(
            len(fire), lambda n: {"id": fire[n], "trigger_ms": due, "route": "hook"},
            via=["node3"],
        )
        yield self.wait_delivered(receiver, fire)
        yield sleep(1.0)  # room for a repeat to show
        self.assert_delivered(receiver, dict.fromkeys(fire, due), max_repeats=0)
        after = yield self.shards_seen_by("node3")
        self.assertEqual(
            sorted(s for s, e in after.items() if e["leader"] == "node3"), leading,
            "node3's shards changed leader around the firing",
        )

    @defer.inlineCallbacks
    def test_a_node_whose_raft_log_was_repaired_gets_back_what_the_cut_lost(self):
        yield self.nodes_configured(shards=self.shards)
        yield self.route_nowhere("node1")
        far = now_ms() + 3_600_000
        ids = [f"r{n}" for n in range(80)]
        yield self.create_all(
            len(ids), lambda n: {"id": ids[n], "trigger_ms": far, "route": "hook"},
            via=["node1", "node2"],
        )
        # Every replica acknowledged them; node3 stops and its log rots in the middle.
        node3 = self.nodes["node3"]
        node3.kill(signal.SIGTERM)
        wal = os.path.join(node3.data_dir, "raft", "wal")
        segment = os.path.join(wal, sorted(n for n in os.listdir(wal) if n.endswith(".wal"))[-1])
        flip_byte(segment, os.path.getsize(segment) // 2)
        repaired = subprocess.run(
            [*timemachine_command(), "repair", "--data-dir", node3.data_dir, "--raft"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        self.assertEqual(repaired.returncode, 0, repaired.stdout + repaired.stderr)
        marker = os.path.join(node3.data_dir, REPAIRED_MARKER)
        self.assertTrue(os.path.exists(marker))
        yield self.restart("node3")
        yield self.until(
            "node3's members caught up after the repair",
            lambda: defer.succeed(not os.path.exists(marker)), 60,
        )
        for job_id in ids:
            code, answer = yield self.call("node3", "GET", f"/job/c/{job_id}")
            self.assertEqual(code, 200, (job_id, answer))
        # Stores that had applied what the cut removed were set aside, not deleted, and
        # their replicas rebuilt from the peers.
        self.assertIn("is rebuilt from its peers", self.log_of("node3"))
        set_aside = os.path.join(node3.data_dir, SET_ASIDE_DIR)
        aside = sorted(
            os.path.join(set_aside, group, "jobs.sqlite" + SET_ASIDE_SUFFIX)
            for group in os.listdir(set_aside) if group.startswith("shard-")
        )
        self.assertTrue(aside)
        for path in aside:
            self.assertTrue(os.path.exists(path), path)
        code, answer = yield self.call("node3", "GET", "/cluster/shards")
        self.assertEqual({entry["status"] for entry in answer["shards"]}, {"serving"}, answer)
        # node3 votes again: with node1 gone, it and node2 elect every shard's leader.
        self.nodes["node1"].kill()
        yield self.led_by_the_living("node3", ("node2", "node3"))
        yield self.create_all(
            10, lambda n: {"id": f"after{n}", "trigger_ms": far, "route": "hook"},
            via=["node3"],
        )
        # A store set aside stays when its replica moves off the node: one replica of
        # each shard goes, some of them node3's.
        yield self.restart("node1")
        code, answer = yield self.call(
            "node1", "POST", "/cluster/configure", {"shards": self.shards, "replicas": 2}
        )
        self.assertEqual(code, 200, answer)
        shards_dir = os.path.join(node3.data_dir, "shards")
        yield self.until(
            "node3's replica of some shard moved off",
            lambda: defer.succeed(len(os.listdir(shards_dir)) < self.shards), 90,
        )
        for path in aside:
            self.assertTrue(os.path.exists(path), path)

    @defer.inlineCallbacks
    def test_a_restarted_node_catches_up_from_the_log(self):
        # Fewer entries than a compaction keeps: the leaders send node3 what it missed.
        receiver = yield self.kill_write_restart(300)
        self.assertIsNone(SHARD_SNAPSHOT.search(self.log_of("node3"), self.restarted_at))
        yield self.lead_and_fire(receiver)

    @defer.inlineCallbacks
    def test_a_restarted_node_catches_up_from_a_snapshot(self):
        # About 100 entries a shard while node3 is down, compactions every 40 that keep
        # 10 below: the leaders' logs no longer reach back to where node3 stopped, so
        # they send it their stores.
        receiver = yield self.kill_write_restart(
            600, extra=["--compact-every", "40", "--keep-entries", "10"]
        )
        self.assertIsNotNone(SHARD_SNAPSHOT.search(self.log_of("node3"), self.restarted_at))
        yield self.lead_and_fire(receiver)


class FullDiskTests(_FaultsTestCase):
    """A node whose disk fills (a real ENOSPC, on a small tmpfs) stops taking part and
    says so; the others serve; once space is freed and it restarts, it catches up."""

    @defer.inlineCallbacks
    def test_a_node_whose_disk_fills_stops_and_the_others_serve(self):
        disk = os.path.join(self.base, "node3")
        small_disk_at(self, disk, 64)
        yield self.nodes_configured(shards=6)
        yield self.route_nowhere("node1")
        yield self.leaders_spread("node1", ["node1", "node2", "node3"])
        filler = fill_disk(disk)
        far = now_ms() + 3_600_000
        ids = [f"d{n}" for n in range(60)]
        # Writes through the others are stored, node3's shards after a new leader
        # took over: a 503 is a retry, anything else (a 500) fails the test.
        yield self.create_all(
            len(ids), lambda n: {"id": ids[n], "trigger_ms": far, "route": "hook"},
            via=["node1", "node2"],
        )
        yield self.led_by_the_living("node1", ("node1", "node2"))
        code, answer = yield self.call("node3", "GET", "/ready")
        self.assertEqual((code, answer.get("code")), (503, "E_UNAVAILABLE"), answer)
        self.assertIn("full", answer["error"])
        # With space again, node3 restarts from what it had and catches up.
        os.unlink(filler)
        self.nodes["node3"].kill()
        yield self.restart("node3")

        @defer.inlineCallbacks
        def reads_every_job():
            for job_id in ids:
                code, _ = yield self.call("node3", "GET", f"/job/c/{job_id}")
                if code != 200:
                    return False
            return True

        yield self.until("node3 reads every job", reads_every_job)


class ReadsElsewhereTests(_FaultsTestCase):
    """A read of a shard the node asked holds no replica of is passed on to a replica."""

    @defer.inlineCallbacks
    def test_a_replica_down_is_passed_over(self):
        shards = 8
        yield self.nodes_configured(count=4, shards=shards, replicas=3)
        yield self.route_to_receiver("node1")
        placed = yield self.shards_seen_by("node1")
        shard, entry = next(
            (s, e) for s, e in placed.items() if "node4" not in e["replicas"]
        )
        job_id = ids_by_shard("r", shards, 1)[shard][0]
        far = now_ms() + 3_600_000
        code, answer = yield self.call(
            "node4", "POST", "/job/c", {"id": job_id, "trigger_ms": far, "route": "hook"}
        )
        self.assertEqual(code, 200, answer)
        first, *others = entry["replicas"]
        # One that does not answer (paused) is passed over, then one that is down.
        paused = self.nodes[first].process
        paused.send_signal(signal.SIGSTOP)
        code, answer = yield self.call("node4", "GET", f"/job/c/{job_id}")
        self.assertEqual((code, answer.get("trigger_ms")), (200, far), answer)
        paused.send_signal(signal.SIGCONT)
        self.nodes[first].kill()
        yield self.led_by_the_living(others[0], [n for n in self.nodes if n != first])
        code, answer = yield self.call("node4", "GET", f"/job/c/{job_id}")
        self.assertEqual((code, answer.get("trigger_ms")), (200, far), answer)
        # With no replica left to ask, the read is one to retry.
        for node_id in others:
            self.nodes[node_id].kill()
        code, answer = yield self.call("node4", "GET", f"/job/c/{job_id}")
        self.assertEqual((code, answer.get("code")), (503, "E_UNAVAILABLE"), answer)


class TwoOfFiveDownTests(_FaultsTestCase):
    """Five nodes, three replicas a shard, two nodes down at once."""

    shards = 10

    @defer.inlineCallbacks
    def test_shards_with_a_majority_serve_the_others_wait_and_nothing_is_lost(self):
        yield self.nodes_configured(count=5, shards=self.shards)
        receiver = yield self.route_to_receiver("node1")
        placed = yield self.shards_seen_by("node1")
        replicas = {shard: set(entry["replicas"]) for shard, entry in placed.items()}
        # The two nodes holding together the most shards' replicas go down.
        down = max(
            itertools.combinations(sorted(self.nodes), 2),
            key=lambda pair: sum(set(pair) <= held for held in replicas.values()),
        )
        alive = [n for n in sorted(self.nodes) if n not in down]
        lost = sorted(s for s, held in replicas.items() if set(down) <= held)
        kept = sorted(s for s in replicas if s not in lost)
        self.assertTrue(lost and kept, (down, replicas))

        # Acknowledged before the crash, two a shard, due while the nodes are down.
        before = ids_by_shard("before", self.shards, 2)
        due_of = {}
        due = now_ms() + 8000
        for held in before.values():
            for job_id in held:
                due_of[job_id] = due
        ids = sorted(due_of)
        yield self.create_all(
            len(ids), lambda n: {"id": ids[n], "trigger_ms": due, "route": "hook"},
            via=sorted(self.nodes),
        )
        for node_id in down:
            self.nodes[node_id].kill()

        # The meta group (five voters, three left) still takes writes.
        yield self.until(
            "a route written with two nodes down",
            lambda: self.call(
                alive[0], "POST", "/route",
                {"id": "later", "type": "http", "webhook_url": receiver.url("/later")},
            ).addCallback(lambda r: r[0] == 200),
        )

        # A shard with two replicas left elects a leader, takes writes and fires.
        @defer.inlineCallbacks
        def kept_led():
            for node_id in alive:
                seen = yield self.shards_seen_by(node_id)
                if any(seen[s]["leader"] not in alive for s in kept if node_id in replicas[s]):
                    return False
            return True

        yield self.until("a living leader for every shard with two replicas left", kept_led)
        during = [job_id for s in kept for job_id in ids_by_shard("during", self.shards, 1)[s]]
        written_at = now_ms()
        for job_id in during:
            due_of[job_id] = written_at + 2000
        yield self.create_all(
            len(during),
            lambda n: {"id": during[n], "trigger_ms": due_of[during[n]], "route": "hook"},
            via=alive,
        )
        for job_id, node_id in itertools.product([before[s][0] for s in kept], alive):
            code, answer = yield self.call(node_id, "GET", f"/job/c/{job_id}")
            self.assertEqual(code, 200, (node_id, job_id, answer))

        # A shard with one replica left has no leader: writes and reads through any
        # node answer 503, and nothing of it fires.
        @defer.inlineCallbacks
        def lost_leaderless():
            for node_id in alive:
                seen = yield self.shards_seen_by(node_id)
                if any(seen[s]["leader"] is not None for s in lost):
                    return False
            return True

        yield self.until("no leader for the shards with one replica left", lost_leaderless)
        refused = [job_id for s in lost for job_id in ids_by_shard("refused", self.shards, 1)[s]]
        for job_id, node_id in itertools.product(refused, alive):
            code, answer = yield self.call(
                node_id, "POST", "/job/c",
                {"id": job_id, "trigger_ms": now_ms() + 2000, "route": "hook"},
            )
            self.assertEqual((code, answer.get("code")), (503, "E_UNAVAILABLE"),
                             (node_id, job_id, answer))
        for job_id, node_id in itertools.product([before[s][0] for s in lost], alive):
            code, answer = yield self.call(node_id, "GET", f"/job/c/{job_id}")
            self.assertEqual((code, answer.get("code")), (503, "E_UNAVAILABLE"),
                             (node_id, job_id, answer))
        on_time = [job_id for job_id in due_of if shard_of(job_id, self.shards) in kept]
        yield self.wait_delivered(receiver, on_time)
        yield sleep(max(0.0, (due - now_ms()) / 1000) + 1.0)
        fired = {r.headers["x-timemachine-job-id"] for r in receiver.requests}
        self.assertEqual(fired, set(on_time), "a shard without a majority fired")

        # Back up: the shards without a leader fire what they held, late, once.
        yield defer.gatherResults([self.restart(node_id) for node_id in down])
        yield self.wait_delivered(receiver, due_of)
        yield sleep(1.0)  # room for a repeat to show
        self.assert_delivered(receiver, due_of, max_repeats=0)
        for job_id in refused:
            yield self.until(
                f"{job_id}, refused with 503, is absent",
                lambda j=job_id: self.call(alive[0], "GET", f"/job/c/{j}").addCallback(
                    lambda r: r[0] == 404
                ),
            )


class ManyJobsTests(_FaultsTestCase):
    """Three thousand jobs through random nodes of a three-node cluster."""

    @defer.inlineCallbacks
    def test_each_fires_once_and_none_early(self):
        yield self.nodes_configured(shards=12)
        receiver = yield self.route_to_receiver("node1")
        yield self.leaders_spread("node1", sorted(self.nodes))
        rng = random.Random(3000)
        count = 3000
        via = [rng.choice(sorted(self.nodes)) for _ in range(count)]
        delays = [rng.randint(0, 10_000) for _ in range(count)]
        due_of = {}

        def job_of(number):
            job_id = f"m{number}"
            due_of[job_id] = now_ms() + delays[number]
            return {"id": job_id, "trigger_ms": due_of[job_id], "route": "hook"}

        yield self.create_all(count, job_of, via, parallel=24)
        yield self.wait_delivered(receiver, due_of)
        yield sleep(1.0)  # room for a repeat to show
        self.assert_delivered(receiver, due_of, max_repeats=0)


#: Seconds the chaos lasts, and seconds a fault holds at most.
CHAOS_SECONDS = 60
LONGEST_FAULT = 4.0
#: A repeated delivery is a failover's when it falls within a fault or this many seconds
#: after it (elections, a lease running out, the deliveries a new leader resumes).
FAULT_MARGIN = 10.0
#: Seconds the chaos client waits for any answer.
REQUEST_TIMEOUT = 5.0
#: Seconds the client lets pass after an unclear create (a 503 or no answer) before it
#: asks whether the job is stored: a request held by a paused node, or passed on to a
#: leader, may still reach the log until then.
SETTLE = LONGEST_FAULT + 5.0
#: What the client gets when a node refused the connection: nothing was sent.
REFUSED = 0


class ChaosTests(_FaultsTestCase):
    """Seeded chaos: jobs created through random nodes while nodes crash, restart,
    pause and are cut off. The seed is ``$TM_CHAOS_SEED`` or random, and printed, so a
    failure replays with the same faults."""

    hosts = [f"127.0.4.{n}" for n in range(1, 10)]
    timeout = 400

    @defer.inlineCallbacks
    def ask(self, node_id, method, path, body=None):
        """``(status, answer)`` of one request; status `REFUSED` when the node refused
        the connection, None when it gave no answer in time (or lost the connection)."""

        @defer.inlineCallbacks
        def request():
            data = None if body is None else json.dumps(body).encode()
            response = yield self.http.request(method, self.nodes[node_id].url + path,
                                               data=data)
            content = yield response.content()
            return response.code, json.loads(content)

        try:
            answer = yield request().addTimeout(REQUEST_TIMEOUT, reactor)
        except ConnectionRefusedError:
            return REFUSED, None
        except (ConnectError, ResponseFailed, ResponseNeverReceived, defer.TimeoutError):
            return None, None
        return answer

    @defer.inlineCallbacks
    def stored(self, rng, job_id, patience=60.0):
        """Whether a node finds ``job_id`` stored (a linearizable read): True, False,
        or None when none could tell within ``patience`` seconds."""
        deadline = reactor.seconds() + patience
        while reactor.seconds() < deadline:
            code, _ = yield self.ask(rng.choice(sorted(self.nodes)), "GET", f"/job/c/{job_id}")
            if code in (200, 404):
                return code == 200
            yield sleep(0.3)
        return None

    @defer.inlineCallbacks
    def create_carefully(self, rng, job, outcome):
        """Create ``job`` through random nodes; ``outcome["acked"]`` becomes True once
        a node answered 200, or a read found it stored.

        A 503 or no answer may hide a commit: after `SETTLE` the client reads the job,
        and creates it again (same body) only when it is not stored, while its trigger
        is not past. A refused connection sent nothing: the next node is asked at once.
        """
        nodes = sorted(self.nodes)
        give_up = job["trigger_ms"] / 1000 + 4.0  # later, a create is E_PAST
        while reactor.seconds() < give_up:
            outcome["attempts"] += 1
            code, answer = yield self.ask(rng.choice(nodes), "POST", "/job/c", job)
            if code == 200:
                outcome["acked"] = True
                return
            if code == REFUSED:
                yield sleep(0.1)
                continue
            if code not in (503, None):
                outcome["refused"] = answer
                return
            yield sleep(SETTLE)
            found = yield self.stored(rng, job["id"])
            if found is not False:
                outcome["acked"] = bool(found)
                return

    @defer.inlineCallbacks
    def create_jobs(self, rng, until, outcomes):
        """Jobs due 5-20 s ahead, about 20 a second until ``until``, each created
        carefully through random nodes; fires when every create has ended."""
        creates = []
        while reactor.seconds() < until:
            yield sleep(rng.expovariate(20.0))
            job = {"id": f"x{len(outcomes)}", "trigger_ms": now_ms() + rng.randint(5000, 20_000),
                   "route": "hook"}
            outcome = outcomes[job["id"]] = {"trigger_ms": job["trigger_ms"], "acked": False,
                                             "attempts": 0}
            creates.append(self.create_carefully(random.Random(rng.random()), job, outcome))
        yield defer.gatherResults(creates)

    @defer.inlineCallbacks
    def inflict_faults(self, rng, until, faults, partition):
        """One fault at a time on a random node until ``until``: kill -9 then restart,
        SIGSTOP then SIGCONT, or cut off from the others then healed, each held 1 s to
        `LONGEST_FAULT`; ``faults`` gets ``(kind, node, start, end)`` of each."""
        nodes = sorted(self.nodes)
        while reactor.seconds() < until:
            yield sleep(rng.uniform(0.5, 3.0))
            kind = rng.choice(("kill", "pause", "partition"))
            node_id = rng.choice(nodes)
            hold = rng.uniform(1.0, LONGEST_FAULT)
            node = self.nodes[node_id]
            start = reactor.seconds()
            if kind == "kill":
                node.kill()
                yield sleep(hold)
                yield self.restart(node_id, until="/health")
            elif kind == "pause":
                node.process.send_signal(signal.SIGSTOP)
                yield sleep(hold)
                node.process.send_signal(signal.SIGCONT)
            else:
                partition.cut(node.host, [self.nodes[n].host for n in nodes if n != node_id])
                yield sleep(hold)
                partition.heal()
            faults.append((kind, node_id, start, reactor.seconds()))

    def problems(self, receiver, outcomes, faults):
        """What the deliveries break of the promises: an acknowledged job not
        delivered, a delivery early, a repeat with another key or away from faults."""
        deliveries: dict[str, list] = {}
        problems = []
        for r in receiver.requests:
            deliveries.setdefault(r.headers["x-timemachine-job-id"], []).append(r)
        for job_id, received in sorted(deliveries.items()):
            outcome = outcomes.get(job_id)
            if outcome is None:
                problems.append(f"{job_id} delivered, never created")
                continue
            for r in received:
                if r.at * 1000 < outcome["trigger_ms"]:
                    problems.append(f"{job_id} delivered {outcome['trigger_ms'] - r.at * 1000:.0f}"
                                    " ms early")
            keys = sorted({r.headers["idempotency-key"] for r in received})
            if len(keys) > 1:
                problems.append(f"{job_id} delivered under keys {keys} (created twice)")
            for r in received[1:]:
                if not any(start - 1 <= r.at <= end + FAULT_MARGIN for _, _, start, end in faults):
                    problems.append(f"{job_id} repeated at {r.at:.1f}, away from any fault")
        for job_id, outcome in sorted(outcomes.items()):
            if outcome["acked"] and job_id not in deliveries:
                problems.append(f"{job_id} acknowledged, never delivered")
        return problems

    @defer.inlineCallbacks
    def test_no_acknowledged_job_is_lost_none_fires_early_repeats_only_around_faults(self):
        seed = int(os.environ.get("TM_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
        print(f"\nchaos seed {seed} (replay: TM_CHAOS_SEED={seed})")
        rng = random.Random(seed)
        yield self.nodes_configured(shards=6)
        receiver = yield self.route_to_receiver("node1")
        partition = Partition()
        self.addCleanup(partition.remove)
        outcomes, faults = {}, []
        until = reactor.seconds() + CHAOS_SECONDS
        yield defer.gatherResults([
            self.inflict_faults(random.Random(rng.random()), until, faults, partition),
            self.create_jobs(random.Random(rng.random()), until, outcomes),
        ])
        # Every node is back and the network whole: everything stored fires.
        acked = {job_id for job_id, outcome in outcomes.items() if outcome["acked"]}
        deadline = reactor.seconds() + 90
        while reactor.seconds() < deadline and not acked <= delivered_ids(receiver):
            yield sleep(0.2)  # the check names any that never came
        yield sleep(2.0)  # room for a repeat to show
        problems = self.problems(receiver, outcomes, faults)
        began = until - CHAOS_SECONDS
        summary = (
            f"seed {seed}: {len(outcomes)} jobs, {len(acked)} acknowledged, "
            f"{len(receiver.requests)} deliveries; faults (s into the chaos): "
            + ", ".join(f"{kind} {node_id} {start - began:.1f}-{end - began:.1f}"
                        for kind, node_id, start, end in faults)
        )
        print(summary)
        self.assertEqual(problems, [], summary)
