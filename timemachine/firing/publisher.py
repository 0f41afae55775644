"""Delivery of a fired job to its route (an HTTP webhook or a Redis key).

`Publisher.deliver` sends one job once and classifies what happened as `Delivered`,
`RetryLater` or `Failed`; it never errbacks, and it always answers within the route's
``timeout_ms``. Deciding *when* to retry (backoff, jitter, ``max_attempts``) belongs to
the executor; the publisher only says whether a retry can help.

HTTP goes through treq on one persistent connection pool. Redis goes through one
txredisapi protocol per ``redis_url``, opened by this module rather than by
txredisapi's reconnecting factories: those keep retrying in the background when the
server is down, which would outlive a delivery's timeout and `Publisher.close`.
"""

from __future__ import annotations

import email.utils
import json
from dataclasses import dataclass
from datetime import timezone

import treq
import txredisapi
from hyperlink import EncodedURL
from treq.cookies import IndexableCookieJar
from twisted.internet import defer, error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from timemachine.domain.jobs import Job
from timemachine.domain.routes import RedisAddress, Route
from timemachine.interfaces import IPublisher

# How much of a receiver's answer goes into an error message.
ERROR_BODY_CHARS = 200
# Parsed webhook URLs and their endpoints kept for reuse: parsing a URL and building
# an endpoint for it (IDNA checks of the host, twice) was an eighth of a delivery's CPU.
# Routes are few; the bound keeps a stream of changing URLs from growing the caches.
PARSED_URLS_KEPT = 1024

# Redis error replies that describe a passing state of the server rather than a
# mistake in the command: a retry a little later is expected to succeed.
TRANSIENT_REDIS_ERRORS = (
    "LOADING",
    "BUSY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MASTERDOWN",
    "READONLY",
    "NOREPLICAS",
    "OOM",
)


@dataclass(frozen=True, slots=True)
class Delivered:
    """The route accepted the job."""


@dataclass(frozen=True, slots=True)
class RetryLater:
    """The delivery did not happen, or may not have; another attempt can succeed.

    ``retry_after_ms`` is the receiver's own wish (HTTP ``Retry-After``), if it said one.
    """

    error: str
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """The route refused the job in a way a retry will not change."""

    error: str


Outcome = Delivered | RetryLater | Failed


