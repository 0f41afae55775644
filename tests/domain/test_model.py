"""The domain model: validation on construction and the log record encoding."""

from twisted.trial import unittest

from timemachine.domain.codec import decode_command, encode_command
from timemachine.domain.commands import (
    Configure,
    DeleteJob,
    DeleteRoute,
    JobOutcome,
    OutcomeKind,
    PutJobs,
    PutRoute,
)
from timemachine.domain.errors import InvalidField
from timemachine.domain.jobs import MAX_META_BYTES, JobSpec, JobStatus, can_transition
from timemachine.domain.routes import Route


def spec(**overrides):
    fields = dict(collection="pay", id="pay-123", trigger_ms=1_767_225_600_000, meta="{}",
                  route="billing")
    fields.update(overrides)
    return JobSpec(**fields)


class JobSpecTests(unittest.TestCase):
    def test_valid(self):
        job = spec(id="A.b_c:d@e-1", meta='{"order":123}')
        self.assertEqual(job.key, ("pay", "A.b_c:d@e-1"))

    def test_bad_values_name_their_field(self):
        cases = [
            ("id", dict(id="")),
            ("id", dict(id="has space")),
            ("id", dict(id="x" * 257)),
            ("id", dict(id=12)),
            ("collection", dict(collection="a/b")),
            ("collection", dict(collection="c" * 129)),
            ("trigger_ms", dict(trigger_ms="1000")),
            ("trigger_ms", dict(trigger_ms=1.5)),
            ("trigger_ms", dict(trigger_ms=True)),
            ("trigger_ms", dict(trigger_ms=-1)),
            ("route", dict(route="")),
            ("meta", dict(meta='"' + "x" * MAX_META_BYTES + '"')),
        ]
        for field, overrides in cases:
            with self.assertRaises(InvalidField, msg=overrides) as raised:
                spec(**overrides)
            self.assertEqual(raised.exception.field, field)
            self.assertIn(field, raised.exception.message)

    def test_longest_names_are_accepted(self):
        spec(id="x" * 256, collection="c" * 128)


class RouteTests(unittest.TestCase):
    def test_http_and_redis(self):
        Route("billing", "http", webhook_url="http://127.0.0.1:4000/callback")
        Route("events", "redis", redis_url="redis://127.0.0.1:6379/0", key="tm:events",
              mode="lpush")

    def test_bad_routes(self):
        cases = [
            ("type", dict(id="r", type="ftp")),
            ("webhook_url", dict(id="r", type="http", webhook_url="ftp://x")),
            ("redis_url", dict(id="r", type="redis", redis_url="http://x", key="k")),
            ("key", dict(id="r", type="redis", redis_url="redis://h:1/0", key="")),
            ("mode", dict(id="r", type="redis", redis_url="redis://h:1/0", key="k", mode="set")),
            ("max_attempts", dict(id="r", type="http", webhook_url="http://h/", max_attempts=0)),
            ("timeout_ms", dict(id="r", type="http", webhook_url="http://h/", timeout_ms="5")),
        ]
        for field, fields in cases:
            with self.assertRaises(InvalidField, msg=fields) as raised:
                Route(**fields)
            self.assertEqual(raised.exception.field, field)


class LifecycleTests(unittest.TestCase):
    def test_transitions(self):
        self.assertTrue(can_transition(JobStatus.SCHEDULED, JobStatus.FIRING))
        self.assertTrue(can_transition(JobStatus.FIRING, JobStatus.SCHEDULED))
        self.assertTrue(can_transition(JobStatus.FIRING, JobStatus.FIRED))
        self.assertTrue(can_transition(JobStatus.FIRING, JobStatus.FAILED))
        self.assertFalse(can_transition(JobStatus.SCHEDULED, JobStatus.FIRED))
        self.assertFalse(can_transition(JobStatus.FIRED, JobStatus.FIRING))
        self.assertFalse(can_transition(JobStatus.FAILED, JobStatus.SCHEDULED))


class EncodingTests(unittest.TestCase):
    def test_every_command_round_trips(self):
        commands = [
            PutJobs((spec(), spec(id="b", meta='{"é":[1,2]}'))),
            DeleteJob("pay", "pay-123"),
            JobOutcome(OutcomeKind.FIRED, "pay", "a", 7, 1, 1000),
            JobOutcome(OutcomeKind.RETRY, "pay", "a", 7, 2, 2000, "HTTP 500: oops"),
            JobOutcome(OutcomeKind.FAILED, "pay", "a", 7, 10, 3000, "HTTP 400"),
            PutRoute(Route("r", "redis", redis_url="redis://h:1/0", key="k", mode="publish")),
            DeleteRoute("r"),
            Configure(2, 1, (("node1",), ("node1",))),
        ]
        for command in commands:
            self.assertEqual(decode_command(encode_command(command)), command)

    def test_empty_record_is_refused(self):
        self.assertRaises(ValueError, decode_command, b"")
