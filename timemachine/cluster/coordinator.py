"""The node's front desk: turns API requests into proposals on the right shard log.

It checks what needs the cluster's state (the route exists, the time is not past),
groups batch writes by shard, and reads from the shard stores. The REST layer only
parses and formats.
"""

from __future__ import annotations

import contextlib
import heapq
from collections import defaultdict

from twisted.internet import defer
from twisted.logger import Logger

from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain.codec import job_from_pb, job_to_pb
from timemachine.domain.commands import DeleteJob, DeleteRoute, PutJobs, PutRoute
from timemachine.domain.errors import (
    NotConfigured,
    NotFound,
    ServedElsewhere,
    TimeMachineError,
    TriggerInPast,
    Unavailable,
    UnknownRoute,
)
from timemachine.domain.jobs import Job, JobSpec
from timemachine.domain.routes import Route
from timemachine.peer.raftcodec import group_of_shard
from timemachine.peer.requests import error_of

# A trigger this far in the past is a client's mistake; nearer, it fires now.
PAST_TOLERANCE_MS = 5000

#: Bytes of jobs (their meta, mostly: up to 64 KiB each) one node lists for another in
#: an answer, which must fit a peer frame; the asker's page ends where that one did.
LISTED_PAGE_BYTES = 4 * 1024 * 1024
#: Seconds a node listing a shard for this one may take before another is asked.
LIST_TIMEOUT = 5.0

# What `Coordinator.shard_status` says of a shard without a running replica here.
_UNKNOWN = {
    "leader": None, "applied_index": None, "jobs": None, "term": None, "commit_index": None,
    "role": None, "lease": False, "voters": None, "learners": None,
}


