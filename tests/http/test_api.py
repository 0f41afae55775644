"""The REST API over real HTTP, against a real one-node `Node` (API.md).

Every error case checks the status, the code, that ``error`` is a message for humans,
and that nothing was stored.
"""

from __future__ import annotations

import calendar
import json
import os

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import defer, reactor, task
from twisted.trial import unittest
from twisted.web.client import UNKNOWN_LENGTH, Agent, HTTPConnectionPool
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from tests.support import fill_disk_under, free_port, node_url, start_local_node
from timemachine.cluster.ring import shard_of
from timemachine.domain.errors import StorageError
from timemachine.domain.jobs import MAX_META_BYTES
from timemachine.http.limits import MAX_BATCH, MAX_BODY_BYTES

HOUR_MS = 3600 * 1000
SHARDS = 4


def now_ms() -> int:
    return int(reactor.seconds() * 1000)


@implementer(IBodyProducer)
class ChunkedBody:
    """A request body of unknown length, so the client sends it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes, chunk: int = 64 * 1024):
        self._data = data
        self._chunk = chunk

    def startProducing(self, consumer):
        for start in range(0, len(self._data), self._chunk):
            consumer.write(self._data[start : start + self._chunk])
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class Answer:
    """One HTTP answer: status, headers and the body (decoded when JSON)."""

    def __init__(self, status, headers, raw):
        self.status = status
        self.headers = headers
        self.raw = raw
        content_type = headers.getRawHeaders(b"content-type", [b""])[0]
        self.body = json.loads(raw) if content_type == b"application/json" else None

    def __repr__(self):
        return f"<Answer {self.status} {self.raw[:300]!r}>"


class APITestCase(unittest.TestCase):
    """A started node listening on 127.0.0.1, and a client for it."""

    @defer.inlineCallbacks
    def setUp(self):
        self.node = yield start_local_node(reactor, self.mktemp(), shards=SHARDS)
        self.base = node_url(self.node)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    @defer.inlineCallbacks
    def tearDown(self):
        yield self.pool.closeCachedConnections()
        yield self.node.stopService()
        # The server side of a closed connection goes away one reactor turn later.
        yield task.deferLater(reactor, 0, lambda: None)

    # -- helpers

    @defer.inlineCallbacks
    def call(self, method, path, body=None, data=None, headers=None):
        """Send a request; ``body`` is sent as JSON, ``data`` as given."""
        if body is not None:
            data = json.dumps(body).encode("utf-8")
        response = yield self.http.request(method, self.base + path, data=data, headers=headers)
        raw = yield response.content()
        return Answer(response.code, response.headers, raw)

    @defer.inlineCallbacks
    def ok(self, method, path, body=None, **kwargs):
        """A call that must answer 200 with JSON; returns the JSON body."""
        answer = yield self.call(method, path, body, **kwargs)
        self.assertEqual(answer.status, 200, answer)
        self.assertIsNotNone(answer.body, "a JSON response needs Content-Type: application/json")
        return answer.body

    @defer.inlineCallbacks
    def error(self, method, path, body=None, status=400, code="E_INVALID", names=None, **kwargs):
        """A call that must fail with ``status`` and ``code``; returns the message.

        ``names``: a word the message must contain (the field at fault).
        """
        answer = yield self.call(method, path, body, **kwargs)
        self.assertEqual(answer.status, status, answer)
        self.assertIsNotNone(answer.body, "an error needs Content-Type: application/json")
        self.assertEqual(answer.body["code"], code, answer)
        message = answer.body["error"]
        self.assertIsInstance(message, str)
        self.assertTrue(message.strip(), "the error message is empty")
        if names is not None:
            self.assertIn(names, message)
        return message

    def create_route(self, route_id="billing", **fields):
        body = {"id": route_id, "type": "http", "webhook_url": "http://127.0.0.1:9/hook"}
        body.update(fields)
        return self.ok("POST", "/route", body)

    def job(self, job_id, **fields):
        body = {"id": job_id, "trigger_ms": now_ms() + HOUR_MS, "meta": {"n": 1}}
        body["route"] = "billing"
        body.update(fields)
        return body

    @defer.inlineCallbacks
    def assert_no_job(self, collection, job_id):
        yield self.error("GET", f"/job/{collection}/{job_id}", status=404, code="E_NOT_FOUND")

    @defer.inlineCallbacks
    def list_ids(self, collection, query=""):
        """Ids of every job of ``collection``, following the cursor."""
        ids = []
        cursor = None
        while True:
            path = f"/job/{collection}?limit=1000{query}"
            if cursor is not None:
                path += f"&cursor={cursor}"
            page = yield self.ok("GET", path)
            ids.extend(job["id"] for job in page["jobs"])
            cursor = page["next_cursor"]
            if cursor is None:
                return ids


class HealthTests(APITestCase):
    """/health, /ready, /metrics, and the error handling every path shares."""

    @defer.inlineCallbacks
    def test_health(self):
        body = yield self.ok("GET", "/health")
        self.assertEqual(body, {"status": "ok"})

    @defer.inlineCallbacks
    def test_ready(self):
        body = yield self.ok("GET", "/ready")
        self.assertEqual(body["status"], "ok")

    @defer.inlineCallbacks
    def test_not_ready_while_a_shard_is_down(self):
        log, _ = self.node.shard_logs[0]
        yield log.close()
        yield self.error("GET", "/ready", status=503, code="E_UNAVAILABLE")

    @defer.inlineCallbacks
    def test_unknown_path(self):
        yield self.error("GET", "/nowhere", status=404, code="E_NOT_FOUND")
        yield self.error("GET", "/job", status=404, code="E_NOT_FOUND")

    @defer.inlineCallbacks
    def test_wrong_method(self):
        yield self.error("DELETE", "/health", status=405, code="E_METHOD_NOT_ALLOWED")
        answer = yield self.call("PATCH", "/job/orders/a")
        self.assertEqual(answer.status, 405)
        self.assertEqual(answer.body["code"], "E_METHOD_NOT_ALLOWED")
        allowed = answer.headers.getRawHeaders(b"allow")[0]
        self.assertIn(b"PUT", allowed)
        self.assertIn(b"DELETE", allowed)

    @defer.inlineCallbacks
    def test_metrics(self):
        yield self.create_route()
        yield self.ok("POST", "/job/orders", self.job("a"))
        answer = yield self.call("GET", "/metrics")
        self.assertEqual(answer.status, 200)
        content_type = answer.headers.getRawHeaders(b"content-type")[0]
        self.assertTrue(content_type.startswith(b"text/plain; version=0.0.4"), content_type)
        self.assertIn(b"timemachine_jobs_created", answer.raw)
        self.assertIn(b"timemachine_jobs_created_total 1.0", answer.raw)
        # The route and the job; the GET being answered is not counted yet.
        self.assertIn(b'timemachine_http_requests_total{code="200",method="POST"} 2.0', answer.raw)

    @defer.inlineCallbacks
    def test_unexpected_error_is_500_and_logged(self):
        def broken(collection, job_id):
            raise RuntimeError("a bug")

        self.patch(self.node.coordinator, "get_job", broken)
        message = yield self.error("GET", "/job/orders/a", status=500, code="E_INTERNAL")
        self.assertNotIn("a bug", message)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @defer.inlineCallbacks
    def test_storage_failure_is_503(self):
        yield self.create_route()
        job_id = next(f"j{i}" for i in range(100) if shard_of(f"j{i}", SHARDS) == 0)
        yield self.ok("POST", "/job/orders", self.job(job_id))
        # The shard's database goes away under the node: a local storage failure.
        _, store = self.node.shard_logs[0]
        yield store.close()
        message = yield self.error("GET", f"/job/orders/{job_id}", status=503, code="E_UNAVAILABLE")
        self.assertEqual(message, "storage failure")
        self.flushLoggedErrors()


class RouteTests(APITestCase):
    """Routes: create, read, list, replace, delete; and bad route bodies."""

    @defer.inlineCallbacks
    def test_crud(self):
        created = yield self.create_route("billing", timeout_ms=2000)
        self.assertEqual(created["status"], "ok")
        self.assertIsInstance(created["offset"], int)

        route = yield self.ok("GET", "/route/billing")
        self.assertEqual(
            route,
            {
                "id": "billing",
                "type": "http",
                "webhook_url": "http://127.0.0.1:9/hook",
                "timeout_ms": 2000,
                "max_attempts": 10,
                "backoff_ms": 500,
                "max_in_flight": 64,
            },
        )

        yield self.ok(
            "PUT",
            "/route/billing",
            {"type": "http", "webhook_url": "https://example.com/cb", "max_attempts": 3},
        )
        route = yield self.ok("GET", "/route/billing")
        self.assertEqual(route["webhook_url"], "https://example.com/cb")
        self.assertEqual(route["max_attempts"], 3)
        self.assertEqual(route["timeout_ms"], 5000)  # a PUT replaces the whole route

        yield self.create_route("audit")
        listing = yield self.ok("GET", "/route")
        self.assertEqual([r["id"] for r in listing["routes"]], ["audit", "billing"])

        deleted = yield self.ok("DELETE", "/route/billing")
        self.assertEqual(deleted["status"], "ok")
        self.assertGreater(deleted["offset"], created["offset"])
        yield self.error("GET", "/route/billing", status=404, code="E_NOT_FOUND")
        yield self.error("DELETE", "/route/billing", status=404, code="E_NOT_FOUND")
        listing = yield self.ok("GET", "/route")
        self.assertEqual([r["id"] for r in listing["routes"]], ["audit"])

    @defer.inlineCallbacks
    def test_trailing_slash_and_rest_alias(self):
        yield self.ok(
            "POST",
            "/route/",
            {"id": "hook", "type": "REST", "webhook_url": "http://127.0.0.1:9/x"},
        )
        route = yield self.ok("GET", "/route/hook")
        self.assertEqual(route["type"], "http")
        yield self.ok(
            "POST",
            "/route",
            {"id": "hook2", "type": "Rest", "webhook_url": "http://127.0.0.1:9/x"},
        )
        route = yield self.ok("GET", "/route/hook2")
        self.assertEqual(route["type"], "http")

    @defer.inlineCallbacks
    def test_redis_route_defaults(self):
        yield self.ok(
            "POST",
            "/route",
            {
                "id": "events",
                "type": "Redis",
                "redis_url": "redis://127.0.0.1:6379/0",
                "key": "tm:events",
            },
        )
        route = yield self.ok("GET", "/route/events")
        self.assertEqual(route["type"], "redis")
        self.assertEqual(route["mode"], "xadd")
        self.assertEqual(route["key"], "tm:events")
        self.assertEqual(route["max_attempts"], 10)

    @defer.inlineCallbacks
    def test_invalid_routes_change_nothing(self):
        yield self.create_route("keep")
        cases = [
            ({"id": "r", "type": "ftp", "webhook_url": "http://x/"}, "type"),
            ({"id": "r", "webhook_url": "http://x/"}, "type"),
            ({"id": "r", "type": "http", "webhook_url": "ftp://x/"}, "webhook_url"),
            ({"id": "r", "type": "http"}, "webhook_url"),
            ({"id": "r", "type": "redis", "redis_url": "http://x"}, "redis_url"),
            ({"id": "r", "type": "http", "webhook_url": "http://x:99999/"}, "webhook_url"),
            ({"id": "r", "type": "http", "webhook_url": "http://x:0/"}, "webhook_url"),
            ({"id": "r", "type": "http", "webhook_url": "http://x/\x00"}, "webhook_url"),
            ({"id": "r", "type": "http", "webhook_url": "http://x/a\nb"}, "webhook_url"),
            (
                {"id": "r", "type": "redis", "redis_url": "redis://h:1/zero", "key": "k"},
                "redis_url",
            ),
            (
                {"id": "r", "type": "redis", "redis_url": "redis://h:65536/0", "key": "k"},
                "redis_url",
            ),
            ({"id": "r", "type": "redis", "redis_url": "redis://h:1/0"}, "key"),
            (
                {
                    "id": "r",
                    "type": "redis",
                    "redis_url": "redis://h:1/0",
                    "key": "k",
                    "mode": "push",
                },
                "mode",
            ),
            (
                {"id": "r", "type": "http", "webhook_url": "http://x/", "timeout_ms": "5"},
                "timeout_ms",
            ),
            (
                {"id": "r", "type": "http", "webhook_url": "http://x/", "max_attempts": 0},
                "max_attempts",
            ),
            ({"id": "bad id", "type": "http", "webhook_url": "http://x/"}, "id"),
            ({"type": "http", "webhook_url": "http://x/"}, "id"),
        ]
        for body, field in cases:
            yield self.error("POST", "/route", body, code="E_INVALID", names=field)
        yield self.error("POST", "/route", data=b"[1, 2]", code="E_INVALID")
        yield self.error("POST", "/route", data=b"{nope", code="E_BAD_JSON")
        yield self.error(
            "PUT",
            "/route/keep",
            {"id": "other", "type": "http", "webhook_url": "http://x/"},
            code="E_INVALID",
            names="id",
        )
        listing = yield self.ok("GET", "/route")
        self.assertEqual(listing["routes"], [(yield self.ok("GET", "/route/keep"))])
        self.assertEqual(listing["routes"][0]["webhook_url"], "http://127.0.0.1:9/hook")

    @defer.inlineCallbacks
    def test_unknown_route(self):
        yield self.error("GET", "/route/nope", status=404, code="E_NOT_FOUND")
        yield self.error("DELETE", "/route/nope", status=404, code="E_NOT_FOUND")


class JobTests(APITestCase):
    """One job at a time: create, read, reschedule, delete, and every bad input."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.create_route()

    @defer.inlineCallbacks
    def test_create_and_get(self):
        trigger = now_ms() + HOUR_MS
        created = yield self.ok(
            "POST",
            "/job/orders",
            {
                "id": "pay-123",
                "trigger_ms": trigger,
                "meta": {"order": 123, "name": "café ☕"},
                "route": "billing",
                "unknown_field": True,
            },
        )
        self.assertEqual(created["status"], "ok")
        job = yield self.ok("GET", "/job/orders/pay-123")
        self.assertEqual(job["id"], "pay-123")
        self.assertEqual(job["collection"], "orders")
        self.assertEqual(job["trigger_ms"], trigger)
        self.assertEqual(job["meta"], {"order": 123, "name": "café ☕"})
        self.assertEqual(job["route"], "billing")
        self.assertEqual(job["status"], "scheduled")
        self.assertEqual(job["version"], created["offset"])
        self.assertEqual(job["attempts"], 0)
        self.assertIsNone(job["fired_at_ms"])
        self.assertIsNone(job["last_error"])
        self.assertNotIn("unknown_field", job)

    @defer.inlineCallbacks
    def test_meta_defaults_to_null_and_keeps_any_json_value(self):
        body = self.job("a")
        del body["meta"]
        yield self.ok("POST", "/job/orders", body)
        job = yield self.ok("GET", "/job/orders/a")
        self.assertIsNone(job["meta"])
        for meta in ["text", 12, [1, {"x": None}], True]:
            yield self.ok("POST", "/job/orders", self.job("b", meta=meta))
            job = yield self.ok("GET", "/job/orders/b")
            self.assertEqual(job["meta"], meta)

    @defer.inlineCallbacks
    def test_meta_is_stored_and_shown_as_the_clients_text(self):
        meta = '{"z": 1.0e2, "a": [0.10, -0, 1E3], "e": "caf\\u00e9 é \\/", "n": null}'
        for job_id, data in [
            ("a", f'{{"id": "a", "trigger_ms": {now_ms() + HOUR_MS}, "route": "billing",'
             f' "meta": {meta}}}'),
            ("b", f'[{{"id": "b", "trigger_ms": {now_ms() + HOUR_MS}, "route": "billing",'
             f' "meta":  {meta} }}]'),
        ]:
            yield self.ok("POST", "/job/orders", data=data.encode("utf-8"))
            _, store = self.node.shard_logs[shard_of(job_id, SHARDS)]
            job = yield store.get("orders", job_id)
            self.assertEqual(job.meta, meta)
            answer = yield self.call("GET", f"/job/orders/{job_id}")
            self.assertIn(f'"meta": {meta}}}'.encode(), answer.raw)
            self.assertEqual(answer.body["meta"]["z"], 100.0)
            page = yield self.call("GET", "/job/orders?limit=10")
            self.assertIn(f'"meta": {meta}}}'.encode(), page.raw)
        put = f'{{"trigger_ms": {now_ms() + HOUR_MS}, "route": "billing", "meta": 0.10}}'
        yield self.ok("PUT", "/job/orders/a", data=put.encode())
        _, store = self.node.shard_logs[shard_of("a", SHARDS)]
        job = yield store.get("orders", "a")
        self.assertEqual(job.meta, "0.10")

    @defer.inlineCallbacks
    def test_meta_size_limit(self):
        # A JSON string of MAX_META_BYTES - 2 characters is MAX_META_BYTES serialized.
        yield self.ok("POST", "/job/orders", self.job("fits", meta="x" * (MAX_META_BYTES - 2)))
        yield self.error(
            "POST",
            "/job/orders",
            self.job("big", meta="x" * (MAX_META_BYTES - 1)),
            code="E_INVALID",
            names="meta",
        )
        yield self.error(
            "POST",
            "/job/orders",
            self.job("big", meta={"k": "x" * (65 * 1024)}),
            code="E_INVALID",
            names="meta",
        )
        yield self.assert_no_job("orders", "big")

    @defer.inlineCallbacks
    def test_put_reschedules(self):
        first = yield self.ok("POST", "/job/orders", self.job("a"))
        later = now_ms() + 2 * HOUR_MS
        replaced = yield self.ok(
            "PUT", "/job/orders/a", {"trigger_ms": later, "meta": "v2", "route": "billing"}
        )
        self.assertGreater(replaced["offset"], first["offset"])
        job = yield self.ok("GET", "/job/orders/a")
        self.assertEqual(job["trigger_ms"], later)
        self.assertEqual(job["meta"], "v2")
        self.assertEqual(job["version"], replaced["offset"])
        self.assertEqual(job["status"], "scheduled")
        # The id may also be given, and must then be the URL's.
        yield self.ok("PUT", "/job/orders/a", self.job("a"))

    @defer.inlineCallbacks
    def test_put_creates(self):
        yield self.ok("PUT", "/job/orders/new", self.job("new"))
        job = yield self.ok("GET", "/job/orders/new")
        self.assertEqual(job["status"], "scheduled")

    @defer.inlineCallbacks
    def test_bad_put_changes_nothing(self):
        yield self.ok("POST", "/job/orders", self.job("a"))
        before = yield self.ok("GET", "/job/orders/a")
        yield self.error("PUT", "/job/orders/a", self.job("b"), code="E_INVALID", names="id")
        yield self.error(
            "PUT", "/job/orders/a", self.job("a", trigger_ms=now_ms() - HOUR_MS), code="E_PAST"
        )
        yield self.error("PUT", "/job/orders/a", self.job("a", route="nope"), code="E_ROUTE")
        yield self.error("PUT", "/job/orders/a", data=b"[]", code="E_INVALID")
        after = yield self.ok("GET", "/job/orders/a")
        self.assertEqual(after, before)
        yield self.assert_no_job("orders", "b")

    @defer.inlineCallbacks
    def test_delete(self):
        created = yield self.ok("POST", "/job/orders", self.job("a"))
        deleted = yield self.ok("DELETE", "/job/orders/a")
        self.assertEqual(deleted["status"], "ok")
        self.assertGreater(deleted["offset"], created["offset"])
        yield self.assert_no_job("orders", "a")
        yield self.error("DELETE", "/job/orders/a", status=404, code="E_NOT_FOUND")
        yield self.error("DELETE", "/job/orders/never", status=404, code="E_NOT_FOUND")

    @defer.inlineCallbacks
    def test_same_id_in_two_collections(self):
        yield self.ok("POST", "/job/orders", self.job("a", meta="orders"))
        yield self.ok("POST", "/job/carts", self.job("a", meta="carts"))
        self.assertEqual((yield self.ok("GET", "/job/orders/a"))["meta"], "orders")
        self.assertEqual((yield self.ok("GET", "/job/carts/a"))["meta"], "carts")

    @defer.inlineCallbacks
    def test_trigger_time_formats(self):
        base = calendar.timegm((2099, 1, 1, 0, 0, 0)) * 1000
        cases = [
            ("2099-01-01T00:00:00.123Z", base + 123),
            ("2099-01-01T00:00:00Z", base),
            ("2099-01-01t00:00:00.5z", base + 500),
            ("2099-01-01T02:00:00.123456+02:00", base + 123),
            ("2098-12-31T19:30:00-04:30", base),
            (base + 7, base + 7),
        ]
        for value, expected in cases:
            yield self.ok(
                "POST",
                "/job/orders",
                {"id": "t", "trigger_time": value, "route": "billing"},
            )
            job = yield self.ok("GET", "/job/orders/t")
            self.assertEqual(job["trigger_ms"], expected, value)

    @defer.inlineCallbacks
    def test_bad_trigger_times(self):
        cases = [
            ({"trigger_time": "2099-01-01T00:00:00"}, "trigger_time"),  # no offset
            ({"trigger_time": "2099-13-01T00:00:00Z"}, "trigger_time"),
            ({"trigger_time": "2099-01-01T00:00:00+24:00"}, "trigger_time"),
            ({"trigger_time": "tomorrow"}, "trigger_time"),
            ({"trigger_time": 1.5}, "trigger_time"),
            ({"trigger_time": True}, "trigger_time"),
            ({"trigger_ms": "soon"}, "trigger_ms"),
            ({"trigger_ms": str(now_ms() + HOUR_MS)}, "trigger_ms"),
            ({"trigger_ms": float(now_ms() + HOUR_MS)}, "trigger_ms"),
            ({"trigger_ms": None}, "trigger_ms"),
            ({"trigger_ms": -1}, "trigger_ms"),
            ({}, "trigger_ms"),
            ({"trigger_ms": now_ms() + HOUR_MS, "trigger_time": now_ms() + HOUR_MS}, "trigger_ms"),
        ]
        for fields, name in cases:
            body = {"id": "t", "route": "billing", **fields}
            yield self.error("POST", "/job/orders", body, code="E_INVALID", names=name)
        yield self.assert_no_job("orders", "t")

    @defer.inlineCallbacks
    def test_trigger_in_the_past(self):
        message = yield self.error(
            "POST", "/job/orders", self.job("old", trigger_ms=now_ms() - 60_000), code="E_PAST"
        )
        self.assertIn("past", message)
        yield self.assert_no_job("orders", "old")
        # A trigger just passed is no mistake: the job fires now.
        yield self.ok("POST", "/job/orders", self.job("recent", trigger_ms=now_ms() - 1000))

    @defer.inlineCallbacks
    def test_unknown_route(self):
        message = yield self.error(
            "POST", "/job/orders", self.job("a", route="nope"), code="E_ROUTE"
        )
        self.assertIn("nope", message)
        yield self.assert_no_job("orders", "a")

    @defer.inlineCallbacks
    def test_malformed_json(self):
        for data in [
            b'{"id": "a",',
            b"",
            b"   ",
            b"{'id': 'a'}",
            b'{"id": "a", "meta": NaN}',
            b'{"id": "a", "trigger_ms": 1, "route": "billing", "meta": 1e400}',
            b'{"id": "a", "trigger_ms": 1e400, "route": "billing"}',
            b'{"id": "a", "trigger_ms": 1, "route": "billing", "meta": [-Infinity]}',
            b'[{"id": "a", "trigger_ms": 1, "route": "billing", "meta": {"x": 1E999}}]',
            b'{"id": "a", "trigger_ms": 1, "route": "billing", "meta": ' + b"7" * 5000 + b"}",
            b'{"id": "a", "trigger_ms": ' + b"7" * 5000 + b', "route": "billing"}',
            b"\xff\xfe{}",
            b'{"id": "a", "meta": "\\ud800"}',
        ]:
            yield self.error("POST", "/job/orders", data=data, code="E_BAD_JSON")
            yield self.error("PUT", "/job/orders/a", data=data, code="E_BAD_JSON")
        yield self.error(
            "POST",
            "/route",
            data=b'{"id": "r", "type": "http", "webhook_url": "http://x/", "timeout_ms": 1e400}',
            code="E_BAD_JSON",
        )
        yield self.error("POST", "/cluster/configure", data=b'{"shards": 1e999}', code="E_BAD_JSON")
        yield self.assert_no_job("orders", "a")
        self.assertEqual((yield self.list_ids("orders")), [])

    @defer.inlineCallbacks
    def test_body_must_be_object_or_array(self):
        for data in [b'"a"', b"42", b"null", b"true"]:
            yield self.error("POST", "/job/orders", data=data, code="E_INVALID", names="body")
        self.assertEqual((yield self.list_ids("orders")), [])

    @defer.inlineCallbacks
    def test_bad_ids(self):
        cases = [
            (self.job(None), "id"),
            (self.job(""), "id"),
            (self.job("bad id!"), "id"),
            (self.job("a/b"), "id"),
            (self.job("x" * 257), "id"),
            (self.job(7), "id"),
        ]
        body = self.job("a")
        del body["id"]
        cases.append((body, "id"))
        body = self.job("a")
        del body["route"]
        cases.append((body, "route"))
        for body, name in cases:
            yield self.error("POST", "/job/orders", body, code="E_INVALID", names=name)
        self.assertEqual((yield self.list_ids("orders")), [])
        # The longest id is fine.
        yield self.ok("POST", "/job/orders", self.job("x" * 256))

    @defer.inlineCallbacks
    def test_bad_collection(self):
        yield self.error(
            "POST", "/job/bad%20name", self.job("a"), code="E_INVALID", names="collection"
        )
        yield self.error("POST", "/job/" + "c" * 129, self.job("a"), names="collection")
        yield self.error("GET", "/job/bad%20name/a", names="collection")

    @defer.inlineCallbacks
    def test_body_too_large(self):
        # Valid JSON, so only its size is at fault.
        padding = b" " * (MAX_BODY_BYTES + 1 - len(json.dumps(self.job("big")).encode()))
        data = json.dumps(self.job("big")).encode() + padding
        self.assertEqual(len(data), MAX_BODY_BYTES + 1)
        yield self.error("POST", "/job/orders", data=data, status=413, code="E_TOO_LARGE")
        yield self.assert_no_job("orders", "big")
        # The same without a Content-Length: a chunked body is counted as it arrives.
        yield self.error(
            "POST", "/job/orders", data=ChunkedBody(data * 3), status=413, code="E_TOO_LARGE"
        )
        yield self.assert_no_job("orders", "big")
        # A body of exactly the limit is taken, either way.
        yield self.ok("POST", "/job/orders", data=data[:-1])
        yield self.ok("POST", "/job/orders", data=ChunkedBody(data[:-1]))
        yield self.ok("GET", "/job/orders/big")

    def test_body_too_large_without_the_limited_request(self):
        # Served by `resource()` alone (no `make_site`), the API still counts the body.
        stub = StubTreq(self.node.api.resource())
        d = stub.post("http://node/job/orders", data=b" " * (MAX_BODY_BYTES + 1))
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 413)
        body = self.successResultOf(stub.json_content(response))
        self.assertEqual(body["code"], "E_TOO_LARGE")

    @defer.inlineCallbacks
    def test_unknown_job(self):
        yield self.assert_no_job("orders", "nope")


