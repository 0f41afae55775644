"""Commands: what goes through a shard log (or the meta log) and is applied by its store."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain.errors import InvalidField
from timemachine.domain.jobs import JobSpec
from timemachine.domain.names import check_int
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
class PutRoute:
    route: Route


@dataclass(frozen=True, slots=True)
class DeleteRoute:
    id: str


@dataclass(frozen=True, slots=True)
class Configure:
    """Cluster settings: shard count, replication factor, replica placement."""

    shards: int
    replicas: int
    placement: tuple[tuple[str, ...], ...] = field(default=())

    def __post_init__(self):
        check_int("shards", self.shards, 1, 4096)
        check_int("replicas", self.replicas, 1, 99)
        if self.placement and len(self.placement) != self.shards:
            raise InvalidField("placement", "must name the replicas of every shard")


Command = PutJobs | DeleteJob | JobOutcome | PutRoute | DeleteRoute | Configure
