"""The node-wide Raft log: the entries and hard state of every Raft group of a node in
one write-ahead log, so that a node's fsync cost does not grow with its groups.

Why one log (issue 7). A node hosts about 13 Raft groups: the meta group and one per
shard. With a log and a hard-state file per group (the former ``MemberDisk``), every
Ready of every group cost a WAL fsync plus an atomic file replacement (two more), and
an fdatasync costs about 0.17 ms here: 13 groups fsync'd one by one spent ~2.2 ms of
disk time per reactor turn, growing with every shard added. TiKV met the same wall
and wrote raft-engine: one log stream shared by all groups, a memtable per group
saying where its entries live, and a purge that rewrites the few live entries of
quiet groups out of old files so those files can go. This module follows that design
on our own `WriteAheadLog`, unchanged: every `persist` made in one reactor turn, of
any group, joins the WAL's one batch and shares ONE fsync. `bench/raft_fsync.py`
measured, for 13 groups persisting a small Ready each per turn: 13 fsyncs and ~2.3 ms
per turn with a WAL per group (39 fsyncs, ~10 ms with the hard-state files), 1 fsync
and ~1.1 ms with the engine, whose cost stays flat as groups are added.

The storage the core reads (`GroupStorage`, one per group) is written by the engine
once a persist is durable, and doubles as the engine's memtable: the live entries it
rewrites, with no second copy.

On disk, under the engine's directory::

    wal/                  one WriteAheadLog: record index = the engine's sequence
                          number (consecutive), term 0, payload = one RaftLogRecord
                          (proto/timemachine.proto, "node-wide Raft log records")
    snapshots/<g>.snapshot  group g's last snapshot: a JSON header line, then the data

A record is one write of one group: ``APPEND`` (entries from index i replace the
group's entries >= i, a Raft conflict), ``REWRITE`` (the group's whole live log, copied
forward), ``RESTART`` (a snapshot was installed: the log restarts after it) or
``REMOVE`` (the group left the node). Every record carries the group's full hard state
as of that write, so the group's latest record holds its latest hard state: there is
no hardstate.json. A record is atomic (the WAL checks its CRC and a torn tail loses
whole records), so entries never outlive the hard state they were written with, and a
conf change is never read back without the commit index it came with (issue 6, 3a).

Installing a snapshot takes two steps: its file is written (atomically, marked
*installed*), then the RESTART record. A crash between them leaves an installed
snapshot above the old log it replaces: `open` completes the install - it drops the
group's entries (logging them) and writes the RESTART record - exactly as a crash
after the record would have left it. Snapshots this member took itself (`compact`)
are not marked: the log below them is kept down to a tail of ``keep_entries`` entries
so a follower slightly behind catches up from the log.

Deleting segments across groups. Each group *pins* the oldest sequence number holding
one of its live records: the write of its first live entry, or its latest record when
it has no entries (which holds its hard state). All of a group's live entries were
written at or after the write of its first live entry, because an append at i
replaces everything >= i; and replaying any suffix of the log that starts at or below
a group's pin rebuilds that group exactly. So the segments below the minimum pin over
all groups go (`WriteAheadLog.drop_prefix`; sealed only once a segment's worth lies
below every pin, since each seal starts a new segment). A quiet group would pin old
segments forever: when persists have written more than ``rewrite_lag_bytes`` (2
segments by default) since its pin, the engine rewrites it - one REWRITE record with
its hard state and live entries - which moves its pin to the head. (Rewrites do not
count as lag: else each rewrite would make the other groups lag, and they would be
rewritten in turn, forever.) As in raft-engine, only small groups are rewritten (at
most ``rewrite_max_bytes`` of entries, a quarter of a segment by default): a group
with a long live log is one that has not compacted yet, and copying it forward over
and over would cost more than the segments it frees; its compaction frees them.

Corruption is loud. The WAL refuses a damaged log (`CorruptLog` naming file and
offset), and a record whose payload does not decode is `CorruptLog` naming its
segment file, byte offset and sequence number. Either refuses the whole engine: a
node-wide log that cannot be read means the node's Raft state, of every group, is
unavailable until it is repaired or rebuilt from peers. Checks that concern one
group (its log ends below its commit index: `LogBehindCommit`; its log does not meet
its snapshot) fail only that group's `storage`, and that group then pins all of its
records, so nothing that explains the damage is deleted automatically.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import re
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain.errors import CorruptLog, LogBehindCommit, StorageError
from timemachine.raft.storage import MemoryStorage, SnapshotOutOfDateError
from timemachine.raft.types import ConfState, Entry, EntryKind, HardState, Ready, Snapshot
from timemachine.storage.durable import fsync_path, write_atomically
from timemachine.storage.iothread import IOThread
from timemachine.storage.wal import DEFAULT_SEGMENT_BYTES, WriteAheadLog, survey_log

__all__ = [
    "DEFAULT_KEEP_ENTRIES",
    "GroupStorage",
    "LogRecord",
    "RaftEngine",
    "RecordKind",
    "decode_record",
    "encode_record",
]

WAL_DIRECTORY = "wal"
SNAPSHOT_DIRECTORY = "snapshots"
#: Entries kept below a snapshot this member took (see `RaftEngine.compact`).
DEFAULT_KEEP_ENTRIES = 1000
_MAX_GROUP = 2**32 - 1
# The WAL's record header (length, CRC, index, term): counted in the log's bytes.
_RECORD_HEADER = 24
# Records read per WAL read while replaying: bounds memory, and the reactor gets a
# turn between reads.
_REPLAY_CHUNK = 4096
_SNAPSHOT_FILE = re.compile(r"^(\d+)\.snapshot$")

_log = Logger()


# -- records -------------------------------------------------------------------------


class RecordKind(enum.IntEnum):
    """What a record does to its group on replay (`pb.RaftLogRecord.Kind`)."""

    APPEND = pb.RaftLogRecord.APPEND
    REWRITE = pb.RaftLogRecord.REWRITE
    RESTART = pb.RaftLogRecord.RESTART
    REMOVE = pb.RaftLogRecord.REMOVE


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One write of one group: the payload of one WAL record."""

    group: int
    kind: RecordKind
    hard_state: HardState = field(default_factory=HardState)
    entries: tuple[Entry, ...] = ()
    # RESTART: the snapshot's last entry, after which the log restarts.
    snapshot_index: int = 0
    snapshot_term: int = 0


