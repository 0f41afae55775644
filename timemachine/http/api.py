"""The REST API of a node (API.md), on Klein.

Handlers stay thin: parse the request into model values (whose constructors do the
validation), call the `Coordinator` or the `Node`, format the answer. Every error
becomes ``{"error": <for humans>, "code": <for programs>}`` in the error handlers at
the end of `TimeMachineAPI`, the one place that maps exceptions to statuses.

Choices this module makes where API.md leaves room:

* A job without ``meta`` carries JSON ``null``. ``meta`` is stored as the client's
  JSON text of it, from its first to its last character, and delivered and shown
  (GET) as that text.
* ``trigger_ms`` must be a JSON integer. ``trigger_time`` is either a JSON integer
  (epoch ms) or an RFC 3339 string with a ``Z`` or ``+hh:mm`` offset; fractions of a
  millisecond are truncated. Giving both fields is an error.
* ``PUT /job/{collection}/{id}`` and ``PUT /route/{id}`` create or replace, like POST.
* A job list answers ``{"jobs": [...], "next_cursor": <id or null>}``; pass
  ``next_cursor`` back as ``cursor`` for the next page.
* ``POST /cluster/configure`` keeps the current value of a field that is left out.
* A method a path does not support gets ``405 E_METHOD_NOT_ALLOWED``; an unknown path
  ``404 E_NOT_FOUND``.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from io import BytesIO

from klein import Klein
from twisted.logger import Logger
from twisted.web import server
from werkzeug import exceptions as http_exceptions

from timemachine.domain.commands import Configure
from timemachine.domain.errors import (
    InvalidField,
    StorageError,
    TimeMachineError,
    TooLarge,
    Unavailable,
)
from timemachine.domain.jobs import Job, JobSpec, JobStatus
from timemachine.domain.names import MAX_COLLECTION, MAX_JOB_ID, MAX_ROUTE_ID, check_name
from timemachine.domain.routes import Route
from timemachine.http.parsing import decode_json

MAX_BODY_BYTES = 1024 * 1024
MAX_NODE_ID = 128
MAX_BATCH = 10_000
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
LISTABLE_STATUSES = (JobStatus.SCHEDULED.value, JobStatus.FIRED.value, JobStatus.FAILED.value)

JSON_CONTENT_TYPE = b"application/json"
# The Prometheus text format the scrapers of every version understand.
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# A one-member meta group never holds an election: it is always in its first term.
SINGLE_NODE_TERM = 1

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
# A job body's members kept as the client's JSON text.
JOB_RAW_MEMBERS = frozenset({"meta"})


# ---- the request body limit ------------------------------------------------------------


class LimitedRequest(server.Request):
    """A request that never buffers more than `max_body_bytes` of body.

    A larger body (announced by Content-Length, or found while reading a chunked one)
    is read and dropped, and `body_too_large` is set; the API then answers ``413
    E_TOO_LARGE`` without parsing anything.
    """

    max_body_bytes = MAX_BODY_BYTES
    body_too_large = False
    _body_received = 0

    def gotLength(self, length):
        if length is not None and length > self.max_body_bytes:
            self.body_too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.max_body_bytes:
            self.body_too_large = True
            # Free what was buffered: the request is refused anyway.
            self.content.close()
            self.content = BytesIO()
            return
        super().handleContentChunk(data)


class _Site(server.Site):
    """Requests are counted in the metrics instead of written to an access log: a log
    line per request costs ~10% of a create. Errors are still logged by the API."""

    def __init__(self, resource, metrics, **kwargs):
        super().__init__(resource, **kwargs)
        self._metrics = metrics

    def log(self, request):
        self._metrics.http_requests.labels(
            request.method.decode("ascii", "replace"), str(request.code)
        ).inc()


def make_site(api: TimeMachineAPI, metrics) -> server.Site:
    """The `Site` serving ``api``, with the request body limit; requests are counted
    in ``metrics`` (a `timemachine.metrics.Metrics`)."""
    # Every body here is JSON: twisted.web's parsing of form submissions (which runs
    # the stdlib's email header parser on each POST's Content-Type) is pure cost.
    site = _Site(
        api.resource(),
        metrics,
        requestFactory=LimitedRequest,
        parsePOSTFormSubmission=False,
    )
    # Tracebacks are logged (see `TimeMachineAPI.internal_error`), never sent.
    site.displayTracebacks = False
    return site


# ---- parsing ------------------------------------------------------------------------------


def read_json(request, raw_members: frozenset[str] = frozenset()):
    """The JSON value of the request body; raises `TooLarge` or `BadJSON`.

    Members named in ``raw_members`` come as `JSONText` (see `decode_json`).
    """
    if getattr(request, "body_too_large", False):
        raise TooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    # A request not made by `LimitedRequest` (tests over `resource()`) is checked here.
    data = request.content.read(MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise TooLarge(f"request body is larger than {MAX_BODY_BYTES} bytes")
    return decode_json(data, raw_members)


def read_object(request, raw_members: frozenset[str] = frozenset()) -> dict:
    """The request body, which must be a JSON object."""
    body = read_json(request, raw_members)
    if not isinstance(body, dict):
        raise InvalidField("body", "must be a JSON object")
    return body


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


def query_arg(request, name: str) -> str | None:
    """The first value of query parameter ``name``, or None."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidField(name, "is not UTF-8") from None


