"""A Raft member's persistent state: its log in the WAL, its hard state, its snapshot.

`MemberDisk.load` rebuilds the in-memory `MemoryStorage` the core reads from;
`MemberDisk.persist` makes the persistent parts of a `Ready` durable, in the order
Raft needs (snapshot, then entries, then hard state), and fires once all of them are:
only then may the Ready's messages leave.

Layout of a member's directory::

    wal/               the log entries (`timemachine.wal.WriteAheadLog`)
    hardstate.json     term, vote, commit (`timemachine.raft.hardstate`)
    snapshot           the last snapshot: a JSON header line, then the data
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer

from timemachine.domain.errors import CorruptLog
from timemachine.raft.hardstate import HardStateFile
from timemachine.raft.storage import MemoryStorage
from timemachine.raft.types import ConfState, Entry, EntryKind, Ready, Snapshot
from timemachine.storage.durable import write_atomically
from timemachine.storage.iothread import IOThread
from timemachine.storage.wal import WriteAheadLog

SNAPSHOT_FILE = "snapshot"


def encode_entry(entry: Entry) -> bytes:
    """The WAL payload of an entry: its kind, then its data (index and term are the
    WAL record's own)."""
    return bytes([entry.kind]) + entry.data


def decode_entry(index: int, term: int, payload: bytes) -> Entry:
    return Entry(index, term, payload[1:], EntryKind(payload[0]))


def _encode_snapshot(snapshot: Snapshot) -> bytes:
    header = {
        "index": snapshot.index,
        "term": snapshot.term,
        "voters": sorted(snapshot.conf.voters, key=repr),
        "learners": sorted(snapshot.conf.learners, key=repr),
        "size": len(snapshot.data),
    }
    return json.dumps(header).encode() + b"\n" + snapshot.data


def _decode_snapshot(data: bytes, where: str) -> Snapshot:
    try:
        header_line, _, body = data.partition(b"\n")
        header = json.loads(header_line)
        if len(body) != header["size"]:
            raise ValueError(f"{len(body)} bytes of data, header says {header['size']}")
        conf = ConfState(frozenset(header["voters"]), frozenset(header["learners"]))
        return Snapshot(header["index"], header["term"], conf, body)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptLog(f"{where}: unreadable snapshot: {e}") from e


def _read_snapshot(path: str) -> Snapshot | None:
    try:
        with open(path, "rb") as f:
            return _decode_snapshot(f.read(), path)
    except FileNotFoundError:
        return None


class MemberDisk:
    """The durable state of one member of one Raft group.

    ``io`` runs the snapshot and hard-state file work; ``wal_io`` (optional) is the
    writer thread the WAL shares with the node's other logs.
    """

    def __init__(self, directory: str, reactor, io: IOThread, wal_io: IOThread | None = None):
        self.directory = directory
        self._io = io
        self._wal = WriteAheadLog(os.path.join(directory, "wal"), reactor, io=wal_io)
        self._hard_state = HardStateFile(directory, io)
        self._snapshot_path = os.path.join(directory, SNAPSHOT_FILE)

    @defer.inlineCallbacks
    def load(self, bootstrap: ConfState | None = None):
        """Fire with a `MemoryStorage` holding everything persisted.

        ``bootstrap`` is the membership of a group that has never persisted anything.
        """
        hard_state = yield self._hard_state.load()
        yield self._wal.open()
        snapshot = yield self._io.call(_read_snapshot, self._snapshot_path)
        storage = MemoryStorage(bootstrap)
        if snapshot is not None:
            storage.apply_snapshot(snapshot)
        last = self._wal.last_index
        start = storage.first_index()
        if start <= last:
            records = yield self._wal.read(start, last + 1)
            storage.append([decode_entry(r.index, r.term, r.payload) for r in records])
        storage.set_hard_state(hard_state)
        return storage

    @defer.inlineCallbacks
    def persist(self, ready: Ready):
        """Make ``ready``'s snapshot, entries and hard state durable; fire when they are."""
        if ready.snapshot is not None:
            yield self._io.call(
                write_atomically, self._snapshot_path, _encode_snapshot(ready.snapshot)
            )
            # Installing a snapshot replaces the whole log (as MemoryStorage does).
            yield self._wal.drop_prefix(self._wal.last_index + 1)
        if ready.entries:
            first = ready.entries[0].index
            if self._wal.last_index >= first:
                # A new leader's entries replace a conflicting suffix.
                yield self._wal.truncate_suffix(first)
            yield defer.gatherResults(
                [
                    self._wal.append(entry.index, entry.term, encode_entry(entry))
                    for entry in ready.entries
                ],
                consumeErrors=True,
            )
        # After the entries: the commit index it holds may cover them, and a commit
        # past the last durable entry would not survive a crash in between.
        if ready.hard_state is not None:
            yield self._hard_state.save(ready.hard_state)

    @defer.inlineCallbacks
    def compact(self, snapshot: Snapshot):
        """Keep ``snapshot`` (taken by this member) and let the log below it go."""
        yield self._io.call(write_atomically, self._snapshot_path, _encode_snapshot(snapshot))
        yield self._wal.drop_prefix(snapshot.index + 1)

    def close(self):
        return self._wal.close()
