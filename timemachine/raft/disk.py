"""A Raft member's persistent state: its log in the WAL, its hard state, its snapshot.

`MemberDisk.load` rebuilds the in-memory `MemoryStorage` the core reads from;
`MemberDisk.persist` makes the persistent parts of a `Ready` durable and fires once all
of them are: only then may the Ready's messages leave.

Layout of a member's directory::

    wal/               the log entries (`timemachine.storage.wal.WriteAheadLog`)
    hardstate.json     term, vote, commit (`timemachine.raft.hardstate`)
    snapshot           the last snapshot: a JSON header line, then the data

A Ready is persisted in three steps, each durable before the next starts:

1. an installed snapshot: the snapshot file (marked *installed*), then the log emptied;
2. the entries, as one WAL batch whose first record also carries the Ready's hard
   state (the kind byte of its payload has `HARD_STATE_FLAG` set);
3. the hard state, replacing ``hardstate.json``.

Why the hard state rides in the WAL batch: membership changes take effect when applied,
so a member that came back with the entries of a conf change but an older commit index
would start under an older configuration than the one those entries were committed in,
and could win an election whose majority does not overlap the group's (issue 6, 3a).
Any durable record of a batch implies its first record is durable (the WAL keeps a
prefix), so the entries never outlive the commit index that came with them. That copy
says "committed up to ``commit``" only of the entries of its own batch: a torn batch
counts as committed only what of it survived. `load` takes the `latest` of the two
copies, and refuses with `LogBehindCommit` a log that ends below the saved commit.

A crash between the steps of an install leaves an installed snapshot above a log it was
meant to replace; `load` completes the install, and logs what it drops: entries the
snapshot covers, or entries above it that were never committed (a leader sends a
snapshot only past the follower's commit index). Snapshots this member took itself
(`compact`) are not marked: the log below them is kept down to a tail of
``keep_entries`` entries, so a follower slightly behind catches up from the log.
"""

from __future__ import annotations

import json
import os
import struct

from twisted.internet import defer
from twisted.logger import Logger

from timemachine.domain.errors import CorruptLog, LogBehindCommit
from timemachine.raft.hardstate import FILE_NAME as HARD_STATE_FILE
from timemachine.raft.hardstate import HardStateFile, latest
from timemachine.raft.storage import MemoryStorage
from timemachine.raft.types import ConfState, Entry, EntryKind, HardState, Ready, Snapshot
from timemachine.storage.durable import write_atomically
from timemachine.storage.iothread import IOThread
from timemachine.storage.wal import DEFAULT_SEGMENT_BYTES, WriteAheadLog

SNAPSHOT_FILE = "snapshot"
#: Entries kept below a snapshot this member took (see `MemberDisk.compact`).
DEFAULT_KEEP_ENTRIES = 1000
#: Set in the kind byte of a payload that carries a hard state before the data.
HARD_STATE_FLAG = 0x80
_HARD_STATE_LENGTH = struct.Struct(">H")

_log = Logger()


def encode_entry(entry: Entry, hard_state: HardState | None = None) -> bytes:
    """The WAL payload of an entry: its kind, then its data (index and term are the
    WAL record's own). With ``hard_state`` (the first entry of a batch) the kind byte
    has `HARD_STATE_FLAG` set and the hard state, length-prefixed JSON, comes first."""
    if hard_state is None:
        return bytes([entry.kind]) + entry.data
    state = json.dumps([hard_state.term, hard_state.vote, hard_state.commit]).encode()
    return (
        bytes([entry.kind | HARD_STATE_FLAG])
        + _HARD_STATE_LENGTH.pack(len(state))
        + state
        + entry.data
    )


def decode_entry(index: int, term: int, payload: bytes) -> tuple[Entry, HardState | None]:
    """The entry in a WAL payload, and the hard state it carries (None if it has none)."""
    head = payload[0]
    if not head & HARD_STATE_FLAG:
        return Entry(index, term, payload[1:], EntryKind(head)), None
    (length,) = _HARD_STATE_LENGTH.unpack_from(payload, 1)
    start = 1 + _HARD_STATE_LENGTH.size
    state_term, vote, commit = json.loads(payload[start : start + length])
    entry = Entry(index, term, payload[start + length :], EntryKind(head & ~HARD_STATE_FLAG))
    return entry, HardState(state_term, vote, commit)