class BatchTests(APITestCase):
    """Arrays of jobs: each item stands alone."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.create_route()

    @defer.inlineCallbacks
    def test_mixed_batch(self):
        items = [
            self.job("ok-1"),
            self.job("bad id"),
            self.job("past", trigger_ms=now_ms() - HOUR_MS),
            self.job("no-route", route="nope"),
            "not an object",
            self.job("ok-2"),
            self.job("float", trigger_ms=1.5e12),
            self.job("big-meta", meta="x" * MAX_META_BYTES),
            {"id": "ok-3", "trigger_time": "2099-01-01T00:00:00Z", "route": "billing"},
        ]
        body = yield self.ok("POST", "/job/orders", items)
        self.assertEqual(body["status"], "ok")
        results = body["results"]
        self.assertEqual(
            [(r["id"], r["status"], r.get("code")) for r in results],
            [
                ("ok-1", "ok", None),
                ("bad id", "error", "E_INVALID"),
                ("past", "error", "E_PAST"),
                ("no-route", "error", "E_ROUTE"),
                (None, "error", "E_INVALID"),
                ("ok-2", "ok", None),
                ("float", "error", "E_INVALID"),
                ("big-meta", "error", "E_INVALID"),
                ("ok-3", "ok", None),
            ],
        )
        for result in results:
            if result["status"] == "error":
                self.assertTrue(result["error"].strip())
        self.assertIn("trigger_ms", results[6]["error"])
        self.assertIn("meta", results[7]["error"])
        for job_id in ["ok-1", "ok-2", "ok-3"]:
            job = yield self.ok("GET", f"/job/orders/{job_id}")
            self.assertEqual(job["status"], "scheduled")
        for job_id in ["past", "no-route", "float", "big-meta"]:
            yield self.assert_no_job("orders", job_id)
        self.assertEqual((yield self.list_ids("orders")), ["ok-1", "ok-2", "ok-3"])

    @defer.inlineCallbacks
    def test_all_invalid_batch_stores_nothing(self):
        body = yield self.ok("POST", "/job/orders", [self.job("a", route="nope"), {}])
        self.assertEqual([r["status"] for r in body["results"]], ["error", "error"])
        self.assertEqual((yield self.list_ids("orders")), [])

    @defer.inlineCallbacks
    def test_batch_size_limits(self):
        yield self.error("POST", "/job/orders", [], code="E_INVALID", names="batch")
        yield self.error(
            "POST", "/job/orders", [{}] * (MAX_BATCH + 1), code="E_INVALID", names="batch"
        )

    @defer.inlineCallbacks
    def test_batch_over_all_shards(self):
        items = [self.job(f"job-{i:03d}") for i in range(200)]
        body = yield self.ok("POST", "/job/orders", items)
        self.assertTrue(all(r["status"] == "ok" for r in body["results"]))
        self.assertEqual(len({shard_of(item["id"], SHARDS) for item in items}), SHARDS)
        self.assertEqual(len((yield self.list_ids("orders"))), 200)

    @defer.inlineCallbacks
    def test_a_shard_that_fails_answers_for_its_own_items_only(self):
        in_shard_0 = [f"job-{i}" for i in range(100) if shard_of(f"job-{i}", SHARDS) == 0]
        yield self.ok("POST", "/job/orders", self.job(in_shard_0[0]))
        # Shard 0's disk fills up: its store fails the write, the other shards' do not.
        fill_disk_under(os.path.join(self.node.data_dir, "shards", "0", "jobs.sqlite-wal"))
        items = [self.job(f"job-{i}") for i in range(40)]
        body = yield self.ok("POST", "/job/orders", items)
        self.flushLoggedErrors(OSError, StorageError)
        outcomes = {r["id"]: (r["status"], r.get("code")) for r in body["results"]}
        self.assertEqual(list(outcomes), [item["id"] for item in items])
        for job_id, outcome in outcomes.items():
            if job_id in in_shard_0:
                self.assertEqual(outcome, ("error", "E_UNAVAILABLE"), job_id)
            else:
                self.assertEqual(outcome, ("ok", None), job_id)
                yield self.ok("GET", f"/job/orders/{job_id}")
        self.assertIn(("error", "E_UNAVAILABLE"), outcomes.values())
        self.assertIn(("ok", None), outcomes.values())


class ListTests(APITestCase):
    """Listing a collection: paging across shards, status filter, dead letters."""

    @defer.inlineCallbacks
    def setUp(self):
        yield super().setUp()
        yield self.create_route()

    @defer.inlineCallbacks
    def test_paging_across_shards(self):
        ids = [f"job-{i:02d}" for i in range(25)]
        yield self.ok("POST", "/job/orders", [self.job(job_id) for job_id in ids])
        yield self.ok("POST", "/job/other", [self.job("zzz")])
        self.assertGreater(len({shard_of(job_id, SHARDS) for job_id in ids}), 1)

        seen = []
        cursor = None
        pages = 0
        while True:
            path = "/job/orders?limit=7" + (f"&cursor={cursor}" if cursor else "")
            page = yield self.ok("GET", path)
            pages += 1
            self.assertLessEqual(len(page["jobs"]), 7)
            seen.extend(job["id"] for job in page["jobs"])
            for job in page["jobs"]:
                self.assertEqual(job["collection"], "orders")
                self.assertEqual(job["meta"], {"n": 1})
            cursor = page["next_cursor"]
            if cursor is None:
                break
        self.assertEqual(seen, ids)
        self.assertEqual(pages, 4)

    @defer.inlineCallbacks
    def test_status_filter(self):
        yield self.ok("POST", "/job/orders", [self.job(f"j{i}") for i in range(5)])
        self.assertEqual(len((yield self.list_ids("orders", "&status=scheduled"))), 5)
        self.assertEqual((yield self.list_ids("orders", "&status=failed")), [])
        self.assertEqual((yield self.list_ids("orders", "&status=fired")), [])
        default = yield self.ok("GET", "/job/orders")
        self.assertEqual(len(default["jobs"]), 5)
        self.assertIsNone(default["next_cursor"])
        empty_params = yield self.ok("GET", "/job/orders?status=&limit=&cursor=")
        self.assertEqual(empty_params, default)

    @defer.inlineCallbacks
    def test_dead_letters(self):
        # Nothing listens on this port: the one attempt fails and the job is kept.
        url = f"http://127.0.0.1:{free_port()}/hook"
        yield self.create_route("dead", webhook_url=url, max_attempts=1, timeout_ms=2000)
        yield self.ok("POST", "/job/orders", self.job("doomed", route="dead", trigger_ms=now_ms()))
        yield self.ok("POST", "/job/orders", self.job("waiting"))
        for _ in range(200):
            job = yield self.ok("GET", "/job/orders/doomed")
            if job["status"] == "failed":
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(job["status"], "failed")
        self.assertTrue(job["last_error"])
        self.assertEqual((yield self.list_ids("orders", "&status=failed")), ["doomed"])
        self.assertEqual((yield self.list_ids("orders", "&status=scheduled")), ["waiting"])

    @defer.inlineCallbacks
    def test_bad_queries(self):
        for query, name in [
            ("status=firing", "status"),
            ("status=nope", "status"),
            ("limit=0", "limit"),
            ("limit=1001", "limit"),
            ("limit=abc", "limit"),
            ("limit=-5", "limit"),
            ("cursor=bad%20cursor", "cursor"),
        ]:
            yield self.error("GET", f"/job/orders?{query}", code="E_INVALID", names=name)
        page = yield self.ok("GET", "/job/orders?limit=1000")
        self.assertEqual(page, {"jobs": [], "next_cursor": None})


class ClusterTests(APITestCase):
    """The cluster endpoints of a one-node cluster."""

    @defer.inlineCallbacks
    def test_cluster(self):
        before = yield self.ok("GET", "/cluster")
        self.assertEqual(before["node_id"], "node1")
        self.assertEqual(before["state"], "Leader")
        self.assertGreaterEqual(before["term"], 1)
        # The leader's peer address, as upstream's CLI expects.
        self.assertEqual(before["leader"], self.node.network.advertise)
        self.assertEqual(before["num_peers"], "0")
        self.assertEqual(before["last_log_index"], str(before["commit_index"]))
        self.assertEqual(before["shards"], SHARDS)
        self.assertGreaterEqual(before["applied_index"], 1)  # the bootstrap config
        self.assertGreaterEqual(before["commit_index"], before["applied_index"])
        yield self.create_route()
        after = yield self.ok("GET", "/cluster")
        self.assertEqual(after["applied_index"], before["applied_index"] + 1)

    @defer.inlineCallbacks
    def test_servers(self):
        body = yield self.ok("GET", "/cluster/servers")
        peer = self.node.network.advertise
        self.assertEqual(
            body,
            {
                "servers": [
                    {
                        "ID": "node1",
                        "Address": peer,
                        "Suffrage": "Voter",
                        "http_address": self.base[len("http://") :],
                        "leaving": False,
                    },
                ],
                "leader": peer,
            },
        )

    @defer.inlineCallbacks
    def test_shards(self):
        yield self.create_route()
        yield self.ok("POST", "/job/orders", [self.job(f"j{i}") for i in range(40)])
        body = yield self.ok("GET", "/cluster/shards")
        shards = body["shards"]
        self.assertEqual([s["shard"] for s in shards], list(range(SHARDS)))
        for s in shards:
            self.assertEqual(s["replicas"], ["node1"])
            self.assertEqual(s["leader"], "node1")
            self.assertGreaterEqual(s["applied_index"], 1 if s["jobs"] else 0)
        self.assertEqual(sum(s["jobs"] for s in shards), 40)
        for shard in range(SHARDS):
            expected = sum(1 for i in range(40) if shard_of(f"j{i}", SHARDS) == shard)
            self.assertEqual(shards[shard]["jobs"], expected)

    @defer.inlineCallbacks
    def test_configure_refuses_more_replicas_than_members(self):
        yield self.error(
            "POST",
            "/cluster/configure",
            {"shards": SHARDS, "replicas": 2},
            code="E_INVALID",
            names="replicas",
        )
        for body, name in [
            ({"shards": "8", "replicas": 1}, "shards"),
            ({"shards": 0, "replicas": 1}, "shards"),
            ({"shards": 8, "replicas": 0}, "replicas"),
        ]:
            yield self.error("POST", "/cluster/configure", body, code="E_INVALID", names=name)
        yield self.error("POST", "/cluster/configure", data=b"[]", code="E_INVALID")
        cluster = yield self.ok("GET", "/cluster")
        self.assertEqual(cluster["shards"], SHARDS)
        self.assertEqual(len((yield self.ok("GET", "/cluster/shards"))["shards"]), SHARDS)
        yield self.ok("GET", "/ready")

    @defer.inlineCallbacks
    def test_configure_with_jobs_stored(self):
        yield self.create_route()
        yield self.ok("POST", "/job/orders", self.job("a"))
        yield self.error(
            "POST", "/cluster/configure", {"shards": 8, "replicas": 1}, code="E_CONFIGURED"
        )
        self.assertEqual((yield self.ok("GET", "/cluster"))["shards"], SHARDS)
        yield self.ok("GET", "/job/orders/a")
        # The same shard count is no change and is accepted.
        body = yield self.ok("POST", "/cluster/configure", {"shards": SHARDS, "replicas": 1})
        self.assertEqual(body["shards"], SHARDS)

    @defer.inlineCallbacks
    def test_configure_without_jobs(self):
        yield self.create_route()
        yield self.ok("POST", "/job/orders", self.job("a"))
        yield self.ok("DELETE", "/job/orders/a")
        body = yield self.ok("POST", "/cluster/configure", {"shards": 8, "replicas": 1})
        self.assertEqual((body["shards"], body["replicas"]), (8, 1))
        self.assertEqual((yield self.ok("GET", "/cluster"))["shards"], 8)
        shards = (yield self.ok("GET", "/cluster/shards"))["shards"]
        self.assertEqual(len(shards), 8)
        yield self.ok("GET", "/ready")
        # Routes live in the meta group and survive; jobs land on the new shards.
        yield self.ok("POST", "/job/orders", [self.job(f"j{i}") for i in range(20)])
        shards = (yield self.ok("GET", "/cluster/shards"))["shards"]
        self.assertEqual(sum(s["jobs"] for s in shards), 20)
        # Fields left out keep their value.
        body = yield self.ok("POST", "/cluster/configure", {"replicas": 1})
        self.assertEqual(body["shards"], 8)

    @defer.inlineCallbacks
    def test_membership_calls_check_their_body_and_their_node(self):
        yield self.error(
            "POST", "/cluster/join", {"node_id": "node1", "raft_address": "127.0.0.1:8101"},
            names="node_id",
        )
        yield self.error(
            "POST", "/cluster/remove", {"node_id": "node9"}, status=404, code="E_NOT_FOUND"
        )
        yield self.error("POST", "/cluster/remove", {"node_id": "node1"}, names="node_id")
        # The body is checked first.
        yield self.error(
            "POST", "/cluster/join", {"raft_address": "127.0.0.1:8102"}, names="node_id"
        )
        yield self.error("POST", "/cluster/join", {"node_id": "node2"}, names="raft_address")
        yield self.error(
            "POST",
            "/cluster/join",
            {"node_id": "node2", "raft_address": "h:1", "http_address": 5},
            names="http_address",
        )
        yield self.error("POST", "/cluster/remove", {}, names="node_id")
        yield self.error("POST", "/cluster/remove", data=b"{", code="E_BAD_JSON")
        servers = yield self.ok("GET", "/cluster/servers")
        self.assertEqual(len(servers["servers"]), 1)

    @defer.inlineCallbacks
    def test_a_shard_leadership_transfer_checks_the_shard_and_the_voter(self):
        yield self.error(
            "POST", "/cluster/shards/99/leader", {"node_id": "node1"},
            status=404, code="E_NOT_FOUND",
        )
        yield self.error("POST", "/cluster/shards/0/leader", {"node_id": "node2"}, names="node_id")
        yield self.error("POST", "/cluster/shards/0/leader", {}, names="node_id")
        # To the leader itself: nothing to do.
        body = yield self.ok("POST", "/cluster/shards/0/leader", {"node_id": "node1"})
        self.assertEqual(body, {"status": "ok", "shard": 0, "leader": "node1"})