@implementer(IPublisher)
class Publisher:
    """Delivers jobs over HTTP (treq) and Redis (txredisapi), at most
    ``route.max_in_flight`` at a time per route.

    ``pool_size_per_host`` bounds the idle HTTP connections kept per receiver;
    ``idle_timeout`` is how long one is kept. It is shorter than the keep-alive of
    common servers so that we close an idle connection before the server does: a POST
    sent just as the server closes would fail, and Twisted does not resend a POST.
    """

    log = Logger()

    def __init__(self, reactor, pool_size_per_host: int = 64, idle_timeout: float = 30.0):
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = pool_size_per_host
        self._pool.cachedConnectionTimeout = idle_timeout
        agent = Agent.usingEndpointFactory(reactor, _NoDelayEndpoints(reactor), pool=self._pool)
        self._http = treq.client.HTTPClient(agent, _NoCookies())
        self._urls: dict[str, EncodedURL] = {}
        self._redis: dict[str, _RedisLink] = {}
        self._limits: dict[str, defer.DeferredSemaphore] = {}
        self._in_flight = 0
        self._idle_waiters: list[defer.Deferred] = []
        self._closed = False

    def deliver(self, route: Route, job: Job, attempt: int) -> defer.Deferred:
        """Deliver ``job`` to ``route`` once; fire with a `Delivered`, `RetryLater` or
        `Failed`, never with an error.

        ``attempt`` counts from 1 and is passed on to the receiver. The wait for a free
        slot among the route's ``max_in_flight`` is not part of ``timeout_ms``.
        """
        if self._closed:
            return defer.succeed(RetryLater("publisher is closed"))
        self._in_flight += 1
        limit = self._limit(route)
        d = limit.run(self._deliver_now, route, job, attempt)
        d.addErrback(self._unexpected, route, job)
        d.addBoth(self._delivery_done, route.id, limit)
        return d

    def close(self) -> defer.Deferred:
        """Refuse new deliveries, let those in flight finish (each is bounded by its
        route's timeout), then close every HTTP and Redis connection.
        """
        self._closed = True
        idle = defer.Deferred()
        if self._in_flight:
            self._idle_waiters.append(idle)
        else:
            idle.callback(None)

        def close_connections(_):
            links, self._redis = list(self._redis.values()), {}
            closing = [self._pool.closeCachedConnections()] + [link.close() for link in links]
            return defer.gatherResults(closing).addCallback(lambda _: None)

        return idle.addCallback(close_connections)

    # ---- concurrency -------------------------------------------------------------

    def _limit(self, route: Route) -> defer.DeferredSemaphore:
        limit = self._limits.get(route.id)
        # A changed max_in_flight gets a fresh semaphore: new deliveries obey the new
        # limit at once, while those already admitted finish under the old one.
        if limit is None or limit.limit != route.max_in_flight:
            limit = self._limits[route.id] = defer.DeferredSemaphore(route.max_in_flight)
        return limit

    def _delivery_done(self, outcome, route_id: str, limit: defer.DeferredSemaphore):
        # Forget idle semaphores so that deleted routes do not accumulate.
        if self._limits.get(route_id) is limit and limit.tokens == limit.limit:
            del self._limits[route_id]
        self._in_flight -= 1
        if not self._in_flight:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        return outcome

    def _unexpected(self, failure: Failure, route: Route, job: Job) -> RetryLater:
        # Every expected failure is classified below; this is a bug, so make it loud,
        # but still hand the executor an outcome it can record.
        self.log.failure(
            "delivery of {job} to route {route} crashed", failure, job=job.key, route=route.id
        )
        return RetryLater(f"internal error: {failure.getErrorMessage()}")

    def _deliver_now(self, route: Route, job: Job, attempt: int) -> defer.Deferred:
        deadline = self._reactor.seconds() + route.timeout_ms / 1000
        if route.type == "http":
            return defer.Deferred.fromCoroutine(self._post(route, job, attempt, deadline))
        return defer.Deferred.fromCoroutine(self._push(route, job, attempt, deadline))

    def _until(self, d: defer.Deferred, deadline: float) -> defer.Deferred:
        """``d``, cancelled (so failing with TimeoutError) if it has not fired by
        ``deadline``."""
        return d.addTimeout(max(0.0, deadline - self._reactor.seconds()), self._reactor)

    # ---- HTTP --------------------------------------------------------------------

    async def _post(self, route: Route, job: Job, attempt: int, deadline: float) -> Outcome:
        headers = {
            "Content-Type": "application/json",
            "X-TimeMachine-Job-Id": job.id,
            "X-TimeMachine-Collection": job.collection,
            "X-TimeMachine-Trigger-Ms": str(job.trigger_ms),
            "X-TimeMachine-Attempt": str(attempt),
            "Idempotency-Key": job.idempotency_key,
        }
        url = _kept(self._urls, route.webhook_url, _webhook_url)
        request = self._http.post(
            url,
            data=_BytesProducer(job.meta.encode("utf-8")),
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
        )
        try:
            response = await self._until(request, deadline)
        except Exception as e:
            return RetryLater(_describe_connection_error(e, route.timeout_ms))
        # The body is read to its end even when it is not needed: that is what returns
        # the connection to the pool.
        try:
            body = await self._until(_read_prefix(response, ERROR_BODY_CHARS * 4), deadline)
        except Exception:
            # The status line has already answered the question; the connection is
            # dropped (cancelling the read closes it).
            body = b""
        return _classify_http(response, body, self._reactor.seconds())

    # ---- Redis -------------------------------------------------------------------

    async def _push(self, route: Route, job: Job, attempt: int, deadline: float) -> Outcome:
        """Run the route's Redis command for ``job``.

        An unreachable or unresponsive server (refused, timed out, connection lost) is
        `RetryLater`, and so are error replies naming a passing server state (LOADING,
        READONLY during a failover, OOM, ...). Any other error reply (WRONGTYPE, a wrong
        password or db number, ...) is `Failed`: the route, not the moment, is wrong, and
        retrying would only delay the dead letter that tells an operator to fix it.
        """
        try:
            target = RedisAddress.parse(route.redis_url)
        except ValueError as e:
            return Failed(f"bad redis_url: {e}")
        link = self._redis.get(route.redis_url)
        if link is None:
            link = self._redis[route.redis_url] = _RedisLink(self._reactor, target)
        # idempotency_key goes beyond API.md's fields (an addition): a command that timed
        # out may still have run, and a consumer needs it to drop the repeat.
        fields = {
            "id": job.id,
            "collection": job.collection,
            "trigger_ms": job.trigger_ms,
            "attempt": attempt,
            "idempotency_key": job.idempotency_key,
        }
        if route.mode == "xadd":
            command = ["XADD", route.key, "*"]
            for name, value in [*fields.items(), ("meta", job.meta)]:
                command += [name, value]
        else:
            # meta is spliced in as stored: decoding and encoding it again would
            # rewrite the client's numbers, escapes and key order.
            head = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
            message = f'{head[:-1]},"meta":{job.meta}}}'
            command = ["LPUSH" if route.mode == "lpush" else "PUBLISH", route.key, message]
        try:
            protocol = await self._until(
                link.connection(deadline - self._reactor.seconds()), deadline
            )
            await self._until(defer.maybeDeferred(protocol.execute_command, *command), deadline)
        except txredisapi.ResponseError as e:
            return _classify_redis_reply(e)
        except _RedisSetupError as e:
            return Failed(f"redis: {e}")
        except defer.TimeoutError:
            # A server that leaves a reply overdue is stuck or gone: reconnect rather
            # than queue more commands behind it.
            link.abort()
            return RetryLater(f"redis: no answer within {route.timeout_ms} ms")
        except Exception as e:
            return RetryLater(_describe_connection_error(e, route.timeout_ms, "redis: "))
        # PUBLISH counts receivers; nobody listening is still a delivery (pub/sub is
        # fire-and-forget by nature, and the job cannot wait for a subscriber).
        return Delivered()


