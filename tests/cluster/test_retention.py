"""Retention: expired fired/failed jobs purged through the shard log, in batches."""

import os

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support import LocalGroup
from timemachine.cluster.retention import Retention
from timemachine.domain.commands import JobOutcome, OutcomeKind, PurgeJobs, PutJobs
from timemachine.domain.jobs import JobSpec, JobStatus
from timemachine.metrics import Metrics


def spec(job_id):
    return JobSpec("c", job_id, 1000, "{}", "r")


def outcome(kind, job_id, version, at_ms, error=None):
    return JobOutcome(kind, "c", job_id, version, 1, at_ms, error)


class RetentionTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        self.log = LocalGroup(directory, reactor)
        yield self.log.open()
        self.addCleanup(self.log.close)
        self.purges = []
        self.log.subscribe(
            lambda index, command, result: isinstance(command, PurgeJobs)
            and self.purges.append(command)
        )
        self.clock = task.Clock()
        self.metrics = Metrics()

    def retention(self, **options):
        options.setdefault("retain_fired_ms", 5000)
        options.setdefault("retain_failed_ms", 20_000)
        return Retention(self.clock, {0: (self.log, self.log.store)}, metrics=self.metrics,
                         **options)

    @defer.inlineCallbacks
    def finish(self, kind, ids, at_ms):
        for job_id in ids:
            job = yield self.log.store.get("c", job_id)
            yield self.log.propose(outcome(kind, job_id, job.version, at_ms, "x"))

    @defer.inlineCallbacks
    def ids(self):
        jobs, _ = yield self.log.store.list_jobs("c")
        return [job.id for job in jobs]

    @defer.inlineCallbacks
    def test_purges_each_kind_after_its_period_only(self):
        yield self.log.propose(PutJobs(tuple(spec(i) for i in ("f1", "f2", "x1", "s1"))))
        yield self.finish(OutcomeKind.FIRED, ["f1", "f2"], 1000)
        yield self.finish(OutcomeKind.FAILED, ["x1"], 1000)
        retention = self.retention()
        self.clock.advance(5.999)  # fired at 1000 + 5000 retention: kept until 6000
        self.assertEqual((yield retention.sweep()), 0)
        self.clock.advance(0.001)
        self.assertEqual((yield retention.sweep()), 2)
        self.assertEqual((yield self.ids()), ["s1", "x1"])
        self.clock.advance(15)
        self.assertEqual((yield retention.sweep()), 1)
        self.assertEqual((yield self.ids()), ["s1"])
        self.assertEqual(retention.purged, 3)
        self.assertIn("timemachine_jobs_purged_total 3.0", self.metrics.render().decode())

    @defer.inlineCallbacks
    def test_zero_purges_at_once_in_bounded_batches(self):
        ids = [f"j{i}" for i in range(7)]
        yield self.log.propose(PutJobs(tuple(spec(i) for i in ids)))
        yield self.finish(OutcomeKind.FIRED, ids, 1000)
        self.clock.advance(1.0)
        retention = self.retention(retain_fired_ms=0, batch=3)
        self.assertEqual((yield retention.sweep()), 7)
        self.assertEqual([len(p.jobs) for p in self.purges], [3, 3, 1])
        self.assertEqual((yield self.ids()), [])

    @defer.inlineCallbacks
    def test_a_job_replaced_after_it_was_picked_stays(self):
        yield self.log.propose(PutJobs((spec("a"),)))
        yield self.finish(OutcomeKind.FIRED, ["a"], 1000)
        self.clock.advance(10)
        retention = self.retention()
        expired = yield self.log.store.expired(5000, None, 10)
        # The replace lands between the leader's read and its purge.
        replaced, _ = yield self.log.propose(PutJobs((spec("a"),)))
        _, purged = yield self.log.propose(PurgeJobs(tuple(expired)))
        self.assertEqual(purged, 0)
        job = yield self.log.store.get("c", "a")
        self.assertEqual((job.status, job.version), (JobStatus.SCHEDULED, replaced))
        self.assertEqual((yield retention.sweep()), 0)

    @defer.inlineCallbacks
    def test_sweeps_on_its_timer_and_stops(self):
        yield self.log.propose(PutJobs((spec("a"),)))
        yield self.finish(OutcomeKind.FIRED, ["a"], 1000)
        retention = self.retention(retain_fired_ms=0, sweep_s=2.0)
        retention.start()
        self.clock.advance(1.9)
        self.assertEqual(retention.purged, 0)
        self.clock.advance(0.1)
        yield retention.stop()
        self.assertEqual(retention.purged, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @defer.inlineCallbacks
    def test_a_shard_it_does_not_lead_is_left_alone(self):
        yield self.log.propose(PutJobs((spec("a"),)))
        yield self.finish(OutcomeKind.FIRED, ["a"], 1000)
        self.clock.advance(100)
        retention = self.retention()
        yield self.log.close()
        self.assertEqual((yield retention.sweep()), 0)
