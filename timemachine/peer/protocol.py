"""The Twisted protocol of one peer connection: it only moves bytes.

`PeerProtocol` feeds what the socket delivers to a `FrameDecoder`, parses each frame
as an `Envelope` and hands it to its owner (`IPeerProtocolOwner`, the peer network);
it writes the envelopes its owner sends. Each side sends a `Hello` first. Policy lives
in the owner: which node may connect, which of two connections to a node stays, what
an envelope means.

What cannot be read is a remote protocol error and ends the connection at once: a
frame over the limit, bytes that do not parse as an `Envelope`, a first envelope that
is not a `Hello`, or a second `Hello`. Nothing read after such an error is trusted.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import Interface

from timemachine._pb import timemachine_pb2 as pb
from timemachine.peer.errors import MessageTooLarge
from timemachine.peer.framing import (
    HEADER_BYTES,
    NEED_DATA,
    FrameDecoder,
    RemoteProtocolError,
    encode_frame,
)


class IPeerProtocolOwner(Interface):
    """What a `PeerProtocol` tells the object that owns the node's peer connections."""

    def hello() -> pb.Envelope:
        """The `Hello` envelope this node sends first on every connection."""

    def connection_made(protocol: PeerProtocol) -> None:
        """A connection (dialled or accepted) is up and its `Hello` was sent."""

    def hello_received(protocol: PeerProtocol, hello: pb.Hello, size: int) -> None:
        """The peer's first envelope, a `Hello` of ``size`` bytes framed, arrived.

        The owner may close the connection (a node it refuses, a duplicate).
        """

    def envelope_received(protocol: PeerProtocol, envelope: pb.Envelope, size: int) -> None:
        """An envelope after the `Hello` arrived (``size`` bytes, framed)."""

    def protocol_error(protocol: PeerProtocol, problem: str) -> None:
        """The peer broke the protocol; the connection is being aborted."""

    def connection_lost(protocol: PeerProtocol, reason) -> None:
        """The connection is closed (``reason`` is Twisted's failure); it is the last call."""


class PeerProtocol(Protocol):
    """One connection to another node, dialled by this node or accepted from it.

    ``dialled_node`` is the node this node meant to reach, None for an accepted
    connection. ``node_id`` is set by the owner once the peer's `Hello` is accepted.
    """

    log = Logger()

    def __init__(self, owner, max_frame_bytes: int, dialled_node: str | None = None):
        self.owner = owner
        self.dialled_node = dialled_node
        self.node_id: str | None = None
        self.hello: pb.Hello | None = None
        self.closing = False
        self._aborted = False
        self._decoder = FrameDecoder(max_frame_bytes)
        self._max_frame_bytes = max_frame_bytes

    @property
    def outgoing(self) -> bool:
        """Whether this node dialled the connection."""
        return self.dialled_node is not None

    @property
    def peer_address(self) -> str:
        """``host:port`` of the other end, for logs."""
        if self.transport is None:
            return "?"
        peer = self.transport.getPeer()
        return f"{getattr(peer, 'host', peer)}:{getattr(peer, 'port', '')}"

    def connectionMade(self) -> None:
        # The owner already coalesces what a turn sends into one frame; Nagle would
        # only hold a request or a heartbeat back for the peer's delayed ACK.
        self.transport.setTcpNoDelay(True)
        # A peer that vanished without a FIN (power loss) is found out eventually
        # even on a connection that carries nothing.
        self.transport.setTcpKeepAlive(True)
        self.send(self.owner.hello())
        self.owner.connection_made(self)

    def dataReceived(self, data: bytes) -> None:
        self._decoder.receive_data(data)
        # After a close is asked for, frames still buffered are not handed on: the
        # owner decided this connection is over (a duplicate, a refused node).
        while not self.closing:
            try:
                frame = self._decoder.next_frame()
            except RemoteProtocolError as error:
                self._refuse(str(error))
                return
            if frame is NEED_DATA:
                return
            envelope = pb.Envelope()
            try:
                envelope.ParseFromString(frame)
            except DecodeError as error:
                self._refuse(f"unparsable envelope ({error})")
                return
            size = HEADER_BYTES + len(frame)
            is_hello = envelope.WhichOneof("body") == "hello"
            if self.hello is None:
                if not is_hello:
                    self._refuse("first envelope is not a Hello")
                    return
                self.hello = envelope.hello
                self.owner.hello_received(self, envelope.hello, size)
            elif is_hello:
                self._refuse("second Hello")
                return
            else:
                self.owner.envelope_received(self, envelope, size)

    def connectionLost(self, reason) -> None:
        self.closing = True
        self.owner.connection_lost(self, reason)

    def send(self, envelope: pb.Envelope) -> int:
        """Write ``envelope`` framed; return the bytes written.

        Raises `MessageTooLarge` rather than send a frame the peer would refuse (its
        limit is taken to be this node's: the cluster shares one setting).
        """
        payload = envelope.SerializeToString()
        if len(payload) > self._max_frame_bytes:
            raise MessageTooLarge(
                f"envelope of {len(payload)} bytes is over the frame limit of "
                f"{self._max_frame_bytes} bytes"
            )
        frame = encode_frame(payload)
        self.transport.write(frame)
        return len(frame)

    def close(self, why: str, quietly: bool = False) -> None:
        """Close after what was written is sent; nothing more is read. ``quietly``:
        log it at debug level (a close the caller has logged already)."""
        if not self.closing:
            self.closing = True
            (self.log.debug if quietly else self.log.info)(
                "closing peer connection {address}: {why}", address=self.peer_address, why=why
            )
            self.transport.loseConnection()

    def abort(self, why: str) -> None:
        """Close at once, dropping what is not yet sent: Twisted resets the
        connection (a zero linger time), so even what the kernel still holds to send
        is dropped, never delivered late."""
        if self.transport is not None and not self._aborted:
            self._aborted = True
            self.closing = True
            self.log.debug(
                "aborting peer connection {address}: {why}", address=self.peer_address, why=why
            )
            self.transport.abortConnection()

    def _refuse(self, problem: str) -> None:
        self.log.warn(
            "peer connection {address} broke the protocol: {problem}",
            address=self.peer_address,
            problem=problem,
        )
        self.owner.protocol_error(self, problem)
        self.abort(problem)


class PeerFactory(Factory):
    """Builds the `PeerProtocol` of connections dialled to ``dialled_node`` (or, when
    it is None, of accepted ones). ``dial`` is the owner's token for the one dial this
    factory serves, read back as ``protocol.factory.dial``."""

    noisy = False

    def __init__(self, owner, max_frame_bytes: int, dialled_node: str | None = None, dial=None):
        self.owner = owner
        self.max_frame_bytes = max_frame_bytes
        self.dialled_node = dialled_node
        self.dial = dial

    def buildProtocol(self, addr) -> PeerProtocol:
        protocol = PeerProtocol(self.owner, self.max_frame_bytes, self.dialled_node)
        protocol.factory = self
        return protocol
