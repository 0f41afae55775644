"""The REST routes of a node (API.md), on Klein.

Handlers stay thin: parse the request into model values (whose constructors do the
validation), call the `Coordinator` or the `Node`, format the answer. Every error
becomes ``{"error": <for humans>, "code": <for programs>}`` in the error handlers at
the end of `TimeMachineAPI`, the one place that maps exceptions to statuses.

Parsing is `timemachine.http.parsing` (pure), limits `timemachine.http.limits`,
formatting `timemachine.http.responses`. Choices made here where API.md leaves room:

* ``PUT /job/{collection}/{id}`` and ``PUT /route/{id}`` create or replace, like POST.
* A job list answers ``{"jobs": [...], "next_cursor": <id or null>}``; pass
  ``next_cursor`` back as ``cursor`` for the next page.
* ``POST /cluster/configure`` keeps the current value of a field that is left out.
* A method a path does not support gets ``405 E_METHOD_NOT_ALLOWED``; an unknown path
  ``404 E_NOT_FOUND``.
"""

from __future__ import annotations

from klein import Klein
from twisted.logger import Logger
from werkzeug import exceptions as http_exceptions

from timemachine.domain.commands import Configure
from timemachine.domain.errors import (
    InvalidField,
    NotConfigured,
    ServedElsewhere,
    StorageError,
    TimeMachineError,
    TooLarge,
    Unavailable,
)
from timemachine.domain.names import (
    MAX_COLLECTION,
    MAX_JOB_ID,
    MAX_NODE_ID,
    MAX_ROUTE_ID,
    check_address,
    check_name,
)
from timemachine.http.limits import MAX_BATCH, MAX_BODY_BYTES
from timemachine.http.parsing import (
    JOB_RAW_MEMBERS,
    LISTABLE_STATUSES,
    job_spec,
    list_limit,
    route_of,
)
from timemachine.http.responses import (
    METRICS_CONTENT_TYPE,
    job_json,
    jobs_page_json,
    respond,
    respond_text,
)
from timemachine.http.strictjson import decode_json

# A one-member meta group never holds an election: it is always in its first term.


# ---- reading the request ---------------------------------------------------------------


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


