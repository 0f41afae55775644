"""The peer network over real TCP on loopback addresses: node a on 127.0.1.2, b on
127.0.1.3, c on 127.0.1.4 (Linux routes all of 127/8 to lo); the partition tests on
127.0.2.x. No other test module uses these blocks, so a cut made here in one trial
worker never falls on another worker's test.

Waits poll the real reactor until a condition holds (bounded, never asserted on time);
backoffs are small so that reconnects happen within a test.
"""

from __future__ import annotations

import random
import struct

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.support import Partition
from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain.errors import NotFound, Unavailable
from timemachine.peer.errors import (
    MessageTooLarge,
    PeerNetworkStopped,
    PeerTimeout,
    PeerUnavailable,
)
from timemachine.peer.framing import encode_frame
from timemachine.peer.network import PeerNetwork
from timemachine.peer.protocol import IPeerProtocolOwner
from timemachine.peer.requests import INTERNAL_ERROR_CODE, error_of

HOSTS = {"a": "127.0.1.2", "b": "127.0.1.3", "c": "127.0.1.4", "x": "127.0.1.5"}


@defer.inlineCallbacks
def wait_until(predicate, what: str, timeout: float = 10.0):
    """Poll ``predicate`` every few ms until it holds; fail after ``timeout`` s."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        yield task.deferLater(reactor, 0.005, lambda: None)


def turns(n: int = 5):
    """A few reactor turns with real I/O in between."""
    return task.deferLater(reactor, 0.05 * n, lambda: None)


def heartbeat(group: int, term: int) -> pb.RaftMessage:
    return pb.RaftMessage(group=group, type=pb.RaftMessage.HEARTBEAT, term=term)


class RawClient(Protocol):
    """A client that speaks bytes, not the protocol: what the node does with junk."""

    def __init__(self):
        self.received = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(None)


class PeerNetworkTestCase(unittest.TestCase):
    """Builds started networks, stopped at cleanup."""

    timeout = 30  # a broken network fails a test in seconds, not trial's 120
    hosts = HOSTS

    def make_network(self, node_id: str, port: int = 0, host: str | None = None, **kwargs):
        host = host or self.hosts[node_id]
        kwargs.setdefault("backoff_initial", 0.01)
        kwargs.setdefault("backoff_max", 0.05)
        kwargs.setdefault("request_timeout", 5.0)
        network = PeerNetwork(
            reactor,
            node_id,
            TCP4ServerEndpoint(reactor, port, interface=host),
            f"{host}:0",
            random.Random(node_id),
            **kwargs,
        )
        network.received = []
        network.set_raft_receiver(lambda frm, m: network.received.append((frm, m)))
        self.addCleanup(network.stop)
        return network

    @defer.inlineCallbacks
    def started(self, node_id: str, **kwargs):
        network = self.make_network(node_id, **kwargs)
        yield network.start()
        return network

    @defer.inlineCallbacks
    def connected_pair(self, **kwargs):
        """a dials b (b accepts a as a joining node); both have the Hello."""
        a = yield self.started("a", **kwargs)
        b = yield self.started("b", **kwargs)
        a.set_peers({"b": b.advertise})
        yield wait_until(
            lambda: a.connected_peers() == ["b"] and b.connected_peers() == ["a"],
            "a and b are connected",
        )
        return a, b

    def connection(self, network, node_id):
        return network._peers[node_id].connection

    @defer.inlineCallbacks
    def raw_client(self, network):
        client = RawClient()
        host = network.listening_address
        endpoint = TCP4ClientEndpoint(reactor, host.host, host.port)
        yield endpoint.connect(Factory.forProtocol(lambda: client))
        return client


class HandshakeTests(PeerNetworkTestCase):
    def test_network_is_a_protocol_owner(self):
        verifyObject(IPeerProtocolOwner, self.make_network("a"))

    @defer.inlineCallbacks
    def test_hello_exchange_connects_both_sides(self):
        a, b = yield self.connected_pair()
        # b never had a in its set: it learnt a's advertised address from the Hello.
        self.assertEqual(b.stats()["a"].advertise, a.advertise)
        self.assertIsNone(b.stats()["a"].address)
        self.assertEqual(a.stats()["b"].address, b.advertise)
        self.assertTrue(a.stats()["b"].connected)
        self.assertEqual(a.advertise, f"{HOSTS['a']}:{a.listening_address.port}")

    @defer.inlineCallbacks
    def test_outgoing_connections_bind_to_the_advertise_host(self):
        a, b = yield self.connected_pair()
        self.assertTrue(self.connection(a, "b").outgoing)
        self.assertEqual(self.connection(b, "a").transport.getPeer().host, HOSTS["a"])
        self.assertEqual(self.connection(a, "b").transport.getHost().host, HOSTS["a"])

    @defer.inlineCallbacks
    def test_connections_send_without_nagle_delay(self):
        a, b = yield self.connected_pair()
        self.assertTrue(self.connection(a, "b").transport.getTcpNoDelay())
        self.assertTrue(self.connection(b, "a").transport.getTcpNoDelay())

    @defer.inlineCallbacks
    def test_when_both_dial_one_connection_survives_on_both_sides(self):
        for round_ in range(5):
            a = yield self.started("a")
            b = yield self.started("b")
            a.set_peers({"b": b.advertise})
            b.set_peers({"a": a.advertise})
            yield wait_until(
                lambda a=a, b=b: (
                    len(a._connections) == len(b._connections) == 1
                    and a.connected_peers() == ["b"]
                    and b.connected_peers() == ["a"]
                ),
                "one connection is left",
            )
            yield turns()
            # The same TCP connection on both ends: the one a dialled ("a" sorts first).
            on_a, on_b = self.connection(a, "b"), self.connection(b, "a")
            self.assertTrue(on_a.outgoing, f"round {round_}")
            self.assertFalse(on_b.outgoing)
            self.assertEqual(on_a.transport.getHost(), on_b.transport.getPeer())
            # Closing the duplicate is no failure: no redial followed.
            self.assertEqual(a.stats()["b"].reconnects + b.stats()["a"].reconnects, 0)
            self.assertEqual(len(a._connections) + len(b._connections), 2)
            yield a.stop()
            yield b.stop()

    @defer.inlineCallbacks
    def test_a_redial_by_the_same_node_replaces_a_half_open_connection(self):
        a, b = yield self.connected_pair()
        old_on_b = self.connection(b, "a")
        # a forgets its connection as a restarted process would, but the socket stays
        # open: b holds a half-open leftover when a's new connection arrives.
        a._connections.pop(self.connection(a, "b"))
        a._peers["b"].connection = None
        a._dial(a._peers["b"])
        yield wait_until(
            lambda: a.connected_peers() == ["b"] and self.connection(b, "a") is not old_on_b,
            "b took the new connection",
        )
        yield wait_until(lambda: len(b._connections) == 1, "b closed the old one")
        on_a, on_b = self.connection(a, "b"), self.connection(b, "a")
        self.assertEqual(on_a.transport.getHost(), on_b.transport.getPeer())
        self.assertEqual(a.stats()["b"].reconnects, 0)

    @defer.inlineCallbacks
    def test_a_node_claiming_this_nodes_id_is_refused(self):
        a = yield self.started("a")
        impostor = yield self.started("a", host=HOSTS["b"])
        a.set_peers({"b": impostor.advertise})
        yield wait_until(
            lambda: a.rejected_connections >= 2 and impostor.rejected_connections, "both refused"
        )
        self.assertEqual(a.connected_peers(), [])
        self.assertEqual(impostor.connected_peers(), [])

    @defer.inlineCallbacks
    def test_a_dialled_address_answering_as_another_node_is_refused(self):
        a = yield self.started("a")
        c = yield self.started("c")
        a.set_peers({"b": c.advertise})
        yield wait_until(lambda: a.rejected_connections >= 2, "a refused c twice")
        self.assertNotIn("c", a.connected_peers())
        self.assertGreaterEqual(a.stats()["b"].reconnects, 1)

    @defer.inlineCallbacks
    def test_each_side_learns_the_others_incarnation_from_its_hello(self):
        a, b = yield self.connected_pair(incarnation="")
        self.assertEqual(a.incarnation_of("b"), "")
        c = yield self.started("c", incarnation="c0ffee")
        a.set_peers({"b": b.advertise, "c": c.advertise})
        yield wait_until(lambda: "a" in c.connected_peers(), "a and c are connected")
        self.assertEqual(a.incarnation_of("c"), "c0ffee")
        self.assertIsNone(a.incarnation_of("x"))

    @defer.inlineCallbacks
    def test_a_peer_with_another_incarnation_is_refused_both_ways(self):
        a = yield self.started("a", incarnation="aa")
        b = yield self.started("b", incarnation="b2")

        def problem(node_id, incarnation):
            return None if incarnation == "b1" else f"{node_id} is not on data dir b1"

        a.check_identities(problem)
        a.set_peers({"b": b.advertise})  # a dials b
        b.set_peers({"a": a.advertise})  # and b dials a
        yield wait_until(
            lambda: a.rejected_connections >= 4 and b.stats()["a"].reconnects >= 2,
            "a refused b's Hellos, and b dialled again",
        )
        self.assertEqual(a.connected_peers(), [])
        self.assertEqual(a.refused_incarnation("b"), "b2")
        self.assertIsNone(a.incarnation_of("b"))
        # b was told why, so that its own log says it.
        self.assertEqual(b.refusal_from("a"), "b is not on data dir b1")
        self.assertIsNone(a.refusal_from("b"))

    @defer.inlineCallbacks
    def test_a_connected_peer_found_on_another_incarnation_is_cut_off(self):
        a, b = yield self.connected_pair(incarnation="b2")
        a.check_identities(lambda node_id, incarnation: "not the data dir it joined with")
        yield wait_until(lambda: not b.connected_peers(), "b saw the abort")
        yield turns()
        self.assertEqual(a.connected_peers(), [])
        self.assertEqual(a.refused_incarnation("b"), "b2")
        # Cut off at once; told why as a redials it.
        yield wait_until(lambda: b.refusal_from("a") is not None, "b was told why")
        self.assertEqual(b.refusal_from("a"), "not the data dir it joined with")
        a.check_identities(lambda node_id, incarnation: None)  # it was removed, say
        yield wait_until(lambda: a.connected_peers() == ["b"], "b is accepted again")
        self.assertIsNone(a.refused_incarnation("b"))

    @defer.inlineCallbacks
    def test_removing_a_peer_closes_its_connection_and_stops_dialling(self):
        a, b = yield self.connected_pair()
        a.set_peers({})
        yield wait_until(lambda: not b.connected_peers(), "b saw the close")
        yield turns()
        self.assertEqual(a.connected_peers(), [])
        self.assertEqual(a._connections, {})
        self.assertIsNone(a._peers["b"].retry)


class RaftTests(PeerNetworkTestCase):
    @defer.inlineCallbacks
    def test_messages_of_one_turn_leave_as_one_frame_in_order(self):
        a, b = yield self.connected_pair()
        before = b.stats()["a"].frames_received
        sent = [heartbeat(group, term) for term, group in enumerate([0, 3, 1, 0, 2, 3, 1])]
        for message in sent:
            a.send_raft("b", message)
        yield wait_until(lambda: len(b.received) == len(sent), "b got every message")
        self.assertEqual(b.received, [("a", m) for m in sent])
        self.assertEqual(b.stats()["a"].frames_received - before, 1)
        self.assertEqual(a.stats()["b"].raft_messages_sent, len(sent))
        self.assertEqual(b.stats()["a"].raft_messages_received, len(sent))

    @defer.inlineCallbacks
    def test_each_turn_is_its_own_batch(self):
        a, b = yield self.connected_pair()
        before = b.stats()["a"].frames_received
        a.send_raft("b", heartbeat(1, 1))
        yield task.deferLater(reactor, 0, lambda: None)
        a.send_raft("b", heartbeat(1, 2))
        yield wait_until(lambda: len(b.received) == 2, "b got both")
        self.assertEqual(b.stats()["a"].frames_received - before, 2)

    @defer.inlineCallbacks
    def test_groups_multiplexed_to_several_peers(self):
        a = yield self.started("a")
        b = yield self.started("b")
        c = yield self.started("c")
        a.set_peers({"b": b.advertise, "c": c.advertise})
        b.set_peers({"a": a.advertise, "c": c.advertise})
        c.set_peers({"a": a.advertise, "b": b.advertise})
        yield wait_until(
            lambda: all(len(n.connected_peers()) == 2 for n in (a, b, c)), "every pair is connected"
        )
        to_b = [heartbeat(g, 10 + g) for g in (0, 1, 2)]
        to_c = [heartbeat(g, 20 + g) for g in (2, 0, 1)]
        from_b = [heartbeat(g, 30 + g) for g in (1, 0)]
        for m_b, m_c in zip(to_b, to_c, strict=True):
            a.send_raft("b", m_b)
            a.send_raft("c", m_c)
        for m in from_b:
            b.send_raft("c", m)
        yield wait_until(lambda: len(b.received) == 3 and len(c.received) == 5, "all arrived")
        self.assertEqual(b.received, [("a", m) for m in to_b])
        self.assertEqual([m for frm, m in c.received if frm == "a"], to_c)
        self.assertEqual([m for frm, m in c.received if frm == "b"], from_b)
        for network in (a, b, c):
            self.assertEqual(len(network._connections), 2)

    @defer.inlineCallbacks
    def test_a_batch_over_the_frame_limit_is_split(self):
        a, b = yield self.connected_pair(max_frame_bytes=1000)
        before = b.stats()["a"].frames_received
        sent = [
            pb.RaftMessage(group=g, type=pb.RaftMessage.APPEND, context=b"x" * 300)
            for g in range(10)
        ]
        too_big = pb.RaftMessage(group=99, context=b"y" * 2000)
        for message in [*sent[:5], too_big, *sent[5:]]:
            a.send_raft("b", message)
        yield wait_until(lambda: len(b.received) == 10, "b got the ten that fit")
        self.assertEqual([m for _, m in b.received], sent)
        self.assertGreater(b.stats()["a"].frames_received - before, 1)
        self.assertEqual(a.stats()["b"].raft_dropped, 1)
        self.assertEqual(b.rejected_connections, 0)
        self.assertEqual(a.connected_peers(), ["b"])
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_messages_to_an_unconnected_node_are_dropped(self):
        a = yield self.started("a")
        a.send_raft("b", heartbeat(0, 1))
        self.assertEqual(a.stats()["b"].raft_dropped, 1)
        self.assertIsNone(a._flush_call)

    @defer.inlineCallbacks
    def test_messages_queued_when_the_connection_goes_are_dropped(self):
        a, b = yield self.connected_pair()
        a.send_raft("b", heartbeat(0, 1))
        a.send_raft("b", heartbeat(0, 2))
        a.set_peers({})  # closes the connection before the turn ends
        yield turns()
        self.assertEqual(a.stats()["b"].raft_dropped, 2)
        self.assertEqual(b.received, [])

    @defer.inlineCallbacks
    def test_a_receiver_failure_does_not_stop_the_batch(self):
        a, b = yield self.connected_pair()
        got = []

        def receiver(frm, message):
            if message.term == 2:
                raise RuntimeError("group 2 is broken")
            got.append(message.term)

        b.set_raft_receiver(receiver)
        for term in (1, 2, 3):
            a.send_raft("b", heartbeat(term, term))
        yield wait_until(lambda: got == [1, 3], "the others arrived")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(b.connected_peers(), ["a"])


class ReconnectTests(PeerNetworkTestCase):
    @defer.inlineCallbacks
    def test_a_node_outside_the_peer_set_is_not_dialled_back(self):
        a, b = yield self.connected_pair()
        yield a.stop()
        yield wait_until(lambda: not b.connected_peers(), "b saw a go")
        yield turns()
        self.assertEqual(b.stats()["a"].reconnects, 0)
        self.assertIsNone(b._peers["a"].retry)
        self.assertEqual(b._connections, {})

    @defer.inlineCallbacks
    def test_a_new_address_is_dialled_at_once(self):
        a = yield self.started("a", backoff_initial=3600, backoff_max=3600)
        a.set_peers({"b": f"{HOSTS['b']}:1"})  # refused: the next try is minutes away
        yield wait_until(lambda: a._peers["b"].retry is not None, "a waits")
        self.assertGreater(a._peers["b"].retry.getTime() - reactor.seconds(), 60)
        b = yield self.started("b")
        a.set_peers({"b": b.advertise})
        yield wait_until(lambda: a.connected_peers() == ["b"], "a reached b")

    @defer.inlineCallbacks
    def test_reconnects_after_the_listener_restarts(self):
        a, b = yield self.connected_pair()
        port = b.listening_address.port
        yield b.stop()
        yield wait_until(lambda: not a.connected_peers(), "a saw b go")
        yield wait_until(lambda: a.stats()["b"].reconnects >= 2, "a retried")
        b2 = yield self.started("b", port=port)
        yield wait_until(lambda: a.connected_peers() == ["b"], "a reconnected")
        self.assertEqual(a._peers["b"].failures, 0)  # the backoff starts over
        a.send_raft("b", heartbeat(0, 7))
        yield wait_until(lambda: b2.received == [("a", heartbeat(0, 7))], "b2 got it")

    @defer.inlineCallbacks
    def test_backoff_grows_to_its_ceiling_with_jitter(self):
        delays = []

        class SpyReactor:
            """The real reactor, noting the delay of each redial."""

            def __getattr__(self, name):
                return getattr(reactor, name)

            def callLater(self, delay, f, *args, **kw):
                if getattr(f, "__name__", "") == "_redial":
                    delays.append(delay)
                return reactor.callLater(delay, f, *args, **kw)

        a = yield self.started("a", backoff_initial=0.01, backoff_max=0.04)
        self.patch(a, "_reactor", SpyReactor())
        # Nothing listens on port 1 of b's address: every dial is refused at once.
        a.set_peers({"b": f"{HOSTS['b']}:1"})
        yield wait_until(lambda: a.stats()["b"].reconnects >= 8, "eight retries")
        ceilings = [0.01, 0.02, 0.04, 0.04, 0.04, 0.04, 0.04, 0.04]
        for delay, ceiling in zip(delays, ceilings, strict=False):
            self.assertTrue(0 <= delay <= ceiling, (delay, ceiling))
        self.assertGreater(len(set(delays)), 1)  # jittered, not fixed

    def test_the_jitter_comes_from_the_rng_passed_in(self):
        def delays(seed):
            clock = task.Clock()
            network = PeerNetwork(clock, "a", None, f"{HOSTS['a']}:0", random.Random(seed))
            network._running = True  # as if started; nothing is dialled on a Clock
            peer = network._peer("b")
            peer.wanted = True
            drawn = []
            for _ in range(4):
                network._schedule_dial(peer)
                drawn.append(peer.retry.getTime())
                peer.retry.cancel()
                peer.retry = None
            return drawn

        self.assertEqual(delays(1), delays(1))
        self.assertNotEqual(delays(1), delays(2))


class RequestTests(PeerNetworkTestCase):
    @defer.inlineCallbacks
    def test_concurrent_requests_answered_out_of_order(self):
        a, b = yield self.connected_pair()
        held = {}

        def http(frm, call):
            held[call.path] = defer.Deferred()
            return held[call.path]

        b.handle("http", http)
        paths = ["/one", "/two", "/three"]
        requests = [pb.Request(http=pb.HttpCall(method="GET", path=p)) for p in paths]
        answers = [a.request("b", r) for r in requests]
        self.assertEqual(len({r.id for r in requests}), 3)
        yield wait_until(lambda: len(held) == 3, "b holds all three")
        for path in reversed(paths):
            held[path].callback(pb.HttpAnswer(status=200, body=path.encode()))
        responses = yield defer.gatherResults(answers)
        self.assertEqual([r.http.body for r in responses], [p.encode() for p in paths])
        self.assertEqual([r.id for r in responses], [r.id for r in requests])
        self.assertEqual([r.error_code for r in responses], ["", "", ""])

    @defer.inlineCallbacks
    def test_built_in_ping(self):
        ready = [False]
        a = yield self.started("a")
        b = yield self.started("b", ready=lambda: ready[0])
        a.set_peers({"b": b.advertise})
        yield wait_until(lambda: a.connected_peers() == ["b"], "connected")
        response = yield a.request("b", pb.Request(ping=pb.Ping()))
        self.assertEqual((response.pong.node_id, response.pong.ready), ("b", False))
        ready[0] = True
        response = yield b.request("a", pb.Request(ping=pb.Ping()))
        self.assertEqual((response.pong.node_id, response.pong.ready), ("a", True))

    @defer.inlineCallbacks
    def test_errors_travel_as_codes(self):
        a, b = yield self.connected_pair()

        def propose(frm, body):
            raise NotFound(f"group {body.group} from {frm}")

        def http(frm, call):
            raise ValueError("a bug")

        b.handle("propose", propose)
        b.handle("http", http)
        response = yield a.request("b", pb.Request(propose=pb.Propose(group=3)))
        self.assertEqual((response.error_code, response.error), ("E_NOT_FOUND", "group 3 from a"))
        self.assertIsInstance(error_of(response), NotFound)
        response = yield a.request("b", pb.Request(http=pb.HttpCall()))
        self.assertEqual(
            (response.error_code, response.error), (INTERNAL_ERROR_CODE, "internal error")
        )
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    @defer.inlineCallbacks
    def test_no_handler_is_an_error_response(self):
        a, _ = yield self.connected_pair()
        response = yield a.request("b", pb.Request(propose=pb.Propose(group=1)))
        self.assertEqual(response.error_code, "E_UNAVAILABLE")
        self.assertIsInstance(error_of(response), Unavailable)

    @defer.inlineCallbacks
    def test_not_connected(self):
        a = yield self.started("a")
        failure = yield self.assertFailure(
            a.request("b", pb.Request(ping=pb.Ping())), PeerUnavailable
        )
        self.assertEqual(failure.node_id, "b")

    @defer.inlineCallbacks
    def test_timeout_then_a_late_answer_is_ignored(self):
        a, b = yield self.connected_pair()
        held = []
        b.handle("http", lambda frm, call: held.append(defer.Deferred()) or held[-1])
        late = a.request("b", pb.Request(http=pb.HttpCall(path="/slow")), timeout=0.2)
        # b is slow to answer, not cut off: other traffic still comes from it.
        yield wait_until(lambda: held, "b has the request")
        b.send_raft("a", heartbeat(1, 1))
        error = yield self.assertFailure(late, PeerTimeout)
        self.assertEqual(error.timeout, 0.2)
        self.assertEqual(a._connections[self.connection(a, "b")].pending, {})
        frames = a.stats()["b"].frames_received
        held[0].callback(pb.HttpAnswer(status=200))
        yield wait_until(lambda: a.stats()["b"].frames_received > frames, "the late answer came")
        # The connection still serves requests.
        response = yield a.request("b", pb.Request(ping=pb.Ping()))
        self.assertEqual(response.pong.node_id, "b")

    @defer.inlineCallbacks
    def request_across_a_cut(self, a, b, one_way=False):
        """a's request to b times out across an nft cut (``one_way``: only what a sends
        to b is dropped); the connection is reset, the link heals, and b, asked again,
        must never get the request sent across the cut. Fires with what b got, and the
        frames a had received from b when the request timed out."""
        arrived = []
        b.handle("http", lambda frm, call: arrived.append(call.path) or pb.HttpAnswer())
        partition = Partition()
        self.addCleanup(partition.remove)
        partition.cut(self.hosts["a"], self.hosts["b"], one_way=one_way)
        before = self.connection(a, "b")
        cut_off = a.request("b", pb.Request(http=pb.HttpCall(path="/cut")), timeout=0.5)
        yield self.assertFailure(cut_off, PeerTimeout)
        received = a.stats()["b"].frames_received
        # The connection is reset, its unsent bytes dropped, so TCP does not deliver
        # the request once the link heals.
        yield wait_until(lambda: self.connection(a, "b") is not before, "the connection reset")
        partition.heal()
        yield wait_until(lambda: "a" in b.connected_peers() and self.connection(a, "b"),
                         "a and b connected again", timeout=20)
        response = yield a.request("b", pb.Request(http=pb.HttpCall(path="/after")))
        self.assertEqual(response.error_code, "")
        # Room for TCP's retransmissions of the old connection, had they been kept.
        yield task.deferLater(reactor, 3.0, lambda: None)
        return arrived, received

    @defer.inlineCallbacks
    def test_a_request_lost_in_a_partition_is_never_delivered_after_it(self):
        a, b = yield self.connected_pair()
        # Nothing comes from b meanwhile.
        arrived, _ = yield self.request_across_a_cut(a, b)
        self.assertEqual(arrived, ["/after"])

    @defer.inlineCallbacks
    def test_a_request_lost_on_a_link_cut_one_way_is_never_delivered_after_it(self):
        a, b = yield self.connected_pair()
        # b goes on talking to a, whose frames to b are dropped: what a sent is not
        # acknowledged, and the connection is reset all the same.
        talking = task.LoopingCall(b.send_raft, "a", heartbeat(1, 1))
        talking.start(0.05)
        self.addCleanup(lambda: talking.running and talking.stop())
        before = a.stats()["b"].frames_received
        arrived, at_timeout = yield self.request_across_a_cut(a, b, one_way=True)
        self.assertGreater(at_timeout, before, "b kept talking")
        self.assertEqual(arrived, ["/after"])

    @defer.inlineCallbacks
    def test_connection_lost_mid_request(self):
        a, b = yield self.connected_pair()
        b.handle("http", lambda frm, call: defer.Deferred())
        pending = a.request("b", pb.Request(http=pb.HttpCall()))
        yield wait_until(lambda: b.stats()["a"].requests_received == 1, "b has it")
        yield b.stop()
        error = yield self.assertFailure(pending, PeerUnavailable)
        self.assertNotIsInstance(error, PeerNetworkStopped)

    @defer.inlineCallbacks
    def test_cancelling_forgets_the_request(self):
        a, b = yield self.connected_pair()
        b.handle("http", lambda frm, call: defer.Deferred())
        pending = a.request("b", pb.Request(http=pb.HttpCall()))
        pending.cancel()
        yield self.assertFailure(pending, defer.CancelledError)
        self.assertEqual(a._connections[self.connection(a, "b")].pending, {})

    @defer.inlineCallbacks
    def test_a_request_over_the_frame_limit_is_refused_locally(self):
        a, b = yield self.connected_pair(max_frame_bytes=1000)
        yield self.assertFailure(
            a.request("b", pb.Request(http=pb.HttpCall(body=b"x" * 2000))), MessageTooLarge
        )
        # An answer over the limit becomes an error answer, and the connection stays.
        b.handle("http", lambda frm, call: pb.HttpAnswer(body=b"y" * 2000))
        response = yield a.request("b", pb.Request(http=pb.HttpCall()))
        self.assertEqual(response.error_code, "E_TOO_LARGE")
        self.assertEqual(a.connected_peers(), ["b"])


class CounterTests(PeerNetworkTestCase):
    """`PeerNetwork.stats`: what each side counts of the other (the metrics' source)."""

    hosts = {"a": "127.0.2.1", "b": "127.0.2.2"}

    @defer.inlineCallbacks
    def test_both_sides_count_the_same_frames_bytes_and_messages(self):
        a, b = yield self.connected_pair()
        b.handle("http", lambda frm, call: pb.HttpAnswer(status=200, body=call.body))
        for n in range(3):
            yield a.request("b", pb.Request(http=pb.HttpCall(body=b"x" * (100 * n))))
        a.send_raft("b", heartbeat(1, 1))
        a.send_raft("b", heartbeat(2, 1))
        yield wait_until(lambda: len(b.received) == 2, "b has both messages")
        sent, got = a.stats()["b"], b.stats()["a"]
        self.assertTrue(sent.connected)
        self.assertEqual((sent.requests_sent, got.requests_received), (3, 3))
        self.assertEqual((sent.raft_messages_sent, got.raft_messages_received), (2, 2))
        # Hello, three requests, one Raft batch; and back: Hello, three answers.
        self.assertEqual((sent.frames_sent, got.frames_received), (5, 5))
        self.assertEqual((sent.frames_received, got.frames_sent), (4, 4))
        self.assertEqual(sent.bytes_sent, got.bytes_received)
        self.assertEqual(sent.bytes_received, got.bytes_sent)
        self.assertGreater(sent.bytes_sent, 300)
        self.assertEqual((sent.requests_timed_out, sent.requests_failed), (0, 0))

    @defer.inlineCallbacks
    def test_timeouts_and_failures_of_requests_are_counted_apart(self):
        a, b = yield self.connected_pair(max_frame_bytes=1000)
        # b holds its answers, and shows it is there (a silent peer's connection is
        # reset when a request to it times out).
        b.handle("http", lambda frm, call: b.send_raft("a", heartbeat(1, 1)) or defer.Deferred())
        yield self.assertFailure(
            a.request("b", pb.Request(http=pb.HttpCall()), timeout=0.5), PeerTimeout
        )
        self.assertEqual((a.stats()["b"].requests_timed_out, a.stats()["b"].requests_failed),
                         (1, 0))
        yield self.assertFailure(
            a.request("b", pb.Request(http=pb.HttpCall(body=b"x" * 2000))), MessageTooLarge
        )
        self.assertEqual(a.stats()["b"].requests_failed, 1)
        # An answer carrying an error is an answer.
        response = yield a.request("b", pb.Request(propose=pb.Propose(group=1)))
        self.assertEqual(response.error_code, "E_UNAVAILABLE")
        pending = a.request("b", pb.Request(http=pb.HttpCall()))
        yield wait_until(lambda: b.stats()["a"].requests_received == 3, "b has it")
        yield b.stop()
        yield self.assertFailure(pending, PeerUnavailable)
        yield wait_until(lambda: not a.stats()["b"].connected, "a saw the connection go")
        yield self.assertFailure(a.request("b", pb.Request(ping=pb.Ping())), PeerUnavailable)
        stats = a.stats()["b"]
        self.assertEqual((stats.requests_timed_out, stats.requests_failed), (1, 3))
        self.assertEqual(stats.requests_sent, 3)


class ProtocolErrorTests(PeerNetworkTestCase):
    @defer.inlineCallbacks
    def assert_closed_and_still_serving(self, b, a, payload: bytes):
        client = yield self.raw_client(b)
        client.transport.write(payload)
        yield client.lost
        self.assertEqual(b.rejected_connections, 1)
        response = yield a.request("b", pb.Request(ping=pb.Ping()))
        self.assertEqual(response.pong.node_id, "b")
        return client

    @defer.inlineCallbacks
    def test_oversize_frame_closes_that_connection_only(self):
        a, b = yield self.connected_pair(max_frame_bytes=1024)
        yield self.assert_closed_and_still_serving(b, a, struct.pack(">I", 1025) + b"x" * 100)

    @defer.inlineCallbacks
    def test_garbage_envelope_closes(self):
        a, b = yield self.connected_pair()
        # Field 1 (hello) claims 5 bytes and has 2: not a parsable Envelope.
        yield self.assert_closed_and_still_serving(b, a, encode_frame(b"\x0a\x05ab"))

    @defer.inlineCallbacks
    def test_a_first_envelope_that_is_not_hello_closes(self):
        a, b = yield self.connected_pair()
        ping = pb.Envelope(request=pb.Request(id=1, ping=pb.Ping())).SerializeToString()
        client = yield self.assert_closed_and_still_serving(b, a, encode_frame(ping))
        # b's Hello came first, and nothing answered the request.
        self.assertEqual(client.received[4:], b.hello().SerializeToString())

    @defer.inlineCallbacks
    def test_a_second_hello_closes(self):
        a, b = yield self.connected_pair()
        hello = pb.Envelope(hello=pb.Hello(node_id="x", advertise=f"{HOSTS['x']}:1"))
        frame = encode_frame(hello.SerializeToString())
        yield self.assert_closed_and_still_serving(b, a, frame + frame)

    @defer.inlineCallbacks
    def test_an_envelope_of_unknown_kind_is_ignored(self):
        b = yield self.started("b")
        client = yield self.raw_client(b)
        hello = pb.Envelope(hello=pb.Hello(node_id="x", advertise=f"{HOSTS['x']}:1"))
        ping = pb.Envelope(request=pb.Request(id=5, ping=pb.Ping()))
        # Field 15 is no Envelope field here (a newer build's kind); b"" is empty.
        for payload in (hello.SerializeToString(), b"\x78\x01", b"", ping.SerializeToString()):
            client.transport.write(encode_frame(payload))
        yield wait_until(
            lambda: len(client.received) > len(encode_frame(b.hello().SerializeToString())),
            "b answered the ping",
        )
        self.assertEqual(b.connected_peers(), ["x"])
        self.assertEqual(b.rejected_connections, 0)
        self.assertEqual(b.stats()["x"].frames_received, 4)
        client.transport.loseConnection()
        yield client.lost

    @defer.inlineCallbacks
    def test_silence_after_connecting_times_out(self):
        b = yield self.started("b", request_timeout=0.2)
        client = yield self.raw_client(b)
        yield client.lost
        self.assertEqual(b.rejected_connections, 1)
        self.assertEqual(b._connections, {})


class StopTests(PeerNetworkTestCase):
    @defer.inlineCallbacks
    def test_stop_cleans_everything(self):
        a, b = yield self.connected_pair()
        b.handle("http", lambda frm, call: defer.Deferred())
        pending = a.request("b", pb.Request(http=pb.HttpCall()))
        yield wait_until(lambda: b.stats()["a"].requests_received == 1, "b has it")
        a.set_peers({"b": b.advertise, "c": f"{HOSTS['c']}:1"})  # c: dialling and failing
        yield wait_until(lambda: a._peers["c"].retry is not None, "a waits to redial c")
        client = yield self.raw_client(a)  # a connection without a Hello yet
        a.send_raft("b", heartbeat(0, 1))  # queued for the end of the turn
        yield a.stop()
        yield self.assertFailure(pending, PeerNetworkStopped)
        yield client.lost
        self.assertEqual(a._connections, {})
        self.assertEqual(a.connected_peers(), [])
        self.assertEqual(a.stats()["b"].raft_dropped, 1)
        ours = [c for c in reactor.getDelayedCalls() if getattr(c.func, "__self__", None) is a]
        self.assertEqual(ours, [])
        self.assertIsNone(a._peers["c"].retry)
        yield self.assertFailure(a.request("b", pb.Request(ping=pb.Ping())), PeerNetworkStopped)
        yield a.stop()  # again: fine
        yield wait_until(lambda: not b.connected_peers(), "b saw a go")

    @defer.inlineCallbacks
    def test_stop_while_dialling(self):
        a = yield self.started("a", request_timeout=30)
        # Connecting takes a turn at least: the dial is still in flight.
        a.set_peers({"b": f"{HOSTS['c']}:1"})
        self.assertIsNotNone(a._peers["b"].dial)
        yield a.stop()
        self.assertIsNone(a._peers["b"].dial)
