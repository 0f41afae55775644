"""The node's Prometheus metrics, on a registry of its own (one per node).

Most are `prometheus_client` metrics updated where things happen. The Raft groups and
the peers count with plain integers instead (their paths run thousands of times a
second; see `timemachine.cluster.groupstats`), read only when ``/metrics`` is scraped
by `RaftCollector` and `PeerCollector`. Their labels are bounded: ``group`` (and
``shard`` for a shard's group) for each group this node holds a member of, ``peer``
for each node it knows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from timemachine.cluster.groupstats import GroupStatus
from timemachine.peer.raftcodec import META_GROUP, shard_of_group
from timemachine.raft.core import LEADER

_LATENESS_BUCKETS = (
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
)
_FSYNC_BUCKETS = (0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class Metrics:
    """Counters and histograms of one node, exported at ``GET /metrics``."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "timemachine_http_requests",
            "REST requests answered, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.jobs_created = Counter(
            "timemachine_jobs_created", "Jobs created or replaced.", registry=self.registry
        )
        self.jobs_deleted = Counter(
            "timemachine_jobs_deleted", "Jobs deleted.", registry=self.registry
        )
        self.jobs_fired = Counter(
            "timemachine_jobs_fired", "Jobs delivered.", ["route_type"], registry=self.registry
        )
        self.jobs_failed = Counter(
            "timemachine_jobs_failed",
            "Jobs that failed for good (dead letters).",
            registry=self.registry,
        )
        self.delivery_retries = Counter(
            "timemachine_delivery_retries",
            "Deliveries that failed and were scheduled again.",
            registry=self.registry,
        )
        self.firing_lateness = Histogram(
            "timemachine_firing_lateness_seconds",
            "Time from a job's due time to the start of its delivery.",
            buckets=_LATENESS_BUCKETS,
            registry=self.registry,
        )
        self.wal_fsync = Histogram(
            "timemachine_wal_fsync_seconds",
            "Duration of one group write + fsync of a write-ahead log.",
            buckets=_FSYNC_BUCKETS,
            registry=self.registry,
        )
        self.jobs_purged = Counter(
            "timemachine_jobs_purged",
            "Fired and failed jobs removed when their retention ended.",
            registry=self.registry,
        )
        self.log_bytes = Gauge(
            "timemachine_log_bytes",
            "Bytes on disk of a log's segment files (after compaction), by log.",
            ["log"],
            registry=self.registry,
        )
        self.store_bytes = Gauge(
            "timemachine_store_bytes",
            "Bytes on disk of a store's SQLite files, by store (measured at compaction).",
            ["store"],
            registry=self.registry,
        )
        self.shards_unavailable = Gauge(
            "timemachine_shards_unavailable",
            "Shards of this node whose log or store refused to open (see /cluster/shards).",
            registry=self.registry,
        )
        self.jobs_in_memory = Gauge(
            "timemachine_executor_jobs_pending",
            "Due-soon jobs held by the executor.",
            registry=self.registry,
        )

    def follow_cluster(
        self, groups: Callable[[], Mapping[int, object]], peers: Callable[[], Mapping]
    ) -> None:
        """Export the Raft groups ``groups()`` returns (by number, each with ``stats()``,
        as `RaftHost.groups`) and the peers of ``peers()`` (`PeerNetwork.stats`)."""
        self.registry.register(RaftCollector(groups))
        self.registry.register(PeerCollector(peers))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def _group_labels(status: GroupStatus) -> dict[str, str]:
    if status.group == META_GROUP:
        return {"group": str(status.group)}
    return {"group": str(status.group), "shard": str(shard_of_group(status.group))}


class _Families:
    """Metric families by name, filled sample by sample, yielded in order of creation."""

    def __init__(self):
        self._families: dict[str, Metric] = {}

    def add(self, name: str, kind: str, doc: str, labels: dict[str, str], value) -> None:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = Metric(name, doc, kind)
        sample = f"{name}_total" if kind == "counter" else name
        family.add_sample(sample, labels, value)

    def histogram(self, name: str, doc: str, labels: dict[str, str], histogram) -> None:
        family = self._families.get(name)
        if family is None:
            family = self._families[name] = Metric(name, doc, "histogram")
        for bound, count in histogram.cumulative():
            le = "+Inf" if bound == float("inf") else repr(bound)
            family.add_sample(f"{name}_bucket", {**labels, "le": le}, count)
        family.add_sample(f"{name}_count", labels, histogram.total)
        family.add_sample(f"{name}_sum", labels, histogram.sum)

    def __iter__(self):
        return iter(self._families.values())


