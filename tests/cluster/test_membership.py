"""The parts of membership that need no cluster (the cluster itself: tests.integration)."""

from twisted.trial import unittest

from timemachine.cluster.membership import default_http_address


class DefaultHTTPAddressTests(unittest.TestCase):
    def test_upstreams_rule_peer_port_less_100(self):
        # upstream's join.sh sends {"node_id": "node2", "raft_address": "localhost:8102"}
        self.assertEqual(default_http_address("localhost:8102"), "localhost:8002")
        self.assertEqual(default_http_address("127.0.0.3:9103"), "127.0.0.3:9003")
