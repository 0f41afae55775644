"""Tests for timemachine.firing.publisher against a real HTTP receiver and a real redis-server."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from email.utils import format_datetime

from twisted.internet import defer, reactor
from twisted.internet.interfaces import IHostnameResolver
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support import HOLD, HTTPReceiver, RedisServer, Reply, free_port
from timemachine.domain.jobs import Job
from timemachine.domain.records import from_record
from timemachine.domain.routes import Route
from timemachine.firing.publisher import (
    PARSED_URLS_KEPT,
    Delivered,
    Failed,
    Publisher,
    RetryLater,
    _kept,
    _retry_after_ms,
)
from timemachine.interfaces import IPublisher

# Written as a client may: a number JSON would rewrite (1.0e2 -> 100.0), an escape,
# keys out of order. Every delivery carries this text exactly.
META = '{"order": 123, "note": "caf\\u00e9 \u00e9t\u00e9", "items": [1.0e2, 0.10], "a": null}'


def make_job(job_id: str = "pay-123", meta: str = META) -> Job:
    return Job(
        collection="billing", id=job_id, trigger_ms=1767225600000, meta=meta, route="r1", version=42
    )


def http_route(url: str, **kwargs) -> Route:
    return Route(id=kwargs.pop("id", "r1"), type="http", webhook_url=url, **kwargs)


def redis_route(url: str, key: str = "tm:events", mode: str = "xadd", **kwargs) -> Route:
    return Route(id="r2", type="redis", redis_url=url, key=key, mode=mode, **kwargs)


class PublisherTestCase(unittest.TestCase):
    timeout = 20

    def setUp(self):
        self.publisher = Publisher(reactor)
        self.addCleanup(self.publisher.close)


class HTTPDeliveryTests(PublisherTestCase):
    def setUp(self):
        super().setUp()
        self.receiver = HTTPReceiver(reactor)
        self.receiver.start()
        # Cleanups run last-in first-out: the publisher closes its side first.
        self.addCleanup(self.receiver.stop)

    def test_provides_interface(self):
        self.assertTrue(verifyObject(IPublisher, self.publisher))

    async def test_delivered_with_headers_and_exact_body(self):
        route = http_route(self.receiver.url("/hook"))
        outcome = await self.publisher.deliver(route, make_job(), 3)
        self.assertEqual(outcome, Delivered())
        [request] = self.receiver.requests
        self.assertEqual((request.method, request.path), ("POST", "/hook"))
        self.assertEqual(request.body, META.encode("utf-8"))
        for name, value in {
            "content-type": "application/json",
            "x-timemachine-job-id": "pay-123",
            "x-timemachine-collection": "billing",
            "x-timemachine-trigger-ms": "1767225600000",
            "x-timemachine-attempt": "3",
            "idempotency-key": "billing/pay-123/42",
        }.items():
            self.assertEqual(request.headers.get(name), value, name)

    async def test_any_2xx_is_delivered(self):
        self.receiver.script("/hook", [Reply(204), Reply(202, body=b"queued")])
        route = http_route(self.receiver.url("/hook"))
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())

    async def test_server_error_is_retried_with_body_in_error(self):
        self.receiver.script("/hook", [Reply(500, body=b"boom " + b"x" * 1000)])
        outcome = await self.publisher.deliver(
            http_route(self.receiver.url("/hook")), make_job(), 1
        )
        self.assertIsInstance(outcome, RetryLater)
        self.assertTrue(outcome.error.startswith("HTTP 500: boom x"), outcome.error)
        self.assertEqual(len(outcome.error), len("HTTP 500: ") + 200)
        self.assertIsNone(outcome.retry_after_ms)

    async def test_retry_after_seconds(self):
        self.receiver.script("/hook", [Reply(503, {"Retry-After": "7"}, b"busy")])
        outcome = await self.publisher.deliver(
            http_route(self.receiver.url("/hook")), make_job(), 1
        )
        self.assertEqual(outcome, RetryLater("HTTP 503: busy", 7000))

    async def test_429_and_408_are_retried(self):
        self.receiver.script("/hook", [Reply(429, {"Retry-After": "2"}), 408])
        route = http_route(self.receiver.url("/hook"))
        self.assertEqual(
            await self.publisher.deliver(route, make_job(), 1), RetryLater("HTTP 429", 2000)
        )
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), RetryLater("HTTP 408"))

    async def test_client_error_fails(self):
        self.receiver.script("/hook", [Reply(400, body=b"bad order"), 404])
        route = http_route(self.receiver.url("/hook"))
        self.assertEqual(
            await self.publisher.deliver(route, make_job(), 1), Failed("HTTP 400: bad order")
        )
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Failed("HTTP 404"))

    async def test_redirect_is_not_followed_and_fails(self):
        self.receiver.script("/hook", [Reply(302, {"Location": self.receiver.url("/other")})])
        outcome = await self.publisher.deliver(
            http_route(self.receiver.url("/hook")), make_job(), 1
        )
        self.assertEqual(outcome, Failed("HTTP 302"))
        self.assertEqual(len(self.receiver.requests), 1)

    async def test_timeout_is_retried(self):
        self.receiver.script("/hook", [HOLD])
        route = http_route(self.receiver.url("/hook"), timeout_ms=200)
        outcome = await self.publisher.deliver(route, make_job(), 1)
        self.assertEqual(outcome, RetryLater("timed out after 200 ms"))

    async def test_connection_refused_is_retried(self):
        route = http_route(f"http://127.0.0.1:{free_port()}/hook")
        outcome = await self.publisher.deliver(route, make_job(), 1)
        self.assertIsInstance(outcome, RetryLater)
        self.assertTrue(outcome.error.startswith("connection refused"), outcome.error)

    async def test_connection_is_reused(self):
        self.receiver.script("/hook", [500, Reply(400, body=b"no")])
        route = http_route(self.receiver.url("/hook"))
        for _ in range(5):
            await self.publisher.deliver(route, make_job(), 1)
        self.assertEqual(len(self.receiver.requests), 5)
        self.assertEqual(self.receiver.connections, 1)
        self.assertEqual(len({r.peer_port for r in self.receiver.requests}), 1)

    async def test_a_route_pointed_at_another_receiver_delivers_there(self):
        other = HTTPReceiver(reactor)
        other.start()
        self.addCleanup(other.stop)
        before = http_route(self.receiver.url("/hook"))
        self.assertEqual(await self.publisher.deliver(before, make_job(), 1), Delivered())
        after = http_route(other.url("/moved"))  # the same route id, a new URL
        self.assertEqual(await self.publisher.deliver(after, make_job(), 1), Delivered())
        self.assertEqual([r.path for r in self.receiver.requests], ["/hook"])
        self.assertEqual([r.path for r in other.requests], ["/moved"])

    async def test_cookies_are_neither_sent_nor_kept(self):
        cookie = "session=abc; Path=/"
        self.receiver.script("/hook", [Reply(200, {"Set-Cookie": cookie})])
        route = http_route(self.receiver.url("/hook"))
        for _ in range(2):
            self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())
        self.assertEqual([r.headers.get("cookie") for r in self.receiver.requests], [None, None])

    async def test_url_is_sent_percent_encoded(self):
        route = http_route(self.receiver.url("/hook/caf\u00e9?x=\u00e9t\u00e9&y=1"))
        for _ in range(2):
            self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())
        sent = "/hook/caf%C3%A9?x=%C3%A9t%C3%A9&y=1"
        self.assertEqual([r.uri for r in self.receiver.requests], [sent, sent])

    def _record_resolutions(self) -> list[str]:
        """The host names the reactor's resolver is asked for from now on."""
        asked: list[str] = []
        resolver = reactor.nameResolver

        @implementer(IHostnameResolver)
        class Recording:
            def resolveHostName(self, receiver, hostName, *args, **kwargs):
                asked.append(hostName)
                return resolver.resolveHostName(receiver, hostName, *args, **kwargs)

        reactor.installNameResolver(Recording())
        self.addCleanup(reactor.installNameResolver, resolver)
        return asked

    async def test_an_address_is_connected_to_without_resolving_it(self):
        asked = self._record_resolutions()
        v6 = HTTPReceiver(reactor, interface="::1")
        v6.start()
        self.addCleanup(v6.stop)
        for url in (self.receiver.url("/hook"), v6.url("/six")):
            outcome = await self.publisher.deliver(http_route(url), make_job(), 1)
            self.assertEqual(outcome, Delivered())
        self.assertEqual([r.path for r in self.receiver.requests], ["/hook"])
        self.assertEqual([r.path for r in v6.requests], ["/six"])
        self.assertEqual(asked, [])

    async def test_a_host_name_is_resolved(self):
        asked = self._record_resolutions()
        url = self.receiver.url("/hook").replace("127.0.0.1", "localhost")
        self.assertEqual(await self.publisher.deliver(http_route(url), make_job(), 1), Delivered())
        self.assertEqual([r.path for r in self.receiver.requests], ["/hook"])
        self.assertEqual(asked, ["localhost"])

    async def test_connections_are_not_logged_one_by_one(self):
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        route = http_route(self.receiver.url("/hook"), max_in_flight=4)
        self.receiver.script("/hook", [HOLD] * 4)
        held = [self.publisher.deliver(route, make_job(f"j{n}"), 1) for n in range(4)]
        await self.receiver.wait_for(4)
        for _ in range(4):
            self.receiver.release(200)
        await defer.gatherResults(held)
        await self.publisher.close()
        self.assertEqual(self.receiver.connections, 4)
        factories = [e for e in events if "factory" in e.get("log_format", "")]
        self.assertEqual(factories, [])

    async def _probe(self) -> None:
        """Deliver through another route and wait for it: by then, any request the
        publisher had already let go of has reached the receiver."""
        probe = http_route(self.receiver.url("/probe"), id="probe")
        self.assertEqual(await self.publisher.deliver(probe, make_job(), 1), Delivered())

    async def test_max_in_flight_holds_later_deliveries(self):
        self.receiver.script("/hook", [HOLD])
        route = http_route(self.receiver.url("/hook"), max_in_flight=1)
        first = self.publisher.deliver(route, make_job("a"), 1)
        await self.receiver.wait_for(1)
        second = self.publisher.deliver(route, make_job("b"), 1)
        await self._probe()
        self.assertEqual([r.path for r in self.receiver.requests], ["/hook", "/probe"])
        self.assertNoResult(second)

        self.receiver.release(200)
        self.assertEqual(await first, Delivered())
        self.assertEqual(await second, Delivered())
        self.assertEqual(
            [r.headers["x-timemachine-job-id"] for r in self.receiver.requests],
            ["a", "pay-123", "b"],
        )

    async def test_new_max_in_flight_applies_to_new_deliveries(self):
        self.receiver.script("/hook", [HOLD])
        first = self.publisher.deliver(
            http_route(self.receiver.url("/hook"), max_in_flight=1), make_job("a"), 1
        )
        await self.receiver.wait_for(1)
        wider = http_route(self.receiver.url("/hook"), max_in_flight=2)
        self.assertEqual(await self.publisher.deliver(wider, make_job("b"), 1), Delivered())
        self.receiver.release(200)
        self.assertEqual(await first, Delivered())

    async def test_close_waits_for_deliveries_then_refuses_new_ones(self):
        self.receiver.script("/hook", [HOLD])
        route = http_route(self.receiver.url("/hook"))
        delivery = self.publisher.deliver(route, make_job(), 1)
        await self.receiver.wait_for(1)
        closed = self.publisher.close()
        self.assertNoResult(closed)
        self.receiver.release(200)
        self.assertEqual(await delivery, Delivered())
        await closed
        self.assertEqual(
            await self.publisher.deliver(route, make_job(), 1), RetryLater("publisher is closed")
        )


