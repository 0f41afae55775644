"""Jobs: what a client asks for (`JobSpec`), what is stored (`Job`), and its lifecycle."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from timemachine.domain.errors import InvalidField
from timemachine.domain.names import MAX_COLLECTION, MAX_JOB_ID, MAX_ROUTE_ID, check_int, check_name

MAX_META_BYTES = 64 * 1024


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
        check_int("trigger_ms", self.trigger_ms, 0, 2**62)
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