def list_limit(raw: str | None) -> int:
    """The page size of a job list (``limit``), 1..MAX_LIST_LIMIT."""
    if raw is None:
        return DEFAULT_LIST_LIMIT
    if not _LIMIT.match(raw) or not 1 <= int(raw) <= MAX_LIST_LIMIT:
        raise InvalidField("limit", f"must be an integer between 1 and {MAX_LIST_LIMIT}")
    return int(raw)


# ---- formatting ---------------------------------------------------------------------------


def job_json(job: Job) -> str:
    """A job as the API shows it, as JSON text: `Job.to_json` and ``meta``.

    ``meta`` is spliced in as stored: decoding and encoding it again would rewrite
    the client's numbers, escapes and key order.
    """
    fields = json.dumps(job.to_json())
    return f'{fields[:-1]}, "meta": {job.meta}}}'


def jobs_page_json(jobs: list[Job], next_cursor: str | None) -> str:
    """A page of a job list as JSON text: ``{"jobs": [...], "next_cursor": ...}``."""
    listed = ", ".join(job_json(job) for job in jobs)
    return f'{{"jobs": [{listed}], "next_cursor": {json.dumps(next_cursor)}}}'


def respond(request, body, status: int = 200) -> bytes:
    """Set the status and JSON content type; return the encoded ``body``."""
    # ASCII escapes: any stored text encodes, whatever it holds.
    return respond_text(request, json.dumps(body), status)


def respond_text(request, text: str, status: int = 200) -> bytes:
    """`respond` with a body that is JSON text already."""
    # Stored meta text came from UTF-8 and holds no lone surrogate: it encodes.
    data = text.encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_CONTENT_TYPE)
    request.setHeader(b"Content-Length", b"%d" % len(data))
    return data


_OK = {"status": "ok"}


# ---- the API ------------------------------------------------------------------------------


