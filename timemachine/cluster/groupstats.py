"""What a `RaftGroup` counts about itself, and the snapshot of its state it reports.

The counters are plain integers bumped on the paths they count (a proposal path runs
thousands of times a second: no locks, no allocation per proposal); `GroupStatus` is
made only when asked (a scrape of ``/metrics``, a ``GET /cluster/shards``).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

#: Upper bounds (seconds) of the commit latency buckets: a one-member group commits on
#: its own fsync (about a millisecond), a replicated one after a round trip as well.
COMMIT_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class LatencyHistogram:
    """Observations counted into fixed buckets (``counts[i]``: those at most
    ``bounds[i]``, not cumulative; the last: those above every bound)."""

    __slots__ = ("bounds", "counts", "sum", "total")

    def __init__(self, bounds: tuple[float, ...] = COMMIT_BUCKETS):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at most it)`` per bucket, ``inf`` last."""
        out = []
        seen = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            seen += count
            out.append((bound, seen))
        return out


class GroupCounters:
    """Counts of one member since it was built (they restart with the process).

    ``proposals``: proposals and membership changes asked of this member;
    ``proposals_failed``: those refused (not the leader, not serving) or that failed
    later (overwritten by a newer leader, not applied in time, the group closed or
    stopped); ``leader_changes``: terms in which this member learnt of a leader;
    ``snapshots_sent``: snapshot transfers it began to a follower; ``snapshots_received``:
    leader snapshots it installed; ``commit_seconds``: on the leader, from a proposal to
    its entry applied here, for those that succeeded.
    """

    __slots__ = (
        "commit_seconds",
        "leader_changes",
        "proposals",
        "proposals_failed",
        "snapshots_received",
        "snapshots_sent",
    )

    def __init__(self):
        self.proposals = 0
        self.proposals_failed = 0
        self.leader_changes = 0
        self.snapshots_sent = 0
        self.snapshots_received = 0
        self.commit_seconds = LatencyHistogram()


@dataclass(frozen=True, slots=True)
class GroupStatus:
    """One member's view of its group at one moment.

    ``role`` is the core's (``leader``, ``follower``, ``pre_candidate``, ``candidate``,
    ``learner``), None while the member is not running (closed, or stopped by
    ``error``); ``leader`` is the node it believes leads (None: none known);
    ``lease``: it leads with a valid lease (it fires and serves lease reads).
    ``counters`` are the member's own, live (read them at once).
    """

    group: int
    name: str
    role: str | None
    term: int
    leader: str | None
    lease: bool
    commit_index: int
    applied_index: int
    last_index: int
    voters: tuple[str, ...]
    learners: tuple[str, ...]
    error: str | None
    counters: GroupCounters

    @property
    def apply_lag(self) -> int:
        """Entries in this member's log not yet applied to its store."""
        return max(0, self.last_index - self.applied_index)
