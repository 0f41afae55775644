"""Jobs: what a client asks for (`JobSpec`), what is stored (`Job`), and its lifecycle."""

from __future__ import annotations

import dataclasses
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


class JobEvent(str, enum.Enum):
    """What happens to a job between two statuses."""

    FIRE = "fire"  # its time came: a delivery goes out
    DELIVERED = "delivered"  # the route took it
    RETRY = "retry"  # the route failed for now: due again later
    GIVE_UP = "give up"  # the route refused it, or it ran out of attempts


# The job lifecycle, the one place a status change is decided: every change goes
# through `next_status`. A replace (PUT/POST of the same id) is not a transition: it
# writes a new version, SCHEDULED, whatever the old one's status was.
LIFECYCLE: dict[tuple[JobStatus, JobEvent], JobStatus] = {
    (JobStatus.SCHEDULED, JobEvent.FIRE): JobStatus.FIRING,
    (JobStatus.FIRING, JobEvent.DELIVERED): JobStatus.FIRED,
    (JobStatus.FIRING, JobEvent.RETRY): JobStatus.SCHEDULED,
    (JobStatus.FIRING, JobEvent.GIVE_UP): JobStatus.FAILED,
}


class IllegalTransition(Exception):
    """A status change the lifecycle does not allow: a bug in the caller, not bad input."""


def next_status(status: JobStatus, event: JobEvent) -> JobStatus:
    """The status ``event`` moves a job in ``status`` to; raises `IllegalTransition`."""
    try:
        return LIFECYCLE[(status, event)]
    except KeyError:
        raise IllegalTransition(f"a {status.value} job cannot take {event.value!r}") from None


def status_after_delivery(event: JobEvent) -> JobStatus:
    """The stored status a delivery's outcome leaves a scheduled job in.

    FIRING lives only in the executor's memory, so a store sees the fire and its
    outcome as one step: SCHEDULED --fire--> FIRING --event--> the result.
    """
    return next_status(next_status(JobStatus.SCHEDULED, JobEvent.FIRE), event)


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

    def moved(self, event: JobEvent) -> Job:
        """This version of the job after ``event``; `IllegalTransition` if not allowed."""
        return dataclasses.replace(self, status=next_status(self.status, event))

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


# A job as a row: `Job`'s fields in order, the status as its text. A plain tuple of
# strings and numbers, which the cyclic garbage collector stops tracking once it has
# seen it, where every `Job` stays tracked: whoever holds many jobs for long (the
# executor's due window) holds rows, so full collections do not grow with them.
JOB_FIELDS = tuple(field.name for field in dataclasses.fields(Job))
ROW_VERSION = JOB_FIELDS.index("version")
ROW_DUE_MS = JOB_FIELDS.index("due_ms")


def job_row(job: Job) -> tuple:
    """``job`` as a row (see `JOB_FIELDS`)."""
    return (
        job.collection,
        job.id,
        job.trigger_ms,
        job.meta,
        job.route,
        job.version,
        job.status.value,
        job.due_ms,
        job.attempts,
        job.last_error,
        job.fired_at_ms,
    )


def job_from_row(row) -> Job:
    """The `Job` of a row (see `JOB_FIELDS`)."""
    collection, job_id, trigger_ms, meta, route, version, status, *rest = row
    return Job(collection, job_id, trigger_ms, meta, route, version, JobStatus(status), *rest)