class KeptTests(unittest.TestCase):
    def test_made_once_and_kept(self):
        cache, made = {}, []

        def make(key):
            made.append(key)
            return key.upper()

        self.assertEqual([_kept(cache, k, make) for k in ["a", "b", "a"]], ["A", "B", "A"])
        self.assertEqual(made, ["a", "b"])

    def test_starts_over_when_full(self):
        cache = {n: n for n in range(PARSED_URLS_KEPT)}
        self.assertEqual(_kept(cache, "new", str.upper), "NEW")
        self.assertEqual(cache, {"new": "NEW"})


class RetryAfterTests(unittest.TestCase):
    NOW = 1_767_225_600.0

    def test_seconds(self):
        self.assertEqual(_retry_after_ms("7", self.NOW), 7000)
        self.assertEqual(_retry_after_ms(" 0 ", self.NOW), 0)

    def test_http_date(self):
        when = datetime.fromtimestamp(self.NOW + 90, timezone.utc)
        self.assertEqual(_retry_after_ms(format_datetime(when, usegmt=True), self.NOW), 90_000)

    def test_date_in_the_past_means_now(self):
        self.assertEqual(_retry_after_ms("Thu, 01 Jan 2015 00:00:00 GMT", self.NOW), 0)

    def test_absent_or_unreadable(self):
        self.assertIsNone(_retry_after_ms(None, self.NOW))
        self.assertIsNone(_retry_after_ms("soon", self.NOW))
        self.assertIsNone(_retry_after_ms("-5", self.NOW))


