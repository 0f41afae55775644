"""Raft messages survive the trip through their wire form."""

from twisted.trial import unittest

from timemachine._pb import timemachine_pb2 as pb
from timemachine.peer.raftcodec import (
    META_GROUP,
    BadRaftMessage,
    decode_message,
    encode_message,
    group_of_shard,
    shard_of_group,
)
from timemachine.raft.types import ConfState, Entry, EntryKind, Message, MessageType, Snapshot


def _round_trip(group, message, incarnation=0):
    data = encode_message(group, incarnation, message).SerializeToString()
    decoded_group, decoded_incarnation, decoded = decode_message(
        pb.RaftMessage.FromString(data), message.frm, message.to
    )
    assert decoded_incarnation == incarnation, (decoded_incarnation, incarnation)
    return decoded_group, decoded


class RaftCodecTests(unittest.TestCase):
    def test_every_message_type_round_trips(self):
        for kind in MessageType:
            message = Message(kind, "node1", "node2", term=7, log_term=6, index=41, commit=40)
            self.assertEqual(_round_trip(3, message), (3, message))

    def test_every_field_round_trips(self):
        entries = (
            Entry(42, 7, b'{"job": 1}'),
            Entry(43, 7, b"\x00conf", EntryKind.CONF_CHANGE),
            Entry(44, 7),
        )
        message = Message(
            MessageType.APPEND,
            "node1",
            "node2",
            term=7,
            log_term=6,
            index=41,
            entries=entries,
            commit=40,
            reject=True,
            reject_hint=12,
            offset=65536,
            done=False,
            context=b"\x01\x02",
        )
        self.assertEqual(_round_trip(group_of_shard(11), message, incarnation=9), (12, message))

    def test_snapshot_chunk_round_trips_with_its_membership(self):
        conf = ConfState(frozenset({"node1", "node2", "node3"}), frozenset({"node4"}))
        chunk = Snapshot(index=900, term=5, conf=conf, data=b"\x00" * 1000 + b"sqlite")
        message = Message(
            MessageType.SNAPSHOT, "node1", "node4", term=5, snapshot=chunk, offset=0, done=False
        )
        group, decoded = _round_trip(META_GROUP, message)
        self.assertEqual((group, decoded), (META_GROUP, message))

    def test_a_message_without_snapshot_decodes_without_one(self):
        message = Message(MessageType.HEARTBEAT, "node1", "node2", term=3, commit=9)
        _, decoded = _round_trip(1, message)
        self.assertIsNone(decoded.snapshot)

    def test_an_empty_snapshot_still_arrives(self):
        # A joining member's first snapshot can be the bootstrap one: index 0, no data.
        empty = Snapshot(0, 0, ConfState(frozenset({"node1"})), b"")
        message = Message(MessageType.SNAPSHOT, "node1", "node2", term=1, snapshot=empty)
        _, decoded = _round_trip(1, message)
        self.assertEqual(decoded.snapshot, empty)

    def test_an_unknown_message_type_is_refused(self):
        wire = pb.RaftMessage(group=1, type=99, term=1)
        with self.assertRaises(BadRaftMessage):
            decode_message(wire, "node1", "node2")
        with self.assertRaises(BadRaftMessage):
            decode_message(pb.RaftMessage(group=1, term=1), "node1", "node2")

    def test_an_unknown_entry_kind_is_refused(self):
        wire = pb.RaftMessage(group=1, type=pb.RaftMessage.APPEND, term=1)
        wire.entries.add(index=1, term=1, kind=7, data=b"x")
        with self.assertRaises(BadRaftMessage):
            decode_message(wire, "node1", "node2")

    def test_shards_and_groups(self):
        self.assertEqual(group_of_shard(0), 1)
        self.assertEqual(shard_of_group(group_of_shard(5)), 5)
        with self.assertRaises(ValueError):
            shard_of_group(META_GROUP)
