"""The garbage collector's settings for a firing node (why: timemachine.firing.collector)."""

import gc
import weakref

from twisted.trial import unittest

from timemachine.firing.collector import FULL_PASS_EVERY, settle_collector


class _Link:
    other = None


class SettleCollectorTests(unittest.TestCase):
    def setUp(self):
        self.addCleanup(gc.set_threshold, *gc.get_threshold())

    def test_what_lives_so_far_leaves_the_collectors_sight(self):
        long_lived = _Link()
        settle_collector()
        self.assertTrue(gc.is_tracked(long_lived))
        self.assertFalse(any(o is long_lived for o in gc.get_objects()))

    def test_garbage_cycles_are_collected_not_frozen(self):
        first, second = _Link(), _Link()
        first.other, second.other = second, first
        gone = weakref.ref(first)
        del first, second
        settle_collector()
        self.assertIsNone(gone())

    def test_full_passes_are_spaced_out(self):
        gc.set_threshold(700, 10, 10)
        settle_collector()
        self.assertEqual(gc.get_threshold(), (700, 10, FULL_PASS_EVERY))
        self.assertGreater(FULL_PASS_EVERY, 10)