class RedisDeliveryTests(PublisherTestCase):
    def setUp(self):
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        # After the server's cleanup is registered, so the publisher closes first.
        super().setUp()

    def test_provides_interface(self):
        self.assertTrue(verifyObject(IPublisher, self.publisher))

    async def test_xadd(self):
        outcome = await self.publisher.deliver(redis_route(self.redis.url), make_job(), 2)
        self.assertEqual(outcome, Delivered())
        [(_entry_id, fields)] = self.redis.call("XRANGE", "tm:events", "-", "+")
        self.assertEqual(
            fields,
            [
                b"id",
                b"pay-123",
                b"collection",
                b"billing",
                b"trigger_ms",
                b"1767225600000",
                b"attempt",
                b"2",
                b"idempotency_key",
                b"billing/pay-123/42",
                b"meta",
                META.encode("utf-8"),
            ],
        )

    async def test_lpush(self):
        route = redis_route(self.redis.url, key="tm:list", mode="lpush")
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())
        [message] = self.redis.call("LRANGE", "tm:list", 0, -1)
        self.assertEqual(
            json.loads(message),
            {
                "id": "pay-123",
                "collection": "billing",
                "trigger_ms": 1767225600000,
                "attempt": 1,
                "idempotency_key": "billing/pay-123/42",
                "meta": json.loads(META),
            },
        )
        self.assertTrue(message.endswith(b',"meta":' + META.encode("utf-8") + b"}"), message)

    async def test_publish(self):
        subscriber = self.redis.client()
        self.addCleanup(subscriber.close)
        subscriber.call("SUBSCRIBE", "tm:channel")
        route = redis_route(self.redis.url, key="tm:channel", mode="publish")
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())
        kind, channel, message = subscriber.read_reply()
        self.assertEqual((kind, channel), (b"message", b"tm:channel"))
        self.assertEqual(json.loads(message)["meta"], json.loads(META))
        self.assertTrue(message.endswith(b',"meta":' + META.encode("utf-8") + b"}"), message)

    async def test_publish_without_subscribers_is_delivered(self):
        route = redis_route(self.redis.url, key="tm:nobody", mode="publish")
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())

    async def test_database_number(self):
        route = redis_route(self.redis.url.replace("/0", "/3"), key="tm:list", mode="lpush")
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())
        client = self.redis.client()
        self.addCleanup(client.close)
        client.call("SELECT", 3)
        self.assertEqual(client.call("LLEN", "tm:list"), 1)
        self.assertEqual(self.redis.call("LLEN", "tm:list"), 0)

    async def test_connection_is_reused(self):
        route = redis_route(self.redis.url)
        for attempt in range(1, 6):
            self.assertEqual(await self.publisher.deliver(route, make_job(), attempt), Delivered())
        self.assertEqual(self.redis.call("XLEN", "tm:events"), 5)
        clients = self.redis.call("CLIENT", "LIST").decode().strip().splitlines()
        self.assertEqual(len(clients), 2)  # the publisher's and this check's

    async def test_concurrent_deliveries_share_one_connection(self):
        route = redis_route(self.redis.url)
        outcomes = await defer.gatherResults(
            [self.publisher.deliver(route, make_job(f"j{i}"), 1) for i in range(10)]
        )
        self.assertEqual(outcomes, [Delivered()] * 10)
        self.assertEqual(self.redis.call("XLEN", "tm:events"), 10)
        clients = self.redis.call("CLIENT", "LIST").decode().strip().splitlines()
        self.assertEqual(len(clients), 2)

    async def test_wrong_type_fails(self):
        self.redis.call("SET", "tm:events", "a string")
        outcome = await self.publisher.deliver(redis_route(self.redis.url), make_job(), 1)
        self.assertIsInstance(outcome, Failed)
        self.assertTrue(outcome.error.startswith("redis: WRONGTYPE"), outcome.error)

    async def test_nothing_listening_is_retried(self):
        route = redis_route(f"redis://127.0.0.1:{free_port()}/0", timeout_ms=500)
        outcome = await self.publisher.deliver(route, make_job(), 1)
        self.assertIsInstance(outcome, RetryLater)
        self.assertTrue(outcome.error.startswith("redis: connection refused"), outcome.error)

    async def test_stopped_server_is_retried_then_reconnected(self):
        route = redis_route(self.redis.url, timeout_ms=500)
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())
        self.redis.stop()
        outcome = await self.publisher.deliver(route, make_job(), 2)
        self.assertIsInstance(outcome, RetryLater)

    async def test_stuck_server_is_retried_within_timeout_then_reconnected(self):
        route = redis_route(self.redis.url, timeout_ms=300)
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())
        self.redis.pause()
        try:
            outcome = await self.publisher.deliver(route, make_job(), 2)
        finally:
            self.redis.resume()
        self.assertEqual(outcome, RetryLater("redis: no answer within 300 ms"))
        self.assertEqual(await self.publisher.deliver(route, make_job(), 3), Delivered())
        # The timed-out XADD may still run when the server wakes up: RetryLater means
        # "did not happen, or may not have", hence the attempt field for consumers.
        self.assertIn(self.redis.call("XLEN", "tm:events"), (2, 3))

    async def test_bad_url_fails(self):
        # A route stored before URLs were checked this strictly: it replays, then fails.
        route = from_record(
            Route, "r2", "redis", redis_url=self.redis.url.replace("/0", "/zero"), key="k"
        )
        outcome = await self.publisher.deliver(route, make_job(), 1)
        self.assertIsInstance(outcome, Failed)
        self.assertTrue(outcome.error.startswith("bad redis_url"), outcome.error)


class RedisPasswordTests(PublisherTestCase):
    def setUp(self):
        self.redis = RedisServer(["--requirepass", "s3cret"])
        self.redis.start()
        self.addCleanup(self.redis.stop)
        super().setUp()

    def url(self, password: str) -> str:
        return f"redis://:{password}@127.0.0.1:{self.redis.port}/0"

    async def test_password(self):
        route = redis_route(self.url("s3cret"), key="tm:list", mode="lpush")
        self.assertEqual(await self.publisher.deliver(route, make_job(), 1), Delivered())
        client = self.redis.client()
        self.addCleanup(client.close)
        client.call("AUTH", "s3cret")
        self.assertEqual(client.call("LLEN", "tm:list"), 1)

    async def test_wrong_password_fails(self):
        route = redis_route(self.url("wrong"), timeout_ms=2000)
        outcome = await self.publisher.deliver(route, make_job(), 1)
        self.assertIsInstance(outcome, Failed)
        self.assertIn("auth", outcome.error)
