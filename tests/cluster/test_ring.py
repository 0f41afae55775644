"""Key placement."""

import xxhash
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from timemachine.cluster.ring import Ring, shard_of
from timemachine.domain.commands import Configure
from timemachine.interfaces import IRing


class RingTests(unittest.TestCase):
    def test_interface(self):
        verifyObject(IRing, Ring.single_node("node1"))

    def test_shard_is_xxhash64_modulo_shards(self):
        ring = Ring.single_node("node1", shards=8)
        for job_id in ("pay-123", "a", "é", "x" * 256):
            expected = xxhash.xxh64_intdigest(job_id.encode()) % 8
            self.assertEqual(ring.shard_for(job_id), expected)
            self.assertEqual(shard_of(job_id, 8), expected)

    def test_ids_spread_over_every_shard(self):
        ring = Ring.single_node("node1", shards=8)
        counts = [0] * 8
        for i in range(8000):
            counts[ring.shard_for(f"job-{i}")] += 1
        self.assertTrue(all(800 < c < 1200 for c in counts), counts)

    def test_replicas_and_shards_of_a_node(self):
        ring = Ring(Configure(3, 1, (("a",), ("b",), ("a",))))
        self.assertEqual(ring.replicas(1), ("b",))
        self.assertEqual(ring.shards_of("a"), [0, 2])
        self.assertRaises(KeyError, ring.replicas, 3)
