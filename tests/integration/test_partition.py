"""`tests.support.Partition` really cuts loopback addresses apart, and cleans up."""

import socket

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.error import ConnectError, TimeoutError
from twisted.trial import unittest

from tests.support import Partition, nft_tables


class _Echo(protocol.Protocol):
    def connectionMade(self):
        self.factory.connections.add(self)

    def connectionLost(self, reason):
        self.factory.connections.discard(self)
        if not self.factory.connections and self.factory.all_gone is not None:
            self.factory.all_gone.callback(None)
            self.factory.all_gone = None

    def dataReceived(self, data):
        self.transport.write(data)


class _EchoFactory(protocol.Factory):
    protocol = _Echo

    def __init__(self):
        self.connections = set()
        self.all_gone = None

    def close_all(self):
        """Abort every connection (a cut one never sees its peer's FIN); fire when gone."""
        if not self.connections:
            return defer.succeed(None)
        self.all_gone = defer.Deferred()
        for connection in list(self.connections):
            connection.transport.abortConnection()
        return self.all_gone


@defer.inlineCallbacks
def _connect(from_host, to_host, port, timeout=1):
    """Connect from ``from_host`` to ``to_host:port``; fire True, or False on failure."""
    endpoint = endpoints.TCP4ClientEndpoint(
        reactor, to_host, port, timeout=timeout, bindAddress=(from_host, 0)
    )
    try:
        proto = yield endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
    except (ConnectError, TimeoutError):
        return False
    proto.transport.loseConnection()
    return True


class PartitionTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.ports = {}
        for host in ("127.0.6.2", "127.0.6.3", "127.0.6.4"):
            endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface=host)
            factory = _EchoFactory()
            port = yield endpoint.listen(factory)
            self.addCleanup(factory.close_all)
            self.addCleanup(port.stopListening)
            self.ports[host] = port.getHost().port
        self.partition = Partition()
        self.addCleanup(self.partition.remove)

    @defer.inlineCallbacks
    def test_a_cut_drops_traffic_between_its_sides_only(self):
        self.assertTrue((yield _connect("127.0.6.2", "127.0.6.3", self.ports["127.0.6.3"])))
        self.partition.cut("127.0.6.2", ["127.0.6.3", "127.0.6.4"])
        self.assertFalse((yield _connect("127.0.6.2", "127.0.6.3", self.ports["127.0.6.3"])))
        self.assertFalse((yield _connect("127.0.6.4", "127.0.6.2", self.ports["127.0.6.2"])))
        # The majority side still talks.
        self.assertTrue((yield _connect("127.0.6.3", "127.0.6.4", self.ports["127.0.6.4"])))
        self.partition.heal()
        self.assertTrue((yield _connect("127.0.6.2", "127.0.6.3", self.ports["127.0.6.3"])))

    @defer.inlineCallbacks
    def test_an_open_connection_goes_silent_across_a_cut(self):
        client = socket.create_connection(
            ("127.0.6.3", self.ports["127.0.6.3"]), timeout=5, source_address=("127.0.6.2", 0)
        )
        self.addCleanup(client.close)
        yield defer.succeed(None)
        self.partition.cut("127.0.6.2", "127.0.6.3")
        client.settimeout(0.5)
        client.sendall(b"ping")
        with self.assertRaises(socket.timeout):
            client.recv(4)

    def test_remove_leaves_no_table_behind(self):
        self.partition.cut("127.0.6.2", "127.0.6.3")
        self.assertIn(self.partition.table, nft_tables())
        self.assertIn("drop", self.partition.rules())
        self.partition.remove()
        self.assertNotIn(self.partition.table, nft_tables())
