"""Parsing bodies into domain values, on its own: JSON values in, `JobSpec`/`Route` out."""

from twisted.trial import unittest

from timemachine.domain.errors import InvalidField
from timemachine.domain.names import check_address
from timemachine.http.limits import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT
from timemachine.http.parsing import (
    JOB_RAW_MEMBERS,
    job_spec,
    list_limit,
    parse_rfc3339,
    route_of,
    trigger_of,
)
from timemachine.http.strictjson import decode_json


def body(text: str) -> dict:
    return decode_json(text.encode(), JOB_RAW_MEMBERS)


class JobSpecTests(unittest.TestCase):
    def test_meta_is_the_clients_text_and_absent_meta_is_null(self):
        text = '{"id": "a", "trigger_ms": 5, "route": "r", "meta": {"b":1.0e2}}'
        spec = job_spec("c", body(text))
        self.assertEqual(
            (spec.collection, spec.id, spec.trigger_ms, spec.route), ("c", "a", 5, "r")
        )
        self.assertEqual(spec.meta, '{"b":1.0e2}')
        self.assertEqual(job_spec("c", body('{"id": "a", "trigger_ms": 5, "route": "r"}')).meta,
                         "null")

    def test_the_url_id_fills_in_and_must_match(self):
        self.assertEqual(job_spec("c", body('{"trigger_ms": 5, "route": "r"}'), url_id="x").id, "x")
        with self.assertRaises(InvalidField) as raised:
            job_spec("c", body('{"id": "y", "trigger_ms": 5, "route": "r"}'), url_id="x")
        self.assertEqual(raised.exception.field, "id")

    def test_an_item_that_is_not_an_object(self):
        with self.assertRaises(InvalidField) as raised:
            job_spec("c", [1])
        self.assertEqual(raised.exception.field, "job")


class TriggerTests(unittest.TestCase):
    def test_trigger_ms_or_trigger_time_never_both(self):
        self.assertEqual(trigger_of({"trigger_ms": 7}), 7)
        self.assertEqual(trigger_of({"trigger_time": 7}), 7)
        self.assertEqual(trigger_of({"trigger_time": "1970-01-01T00:00:01.5Z"}), 1500)
        for fields in ({"trigger_ms": 1, "trigger_time": 1}, {}, {"trigger_time": True}):
            self.assertRaises(InvalidField, trigger_of, fields)

    def test_rfc3339_offsets_and_bad_times(self):
        self.assertEqual(parse_rfc3339("1970-01-01T01:00:00+01:00"), 0)
        self.assertEqual(parse_rfc3339("1970-01-01 00:00:00.1239z"), 123)
        for text in ("1970-01-01", "1970-13-01T00:00:00Z", "1970-01-01T00:00:00+24:00"):
            with self.assertRaises(InvalidField, msg=text) as raised:
                parse_rfc3339(text)
            self.assertEqual(raised.exception.field, "trigger_time")


class RouteTests(unittest.TestCase):
    def test_rest_means_http_and_other_types_fields_are_dropped(self):
        route = route_of(
            {"id": "r", "type": "REST", "webhook_url": "http://h:1/x", "key": "k", "backoff_ms": 9}
        )
        self.assertEqual((route.type, route.key, route.backoff_ms), ("http", "", 9))

    def test_the_url_id_must_match(self):
        with self.assertRaises(InvalidField) as raised:
            route_of({"id": "a", "type": "http", "webhook_url": "http://h/"}, url_id="b")
        self.assertEqual(raised.exception.field, "id")


class QueryTests(unittest.TestCase):
    def test_list_limit(self):
        self.assertEqual(list_limit(None), DEFAULT_LIST_LIMIT)
        self.assertEqual(list_limit(str(MAX_LIST_LIMIT)), MAX_LIST_LIMIT)
        for raw in ("0", str(MAX_LIST_LIMIT + 1), "-1", "1.5", "ten"):
            self.assertRaises(InvalidField, list_limit, raw)

    def test_address(self):
        check_address("raft_address", "127.0.0.1:8101")
        for value in (None, 8101, "127.0.0.1", "host:port", "a b:1"):
            self.assertRaises(InvalidField, check_address, "raft_address", value)
