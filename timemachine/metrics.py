"""The node's Prometheus metrics, on a registry of its own (one per node)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
