"""A whole node in this process, end to end: REST in, deliveries out, restarts.

Real everything: the node listens on 127.0.0.1, jobs are created over HTTP with treq,
and delivered to a real HTTP receiver or a real redis-server started by the test.
"""

import json
import sys

from twisted.internet import defer, reactor, task

from tests.support import NodeTestCase, RedisServer, free_port
from timemachine.domain.errors import TimeMachineError


class BlockingCallsOnThisThread:
    """Records the SQLite calls and fsyncs made on this (the reactor's) thread.

    A profile hook sees every C function the thread calls, whatever path led there:
    a store or WAL call that skipped its I/O thread shows up here, however fast the
    disk (the answers' order alone can come out right even then).
    """

    _SYNC_CALLS = frozenset({"fsync", "fdatasync"})

    def __init__(self):
        self.calls: list[str] = []
        self._previous = None

    def _profile(self, frame, event, arg):
        if event != "c_call":
            return
        module = getattr(arg, "__module__", None)
        if type(getattr(arg, "__self__", None)).__module__ == "sqlite3":
            self.calls.append(f"sqlite3.{arg.__qualname__}")
        elif module == "posix" and arg.__name__ in self._SYNC_CALLS:
            self.calls.append(f"os.{arg.__name__}")

    def __enter__(self):
        self._previous = sys.getprofile()
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc_info):
        sys.setprofile(self._previous)


class FiringTests(NodeTestCase):
    @defer.inlineCallbacks
    def test_every_job_arrives_once_never_early_with_its_headers(self):
        yield self.route()
        start = self.now_ms() + 300
        triggers = {f"job-{i}": start + (i * 7) % 500 for i in range(200)}
        batch = [
            {"id": job_id, "trigger_ms": t, "route": "hook", "meta": {"n": job_id}}
            for job_id, t in triggers.items()
        ]
        code, answer = yield self.call("POST", "/job/orders", batch)
        self.assertEqual(code, 200)
        self.assertEqual({r["status"] for r in answer["results"]}, {"ok"})
        requests = yield self.receiver.wait_for(len(triggers))
        yield task.deferLater(reactor, 0.3, lambda: None)  # room for any duplicate
        ids = [r.headers["x-timemachine-job-id"] for r in self.receiver.requests]
        self.assertEqual(sorted(ids), sorted(triggers))
        for request in requests:
            job_id = request.headers["x-timemachine-job-id"]
            self.assertGreaterEqual(request.at * 1000, triggers[job_id], "fired early")
            self.assertEqual(request.method, "POST")
            self.assertEqual(request.headers["content-type"], "application/json")
            self.assertEqual(request.headers["x-timemachine-collection"], "orders")
            self.assertEqual(request.headers["x-timemachine-trigger-ms"], str(triggers[job_id]))
            self.assertEqual(request.headers["x-timemachine-attempt"], "1")
            self.assertTrue(request.headers["idempotency-key"].startswith(f"orders/{job_id}/"))
            self.assertEqual(json.loads(request.body), {"n": job_id})
        job = yield self.wait_for_status("orders", "job-0", "fired")
        self.assertEqual(job["attempts"], 1)
        self.assertIsNotNone(job["fired_at_ms"])

    @defer.inlineCallbacks
    def test_acknowledged_jobs_survive_a_restart_and_fired_ones_do_not_repeat(self):
        yield self.route()
        now = self.now_ms()
        yield self.job("c", "before", now)
        yield self.receiver.wait_for(1)
        yield self.wait_for_status("c", "before", "fired")
        yield self.job("c", "after", now + 1500)
        yield self.restart()
        code, job = yield self.call("GET", "/job/c/after")
        self.assertEqual((code, job["status"]), (200, "scheduled"))
        yield self.receiver.wait_for(2)
        yield task.deferLater(reactor, 0.3, lambda: None)
        ids = [r.headers["x-timemachine-job-id"] for r in self.receiver.requests]
        self.assertEqual(ids, ["before", "after"])

    @defer.inlineCallbacks
    def test_retry_after_a_500_uses_the_same_idempotency_key(self):
        yield self.route(backoff_ms=20)
        self.receiver.script("/hook", [500, 200])
        yield self.job("c", "flaky", self.now_ms())
        requests = yield self.receiver.wait_for(2)
        first, second = requests[:2]
        self.assertEqual(first.headers["idempotency-key"], second.headers["idempotency-key"])
        self.assertEqual(
            (first.headers["x-timemachine-attempt"], second.headers["x-timemachine-attempt"]),
            ("1", "2"),
        )
        job = yield self.wait_for_status("c", "flaky", "fired")
        self.assertEqual(job["attempts"], 2)

    @defer.inlineCallbacks
    def test_a_400_leaves_the_job_failed_with_its_error(self):
        yield self.route()
        self.receiver.script("/hook", [400])
        yield self.job("c", "rejected", self.now_ms())
        job = yield self.wait_for_status("c", "rejected", "failed")
        self.assertIn("400", job["last_error"])
        code, page = yield self.call("GET", "/job/c?status=failed")
        self.assertEqual(code, 200)
        self.assertEqual([j["id"] for j in page["jobs"]], ["rejected"])
        self.assertEqual(len(self.receiver.requests), 1)

    @defer.inlineCallbacks
    def test_unreachable_redis_is_retried_then_failed(self):
        yield self.route(
            "events", type="redis", redis_url=f"redis://127.0.0.1:{free_port()}/0",
            key="tm:events", max_attempts=3, backoff_ms=10, timeout_ms=500,
        )
        yield self.job("c", "lost", self.now_ms(), route="events")
        job = yield self.wait_for_status("c", "lost", "failed")
        self.assertEqual(job["attempts"], 3)
        self.assertTrue(job["last_error"])

    @defer.inlineCallbacks
    def test_redis_stream_delivery(self):
        redis = RedisServer()
        redis.start()
        self.addCleanup(redis.stop)
        yield self.route("events", type="redis", redis_url=redis.url, key="tm:events")
        yield self.job("c", "to-stream", self.now_ms(), route="events", meta={"a": 1})
        yield self.wait_for_status("c", "to-stream", "fired")
        entries = redis.call("XRANGE", "tm:events", "-", "+")
        self.assertEqual(len(entries), 1)
        fields = entries[0][1]
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))
        self.assertEqual(pairs[b"id"], b"to-stream")
        self.assertEqual(json.loads(pairs[b"meta"]), {"a": 1})

    @defer.inlineCallbacks
    def test_reactor_stays_responsive_while_a_large_batch_is_written(self):
        yield self.route()
        far = self.now_ms() + 3_600_000
        batch = [{"id": f"big-{i}", "trigger_ms": far, "route": "hook"} for i in range(5000)]
        order = []
        with BlockingCallsOnThisThread() as on_reactor:
            posted = self.call("POST", "/job/big", batch)
            posted.addCallback(lambda answer: order.append("batch") or answer)
            code, _ = yield self.call("GET", "/health")
            order.append("health")
            batch_code, _ = yield posted
            # And the jobs read back, through the store.
            listed, _ = yield self.call("GET", "/job/big?limit=10")
        self.assertEqual((code, batch_code, listed), (200, 200, 200))
        # The batch is written and applied in threads: the reactor answers in between,
        # and not one SQLite call or fsync ran on it.
        self.assertEqual(on_reactor.calls, [])
        self.assertEqual(order, ["health", "batch"])


