"""An in-memory Raft log storage (etcd's ``MemoryStorage``).

The core only reads a `Storage`; the application writes to it after persisting a
`Ready` (``apply_snapshot``, then ``append``, then ``set_hard_state``). Tests and the
simulation use this class as the "disk": what it holds survives a simulated crash, and
everything else is lost.

Layout: ``_ents[0]`` is a dummy entry standing for the last entry covered by the
snapshot (its index and term), so ``_ents[i]`` has index ``_ents[0].index + i`` and the
term of the snapshot's last entry is always at hand for the log matching check.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from timemachine.raft.types import (
    CompactedError,
    ConfState,
    Entry,
    HardState,
    Snapshot,
    SnapshotChunk,
    UnavailableError,
)


class SnapshotOutOfDateError(Exception):
    """``apply_snapshot``/``create_snapshot`` was given an index older than the one held."""


class MemoryStorage:
    """The `Storage` protocol over Python lists.

    ``conf`` bootstraps a new group: it becomes the membership of the (empty) initial
    snapshot at index 0, which is what `initial_state` reports.
    """

    def __init__(self, conf: ConfState | None = None) -> None:
        self._hard_state = HardState()
        self._snapshot = Snapshot(conf=conf or ConfState())
        self._ents: list[Entry] = [Entry(0, 0)]
        # The file a snapshot being received is written to, chunk by chunk.
        self._incoming = bytearray()

    # -- the read side (the Storage protocol) --------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        """The hard state last set, and the membership of the last snapshot.

        Conf changes committed after the snapshot are in the log; the core re-applies
        those already applied (below its ``applied``) when it starts.
        """
        return self._hard_state, self._snapshot.conf

    def entries(self, lo: int, hi: int, max_bytes: int | None = None) -> list[Entry]:
        """Entries ``[lo, hi)``; at least one if any, at most ``max_bytes`` of data."""
        offset = self._ents[0].index
        if lo <= offset:
            raise CompactedError(f"entry {lo} is compacted (first kept {offset + 1})")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"entries up to {hi - 1} asked, last is {self.last_index()}")
        ents = self._ents[lo - offset : hi - offset]
        return limit_size(ents, max_bytes)

    def term(self, index: int) -> int:
        """The term of entry ``index`` (also of the snapshot's last entry)."""
        offset = self._ents[0].index
        if index < offset:
            raise CompactedError(f"term of {index} is compacted (snapshot at {offset})")
        if index - offset >= len(self._ents):
            raise UnavailableError(f"term of {index} asked, last is {self.last_index()}")
        return self._ents[index - offset].term

    def first_index(self) -> int:
        """The index of the first entry still held (one past the snapshot)."""
        return self._ents[0].index + 1

    def last_index(self) -> int:
        """The index of the last entry held (the snapshot's if no entry follows it)."""
        return self._ents[0].index + len(self._ents) - 1

    def snapshot(self) -> Snapshot:
        """The most recent snapshot."""
        return self._snapshot

    @property
    def hard_state(self) -> HardState:
        """The hard state last persisted."""
        return self._hard_state

    # -- the write side (the application's, after a Ready) --------------------------------

    def set_hard_state(self, hs: HardState) -> None:
        """Persist term, vote and commit."""
        self._hard_state = hs

    def write_chunks(self, chunks: Iterable[SnapshotChunk]) -> None:
        """Write a Ready's ``snapshot_chunks`` to the received snapshot's file."""
        for chunk in chunks:
            del self._incoming[chunk.offset :]
            self._incoming += chunk.data

    def received(self, snap: Snapshot) -> Snapshot:
        """A Ready's ``snapshot`` with its data: what the chunks wrote, for a snapshot
        received from a leader (index above 0; a bootstrap one has none)."""
        if snap.index == 0:
            return snap
        data, self._incoming = bytes(self._incoming), bytearray()
        return replace(snap, data=data)

    def apply_snapshot(self, snap: Snapshot) -> None:
        """Replace the whole log with ``snap`` (a follower installing a leader's snapshot).

        A snapshot older than the one held is refused; an equal one is accepted, so a
        bootstrap snapshot at index 0 may set the first membership.
        """
        if snap.index < self._snapshot.index:
            raise SnapshotOutOfDateError(
                f"snapshot at {snap.index} is older than the one held at {self._snapshot.index}"
            )
        self._snapshot = snap
        self._ents = [Entry(snap.index, snap.term)]

    def create_snapshot(self, index: int, conf: ConfState, data: bytes) -> Snapshot:
        """Record the application's snapshot of its state machine as of ``index``.

        ``index`` must be held (applied entries are) and newer than the current snapshot;
        the log is kept: call `compact` to drop what the snapshot covers.
        """
        if index <= self._snapshot.index:
            raise SnapshotOutOfDateError(
                f"snapshot at {index} is not newer than the one held at {self._snapshot.index}"
            )
        if index > self.last_index():
            raise UnavailableError(f"snapshot at {index} is past the last entry")
        snap = Snapshot(index=index, term=self.term(index), conf=conf, data=data)
        self._snapshot = snap
        return snap

    def load_log(self, entries: list[Entry]) -> None:
        """Hold ``entries``, read back from a disk, as the log after the snapshot.

        The first entry becomes the compaction point (its index and term are kept, as
        the dummy entry); it may lie below the snapshot, when the disk kept a tail of
        entries before it for followers slightly behind.
        """
        first = entries[0]
        if first.index > self._snapshot.index:
            raise ValueError(
                f"log read back from {first.index} leaves a gap after the snapshot at "
                f"{self._snapshot.index}"
            )
        self._ents = [Entry(first.index, first.term), *entries[1:]]

    def compact(self, index: int) -> None:
        """Drop every entry up to ``index`` (which a snapshot must already cover)."""
        offset = self._ents[0].index
        if index <= offset:
            raise CompactedError(f"already compacted up to {offset}")
        if index > self.last_index():
            raise UnavailableError(f"compact to {index} past the last entry")
        if index > self._snapshot.index:
            # Dropping entries no snapshot covers would lose committed state.
            raise ValueError(f"compact to {index} past the snapshot at {self._snapshot.index}")
        i = index - offset
        self._ents = [Entry(self._ents[i].index, self._ents[i].term), *self._ents[i + 1 :]]

    def append(self, entries: list[Entry] | tuple[Entry, ...]) -> None:
        """Append ``entries``, first cutting off any held suffix they replace.

        Entries the snapshot already covers are skipped; a gap after the last entry is
        a bug in the caller.
        """
        if not entries:
            return
        first = self.first_index()
        last = entries[-1].index
        if last < first:
            return
        if entries[0].index < first:
            entries = entries[first - entries[0].index :]
        offset = entries[0].index - self._ents[0].index
        if offset > len(self._ents):
            raise ValueError(
                f"missing log entries: last held {self.last_index()}, "
                f"appended from {entries[0].index}"
            )
        # Keeps [snapshot, entries[0].index) and replaces everything after it, in
        # place: copying the whole log on every append cost time growing with its
        # length (up to a compaction's worth of entries).
        del self._ents[offset:]
        self._ents.extend(entries)


def limit_size(ents: list[Entry], max_bytes: int | None) -> list[Entry]:
    """The longest prefix of ``ents`` within ``max_bytes`` of data, but at least one."""
    if max_bytes is None or not ents:
        return list(ents)
    size = len(ents[0].data)
    n = 1
    while n < len(ents):
        size += len(ents[n].data)
        if size > max_bytes:
            break
        n += 1
    return list(ents[:n])
