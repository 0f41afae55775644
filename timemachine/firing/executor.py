"""Firing: hold the due-soon jobs of the shards this node leads and fire them on time.

A heap ordered by due time and a single ``reactor.callLater`` for its head: no
polling tick. Each shard's store is asked for the jobs due within ``window_ms``;
applies of the shard log (new, replaced, deleted, retried jobs) update the heap at
once; a periodic refresh moves the window forward. Jobs beyond the window stay on
disk, so memory does not grow with far-future jobs.

A delivery's outcome goes back through the shard log (FIRED / RETRY at t / FAILED):
a restart neither loses nor repeats a recorded outcome. The outcomes of deliveries that
end within ``outcome_batch_seconds`` of each other are proposed together, in one reactor
turn: each shard's group then carries them in one Raft round (one append, one fsync,
one store transaction per replica) instead of one round each, which is most of what a
fire costs the cluster. Until its outcome is recorded a delivery counts as in flight: a
crash before then repeats it, with the same idempotency key.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from timemachine.domain.commands import DeleteJob, JobOutcome, OutcomeKind, PutJobs
from timemachine.domain.jobs import (
    ROW_DUE_MS,
    ROW_VERSION,
    Job,
    JobEvent,
    JobStatus,
    job_from_row,
    job_row,
)
from timemachine.domain.routes import MAX_BACKOFF_MS, Route
from timemachine.firing.publisher import Delivered, RetryLater
from timemachine.interfaces import IExecutor

DEFAULT_WINDOW_MS = 60_000
DEFAULT_REFRESH_MS = 10_000
DEFAULT_LOAD_LIMIT = 200_000
# Jobs of a loaded window taken in per reactor turn: ~0.6 ms of work (p99 ~1.4 ms
# with 200,000 due jobs on the 2-core dev machine), where taking the whole window
# in at once held one turn for ~260 ms.
DEFAULT_LOAD_SLICE = 500
# How soon a due job of a shard whose leader holds no lease right now is tried again.
LEASE_RETRY_SECONDS = 0.01
# How long an outcome waits for others to be proposed with. At 500 fires/s on a 3-node
# cluster (2 cores), 50 ms cut the cluster's CPU from 1.78 to 1.14 cores, 20 ms only to
# 1.48: a shard gets a few outcomes per batch only once the window spans several of its
# fires.
DEFAULT_OUTCOME_BATCH_SECONDS = 0.05
# How soon a due job whose route this node does not know, and could not confirm gone
# with the meta group (see `Executor`), is looked at again.
ROUTE_RETRY_SECONDS = 1.0
# At most one warning per route this often about its jobs held that way: with the meta
# group out of reach, every such job is looked at again each `ROUTE_RETRY_SECONDS`,
# and a line for each would be a blocking write on the reactor per job per second.
ROUTE_WARNING_SECONDS = 60.0


def backoff_ms(route: Route, attempt: int, rng: random.Random) -> int:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, with jitter.

    "Equal jitter": half the exponential delay is kept, the other half is random, so
    retries of many jobs failing together spread out but never come back too soon.
    """
    delay = min(route.backoff_ms * 2 ** min(attempt - 1, 40), MAX_BACKOFF_MS)
    return delay // 2 + rng.randint(0, delay - delay // 2)


@dataclass
class _Shard:
    number: int
    store: object
    log: object
    loaded_until_ms: int = 0
    reload_all: bool = True
    active: bool = True
    # Its leadership is being handed over: no delivery starts (see `Executor.hold`).
    held: bool = False
    # Held as rows, made `Job`s when they fire: a window of 200,000 `Job`s would be
    # 200,000 objects every full garbage collection walks (each pass held the reactor
    # ~50-65 ms while a window loaded), and rows are not tracked by the collector.
    jobs: dict[tuple[str, str], tuple] = field(default_factory=dict)
    # For each load taking in its read over several turns: the jobs the shard log
    # changed since that read, which the read must no longer place.
    changed_during_loads: list[set[tuple[str, str]]] = field(default_factory=list)


# A delivery that did not take place, so there is no outcome to record.
_NOT_FIRED = object()


def _one_step() -> bool:
    """The loader's turn is over after one slice."""
    return True


def _keys_changed(command, result) -> list[tuple[str, str]]:
    """The jobs an applied shard-log command changed (an outcome of a replaced
    version changes nothing)."""
    if isinstance(command, PutJobs):
        return [spec.key for spec in command.jobs]
    if isinstance(command, DeleteJob) or (isinstance(command, JobOutcome) and result is not None):
        return [(command.collection, command.id)]
    return []


