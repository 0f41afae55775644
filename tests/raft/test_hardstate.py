"""`latest`: the later of two hard states one member saved."""

from twisted.trial import unittest

from timemachine.raft.hardstate import latest
from timemachine.raft.types import HardState


class LatestTests(unittest.TestCase):
    def test_the_higher_term_comes_with_the_vote_cast_in_it(self):
        older, newer = HardState(3, "n1", 10), HardState(4, "n2", 9)
        self.assertEqual(latest(older, newer), HardState(4, "n2", 10))
        self.assertEqual(latest(newer, older), HardState(4, "n2", 10))

    def test_a_vote_cast_later_in_the_same_term_is_kept(self):
        self.assertEqual(latest(HardState(5, None, 2), HardState(5, 3, 2)), HardState(5, 3, 2))
        self.assertEqual(latest(HardState(5, 3, 7), HardState(5, None, 2)), HardState(5, 3, 7))

    def test_no_vote_in_the_latest_term_is_no_vote(self):
        self.assertEqual(latest(HardState(2, 1, 0), HardState(3, None, 0)), HardState(3, None, 0))