class LeftAloneToJoinTests(NodeTestCase):
    @defer.inlineCallbacks
    def test_a_node_that_gave_up_its_cluster_to_join_another_does_not_start_one(self):
        # What a join offer does to a node alone in the empty cluster it bootstrapped;
        # the leader's meta state is on its way.
        yield self.node._give_up_alone()
        self.assertTrue(self.node.meta_log.blank)
        code, answer = yield self.call("POST", "/cluster/configure", {"shards": 2, "replicas": 1})
        self.assertEqual((code, answer.get("code")), (503, "E_NOT_CONFIGURED"), answer)
        self.assertTrue(self.node.meta_log.blank)

    @defer.inlineCallbacks
    def test_restarted_before_the_joined_cluster_state_came_it_still_waits_blank(self):
        # Stopped (as by kill -9) after leaving its own cluster, before the leader's
        # meta state arrived: a one-node cluster bootstrapped again would take writes
        # that the joined cluster's state then replaces.
        yield self.node._give_up_alone()
        yield self.restart()
        self.assertTrue(self.node.meta_log.blank)
        self.assertEqual(self.node.shard_logs, {})
        code, answer = yield self.call(
            "POST", "/job/c", {"id": "lost", "trigger_ms": self.now_ms() + 60_000, "route": "hook"}
        )
        self.assertEqual((code, answer.get("code")), (503, "E_NOT_CONFIGURED"), answer)
        code, answer = yield self.call("POST", "/cluster/configure", {"shards": 2, "replicas": 1})
        self.assertEqual((code, answer.get("code")), (503, "E_NOT_CONFIGURED"), answer)
        self.assertIn("joining", answer["error"])