def encode_record(record: LogRecord) -> bytes:
    """The WAL payload of ``record`` (a `pb.RaftLogRecord`)."""
    message = pb.RaftLogRecord(
        group=record.group,
        kind=int(record.kind),
        snapshot_index=record.snapshot_index,
        snapshot_term=record.snapshot_term,
    )
    state = record.hard_state
    message.hard_state.term = state.term
    message.hard_state.commit = state.commit
    if isinstance(state.vote, str):
        message.hard_state.vote_node = state.vote
    elif state.vote is not None:
        message.hard_state.vote_number = state.vote
    for entry in record.entries:
        message.entries.add(index=entry.index, term=entry.term, kind=entry.kind, data=entry.data)
    return message.SerializeToString()


def decode_record(payload: bytes) -> LogRecord:
    """The record in a WAL payload; ValueError if it is not one."""
    try:
        message = pb.RaftLogRecord.FromString(payload)
    except DecodeError as e:
        raise ValueError(f"undecodable: {e}") from e
    try:
        kind = RecordKind(message.kind)
        entries = tuple(
            Entry(e.index, e.term, e.data, EntryKind(e.kind)) for e in message.entries
        )
    except ValueError as e:
        raise ValueError(f"unknown kind: {e}") from e
    state = message.hard_state
    which = state.WhichOneof("vote")
    vote = None if which is None else getattr(state, which)
    return LogRecord(
        message.group,
        kind,
        HardState(state.term, vote, state.commit),
        entries,
        message.snapshot_index,
        message.snapshot_term,
    )


# -- snapshot files (moved from the former raft/disk.py, format unchanged) ------------


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
        installed = bool(header.get("installed", False))
        return Snapshot(header["index"], header["term"], conf, body), installed
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptLog(f"{where}: unreadable snapshot: {e}", path=where) from e


@dataclass(frozen=True, slots=True)
class _SnapshotFile:
    snapshot: Snapshot
    installed: bool  # from a leader (persist), not taken by this member (compact)
    size: int


def _read_snapshots(directory: str) -> dict[int, _SnapshotFile | CorruptLog]:
    """Every group's snapshot file in ``directory`` (created if missing). Blocks."""
    os.makedirs(directory, exist_ok=True)
    found: dict[int, _SnapshotFile | CorruptLog] = {}
    for name in os.listdir(directory):
        match = _SNAPSHOT_FILE.match(name)
        if match is None:
            continue  # a temporary file a crash left: the next write replaces it
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            data = f.read()
        try:
            snapshot, installed = _decode_snapshot(data, path)
        except CorruptLog as e:
            found[int(match.group(1))] = e
            continue
        found[int(match.group(1))] = _SnapshotFile(snapshot, installed, len(data))
    return found


def _write_snapshot(path: str, snapshot: Snapshot, installed: bool) -> int:
    """Replace the snapshot file at ``path`` atomically and durably; its size. Blocks."""
    data = _encode_snapshot(snapshot, installed)
    write_atomically(path, data)
    return len(data)