class TimeMachineAPI:
    """The REST endpoints of one node.

    ``coordinator`` serves jobs and routes, ``node`` (a `timemachine.service.Node`)
    the cluster calls, ``metrics`` the Prometheus text.
    """

    app = Klein()
    log = Logger()

    def __init__(self, coordinator, node, metrics):
        self._coordinator = coordinator
        self._node = node
        self._metrics = metrics

    def resource(self):
        """The twisted.web resource serving this API (mounted by `make_site`)."""
        return self.app.resource()

    # -- jobs

    @app.route("/job/<collection>", methods=["POST"])
    async def create_jobs(self, request, collection):
        """One job (an object) or a batch (an array), each item standing alone."""
        check_name("collection", collection, MAX_COLLECTION)
        body = read_json(request, JOB_RAW_MEMBERS)
        if isinstance(body, list):
            return await self._create_batch(request, collection, body)
        if not isinstance(body, dict):
            raise InvalidField("body", "must be a JSON object (a job) or an array (a batch)")
        index, _ = await self._coordinator.put_job(job_spec(collection, body))
        return respond(request, {"status": "ok", "offset": index})

    async def _create_batch(self, request, collection, items):
        if not items:
            raise InvalidField("body", "a batch must hold at least one job")
        if len(items) > MAX_BATCH:
            raise InvalidField("body", f"a batch holds at most {MAX_BATCH} jobs")
        specs = []
        for item in items:
            # Each item stands alone: a bad one is reported, the others go ahead.
            try:
                specs.append(job_spec(collection, item))
            except TimeMachineError as e:
                specs.append(e)
        outcomes = await self._coordinator.put_jobs(specs)
        results = []
        for item, outcome in zip(items, outcomes, strict=True):
            job_id = item.get("id") if isinstance(item, dict) else None
            if isinstance(outcome, TimeMachineError):
                error = {"code": outcome.code, "error": outcome.message}
                results.append({"id": job_id, "status": "error", **error})
            else:
                results.append({"id": job_id, "status": "ok", "version": outcome.version})
        return respond(request, {"status": "ok", "results": results})

    @app.route("/job/<collection>", methods=["GET"])
    async def list_jobs(self, request, collection):
        """A page of a collection's jobs, by id, optionally of one status."""
        check_name("collection", collection, MAX_COLLECTION)
        # An empty parameter (``status=``) means the same as an absent one.
        status = query_arg(request, "status") or None
        if status is not None and status not in LISTABLE_STATUSES:
            raise InvalidField("status", f"must be one of {', '.join(LISTABLE_STATUSES)}")
        limit = list_limit(query_arg(request, "limit") or None)
        cursor = query_arg(request, "cursor") or None
        if cursor is not None:
            check_name("cursor", cursor, MAX_JOB_ID)
        jobs, next_cursor = await self._coordinator.list_jobs(collection, status, limit, cursor)
        return respond_text(request, jobs_page_json(jobs, next_cursor))

    @app.route("/job/<collection>/<job_id>", methods=["GET"])
    async def get_job(self, request, collection, job_id):
        """A job with its status, attempts and last error."""
        check_name("collection", collection, MAX_COLLECTION)
        check_name("id", job_id, MAX_JOB_ID)
        job = await self._coordinator.get_job(collection, job_id)
        return respond_text(request, job_json(job))

    @app.route("/job/<collection>/<job_id>", methods=["PUT"])
    async def put_job(self, request, collection, job_id):
        """Create or replace the job named by the URL."""
        check_name("collection", collection, MAX_COLLECTION)
        check_name("id", job_id, MAX_JOB_ID)
        spec = job_spec(collection, read_object(request, JOB_RAW_MEMBERS), url_id=job_id)
        index, _ = await self._coordinator.put_job(spec)
        return respond(request, {"status": "ok", "offset": index})

    @app.route("/job/<collection>/<job_id>", methods=["DELETE"])
    async def delete_job(self, request, collection, job_id):
        """Delete a job."""
        # Checked first so that a name no job can have never reaches a shard log.
        check_name("collection", collection, MAX_COLLECTION)
        check_name("id", job_id, MAX_JOB_ID)
        index = await self._coordinator.delete_job(collection, job_id)
        return respond(request, {"status": "ok", "offset": index})

    # -- routes

    @app.route("/route", methods=["POST"])
    @app.route("/route/", methods=["POST"])
    async def create_route(self, request):
        """Create or replace a route."""
        index = await self._coordinator.put_route(route_of(read_object(request)))
        return respond(request, {"status": "ok", "offset": index})

    @app.route("/route", methods=["GET"])
    @app.route("/route/", methods=["GET"])
    def list_routes(self, request):
        """Every route, by id."""
        routes = self._coordinator.routes()
        return respond(request, {"routes": [route.to_json() for route in routes]})

    @app.route("/route/<route_id>", methods=["GET"])
    def get_route(self, request, route_id):
        """One route."""
        return respond(request, self._coordinator.get_route(route_id).to_json())

    @app.route("/route/<route_id>", methods=["PUT"])
    async def put_route(self, request, route_id):
        """Create or replace the route named by the URL."""
        check_name("id", route_id, MAX_ROUTE_ID)
        route = route_of(read_object(request), url_id=route_id)
        index = await self._coordinator.put_route(route)
        return respond(request, {"status": "ok", "offset": index})

    @app.route("/route/<route_id>", methods=["DELETE"])
    async def delete_route(self, request, route_id):
        """Delete a route."""
        check_name("id", route_id, MAX_ROUTE_ID)
        index = await self._coordinator.delete_route(route_id)
        return respond(request, {"status": "ok", "offset": index})

    # -- health and cluster

    @app.route("/health", methods=["GET"])
    def health(self, request):
        """The process answers."""
        return respond(request, _OK)

    @app.route("/ready", methods=["GET"])
    def ready(self, request):
        """200 once this node serves its shards, else 503 E_UNAVAILABLE (and why)."""
        unavailable = self._coordinator.unavailable_shards
        if unavailable:
            reasons = "; ".join(f"shard {s}: {unavailable[s]}" for s in sorted(unavailable))
            raise Unavailable(f"this node cannot serve shards {sorted(unavailable)}: {reasons}")
        if not self._coordinator.ready():
            raise Unavailable("this node does not serve its shards yet")
        return respond(request, _OK)

    def _http_address(self) -> str | None:
        port = self._node.port
        if port is None:
            return None
        host = port.getHost()
        return f"{host.host}:{host.port}"

    def _address(self) -> str:
        # A one-node build has no peer endpoint: the HTTP address is the node's only one.
        return self._http_address() or self._node.node_id

    @app.route("/cluster", methods=["GET"])
    def cluster(self, request):
        """This node's view of the cluster (state of the meta group)."""
        ring = self._coordinator.ring
        meta_log = self._coordinator.meta_log
        # A one-member log commits on its own fsync and exposes what it applied;
        # the entries in between are never visible to a reader, so both indexes
        # report the applied one.
        applied = meta_log.applied_index
        return respond(
            request,
            {
                "node_id": self._node.node_id,
                "state": "Leader",
                "term": SINGLE_NODE_TERM,
                "leader": self._address(),
                "leader_id": self._node.node_id,
                "commit_index": applied,
                "applied_index": applied,
                "http_address": self._http_address(),
                "shards": ring.shards if ring is not None else 0,
                "replicas": ring.config.replicas if ring is not None else 0,
                "members": 1,
                "ready": self._coordinator.ready(),
            },
        )

    @app.route("/cluster/servers", methods=["GET"])
    def cluster_servers(self, request):
        """The members of the meta group."""
        server_entry = {
            "ID": self._node.node_id,
            "Address": self._address(),
            "Suffrage": "Voter",
            "http_address": self._http_address(),
        }
        return respond(request, {"servers": [server_entry], "leader": self._address()})

    @app.route("/cluster/shards", methods=["GET"])
    async def cluster_shards(self, request):
        """For each shard: replicas, leader, applied index, job count."""
        shards = await self._coordinator.shard_status()
        return respond(request, {"shards": shards})

    @app.route("/cluster/configure", methods=["POST"])
    async def cluster_configure(self, request):
        """Set the shard count and replication factor."""
        body = read_object(request)
        ring = self._coordinator.ring
        if "shards" in body:
            shards = body["shards"]
        elif ring is not None:
            shards = ring.shards
        else:
            raise InvalidField("shards", "is required: the cluster has no shard count yet")
        replicas = body.get("replicas", ring.config.replicas if ring is not None else 1)
        # Validated before the node acts: a bad value must change nothing.
        Configure(shards, replicas)
        config = await self._node.configure(shards, replicas)
        return respond(
            request, {"status": "ok", "shards": config.shards, "replicas": config.replicas}
        )

    @app.route("/cluster/join", methods=["POST"])
    def cluster_join(self, request):
        """Add a member: not in a one-node build (the body is checked first)."""
        body = read_object(request)
        check_name("node_id", body.get("node_id"), MAX_NODE_ID)
        _check_address("raft_address", body.get("raft_address"))
        if "http_address" in body:
            _check_address("http_address", body["http_address"])
        raise _single_node()

    @app.route("/cluster/remove", methods=["POST"])
    def cluster_remove(self, request):
        """Remove a member: not in a one-node build (the body is checked first)."""
        body = read_object(request)
        check_name("node_id", body.get("node_id"), MAX_NODE_ID)
        raise _single_node()

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        """The node's metrics in the Prometheus text format."""
        request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE)
        return self._metrics.render()

    # -- errors: the one place exceptions become responses (tried in this order)

    @app.handle_errors(TimeMachineError)
    def client_error(self, request, failure):
        """A `TimeMachineError`: its status, code and message."""
        error = failure.value
        return respond(request, error.to_json(), error.status)

    @app.handle_errors(StorageError)
    def storage_error(self, request, failure):
        """A local disk or database failure: 503, details only in the log."""
        self.log.failure(
            "storage failure serving {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        return respond(request, {"error": "storage failure", "code": "E_UNAVAILABLE"}, 503)

    @app.handle_errors(http_exceptions.NotFound)
    def unknown_path(self, request, failure):
        """No route matches the path."""
        path = request.path.decode("utf-8", "replace")
        return respond(request, {"error": f"no such path: {path}", "code": "E_NOT_FOUND"}, 404)

    @app.handle_errors(http_exceptions.MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        """The path exists, the method does not."""
        allowed = failure.value.valid_methods or []
        request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        method = request.method.decode("ascii", "replace")
        message = f"{method} is not allowed here; allowed: {', '.join(allowed)}"
        return respond(request, {"error": message, "code": "E_METHOD_NOT_ALLOWED"}, 405)

    @app.handle_errors(Exception)
    def internal_error(self, request, failure):
        """Anything else is a bug: 500, logged, no details sent."""
        if failure.check(http_exceptions.HTTPException):
            # Routing answers such as redirects: Klein's own handling is right.
            return failure
        self.log.failure(
            "unexpected error serving {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        return respond(request, {"error": "internal error", "code": "E_INTERNAL"}, 500)


_HOST_PORT = re.compile(r"\A\S+:[0-9]{1,5}\Z")


def _check_address(name: str, value) -> None:
    if not isinstance(value, str) or not _HOST_PORT.match(value):
        raise InvalidField(name, "must be a host:port string")


def _single_node() -> TimeMachineError:
    return TimeMachineError(
        "this build runs a one-node cluster: membership changes (join, remove) "
        "arrive with the multi-node cluster"
    )
