"""The node's connections to the other nodes: one TCP connection per node pair.

`PeerNetwork` keeps a connection to every node of its peer set (`set_peers`), dialling
from the node's advertise host so that a partition between two addresses (nft rules in
the tests) cuts exactly the pairs it names. It also accepts connections from nodes not
in the set: a node that is joining dials before it is a member.

Over each connection travel, multiplexed:

* Raft messages of every group, coalesced: everything `send_raft` queued for a node in
  one reactor turn leaves as one `RaftBatch` envelope (split only where a frame would
  pass the limit). Raft tolerates loss, so a message for a node that is not connected
  is dropped and counted, never queued for later.
* Requests (propose, http, ping), answered by the handlers registered with `handle`
  and correlated by id with the `Deferred` that `request` returned.

Both nodes of a pair may dial at once. After the `Hello`s the two sides keep the same
connection: the one dialled by the node whose id sorts first; when both were dialled by
the same node, the newer (the older is a half-open leftover the dialler no longer has).
The other is closed without counting as a failure. A connection that failed, or was
lost, is dialled again after a delay drawn from ``[0, min(backoff_max, backoff_initial *
2**failures)]`` ("full jitter"), reset by the next accepted `Hello`.
"""

from __future__ import annotations

import fcntl
import ipaddress
import itertools
import random
import struct
import termios
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from timemachine._pb import timemachine_pb2 as pb
from timemachine.peer.errors import (
    MessageTooLarge,
    PeerNetworkStopped,
    PeerTimeout,
    PeerUnavailable,
)
from timemachine.peer.framing import DEFAULT_MAX_FRAME_BYTES, HEADER_BYTES
from timemachine.peer.protocol import IPeerProtocolOwner, PeerFactory, PeerProtocol
from timemachine.peer.requests import Handler, RequestHandlers, error_response

RaftReceiver = Callable[[str, pb.RaftMessage], None]

# What a RaftBatch envelope adds around its messages: the envelope's tag and length
# varint (at most 1 + 5 bytes for a frame under 4 GiB), rounded up.
_ENVELOPE_OVERHEAD = 8


