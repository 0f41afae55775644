"""Commands: what goes through a shard log (or the meta log) and is applied by its store."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain.errors import InvalidField
from timemachine.domain.jobs import JobEvent, JobSpec
from timemachine.domain.names import MAX_NODE_ID, check_address, check_int, check_name
from timemachine.domain.routes import Route


@dataclass(frozen=True, slots=True)
class PutJobs:
    """Create or replace jobs of one shard."""

    jobs: tuple[JobSpec, ...]

    def __post_init__(self):
        if not self.jobs:
            raise ValueError("PutJobs needs at least one job")


@dataclass(frozen=True, slots=True)
class DeleteJob:
    collection: str
    id: str


class OutcomeKind(enum.IntEnum):
    FIRED = pb.JobOutcome.FIRED
    RETRY = pb.JobOutcome.RETRY
    FAILED = pb.JobOutcome.FAILED

    @property
    def event(self) -> JobEvent:
        """The lifecycle event this outcome is."""
        return _OUTCOME_EVENTS[self]


_OUTCOME_EVENTS = {
    OutcomeKind.FIRED: JobEvent.DELIVERED,
    OutcomeKind.RETRY: JobEvent.RETRY,
    OutcomeKind.FAILED: JobEvent.GIVE_UP,
}


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """The result of one delivery of ``version`` of a job.

    FIRED: ``at_ms`` is the delivery time. RETRY: ``at_ms`` is when to try again.
    FAILED: ``at_ms`` is when it gave up. Stale versions change nothing.
    """

    kind: OutcomeKind
    collection: str
    id: str
    version: int
    attempts: int
    at_ms: int
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class JobVersion:
    """One version of one job: what a purge names, so that a replace wins over it."""

    collection: str
    id: str
    version: int


@dataclass(frozen=True, slots=True)
class PurgeJobs:
    """Remove fired or failed jobs whose retention ended (``--retain-fired/-failed``).

    The leader picks the jobs; the command names each at the version that finished,
    so every replica removes the same rows and a job replaced since (a new version)
    stays.
    """

    jobs: tuple[JobVersion, ...]

    def __post_init__(self):
        if not self.jobs:
            raise ValueError("PurgeJobs needs at least one job")


@dataclass(frozen=True, slots=True)
class PutRoute:
    route: Route


@dataclass(frozen=True, slots=True)
class DeleteRoute:
    id: str


@dataclass(frozen=True, slots=True)
class Configure:
    """Cluster settings: shard count, replication factor, replica placement.

    ``placement`` names where each shard's replicas should be. ``origin`` is the
    placement the shards' Raft groups were created with, when a replica move has
    changed it since (empty: ``placement`` is the origin, a new shard map): a node
    opening a replica it never held starts the group with the origin's members
    if it is one of them, and otherwise waits, blank, for the leader's snapshot.

    ``map_index`` tells shard maps apart: the meta log index at which this map was
    made anew (0 in a proposal of a new map: the meta store sets it as it applies
    it, the same on every node). A replica on disk from an earlier map of the same
    shard number (its node was away when the map was remade) belongs to a group
    that no longer exists and must not meet the new one.
    """

    shards: int
    replicas: int
    placement: tuple[tuple[str, ...], ...] = field(default=())
    origin: tuple[tuple[str, ...], ...] = field(default=())
    map_index: int = 0

    def __post_init__(self):
        check_int("shards", self.shards, 1, 4096)
        check_int("replicas", self.replicas, 1, 99)
        if self.placement and len(self.placement) != self.shards:
            raise InvalidField("placement", "must name the replicas of every shard")
        if self.origin and len(self.origin) != self.shards:
            raise InvalidField("origin", "must name the first replicas of every shard")
        check_int("map_index", self.map_index, 0, 2**63 - 1)

    def first_replicas(self, shard: int) -> tuple[str, ...]:
        """The members ``shard``'s Raft group was created with."""
        return (self.origin or self.placement)[shard]

    def moved_to(self, replicas: int, placement) -> Configure:
        """This shard map with ``replicas`` per shard, moving to ``placement``."""
        return Configure(
            self.shards, replicas, placement, self.origin or self.placement, self.map_index
        )


@dataclass(frozen=True, slots=True)
class PutMember:
    """A node joins the cluster (or moves): where its peer protocol and REST API are,
    and which data dir it runs on (`timemachine.cluster.identity`).

    Addresses are ``host:port``; ``http_address`` may be empty when unknown. An empty
    ``incarnation`` leaves the one recorded as it is (a move, or a build that did not
    send one).
    """

    node_id: str
    peer_address: str
    http_address: str = ""
    incarnation: str = ""

    def __post_init__(self):
        check_name("node_id", self.node_id, MAX_NODE_ID)
        check_address("raft_address", self.peer_address)
        if self.http_address:
            check_address("http_address", self.http_address)


@dataclass(frozen=True, slots=True)
class RemoveMember:
    node_id: str


@dataclass(frozen=True, slots=True)
class MemberLeaving:
    """A member is being removed (``leaving``): placement leaves it out, so its
    replicas move off it and none come back, whichever node leads the meta group; or
    it no longer is (it joined again)."""

    node_id: str
    leaving: bool = True


Command = (
    PutJobs
    | DeleteJob
    | JobOutcome
    | PurgeJobs
    | PutRoute
    | DeleteRoute
    | Configure
    | PutMember
    | RemoveMember
    | MemberLeaving
)
