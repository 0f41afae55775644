"""The executor: timers on a `Clock`, a real shard log and store underneath.

The shard log, WAL and SQLite store are real (their threads report back through the
real reactor); the executor's own time is a `Clock`, so what fires when is exact. The
publisher is scripted: it answers each delivery with the outcome a test chooses, and
records what it was asked to deliver (the real publisher is covered by
test_publisher and, end to end, by test_node).
"""

import gc
import random

from twisted.internet import defer, reactor, task
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.support import LocalGroup
from timemachine.domain.commands import DeleteJob, JobOutcome, PutJobs
from timemachine.domain.errors import Unavailable
from timemachine.domain.jobs import JobSpec, JobStatus
from timemachine.domain.routes import MAX_BACKOFF_MS, Route
from timemachine.firing.executor import (
    ROUTE_RETRY_SECONDS,
    ROUTE_WARNING_SECONDS,
    Executor,
    backoff_ms,
)
from timemachine.firing.publisher import Delivered, Failed, RetryLater
from timemachine.interfaces import IExecutor, IPublisher
from timemachine.metrics import Metrics

ROUTE = Route("hook", "http", webhook_url="http://127.0.0.1:9/", max_attempts=3, backoff_ms=100)
START_MS = 1_800_000_000_000
# Outcomes proposed as each delivery ends (the batching has tests of its own).
AT_ONCE = {"outcome_batch_seconds": 0}


@implementer(IPublisher)
class ScriptedPublisher:
    """Answers deliveries from a script of outcomes (Delivered when it runs out).

    ``held``: a Deferred every delivery answers with, or a list of them, one per
    delivery in turn, so a test decides when each delivery ends.
    """

    def __init__(self):
        self.deliveries = []
        self.statuses = []
        self.script = []
        self.held = None

    def deliver(self, route, job, attempt):
        self.deliveries.append((job.id, job.version, attempt))
        self.statuses.append(job.status)
        if isinstance(self.held, list):
            return self.held.pop(0)
        if self.held is not None:
            return self.held
        return defer.succeed(self.script.pop(0) if self.script else Delivered())

    def close(self):
        return defer.succeed(None)


class OutcomeRefusingLog:
    """The real shard log, except that it refuses the first outcome proposed: what a
    shard leader sees when its log fails, or it loses leadership, mid-delivery."""

    def __init__(self, log):
        self._log = log
        self.refused = 0

    def propose(self, command):
        if isinstance(command, JobOutcome) and not self.refused:
            self.refused += 1
            return defer.fail(Unavailable("shard 0 lost its leader"))
        return self._log.propose(command)

    def subscribe(self, listener):
        self._log.subscribe(listener)

    def is_leader(self):
        return self._log.is_leader()


class LeaseLapsingLog(OutcomeRefusingLog):
    """The real shard log, with a lease that the test lets lapse and come back."""

    def __init__(self, log):
        super().__init__(log)
        self.refused = 1  # outcomes go through
        self.lease = True

    def is_leader(self):
        return self.lease


class ProposalRecordingLog(OutcomeRefusingLog):
    """The real shard log, noting when (by ``clock``) each outcome is proposed."""

    def __init__(self, log, clock):
        super().__init__(log)
        self.refused = 1  # outcomes go through
        self.clock = clock
        self.outcomes = []

    def propose(self, command):
        if isinstance(command, JobOutcome):
            self.outcomes.append((round(self.clock.seconds() * 1000) - START_MS, command.id))
        return self._log.propose(command)


class ExecutorTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(START_MS / 1000)
        # No tail kept below a compaction: a test can empty the log's memory of the
        # entries it proposed (see the garbage collector test).
        self.log = LocalGroup(self.mktemp(), reactor, raft_log_options={"keep_entries": 0})
        self.store = self.log.store
        yield self.log.open()
        self.addCleanup(self.log.close)
        self.publisher = ScriptedPublisher()
        self.metrics = Metrics()
        self.routes = {ROUTE.id: ROUTE}
        self.executor = Executor(
            self.clock,
            self.publisher,
            self.routes.get,
            metrics=self.metrics,
            window_ms=10_000,
            refresh_ms=5_000,
            rng=random.Random(7),
            **AT_ONCE,
        )
        self.addCleanup(self.executor.stop)

    def put(self, job_id, due_in_ms, route="hook"):
        spec = JobSpec("c", job_id, START_MS + due_in_ms, '{"n":1}', route)
        return self.log.propose(PutJobs((spec,)))

    @defer.inlineCallbacks
    def settle(self, in_flight=0):
        """Wait until the outcomes of deliveries are recorded and store reads are back.

        Outcomes travel through the WAL and store threads; a store call queued behind
        them fires only after every earlier store call (one thread, in order).
        """
        for _ in range(10_000):
            if self.executor.in_flight() <= in_flight:
                break
            yield task.deferLater(reactor, 0.001, lambda: None)
        yield self.store.count()

    def advance_to(self, ms):
        self.clock.advance(START_MS / 1000 + ms / 1000 - self.clock.seconds())

    def fired_ids(self):
        return [job_id for job_id, _, _ in self.publisher.deliveries]

    # ---- outcomes proposed together ----------------------------------------------

    @defer.inlineCallbacks
    def batching(self):
        """The executor batching outcomes over 50 ms, over a log noting proposals."""
        yield self.executor.stop()
        self.executor = Executor(
            self.clock, self.publisher, self.routes.get, window_ms=10_000,
            outcome_batch_seconds=0.05,
        )
        self.addCleanup(self.executor.stop)
        return ProposalRecordingLog(self.log, self.clock)

    @defer.inlineCallbacks
    def load(self, log):
        """Add shard 0 over ``log`` and take its window in."""
        loaded = self.executor.add_shard(0, self.store, log)
        yield self.store.count()  # queued after the window's read: it is back
        while not loaded.called:
            self.clock.advance(0)
        yield loaded

    @defer.inlineCallbacks
    def test_outcomes_of_deliveries_ending_within_the_window_are_proposed_together(self):
        log = yield self.batching()
        yield self.put("a", 1000)
        yield self.put("b", 1030)
        yield self.put("c", 1100)
        yield self.load(log)
        self.advance_to(1000)
        self.advance_to(1030)
        self.assertEqual(self.fired_ids(), ["a", "b"])
        self.advance_to(1049)
        self.assertEqual(log.outcomes, [])
        self.advance_to(1051)  # 50 ms after the first of them ended
        self.assertEqual(log.outcomes, [(1051, "a"), (1051, "b")])
        self.advance_to(1100)
        self.advance_to(1151)
        self.assertEqual(log.outcomes[2:], [(1151, "c")])
        yield self.settle()
        for job_id in "abc":
            job = yield self.store.get("c", job_id)
            self.assertEqual(job.status, JobStatus.FIRED)

    @defer.inlineCallbacks
    def test_a_handover_or_a_stop_does_not_wait_for_the_window(self):
        log = yield self.batching()
        yield self.put("a", 1000)
        yield self.put("b", 2000)
        yield self.load(log)
        self.advance_to(1000)
        held = self.executor.hold(0)
        self.assertEqual(log.outcomes, [(1000, "a")])
        yield held
        self.executor.release(0)
        self.advance_to(2000)
        stopped = self.executor.stop()
        self.assertEqual(log.outcomes[1:], [(2000, "b")])
        yield stopped
        job = yield self.store.get("c", "b")
        self.assertEqual(job.status, JobStatus.FIRED)

    def test_interface(self):
        verifyObject(IExecutor, self.executor)
        verifyObject(IPublisher, self.publisher)

    @defer.inlineCallbacks
    def test_fires_in_due_order_and_not_early(self):
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("late", 3000)
        yield self.put("early", 1000)
        yield self.put("middle", 2000)
        self.assertEqual(self.executor.pending(), 3)
        self.advance_to(999)
        self.assertEqual(self.fired_ids(), [])
        self.advance_to(1000)
        self.assertEqual(self.fired_ids(), ["early"])
        self.advance_to(3000)
        self.assertEqual(self.fired_ids(), ["early", "middle", "late"])
        yield self.settle()
        job = yield self.store.get("c", "late")
        self.assertEqual((job.status, job.attempts, job.fired_at_ms),
                         (JobStatus.FIRED, 1, START_MS + 3000))
        self.assertEqual(self.executor.pending(), 0)

    @defer.inlineCallbacks
    def test_a_delivery_is_of_the_job_moved_to_firing(self):
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("a", 1000)
        self.advance_to(1000)
        self.assertEqual(self.publisher.statuses, [JobStatus.FIRING])
        yield self.settle()

    @defer.inlineCallbacks
    def test_one_timer_not_a_polling_tick(self):
        yield self.executor.add_shard(0, self.store, self.log)
        for i in range(20):
            yield self.put(f"j{i}", 1000 + i)
        timers = [c for c in self.clock.getDelayedCalls() if c.func == self.executor._fire_due]
        self.assertEqual(len(timers), 1)
        self.assertEqual(timers[0].getTime(), (START_MS + 1000) / 1000)

    @defer.inlineCallbacks
    def test_jobs_stored_before_start_and_overdue_fire_at_once(self):
        yield self.put("overdue", -3000)
        yield self.put("soon", 500)
        loaded = self.executor.add_shard(0, self.store, self.log)
        yield self.store.count()  # queued after the window's read: it is back
        self.clock.advance(0)  # the loader's turn, then the timer's
        yield loaded
        self.assertEqual(self.fired_ids(), ["overdue"])
        self.advance_to(500)
        self.assertEqual(self.fired_ids(), ["overdue", "soon"])

    @defer.inlineCallbacks
    def test_replace_and_delete_take_effect_at_once(self):
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("moved", 1000)
        yield self.put("gone", 1000)
        yield self.put("moved", 4000)
        yield self.log.propose(DeleteJob("c", "gone"))
        self.advance_to(3999)
        self.assertEqual(self.fired_ids(), [])
        self.advance_to(4000)
        self.assertEqual(self.fired_ids(), ["moved"])
        stored = yield self.store.get("c", "moved")
        self.assertEqual(self.publisher.deliveries[0][1], stored.version)

    @defer.inlineCallbacks
    def test_far_future_jobs_stay_on_disk_until_the_window_reaches_them(self):
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("far", 60_000)
        self.assertEqual(self.executor.pending(), 0)
        for ms in range(5_000, 60_001, 5_000):
            self.advance_to(ms)
            yield self.settle()
        self.assertEqual(self.fired_ids(), ["far"])

    @defer.inlineCallbacks
    def test_retry_with_backoff_then_success(self):
        self.publisher.script = [RetryLater("HTTP 500: boom")]
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("flaky", 1000)
        self.advance_to(1000)
        yield self.settle()
        job = yield self.store.get("c", "flaky")
        self.assertEqual((job.status, job.attempts, job.last_error),
                         (JobStatus.SCHEDULED, 1, "HTTP 500: boom"))
        self.assertTrue(START_MS + 1050 <= job.due_ms <= START_MS + 1100, job.due_ms)
        self.advance_to(job.due_ms - START_MS)
        self.assertEqual(self.publisher.deliveries, [("flaky", job.version, 1),
                                                     ("flaky", job.version, 2)])
        yield self.settle()
        job = yield self.store.get("c", "flaky")
        self.assertEqual((job.status, job.attempts), (JobStatus.FIRED, 2))

    @defer.inlineCallbacks
    def test_retry_after_is_honoured(self):
        self.publisher.script = [RetryLater("HTTP 429", retry_after_ms=7000)]
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("busy", 1000)
        self.advance_to(1000)
        yield self.settle()
        job = yield self.store.get("c", "busy")
        self.assertEqual(job.due_ms, START_MS + 8000)

    @defer.inlineCallbacks
    def test_attempts_exhausted_leave_the_job_failed(self):
        self.publisher.script = [RetryLater("e1"), RetryLater("e2"), RetryLater("e3")]
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("doomed", 0)
        for _ in range(3):
            self.clock.advance(1)
            yield self.settle()
        job = yield self.store.get("c", "doomed")
        self.assertEqual((job.status, job.attempts, job.last_error), (JobStatus.FAILED, 3, "e3"))
        self.assertEqual(len(self.publisher.deliveries), 3)
        self.assertEqual(self.metrics.delivery_retries._value.get(), 2)
        self.assertEqual(self.metrics.jobs_failed._value.get(), 1)

    @defer.inlineCallbacks
    def test_permanent_failure_and_missing_route(self):
        self.publisher.script = [Failed("HTTP 400: bad")]
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("refused", 0)
        yield self.put("orphan", 0, route="nowhere")
        self.clock.advance(0)
        yield self.settle()
        refused = yield self.store.get("c", "refused")
        orphan = yield self.store.get("c", "orphan")
        self.assertEqual((refused.status, refused.last_error), (JobStatus.FAILED, "HTTP 400: bad"))
        self.assertEqual(orphan.status, JobStatus.FAILED)
        self.assertIn("nowhere", orphan.last_error)
        self.assertEqual(self.fired_ids(), ["refused"])

    @defer.inlineCallbacks
    def asking_the_meta_group(self, answers):
        """The executor over routes this node may not have caught up with: each
        `current_routes` call takes the next of ``answers`` (a Deferred or a Failure)."""
        yield self.executor.stop()
        self.barriers = 0

        def current_routes():
            self.barriers += 1
            answer = answers.pop(0)
            return defer.fail(answer) if isinstance(answer, Exception) else answer

        self.executor = Executor(
            self.clock, self.publisher, self.routes.get, current_routes=current_routes,
            window_ms=10_000, **AT_ONCE,
        )
        self.addCleanup(self.executor.stop)
        yield self.executor.add_shard(0, self.store, self.log)

    @defer.inlineCallbacks
    def test_a_route_not_applied_here_yet_is_learnt_before_the_job_fires(self):
        caught_up = defer.Deferred()
        yield self.asking_the_meta_group([caught_up])
        yield self.put("j", 0, route="late")
        self.clock.advance(0)
        self.assertEqual((self.barriers, self.fired_ids()), (1, []))
        # The meta group's state reaches this node: the route was there all along.
        late = Route("late", "http", webhook_url="http://127.0.0.1:9/")
        self.routes[late.id] = late
        caught_up.callback(None)
        yield self.settle()
        self.assertEqual(self.fired_ids(), ["j"])
        job = yield self.store.get("c", "j")
        self.assertEqual(job.status, JobStatus.FIRED)

    @defer.inlineCallbacks
    def test_a_route_the_meta_group_confirms_gone_fails_the_job(self):
        yield self.asking_the_meta_group([defer.succeed(None)])
        yield self.put("orphan", 0, route="nowhere")
        self.clock.advance(0)
        yield self.settle()
        job = yield self.store.get("c", "orphan")
        self.assertEqual((job.status, job.last_error),
                         (JobStatus.FAILED, "route 'nowhere' does not exist"))
        self.assertEqual((self.barriers, self.fired_ids()), (1, []))

    @defer.inlineCallbacks
    def test_a_route_that_cannot_be_confirmed_leaves_the_job_scheduled(self):
        yield self.asking_the_meta_group(
            [Unavailable("meta has no leader now; retry"), defer.succeed(None)]
        )
        yield self.put("j", 0, route="late")
        self.clock.advance(0)
        yield self.settle()
        job = yield self.store.get("c", "j")
        self.assertEqual((job.status, job.attempts), (JobStatus.SCHEDULED, 0))
        self.clock.advance(ROUTE_RETRY_SECONDS / 2)
        self.assertEqual(self.barriers, 1)
        late = Route("late", "http", webhook_url="http://127.0.0.1:9/")
        self.routes[late.id] = late
        self.clock.advance(ROUTE_RETRY_SECONDS / 2)
        yield self.store.count()  # the job read back
        self.clock.advance(0)
        yield self.settle()
        self.assertEqual(self.fired_ids(), ["j"])
        job = yield self.store.get("c", "j")
        self.assertEqual((job.status, job.attempts), (JobStatus.FIRED, 1))

    @defer.inlineCallbacks
    def test_jobs_held_for_a_route_not_confirmed_are_logged_once_a_minute(self):
        retries = int(ROUTE_WARNING_SECONDS / ROUTE_RETRY_SECONDS)
        yield self.asking_the_meta_group(
            [Unavailable("meta has no leader now; retry")] * 3 * (retries + 1)
        )
        with capturedLogs() as events:
            for n in range(3):
                yield self.put(f"j{n}", 0, route="late")
            self.clock.advance(0)
            yield self.settle()
            for _ in range(retries):
                self.clock.advance(ROUTE_RETRY_SECONDS)
                yield self.store.count()  # the jobs read back
                self.clock.advance(0)
                yield self.settle()
        warnings = [formatEvent(e) for e in events if "is unknown on this node" in e["log_format"]]
        self.assertEqual(self.barriers, 3 * (retries + 1))
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("1 time(s) a job of it was held", warnings[0])
        self.assertIn(f"{3 * retries} time(s) in the last 60 s", warnings[1])
        self.assertEqual(self.fired_ids(), [])

    @defer.inlineCallbacks
    def test_refresh_does_not_fire_a_job_in_flight_twice(self):
        self.publisher.held = defer.Deferred()
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("slow", 0)
        self.clock.advance(0)
        self.assertEqual(self.executor.in_flight(), 1)
        self.clock.advance(5)  # a refresh while the delivery is out
        yield self.settle(in_flight=1)
        self.clock.advance(0)
        self.assertEqual(len(self.publisher.deliveries), 1)
        self.publisher.held.callback(Delivered())
        yield self.settle()
        self.assertEqual(self.executor.in_flight(), 0)
        job = yield self.store.get("c", "slow")
        self.assertEqual(job.status, JobStatus.FIRED)

    @defer.inlineCallbacks
    def test_an_outcome_not_recorded_fires_again_with_the_same_version(self):
        log = OutcomeRefusingLog(self.log)
        yield self.executor.add_shard(0, self.store, log)
        yield self.put("unlucky", 1000)
        self.advance_to(1000)
        yield self.settle()
        self.assertEqual(len(self.flushLoggedErrors(Unavailable)), 1)
        job = yield self.store.get("c", "unlucky")
        self.assertEqual((job.status, job.attempts), (JobStatus.SCHEDULED, 0))
        # The next refresh reads the whole window again and finds it still due.
        self.advance_to(1000 + 5_000)
        yield self.settle()
        self.clock.advance(0)
        yield self.settle()
        self.assertEqual(
            self.publisher.deliveries, [("unlucky", job.version, 1), ("unlucky", job.version, 1)]
        )
        job = yield self.store.get("c", "unlucky")
        self.assertEqual(job.status, JobStatus.FIRED)

    @defer.inlineCallbacks
    def test_an_outcome_lost_while_leadership_came_back_fires_again(self):
        log = OutcomeRefusingLog(self.log)
        self.publisher.held = defer.Deferred()
        yield self.executor.add_shard(0, self.store, log)
        yield self.put("unlucky", 1000)
        self.advance_to(1000)
        self.assertEqual(self.executor.in_flight(), 1)
        # Leadership lost and won back while the delivery is out: the window loaded
        # again leaves the job to the delivery in flight.
        self.executor.remove_shard(0)
        yield self.load(log)
        held, self.publisher.held = self.publisher.held, None
        held.callback(Delivered())
        yield self.settle()
        self.assertEqual(len(self.flushLoggedErrors(Unavailable)), 1)
        # Its outcome was refused: the next refresh reads the whole window again.
        self.advance_to(1000 + 5_000)
        yield self.settle()
        self.clock.advance(0)
        yield self.settle()
        self.assertEqual(self.fired_ids(), ["unlucky", "unlucky"])
        job = yield self.store.get("c", "unlucky")
        self.assertEqual(job.status, JobStatus.FIRED)

    @defer.inlineCallbacks
    def test_nothing_fires_while_the_lease_is_lapsed(self):
        log = LeaseLapsingLog(self.log)
        yield self.executor.add_shard(0, self.store, log)
        yield self.put("patient", 1000)
        log.lease = False
        self.advance_to(1000)
        self.advance_to(1500)
        yield self.settle()
        self.assertEqual(self.publisher.deliveries, [])
        log.lease = True
        self.advance_to(1600)
        yield self.settle()
        self.assertEqual([d[0] for d in self.publisher.deliveries], ["patient"])

    @defer.inlineCallbacks
    def test_a_shard_waiting_for_its_lease_does_not_delay_the_others(self):
        other = LocalGroup(self.mktemp(), reactor, name="shard 1")
        yield other.open()
        self.addCleanup(other.close)
        lapsed = LeaseLapsingLog(self.log)
        lapsed.lease = False
        yield self.executor.add_shard(0, self.store, lapsed)
        yield self.executor.add_shard(1, other.store, other)
        yield self.put("waits", 1000)
        spec = JobSpec("c", "on-time", START_MS + 1003, '{"n":1}', "hook")
        yield other.propose(PutJobs((spec,)))
        self.advance_to(1000)
        self.advance_to(1003)
        self.assertEqual(self.fired_ids(), ["on-time"])
        lapsed.lease = True
        self.advance_to(1013)
        self.assertEqual(self.fired_ids(), ["on-time", "waits"])
        yield self.settle()

    @defer.inlineCallbacks
    def test_stop_waits_for_in_flight_outcomes(self):
        self.publisher.held = defer.Deferred()
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("slow", 0)
        self.clock.advance(0)
        stopped = self.executor.stop()
        self.assertNoResult(stopped)
        self.publisher.held.callback(Delivered())
        yield stopped
        job = yield self.store.get("c", "slow")
        self.assertEqual(job.status, JobStatus.FIRED)

    @defer.inlineCallbacks
    def test_a_new_version_firing_while_the_old_delivery_is_out_is_tracked_on_its_own(self):
        old_delivery, new_delivery = defer.Deferred(), defer.Deferred()
        self.publisher.held = [old_delivery, new_delivery]
        yield self.executor.add_shard(0, self.store, self.log)
        _, (v1,) = yield self.put("swap", 0)
        self.clock.advance(0)
        _, (v2,) = yield self.put("swap", 0)  # replaced while v1's delivery is out
        self.clock.advance(0)
        self.assertEqual(
            self.publisher.deliveries, [("swap", v1.version, 1), ("swap", v2.version, 1)]
        )
        self.assertEqual(self.executor.in_flight(), 2)
        old_delivery.callback(Delivered())
        yield self.settle(in_flight=1)
        self.assertEqual(self.executor.in_flight(), 1)
        # Shutting down waits for v2's outcome: it is recorded, not left to fire again.
        stopped = self.executor.stop()
        self.assertNoResult(stopped)
        new_delivery.callback(Delivered())
        yield stopped
        job = yield self.store.get("c", "swap")
        self.assertEqual((job.version, job.status), (v2.version, JobStatus.FIRED))
        # A restart of firing over the same shard delivers nothing again.
        restarted = Executor(
            self.clock, self.publisher, self.routes.get, window_ms=10_000, **AT_ONCE
        )
        self.addCleanup(restarted.stop)
        yield restarted.add_shard(0, self.store, self.log)
        self.clock.advance(1)
        self.assertEqual(len(self.publisher.deliveries), 2)

    @defer.inlineCallbacks
    def test_a_loaded_window_is_taken_in_a_slice_per_reactor_turn(self):
        self.executor = Executor(
            self.clock, self.publisher, self.routes.get, window_ms=10_000, load_slice=10,
            **AT_ONCE,
        )
        self.addCleanup(self.executor.stop)
        due = START_MS + 1000
        specs = tuple(JobSpec("c", f"j{i:02d}", due + i, "{}", "hook") for i in range(35))
        yield self.log.propose(PutJobs(specs))
        loaded = self.executor.add_shard(0, self.store, self.log)
        yield self.store.count()  # queued after the window's read: it is back
        taken = self.observe_turns(loaded)
        self.assertEqual(taken, [0, 10, 20, 30, 35])
        yield loaded
        self.advance_to(2000)
        self.assertEqual(self.fired_ids(), [f"j{i:02d}" for i in range(35)])

    @defer.inlineCallbacks
    def test_shards_loading_together_share_the_turns(self):
        self.executor = Executor(
            self.clock, self.publisher, self.routes.get, window_ms=10_000, load_slice=10,
            **AT_ONCE,
        )
        self.addCleanup(self.executor.stop)
        other_log = LocalGroup(self.mktemp(), reactor, "shard 1")
        other_store = other_log.store
        yield other_log.open()
        self.addCleanup(other_log.close)
        due = START_MS + 1000
        for log, name in [(self.log, "a"), (other_log, "b")]:
            yield log.propose(
                PutJobs(tuple(JobSpec("c", f"{name}{i}", due, "{}", "hook") for i in range(20)))
            )
        loaded = defer.gatherResults(
            [
                self.executor.add_shard(0, self.store, self.log),
                self.executor.add_shard(1, other_store, other_log),
            ]
        )
        yield defer.gatherResults([self.store.count(), other_store.count()])
        # One slice a turn in all, not one per shard.
        self.assertEqual(self.observe_turns(loaded), [0, 10, 20, 30, 40])

    def observe_turns(self, loaded):
        """Jobs held after each turn of the executor's reactor (this Clock) until
        ``loaded`` fires; the observer takes its turns in between the loader's."""
        taken = []

        def observe():
            taken.append(self.executor.pending())
            if not loaded.called:
                self.clock.callLater(0, observe)

        observe()
        self.clock.advance(0)
        return taken

    @defer.inlineCallbacks
    def test_changes_heard_while_a_window_is_taken_in_win_over_the_read(self):
        self.executor = Executor(
            self.clock, self.publisher, self.routes.get, window_ms=10_000, load_slice=2,
            **AT_ONCE,
        )
        self.addCleanup(self.executor.stop)
        specs = tuple(JobSpec("c", f"j{i}", START_MS + 1000, "{}", "hook") for i in range(6))
        yield self.log.propose(PutJobs(specs))
        loaded = self.executor.add_shard(0, self.store, self.log)
        yield self.store.count()  # queued after the window's read: it is back
        self.assertEqual(self.executor.pending(), 0)  # the loader has not had its turn
        # After the read, before it is taken in: j4 is deleted, j5 moved out of the window.
        yield self.log.propose(DeleteJob("c", "j4"))
        yield self.put("j5", 60_000)
        while not loaded.called:
            self.clock.advance(0)
        self.advance_to(61_000)
        self.assertEqual(self.fired_ids(), ["j0", "j1", "j2", "j3"])

    @defer.inlineCallbacks
    def test_held_jobs_add_nothing_for_the_garbage_collector_to_walk(self):
        # A full collection walks every tracked object: a held window of `Job`s made
        # each pass cost ~50-65 ms at 200,000 jobs; held as rows, it adds none.
        held = 6000
        for start in range(0, held // 2, 250):
            specs = tuple(
                JobSpec("c", f"j{i}", START_MS + 1000 + i, "{}", "hook")
                for i in range(start, start + 250)
            )
            yield self.log.propose(PutJobs(specs))
        del specs
        # The Raft log holds its entries in memory until it compacts; only the
        # executor's own objects are counted here.
        yield self.log.compact()
        gc.collect()
        tracked_before = len(gc.get_objects())
        # Half loaded with the window, half heard from the shard log.
        loaded = self.executor.add_shard(0, self.store, self.log)
        yield self.store.count()  # queued after the window's read: it is back
        while not loaded.called:
            self.clock.advance(0)
        for i in range(held // 2, held):
            yield self.put(f"j{i}", 1000 + i)
        self.assertEqual(self.executor.pending(), held)
        yield self.log.compact()
        gc.collect()
        self.assertLess(len(gc.get_objects()) - tracked_before, held // 10)
        self.advance_to(1000 + held)
        self.assertEqual(len(self.publisher.deliveries), held)

    @defer.inlineCallbacks
    def test_removed_shard_stops_firing(self):
        yield self.executor.add_shard(0, self.store, self.log)
        yield self.put("j", 1000)
        self.executor.remove_shard(0)
        self.advance_to(2000)
        self.assertEqual(self.fired_ids(), [])
        self.assertEqual(self.executor.pending(), 0)


class BackoffTests(unittest.TestCase):
    def test_doubles_with_jitter_and_is_capped(self):
        rng = random.Random(1)
        route = Route("r", "http", webhook_url="http://h/", backoff_ms=500)
        for attempt, full in ((1, 500), (2, 1000), (3, 2000), (10, 256_000)):
            for _ in range(50):
                delay = backoff_ms(route, attempt, rng)
                self.assertTrue(full // 2 <= delay <= full, (attempt, delay))
        for _ in range(50):
            self.assertLessEqual(backoff_ms(route, 60, rng), MAX_BACKOFF_MS)
            self.assertGreaterEqual(backoff_ms(route, 60, rng), MAX_BACKOFF_MS // 2)
