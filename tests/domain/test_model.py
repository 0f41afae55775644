"""The domain model: validation on construction and the log record encoding."""

from twisted.trial import unittest

from timemachine.domain.codec import decode_command, encode_command
from timemachine.domain.commands import (
    Configure,
    DeleteJob,
    DeleteRoute,
    JobOutcome,
    JobVersion,
    MemberLeaving,
    OutcomeKind,
    PurgeJobs,
    PutJobs,
    PutMember,
    PutRoute,
    RemoveMember,
)
from timemachine.domain.errors import InvalidField
from timemachine.domain.jobs import (
    LIFECYCLE,
    MAX_META_BYTES,
    IllegalTransition,
    Job,
    JobEvent,
    JobSpec,
    JobStatus,
    next_status,
    status_after_delivery,
)
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
    def test_every_allowed_transition(self):
        S, E = JobStatus, JobEvent
        self.assertEqual(next_status(S.SCHEDULED, E.FIRE), S.FIRING)
        self.assertEqual(next_status(S.FIRING, E.DELIVERED), S.FIRED)
        self.assertEqual(next_status(S.FIRING, E.RETRY), S.SCHEDULED)
        self.assertEqual(next_status(S.FIRING, E.GIVE_UP), S.FAILED)

    def test_every_other_change_raises(self):
        allowed = set(LIFECYCLE)
        for status in JobStatus:
            for event in JobEvent:
                if (status, event) in allowed:
                    continue
                with self.assertRaises(IllegalTransition, msg=(status, event)):
                    next_status(status, event)

    def test_a_job_moves_through_the_table(self):
        job = Job("c", "a", 1, "null", "r", version=3)
        firing = job.moved(JobEvent.FIRE)
        self.assertEqual((firing.status, firing.version), (JobStatus.FIRING, 3))
        self.assertEqual(firing.moved(JobEvent.DELIVERED).status, JobStatus.FIRED)
        self.assertRaises(IllegalTransition, job.moved, JobEvent.DELIVERED)
        self.assertRaises(IllegalTransition, firing.moved(JobEvent.GIVE_UP).moved, JobEvent.FIRE)

    def test_a_stored_outcome_is_fire_then_its_event(self):
        self.assertEqual(status_after_delivery(JobEvent.DELIVERED), JobStatus.FIRED)
        self.assertEqual(status_after_delivery(JobEvent.RETRY), JobStatus.SCHEDULED)
        self.assertEqual(status_after_delivery(JobEvent.GIVE_UP), JobStatus.FAILED)
        self.assertRaises(IllegalTransition, status_after_delivery, JobEvent.FIRE)

    def test_each_outcome_kind_is_an_event(self):
        self.assertEqual(
            [kind.event for kind in OutcomeKind],
            [JobEvent.DELIVERED, JobEvent.RETRY, JobEvent.GIVE_UP],
        )


class EncodingTests(unittest.TestCase):
    def test_every_command_round_trips(self):
        commands = [
            PutJobs((spec(), spec(id="b", meta='{"é":[1,2]}'))),
            DeleteJob("pay", "pay-123"),
            JobOutcome(OutcomeKind.FIRED, "pay", "a", 7, 1, 1000),
            JobOutcome(OutcomeKind.RETRY, "pay", "a", 7, 2, 2000, "HTTP 500: oops"),
            JobOutcome(OutcomeKind.FAILED, "pay", "a", 7, 10, 3000, "HTTP 400"),
            PurgeJobs((JobVersion("pay", "a", 7), JobVersion("pay", "b", 2**40))),
            PutRoute(Route("r", "redis", redis_url="redis://h:1/0", key="k", mode="publish")),
            DeleteRoute("r"),
            Configure(2, 1, (("node1",), ("node1",))),
            Configure(2, 2, (("node1", "node2"), ("node2", "node3")), (("node1",), ("node1",)), 9),
            PutMember("node2", "127.0.0.2:8102", "127.0.0.2:8002"),
            PutMember("node3", "localhost:8103"),
            RemoveMember("node2"),
            MemberLeaving("node2"),
            MemberLeaving("node2", leaving=False),
        ]
        for command in commands:
            self.assertEqual(decode_command(encode_command(command)), command)

    def test_empty_record_is_refused(self):
        self.assertRaises(ValueError, decode_command, b"")


class MemberTests(unittest.TestCase):
    def test_addresses_are_host_and_port(self):
        for good in ("127.0.0.1:8101", "localhost:1", "node-2.example.com:65535"):
            self.assertEqual(PutMember("node2", good).peer_address, good)

    def test_bad_members_name_their_field(self):
        cases = [
            (("", "127.0.0.1:8101"), "node_id"),
            (("node 2", "127.0.0.1:8101"), "node_id"),
            (("node2", "127.0.0.1"), "raft_address"),
            (("node2", "127.0.0.1:0"), "raft_address"),
            (("node2", "127.0.0.1:65536"), "raft_address"),
            (("node2", ":8101"), "raft_address"),
            (("node2", "bad host:8101"), "raft_address"),
            (("node2", "127.0.0.1:8101", "h:x"), "http_address"),
        ]
        for args, field in cases:
            with self.assertRaises(InvalidField) as caught:
                PutMember(*args)
            self.assertIn(field, str(caught.exception), args)