# ---- HTTP helpers ------------------------------------------------------------------


class _BodyPrefix(Protocol):
    """Reads a response body to its end, keeping only the first ``limit`` bytes, so a
    chatty receiver cannot make us hold a large error page."""

    def __init__(self, finished: defer.Deferred, limit: int):
        self._finished = finished
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size < self._limit:
            part = data[: self._limit - self._size]
            self._parts.append(part)
            self._size += len(part)

    def connectionLost(self, reason: Failure) -> None:
        if self._finished.called:  # cancelled
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._finished.callback(b"".join(self._parts))
        else:
            self._finished.errback(reason)


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body written in one go, in the same reactor turn as the headers.

    treq's default producer for bytes hands the body to a cooperator that writes it a
    turn later: headers and body then leave as two segments, and Nagle's algorithm
    holds the second until the receiver's delayed ACK of the first, ~40 ms later.
    """

    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body) if body is not None else UNKNOWN_LENGTH

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _NoCookies(IndexableCookieJar):
    """Deliveries are stateless: a receiver's cookies must not ride along with the
    next job, nor pile up in memory. treq hands every request and response to its
    jar; this one looks at neither (a refusing policy still parsed both)."""

    def add_cookie_header(self, request) -> None:
        pass

    def extract_cookies(self, response, request) -> None:
        pass


class _NoDelayEndpoint:
    """A TCP client endpoint whose connections send small writes at once (TCP_NODELAY):
    a delivery is one small request, and waiting to coalesce it only adds latency."""

    def __init__(self, endpoint):
        self._endpoint = endpoint

    def connect(self, factory):
        # Not a log line at info for each connection opened and closed: under load
        # that is two blocking writes on the reactor per new connection.
        factory.noisy = False

        def no_delay(protocol):
            protocol.transport.setTcpNoDelay(True)
            return protocol

        return self._endpoint.connect(factory).addCallback(no_delay)


@implementer(IAgentEndpointFactory)
class _NoDelayEndpoints:
    """The endpoints of the publisher's `Agent` (plain HTTP and HTTPS alike)."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._tls = BrowserLikePolicyForHTTPS()
        self._endpoints: dict[tuple[bytes, bytes, int], _NoDelayEndpoint] = {}

    def endpointForURI(self, uri):
        return _kept(self._endpoints, (uri.scheme, uri.host, uri.port), self._endpoint)

    def _endpoint(self, key: tuple[bytes, bytes, int]) -> _NoDelayEndpoint:
        scheme, host, port = key
        text = host.decode("ascii", "replace")
        # A HostnameEndpoint resolves even an address through the reactor's thread
        # pool, on every connect: under load a burst of new connections then starts
        # pool threads, which held the reactor (and every job due) for up to 0.2 s.
        if isIPAddress(text):
            endpoint = TCP4ClientEndpoint(self._reactor, text, port)
        elif isIPv6Address(text):
            endpoint = TCP6ClientEndpoint(self._reactor, text, port)
        else:
            # Reusable: each connect resolves the host anew.
            endpoint = HostnameEndpoint(self._reactor, host, port)
        if scheme == b"https":
            endpoint = wrapClientTLS(self._tls.creatorForNetloc(host, port), endpoint)
        return _NoDelayEndpoint(endpoint)


