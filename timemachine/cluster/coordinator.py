"""The node's front desk: turns API requests into proposals on the right shard log.

It checks what needs the cluster's state (the route exists, the time is not past),
groups batch writes by shard, and reads from the shard stores. The REST layer only
parses and formats.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

from twisted.internet import defer
from twisted.logger import Logger

from timemachine.domain.commands import DeleteJob, DeleteRoute, PutJobs, PutRoute
from timemachine.domain.errors import (
    NotConfigured,
    NotFound,
    TimeMachineError,
    TriggerInPast,
    Unavailable,
    UnknownRoute,
)
from timemachine.domain.jobs import Job, JobSpec
from timemachine.domain.routes import Route

# A trigger this far in the past is a client's mistake; nearer, it fires now.
PAST_TOLERANCE_MS = 5000


class Coordinator:
    """Routes reads and writes to the shards of ``ring``.

    ``shards`` maps shard number -> (log, store) for the shards this node serves;
    ``meta_log`` / ``cluster_store`` are the meta group's log and state machine.
    ``unavailable_shards`` maps the shards of this node that could not open to the
    reason: their reads and writes get `Unavailable`, and the node is not ready.
    """

    log = Logger()

    def __init__(
        self, reactor, node_id, ring, shards, meta_log, cluster_store, metrics=None,
        unavailable_shards=None,
    ):
        self._reactor = reactor
        self.unavailable_shards = {} if unavailable_shards is None else unavailable_shards
        self.node_id = node_id
        self.ring = ring
        self.shards = shards
        self.meta_log = meta_log
        self.cluster_store = cluster_store
        self._metrics = metrics

    def now_ms(self) -> int:
        return int(self._reactor.seconds() * 1000)

    # ---- jobs ------------------------------------------------------------------

    def check_job(self, spec: JobSpec) -> None:
        """Raise the client's error for a job the cluster cannot take."""
        self._require_config()
        if spec.trigger_ms < self.now_ms() - PAST_TOLERANCE_MS:
            raise TriggerInPast(
                f"trigger_ms {spec.trigger_ms} is more than {PAST_TOLERANCE_MS} ms in the past"
            )
        if self.cluster_store.route(spec.route) is None:
            raise UnknownRoute(f"route {spec.route!r} does not exist")

    def _require_config(self):
        if self.ring is None:
            raise NotConfigured("the cluster has no shards yet: POST /cluster/configure")

    def _shard(self, job_id: str):
        self._require_config()
        return self._serving(self.ring.shard_for(job_id))

    def _serving(self, shard: int):
        """The (log, store) of ``shard``; `Unavailable` when it could not open."""
        error = self.unavailable_shards.get(shard)
        if error is not None:
            raise Unavailable(f"shard {shard} is unavailable: {error}")
        return self.shards[shard]

    @defer.inlineCallbacks
    def put_job(self, spec: JobSpec):
        """Create or replace one job; fires with ``(index, Job)``."""
        self.check_job(spec)
        log, _ = self._shard(spec.id)
        index, jobs = yield log.propose(PutJobs((spec,)))
        self._count_created(1)
        return index, jobs[-1]

    @defer.inlineCallbacks
    def put_jobs(self, items):
        """Create or replace a batch; each item is a `JobSpec` or a `TimeMachineError`.

        Fires with one entry per item, in order: a stored `Job` or the item's error.
        Items are grouped into one proposal per shard, proposed concurrently; a shard
        that fails answers its own items (a storage failure as `Unavailable`), and
        the others' items stand.
        """
        results: list = list(items)
        by_shard: dict[int, list[int]] = defaultdict(list)
        for position, item in enumerate(items):
            if isinstance(item, TimeMachineError):
                continue
            try:
                self.check_job(item)
            except TimeMachineError as e:
                results[position] = e
                continue
            by_shard[self.ring.shard_for(item.id)].append(position)

        def propose(shard, positions):
            try:
                log, _ = self._serving(shard)
            except Unavailable as error:
                return defer.succeed((positions, None, error))
            d = log.propose(PutJobs(tuple(items[p] for p in positions)))
            d.addCallback(lambda index_jobs: (positions, index_jobs[1], None))
            d.addErrback(lambda failure: (positions, None, self._item_error(shard, failure)))
            return d

        answers = yield defer.gatherResults(
            [propose(shard, positions) for shard, positions in by_shard.items()]
        )
        created = 0
        for positions, jobs, error in answers:
            if error is not None:
                for p in positions:
                    results[p] = error
                continue
            stored = {job.key: job for job in jobs}
            for p in positions:
                results[p] = stored[items[p].key]
            created += len(positions)
        self._count_created(created)
        return results

    def _item_error(self, shard: int, failure) -> TimeMachineError:
        """What the items of a failed shard proposal answer."""
        if isinstance(failure.value, TimeMachineError):
            return failure.value
        # A local disk or store failure: logged here with its details, which the
        # client does not get (as the API does for a request that fails whole).
        self.log.failure("shard {shard} failed a batch write", failure, shard=shard)
        return Unavailable(f"shard {shard} cannot store jobs now (storage failure)")

    def _count_created(self, n: int):
        if self._metrics is not None:
            self._metrics.jobs_created.inc(n)

    @defer.inlineCallbacks
    def get_job(self, collection: str, job_id: str):
        _, store = self._shard(job_id)
        job = yield store.get(collection, job_id)
        if job is None:
            raise NotFound(f"job {collection}/{job_id} not found")
        return job

    @defer.inlineCallbacks
    def delete_job(self, collection: str, job_id: str):
        """Delete a job; fires with the log index, or fails with `NotFound`."""
        log, _ = self._shard(job_id)
        index, existed = yield log.propose(DeleteJob(collection, job_id))
        if not existed:
            raise NotFound(f"job {collection}/{job_id} not found")
        if self._metrics is not None:
            self._metrics.jobs_deleted.inc()
        return index

    @defer.inlineCallbacks
    def list_jobs(self, collection: str, status, limit: int, cursor):
        """Jobs of a collection across shards, ordered by id: ``(jobs, next_cursor)``."""
        self._require_config()
        for shard in sorted(self.unavailable_shards):
            self._serving(shard)  # a list missing a shard's jobs would look complete
        pages = yield defer.gatherResults(
            [
                store.list_jobs(collection, status, limit, cursor)
                for _, store in self.shards.values()
            ]
        )
        merged: list[Job] = list(
            heapq.merge(*(jobs for jobs, _ in pages), key=lambda job: job.id)
        )[:limit]
        more = len(merged) == limit and (
            any(next_cursor is not None for _, next_cursor in pages)
            or sum(len(jobs) for jobs, _ in pages) > limit
        )
        return merged, (merged[-1].id if more else None)

    # ---- routes ------------------------------------------------------------------

    def get_route(self, route_id: str) -> Route:
        route = self.cluster_store.route(route_id)
        if route is None:
            raise NotFound(f"route {route_id!r} not found")
        return route

    def routes(self) -> list[Route]:
        return list(self.cluster_store.routes())

    def _propose_meta(self, command):
        if self.meta_log.blank:
            raise NotConfigured(
                "this node is in no cluster yet: POST /cluster/configure to start one, "
                "or /cluster/join to join one"
            )
        return self.meta_log.propose(command)

    @defer.inlineCallbacks
    def put_route(self, route: Route):
        index, _ = yield self._propose_meta(PutRoute(route))
        return index

    @defer.inlineCallbacks
    def delete_route(self, route_id: str):
        index, existed = yield self._propose_meta(DeleteRoute(route_id))
        if not existed:
            raise NotFound(f"route {route_id!r} not found")
        return index

    # ---- cluster -------------------------------------------------------------------

    def ready(self) -> bool:
        return (
            self.ring is not None
            and self.meta_log.is_leader()
            and not self.unavailable_shards
            and all(log.is_leader() for log, _ in self.shards.values())
        )

    @defer.inlineCallbacks
    def shard_status(self):
        """For each shard: replicas, leader, applied index, job count, status.

        ``status`` is ``serving`` or ``unavailable``; a shard that could not open
        says why in ``error`` and has no applied index or count.
        """
        self._require_config()
        serving = [s for s in range(self.ring.shards) if s not in self.unavailable_shards]
        # Asked together: the counts queue up on the store thread and come back in one hop.
        counts = yield defer.gatherResults([self.shards[s][1].count(None) for s in serving])
        count_of = dict(zip(serving, counts, strict=True))
        out = []
        for shard in range(self.ring.shards):
            entry = {"shard": shard, "replicas": list(self.ring.replicas(shard))}
            error = self.unavailable_shards.get(shard)
            if error is not None:
                entry.update(
                    leader=None, applied_index=None, jobs=None, status="unavailable",
                    error=str(error),
                )
            else:
                log, _ = self.shards[shard]
                entry.update(
                    leader=self.node_id if log.is_leader() else None,
                    applied_index=log.applied_index,
                    jobs=count_of[shard],
                    status="serving" if log.is_leader() else "unavailable",
                )
            out.append(entry)
        return out