def _encode_snapshot(snapshot: Snapshot, installed: bool) -> bytes:
    header = {
        "index": snapshot.index,
        "term": snapshot.term,
        "voters": sorted(snapshot.conf.voters, key=repr),
        "learners": sorted(snapshot.conf.learners, key=repr),
        "size": len(snapshot.data),
        "installed": installed,
    }
    return json.dumps(header).encode() + b"\n" + snapshot.data


def _decode_snapshot(data: bytes, where: str) -> tuple[Snapshot, bool]:
    try:
        header_line, _, body = data.partition(b"\n")
        header = json.loads(header_line)
        if len(body) != header["size"]:
            raise ValueError(f"{len(body)} bytes of data, header says {header['size']}")
        conf = ConfState(frozenset(header["voters"]), frozenset(header["learners"]))
        # Files written before installs were marked hold no such key.
        installed = bool(header.get("installed", False))
        return Snapshot(header["index"], header["term"], conf, body), installed
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptLog(f"{where}: unreadable snapshot: {e}") from e


def _read_snapshot(path: str) -> tuple[Snapshot, bool] | None:
    """The snapshot in ``path`` and whether it was installed from a leader, or None."""
    try:
        with open(path, "rb") as f:
            return _decode_snapshot(f.read(), path)
    except FileNotFoundError:
        return None


def _log_end(directory: str) -> tuple[str, int | None]:
    """Where the log in ``directory`` ends on disk: its last segment file and size (the
    directory and None when it holds no segment)."""
    segments = sorted(name for name in os.listdir(directory) if name.endswith(".wal"))
    if not segments:
        return directory, None
    path = os.path.join(directory, segments[-1])
    return path, os.path.getsize(path)


