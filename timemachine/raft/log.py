"""The Raft log as the core sees it: stable storage plus what is not persisted yet.

Modelled on etcd's ``log.go`` and ``log_unstable.go``. `Unstable` holds the entries (and
possibly one incoming snapshot) that the core has accepted but the application has not
yet written; `RaftLog` presents storage + unstable as one log, and keeps the two
cursors the core moves: ``committed`` (known durable on a quorum; never goes back) and
``applied`` (handed to the state machine and acknowledged by ``advance``).
"""

from __future__ import annotations

from timemachine.raft.storage import limit_size
from timemachine.raft.types import (
    CompactedError,
    Entry,
    Snapshot,
    Storage,
    UnavailableError,
)


class Unstable:
    """Entries from ``offset`` on (and maybe a snapshot) not yet in storage."""

    def __init__(self, offset: int) -> None:
        self.snapshot: Snapshot | None = None
        self.entries: list[Entry] = []
        self.offset = offset

    def maybe_first_index(self) -> int | None:
        """The first log index if an unstable snapshot fixes it."""
        return self.snapshot.index + 1 if self.snapshot is not None else None

    def maybe_last_index(self) -> int | None:
        """The last log index if the unstable part fixes it."""
        if self.entries:
            return self.offset + len(self.entries) - 1
        if self.snapshot is not None:
            return self.snapshot.index
        return None

    def maybe_term(self, index: int) -> int | None:
        """The term of ``index`` if the unstable part knows it."""
        if index < self.offset:
            if self.snapshot is not None and self.snapshot.index == index:
                return self.snapshot.term
            return None
        last = self.maybe_last_index()
        if last is None or index > last:
            return None
        return self.entries[index - self.offset].term

    def stable_to(self, index: int, term: int) -> None:
        """Entries up to ``index`` were persisted (unless since replaced by a new term)."""
        t = self.maybe_term(index)
        if t is None or t != term or index < self.offset:
            # Replaced after the Ready was taken: the new entries still need writing.
            return
        del self.entries[: index + 1 - self.offset]
        self.offset = index + 1

    def stable_snap_to(self, index: int) -> None:
        """The snapshot at ``index`` was persisted."""
        if self.snapshot is not None and self.snapshot.index == index:
            self.snapshot = None

    def restore(self, snap: Snapshot) -> None:
        """Replace everything unstable by ``snap``."""
        self.offset = snap.index + 1
        self.entries = []
        self.snapshot = snap

    def truncate_and_append(self, ents: list[Entry]) -> None:
        """Append ``ents``, replacing any unstable entries from ``ents[0].index`` on."""
        after = ents[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(ents)
        elif after <= self.offset:
            # Replaces everything unstable (and, once written, a suffix of storage too).
            self.offset = after
            self.entries = list(ents)
        else:
            del self.entries[after - self.offset :]
            self.entries.extend(ents)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Unstable entries ``[lo, hi)``."""
        return self.entries[lo - self.offset : hi - self.offset]


class RaftLog:
    """Storage plus unstable entries, with the ``committed`` and ``applied`` cursors."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        first = storage.first_index()
        last = storage.last_index()
        self.unstable = Unstable(last + 1)
        # Everything in the snapshot is committed and applied by definition.
        self.committed = first - 1
        self.applied = first - 1

    def __repr__(self) -> str:
        return (
            f"RaftLog(committed={self.committed}, applied={self.applied}, "
            f"unstable.offset={self.unstable.offset}, unstable={len(self.unstable.entries)})"
        )

    # -- bounds and terms -----------------------------------------------------------------

    def first_index(self) -> int:
        """The first index with an entry (one past the latest snapshot)."""
        i = self.unstable.maybe_first_index()
        return i if i is not None else self.storage.first_index()

    def last_index(self) -> int:
        """The index of the last entry (or of the snapshot, with no entry after it)."""
        i = self.unstable.maybe_last_index()
        return i if i is not None else self.storage.last_index()

    def term(self, index: int) -> int:
        """The term of ``index``; raises `CompactedError` / `UnavailableError`."""
        dummy = self.first_index() - 1
        if index < dummy:
            raise CompactedError(f"term of {index} is compacted")
        if index > self.last_index():
            raise UnavailableError(f"term of {index} is past the last index")
        t = self.unstable.maybe_term(index)
        if t is not None:
            return t
        return self.storage.term(index)

    def term_or_zero(self, index: int) -> int:
        """The term of ``index``, 0 where it is unknown (compacted or past the end)."""
        try:
            return self.term(index)
        except (CompactedError, UnavailableError):
            return 0

    def last_term(self) -> int:
        """The term of the last entry."""
        return self.term(self.last_index())

    def match_term(self, index: int, term: int) -> bool:
        """Whether the log has an entry at ``index`` with ``term``."""
        try:
            return self.term(index) == term
        except (CompactedError, UnavailableError):
            return False

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """Whether a log ending at (``last_index``, ``term``) is at least as recent (§5.4.1)."""
        last_term = self.last_term()
        return term > last_term or (term == last_term and last_index >= self.last_index())

    # -- reading entries --------------------------------------------------------------------

    def entries(
        self, lo: int, max_count: int | None = None, max_bytes: int | None = None
    ) -> list[Entry]:
        """Entries from ``lo`` to the end: at most ``max_count`` of them and at most
        ``max_bytes`` of data, but at least one if there is any."""
        last = self.last_index()
        if lo > last:
            return []
        hi = last + 1
        if max_count is not None:
            hi = min(hi, lo + max_count)
        return limit_size(self.slice(lo, hi), max_bytes)

    def slice(self, lo: int, hi: int) -> list[Entry]:
        """Entries ``[lo, hi)`` from storage and the unstable part."""
        if lo >= hi:
            return []
        first = self.first_index()
        if lo < first:
            raise CompactedError(f"entry {lo} is compacted (first is {first})")
        if hi > self.last_index() + 1:
            raise UnavailableError(f"slice [{lo}, {hi}) is past the last index")
        ents: list[Entry] = []
        off = self.unstable.offset
        if lo < off:
            ents.extend(self.storage.entries(lo, min(hi, off)))
        if hi > off:
            ents.extend(self.unstable.slice(max(lo, off), hi))
        return ents

    def all_entries(self) -> list[Entry]:
        """Every entry held (for tests and invariant checks)."""
        return self.entries(self.first_index())

    def unstable_entries(self) -> list[Entry]:
        """The entries the application has still to persist."""
        return list(self.unstable.entries)

    def has_next_committed_entries(self) -> bool:
        """Whether committed entries wait to be applied (none while a snapshot waits)."""
        if self.unstable.snapshot is not None:
            # The state machine must take the snapshot first; entries follow it.
            return False
        return self.committed > max(self.applied, self.first_index() - 1)

    def next_committed_entries(self, max_bytes: int | None = None) -> list[Entry]:
        """Committed entries not applied yet, in order: at most ``max_bytes`` of data,
        but at least one if there is any."""
        if not self.has_next_committed_entries():
            return []
        lo = max(self.applied + 1, self.first_index())
        return limit_size(self.slice(lo, self.committed + 1), max_bytes)

    # -- conflicts and appending ----------------------------------------------------------

    def find_conflict(self, ents: list[Entry] | tuple[Entry, ...]) -> int:
        """The index of the first entry of ``ents`` that is new or conflicts, else 0.

        A conflict is an entry with the same index but a different term.
        """
        for e in ents:
            if not self.match_term(e.index, e.term):
                return e.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The last index <= ``index`` whose term is <= ``term``, with that term.

        The fast backtracking of etcd's ``findConflictByTerm``: every entry above the
        returned index has a term greater than ``term``, so it cannot match an entry of
        the other log whose term is ``term``; a whole term is skipped per round trip.
        """
        while index > 0:
            try:
                t = self.term(index)
            except (CompactedError, UnavailableError):
                # Below our first entry (or past the end): stop with what we know.
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def maybe_append(
        self, index: int, log_term: int, committed: int, ents: tuple[Entry, ...] | list[Entry]
    ) -> int | None:
        """Append ``ents`` after (``index``, ``log_term``) if the log matches there.

        Returns the index of the last new entry, or None when the log does not match.
        Entries already present are kept (a delayed or duplicated append must not cut
        off entries appended after it); a conflicting suffix is replaced.
        """
        if not self.match_term(index, log_term):
            return None
        last_new = index + len(ents)
        ci = self.find_conflict(ents)
        if ci:
            if ci <= self.committed:
                raise AssertionError(
                    f"entry {ci} conflicts with committed entry (committed {self.committed})"
                )
            self.append(list(ents[ci - index - 1 :]))
        self.commit_to(min(committed, last_new))
        return last_new

    def append(self, ents: list[Entry]) -> int:
        """Append ``ents`` (the first may replace a suffix); returns the last index."""
        if not ents:
            return self.last_index()
        after = ents[0].index - 1
        if after < self.committed:
            raise AssertionError(f"append after {after} is below committed {self.committed}")
        self.unstable.truncate_and_append(ents)
        return self.last_index()

    # -- cursors ----------------------------------------------------------------------------

    def commit_to(self, index: int) -> None:
        """Move ``committed`` forward to ``index``; it never moves back."""
        if index > self.committed:
            if index > self.last_index():
                raise AssertionError(f"commit {index} is past the last index {self.last_index()}")
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """Commit up to ``index`` if it has ``term`` (only current-term entries count)."""
        if index > self.committed and self.term_or_zero(index) == term:
            self.commit_to(index)
            return True
        return False

    def applied_to(self, index: int) -> None:
        """The state machine has applied everything up to ``index``."""
        if index == 0:
            return
        if index > self.committed or index < self.applied:
            raise AssertionError(
                f"applied {index} out of range [applied {self.applied}, committed {self.committed}]"
            )
        self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        """Entries up to (``index``, ``term``) were persisted."""
        self.unstable.stable_to(index, term)

    def stable_snap_to(self, index: int) -> None:
        """The snapshot at ``index`` was persisted."""
        self.unstable.stable_snap_to(index)

    def restore(self, snap: Snapshot) -> None:
        """Take a leader's snapshot: the log becomes the snapshot, committed jumps to it."""
        self.committed = snap.index
        self.unstable.restore(snap)

    def snapshot(self) -> Snapshot:
        """The latest snapshot (unstable if one is pending, else storage's)."""
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot
        return self.storage.snapshot()