class NoBootstrapTests(NodeTestCase):
    bootstrap = False

    @defer.inlineCallbacks
    def test_waits_for_configure_then_serves_and_remembers_it(self):
        code, answer = yield self.call("GET", "/ready")
        self.assertEqual(code, 503)
        # In no cluster yet, it can commit nothing: not even a route.
        code, answer = yield self.call(
            "POST", "/route", {"id": "hook", "type": "http", "webhook_url": self.receiver.url()}
        )
        self.assertEqual((code, answer["code"]), (503, "E_NOT_CONFIGURED"))
        code, answer = yield self.call(
            "POST", "/job/c", {"id": "early", "trigger_ms": self.now_ms() + 60_000, "route": "hook"}
        )
        self.assertEqual((code, answer["code"]), (503, "E_NOT_CONFIGURED"))
        code, answer = yield self.call("GET", "/job/c/early")
        self.assertEqual(code, 503)

        code, answer = yield self.call("POST", "/cluster/configure", {"shards": 2, "replicas": 1})
        self.assertEqual(code, 200, answer)
        yield self.route()
        code, _ = yield self.call("GET", "/ready")
        self.assertEqual(code, 200)
        yield self.job("c", "later", self.now_ms() + 60_000)

        yield self.restart()
        code, shards = yield self.call("GET", "/cluster/shards")
        self.assertEqual(len(shards["shards"]), 2)
        self.assertEqual(sum(s["jobs"] for s in shards["shards"]), 1)


class ShardsOpeningTests(NodeTestCase):
    @defer.inlineCallbacks
    def test_a_write_while_the_shard_map_opens_here_is_a_retry(self):
        # A node that just joined, or whose map just changed, knows the map before
        # its replicas are open: the cluster is configured, this node is not ready.
        yield self.route()
        ring, self.node.coordinator.ring = self.node.coordinator.ring, None
        self.addCleanup(setattr, self.node.coordinator, "ring", ring)
        code, answer = yield self.call(
            "POST", "/job/c", {"id": "j", "trigger_ms": self.now_ms() + 60_000, "route": "hook"}
        )
        self.assertEqual((code, answer["code"]), (503, "E_UNAVAILABLE"), answer)
        self.assertIn("opening its shards", answer["error"])


class ConcurrentConfigureTests(NodeTestCase):
    @defer.inlineCallbacks
    def test_concurrent_configure_calls_are_serialized_and_leave_the_node_serving(self):
        yield self.route()
        counts = [2, 3, 2, 5, 5, 1, 6]
        answers = yield defer.gatherResults(
            [
                self.call("POST", "/cluster/configure", {"shards": n, "replicas": 1})
                for n in counts
            ]
        )
        self.assertEqual([code for code, _ in answers], [200] * len(counts), answers)
        # Serialized: each call ran alone and got what it asked.
        self.assertEqual([answer["shards"] for _, answer in answers], counts)
        code, _ = yield self.call("GET", "/ready")
        self.assertEqual(code, 200)
        yield self.job("c", "after", self.now_ms() + 60_000)
        code, shards = yield self.call("GET", "/cluster/shards")
        self.assertEqual(code, 200)
        self.assertIn(len(shards["shards"]), counts)
        self.assertEqual(len(shards["shards"]), self.node.cluster_store.config.shards)
        self.assertEqual(sum(s["jobs"] for s in shards["shards"]), 1)

    @defer.inlineCallbacks
    def test_a_node_stopped_while_its_shards_change_closes_them_after(self):
        # Stopped in the same turn: the shards close once the configure is done,
        # not under it (its replicas would open on threads already stopped).
        configuring = self.node.configure(8, 1)
        yield self.stop_node()
        config = yield configuring
        self.assertEqual(config.shards, 8)
        self.assertEqual(self.node.shard_logs, {})

    @defer.inlineCallbacks
    def test_requests_while_the_shards_change_are_refused_never_a_500(self):
        yield self.route()
        # Asked on every reactor turn while the node closes and opens its shards.
        unexpected = []

        def ask(job_id):
            d = defer.maybeDeferred(self.node.coordinator.get_job, "c", job_id)
            d.addErrback(lambda f: None if f.check(TimeMachineError) else unexpected.append(f))

        configured = self.node.configure(6, 1)
        done = []
        configured.addBoth(lambda result: done.append(True) or result)
        turns = 0
        while not done and not unexpected:
            # One read a turn, each turn a job of another shard (more would queue up
            # on the store thread and slow the shards' opening down).
            ask(f"j{turns % 16}")
            turns += 1
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(unexpected, [])
        config = yield configured
        self.assertEqual(config.shards, 6)
        self.assertGreater(turns, 1)
        yield self.job("c", "after", self.now_ms() + 60_000)


class CallsToOtherNodesTests(NodeTestCase):
    node_options = {"peer_endpoint": "tcp:0:interface=127.0.2.9", "advertise": "127.0.2.9:0"}

    @defer.inlineCallbacks
    def test_leave_from_the_advertised_address(self):
        # As the peer connections do: a partition of that address (an nft rule) cuts
        # the nodes' calls to each other (their views, transfers, proxied reads) too.
        response = yield self.node.http_client.get(self.receiver.url("/cluster/shards"))
        yield response.content()
        self.assertEqual(self.receiver.requests[-1].peer_host, "127.0.2.9")