def _remove_snapshot(path: str) -> None:
    """Delete the snapshot file at ``path`` (if any), durably. Blocks."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_path(os.path.dirname(path))


def _locate(directory: str, seq: int) -> tuple[str | None, int | None]:
    """The segment file and byte offset of record ``seq`` of the WAL in ``directory``.

    For error messages only: it reads every segment. Blocks.
    """
    for segment in survey_log(directory).segments:
        if segment.first_index <= seq <= segment.last_index:
            return segment.path, segment.offsets[seq - segment.first_index]
    return None, None


# -- what the core reads ---------------------------------------------------------------


class GroupStorage(MemoryStorage):
    """The `MemoryStorage` of one group, written by its `RaftEngine` only.

    The engine writes it once the state is durable (after `RaftEngine.persist`, and
    `RaftEngine.compact`), so it always holds what a restart would read back. Its
    write methods refuse: an application writing it directly would make the core see
    state that is not on disk.
    """

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            "a GroupStorage is written by its RaftEngine (persist, compact), not directly"
        )

    set_hard_state = apply_snapshot = create_snapshot = load_log = compact = append = _refuse

    # The engine's write side.

    def _install(self, snapshot: Snapshot) -> None:
        MemoryStorage.apply_snapshot(self, snapshot)

    def _append(self, entries: list[Entry]) -> None:
        MemoryStorage.append(self, entries)

    def _load(self, entries: list[Entry]) -> None:
        MemoryStorage.load_log(self, entries)

    def _set_hard_state(self, state: HardState) -> None:
        MemoryStorage.set_hard_state(self, state)

    def _take(self, snapshot: Snapshot) -> None:
        MemoryStorage.create_snapshot(self, snapshot.index, snapshot.conf, snapshot.data)

    def _compact(self, index: int) -> None:
        MemoryStorage.compact(self, index)

    def _live_entries(self) -> list[Entry]:
        """The entries a restart needs: from the compaction point when it lies below
        the snapshot (a tail kept for followers; the entry there only for its term),
        else from the entry after the snapshot."""
        first, last = self.first_index(), self.last_index()
        entries = self.entries(first, last + 1) if last >= first else []
        point = first - 1
        if point < self.snapshot().index:
            entries.insert(0, Entry(point, self.term(point)))
        return entries


# -- bookkeeping -----------------------------------------------------------------------


class _Runs:
    """Which record wrote which of a group's live entries.

    Runs of consecutive entries, each (first index, sequence number of the record that
    wrote it), ordered by both: an append at i replaces every run from i on, so a run
    at a higher index was always written later.
    """

    __slots__ = ("firsts", "seqs")

    def __init__(self) -> None:
        self.firsts: list[int] = []
        self.seqs: list[int] = []

    def add(self, first_index: int, seq: int) -> None:
        """Record ``seq`` writing the entries from ``first_index`` on (replacing them)."""
        cut = bisect_left(self.firsts, first_index)
        del self.firsts[cut:], self.seqs[cut:]
        self.firsts.append(first_index)
        self.seqs.append(seq)

    def clear(self) -> None:
        self.firsts.clear()
        self.seqs.clear()

    def trim_below(self, index: int) -> None:
        """Forget the entries below ``index`` (compacted away)."""
        holding = bisect_right(self.firsts, index) - 1
        if holding > 0:
            del self.firsts[:holding], self.seqs[:holding]
        if self.firsts and self.firsts[0] < index:
            self.firsts[0] = index

    @property
    def oldest(self) -> int | None:
        """The sequence number of the write of the first live entry."""
        return self.seqs[0] if self.seqs else None


class _Replayed:
    """One group as the records read back so far leave it (while `open` replays)."""

    __slots__ = (
        "entries", "error", "first_seq", "hard_state", "latest_seq", "removed", "restart",
        "runs",
    )

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.runs = _Runs()
        self.hard_state = HardState()
        self.restart: tuple[int, int] | None = None  # the last RESTART: (index, term)
        self.first_seq: int | None = None
        self.latest_seq: int | None = None
        self.removed = False
        self.error: tuple[str, int] | None = None  # what is wrong, and which record

    def apply(self, seq: int, record: LogRecord) -> None:
        if self.first_seq is None:
            self.first_seq = seq
        self.latest_seq = seq
        if self.error is not None:
            return  # a broken group's later records only keep it pinned
        if record.kind == RecordKind.RESTART:
            self.entries.clear()
            self.runs.clear()
            self.restart = (record.snapshot_index, record.snapshot_term)
        elif record.kind == RecordKind.REWRITE:
            # The log is now exactly the record's entries, whatever came before.
            self.entries.clear()
            self.runs.clear()
            self.restart = None
        self._append(seq, record.entries)
        self.hard_state = record.hard_state

    def _append(self, seq: int, new: tuple[Entry, ...]) -> None:
        if self.restart is not None:
            new = tuple(e for e in new if e.index > self.restart[0])
        if not new:
            return
        at = new[0].index
        entries = self.entries
        # A replay starts at the oldest pin, so a group's first surviving record may
        # begin anywhere; after that, appends meet the log (the WAL kept every record).
        if entries and at > entries[-1].index + 1:
            self.error = (f"appends entry {at} after entry {entries[-1].index}", seq)
            return
        if not entries and self.restart is not None and at != self.restart[0] + 1:
            self.error = (f"appends entry {at} after a snapshot at {self.restart[0]}", seq)
            return
        if entries and at > entries[0].index:
            del entries[at - entries[0].index :]
        else:
            entries.clear()
        entries.extend(new)
        self.runs.add(at, seq)


class _Group:
    """The engine's view of one group, on the reactor.

    ``hard_state``, ``last_index`` and ``snapshot_index`` follow every call accepted
    (in call order, durable or not), to check the next call at once; ``runs`` and the
    sequence numbers follow the records handed to the WAL. ``steps`` orders the work of
    one group that must wait for a file (installs, compactions, removal) and the
    records behind it.
    """

    def __init__(self, group: int) -> None:
        self.id = group
        self.storage: GroupStorage | None = None
        # Read back by open(), until storage() builds the GroupStorage from it.
        self.loaded: tuple[Snapshot | None, list[Entry], HardState] | None = None
        self.error: CorruptLog | None = None
        self.failed: StorageError | None = None
        self.runs = _Runs()
        self.first_seq: int | None = None
        self.latest_seq: int | None = None
        self.hard_state = HardState()
        self.last_index = 0
        self.snapshot_index = 0
        self.snapshot_bytes = 0
        self.in_flight = 0
        self.steps: deque[Callable[[], defer.Deferred | None]] = deque()
        self.running = False
        self.removing = False

    @property
    def pin(self) -> int | None:
        """The oldest sequence number a restart needs for this group, if any."""
        if self.error is not None:
            return self.first_seq  # keep every record of a damaged group
        oldest = self.runs.oldest
        return oldest if oldest is not None else self.latest_seq

    @property
    def idle(self) -> bool:
        return not (self.in_flight or self.steps or self.running or self.removing)


class _Problem(Exception):
    """A check of one group failed at open: made a `CorruptLog` once located."""

    def __init__(self, message: str, seq: int | None, behind_commit: bool = False):
        super().__init__(message)
        self.seq = seq
        self.behind_commit = behind_commit


# -- the engine ------------------------------------------------------------------------


class RaftEngine:
    """The entries, hard state and snapshots of every Raft group of a node.

    ``directory`` holds the WAL and the snapshot files; ``io`` runs the snapshot-file
    work; ``wal_io`` (optional) is the WAL's writer thread. ``keep_entries`` is how
    many entries `compact` keeps below a snapshot. ``segment_bytes`` sizes the WAL's
    segments. A group is rewritten once persists have written more than
    ``rewrite_lag_bytes`` (default 2 segments) since its pin, if its live entries hold
    at most ``rewrite_max_bytes`` (default a quarter segment). ``on_fsync(seconds)`` is
    called after each group fsync (the WAL's hook, for the node's histogram).

    The constructor does no I/O; `open` recovers, `close` finishes and stops. After
    a failed write the engine refuses further writes, as the WAL does; reopening
    recovers what is durable.
    """

    def __init__(
        self,
        directory: str,
        reactor: Any,
        io: IOThread,
        wal_io: IOThread | None = None,
        keep_entries: int = DEFAULT_KEEP_ENTRIES,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        rewrite_lag_bytes: int | None = None,
        rewrite_max_bytes: int | None = None,
        on_fsync: Callable[[float], None] | None = None,
    ):
        if keep_entries < 0:
            raise ValueError(f"keep_entries must be >= 0, not {keep_entries}")
        self.directory = directory
        self.keep_entries = keep_entries
        self.segment_bytes = segment_bytes
        self.rewrite_lag_bytes = (
            2 * segment_bytes if rewrite_lag_bytes is None else rewrite_lag_bytes
        )
        self.rewrite_max_bytes = (
            segment_bytes // 4 if rewrite_max_bytes is None else rewrite_max_bytes
        )
        self._reactor = reactor
        self._io = io
        self._wal = WriteAheadLog(
            os.path.join(directory, WAL_DIRECTORY),
            reactor,
            segment_bytes=segment_bytes,
            on_fsync=on_fsync,
            io=wal_io,
        )
        self._snapshots = os.path.join(directory, SNAPSHOT_DIRECTORY)
        self._groups: dict[int, _Group] = {}
        self._next_seq = 1
        self._opened = False
        self._ready = False
        self._closing = False
        self._pending: set[defer.Deferred] = set()
        self._maintenance: Any = None
        # Where the log's bytes are: marks (sequence number, bytes written before it,
        # of which written by persists), one per ``_bucket`` bytes, so that "how far
        # behind the head is this pin" costs a bisection and a few ints per segment,
        # not 8 bytes per record. A pin's lag counts only the persists' bytes: rewrites
        # moving the head must not make other groups lag, or rewrites would feed on
        # one another.
        self._bytes = 0
        self._fresh = 0
        self._bucket = max(1, segment_bytes // 16)
        self._mark_seqs: list[int] = []
        self._mark_bytes: list[int] = []
        self._mark_fresh: list[int] = []
        self._rewrites_checked_at = 0
        self._drop_requested = 0

    # -- opening ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def open(self):
        """Recover the WAL and replay it into the groups; fires with None.

        Fails with `CorruptLog` when the WAL is damaged or holds a record that does
        not decode: the node's Raft state is then unavailable as a whole. Problems of
        one group are reported by `storage` for that group.
        """
        if self._opened:
            raise RuntimeError("raft engine already opened")
        self._opened = True
        try:
            yield self._wal.open()
            files = yield self._io.call(_read_snapshots, self._snapshots)
            replayed = yield self._replay()
            yield self._settle(replayed, files)
        except BaseException:
            self._opened = False
            yield self._wal.close()
            raise
        self._ready = True
        self._schedule_maintenance()

    @defer.inlineCallbacks
    def _replay(self):
        """Read every record, in chunks, into a `_Replayed` per group."""
        replayed: dict[int, _Replayed] = {}
        first, last = self._wal.first_index, self._wal.last_index
        self._next_seq = last + 1 if last else 1
        if first is None:
            return replayed
        for start in range(first, last + 1, _REPLAY_CHUNK):
            records = yield self._wal.read(start, min(start + _REPLAY_CHUNK, last + 1))
            for r in records:
                try:
                    record = decode_record(r.payload)
                except ValueError as e:
                    path, offset = yield self._io.call(_locate, self._wal.directory, r.index)
                    raise CorruptLog(
                        f"{path}: record {r.index} at byte {offset} is not a node-wide "
                        f"Raft log record ({e}): the node's Raft state is unavailable",
                        path=path,
                        offset=offset,
                    ) from e
                state = replayed.get(record.group)
                if record.kind == RecordKind.REMOVE:
                    state = replayed[record.group] = _Replayed()
                    state.removed = True
                    state.first_seq = state.latest_seq = r.index
                    self._account(r.index, len(r.payload), fresh=True)
                    continue
                if state is None or state.removed:
                    state = replayed[record.group] = _Replayed()
                state.apply(r.index, record)
                self._account(r.index, len(r.payload), record.kind != RecordKind.REWRITE)
        return replayed

    @defer.inlineCallbacks
    def _settle(self, replayed: dict[int, _Replayed], files: dict):
        """Check each group against its snapshot file; finish what a crash cut short."""
        finishing = []
        for group in sorted(set(replayed) | set(files)):
            state, file = replayed.get(group), files.get(group)
            path = self._snapshot_path(group)
            if state is not None and state.removed:
                # Removed, but the crash came before its snapshot file was deleted. (Or
                # the group came back and its first write, an install, was cut short
                # after the file: never acknowledged, so forgetting it is safe too.)
                if file is not None:
                    finishing.append(self._io.call(_remove_snapshot, path))
                continue
            g = self._groups[group] = _Group(group)
            if isinstance(file, _SnapshotFile):
                g.snapshot_bytes = file.size
            try:
                restart = self._check(g, state, file)
            except _Problem as problem:
                g.error = yield self._problem_error(group, problem)
                continue
            except CorruptLog as e:
                g.error = e
                continue
            if restart is not None:
                finishing.append(self._append(g, restart))
        yield defer.gatherResults(finishing, consumeErrors=True)

    def _check(self, g: _Group, state: _Replayed | None, file) -> LogRecord | None:
        """Load ``g`` from its replayed records and snapshot file, the checks of a
        Raft member's start (etcd's ``loadState``) included; the RESTART record that
        completes an install a crash cut short, if one must be written."""
        if isinstance(file, CorruptLog):
            if state is not None:
                g.first_seq, g.latest_seq = state.first_seq, state.latest_seq
            raise file
        snapshot = file.snapshot if file is not None else None
        at = snapshot.index if snapshot is not None else 0
        if state is None:
            if snapshot is None or not file.installed:
                raise _Problem(
                    f"{self._snapshot_path(g.id)}: a snapshot of group {g.id} at {at}, but "
                    "no record of the group in the log",
                    None,
                )
            state = _Replayed()  # an install's file, then the crash: nothing else
        g.runs, g.first_seq, g.latest_seq = state.runs, state.first_seq, state.latest_seq
        if state.error is not None:
            message, seq = state.error
            raise _Problem(f"group {g.id}: record {seq} {message}", seq)
        entries, hard_state = state.entries, state.hard_state
        if state.restart is not None and state.restart[0] > at:
            raise _Problem(
                f"group {g.id}: its log restarts after a snapshot at {state.restart[0]}, "
                f"but its snapshot file {f'ends at {at}' if snapshot else 'is missing'}",
                state.latest_seq,
            )
        restart = None
        if snapshot is not None and file.installed and (
            (entries and entries[0].index <= at) or state.latest_seq is None
        ):
            # A crash between the two steps of an install: finish it.
            if entries:
                _log.warn(
                    "raft engine {directory}: group {group}: completing the install of "
                    "snapshot {index}: dropping the {count} log entries ({first}..{last}) "
                    "it replaces",
                    directory=self.directory,
                    group=g.id,
                    index=at,
                    count=len(entries),
                    first=entries[0].index,
                    last=entries[-1].index,
                )
            entries = []
            g.runs.clear()
            restart = LogRecord(
                g.id, RecordKind.RESTART, hard_state, (), snapshot.index, snapshot.term
            )
        if entries:
            first = entries[0].index
            if first > at + 1:
                raise _Problem(
                    f"group {g.id}: its log starts at entry {first}, but its snapshot ends "
                    f"at {at}: entries in between are missing",
                    g.runs.oldest,
                )
            if first <= at:
                # A tail kept below a snapshot this member took: it must hold the
                # snapshot's last entry, with the snapshot's term.
                offset = at - first
                if offset >= len(entries) or entries[offset].term != snapshot.term:
                    have = (
                        "ends before it"
                        if offset >= len(entries)
                        else f"has term {entries[offset].term}"
                    )
                    raise _Problem(
                        f"group {g.id}: its snapshot ends at entry {at} of term "
                        f"{snapshot.term}, but its log {have}",
                        g.runs.oldest,
                    )
                cut = max(first, at - self.keep_entries)
                del entries[: cut - first]
                g.runs.trim_below(cut)
        last = entries[-1].index if entries else at
        if hard_state.commit > last:
            raise _Problem(
                f"group {g.id}: commit index {hard_state.commit}, but its log ends at "
                f"entry {last} (snapshot at {at}): committed entries are gone",
                state.latest_seq,
                behind_commit=True,
            )
        g.loaded = (snapshot, entries, hard_state)
        g.hard_state, g.last_index, g.snapshot_index = hard_state, last, at
        return restart

    @defer.inlineCallbacks
    def _problem_error(self, group: int, problem: _Problem):
        """The `CorruptLog` for ``problem``, naming the file and offset of its record."""
        path = offset = None
        if problem.seq is not None:
            path, offset = yield self._io.call(_locate, self._wal.directory, problem.seq)
        where = f" (record {problem.seq}: {path} at byte {offset})" if path else ""
        kind = LogBehindCommit if problem.behind_commit else CorruptLog
        return kind(f"{problem}{where}", path=path, offset=offset)

    # -- the groups ---------------------------------------------------------------------

    def groups(self) -> list[int]:
        """The groups with state in the log (damaged ones included), in order."""
        self._check_ready()
        return sorted(
            g.id
            for g in self._groups.values()
            if not g.removing and (g.latest_seq is not None or g.error is not None)
        )

    def storage(self, group: int, bootstrap: ConfState | None = None) -> GroupStorage:
        """The storage the core of ``group`` reads, holding everything persisted.

        ``bootstrap`` is the membership of a group that has no snapshot yet (a new
        group, or one that never compacted). Raises the group's `CorruptLog` (or
        `LogBehindCommit`) when its state failed the checks of `open`.
        """
        self._check_ready()
        _check_group(group)
        g = self._groups.get(group)
        if g is None:
            g = self._groups[group] = _Group(group)
        if g.removing:
            raise RuntimeError(f"group {group} is being removed")
        if g.error is not None:
            raise g.error
        if g.storage is None:
            storage = GroupStorage(bootstrap)
            if g.loaded is not None:
                snapshot, entries, hard_state = g.loaded
                if snapshot is not None:
                    storage._install(snapshot)
                if entries and entries[0].index <= storage.snapshot().index:
                    storage._load(entries)
                elif entries:
                    storage._append(entries)
                storage._set_hard_state(hard_state)
                g.loaded = None
            g.storage = storage
        return g.storage

    # -- writes -------------------------------------------------------------------------

    def persist(self, group: int, ready: Ready) -> defer.Deferred:
        """Make ``ready``'s snapshot, entries and hard state durable, as one record.

        Fires with None once they are (the group's storage then holds them). Every
        persist of one reactor turn, of any group, shares one fsync. Raises at once
        (ValueError, SnapshotOutOfDateError) for a Ready that does not follow what
        the group holds.
        """
        g = self._writable(group)
        snapshot = ready.snapshot
        entries = ready.entries
        if snapshot is None and not entries and ready.hard_state is None:
            return self._after(g, lambda: defer.succeed(None))
        hard_state = ready.hard_state if ready.hard_state is not None else g.hard_state
        if hard_state.vote is not None and not isinstance(hard_state.vote, int | str):
            raise TypeError(f"a vote is an int or str node id, not {hard_state.vote!r}")
        last = g.last_index
        if snapshot is not None:
            if snapshot.index < g.snapshot_index:
                raise SnapshotOutOfDateError(
                    f"group {group}: snapshot at {snapshot.index} is older than the one "
                    f"held at {g.snapshot_index}"
                )
            last = snapshot.index
        if entries:
            for before, after in itertools.pairwise(entries):
                if after.index != before.index + 1:
                    raise ValueError(f"entries {before.index} and {after.index} do not follow")
            if not 1 <= entries[0].index <= last + 1:
                raise ValueError(
                    f"group {group}: entries from {entries[0].index} leave a gap after "
                    f"entry {last}"
                )
            last = max(entries[-1].index, snapshot.index if snapshot else 0)
        if snapshot is not None:
            kind, at, term = RecordKind.RESTART, snapshot.index, snapshot.term
            g.snapshot_index = snapshot.index
        else:
            kind, at, term = RecordKind.APPEND, 0, 0
        record = LogRecord(group, kind, hard_state, tuple(entries), at, term)
        g.hard_state, g.last_index = hard_state, last
        g.in_flight += 1

        def write() -> defer.Deferred:
            return self._append(g, record).addCallback(self._persisted, g, ready, hard_state)

        if snapshot is None:
            d = self._after(g, write)
        else:
            path = self._snapshot_path(group)

            def install() -> defer.Deferred:
                written = self._io.call(_write_snapshot, path, snapshot, True)

                def recorded(size: int) -> defer.Deferred:
                    g.snapshot_bytes = size
                    return write()

                return written.addCallback(recorded)

            d = self._after(g, install, waits_for_file=True)

        def settled(result: Any) -> Any:
            g.in_flight -= 1
            return result

        return d.addBoth(settled)

    def _persisted(self, _: None, g: _Group, ready: Ready, hard_state: HardState) -> None:
        """Durable: show it to the core (in WAL order: the WAL fires in order)."""
        storage = g.storage
        assert storage is not None
        if ready.snapshot is not None:
            storage._install(ready.snapshot)
        if ready.entries:
            storage._append(list(ready.entries))
        storage._set_hard_state(hard_state)

    def compact(self, group: int, snapshot: Snapshot) -> defer.Deferred:
        """Keep ``snapshot`` (taken by this member of ``group``) and let the log below
        it go, all but the last ``keep_entries`` entries before it. Fires with None
        once the snapshot is durable, the group's storage shows it, and the segments
        that frees are deleted.

        Raises SnapshotOutOfDateError for a snapshot not newer than the group's, and
        ValueError for one whose last entry the group's storage does not hold with its
        term (a snapshot is of applied, so durable, entries).
        """
        g = self._writable(group)
        storage = g.storage
        assert storage is not None
        # ``snapshot_index`` counts installs still in progress too: an older snapshot
        # never overwrites an installed one's file.
        if snapshot.index <= g.snapshot_index:
            raise SnapshotOutOfDateError(
                f"group {group}: snapshot at {snapshot.index} is not newer than the one "
                f"held at {g.snapshot_index}"
            )
        if snapshot.index > storage.last_index():
            raise ValueError(f"group {group}: snapshot at {snapshot.index} is past its log")
        if storage.term(snapshot.index) != snapshot.term:
            raise ValueError(
                f"group {group}: snapshot at {snapshot.index} has term {snapshot.term}, "
                f"the log's entry has term {storage.term(snapshot.index)}"
            )
        g.snapshot_index = snapshot.index
        path = self._snapshot_path(group)

        def compaction() -> defer.Deferred:
            def written(size: int) -> defer.Deferred | None:
                g.snapshot_bytes = size
                storage._take(snapshot)
                cut = snapshot.index - self.keep_entries
                if cut > storage.first_index() - 1:
                    storage._compact(cut)
                    g.runs.trim_below(cut)
                # Fire once the segments this frees are gone.
                return self._maintain()

            return self._io.call(_write_snapshot, path, snapshot, False).addCallback(written)

        return self._after(g, compaction, waits_for_file=True)

    def remove_group(self, group: int) -> defer.Deferred:
        """Forget ``group`` durably (a REMOVE record), then delete its snapshot file.

        Fires with None once both are done; until then the group takes no calls. A
        damaged group can be removed too (to rebuild it from its peers).
        """
        self._check_writable()
        _check_group(group)
        g = self._groups.get(group)
        if g is None or g.removing:
            raise KeyError(f"group {group} has no state to remove")
        if g.storage is None and g.loaded is None and g.error is None:
            raise KeyError(f"group {group} has no state to remove")
        path = self._snapshot_path(group)

        def removal() -> defer.Deferred:
            d = self._append(g, LogRecord(group, RecordKind.REMOVE))
            d.addCallback(lambda _: self._io.call(_remove_snapshot, path))

            def forget(_: None) -> defer.Deferred | None:
                # Pinned until here: the REMOVE record must outlive the file.
                if self._groups.get(group) is g:
                    del self._groups[group]
                return self._maintain()

            return d.addCallback(forget)

        d = self._after(g, removal, waits_for_file=True, failed_ok=True)
        g.removing = True
        return d

    # -- ordering ---------------------------------------------------------------------

    def _after(
        self,
        g: _Group,
        work: Callable[[], defer.Deferred],
        waits_for_file: bool = False,
        failed_ok: bool = False,
    ) -> defer.Deferred:
        """Run ``work`` once the group's earlier file work is done; fire with its result.

        A write with no file work in front of it runs at once, so the records of one
        turn reach the WAL in that turn and share its batch. Work that waits for a
        file (``waits_for_file``) holds back the group's later work until it is done,
        its records durable: an install's RESTART record must precede the records of
        the Readies after it. A failure of such work other than a refusal (ValueError,
        SnapshotOutOfDateError) leaves the group's files unknown: the group then
        refuses writes until the engine is reopened.
        """
        result: defer.Deferred = defer.Deferred()
        self._pending.add(result)
        result.addBoth(self._done, result)

        def step() -> defer.Deferred | None:
            if g.failed is not None and not failed_ok:
                result.errback(StorageError(f"group {g.id} failed earlier: {g.failed}"))
                return None
            try:
                d = work()
            except Exception:
                result.errback(Failure())
                return None
            if not waits_for_file:
                d.chainDeferred(result)
                return None
            gate: defer.Deferred = defer.Deferred()

            def finished(outcome: Any) -> None:
                if isinstance(outcome, Failure) and not outcome.check(
                    ValueError, SnapshotOutOfDateError
                ):
                    # The file may or may not have been replaced: the group's disk
                    # state is unknown until it is reopened.
                    g.failed = StorageError(str(outcome.value))
                gate.callback(None)
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)

            d.addBoth(finished)
            return gate

        g.steps.append(step)
        if not g.running:
            self._run_steps(g)
        return result

    def _run_steps(self, g: _Group) -> None:
        while g.steps:
            gate = g.steps.popleft()()
            if gate is not None:
                g.running = True
                gate.addCallback(self._step_done, g)
                return

    def _step_done(self, _: None, g: _Group) -> None:
        g.running = False
        self._run_steps(g)

    def _done(self, result: Any, d: defer.Deferred) -> Any:
        self._pending.discard(d)
        return result

    # -- the log ------------------------------------------------------------------------

    def _append(self, g: _Group, record: LogRecord) -> defer.Deferred:
        """Hand ``record`` of ``g`` to the WAL now; fires once it is durable."""
        seq = self._next_seq
        self._next_seq += 1
        payload = encode_record(record)
        d = self._wal.append(seq, 0, payload)
        self._account(seq, len(payload), record.kind != RecordKind.REWRITE)
        if g.first_seq is None:
            g.first_seq = seq
        g.latest_seq = seq
        if record.kind in (RecordKind.RESTART, RecordKind.REWRITE, RecordKind.REMOVE):
            g.runs.clear()
        kept = [e for e in record.entries if e.index > record.snapshot_index]
        if kept:
            g.runs.add(kept[0].index, seq)
        self._schedule_maintenance()
        return d

    def _account(self, seq: int, payload_bytes: int, fresh: bool) -> None:
        if not self._mark_seqs or self._bytes - self._mark_bytes[-1] >= self._bucket:
            self._mark_seqs.append(seq)
            self._mark_bytes.append(self._bytes)
            self._mark_fresh.append(self._fresh)
        size = _RECORD_HEADER + payload_bytes
        self._bytes += size
        if fresh:
            self._fresh += size

    def _bytes_before(self, seq: int) -> int:
        """Bytes written before record ``seq``, rounded down to a mark."""
        if seq >= self._next_seq:
            return self._bytes
        at = bisect_right(self._mark_seqs, seq) - 1
        return self._mark_bytes[at] if at >= 0 else 0

    def _lag(self, seq: int) -> int:
        """Bytes persists wrote since record ``seq`` (rounded up to a mark)."""
        at = bisect_right(self._mark_seqs, seq) - 1
        return self._fresh - (self._mark_fresh[at] if at >= 0 else 0)

    def _schedule_maintenance(self) -> None:
        # Once per reactor turn, after the turn's records are in the WAL's batch.
        if self._maintenance is None and self._ready and not self._closing:
            self._maintenance = self._reactor.callLater(0, self._maintain_soon)

    def _maintain_soon(self) -> None:
        d = self._maintain()
        if d is not None:
            # Refused only once a write failed, which the WAL reported loudly already.
            d.addErrback(
                lambda f: _log.warn("raft engine: segments not dropped: {error}", error=f.value)
            )

    def _maintain(self) -> defer.Deferred | None:
        """Rewrite lagging quiet groups, then drop the segments no group needs; the
        drop's Deferred, if one was started."""
        if self._maintenance is not None and self._maintenance.active():
            self._maintenance.cancel()
        self._maintenance = None
        if self._closing or self._wal.first_index is None:
            return None
        # A group's live size costs a scan: look at most once per mark's worth of log.
        if self._fresh - self._rewrites_checked_at >= self._bucket:
            self._rewrites_checked_at = self._fresh
            for g in list(self._groups.values()):
                pin = g.pin
                if pin is not None and self._lag(pin) > self.rewrite_lag_bytes:
                    self._rewrite(g)
        pins = [pin for pin in (g.pin for g in self._groups.values()) if pin is not None]
        floor = min(pins, default=self._next_seq)
        first = self._wal.first_index
        if floor <= first or floor <= self._drop_requested:
            return None
        self._drop_requested = floor
        # Seal (start a new segment, so the one appended to can go later) only once a
        # segment's worth lies below every pin: sealing at each move of the floor
        # would make many small segments, each a directory fsync.
        seal = self._bytes_before(floor) - self._bytes_before(first) >= self.segment_bytes
        return self._wal.drop_prefix(floor, seal=seal).addCallback(self._dropped)

    def _dropped(self, _: None) -> None:
        first = self._wal.first_index
        if first is None:
            self._mark_seqs, self._mark_bytes, self._mark_fresh = [], [], []
            return
        at = bisect_right(self._mark_seqs, first) - 1
        if at > 0:
            del self._mark_seqs[:at], self._mark_bytes[:at], self._mark_fresh[:at]

    def _rewrite(self, g: _Group) -> None:
        """Copy ``g``'s live state to the head, so its pin stops holding old segments."""
        if not g.idle or g.error is not None or g.failed is not None:
            return
        if g.storage is not None:
            entries = g.storage._live_entries()
            snapshot_index = g.storage.snapshot().index
        elif g.loaded is not None:
            snapshot, entries, _ = g.loaded
            snapshot_index = snapshot.index if snapshot is not None else 0
            if entries and entries[0].index == snapshot_index:
                entries = entries[1:]  # the snapshot holds that entry's term
        else:
            return
        if sum(len(e.data) for e in entries) > self.rewrite_max_bytes:
            return  # a long live log: its compaction frees the segments, not a copy
        record = LogRecord(g.id, RecordKind.REWRITE, g.hard_state, tuple(entries))
        self._append(g, record).addErrback(
            lambda f: _log.failure("raft engine: rewriting group {group}", f, group=g.id)
        )

    # -- the rest -----------------------------------------------------------------------

    @property
    def bytes_on_disk(self) -> int:
        """Bytes of durable WAL records plus the snapshot files."""
        return self._wal.bytes_on_disk + sum(g.snapshot_bytes for g in self._groups.values())

    @defer.inlineCallbacks
    def close(self):
        """Finish the calls in progress, then close the WAL; fires with None."""
        if not self._opened or self._closing:
            return
        self._closing = True
        if self._maintenance is not None:
            self._maintenance.cancel()
            self._maintenance = None
        # Wait on relays, not on the callers' Deferreds: their results stay theirs.
        waits = []
        for d in list(self._pending):
            relay: defer.Deferred = defer.Deferred()
            d.addBoth(_relay, relay)
            waits.append(relay)
        yield defer.gatherResults(waits)
        yield self._wal.close()

    def _snapshot_path(self, group: int) -> str:
        return os.path.join(self._snapshots, f"{group}.snapshot")

    def _check_ready(self) -> None:
        if not self._ready:
            raise RuntimeError("raft engine not opened (or open() has not fired yet)")

    def _check_writable(self) -> None:
        self._check_ready()
        if self._closing:
            raise StorageError("raft engine is closed")

    def _writable(self, group: int) -> _Group:
        self._check_writable()
        g = self._groups.get(group)
        if g is not None and g.removing:
            raise RuntimeError(f"group {group} is being removed")
        if g is not None and g.error is not None:
            raise g.error
        if g is None or g.storage is None:
            raise RuntimeError(f"group {group}: call storage({group}) before writing")
        return g


def _relay(result: Any, relay: defer.Deferred) -> Any:
    relay.callback(None)
    return result


def _check_group(group: int) -> None:
    if not isinstance(group, int) or not 0 <= group <= _MAX_GROUP:
        raise ValueError(f"a group is an int in [0, {_MAX_GROUP}], not {group!r}")
