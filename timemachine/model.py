"""The domain: jobs, routes, the commands of the shard logs, and their validation.

Everything here is a frozen, slotted dataclass that validates on construction, so a
value that exists is a valid one. Commands travel through the shard logs as protobuf
(`encode_command` / `decode_command`); the rest of the code only sees these classes.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from timemachine._pb import timemachine_pb2 as pb
from timemachine.errors import InvalidField

ID_ALPHABET = re.compile(r"\A[A-Za-z0-9._:@-]+\Z")
MAX_JOB_ID = 256
MAX_COLLECTION = 128
MAX_ROUTE_ID = 128
MAX_META_BYTES = 64 * 1024

DEFAULT_TIMEOUT_MS = 5000
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_BACKOFF_MS = 500
DEFAULT_MAX_IN_FLIGHT = 64
MAX_BACKOFF_MS = 5 * 60 * 1000

ROUTE_TYPES = ("http", "redis")
REDIS_MODES = ("xadd", "lpush", "publish")


def check_name(field_name: str, value: object, max_length: int) -> str:
    """Return ``value`` if it is a valid id-like name, else raise `InvalidField`."""
    if not isinstance(value, str) or not value:
        raise InvalidField(field_name, "must be a non-empty string")
    if len(value) > max_length:
        raise InvalidField(field_name, f"must be at most {max_length} characters")
    if not ID_ALPHABET.match(value):
        raise InvalidField(field_name, "may contain only A-Z a-z 0-9 . _ : @ -")
    return value


def _check_int(field_name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(field_name, "must be an integer")
    if not low <= value <= high:
        raise InvalidField(field_name, f"must be between {low} and {high}")
    return value


class JobStatus(str, enum.Enum):
    """Where a job stands. FIRING exists only in memory, while a delivery is out."""

    SCHEDULED = "scheduled"
    FIRING = "firing"
    FIRED = "fired"
    FAILED = "failed"


# The job lifecycle: which status may follow which. A replace (PUT/POST of the
# same id) starts a new version at SCHEDULED from any status.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.SCHEDULED: frozenset({JobStatus.FIRING}),
    JobStatus.FIRING: frozenset({JobStatus.FIRED, JobStatus.SCHEDULED, JobStatus.FAILED}),
    JobStatus.FIRED: frozenset(),
    JobStatus.FAILED: frozenset(),
}


def can_transition(old: JobStatus, new: JobStatus) -> bool:
    return new in TRANSITIONS[old]


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What a client asks for: deliver ``meta`` to ``route`` at ``trigger_ms``.

    ``meta`` is the JSON text of the client's value, as it will be delivered.
    """

    collection: str
    id: str
    trigger_ms: int
    meta: str
    route: str

    def __post_init__(self):
        check_name("collection", self.collection, MAX_COLLECTION)
        check_name("id", self.id, MAX_JOB_ID)
        _check_int("trigger_ms", self.trigger_ms, 0, 2**62)
        if not isinstance(self.meta, str):
            raise InvalidField("meta", "must be JSON text")
        if len(self.meta.encode("utf-8")) > MAX_META_BYTES:
            raise InvalidField("meta", f"must be at most {MAX_META_BYTES} bytes serialized")
        check_name("route", self.route, MAX_ROUTE_ID)

    @property
    def key(self) -> tuple[str, str]:
        return (self.collection, self.id)


@dataclass(frozen=True, slots=True)
class Job:
    """A stored job at one version (the log index of the command that wrote it).

    ``due_ms`` is when it fires next: ``trigger_ms`` at first, later a retry time.
    """

    collection: str
    id: str
    trigger_ms: int
    meta: str
    route: str
    version: int
    status: JobStatus = JobStatus.SCHEDULED
    due_ms: int = 0
    attempts: int = 0
    last_error: str | None = None
    fired_at_ms: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.collection, self.id)

    @property
    def idempotency_key(self) -> str:
        return f"{self.collection}/{self.id}/{self.version}"

    def to_json(self) -> dict:
        """The job as the REST API shows it (meta decoded by the caller if needed)."""
        return {
            "collection": self.collection,
            "id": self.id,
            "trigger_ms": self.trigger_ms,
            "route": self.route,
            "version": self.version,
            "status": self.status.value,
            "due_ms": self.due_ms,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "fired_at_ms": self.fired_at_ms,
        }