class _EncodedOnce(EncodedURL):
    """A webhook URL in the form treq sends, encoded once: treq encodes every URL it
    is given with ``to_uri`` (31 us of each delivery here), and this one is its own."""

    def to_uri(self) -> EncodedURL:
        return self


def _webhook_url(text: str) -> EncodedURL:
    url = EncodedURL.from_text(text)
    if ":" in url.host:
        # hyperlink's to_uri IDNA-encodes the host, refusing an IPv6 address (hyperlink
        # issue 68); an address needs no encoding: the rest is encoded alone.
        uri = url.replace(host="ipv6.invalid").to_uri().replace(host=url.host)
    else:
        uri = url.to_uri()
    return _EncodedOnce.from_text(uri.to_text())


def _kept(cache: dict, key, make):
    """``cache[key]``, made by ``make(key)`` if absent; the cache starts over once it
    holds `PARSED_URLS_KEPT` entries."""
    value = cache.get(key)
    if value is None:
        if len(cache) >= PARSED_URLS_KEPT:
            cache.clear()
        value = cache[key] = make(key)
    return value


def _read_prefix(response, limit: int) -> defer.Deferred:
    """Fire with the first ``limit`` bytes of ``response``'s body once it is all read.
    Cancelling closes the connection."""

    def cancel(_):
        if reader.transport is not None:
            reader.transport.stopProducing()

    finished = defer.Deferred(cancel)
    reader = _BodyPrefix(finished, limit)
    response.deliverBody(reader)
    return finished


def _classify_http(response, body: bytes, now: float) -> Outcome:
    code = response.code
    if 200 <= code < 300:
        return Delivered()
    text = body.decode("utf-8", "replace")[:ERROR_BODY_CHARS]
    message = f"HTTP {code}: {text}" if text else f"HTTP {code}"
    if code in (408, 429) or code >= 500:
        values = response.headers.getRawHeaders("Retry-After") or [None]
        return RetryLater(message, _retry_after_ms(values[0], now))
    return Failed(message)


