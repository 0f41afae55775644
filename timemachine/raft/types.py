"""The values the Raft core trades with the world: entries, messages, state, Ready.

All are frozen, slotted dataclasses (h11's events style). Node ids are plain hashable
values: ints in the simulation, node-id strings in a cluster.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

NodeId = Hashable


class EntryKind(enum.IntEnum):
    NORMAL = 0
    # data is an encoded ConfChange; it takes effect when applied (one server at a time).
    CONF_CHANGE = 1


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    data: bytes = b""
    kind: EntryKind = EntryKind.NORMAL


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before a vote or an append is answered."""

    term: int = 0
    vote: NodeId | None = None
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """The membership: voters decide elections and commits; learners only follow."""

    voters: frozenset = frozenset()
    learners: frozenset = frozenset()


class ConfChangeKind(enum.IntEnum):
    ADD_LEARNER = 0
    PROMOTE = 1  # learner -> voter
    REMOVE = 2


@dataclass(frozen=True, slots=True)
class ConfChange:
    kind: ConfChangeKind
    node: NodeId


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state machine as of ``index`` (whose entry had ``term``), with its membership."""

    index: int = 0
    term: int = 0
    conf: ConfState = field(default_factory=ConfState)
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class SnapshotChunk:
    """Bytes of a snapshot a follower is being sent, to write at ``offset`` of the file
    it collects them in (``offset`` 0 starts that file over); ``last`` ends the data."""

    offset: int
    data: bytes
    last: bool = False


class MessageType(enum.Enum):
    PRE_VOTE = "pre_vote"
    PRE_VOTE_RESP = "pre_vote_resp"
    VOTE = "vote"
    VOTE_RESP = "vote_resp"
    APPEND = "append"
    APPEND_RESP = "append_resp"
    HEARTBEAT = "heartbeat"
    HEARTBEAT_RESP = "heartbeat_resp"
    SNAPSHOT = "snapshot"  # one chunk of an InstallSnapshot
    SNAPSHOT_RESP = "snapshot_resp"
    TIMEOUT_NOW = "timeout_now"  # leadership transfer: campaign at once
    READ_INDEX = "read_index"  # a follower asks the leader for a safe read index
    READ_INDEX_RESP = "read_index_resp"


@dataclass(frozen=True, slots=True)
class Message:
    """One message between two members of a group.

    Fields beyond type/frm/to/term are used per type (as in etcd's raftpb.Message):
    ``index``/``log_term`` locate the entry before ``entries`` (APPEND) or the sender's
    last entry (votes); ``reject_hint`` speeds up conflict backtracking; ``snapshot``
    with ``offset``/``done`` carries one chunk; ``context`` tags ReadIndex requests.
    """

    type: MessageType
    frm: NodeId
    to: NodeId
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: Snapshot | None = None
    offset: int = 0
    done: bool = True
    context: bytes = b""


@dataclass(frozen=True, slots=True)
class ReadState:
    """A ReadIndex answer: reads tagged ``context`` are safe once ``index`` is applied."""

    index: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Ready:
    """The work the core hands out: do it in this order, then call ``advance``.

    1. write ``snapshot_chunks`` in order to the file they make up; persist
       ``snapshot`` (if any), ``entries`` and ``hard_state`` (if not None), fsync'd
       when ``must_sync``;
    2. send ``messages``;
    3. apply ``committed`` entries (and install ``snapshot`` in the state machine).

    A snapshot received from a leader arrives as chunks, so a follower never holds a
    whole store in memory: its ``snapshot`` carries no data, which is the chunks'
    file (complete once a ``last`` chunk is written; durable only once the application
    syncs it, before it persists ``snapshot``). Chunks of a snapshot that is not
    installed after all (the log already had it) leave that file to be removed.
    """

    hard_state: HardState | None = None
    entries: tuple[Entry, ...] = ()
    snapshot: Snapshot | None = None
    committed: tuple[Entry, ...] = ()
    messages: tuple[Message, ...] = ()
    read_states: tuple[ReadState, ...] = ()
    must_sync: bool = False
    snapshot_chunks: tuple[SnapshotChunk, ...] = ()


class RaftError(Exception):
    """Base of the log storage's typed errors."""


class CompactedError(RaftError):
    """The requested index is below the first kept index (it is in the snapshot)."""


class UnavailableError(RaftError):
    """The requested index is above the last index held."""


class SnapshotTemporarilyUnavailable(RaftError):
    """The application is still preparing the snapshot a follower needs (etcd's
    ``ErrSnapshotTemporarilyUnavailable``): the leader tries again on a later contact."""


class Storage(Protocol):
    """The read side of a member's persisted log (etcd's ``Storage``).

    The application writes to it after persisting a Ready; the core only reads.
    """

    def initial_state(self) -> tuple[HardState, ConfState]: ...

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)``, at least one, at most ``max_bytes`` of data."""
        ...

    def term(self, index: int) -> int: ...

    def first_index(self) -> int: ...

    def last_index(self) -> int: ...

    def snapshot(self) -> Snapshot:
        """The latest snapshot; to send it, the core may get a newer one, or
        `SnapshotTemporarilyUnavailable` while the application prepares it."""
        ...