@dataclass(frozen=True, slots=True)
class Route:
    """Where jobs are delivered: an HTTP webhook or a Redis key."""

    id: str
    type: str
    webhook_url: str = ""
    redis_url: str = ""
    key: str = ""
    mode: str = "xadd"
    timeout_ms: int = DEFAULT_TIMEOUT_MS
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_ms: int = DEFAULT_BACKOFF_MS
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self):
        check_name("id", self.id, MAX_ROUTE_ID)
        if self.type not in ROUTE_TYPES:
            raise InvalidField("type", "must be 'http' (or 'REST') or 'redis'")
        if self.type == "http":
            if not isinstance(self.webhook_url, str) or not re.match(
                r"\Ahttps?://[^\s/]+", self.webhook_url
            ):
                raise InvalidField("webhook_url", "must be an http:// or https:// URL")
        else:
            if not isinstance(self.redis_url, str) or not re.match(
                r"\Aredis://[^\s/]+", self.redis_url
            ):
                raise InvalidField("redis_url", "must be a redis://host:port/db URL")
            if not isinstance(self.key, str) or not self.key or len(self.key) > 1024:
                raise InvalidField("key", "must be a non-empty string of at most 1024 bytes")
            if self.mode not in REDIS_MODES:
                raise InvalidField("mode", "must be one of xadd, lpush, publish")
        _check_int("timeout_ms", self.timeout_ms, 1, 10 * 60 * 1000)
        _check_int("max_attempts", self.max_attempts, 1, 1000)
        _check_int("backoff_ms", self.backoff_ms, 1, MAX_BACKOFF_MS)
        _check_int("max_in_flight", self.max_in_flight, 1, 100_000)

    def to_json(self) -> dict:
        body = {"id": self.id, "type": self.type}
        if self.type == "http":
            body["webhook_url"] = self.webhook_url
        else:
            body.update(redis_url=self.redis_url, key=self.key, mode=self.mode)
        body.update(
            timeout_ms=self.timeout_ms,
            max_attempts=self.max_attempts,
            backoff_ms=self.backoff_ms,
            max_in_flight=self.max_in_flight,
        )
        return body


# ---- commands: what goes through a shard log ---------------------------------


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
        _check_int("shards", self.shards, 1, 4096)
        _check_int("replicas", self.replicas, 1, 99)
        if self.placement and len(self.placement) != self.shards:
            raise InvalidField("placement", "must name the replicas of every shard")


Command = PutJobs | DeleteJob | JobOutcome | PutRoute | DeleteRoute | Configure


def _route_to_pb(route: Route) -> pb.Route:
    return pb.Route(
        id=route.id,
        type=route.type,
        webhook_url=route.webhook_url,
        redis_url=route.redis_url,
        key=route.key,
        mode=route.mode,
        timeout_ms=route.timeout_ms,
        max_attempts=route.max_attempts,
        backoff_ms=route.backoff_ms,
        max_in_flight=route.max_in_flight,
    )


def _route_from_pb(msg: pb.Route) -> Route:
    return Route(
        id=msg.id,
        type=msg.type,
        webhook_url=msg.webhook_url,
        redis_url=msg.redis_url,
        key=msg.key,
        mode=msg.mode,
        timeout_ms=msg.timeout_ms,
        max_attempts=msg.max_attempts,
        backoff_ms=msg.backoff_ms,
        max_in_flight=msg.max_in_flight,
    )


def command_to_pb(command: Command) -> pb.Command:
    """The protobuf form of a command."""
    if isinstance(command, PutJobs):
        return pb.Command(
            put_jobs=pb.PutJobs(
                jobs=[
                    pb.JobSpec(
                        collection=j.collection,
                        id=j.id,
                        trigger_ms=j.trigger_ms,
                        meta=j.meta.encode("utf-8"),
                        route=j.route,
                    )
                    for j in command.jobs
                ]
            )
        )
    if isinstance(command, DeleteJob):
        return pb.Command(delete_job=pb.DeleteJob(collection=command.collection, id=command.id))
    if isinstance(command, JobOutcome):
        return pb.Command(
            outcome=pb.JobOutcome(
                kind=int(command.kind),
                collection=command.collection,
                id=command.id,
                version=command.version,
                attempts=command.attempts,
                at_ms=command.at_ms,
                last_error=command.last_error or "",
            )
        )
    if isinstance(command, PutRoute):
        return pb.Command(put_route=_route_to_pb(command.route))
    if isinstance(command, DeleteRoute):
        return pb.Command(delete_route=pb.DeleteRoute(id=command.id))
    if isinstance(command, Configure):
        return pb.Command(
            configure=pb.ClusterConfig(
                shards=command.shards,
                replicas=command.replicas,
                placement=[
                    pb.ShardPlacement(shard=shard, replicas=list(replicas))
                    for shard, replicas in enumerate(command.placement)
                ],
            )
        )
    raise TypeError(f"not a command: {command!r}")


def command_from_pb(msg: pb.Command) -> Command:
    """The command a protobuf `Command` holds."""
    kind = msg.WhichOneof("kind")
    if kind == "put_jobs":
        return PutJobs(
            tuple(
                JobSpec(j.collection, j.id, j.trigger_ms, j.meta.decode("utf-8"), j.route)
                for j in msg.put_jobs.jobs
            )
        )
    if kind == "delete_job":
        return DeleteJob(msg.delete_job.collection, msg.delete_job.id)
    if kind == "outcome":
        o = msg.outcome
        return JobOutcome(
            OutcomeKind(o.kind), o.collection, o.id, o.version, o.attempts, o.at_ms,
            o.last_error or None,
        )
    if kind == "put_route":
        return PutRoute(_route_from_pb(msg.put_route))
    if kind == "delete_route":
        return DeleteRoute(msg.delete_route.id)
    if kind == "configure":
        c = msg.configure
        placement = [()] * len(c.placement)
        for p in c.placement:
            placement[p.shard] = tuple(p.replicas)
        return Configure(c.shards, c.replicas, tuple(placement))
    raise ValueError("empty command record")


def encode_command(command: Command) -> bytes:
    """The bytes of a log entry carrying ``command``."""
    return command_to_pb(command).SerializeToString()


def decode_command(data: bytes) -> Command:
    """The command of a log entry's bytes (inverse of `encode_command`)."""
    msg = pb.Command()
    msg.ParseFromString(data)
    return command_from_pb(msg)
