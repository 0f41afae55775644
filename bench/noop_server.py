"""A no-op ``POST /job/{collection}`` on Klein: the floor the node's create is compared to.

Usage::

    python bench/noop_server.py --port 9000 [--quiet]

It does what the node's create endpoint (`timemachine.api.TimeMachineAPI.create_jobs`)
does up to the point where the node hands the job to its coordinator, with the node's
own functions: the same `Site` (`make_site`, with its body limit and request
counting), the same body
parsing (`read_json`), validation (`job_spec`, `check_name`) and response encoding
(`respond`) in an ``async`` Klein handler. Then it answers ``200 {"status": "ok",
"offset": n}`` (a batch: the per-item ``results``) without routing, logging to a
WAL, fsyncing or storing anything. The node / no-op ratio of the benchmark report is
therefore the share of this HTTP + JSON + validation ceiling the node keeps once the
coordinator, the write-ahead log, the fsync and the store are added.

Twisted's log goes to stdout as under ``twist``/``twistd -n``; ``--quiet`` turns it off.
"""

from __future__ import annotations

import argparse
import sys

from klein import Klein
from twisted.internet import endpoints
from twisted.logger import globalLogBeginner, textFileLogObserver

from timemachine.domain.errors import InvalidField, TimeMachineError
from timemachine.domain.names import MAX_COLLECTION, check_name
from timemachine.http.limits import MAX_BATCH
from timemachine.http.parsing import JOB_RAW_MEMBERS, job_spec
from timemachine.http.responses import respond
from timemachine.http.routes import read_json
from timemachine.http.site import make_site
from timemachine.metrics import Metrics


class NoopAPI:
    """The create endpoint with nothing behind it."""

    app = Klein()

    def __init__(self):
        # Stands in for the log index the node answers with.
        self.offset = 0

    def resource(self):
        """The resource `make_site` mounts, as for `TimeMachineAPI`."""
        return self.app.resource()

    @app.route("/job/<collection>", methods=["POST"])
    async def create_jobs(self, request, collection):
        check_name("collection", collection, MAX_COLLECTION)
        body = read_json(request, JOB_RAW_MEMBERS)
        if isinstance(body, list):
            return self._create_batch(request, collection, body)
        job_spec(collection, body)
        self.offset += 1
        return respond(request, {"status": "ok", "offset": self.offset})

    def _create_batch(self, request, collection, items):
        if not items:
            raise InvalidField("body", "a batch must hold at least one job")
        if len(items) > MAX_BATCH:
            raise InvalidField("body", f"a batch holds at most {MAX_BATCH} jobs")
        results = []
        for item in items:
            job_id = item.get("id") if isinstance(item, dict) else None
            try:
                job_spec(collection, item)
            except TimeMachineError as e:
                error = {"code": e.code, "error": e.message}
                results.append({"id": job_id, "status": "error", **error})
                continue
            self.offset += 1
            results.append({"id": job_id, "status": "ok", "version": self.offset})
        return respond(request, {"status": "ok", "results": results})

    @app.handle_errors(TimeMachineError)
    def client_error(self, request, failure):
        error = failure.value
        return respond(request, error.to_json(), error.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--quiet", action="store_true", help="log nothing (no access log)")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    if not args.quiet:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    site = make_site(NoopAPI(), Metrics())
    endpoint = endpoints.serverFromString(reactor, f"tcp:{args.port}:interface=127.0.0.1")
    failed = []

    def listen_failed(failure):
        failed.append(failure)
        print(failure.getErrorMessage(), file=sys.stderr)
        reactor.stop()

    # Listen once the reactor runs, so that a busy port can stop it cleanly.
    reactor.callWhenRunning(lambda: endpoint.listen(site).addErrback(listen_failed))
    reactor.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
