"""Parsing request bodies and query values into domain values: pure, no request, no I/O.

Route methods read the body (`timemachine.http.strictjson`) and hand the JSON values
here; what comes back is a validated domain value (`JobSpec`, `Route`) or an
`InvalidField` naming the field.

Choices made where API.md leaves room:

* A job without ``meta`` carries JSON ``null``. ``meta`` is the client's JSON text of
  it, from its first to its last character (read as `JSONText`).
* ``trigger_ms`` must be a JSON integer. ``trigger_time`` is either a JSON integer
  (epoch ms) or an RFC 3339 string with a ``Z`` or ``+hh:mm`` offset; fractions of a
  millisecond are truncated. Giving both fields is an error.
* A route's ``type`` "REST" (any case) means "http"; only the fields of its type are kept.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from timemachine.domain.errors import InvalidField
from timemachine.domain.jobs import JobSpec, JobStatus
from timemachine.domain.routes import Route
from timemachine.http.limits import DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT

LISTABLE_STATUSES = (JobStatus.SCHEDULED.value, JobStatus.FIRED.value, JobStatus.FAILED.value)
# A job body's members kept as the client's JSON text.
JOB_RAW_MEMBERS = frozenset({"meta"})

_ROUTE_FIELDS = {
    "http": ("webhook_url",),
    "redis": ("redis_url", "key", "mode"),
}
_ROUTE_COMMON_FIELDS = ("timeout_ms", "max_attempts", "backoff_ms", "max_in_flight")

_RFC3339 = re.compile(
    r"\A(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))\Z"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)
_LIMIT = re.compile(r"\A[0-9]{1,9}\Z")


def meta_text(body: dict) -> str:
    """The stored (and delivered) form of a job's ``meta``: the client's JSON text.

    ``body`` was read with `JOB_RAW_MEMBERS`; a job without ``meta`` carries ``null``.
    """
    meta = body.get("meta")
    return "null" if meta is None else meta.text


def parse_rfc3339(text: str) -> int:
    """Epoch milliseconds of an RFC 3339 timestamp; raises `InvalidField`."""
    match = _RFC3339.match(text)
    if match is None:
        raise InvalidField(
            "trigger_time", "must be epoch milliseconds or an RFC 3339 timestamp with an offset"
        )
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        if zulu:
            tz = timezone.utc
        else:
            if int(off_h) > 23 or int(off_m) > 59:
                raise ValueError("offset out of range")
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            tz = timezone(-offset if sign == "-" else offset)
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=tz
        )
    except ValueError as e:
        raise InvalidField("trigger_time", f"is not a valid time: {e}") from None
    millis = int((fraction or "0")[:3].ljust(3, "0"))
    return (moment - _EPOCH) // _MILLISECOND + millis


def trigger_of(body: dict):
    """The ``trigger_ms`` a job body asks for (``trigger_ms`` or ``trigger_time``).

    The value is returned as given when it is not a time string, so that `JobSpec`
    applies the one integer rule.
    """
    if "trigger_ms" in body and "trigger_time" in body:
        raise InvalidField("trigger_ms", "give trigger_ms or trigger_time, not both")
    if "trigger_ms" in body:
        return body["trigger_ms"]
    if "trigger_time" not in body:
        raise InvalidField("trigger_ms", "is required (epoch ms; or trigger_time)")
    value = body["trigger_time"]
    if isinstance(value, str):
        return parse_rfc3339(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(
            "trigger_time", "must be epoch milliseconds (an integer) or an RFC 3339 string"
        )
    return value


def job_spec(collection: str, body, url_id: str | None = None) -> JobSpec:
    """The `JobSpec` of one job object; ``url_id`` is the id given by the URL (PUT)."""
    if not isinstance(body, dict):
        raise InvalidField("job", "must be a JSON object")
    job_id = body.get("id", url_id)
    if url_id is not None and job_id != url_id:
        raise InvalidField("id", f"must match the id in the URL ({url_id!r})")
    return JobSpec(
        collection=collection,
        id=job_id,
        trigger_ms=trigger_of(body),
        meta=meta_text(body),
        route=body.get("route"),
    )


def route_of(body: dict, url_id: str | None = None) -> Route:
    """The `Route` of a route object; ``type`` "REST" (any case) means "http"."""
    route_type = body.get("type")
    if isinstance(route_type, str):
        route_type = route_type.lower()
        if route_type == "rest":
            route_type = "http"
    route_id = body.get("id", url_id)
    if url_id is not None and route_id != url_id:
        raise InvalidField("id", f"must match the id in the URL ({url_id!r})")
    # Only the fields of the route's type are kept; the rest default in `Route`.
    names = _ROUTE_FIELDS.get(route_type, ()) + _ROUTE_COMMON_FIELDS
    return Route(
        id=route_id, type=route_type, **{name: body[name] for name in names if name in body}
    )


def list_limit(raw: str | None) -> int:
    """The page size of a job list (``limit``), 1..MAX_LIST_LIMIT."""
    if raw is None:
        return DEFAULT_LIST_LIMIT
    if not _LIMIT.match(raw) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise InvalidField("limit", f"must be an integer between 1 and {MAX_LIST_LIMIT}")
    return int(raw)