def query_arg(request, name: str) -> str | None:
    """The first value of query parameter ``name``, or None."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidField(name, "is not UTF-8") from None


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
        index = await self._coordinator.put_job(job_spec(collection, body))
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
                results.append({"id": job_id, "status": "ok", "version": outcome})
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
        index = await self._coordinator.put_job(spec)
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
    async def list_routes(self, request):
        """Every route, by id."""
        routes = await self._coordinator.routes()
        return respond(request, {"routes": [route.to_json() for route in routes]})

    @app.route("/route/<route_id>", methods=["GET"])
    async def get_route(self, request, route_id):
        """One route."""
        route = await self._coordinator.get_route(route_id)
        return respond(request, route.to_json())

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
        failed = self._node.meta_log.failed
        if failed is not None:
            raise Unavailable(f"this node's member of the meta group stopped: {failed}")
        if not self._coordinator.ready():
            raise Unavailable("this node does not serve its shards yet")
        return respond(request, _OK)

    # The cluster calls that change the meta state run on its leader: sent to another
    # node, they are passed on to it (HTTP, as the client sent them).

    def _meta_leader_elsewhere(self) -> str | None:
        """The meta group's leader when it is another node (None when it is this one);
        `Unavailable` when no leader is known."""
        meta = self._node.meta_log
        if meta.leads:
            return None
        if meta.leader is None:
            raise Unavailable("the meta group has no leader now; retry")
        return meta.leader

    def _address_of(self, node_id: str | None) -> str:
        member = None if node_id is None else self._node.cluster_store.member(node_id)
        return "" if member is None else member.peer_address

    @app.route("/cluster", methods=["GET"])
    def cluster(self, request):
        """This node's view of the cluster (state of the meta group), with the keys
        upstream's Raft stats carry, as strings."""
        ring = self._coordinator.ring
        meta = self._node.meta_log
        core = meta.core
        conf = core.conf
        state = {"leader": "Leader", "follower": "Follower", "learner": "Follower"}.get(
            core.state, "Candidate"
        )
        configuration = [
            {"id": node, "suffrage": "Voter" if node in conf.voters else "Nonvoter"}
            for node in sorted(conf.voters | conf.learners)
        ]
        return respond(
            request,
            {
                "node_id": self._node.node_id,
                "state": state,
                "term": core.term,
                "leader": self._address_of(meta.leader),
                "leader_id": meta.leader,
                "commit_index": core.commit_index,
                "applied_index": meta.applied_index,
                "last_log_index": str(core.log.last_index()),
                "last_log_term": str(core.log.last_term()),
                "num_peers": str(max(0, len(conf.voters | conf.learners) - 1)),
                "latest_configuration": str(configuration),
                "http_address": self._node._http_address,
                "shards": ring.shards if ring is not None else 0,
                "replicas": ring.config.replicas if ring is not None else 0,
                "members": len(self._node.cluster_store.members()),
                "ready": self._coordinator.ready(),
            },
        )

    @app.route("/cluster/servers", methods=["GET"])
    async def cluster_servers(self, request):
        """The members of the cluster: their peer (``Address``) and HTTP addresses,
        whether each votes in the meta group and whether it is being removed; every
        change acknowledged before the call is in the answer (503 while no meta leader
        confirms it)."""
        await self._coordinator.meta_read_barrier()
        conf = self._node.meta_log.conf
        leaving = self._node.cluster_store.leaving()
        servers = [
            {
                "ID": member.node_id,
                "Address": member.peer_address,
                "Suffrage": "Voter" if member.node_id in conf.voters else "Nonvoter",
                "http_address": member.http_address,
                "leaving": member.node_id in leaving,
            }
            for member in self._node.cluster_store.members()
        ]
        leader = self._address_of(self._node.meta_log.leader)
        return respond(request, {"servers": servers, "leader": leader})

    @app.route("/cluster/shards", methods=["GET"])
    async def cluster_shards(self, request):
        """For each shard: replicas, leader, applied index, job count (not with
        ``?jobs=0``)."""
        shards = await self._coordinator.shard_status(request.args.get(b"jobs") != [b"0"])
        return respond(request, {"shards": shards})

    @app.route("/cluster/shards/<int:shard>/leader", methods=["POST"])
    async def cluster_shard_leader(self, request, shard):
        """Hand a shard's leadership to one of its voters (``node_id``), on its leader."""
        body = read_object(request)
        check_name("node_id", body.get("node_id"), MAX_NODE_ID)
        leader = await self._node.transfer_shard(shard, body["node_id"])
        return respond(request, {"status": "ok", "shard": shard, "leader": leader})

    @app.route("/cluster/configure", methods=["POST"])
    async def cluster_configure(self, request):
        """Set the shard count and replication factor."""
        body = read_object(request)
        if not self._node.meta_log.blank:
            leader = self._meta_leader_elsewhere()
            if leader is not None:
                return await self._node.proxy(request, leader)
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
    async def cluster_join(self, request):
        """Admit a node (upstream's body: ``node_id``, ``raft_address``; optional
        ``http_address``, else the peer port - 100)."""
        body = read_object(request)
        check_name("node_id", body.get("node_id"), MAX_NODE_ID)
        check_address("raft_address", body.get("raft_address"))
        http_address = body.get("http_address")
        if http_address is not None:
            check_address("http_address", http_address)
        if self._node.meta_log.blank:
            raise NotConfigured("this node is in no cluster: it cannot admit one")
        leader = self._meta_leader_elsewhere()
        if leader is not None:
            return await self._node.proxy(request, leader)
        await self._node.join(body["node_id"], body["raft_address"], http_address)
        return respond(request, {"status": "ok", "node_id": body["node_id"]})

    @app.route("/cluster/remove", methods=["POST"])
    async def cluster_remove(self, request):
        """Take a member out of the cluster."""
        body = read_object(request)
        check_name("node_id", body.get("node_id"), MAX_NODE_ID)
        if self._node.meta_log.blank:
            raise NotConfigured("this node is in no cluster")
        leader = self._meta_leader_elsewhere()
        if leader is not None:
            return await self._node.proxy(request, leader)
        await self._node.remove(body["node_id"])
        return respond(request, {"status": "ok", "node_id": body["node_id"]})

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request):
        """The node's metrics in the Prometheus text format."""
        request.setHeader(b"Content-Type", METRICS_CONTENT_TYPE)
        return self._metrics.render()

    # -- errors: the one place exceptions become responses (tried in this order)

    @app.handle_errors(ServedElsewhere)
    def served_elsewhere(self, request, failure):
        """A read of a shard this node holds no replica of: a replica answers it."""
        return self._node.proxy_to_replica(request, failure.value.nodes)

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