def merge_pages(pages, limit: int) -> tuple[list[Job], str | None]:
    """One page of at most ``limit`` jobs by id from ``pages``, ``(jobs by id,
    next_cursor or None)`` each, and its next cursor.

    A page with a next cursor holds no job of its shards above its last one: the
    merged page ends there, wherever the other pages go on.
    """
    merged = list(heapq.merge(*(jobs for jobs, _ in pages), key=lambda job: job.id))
    stops = [jobs[-1].id for jobs, next_cursor in pages if next_cursor is not None and jobs]
    if stops:
        stop = min(stops)
        merged = [job for job in merged if job.id <= stop]
    more = bool(stops) or len(merged) > limit
    merged = merged[:limit]
    return merged, (merged[-1].id if more and merged else None)


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
        #: A `Forwarding`: proposals go to each group's leader, wherever it is. None
        #: for a node whose groups all lead themselves (tests of one store).
        self.forwarding = None
        #: The `PeerNetwork` that lists the shards this node does not serve (see
        #: `serve_listings`); None: a listing needs every shard here.
        self._network = None

    def serve_listings(self, network) -> None:
        """List the jobs of shards this node serves for other nodes, and ask them for
        the shards it does not serve, over ``network``."""
        self._network = network
        network.handle("list", self._listed_to_us)

    def _propose(self, log, command):
        if self.forwarding is None:
            return log.propose(command)
        return self.forwarding.propose(log, command)

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

    @defer.inlineCallbacks
    def _learn_routes(self, specs) -> None:
        """Catch up with the meta group when a job names a route this node does not
        know: the route may be acknowledged already (written through this node, which
        passed it on to the meta leader) and not yet applied here. A read barrier
        brings this node's meta state up to every write acknowledged before it; with
        no leader to ask, the check goes by what this node knows."""
        meta = self.meta_log
        if meta.blank or meta.leads:
            return
        if all(self.cluster_store.route(spec.route) is not None for spec in specs):
            return
        with contextlib.suppress(Unavailable):
            yield self.meta_read_barrier()

    def _require_config(self):
        if self.ring is None:
            if self.cluster_store.config is not None:
                # Just joined, or the map just changed: its replicas are opening.
                raise Unavailable("this node is opening its shards; retry")
            raise NotConfigured("the cluster has no shards yet: POST /cluster/configure")

    def _shard(self, job_id: str):
        self._require_config()
        return self._serving(self.ring.shard_for(job_id))

    def _serving(self, shard: int):
        """The (log, store) of ``shard``; `Unavailable` when it could not open, and
        `ServedElsewhere` when this node holds no replica of it, or a new one that
        waits for its first snapshot (it knows neither the data nor the leader)."""
        error = self.unavailable_shards.get(shard)
        if error is not None:
            raise Unavailable(f"shard {shard} is unavailable: {error}")
        held = self.shards.get(shard)
        if held is None or held[0].blank:
            nodes = self.nodes_to_ask(self.ring, shard)
            if not nodes:
                raise Unavailable(f"shard {shard} has no replica that can serve yet; retry")
            raise ServedElsewhere(shard, nodes)
        return held

    def nodes_to_ask(self, ring, shard: int) -> list[str]:
        """The other nodes that may hold ``shard``'s data under ``ring``: the replicas
        it places first, then every other member, as while replicas move a group's
        members are not yet the ones placed."""
        placed = [n for n in ring.replicas(shard) if n != self.node_id]
        others = [
            m.node_id for m in self.cluster_store.members()
            if m.node_id != self.node_id and m.node_id not in placed
        ]
        return placed + others

    def _write(self, shard: int, command):
        """Propose ``command`` to ``shard``'s group, held here or not."""
        try:
            log, _ = self._serving(shard)
        except ServedElsewhere as elsewhere:
            if self.forwarding is None:
                raise
            return self.forwarding.propose_at(
                group_of_shard(shard), elsewhere.nodes, command
            )
        return self._propose(log, command)

    @defer.inlineCallbacks
    def put_job(self, spec: JobSpec):
        """Create or replace one job; fires with its version (the entry's index)."""
        yield self._learn_routes([spec])
        self.check_job(spec)
        self._require_config()
        index, _ = yield self._write(self.ring.shard_for(spec.id), PutJobs((spec,)))
        self._count_created(1)
        return index

    @defer.inlineCallbacks
    def put_jobs(self, items):
        """Create or replace a batch; each item is a `JobSpec` or a `TimeMachineError`.

        Fires with one entry per item, in order: the stored job's version (the index of
        its shard's entry) or the item's error.
        Items are grouped into one proposal per shard, proposed concurrently; a shard
        that fails answers its own items (a storage failure as `Unavailable`), and
        the others' items stand.
        """
        results: list = list(items)
        yield self._learn_routes([item for item in items if isinstance(item, JobSpec)])
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
                d = self._write(shard, PutJobs(tuple(items[p] for p in positions)))
            except Unavailable as error:
                return defer.succeed((positions, None, error))
            d.addCallback(lambda index_jobs: (positions, index_jobs[0], None))
            d.addErrback(lambda failure: (positions, None, self._item_error(shard, failure)))
            return d

        answers = yield defer.gatherResults(
            [propose(shard, positions) for shard, positions in by_shard.items()]
        )
        created = 0
        for positions, index, error in answers:
            for p in positions:
                results[p] = index if error is None else error
            if error is None:
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
        log, store = self._shard(job_id)
        # Linearizable: no write acknowledged before this read is missing from it.
        yield log.read_barrier()
        job = yield store.get(collection, job_id)
        if job is None:
            raise NotFound(f"job {collection}/{job_id} not found")
        return job

    @defer.inlineCallbacks
    def delete_job(self, collection: str, job_id: str):
        """Delete a job; fires with the log index, or fails with `NotFound`."""
        self._require_config()
        index, existed = yield self._write(
            self.ring.shard_for(job_id), DeleteJob(collection, job_id)
        )
        if not existed:
            raise NotFound(f"job {collection}/{job_id} not found")
        if self._metrics is not None:
            self._metrics.jobs_deleted.inc()
        return index

    @defer.inlineCallbacks
    def list_jobs(self, collection: str, status, limit: int, cursor):
        """Jobs of a collection across shards, ordered by id: ``(jobs, next_cursor)``.

        The shards this node serves are read here; each other one is listed by a node
        that serves it (its placed replicas asked first), over the peer protocol.
        """
        self._require_config()
        here, elsewhere = [], []
        for shard in range(self.ring.shards):
            try:
                here.append(self._serving(shard))
            except Unavailable:
                # A list missing a shard's jobs would look complete: no node to ask
                # for one is an error, as a damaged shard with no other replica is.
                if self._network is None or not self.nodes_to_ask(self.ring, shard):
                    raise
                elsewhere.append(shard)
        try:
            pages = yield defer.gatherResults(
                [self._pages_here(here, collection, status, limit, cursor)]
                + [
                    self._page_elsewhere(shard, collection, status, limit, cursor)
                    for shard in elsewhere
                ],
                consumeErrors=True,
            )
        except defer.FirstError as e:
            e.subFailure.raiseException()
        here_pages, *elsewhere_pages = pages
        return merge_pages([*here_pages, *elsewhere_pages], limit)

    @defer.inlineCallbacks
    def _pages_here(self, held, collection, status, limit, cursor):
        """A page of each shard store of ``held`` (``(log, store)`` pairs)."""
        # Linearizable, as a read of one job: a follower may not have applied the
        # last commits yet.
        yield defer.gatherResults([log.read_barrier() for log, _ in held])
        pages = yield defer.gatherResults(
            [store.list_jobs(collection, status, limit, cursor) for _, store in held]
        )
        return pages

    @defer.inlineCallbacks
    def _page_elsewhere(self, shard, collection, status, limit, cursor):
        """A page of ``shard``, from the first node serving it that answers."""
        request = pb.Request(
            list=pb.ListJobs(
                collection=collection, status=status or "", limit=limit,
                cursor=cursor or "", shards=[shard],
            )
        )
        failures = []
        for node_id in self.nodes_to_ask(self.ring, shard):
            try:
                # Not connected or no answer in time are Unavailable too: the next.
                response = yield self._network.request(node_id, request, timeout=LIST_TIMEOUT)
                error = error_of(response)
                if error is not None:
                    raise error
            except Unavailable as e:
                failures.append(f"{node_id}: {e.message}")
                continue
            page = response.page
            return [job_from_pb(job) for job in page.jobs], page.next_cursor or None
        raise Unavailable(f"no node listed shard {shard} ({'; '.join(failures)}); retry")

    @defer.inlineCallbacks
    def _listed_to_us(self, from_node: str, ask: pb.ListJobs):
        """Another node's listing of shards this node serves (it passes it on to no
        other: a node that cannot serve one answers `Unavailable`, a retry)."""
        self._require_config()
        held = []
        for shard in ask.shards:
            if shard >= self.ring.shards:
                raise Unavailable(f"shard {shard} is not in this node's shard map; retry")
            try:
                held.append(self._serving(shard))
            except ServedElsewhere as e:
                raise Unavailable(f"this node does not serve shard {shard}; retry") from e
        pages = yield self._pages_here(
            held, ask.collection, ask.status or None, ask.limit, ask.cursor or None
        )
        jobs, next_cursor = merge_pages(pages, ask.limit)
        answer = pb.JobPage()
        used = 0
        for job in jobs:
            listed = job_to_pb(job)
            used += listed.ByteSize()
            if answer.jobs and used > LISTED_PAGE_BYTES:
                next_cursor = answer.jobs[-1].id
                break
            answer.jobs.append(listed)
        answer.next_cursor = next_cursor or ""
        return answer

    # ---- routes ------------------------------------------------------------------

    @defer.inlineCallbacks
    def get_route(self, route_id: str):
        yield self.meta_read_barrier()
        route = self.cluster_store.route(route_id)
        if route is None:
            raise NotFound(f"route {route_id!r} not found")
        return route

    @defer.inlineCallbacks
    def routes(self):
        yield self.meta_read_barrier()
        return list(self.cluster_store.routes())

    def meta_read_barrier(self):
        """Fire once this node's meta state holds every meta write acknowledged before
        the call (linearizable route and member reads, as job reads): a follower may
        not have applied the last meta commits yet. A node in no cluster yet reads what
        it has."""
        if self.meta_log.blank:
            return defer.succeed(None)
        return self.meta_log.read_barrier()

    def _propose_meta(self, command):
        if self.meta_log.blank:
            raise NotConfigured(
                "this node is in no cluster yet: POST /cluster/configure to start one, "
                "or /cluster/join to join one"
            )
        return self._propose(self.meta_log, command)

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
        """Whether this node serves: it is in a configured cluster, and every group it
        holds a replica of (the meta group too) has a leader; the meta group's member
        has not stopped on a disk failure."""
        return (
            self.ring is not None
            and not self.meta_log.blank
            and self.meta_log.failed is None
            and self.meta_log.leader is not None
            and not self.unavailable_shards
            and all(log.leader is not None for log, _ in self.shards.values())
        )

    @defer.inlineCallbacks
    def shard_status(self, count_jobs: bool = True):
        """For each shard: replicas, leader, applied index, job count, status, and
        what this node's replica knows of its group. Without ``count_jobs`` the job
        counts are null: counting reads every job of a store, which the nodes asking
        each other about their groups (every few seconds) do not need.

        ``replicas`` is the shard map's placement. ``status`` is ``serving`` (its group
        has a leader), ``unavailable`` (it has none, or this node's replica could not
        open or stopped: ``error`` says why) or ``elsewhere`` (this node holds no
        replica: ask one of ``replicas``). Only a running replica here knows the
        rest: the applied index and job count; the group's ``term``,
        ``commit_index``, its ``voters`` and ``learners`` (its membership, which a
        replica move makes differ from ``replicas`` for a while); this node's ``role``
        in it and whether it holds the ``lease``. Without one they are null (``lease``
        false).
        """
        self._require_config()
        groups = {s: self.shards[s][0].stats() for s in range(self.ring.shards) if s in self.shards}
        # A replica that stopped on a disk or store failure is not asked to count, nor
        # a new one still waiting for its snapshot: its empty store is not the shard's.
        counting = [
            s for s, group in groups.items()
            if count_jobs and group.error is None and not self.shards[s][0].blank
        ]
        # Asked together: the counts queue up on the store thread and come back in one hop.
        counts = yield defer.gatherResults([self.shards[s][1].count(None) for s in counting])
        count_of = dict(zip(counting, counts, strict=True))
        out = []
        for shard in range(self.ring.shards):
            entry = {"shard": shard, "replicas": list(self.ring.replicas(shard))}
            group = groups.get(shard)
            error = self.unavailable_shards.get(shard)
            if error is not None or (group is not None and group.error is not None):
                entry.update(
                    _UNKNOWN, status="unavailable", error=str(error or group.error)
                )
            elif group is None:
                entry.update(_UNKNOWN, status="elsewhere")
            else:
                entry.update(
                    leader=group.leader,
                    applied_index=group.applied_index,
                    jobs=count_of.get(shard),
                    status="serving" if group.leader is not None else "unavailable",
                    term=group.term,
                    commit_index=group.commit_index,
                    role=group.role,
                    lease=group.lease,
                    voters=list(group.voters),
                    learners=list(group.learners),
                )
            out.append(entry)
        return out
