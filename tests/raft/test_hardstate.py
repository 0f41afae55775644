"""A Raft member's hard state on disk: atomic replacement, checksums, defaults."""

import os

from twisted.internet import defer, reactor
from twisted.trial import unittest

from timemachine.domain.errors import CorruptLog
from timemachine.raft.hardstate import (
    FILE_NAME,
    HardStateFile,
    read_hard_state,
    write_hard_state,
)
from timemachine.raft.types import HardState
from timemachine.storage.iothread import IOThread


class HardStateTests(unittest.TestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def test_nothing_saved_is_the_empty_state(self):
        self.assertEqual(read_hard_state(self.directory), HardState())

    def test_round_trip_with_int_and_str_votes(self):
        for state in (HardState(3, 2, 17), HardState(9, "node2", 40), HardState(1, None, 0)):
            write_hard_state(self.directory, state)
            self.assertEqual(read_hard_state(self.directory), state)
        self.assertEqual(os.listdir(self.directory), [FILE_NAME])

    def test_a_crash_before_the_rename_leaves_the_old_state(self):
        write_hard_state(self.directory, HardState(4, 1, 10))
        # What a crash between writing the temporary file and renaming it leaves.
        with open(os.path.join(self.directory, FILE_NAME + ".tmp"), "wb") as f:
            f.write(b'{"crc32c": 1, "sta')
        self.assertEqual(read_hard_state(self.directory), HardState(4, 1, 10))

    def test_a_damaged_file_is_refused_not_guessed(self):
        write_hard_state(self.directory, HardState(4, 1, 10))
        path = os.path.join(self.directory, FILE_NAME)
        with open(path, "rb") as f:
            data = f.read()
        for damaged in (data.replace(b"10", b"11"), data[: len(data) // 2], b""):
            with open(path, "wb") as f:
                f.write(damaged)
            self.assertRaises(CorruptLog, read_hard_state, self.directory)

    @defer.inlineCallbacks
    def test_saved_and_loaded_off_the_reactor(self):
        io = IOThread(reactor, "hardstate-test")
        io.start()
        self.addCleanup(io.stop)
        store = HardStateFile(os.path.join(self.directory, "member"), io)
        self.assertEqual((yield store.load()), HardState())
        yield store.save(HardState(7, "n3", 21))
        self.assertEqual((yield store.load()), HardState(7, "n3", 21))
