"""Raft messages on the wire: `timemachine.raft.types.Message` <-> protobuf `RaftMessage`.

The sender and the receiver of a message are the two ends of the peer connection, so
the wire form carries neither; `decode_message` is told them. Groups are numbered on
the wire (0 is the meta group, shard ``k`` is group ``k + 1``: see `group_of_shard`),
and a shard's group of one shard map is told from the same number's group of another
by its ``incarnation``, the map's ``map_index``.

Decoding is strict about what the core could not survive (an unknown message type, an
entry kind it does not know): those raise `BadRaftMessage`, and the connection's owner
drops the message, as Raft tolerates loss.
"""

from __future__ import annotations

from timemachine._pb import timemachine_pb2 as pb
from timemachine.raft.types import ConfState, Entry, EntryKind, Message, MessageType, Snapshot

META_GROUP = 0

_TO_WIRE = {
    MessageType.PRE_VOTE: pb.RaftMessage.PRE_VOTE,
    MessageType.PRE_VOTE_RESP: pb.RaftMessage.PRE_VOTE_RESP,
    MessageType.VOTE: pb.RaftMessage.VOTE,
    MessageType.VOTE_RESP: pb.RaftMessage.VOTE_RESP,
    MessageType.APPEND: pb.RaftMessage.APPEND,
    MessageType.APPEND_RESP: pb.RaftMessage.APPEND_RESP,
    MessageType.HEARTBEAT: pb.RaftMessage.HEARTBEAT,
    MessageType.HEARTBEAT_RESP: pb.RaftMessage.HEARTBEAT_RESP,
    MessageType.SNAPSHOT: pb.RaftMessage.SNAPSHOT,
    MessageType.SNAPSHOT_RESP: pb.RaftMessage.SNAPSHOT_RESP,
    MessageType.TIMEOUT_NOW: pb.RaftMessage.TIMEOUT_NOW,
    MessageType.READ_INDEX: pb.RaftMessage.READ_INDEX,
    MessageType.READ_INDEX_RESP: pb.RaftMessage.READ_INDEX_RESP,
}
_FROM_WIRE = {wire: kind for kind, wire in _TO_WIRE.items()}
_ENTRY_KINDS = {kind.value: kind for kind in EntryKind}


class BadRaftMessage(ValueError):
    """A Raft message from a peer that this node cannot take (a remote error)."""


def group_of_shard(shard: int) -> int:
    """The wire number of a shard's Raft group."""
    return shard + 1


def shard_of_group(group: int) -> int:
    """The shard whose Raft group has wire number ``group`` (not the meta group)."""
    if group == META_GROUP:
        raise ValueError("group 0 is the meta group, not a shard")
    return group - 1


def encode_message(group: int, incarnation: int, message: Message) -> pb.RaftMessage:
    """The wire form of ``message``, a message of Raft group ``group`` (of the shard map
    ``incarnation``)."""
    wire = pb.RaftMessage(
        group=group,
        incarnation=incarnation,
        type=_TO_WIRE[message.type],
        term=message.term,
        log_term=message.log_term,
        index=message.index,
        commit=message.commit,
        reject=message.reject,
        reject_hint=message.reject_hint,
        offset=message.offset,
        done=message.done,
        context=message.context,
    )
    if message.entries:
        wire.entries.extend(
            pb.RaftEntry(index=e.index, term=e.term, kind=e.kind, data=e.data)
            for e in message.entries
        )
    snap = message.snapshot
    if snap is not None:
        wire.snapshot.index = snap.index
        wire.snapshot.term = snap.term
        wire.snapshot.voters.extend(sorted(snap.conf.voters))
        wire.snapshot.learners.extend(sorted(snap.conf.learners))
        wire.snapshot.data = bytes(snap.data)
    return wire


def decode_message(wire: pb.RaftMessage, frm: str, to: str) -> tuple[int, int, Message]:
    """``(group, incarnation, message)`` from the wire form of a message ``frm`` sent
    to ``to``."""
    try:
        kind = _FROM_WIRE[wire.type]
    except KeyError:
        raise BadRaftMessage(f"unknown Raft message type {wire.type}") from None
    entries = []
    for e in wire.entries:
        try:
            entry_kind = _ENTRY_KINDS[e.kind]
        except KeyError:
            raise BadRaftMessage(f"entry {e.index}: unknown entry kind {e.kind}") from None
        entries.append(Entry(e.index, e.term, e.data, entry_kind))
    snapshot = None
    if wire.HasField("snapshot"):
        s = wire.snapshot
        conf = ConfState(frozenset(s.voters), frozenset(s.learners))
        snapshot = Snapshot(s.index, s.term, conf, s.data)
    message = Message(
        type=kind,
        frm=frm,
        to=to,
        term=wire.term,
        log_term=wire.log_term,
        index=wire.index,
        entries=tuple(entries),
        commit=wire.commit,
        reject=wire.reject,
        reject_hint=wire.reject_hint,
        snapshot=snapshot,
        offset=wire.offset,
        done=wire.done,
        context=wire.context,
    )
    return wire.group, wire.incarnation, message
