"""The data dir's identity file, on a real directory."""

from __future__ import annotations

import json
import os

from twisted.trial import unittest

from timemachine.cluster.identity import IDENTITY_FILE, identity_problem, load_identity
from timemachine.domain.errors import StorageError


class IdentityTests(unittest.TestCase):
    def setUp(self):
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.path = os.path.join(self.data_dir, IDENTITY_FILE)

    def test_a_data_dir_keeps_the_incarnation_made_on_its_first_start(self):
        incarnation = load_identity(self.data_dir, "node1")
        self.assertEqual(len(incarnation), 32)
        int(incarnation, 16)
        with open(self.path) as f:
            self.assertEqual(json.load(f), {"node_id": "node1", "incarnation": incarnation})
        self.assertEqual(load_identity(self.data_dir, "node1"), incarnation)

    def test_a_new_data_dir_is_a_new_incarnation(self):
        other = self.mktemp()
        os.makedirs(other)
        self.assertNotEqual(load_identity(self.data_dir, "node1"), load_identity(other, "node1"))

    def test_another_nodes_data_dir_is_refused_untouched(self):
        load_identity(self.data_dir, "node1")
        with open(self.path, "rb") as f:
            before = f.read()
        with self.assertRaises(StorageError) as raised:
            load_identity(self.data_dir, "node2")
        message = str(raised.exception)
        self.assertIn(self.path, message)
        self.assertIn("belongs to node node1, not node2", message)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_a_damaged_identity_is_refused_untouched(self):
        for damaged in (b"", b"{not json", b'{"node_id": "node1"}',
                        b'{"node_id": "node1", "incarnation": "zz"}',
                        b'{"node_id": "node1", "incarnation": "abc"}',
                        b'{"node_id": 7, "incarnation": "' + b"a" * 32 + b'"}'):
            with open(self.path, "wb") as f:
                f.write(damaged)
            with self.assertRaises(StorageError) as raised:
                load_identity(self.data_dir, "node1")
            self.assertIn(self.path, str(raised.exception))
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), damaged)

    def test_only_another_recorded_incarnation_is_a_problem(self):
        self.assertIsNone(identity_problem("node2", "", "aa"))
        self.assertIsNone(identity_problem("node2", "aa", "aa"))
        problem = identity_problem("node2", "aa", "bb")
        self.assertIn("incarnation bb, the cluster knows aa", problem)
        self.assertIn("POST /cluster/remove", problem)
        self.assertIn("incarnation none", identity_problem("node2", "aa", ""))