def split_host_port(address: str) -> tuple[str, int]:
    """``("host", port)`` from ``"host:port"``; ValueError if it is not that."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"peer address {address!r} is not host:port")
    return host, int(port)


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


@dataclass
class PeerStats:
    """Counters of one peer, for metrics. Counts add up over its connections.

    ``address`` is where this node dials it (None when it is not in the peer set, e.g.
    a joining node that dialled in); ``advertise`` is what its last `Hello` said.
    ``reconnects`` counts the dials made again after a failure or a lost connection.
    Of the requests this node sent (or tried to), ``requests_timed_out`` got no answer
    in time and ``requests_failed`` failed otherwise: not connected, the connection
    lost or replaced before the answer, too large to frame, the network stopped. (A
    request answered with an error is answered: neither.)
    """

    node_id: str
    address: str | None = None
    advertise: str | None = None
    connected: bool = False
    frames_sent: int = 0
    frames_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    raft_messages_sent: int = 0
    raft_messages_received: int = 0
    raft_dropped: int = 0
    requests_sent: int = 0
    requests_received: int = 0
    requests_timed_out: int = 0
    requests_failed: int = 0
    reconnects: int = 0


def _unacknowledged_bytes(protocol: PeerProtocol) -> int:
    """Bytes written to ``protocol``'s socket that the peer's TCP has not acknowledged
    yet (Linux's SIOCOUTQ), 0 when that cannot be told."""
    try:
        handle = protocol.transport.getHandle()
        queued = fcntl.ioctl(handle.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (AttributeError, OSError, ValueError):
        return 0
    return struct.unpack("i", queued)[0]


@dataclass
class _Dial:
    """A connection this node is making to a peer, until its Hello is accepted."""

    deferred: defer.Deferred | None = None
    protocol: PeerProtocol | None = None


@dataclass
class _Peer:
    node_id: str
    stats: PeerStats
    address: str | None = None
    wanted: bool = False
    connection: PeerProtocol | None = None
    dial: _Dial | None = None
    retry: object | None = None  # IDelayedCall of the next dial
    failures: int = 0
    incarnation: str = ""  # what its accepted Hello said


@dataclass
class _Pending:
    node_id: str
    timeout: float
    deferred: defer.Deferred
    timer: object | None = None
    sent_at: float = 0.0


@dataclass
class _Connection:
    """What the network keeps about one connection, handshaken or not."""

    protocol: PeerProtocol
    closed: defer.Deferred = field(default_factory=defer.Deferred)
    handshake_timer: object | None = None
    pending: dict[int, _Pending] = field(default_factory=dict)
    # When an envelope last arrived on it (reactor seconds).
    last_received: float = 0.0


@implementer(IPeerProtocolOwner)
class PeerNetwork:
    """This node's end of the peer protocol.

    ``listen_endpoint`` is a server endpoint (e.g. ``TCP4ServerEndpoint(reactor, 8101,
    interface="10.0.0.2")``); ``advertise`` is ``"host:port"`` where the other nodes
    reach this one, its host an IPv4 address of this machine (outgoing connections bind
    to it). A port of 0 in ``advertise`` stands for the port actually listened on.
    ``rng`` draws the reconnect jitter. ``ready()`` answers the built-in ping handler's
    ``Pong.ready`` (True when not given). ``request_timeout`` also bounds a dial and
    the wait for a new connection's `Hello`. ``incarnation`` is this node's data dir's
    (`timemachine.cluster.identity`), said in its `Hello`.

    The constructor does no I/O: `start` listens and dials, `stop` ends it all.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        node_id: str,
        listen_endpoint,
        advertise: str,
        rng: random.Random,
        *,
        request_timeout: float = 5.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        ready: Callable[[], bool] | None = None,
        incarnation: str = "",
    ):
        if not node_id:
            raise ValueError("node_id must not be empty")
        host, port = split_host_port(advertise)
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"advertise host {host!r} must be an IPv4 address: outgoing connections bind to it"
            ) from None
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.node_id = node_id
        self.incarnation = incarnation
        self._reactor = reactor
        self._listen_endpoint = listen_endpoint
        self._advertise_host = host
        self._advertise_port = port
        self._rng = rng
        self._request_timeout = request_timeout
        self._max_frame_bytes = max_frame_bytes
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._ready = ready if ready is not None else (lambda: True)
        self._handlers = RequestHandlers()
        self._handlers.handle("ping", self._pong)
        self._raft_receiver: RaftReceiver | None = None
        self._peers: dict[str, _Peer] = {}
        self._connections: dict[PeerProtocol, _Connection] = {}
        self._raft_queues: dict[str, list[pb.RaftMessage]] = {}
        self._flush_call = None
        self._request_ids = itertools.count(1)
        self._port = None
        self._hello: pb.Envelope | None = None
        self._hello_frame_bytes = 0
        self._running = False
        self._stopped = False
        self._stop_waiters: list[defer.Deferred] | None = None
        self._identity_problem: Callable[[str, str], str | None] | None = None
        # The incarnation a refused peer last presented, by node, until it is accepted.
        self._refused_incarnations: dict[str, str] = {}
        # Why each peer that refused this node last said it did.
        self._refusals: dict[str, str] = {}
        self.rejected_connections = 0
        """Connections closed for breaking the protocol or naming a refused node."""

    # ---- life cycle ---------------------------------------------------------------

    @property
    def listening_address(self):
        """The listening port's address (`IPv4Address`); None before `start`."""
        return None if self._port is None else self._port.getHost()

    @property
    def advertise(self) -> str:
        """``host:port`` this node's `Hello` advertises."""
        port = self._advertise_port
        if port == 0 and self._port is not None:
            port = self._port.getHost().port
        return f"{self._advertise_host}:{port}"

    def start(self) -> defer.Deferred:
        """Listen, then dial the peer set; fire with the listening address."""
        if self._running or self._stopped:
            return defer.fail(RuntimeError("a PeerNetwork starts once"))
        d = self._listen_endpoint.listen(PeerFactory(self, self._max_frame_bytes))

        def listening(port):
            self._port = port
            self._running = True
            self._hello = pb.Envelope(
                hello=pb.Hello(
                    node_id=self.node_id, advertise=self.advertise, incarnation=self.incarnation
                )
            )
            self._hello_frame_bytes = HEADER_BYTES + self._hello.ByteSize()
            for peer in list(self._peers.values()):
                self._dial(peer)
            return port.getHost()

        return d.addCallback(listening)

    def stop(self) -> defer.Deferred:
        """Stop listening, close every connection, cancel dials and pending requests.

        Pending requests fail with `PeerNetworkStopped`; queued Raft messages are
        dropped. Fires once the port and every connection are closed; calling it again
        gives another Deferred of the same end.
        """
        if self._stopped:
            waiter = defer.Deferred()
            if self._stop_waiters is None:
                waiter.callback(None)
            else:
                self._stop_waiters.append(waiter)
            return waiter
        self._stop_waiters = []
        self._running = False
        self._stopped = True
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        for node_id, queue in self._raft_queues.items():
            self._peers[node_id].stats.raft_dropped += len(queue)
        self._raft_queues.clear()
        for peer in self._peers.values():
            self._cancel_dial(peer)
            peer.connection = None
        waits = []
        for state in list(self._connections.values()):
            self._fail_pending(state, PeerNetworkStopped, "this node's peer network stopped")
            self._cancel_handshake_timer(state)
            state.protocol.abort("stopping")
            waits.append(state.closed)
        if self._port is not None:
            waits.append(defer.maybeDeferred(self._port.stopListening))

        def stopped(result):
            waiters, self._stop_waiters = self._stop_waiters, None
            for waiter in waiters:
                waiter.callback(None)
            return result

        done = defer.gatherResults(waits, consumeErrors=True)
        return done.addCallback(lambda _: None).addBoth(stopped)

    # ---- the peer set -------------------------------------------------------------

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """Keep connections to exactly these nodes (``{node_id: "host:port"}``).

        This node's own id is skipped (callers may pass every member). A node no longer
        named has its connection closed and is not dialled again; it may still dial in.
        A changed address is used from the next dial on; a live connection stays.
        """
        wanted = {}
        for node_id, address in peers.items():
            split_host_port(address)
            if node_id != self.node_id:
                wanted[node_id] = address
        for peer in list(self._peers.values()):
            if peer.wanted and peer.node_id not in wanted:
                self._forget(peer)
        for node_id, address in wanted.items():
            peer = self._peer(node_id)
            peer.wanted = True
            if peer.address != address:
                peer.address = address
                peer.stats.address = address
                # A wait before dialling the old address is no reason to wait before
                # trying the new one.
                if peer.retry is not None:
                    peer.retry.cancel()
                    peer.retry = None
            self._dial(peer)

    def check_identities(self, problem: Callable[[str, str], str | None]) -> None:
        """Refuse every peer for which ``problem(node_id, incarnation)`` (its Hello's)
        gives a reason, from now on and on the connections already accepted."""
        self._identity_problem = problem
        for peer in list(self._peers.values()):
            connection = peer.connection
            reason = None if connection is None else problem(peer.node_id, peer.incarnation)
            if reason is not None:
                self._refuse_identity(
                    connection, peer.node_id, peer.incarnation, reason, accepted=True
                )

    def incarnation_of(self, node_id: str) -> str | None:
        """The incarnation ``node_id``'s accepted Hello said, while it is connected."""
        peer = self._peers.get(node_id)
        return None if peer is None or peer.connection is None else peer.incarnation

    def refused_incarnation(self, node_id: str) -> str | None:
        """The incarnation of ``node_id``'s Hello last refused for it, until one is
        accepted (`check_identities`)."""
        return self._refused_incarnations.get(node_id)

    def refusal_from(self, node_id: str) -> str | None:
        """Why ``node_id`` last refused this node's connection (its `Refusal`), if it
        ever did."""
        return self._refusals.get(node_id)

    def _refuse_identity(self, protocol: PeerProtocol, node_id: str, incarnation: str,
                         reason: str, accepted: bool = False) -> None:
        if self._refused_incarnations.get(node_id) != incarnation:
            # Once per data dir presented: the node dials again every few seconds.
            self.log.error(
                "refusing peer {node} ({address}): {reason}",
                node=node_id,
                address=protocol.peer_address,
                reason=reason,
            )
        self._refused_incarnations[node_id] = incarnation
        self.rejected_connections += 1
        if accepted:
            # Raft messages may be queued on it: dropped, never delivered to that node.
            # It is told why when it dials again.
            protocol.abort(reason)
        else:
            # Nothing but this node's Hello went out on it. Told, so that the refused
            # node's own log says why it is cut off.
            protocol.send(pb.Envelope(refusal=pb.Refusal(reason=reason)))
            protocol.close(f"refused: {reason}", quietly=True)

    def connected_peers(self) -> list[str]:
        """The nodes with a connection whose Hello was accepted, sorted (a node that
        dialled in without being in the peer set included)."""
        return sorted(p.node_id for p in self._peers.values() if p.connection is not None)

    def stats(self) -> dict[str, PeerStats]:
        """A copy of every known peer's counters, by node id."""
        return {
            node_id: replace(peer.stats, connected=peer.connection is not None)
            for node_id, peer in self._peers.items()
        }

    # ---- Raft ---------------------------------------------------------------------

    def set_raft_receiver(self, receiver: RaftReceiver | None) -> None:
        """Hand each received Raft message to ``receiver(from_node, message)``.

        Without a receiver, received messages are dropped (counted as received).
        """
        self._raft_receiver = receiver

    def send_raft(self, node_id: str, message: pb.RaftMessage) -> None:
        """Send ``message`` to ``node_id`` at the end of this reactor turn.

        Dropped (counted in `PeerStats.raft_dropped`) when the node is not connected
        now or at the end of the turn.
        """
        peer = self._peer(node_id)
        if not self._running or peer.connection is None:
            peer.stats.raft_dropped += 1
            return
        self._raft_queues.setdefault(node_id, []).append(message)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush_raft)

    def _flush_raft(self) -> None:
        self._flush_call = None
        queues, self._raft_queues = self._raft_queues, {}
        for node_id, messages in queues.items():
            peer = self._peers[node_id]
            connection = peer.connection
            if connection is None:
                peer.stats.raft_dropped += len(messages)
                continue
            for batch in self._batches(peer, messages):
                self._send(connection, pb.Envelope(raft=pb.RaftBatch(messages=batch)))
                peer.stats.raft_messages_sent += len(batch)

    def _batches(self, peer: _Peer, messages: list[pb.RaftMessage]):
        """``messages`` in batches whose envelopes fit a frame (one, nearly always)."""
        budget = self._max_frame_bytes - _ENVELOPE_OVERHEAD
        batch: list[pb.RaftMessage] = []
        used = 0
        for message in messages:
            size = message.ByteSize()
            cost = 1 + _varint_size(size) + size
            if cost > budget:
                # The peer would refuse the frame and drop the connection that every
                # group shares; the core caps appends far below this, so it is a bug.
                self.log.error(
                    "dropping a Raft message of {size} bytes to {node}: over the frame limit",
                    size=size,
                    node=peer.node_id,
                )
                peer.stats.raft_dropped += 1
                continue
            if used + cost > budget:
                yield batch
                batch, used = [], 0
            batch.append(message)
            used += cost
        if batch:
            yield batch

    # ---- requests -----------------------------------------------------------------

    def handle(self, kind: str, handler: Handler) -> None:
        """Answer requests of ``kind`` (see `timemachine.peer.requests`) with ``handler``.

        ``handler(from_node, body)`` gets the request's kind message and returns the
        result message (`ProposeResult`, `HttpAnswer`, ...) or a Deferred of it. A
        `TimeMachineError` becomes the response's ``error_code``/``error``; any other
        exception is logged and answered ``E_INTERNAL``. A built-in ping handler
        answers until replaced.
        """
        self._handlers.handle(kind, handler)

    def request(
        self, node_id: str, request: pb.Request, timeout: float | None = None
    ) -> defer.Deferred:
        """Send ``request`` to ``node_id``; a Deferred of its `Response`.

        Sets ``request.id``. A response carrying an error still fires the Deferred (see
        `timemachine.peer.requests.error_of`). Fails with `PeerUnavailable` when the
        node is not connected or the connection is lost before the answer, with
        `PeerTimeout` after ``timeout`` seconds (default: the network's
        ``request_timeout``), with `MessageTooLarge` if it cannot be framed.
        Cancelling the Deferred forgets the request.
        """
        if not self._running:
            return defer.fail(PeerNetworkStopped(node_id, "this node's peer network is down"))
        peer = self._peers.get(node_id)
        connection = None if peer is None else peer.connection
        if connection is None:
            if peer is not None:
                peer.stats.requests_failed += 1
            return defer.fail(PeerUnavailable(node_id, "not connected"))
        state = self._connections[connection]
        request_id = next(self._request_ids)
        request.id = request_id
        try:
            self._send(connection, pb.Envelope(request=request))
        except MessageTooLarge as error:
            peer.stats.requests_failed += 1
            return defer.fail(error)
        timeout = self._request_timeout if timeout is None else timeout

        def cancel(_):
            pending = state.pending.pop(request_id, None)
            if pending is not None and pending.timer.active():
                pending.timer.cancel()

        pending = _Pending(
            node_id, timeout, defer.Deferred(cancel), sent_at=self._reactor.seconds()
        )
        pending.timer = self._reactor.callLater(timeout, self._timed_out, state, request_id)
        state.pending[request_id] = pending
        peer.stats.requests_sent += 1
        return pending.deferred

    def _timed_out(self, state: _Connection, request_id: int) -> None:
        pending = state.pending.pop(request_id, None)
        if pending is None:
            return
        self._peers[pending.node_id].stats.requests_timed_out += 1
        pending.deferred.errback(PeerTimeout(pending.node_id, pending.timeout))
        if state.last_received < pending.sent_at:
            why = "nothing else came from the peer"
        elif _unacknowledged_bytes(state.protocol):
            why = "the peer has not acknowledged all that was sent to it"
        else:
            return
        # The link may be cut (a partition drops packets, it does not close
        # connections), in one direction or both. The request's frame may sit in the
        # kernel's send buffer, and TCP would deliver it once the link heals: an asker
        # told the request failed would see it done much later (a delete answered 503
        # deleting a job created again since). An abort discards the buffer; the
        # connection is dialled again.
        why = f"no answer to request {request_id} within {pending.timeout:g} s, and {why}"
        self.log.info(
            "resetting the connection to peer {node}: {why}", node=pending.node_id, why=why
        )
        state.protocol.abort(why)

    def _fail_pending(self, state: _Connection, error_class, why: str) -> None:
        pendings, state.pending = state.pending, {}
        for pending in pendings.values():
            if pending.timer.active():
                pending.timer.cancel()
            self._peers[pending.node_id].stats.requests_failed += 1
            pending.deferred.errback(error_class(pending.node_id, why))

    def _pong(self, from_node: str, ping: pb.Ping) -> pb.Pong:
        return pb.Pong(node_id=self.node_id, ready=bool(self._ready()))

    def _respond(self, response: pb.Response, protocol: PeerProtocol) -> None:
        # Answers go back on the connection the request came on: the asker keys its
        # pending requests by connection and failed them if that one is gone.
        if protocol not in self._connections or protocol.closing:
            return
        try:
            self._send(protocol, pb.Envelope(response=response))
        except MessageTooLarge as error:
            self._send(
                protocol,
                pb.Envelope(response=error_response(response.id, error.code, error.message)),
            )

    # ---- IPeerProtocolOwner -------------------------------------------------------

    def hello(self) -> pb.Envelope:
        return self._hello

    def connection_made(self, protocol: PeerProtocol) -> None:
        state = _Connection(protocol)
        self._connections[protocol] = state
        if not self._running:
            protocol.abort("the peer network is stopped")
            return
        if protocol.outgoing:
            peer = self._peers.get(protocol.dialled_node)
            if peer is None or peer.dial is not protocol.factory.dial:
                protocol.close("no longer dialling this node")
                return
            peer.dial.protocol = protocol
        # A peer that connects and never says Hello would hold the slot forever.
        state.handshake_timer = self._reactor.callLater(
            self._request_timeout, self._handshake_timed_out, protocol
        )

    def _handshake_timed_out(self, protocol: PeerProtocol) -> None:
        state = self._connections.get(protocol)
        if state is not None:
            state.handshake_timer = None
            self.log.warn(
                "no Hello from {address} within {timeout} s",
                address=protocol.peer_address,
                timeout=self._request_timeout,
            )
            self.rejected_connections += 1
            protocol.abort("no Hello")

    def hello_received(self, protocol: PeerProtocol, hello: pb.Hello, size: int) -> None:
        state = self._connections[protocol]
        self._cancel_handshake_timer(state)
        node_id = hello.node_id
        if not node_id:
            problem = "its Hello names no node"
        elif node_id == self.node_id:
            problem = "its Hello names this node's own id"
        elif protocol.outgoing and node_id != protocol.dialled_node:
            problem = f"dialled {protocol.dialled_node} but {node_id} answered"
        else:
            problem = None
        if problem is not None:
            self.log.warn(
                "refusing peer connection {address}: {problem}",
                address=protocol.peer_address,
                problem=problem,
            )
            self.rejected_connections += 1
            protocol.abort(problem)
            return
        if self._identity_problem is not None:
            problem = self._identity_problem(node_id, hello.incarnation)
            if problem is not None:
                self._refuse_identity(protocol, node_id, hello.incarnation, problem)
                return
        self._refused_incarnations.pop(node_id, None)
        protocol.node_id = node_id
        peer = self._peer(node_id)
        peer.advertise = peer.stats.advertise = hello.advertise
        peer.incarnation = hello.incarnation
        # Our own Hello left before the peer was known: it is counted now.
        peer.stats.frames_sent += 1
        peer.stats.bytes_sent += self._hello_frame_bytes
        peer.stats.frames_received += 1
        peer.stats.bytes_received += size
        peer.failures = 0
        if peer.dial is not None and peer.dial.protocol is protocol:
            peer.dial = None
        current = peer.connection
        if current is None:
            peer.connection = protocol
            self.log.info(
                "connected to peer {node} ({address}, {direction})",
                node=node_id,
                address=protocol.peer_address,
                direction="dialled" if protocol.outgoing else "accepted",
            )
        elif self._keeps(current, protocol) is protocol:
            peer.connection = protocol
            self._supersede(current)
        else:
            self._supersede(protocol)

    def _keeps(self, current: PeerProtocol, new: PeerProtocol) -> PeerProtocol:
        """Which of two connections to one peer both sides keep."""
        peer_id = new.node_id
        first = min(self.node_id, peer_id)

        def dialler(protocol):
            return self.node_id if protocol.outgoing else peer_id

        if dialler(current) == dialler(new):
            return new
        return current if dialler(current) == first else new

    def _supersede(self, protocol: PeerProtocol) -> None:
        state = self._connections.get(protocol)
        if state is not None:
            self._fail_pending(state, PeerUnavailable, "connection replaced by another")
        protocol.close("another connection to this node is kept")

    def envelope_received(self, protocol: PeerProtocol, envelope: pb.Envelope, size: int) -> None:
        state = self._connections[protocol]
        state.last_received = self._reactor.seconds()
        node_id = protocol.node_id
        stats = self._peers[node_id].stats
        stats.frames_received += 1
        stats.bytes_received += size
        body = envelope.WhichOneof("body")
        if body == "raft":
            receiver = self._raft_receiver
            for message in envelope.raft.messages:
                stats.raft_messages_received += 1
                if receiver is None:
                    continue
                try:
                    receiver(node_id, message)
                except Exception:
                    # One group's failure must not stop the other groups' messages.
                    self.log.failure("Raft receiver failed on a message from {node}", node=node_id)
        elif body == "request":
            stats.requests_received += 1
            d = self._handlers.answer(node_id, envelope.request)
            d.addCallback(self._respond, protocol)
            d.addErrback(lambda f: self.log.failure("answering {node}", f, node=node_id))
        elif body == "response":
            pending = state.pending.pop(envelope.response.id, None)
            if pending is None:
                return  # timed out or cancelled: a late answer is ignored
            pending.timer.cancel()
            pending.deferred.callback(envelope.response)
        elif body == "refusal":
            reason = envelope.refusal.reason
            if self._refusals.get(node_id) != reason:
                self.log.error(
                    "peer {node} refuses this node: {reason}", node=node_id, reason=reason
                )
            self._refusals[node_id] = reason
        else:
            # An envelope kind of a newer build: ignoring it keeps mixed versions talking.
            self.log.debug("ignoring an envelope of unknown kind from {node}", node=node_id)

    def protocol_error(self, protocol: PeerProtocol, problem: str) -> None:
        self.rejected_connections += 1

    def connection_lost(self, protocol: PeerProtocol, reason) -> None:
        state = self._connections.pop(protocol, None)
        if state is None:
            return
        self._cancel_handshake_timer(state)
        self._fail_pending(state, PeerUnavailable, "connection lost")
        redial = None
        peer = self._peers.get(protocol.node_id) if protocol.node_id else None
        if peer is not None and peer.connection is protocol:
            peer.connection = None
            redial = peer
            self.log.info(
                "lost connection to peer {node}: {reason}",
                node=peer.node_id,
                reason=reason.getErrorMessage(),
            )
        dialled = self._peers.get(protocol.dialled_node) if protocol.outgoing else None
        if dialled is not None and dialled.dial is not None and dialled.dial.protocol is protocol:
            dialled.dial = None
            redial = dialled
        if redial is not None:
            self._schedule_dial(redial)
        state.closed.callback(None)

    # ---- dialling -----------------------------------------------------------------

    def _peer(self, node_id: str) -> _Peer:
        peer = self._peers.get(node_id)
        if peer is None:
            peer = self._peers[node_id] = _Peer(node_id, PeerStats(node_id))
        return peer

    def _idle(self, peer: _Peer) -> bool:
        """Whether ``peer`` is wanted and nothing connects it, or is about to."""
        return (
            self._running
            and peer.wanted
            and peer.connection is None
            and peer.dial is None
            and peer.retry is None
        )

    def _dial(self, peer: _Peer) -> None:
        if not self._idle(peer):
            return
        host, port = split_host_port(peer.address)
        endpoint = TCP4ClientEndpoint(
            self._reactor,
            host,
            port,
            timeout=self._request_timeout,
            bindAddress=(self._advertise_host, 0),
        )
        dial = peer.dial = _Dial()
        dial.deferred = endpoint.connect(
            PeerFactory(self, self._max_frame_bytes, dialled_node=peer.node_id, dial=dial)
        )
        dial.deferred.addErrback(self._dial_failed, peer, dial)

    def _dial_failed(self, failure, peer: _Peer, dial: _Dial) -> None:
        if peer.dial is not dial:
            return  # cancelled by stop() or by leaving the peer set
        peer.dial = None
        self.log.debug(
            "cannot reach peer {node} at {address}: {error}",
            node=peer.node_id,
            address=peer.address,
            error=failure.getErrorMessage(),
        )
        self._schedule_dial(peer)

    def _schedule_dial(self, peer: _Peer) -> None:
        if not self._idle(peer):
            return
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** min(peer.failures, 32))
        peer.failures += 1
        peer.retry = self._reactor.callLater(self._rng.uniform(0, ceiling), self._redial, peer)

    def _redial(self, peer: _Peer) -> None:
        peer.retry = None
        peer.stats.reconnects += 1
        self._dial(peer)

    def _cancel_dial(self, peer: _Peer) -> None:
        if peer.retry is not None:
            peer.retry.cancel()
            peer.retry = None
        dial, peer.dial = peer.dial, None
        if dial is not None:
            if dial.protocol is not None:
                dial.protocol.abort("no longer dialling this node")
            elif dial.deferred is not None:
                dial.deferred.cancel()

    def _forget(self, peer: _Peer) -> None:
        peer.wanted = False
        peer.address = peer.stats.address = None
        self._cancel_dial(peer)
        connection, peer.connection = peer.connection, None
        if connection is not None:
            state = self._connections.get(connection)
            if state is not None:
                self._fail_pending(state, PeerUnavailable, "removed from the peer set")
            connection.close("removed from the peer set")

    def _cancel_handshake_timer(self, state: _Connection) -> None:
        if state.handshake_timer is not None:
            state.handshake_timer.cancel()
            state.handshake_timer = None

    def _send(self, protocol: PeerProtocol, envelope: pb.Envelope) -> None:
        size = protocol.send(envelope)
        peer = self._peers.get(protocol.node_id)
        if peer is not None:
            peer.stats.frames_sent += 1
            peer.stats.bytes_sent += size
