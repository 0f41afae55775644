"""The twisted.web `Site` that serves the REST API."""

from __future__ import annotations

from twisted.web import server

from timemachine.http.limits import LimitedRequest


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


def make_site(api, metrics) -> server.Site:
    """The `Site` serving ``api`` (a `TimeMachineAPI`), with the request body limit;
    requests are counted in ``metrics`` (a `timemachine.metrics.Metrics`)."""
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