class RaftCollector:
    """The state and counters of this node's members of its Raft groups (group 0 is
    the meta group; shard ``n``'s group is ``n + 1``)."""

    def __init__(self, groups: Callable[[], Mapping[int, object]]):
        self._groups = groups

    def collect(self):
        out = _Families()
        for _, group in sorted(self._groups().items()):
            status = group.stats()
            labels = _group_labels(status)
            counters = status.counters
            gauges = (
                ("timemachine_raft_term", "The member's current term.", status.term),
                (
                    "timemachine_raft_leader",
                    "1 when this member leads its group (it takes proposals), else 0.",
                    int(status.role == LEADER),
                ),
                (
                    "timemachine_raft_lease",
                    "1 when this member leads with a valid lease (it fires), else 0.",
                    int(status.lease),
                ),
                (
                    "timemachine_raft_leader_known",
                    "1 when this member knows a leader of its group, else 0.",
                    int(status.leader is not None),
                ),
                (
                    "timemachine_raft_commit_index",
                    "The highest log index this member knows committed.",
                    status.commit_index,
                ),
                (
                    "timemachine_raft_applied_index",
                    "The highest log index applied to this member's store.",
                    status.applied_index,
                ),
                (
                    "timemachine_raft_apply_lag",
                    "Entries in this member's log not yet applied (last index - applied).",
                    status.apply_lag,
                ),
                (
                    "timemachine_raft_stopped",
                    "1 when this member stopped on a disk or store failure, else 0.",
                    int(status.error is not None),
                ),
            )
            for name, doc, value in gauges:
                out.add(name, "gauge", doc, labels, value)
            totals = (
                (
                    "timemachine_raft_leader_changes",
                    "Terms in which this member learnt of a leader.",
                    counters.leader_changes,
                ),
                (
                    "timemachine_raft_proposals",
                    "Proposals (and membership changes) asked of this member.",
                    counters.proposals,
                ),
                (
                    "timemachine_raft_proposals_failed",
                    "Proposals refused (not the leader) or that failed (overwritten, "
                    "timed out, group closed).",
                    counters.proposals_failed,
                ),
                (
                    "timemachine_raft_snapshots_sent",
                    "Snapshot transfers this member began to a follower.",
                    counters.snapshots_sent,
                ),
                (
                    "timemachine_raft_snapshots_received",
                    "Leader snapshots this member installed.",
                    counters.snapshots_received,
                ),
            )
            for name, doc, value in totals:
                out.add(name, "counter", doc, labels, value)
            out.histogram(
                "timemachine_raft_commit_seconds",
                "On the leader, from a proposal to its entry applied (those that succeeded).",
                labels,
                counters.commit_seconds,
            )
        return iter(out)


class PeerCollector:
    """The connection and traffic of this node to each node it knows."""

    def __init__(self, peers: Callable[[], Mapping]):
        self._peers = peers

    def collect(self):
        out = _Families()
        for node_id, stats in sorted(self._peers().items()):
            labels = {"peer": node_id}
            out.add(
                "timemachine_peer_connected",
                "gauge",
                "1 when a connection to the peer is up (its Hello accepted), else 0.",
                labels,
                int(stats.connected),
            )
            totals = (
                ("timemachine_peer_frames_sent", "Frames (envelopes) sent.", stats.frames_sent),
                (
                    "timemachine_peer_frames_received",
                    "Frames (envelopes) received.",
                    stats.frames_received,
                ),
                ("timemachine_peer_bytes_sent", "Bytes of frames sent.", stats.bytes_sent),
                (
                    "timemachine_peer_bytes_received",
                    "Bytes of frames received.",
                    stats.bytes_received,
                ),
                (
                    "timemachine_peer_raft_messages_sent",
                    "Raft messages sent (of every group).",
                    stats.raft_messages_sent,
                ),
                (
                    "timemachine_peer_raft_messages_received",
                    "Raft messages received (of every group).",
                    stats.raft_messages_received,
                ),
                (
                    "timemachine_peer_raft_messages_dropped",
                    "Raft messages dropped: the peer was not connected, or one was too large.",
                    stats.raft_dropped,
                ),
                ("timemachine_peer_requests_sent", "Requests sent.", stats.requests_sent),
                (
                    "timemachine_peer_requests_received",
                    "Requests received.",
                    stats.requests_received,
                ),
                (
                    "timemachine_peer_request_timeouts",
                    "Requests sent that got no answer in time.",
                    stats.requests_timed_out,
                ),
                (
                    "timemachine_peer_request_failures",
                    "Requests that failed unanswered otherwise (not connected, connection "
                    "lost, too large).",
                    stats.requests_failed,
                ),
                (
                    "timemachine_peer_reconnects",
                    "Dials made again after a failure or a lost connection.",
                    stats.reconnects,
                ),
            )
            for name, doc, value in totals:
                out.add(name, "counter", doc, labels, value)
        return iter(out)