@implementer(IExecutor)
class Executor:
    """Fires the jobs of the shards added to it, through ``publisher``.

    ``route_of(route_id)`` returns the current `Route` or None. ``metrics`` is a
    `timemachine.metrics.Metrics` or None.

    ``current_routes()``, if given, fires once ``route_of`` answers from routes as
    current as the meta group's (a read barrier), or fails. This node's copy of the
    routes can lag: a route acknowledged elsewhere is applied here a little later, and
    a meta leader cut off right after a commit leaves its followers without it until
    the next leader commits. A job whose route is missing here therefore fails only
    once the barrier confirms the route is gone; when it cannot, the job is not fired
    and is looked at again after `ROUTE_RETRY_SECONDS`.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        publisher,
        route_of,
        metrics=None,
        window_ms: int = DEFAULT_WINDOW_MS,
        refresh_ms: int = DEFAULT_REFRESH_MS,
        load_limit: int = DEFAULT_LOAD_LIMIT,
        load_slice: int = DEFAULT_LOAD_SLICE,
        rng: random.Random | None = None,
        outcome_batch_seconds: float = DEFAULT_OUTCOME_BATCH_SECONDS,
        current_routes=None,
    ):
        self._reactor = reactor
        self._publisher = publisher
        self._route_of = route_of
        self._current_routes = current_routes
        self._metrics = metrics
        self._window_ms = window_ms
        self._refresh_ms = refresh_ms
        self._load_limit = load_limit
        self._load_slice = load_slice
        # Takes in every shard's loaded windows, one slice per reactor turn in all:
        # shards loading together (start-up) share the turns instead of each taking
        # a slice in the same one.
        self._loader = task.Cooperator(
            terminationPredicateFactory=lambda: _one_step,
            scheduler=lambda work: reactor.callLater(0, work),
        )
        self._rng = rng or random.Random()
        self._shards: dict[int, _Shard] = {}
        self._heap: list[tuple[int, int, int, tuple[str, str], int]] = []
        self._seq = itertools.count()
        self._timer = None
        self._refresher = None
        # Deliveries out, by (shard, job key, version): a replaced job's new version
        # can fire while the old one's delivery is still out, and both are waited for.
        self._firing: dict[tuple[int, tuple[str, str], int], defer.Deferred] = {}
        self._followed: set = set()
        self._stopped = False
        self._outcome_batch_seconds = outcome_batch_seconds
        # Outcomes waiting to be proposed together: (shard, outcome, its answer).
        self._outcomes: list[tuple[_Shard, JobOutcome, defer.Deferred]] = []
        self._outcome_flush = None
        # Route id -> (when its jobs' wait was last logged, jobs held since then).
        self._route_warnings: dict[str, tuple[float, int]] = {}
        if metrics is not None:
            # Read when scraped, not recounted after every apply and fire.
            metrics.jobs_in_memory.set_function(self.pending)

    def now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

    # ---- shards --------------------------------------------------------------

    def add_shard(self, shard, store, log):
        """Start firing ``shard``; fires once its due window is loaded."""
        state = _Shard(shard, store, log)
        self._shards[shard] = state
        if log not in self._followed:
            # Once per log: a shard gained, lost and gained again (leadership moving
            # back and forth) follows its log through whichever state is current.
            self._followed.add(log)
            log.subscribe(
                lambda index, command, result: self._heard(shard, log, command, result)
            )
        if self._refresher is None and not self._stopped:
            self._refresher = self._reactor.callLater(self._refresh_ms / 1000, self._refresh)
        return self._load(state)

    def remove_shard(self, shard):
        state = self._shards.pop(shard, None)
        if state is not None:
            state.active = False
            state.jobs.clear()

    def hold(self, shard):
        """Start no delivery of ``shard`` until `release`; fire once those in flight
        have their outcomes recorded. Before a leadership transfer: the transfer
        refuses proposals, so an outcome still to be proposed would be lost and the
        new leader would deliver the job again."""
        state = self._shards.get(shard)
        if state is None:
            return defer.succeed(None)
        state.held = True
        self._propose_outcomes()
        in_flight = [d for (number, _, _), d in self._firing.items() if number == shard]
        return defer.DeferredList(in_flight, consumeErrors=True).addCallback(lambda _: None)

    def release(self, shard) -> None:
        """Deliver ``shard``'s jobs again (the transfer did not take)."""
        state = self._shards.get(shard)
        if state is not None:
            state.held = False

    def pending(self) -> int:
        return sum(len(s.jobs) for s in self._shards.values())

    def in_flight(self) -> int:
        return len(self._firing)

    @defer.inlineCallbacks
    def _load(self, state: _Shard):
        """Load the shard's jobs that entered the window since the last load.

        The whole window is read on the first load and after an outcome could not be
        recorded (that job is still scheduled, below what was loaded). Otherwise only
        the slice between the last load's end and the new one is read, so a refresh
        costs what enters the window, not the whole window again. What was read is
        taken in `load_slice` jobs per reactor turn.
        """
        until = self.now_ms() + self._window_ms
        from_ms = 0 if state.reload_all else state.loaded_until_ms
        state.reload_all = False
        # Claimed before the read: applies that land while it runs are held by
        # `_place` even if the read does not see them (both paths check versions).
        state.loaded_until_ms = max(state.loaded_until_ms, until)
        rows = yield state.store.due(until, self._load_limit, from_ms)
        if not state.active:
            return
        if len(rows) == self._load_limit:
            # Only part of the window fit: the next refresh goes on from the last job.
            state.loaded_until_ms = rows[-1][ROW_DUE_MS]
        if not rows:
            return
        # The store applies in order: every apply heard from now on is newer than
        # the read, and wins over it.
        changed: set[tuple[str, str]] = set()
        state.changed_during_loads.append(changed)
        try:
            yield self._loader.coiterate(self._slices(state, rows, changed))
        finally:
            state.changed_during_loads.remove(changed)

    def _slices(self, state: _Shard, rows: list[tuple], changed: set[tuple[str, str]]):
        """Take ``rows`` in, a slice per step of the loader, while the shard is ours."""
        for start in range(0, len(rows), self._load_slice):
            if start:
                yield
            if not state.active or self._stopped:
                return
            self._take_in(state, rows[start : start + self._load_slice], changed)

    def _take_in(self, state: _Shard, rows: list[tuple], changed: set[tuple[str, str]]):
        """Hold the jobs of a read the shard log has not changed since, if still new."""
        for row in rows:
            key = row[:2]
            if key in changed:
                continue
            current = state.jobs.get(key)
            if current is not None and (current[ROW_VERSION], current[ROW_DUE_MS]) >= (
                row[ROW_VERSION],
                row[ROW_DUE_MS],
            ):
                continue
            if (state.number, key, row[ROW_VERSION]) in self._firing and current is None:
                continue
            self._hold(state, key, row)
        self._arm()

    def _refresh(self):
        self._refresher = None
        if self._stopped:
            return
        loads = [self._load(s) for s in list(self._shards.values())]
        d = defer.DeferredList(loads, consumeErrors=True)

        def again(results):
            for ok, failure in results:
                if not ok:
                    self.log.failure("loading due jobs failed", failure)
            if not self._stopped and self._refresher is None:
                self._refresher = self._reactor.callLater(
                    self._refresh_ms / 1000, self._refresh
                )

        d.addCallback(again)

    # ---- following the shard log --------------------------------------------

    def _heard(self, shard, log, command, result):
        state = self._shards.get(shard)
        if state is not None and state.log is log:
            self._applied(state, command, result)

    def _applied(self, state: _Shard, command, result):
        if not state.active:
            return
        for changed in state.changed_during_loads:
            changed.update(_keys_changed(command, result))
        if isinstance(command, PutJobs):
            for job in result:
                self._place(state, job)
        elif isinstance(command, DeleteJob):
            state.jobs.pop((command.collection, command.id), None)
        elif isinstance(command, JobOutcome) and result is not None:
            self._place(state, result)
        else:
            return
        self._arm()

    def _place(self, state: _Shard, job: Job):
        """Hold ``job`` if it is scheduled within the loaded window, else let it go."""
        if job.status is JobStatus.SCHEDULED and job.due_ms < state.loaded_until_ms:
            self._hold(state, job.key, job_row(job))
        else:
            state.jobs.pop(job.key, None)

    def _hold(self, state: _Shard, key: tuple[str, str], row: tuple):
        state.jobs[key] = row
        heapq.heappush(
            self._heap,
            (row[ROW_DUE_MS], next(self._seq), state.number, key, row[ROW_VERSION]),
        )

    # ---- the timer -------------------------------------------------------------

    def _arm(self):
        """Point the one timer at the earliest live job."""
        self._drop_stale_head()
        if self._stopped or not self._heap:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        delay = max(0.0, self._heap[0][0] / 1000 - self._reactor.seconds())
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self._reactor.callLater(delay, self._fire_due)

    def _live(self, entry) -> tuple | None:
        """The held row a heap entry stands for, or None if it was replaced or let go."""
        due_ms, _, shard, key, version = entry
        state = self._shards.get(shard)
        if state is None:
            return None
        row = state.jobs.get(key)
        if row is None or row[ROW_VERSION] != version or row[ROW_DUE_MS] != due_ms:
            return None
        return row

    def _drop_stale_head(self):
        while self._heap and self._live(self._heap[0]) is None:
            heapq.heappop(self._heap)

    def _fire_due(self):
        self._timer = None
        now_ms = self.now_ms()
        waiting = []
        while self._heap and self._heap[0][0] <= now_ms:
            entry = heapq.heappop(self._heap)
            row = self._live(entry)
            if row is None:
                continue
            _, _, shard, key, _ = entry
            state = self._shards[shard]
            if state.held or not state.log.is_leader():
                # No lease right now (a heartbeat round is late, or leadership is
                # going): a deposed leader must never fire. The job waits; the shard
                # is dropped if leadership is lost.
                waiting.append(entry)
                continue
            del state.jobs[key]
            self._fire(state, job_from_row(row), now_ms)
        if not waiting:
            self._arm()
            return
        # Tried again soon, but the other shards' jobs fire on time meanwhile: the
        # timer points at whichever comes first.
        self._drop_stale_head()
        delay = LEASE_RETRY_SECONDS
        if self._heap:
            delay = min(delay, max(0.0, self._heap[0][0] / 1000 - self._reactor.seconds()))
        for entry in waiting:
            heapq.heappush(self._heap, entry)
        self._timer = self._reactor.callLater(delay, self._fire_due)

    # ---- delivery --------------------------------------------------------------

    def _fire(self, state: _Shard, job: Job, now_ms: int):
        job = job.moved(JobEvent.FIRE)
        if self._metrics is not None:
            self._metrics.firing_lateness.observe(max(0, now_ms - job.due_ms) / 1000)
        attempt = job.attempts + 1
        route = self._route_of(job.route)
        if route is None and self._current_routes is not None:
            d = self._current_routes().addCallbacks(
                self._routes_confirmed, self._routes_not_confirmed,
                callbackArgs=(job, attempt), errbackArgs=(state, job),
            )
        else:
            d = self._deliver(route, job, attempt)
        firing_key = (state.number, job.key, job.version)
        d.addCallback(self._propose_outcome_of, state)
        d.addErrback(self._not_recorded, state, job)
        # Registered before the last callback, which removes it: the chain may already
        # have run to its end here, or finish much later.
        self._firing[firing_key] = d
        d.addBoth(self._done_firing, firing_key)

    def _deliver(self, route: Route | None, job: Job, attempt: int) -> defer.Deferred:
        """Deliver ``job`` (a missing route fails it); fire with ``(route, outcome)``."""
        if route is None:
            delivered = defer.succeed(None)
        else:
            delivered = self._publisher.deliver(route, job, attempt)
        return delivered.addCallback(
            lambda result: (route, self._outcome(result, route, job, attempt))
        )

    def _routes_confirmed(self, _, job: Job, attempt: int) -> defer.Deferred:
        self._route_warnings.pop(job.route, None)
        return self._deliver(self._route_of(job.route), job, attempt)

    def _routes_not_confirmed(self, failure, state: _Shard, job: Job):
        """The meta group could not confirm that ``job``'s route is gone: the job stays
        scheduled, and its current version is read back after `ROUTE_RETRY_SECONDS`."""
        now = self._reactor.seconds()
        warned_at, held = self._route_warnings.get(job.route, (None, 0))
        held += 1
        if warned_at is None or now - warned_at >= ROUTE_WARNING_SECONDS:
            since = "" if warned_at is None else f" in the last {now - warned_at:.0f} s"
            self.log.warn(
                "route {route!r} is unknown on this node and the meta group could not be "
                "asked ({error}): {held} time(s){since} a job of it was held, looked at "
                "again {seconds} s later (the last: {key})",
                route=job.route, error=failure.getErrorMessage(), held=held, since=since,
                seconds=ROUTE_RETRY_SECONDS, key=job.idempotency_key,
            )
            warned_at, held = now, 0
        self._route_warnings[job.route] = (warned_at, held)
        if not self._stopped:  # else the shard's next leader loads it
            self._reactor.callLater(
                ROUTE_RETRY_SECONDS, self._read_back, state.number, job.key
            )
        return _NOT_FIRED

    @defer.inlineCallbacks
    def _read_back(self, shard: int, key: tuple[str, str]):
        """Hold ``key`` again as the store has it now (the shard log may have changed
        it), if this node still leads ``shard``; else its next leader loads it."""
        state = self._shards.get(shard)
        if state is None or self._stopped:
            return
        try:
            job = yield state.store.get(*key)
        except Exception:
            state.reload_all = True  # the next refresh reads the whole window
            self.log.failure("reading {key} back failed", key=key)
            return
        if job is not None and state.active and not self._stopped:
            self._place(state, job)
            self._arm()

    def _propose_outcome_of(self, delivered, state: _Shard):
        """Record the outcome of a delivery (none when it did not take place)."""
        if delivered is _NOT_FIRED:
            return None
        route, outcome = delivered
        return self._propose_outcome(outcome, state).addCallback(self._recorded, route)

    def _propose_outcome(self, outcome: JobOutcome, state: _Shard) -> defer.Deferred:
        """Propose ``outcome`` with the others that come within the batch window."""
        if self._outcome_batch_seconds <= 0 or state.held or self._stopped:
            # Nothing to wait for once a handover or a stop waits on this outcome.
            return state.log.propose(outcome)
        answer = defer.Deferred()
        self._outcomes.append((state, outcome, answer))
        if self._outcome_flush is None:
            self._outcome_flush = self._reactor.callLater(
                self._outcome_batch_seconds, self._propose_outcomes
            )
        return answer

    def _propose_outcomes(self) -> None:
        """Propose the outcomes waiting, now."""
        if self._outcome_flush is not None and self._outcome_flush.active():
            self._outcome_flush.cancel()
        self._outcome_flush = None
        outcomes, self._outcomes = self._outcomes, []
        for state, outcome, answer in outcomes:
            state.log.propose(outcome).chainDeferred(answer)

    def _done_firing(self, _, firing_key):
        self._firing.pop(firing_key, None)

    def _outcome(self, result, route: Route | None, job: Job, attempt: int) -> JobOutcome:
        now_ms = self.now_ms()

        def outcome(kind, at_ms, error=None):
            return JobOutcome(kind, job.collection, job.id, job.version, attempt, at_ms, error)

        if route is None:
            return outcome(OutcomeKind.FAILED, now_ms, f"route {job.route!r} does not exist")
        if isinstance(result, Delivered):
            return outcome(OutcomeKind.FIRED, now_ms)
        if isinstance(result, RetryLater) and attempt < route.max_attempts:
            delay = backoff_ms(route, attempt, self._rng)
            if result.retry_after_ms is not None:
                delay = max(delay, min(result.retry_after_ms, MAX_BACKOFF_MS))
            return outcome(OutcomeKind.RETRY, now_ms + delay, result.error)
        return outcome(OutcomeKind.FAILED, now_ms, result.error)

    def _recorded(self, index_result, route: Route | None):
        _, job = index_result
        if self._metrics is None or job is None:
            return
        if job.status is JobStatus.FIRED:
            self._metrics.jobs_fired.labels(route.type).inc()
        elif job.status is JobStatus.FAILED:
            self._metrics.jobs_failed.inc()
        else:
            self._metrics.delivery_retries.inc()

    def _not_recorded(self, failure, state: _Shard, job: Job):
        # The job stays scheduled in the store: the next refresh of a leader loads it
        # and fires it again with the same Idempotency-Key, so nothing is lost. This
        # node may lead the shard again by now, with a window loaded without the job
        # (it was in flight): that is the one to read whole again.
        current = self._shards.get(state.number)
        if current is not None:
            current.reload_all = True
        self.log.failure(
            "outcome of {key} v{version} was not recorded",
            failure,
            key=job.idempotency_key,
            version=job.version,
        )

    def stop(self):
        """Stop firing; fires once every in-flight delivery's outcome is recorded."""
        self._stopped = True
        for call in (self._timer, self._refresher):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._refresher = None
        self._propose_outcomes()
        in_flight = list(self._firing.values())
        return defer.DeferredList(in_flight, consumeErrors=True).addCallback(lambda _: None)