class MemberDisk:
    """The durable state of one member of one Raft group.

    ``io`` runs the snapshot and hard-state file work; ``wal_io`` (optional) is the
    writer thread the WAL shares with the node's other logs. ``keep_entries`` is how
    many entries `compact` keeps below a snapshot (at least: the WAL deletes whole
    segments only, of ``segment_bytes`` each).
    """

    def __init__(
        self,
        directory: str,
        reactor,
        io: IOThread,
        wal_io: IOThread | None = None,
        keep_entries: int = DEFAULT_KEEP_ENTRIES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ):
        if keep_entries < 0:
            raise ValueError(f"keep_entries must be >= 0, not {keep_entries}")
        self.directory = directory
        self.keep_entries = keep_entries
        self._io = io
        self._wal = WriteAheadLog(
            os.path.join(directory, "wal"), reactor, segment_bytes=segment_bytes, io=wal_io
        )
        self._hard_state = HardStateFile(directory, io)
        self._snapshot_path = os.path.join(directory, SNAPSHOT_FILE)

    @defer.inlineCallbacks
    def load(self, bootstrap: ConfState | None = None):
        """Fire with a `MemoryStorage` holding everything persisted.

        ``bootstrap`` is the membership of a group that has never persisted anything.
        Fails with `CorruptLog` when the files contradict one another, and with
        `LogBehindCommit` when the log ends below the saved commit index.
        """
        saved = yield self._hard_state.load()
        yield self._wal.open()
        found = yield self._io.call(_read_snapshot, self._snapshot_path)
        storage = MemoryStorage(bootstrap)
        if found is not None:
            snapshot, installed = found
            first = self._wal.first_index
            if installed and first is not None and first <= snapshot.index:
                # A crash between the two steps of an install: finish it.
                _log.warn(
                    "{wal}: completing the install of snapshot {index}: dropping the "
                    "{count} log entries ({first}..{last}) it replaces",
                    wal=self._wal.directory,
                    index=snapshot.index,
                    count=self._wal.last_index - first + 1,
                    first=first,
                    last=self._wal.last_index,
                )
                yield self._wal.drop_prefix(self._wal.last_index + 1)
            storage.apply_snapshot(snapshot)
        logged = None
        if self._wal.first_index is not None:
            records = yield self._wal.read(self._wal.first_index, self._wal.last_index + 1)
            entries = []
            for r in records:
                try:
                    entry, state = decode_entry(r.index, r.term, r.payload)
                except (ValueError, IndexError, TypeError, struct.error) as e:
                    raise CorruptLog(
                        f"{self._wal.directory}: entry {r.index} is unreadable: {e}"
                    ) from e
                entries.append(entry)
                if state is not None:
                    logged = state
            self._hold(storage, entries)
        hard_state = saved
        if logged is not None:
            # The batch's copy vouches only for the entries of its batch that survived.
            last = self._wal.last_index
            logged = HardState(logged.term, logged.vote, min(logged.commit, last))
            hard_state = latest(saved, logged)
        if hard_state.commit > storage.last_index():
            path, offset = yield self._io.call(_log_end, self._wal.directory)
            end = "no segment file" if offset is None else f"{path} ends at byte {offset}"
            raise LogBehindCommit(
                f"{os.path.join(self.directory, HARD_STATE_FILE)}: commit index "
                f"{hard_state.commit}, but the log ends at entry {storage.last_index()} "
                f"({end}; snapshot at {storage.snapshot().index})",
                path=path,
                offset=offset,
            )
        storage.set_hard_state(hard_state)
        return storage

    def _hold(self, storage: MemoryStorage, entries: list[Entry]) -> None:
        """Put the entries read back from the WAL into ``storage`` after its snapshot."""
        snapshot = storage.snapshot()
        where = self._wal.directory
        if entries[0].index > snapshot.index + 1:
            raise CorruptLog(
                f"{where}: the log starts at entry {entries[0].index}, but the snapshot "
                f"ends at {snapshot.index}: entries in between are missing"
            )
        if entries[0].index == snapshot.index + 1:
            storage.append(entries)
            return
        # A tail kept below a snapshot this member took: it must hold the snapshot's
        # last entry, with the snapshot's term.
        at = snapshot.index - entries[0].index
        if at >= len(entries) or entries[at].term != snapshot.term:
            have = "ends before it" if at >= len(entries) else f"has term {entries[at].term}"
            raise CorruptLog(
                f"{where}: the snapshot ends at entry {snapshot.index} of term "
                f"{snapshot.term}, but the log {have}"
            )
        storage.load_log(entries)

    @defer.inlineCallbacks
    def persist(self, ready: Ready):
        """Make ``ready``'s snapshot, entries and hard state durable; fire when they are."""
        if ready.snapshot is not None:
            yield self._io.call(
                write_atomically, self._snapshot_path, _encode_snapshot(ready.snapshot, True)
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
                    self._wal.append(
                        entry.index,
                        entry.term,
                        encode_entry(entry, ready.hard_state if k == 0 else None),
                    )
                    for k, entry in enumerate(ready.entries)
                ],
                consumeErrors=True,
            )
        # After the entries: the file's commit index may cover them. (A crash before
        # this leaves the WAL's copy, which `load` takes if it is the later one.)
        if ready.hard_state is not None:
            yield self._hard_state.save(ready.hard_state)

    @defer.inlineCallbacks
    def compact(self, snapshot: Snapshot):
        """Keep ``snapshot`` (taken by this member) and let the log below it go, all but
        the last `keep_entries` entries before it."""
        yield self._io.call(
            write_atomically, self._snapshot_path, _encode_snapshot(snapshot, False)
        )
        # Sealed as the node's logs are: the segment appended to stops taking records
        # once it holds some below the cut, so a later cut can delete it whole.
        yield self._wal.drop_prefix(max(1, snapshot.index - self.keep_entries), seal=True)

    def close(self):
        return self._wal.close()