def _retry_after_ms(value: str | None, now: float) -> int | None:
    """Milliseconds from ``now`` (epoch seconds) that a ``Retry-After`` value asks for:
    delay-seconds or an HTTP-date (RFC 9110 §10.2.3); None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value) * 1000
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # HTTP-dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0, round((when.timestamp() - now) * 1000))


def _describe_connection_error(e: BaseException, timeout_ms: int, prefix: str = "") -> str:
    # twisted.web wraps the real reasons of a failed request in a list of Failures.
    reasons = getattr(e, "reasons", None)
    if reasons:
        e = reasons[0].value
    if isinstance(e, defer.TimeoutError | defer.CancelledError | error.TimeoutError):
        return f"{prefix}timed out after {timeout_ms} ms"
    if isinstance(e, error.ConnectionRefusedError):
        return f"{prefix}connection refused: {e}"
    if isinstance(e, error.DNSLookupError):
        return f"{prefix}DNS lookup failed: {e}"
    if isinstance(e, error.ConnectionDone | error.ConnectionLost | txredisapi.ConnectionError):
        return f"{prefix}connection lost: {e}"
    return f"{prefix}{type(e).__name__}: {e}"


# ---- Redis helpers -----------------------------------------------------------------


def _classify_redis_reply(e: txredisapi.ResponseError) -> Outcome:
    message = str(e)
    if message.split(" ", 1)[0] in TRANSIENT_REDIS_ERRORS:
        return RetryLater(f"redis: {message}")
    return Failed(f"redis: {message}")


class _RedisSetupError(Exception):
    """The server refused AUTH or SELECT of a new connection."""


class _RedisSetup(Factory):
    """Builds the one protocol of a connection attempt and reports, through ``ready``,
    when it has authenticated and selected its database.

    It also stands in for the txredisapi factory the protocol reports to: nothing here
    reconnects, so ``stopTrying`` has nothing to stop.
    """

    isLazy = False

    def __init__(self, reactor, target: RedisAddress):
        self._reactor = reactor
        self._target = target
        self.ready = defer.Deferred()

    def buildProtocol(self, addr):
        protocol = txredisapi.RedisProtocol(
            password=self._target.password,
            username=self._target.username,
            dbid=self._target.db or None,  # no SELECT round trip for db 0
        )
        protocol.factory = self
        # txredisapi schedules through the global reactor by default.
        protocol.callLater = self._reactor.callLater
        protocol.whenConnected().addCallback(self.fire)
        # Lost before it was ready (the server closed it during AUTH, say).
        protocol.whenDisconnected().addCallback(
            lambda _: self.fire(Failure(error.ConnectionLost("closed during setup")))
        )
        return protocol

    def fire(self, result) -> None:
        """Fire ``ready`` with ``result`` (a protocol or a Failure), once."""
        if not self.ready.called:
            self.ready.callback(result)

    def connectionError(self, why: str) -> None:
        self.fire(Failure(_RedisSetupError(why)))

    def stopTrying(self) -> None:
        pass


class _RedisLink:
    """The connection to one Redis server, shared by every delivery to it.

    Opened on first use and again after it is lost; concurrent deliveries wait for the
    same attempt. Redis answers pipelined commands in order, so one connection carries
    many deliveries at once.
    """

    def __init__(self, reactor, target: RedisAddress):
        self._reactor = reactor
        self._target = target
        self._protocol: txredisapi.RedisProtocol | None = None
        self._opening: defer.Deferred | None = None
        self._waiters: list[defer.Deferred] = []

    def connection(self, timeout: float) -> defer.Deferred:
        """Fire with a ready protocol; an attempt this starts gives up after ``timeout``
        seconds."""
        if self._protocol is not None and self._protocol.connected:
            return defer.succeed(self._protocol)
        waiter = defer.Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        if self._opening is None:
            self._opening = self._open(max(timeout, 0.001))
            self._opening.addBoth(self._opened)
        return waiter

    def abort(self) -> None:
        """Drop the connection now; the next delivery opens a new one."""
        # Forgotten at once: the loss itself is reported a reactor turn later, and a
        # delivery in between must not pick this connection.
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.transport.abortConnection()

    def close(self) -> defer.Deferred:
        """Stop any attempt in progress and close the connection; fires when closed."""
        if self._opening is not None:
            self._opening.cancel()
        if self._protocol is None or not self._protocol.connected:
            return defer.succeed(None)
        closed = self._protocol.whenDisconnected().addCallback(lambda _: None)
        self._protocol.transport.loseConnection()
        return closed

    def _open(self, timeout: float) -> defer.Deferred:
        setup = _RedisSetup(self._reactor, self._target)
        endpoint = HostnameEndpoint(
            self._reactor, self._target.host, self._target.port, timeout=timeout
        )
        connecting = endpoint.connect(setup)
        # A cancelled attempt is reported by `ready`'s own cancellation (a TimeoutError).
        connecting.addErrback(
            lambda f: None if f.check(error.ConnectingCancelledError) else setup.fire(f)
        )

        def give_up(_):
            # Either still connecting, or connected but stuck in AUTH/SELECT.
            if not connecting.called:
                connecting.cancel()
            elif isinstance(connecting.result, txredisapi.RedisProtocol):
                connecting.result.transport.abortConnection()

        ready = defer.Deferred(give_up)
        setup.ready.chainDeferred(ready)
        return ready.addTimeout(timeout, self._reactor)

    def _opened(self, result) -> None:
        self._opening = None
        if isinstance(result, Failure):
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.errback(result)
            return
        self._protocol = result
        result.whenDisconnected().addCallback(self._lost)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result)

    def _lost(self, protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None
