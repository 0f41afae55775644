"""The counters a Raft group keeps (`timemachine.cluster.groupstats`), on their own."""

from twisted.trial import unittest

from timemachine.cluster.groupstats import LatencyHistogram


class LatencyHistogramTests(unittest.TestCase):
    def test_buckets_hold_what_is_at_most_their_bound_cumulatively(self):
        histogram = LatencyHistogram((0.001, 0.01, 0.1))
        for seconds in (0.0002, 0.001, 0.003, 0.1, 7.0):
            histogram.observe(seconds)
        self.assertEqual(
            histogram.cumulative(),
            [(0.001, 2), (0.01, 3), (0.1, 4), (float("inf"), 5)],
        )
        self.assertEqual(histogram.total, 5)
        self.assertAlmostEqual(histogram.sum, 7.1042)

    def test_an_empty_histogram_has_every_bucket_at_zero(self):
        histogram = LatencyHistogram((0.5,))
        self.assertEqual(histogram.cumulative(), [(0.5, 0), (float("inf"), 0)])
        self.assertEqual((histogram.total, histogram.sum), (0, 0.0))
