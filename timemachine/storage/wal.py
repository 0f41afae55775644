"""The write-ahead log of a Raft group: segment files of CRC32C-checked records.

On disk the log is a directory of segment files, each named by the index of its first
record (``00000000000000000001.wal``). A record is::

    payload length  u32   big-endian
    CRC32C          u32   of the 16 + length bytes that follow
    index           u64
    term            u64
    payload         length bytes

Work is split in two halves:

* `WriteAheadLog` lives on the reactor. It validates calls, keeps ``first_index`` and
  ``last_index`` up to date synchronously (Raft needs them at once to validate the next
  append) and orders every operation in one FIFO queue with at most one operation in
  flight. Appends join the batch at the tail of that queue, so everything appended in
  one reactor turn - and in the turns during which the previous flush is still on
  disk - is written with one write and made durable with one fsync (group commit).
* `_SegmentFiles` lives in one dedicated writer thread and owns every file descriptor
  and the per-record offset index. It is the only code that touches the disk, so the
  reactor never blocks on I/O and the in-memory index needs no lock.
"""

from __future__ import annotations

import os
import re
import struct
import time
from array import array
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import crc32c
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from timemachine.domain.errors import CorruptLog, StorageError
from timemachine.interfaces import IWriteAheadLog, WALRecord
from timemachine.storage.iothread import IOThread

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "LogDamage",
    "LogSurvey",
    "RepairPlan",
    "TornTail",
    "WriteAheadLog",
    "plan_repair",
    "repair_log",
    "segment_name",
    "survey_log",
]

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024

_HEADER = struct.Struct(">IIQQ")  # payload length, CRC32C, index, term
_PREFIX = struct.Struct(">II")  # payload length, CRC32C
_CHECKED = struct.Struct(">QQ")  # index, term: covered by the CRC with the payload
_CRC_START = 8  # the CRC covers the record from the index on
_MAX_PAYLOAD = 2**32 - 1
_MAX_U64 = 2**64 - 1
_SEGMENT_FILE = re.compile(r"^(\d{20})\.wal$")

_log = Logger()


def segment_name(first_index: int) -> str:
    """The file name of the segment whose first record has index ``first_index``."""
    return f"{first_index:020d}.wal"


def _encode(index: int, term: int, payload: bytes) -> bytes:
    checked = _CHECKED.pack(index, term) + payload
    return _PREFIX.pack(len(payload), crc32c.crc32c(checked)) + checked


def _record_end(data: memoryview, pos: int, index: int) -> int | None:
    """End offset of the record at ``pos`` if it is whole, checksummed and has ``index``.

    None means the log stops before ``pos``: a torn write, a flipped bit, or a record
    from an older incarnation of the file.
    """
    if len(data) - pos < _HEADER.size:
        return None
    length, crc, found_index, _term = _HEADER.unpack_from(data, pos)
    end = pos + _HEADER.size + length
    if end > len(data):
        return None
    if crc32c.crc32c(data[pos + _CRC_START : end]) != crc or found_index != index:
        return None
    return end


class _Segment:
    """One segment file and where each of its records starts (writer thread only)."""

    __slots__ = ("first_index", "offsets", "path", "size")

    def __init__(self, path: str, first_index: int):
        self.path = path
        self.first_index = first_index
        # 8 bytes per record: a list of ints would cost ~36, and a 64 MiB segment of
        # small records holds about a million of them.
        self.offsets = array("Q")
        self.size = 0

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.offsets) - 1

    def end_of(self, index: int) -> int:
        """Offset just after the record ``index`` of this segment."""
        position = index - self.first_index + 1
        return self.offsets[position] if position < len(self.offsets) else self.size


# -- recovery: what a segment directory holds, read without changing it ---------------

# A disk writes whole sectors: a write cut off by a crash leaves some sectors of its
# range unwritten, and unwritten file space reads as zeros (etcd's minSectorSize).
_SECTOR = 512
_ZEROS = bytes(_SECTOR)
# How many following indexes a search for readable records past a bad one tries.
_RESYNC_INDEXES = 256


class _Stop(NamedTuple):
    """Why the records of a segment stop before its end."""

    torn: bool  # the unfinished last write of the log (forgiven), not damage
    reason: str


def _unwritten(view: memoryview, pos: int, end: int) -> bool:
    """Whether the record at ``[pos, end)`` overlaps space a torn write left unwritten.

    Like etcd's ``isTornEntry``: the record is cut at sector boundaries and a piece
    that reads all zeros was never written. The zeros must also reach the end of their
    sector (or of the file), and a piece must be a header long unless the file ends
    there: a flipped bit next to a few legitimately zero bytes is damage, not a tear.
    """
    start = pos
    while start < end:
        stop = min((start // _SECTOR + 1) * _SECTOR, len(view))
        if (stop - start >= _HEADER.size or stop == len(view)) and view[start:stop] == _ZEROS[
            : stop - start
        ]:
            return True
        start = stop
    return False


def _resync(view: memoryview, pos: int, index: int) -> tuple[int, int] | None:
    """The first intact record after a bad one at ``pos``: (offset, index), or None.

    A record's index sits ``_CRC_START`` bytes in, so searching the bytes under
    ``view`` for the next few indexes finds where readable records resume.
    """
    data = view.obj
    for candidate in range(index + 1, index + 1 + _RESYNC_INDEXES):
        needle = struct.pack(">Q", candidate)
        at = data.find(needle, pos + 1 + _CRC_START)
        while at != -1:
            start = at - _CRC_START
            if _record_end(view, start, candidate) is not None:
                return start, candidate
            at = data.find(needle, at + 1)
    return None


def _next_record(view: memoryview, pos: int, index: int, last_segment: bool) -> int | _Stop:
    """End of the intact record ``index`` at ``pos`` (< the end), or why the log stops.

    Only the last segment can end in a torn write: a segment is complete and fsync'd
    before the next one is created. There, a record cut short by the end of the file,
    or overlapping unwritten sectors, is torn; anywhere else, and for a checksum
    mismatch on a complete record, it is damage (etcd's WAL decoder decides alike).
    """
    remaining = len(view) - pos
    if remaining < _HEADER.size:
        return _Stop(last_segment, f"is cut off after {remaining} bytes of its header")
    length, crc, found_index, _term = _HEADER.unpack_from(view, pos)
    end = pos + _HEADER.size + length
    if end > len(view):
        # A torn write leaves no readable record after the one it cut; a record that
        # follows means the length field itself is damaged.
        if last_segment and _resync(view, pos, index) is None:
            return _Stop(True, f"of {length} bytes is cut off by the end of the file")
        return _Stop(False, f"has a length ({length}) that runs past the end of the file")
    if crc32c.crc32c(view[pos + _CRC_START : end]) != crc:
        if last_segment and _unwritten(view, pos, end):
            return _Stop(True, "overlaps unwritten (zeroed) sectors")
        return _Stop(False, "fails its checksum")
    if found_index != index:
        return _Stop(False, f"holds index {found_index}")
    return end


def _count_intact(view: memoryview, pos: int, index: int) -> tuple[int, int | None]:
    """Intact records from ``pos`` on, skipping bad ones: (how many, last index)."""
    count, last = 0, None
    while pos < len(view):
        end = _record_end(view, pos, index)
        if end is None:
            found = _resync(view, pos, index)
            if found is None:
                break
            pos, index = found
            continue
        count, last = count + 1, index
        pos, index = end, index + 1
    return count, last


def _read_segment(path: str) -> memoryview:
    with open(path, "rb") as f:
        return memoryview(f.read())


@dataclass(frozen=True)
class TornTail:
    """The unfinished last write of a log: never acknowledged, cut when the log opens."""

    path: str
    offset: int
    size: int  # bytes from ``offset`` to the end of the file
    reason: str


@dataclass(frozen=True)
class LogDamage:
    """The first bad record of a log, and what a cut there would lose.

    ``records_beyond`` counts the records still readable after the damage (in its
    segment, found by searching for the next indexes, and in ``segments_beyond``);
    ``bytes_beyond`` is everything from ``offset`` to the end of the log's files.
    """

    path: str
    offset: int
    index: int  # the index the bad record should hold
    reason: str
    first_index: int | None  # of the log, if any record precedes the damage
    intact_records: int
    records_beyond: int
    last_index_beyond: int | None
    segments_beyond: tuple[str, ...]
    bytes_beyond: int

    def describe(self) -> str:
        """The damage and the cost of cutting there, in one paragraph for people."""
        if self.intact_records:
            before = (
                f"{self.intact_records} intact records before it "
                f"(indexes {self.first_index}..{self.index - 1})"
            )
        else:
            before = "no intact record before it"
        if self.last_index_beyond is not None:
            lost = f"indexes {self.index}..{self.last_index_beyond}"
        else:
            lost = f"index {self.index}"
        return (
            f"{self.path} at byte {self.offset}: record {self.index} {self.reason}; "
            f"{before}; a cut there would lose {self.bytes_beyond} bytes, {lost}: "
            f"{self.records_beyond} intact records beyond the damage and "
            f"{len(self.segments_beyond)} later segment files"
        )

    def error(self) -> CorruptLog:
        """The refusal to open a log with this damage."""
        return CorruptLog(
            f"corrupt write-ahead log: {self.describe()}",
            path=self.path,
            offset=self.offset,
            intact_records=self.intact_records,
            records_beyond=self.records_beyond,
            segments_beyond=self.segments_beyond,
        )


@dataclass
class LogSurvey:
    """What a log directory holds: its intact segments, a torn tail, or damage.

    ``segments`` hold the records a log opening (or a repair) keeps: with damage, the
    intact ones before it.
    """

    directory: str
    segments: list[_Segment]
    torn: TornTail | None = None
    damage: LogDamage | None = None

    @property
    def first_index(self) -> int | None:
        return self.segments[0].first_index if self.segments else None

    @property
    def last_index(self) -> int:
        return self.segments[-1].last_index if self.segments else 0

    @property
    def records(self) -> int:
        return sum(len(segment.offsets) for segment in self.segments)


def survey_log(directory: str) -> LogSurvey:
    """Read every segment of ``directory`` and say what it holds; changes nothing.

    The segments are read up to the first bad record, or to a torn tail of the last
    segment. Segments must follow each other without a gap or an overlap in indexes.
    """
    firsts = sorted(
        int(match.group(1))
        for match in map(_SEGMENT_FILE.match, os.listdir(directory))
        if match
    )
    paths = [os.path.join(directory, segment_name(first)) for first in firsts]
    survey = LogSurvey(directory, [])
    for position, (first, path) in enumerate(zip(firsts, paths, strict=True)):
        last_segment = position == len(firsts) - 1
        if survey.segments and first != survey.last_index + 1:
            expected = survey.last_index + 1
            reason = (
                f"is missing: the next segment starts at index {first}"
                if first > expected
                else f"is in two segments: the next one starts at index {first}"
            )
            survey.damage = _damage(survey, paths[position:], path, 0, expected, reason)
            return survey
        view = _read_segment(path)
        segment = _Segment(path, first)
        pos, index = 0, first
        while pos < len(view):
            step = _next_record(view, pos, index, last_segment)
            if isinstance(step, _Stop):
                if step.torn:
                    reason = f"record {index} {step.reason}"
                    survey.torn = TornTail(path, pos, len(view) - pos, reason)
                    break
                # The records before the damage are part of the log a cut leaves.
                segment.size = pos
                if segment.offsets:
                    survey.segments.append(segment)
                survey.damage = _damage(
                    survey, paths[position + 1 :], path, pos, index, step.reason, view
                )
                return survey
            segment.offsets.append(pos)
            pos, index = step, index + 1
        segment.size = pos
        if segment.offsets:
            survey.segments.append(segment)
        elif not last_segment:
            survey.damage = _damage(
                survey, paths[position + 1 :], path, 0, first, "is missing: its segment is empty"
            )
            return survey
        elif survey.torn is None:
            # Created, then the crash came before its first record was durable.
            survey.torn = TornTail(path, 0, len(view), "an empty last segment")
    return survey


def _damage(
    survey: LogSurvey,
    later: list[str],
    path: str,
    offset: int,
    index: int,
    reason: str,
    view: memoryview | None = None,
) -> LogDamage:
    """The damage at ``path``/``offset``, counting what lies beyond it.

    ``later`` are the segment files wholly beyond the damage (``path`` itself when the
    damage is a gap before it); a ``view`` of the damaged segment is searched past the
    bad record. The survey's segments are the intact records before the damage.
    """
    beyond, last_beyond = 0, None
    size = 0
    if view is not None:
        size = len(view) - offset
        found = _resync(view, offset, index)
        if found is not None:
            beyond, last_beyond = _count_intact(view, *found)
    for later_path in later:
        later_view = _read_segment(later_path)
        size += len(later_view)
        first = int(os.path.basename(later_path)[:20])
        count, last = _count_intact(later_view, 0, first)
        beyond += count
        last_beyond = last if last is not None else last_beyond
    segments_beyond = tuple(p for p in later if p != path)
    return LogDamage(
        path, offset, index, reason, survey.first_index, survey.records, beyond, last_beyond,
        segments_beyond, size,
    )


class _SegmentFiles:
    """The segment files of one log. Every method runs in the log's writer thread.

    Its segments hold only durable records: the offset index grows after the fsync
    succeeds, so reads never see bytes that a crash could take back.
    """

    def __init__(self, directory: str, segment_bytes: int):
        self._directory = directory
        self._segment_bytes = segment_bytes
        self._segments: list[_Segment] = []
        # The descriptor of the segment being appended to, kept open between batches.
        self._fd: int | None = None
        self._fd_path: str | None = None
        # Set by a compaction that could not delete the active segment because it
        # still holds records above the cut: the next append starts a new segment, so
        # the old one can go whole once the cut passes its last record.
        self._sealed = False

    # -- recovery ---------------------------------------------------------------------

    def recover(self) -> LogSurvey:
        """Load the segments and cut a torn tail; refuse a damaged log.

        Raises `CorruptLog` (changing nothing) when a record other than the unfinished
        last write is bad or segments do not follow each other. The survey returned
        says which torn tail, if any, was cut.
        """
        os.makedirs(self._directory, exist_ok=True)
        survey = survey_log(self._directory)
        if survey.damage is not None:
            raise survey.damage.error()
        self._segments = survey.segments
        torn = survey.torn
        if torn is not None:
            if survey.segments and torn.path == survey.segments[-1].path:
                self._cut_file(torn.path, torn.offset)
            else:
                # Segments are named by their first record: an empty one must go, or
                # a later append of another record at that index would clash with it.
                os.unlink(torn.path)
                self._fsync_directory()
        return survey

    def carry_out(self, plan: RepairPlan) -> None:
        """Delete what ``plan`` says: the repair, run only when asked, fsync'd data included."""
        damage = plan.survey.damage
        if damage is not None:
            for path in damage.segments_beyond:
                os.unlink(path)
            if damage.offset:
                self._cut_file(damage.path, damage.offset)
            else:
                os.unlink(damage.path)
        if plan.empty_log:
            for segment in plan.survey.segments:
                os.unlink(segment.path)
        self._fsync_directory()

    # -- state ------------------------------------------------------------------------

    @property
    def first_index(self) -> int | None:
        return self._segments[0].first_index if self._segments else None

    @property
    def last_index(self) -> int:
        return self._segments[-1].last_index if self._segments else 0

    # -- writes -----------------------------------------------------------------------

    def append(self, records: list[WALRecord]) -> float:
        """Write ``records`` and fsync them; return the seconds spent in fsync.

        One write per segment touched (one, unless the batch crosses a rotation), then
        one fsync per file, and one of the directory when a segment was created.
        """
        if self._segments and records[0].index != self.last_index + 1:
            raise StorageError(
                f"write-ahead log out of order: {records[0].index} after {self.last_index}"
            )
        # Each chunk is (segment, is_new, encoded records, their offsets in the file).
        chunks: list[tuple[_Segment, bool, list[bytes], array]] = []
        segment = self._segments[-1] if self._segments and not self._sealed else None
        size = segment.size if segment else 0
        parts: list[bytes] = []
        offsets = array("Q")
        if segment is not None:
            chunks.append((segment, False, parts, offsets))
        for record in records:
            encoded = _encode(*record)
            if segment is None or (size > 0 and size + len(encoded) > self._segment_bytes):
                segment = _Segment(self._path(record.index), record.index)
                size = 0
                parts = []
                offsets = array("Q")
                chunks.append((segment, True, parts, offsets))
            parts.append(encoded)
            offsets.append(size)
            size += len(encoded)

        seconds = 0.0
        for segment, is_new, parts, _ in chunks:
            if not parts:
                continue
            # Opening the next segment closes this one's descriptor, so each segment
            # is fsync'd right after its write: the batch is durable only when all are.
            fd = self._open_for_append(segment.path, create=is_new)
            _pwrite_all(fd, b"".join(parts), segment.size)
            started = time.monotonic()
            os.fsync(fd)
            seconds += time.monotonic() - started
        if any(is_new for _, is_new, _, _ in chunks):
            # The new file's directory entry must be durable too, or a crash can lose
            # the whole segment although its records were fsync'd.
            started = time.monotonic()
            self._fsync_directory()
            seconds += time.monotonic() - started

        # Durable: only now may readers (and the next batch) see these records.
        self._sealed = False
        for segment, is_new, parts, offsets in chunks:
            if is_new:
                self._segments.append(segment)
            segment.offsets.extend(offsets)
            segment.size += sum(map(len, parts))
        return seconds

    def truncate_suffix(self, index: int) -> None:
        """Drop the records with index >= ``index``; durable on return."""
        unlinked = False
        while self._segments and self._segments[-1].first_index >= index:
            self._unlink(self._segments.pop())
            unlinked = True
        if self._segments and self._segments[-1].last_index >= index:
            segment = self._segments[-1]
            position = index - segment.first_index
            cut = segment.offsets[position]
            self._cut_file(segment.path, cut)
            del segment.offsets[position:]
            segment.size = cut
        if unlinked:
            self._fsync_directory()

    def drop_prefix(self, index: int, seal: bool = False) -> int | None:
        """Delete the segments holding only records below ``index``; the new first index.

        With ``seal``, an active segment that keeps records below ``index`` takes no
        more appends, so that a later cut can delete it whole.
        """
        unlinked = False
        while self._segments and self._segments[0].last_index < index:
            self._unlink(self._segments.pop(0))
            unlinked = True
        if unlinked:
            self._fsync_directory()
        if seal and self._segments and self._segments[-1].first_index < index:
            self._sealed = True
        return self.first_index

    def disk_bytes(self) -> int:
        """Bytes of durable records in the segment files."""
        return sum(segment.size for segment in self._segments)

    def close(self) -> None:
        """Close the open descriptor."""
        self._close_fd()

    # -- reads ------------------------------------------------------------------------

    def read(self, start: int, stop: int) -> list[WALRecord]:
        """The durable records with index in ``[start, stop)``, checked against their CRC."""
        if not self._segments:
            return []
        start = max(start, self._segments[0].first_index)
        stop = min(stop, self.last_index + 1)
        records: list[WALRecord] = []
        if start >= stop:
            return records
        position = bisect_right(self._segments, start, key=lambda s: s.first_index) - 1
        for segment in self._segments[position:]:
            if segment.first_index >= stop:
                break
            low = max(start, segment.first_index)
            high = min(stop, segment.last_index + 1)
            begin = segment.offsets[low - segment.first_index]
            end = segment.end_of(high - 1)
            with open(segment.path, "rb") as f:
                data = memoryview(os.pread(f.fileno(), end - begin, begin))
            pos = 0
            for index in range(low, high):
                record_end = _record_end(data, pos, index)
                if record_end is None:
                    raise CorruptLog(
                        f"record {index} of {segment.path} at byte {begin + pos} "
                        "fails its checksum",
                        path=segment.path,
                        offset=begin + pos,
                    )
                _, _, _, term = _HEADER.unpack_from(data, pos)
                records.append(WALRecord(index, term, bytes(data[pos + _HEADER.size : record_end])))
                pos = record_end
        return records

    # -- files ------------------------------------------------------------------------

    def _path(self, first_index: int) -> str:
        return os.path.join(self._directory, segment_name(first_index))

    def _open_for_append(self, path: str, create: bool) -> int:
        if self._fd_path != path:
            self._close_fd()
            # A new segment starts empty: O_TRUNC clears a file left by a crash between
            # its creation and the first fsync of the directory.
            flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0)
            self._fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
            self._fd_path = path
        assert self._fd is not None
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd, self._fd_path = self._fd, None, None
            os.close(fd)

    def _cut_file(self, path: str, size: int) -> None:
        if path == self._fd_path:
            self._close_fd()
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _unlink(self, segment: _Segment) -> None:
        if segment.path == self._fd_path:
            self._close_fd()
        os.unlink(segment.path)

    def _fsync_directory(self) -> None:
        fd = os.open(self._directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class RepairPlan:
    """What a repair deletes from a log whose state machine has applied ``applied_index``.

    The log is cut before its first bad record. When what is left can no longer
    continue the state machine - it has applied past the log's end, or the log starts
    beyond its next entry - every record left goes too: the state machine holds the
    state, and the log starts again after ``applied_index``.
    """

    survey: LogSurvey
    applied_index: int
    empty_log: bool

    @property
    def changes_anything(self) -> bool:
        return self.survey.damage is not None or self.empty_log

    @property
    def lost_indexes(self) -> tuple[int, int] | None:
        """The first and last deleted index above ``applied_index``: gone for good."""
        deleted = []
        damage = self.survey.damage
        if damage is not None:
            last = damage.last_index_beyond
            deleted.append((damage.index, damage.index if last is None else last))
        if self.empty_log:
            deleted.append((self.survey.first_index, self.survey.last_index))
        lost = [(max(low, self.applied_index + 1), high) for low, high in deleted]
        lost = [(low, high) for low, high in lost if low <= high]
        if not lost:
            return None
        return min(low for low, _ in lost), max(high for _, high in lost)

    def describe(self) -> list[str]:
        """What the repair deletes and what that loses, line by line for people."""
        survey = self.survey
        lines = []
        if survey.damage is not None:
            lines.append(f"damage: {survey.damage.describe()}")
        if self.empty_log:
            why = (
                "it ends before"
                if self.applied_index > survey.last_index
                else "it starts after the entry following"
            )
            lines.append(
                f"then the {survey.records} records left (indexes {survey.first_index}.."
                f"{survey.last_index}, {len(survey.segments)} segment files) go too: {why} "
                f"the store's applied index {self.applied_index}"
            )
        lost = self.lost_indexes
        if lost is None:
            lines.append(
                f"the store has applied every deleted entry (up to index {self.applied_index}): "
                "no acknowledged write is lost"
            )
        else:
            lines.append(
                f"lost for good: indexes {lost[0]}..{lost[1]}, written to the log but never "
                f"applied to the store (applied up to {self.applied_index})"
            )
        return lines


def plan_repair(directory: str, applied_index: int) -> RepairPlan:
    """Survey the log in ``directory`` and decide its repair; changes nothing. Blocks."""
    survey = survey_log(directory)
    first = survey.first_index
    empty_log = first is not None and (
        applied_index > survey.last_index or first > applied_index + 1
    )
    return RepairPlan(survey, applied_index, empty_log)


def repair_log(plan: RepairPlan) -> None:
    """Carry out ``plan``: the only code that deletes fsync'd records of a log.

    For the offline ``timemachine repair`` command: nothing may have the log open
    meanwhile. Blocks; never call it on a reactor.
    """
    files = _SegmentFiles(plan.survey.directory, DEFAULT_SEGMENT_BYTES)
    try:
        files.carry_out(plan)
    finally:
        files.close()


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class _Operation:
    """One entry of the writer queue: work for the writer thread and who waits on it.

    ``mutates`` operations change the files; after a write failure they are refused,
    since the state of the disk past the last successful fsync is unknown. With an
    ``on_success`` hook the result goes to the hook and the waiters get None.
    """

    __slots__ = ("deferreds", "mutates", "on_success", "records", "work")

    def __init__(
        self,
        work: Callable[[], Any],
        mutates: bool,
        on_success: Callable[[Any], None] | None = None,
    ):
        self.work = work
        self.mutates = mutates
        self.on_success = on_success
        self.deferreds: list[defer.Deferred] = []
        self.records: list[WALRecord] = []


@implementer(IWriteAheadLog)
class WriteAheadLog:
    """A segmented, checksummed write-ahead log with group-committed fsync.

    ``directory`` holds the segment files; ``reactor`` provides time and threads;
    ``segment_bytes`` is the size after which a new segment is started (a record is
    never split, so a segment can exceed it by its last record only when that record
    alone is bigger); ``on_fsync(seconds)`` is called on the reactor after each group
    fsync with its duration, for the node's fsync-time histogram.

    The constructor does no I/O; `open` recovers the directory and starts the writer
    thread, `close` finishes pending work and stops it.

    After a failed write or fsync the log fails every later change with
    `StorageError` (the disk past the last fsync is unknown, and retrying fsync after
    a failure can report success for lost data); reopening recovers what is durable.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        reactor: Any,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        on_fsync: Callable[[float], None] | None = None,
        io: IOThread | None = None,
    ):
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, not {segment_bytes}")
        self.directory = os.fspath(directory)
        self._reactor = reactor
        self._on_fsync = on_fsync
        self._files = _SegmentFiles(self.directory, segment_bytes)
        # The writer thread: a node shares one among its logs; alone, the log has its own.
        self._io = io
        self._owns_io = io is None
        self._opened = False
        self._shutdown_trigger: Any = None
        self._ready = False  # recovered: first_index and last_index are known

        self.first_index: int | None = None
        self.last_index = 0
        # Bytes in the segment files after the last operation that finished.
        self.bytes_on_disk = 0

        self._queue: deque[_Operation] = deque()
        # The batch at the tail of the queue that appends still join; None once it has
        # started or something that must come after it was queued.
        self._open_batch: _Operation | None = None
        self._running = False
        self._kick_call: Any = None
        self._failure: StorageError | None = None
        self._closing = False
        self._closed = False
        self._close_waiters: list[defer.Deferred] = []
        # Bumped whenever the log becomes empty, so a drop_prefix finishing later does
        # not overwrite the first_index of records appended after that.
        self._generation = 0
        # Highest drop_prefix index not yet carried out: below it, which records will
        # be left depends on segment boundaries that only the writer knows.
        self._drop_floor = 0
        self._drops_pending = 0

    # -- IWriteAheadLog ---------------------------------------------------------------

    def open(self) -> defer.Deferred:
        """Recover the directory in the writer thread; fires with None."""
        if self._opened:
            raise RuntimeError("write-ahead log already opened")
        self._opened = True
        if self._owns_io:
            self._io = IOThread(self._reactor, f"wal:{self.directory}")
            self._io.start()
        # A reactor stopping without close() would leave the writer thread running and
        # drop the appends still queued; "during shutdown" waits for the Deferred.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "during", "shutdown", self.close
        )
        d = self._io.call(self._files.recover)

        def recovered(survey: LogSurvey) -> None:
            self.first_index, self.last_index = survey.first_index, survey.last_index
            torn = survey.torn
            if torn is not None:
                _log.warn(
                    "write-ahead log {path}: cut a torn last write at byte {offset} "
                    "({size} bytes, {reason}); kept {records} records",
                    path=torn.path,
                    offset=torn.offset,
                    size=torn.size,
                    reason=torn.reason,
                    records=survey.records,
                )
            self.bytes_on_disk = self._files.disk_bytes()
            self._ready = True

        def failed(failure: Failure) -> Failure:
            self._release_io()
            self._opened = False  # open() may be tried again
            if failure.check(CorruptLog):
                _log.error(
                    "write-ahead log {directory} refuses to open: {error}",
                    directory=self.directory,
                    error=failure.value,
                    path=failure.value.path,
                    offset=failure.value.offset,
                    intact_records=failure.value.intact_records,
                    records_beyond=failure.value.records_beyond,
                )
            return failure

        d.addCallbacks(recovered, failed)
        return d

    def append(self, index: int, term: int, payload: bytes) -> defer.Deferred:
        """Append one record; fires with None once it is fsync'd (in index order).

        Raises ValueError at once when ``index`` does not follow ``last_index`` (any
        index >= 1 is accepted by an empty log), or ``term``/``payload`` are invalid.
        Fails with `StorageError` once a write has failed or the log is closing.
        """
        self._check_open()
        if self.last_index:
            if index != self.last_index + 1:
                raise ValueError(f"append index {index} does not follow {self.last_index}")
        elif not 1 <= index <= _MAX_U64:
            raise ValueError(f"append index must be >= 1, not {index}")
        if not 0 <= term <= _MAX_U64:
            raise ValueError(f"term out of range: {term}")
        if not isinstance(payload, bytes):
            raise TypeError(f"payload must be bytes, not {type(payload).__name__}")
        if len(payload) > _MAX_PAYLOAD:
            raise ValueError(f"payload of {len(payload)} bytes is too large")
        refused = self._refusal()
        if refused is not None:
            return defer.fail(refused)

        if self._open_batch is None:
            records: list[WALRecord] = []
            self._open_batch = _Operation(
                partial(self._files.append, records), True, self._batch_written
            )
            self._open_batch.records = records
            self._queue.append(self._open_batch)
        if not self.last_index:
            self.first_index = index
        self.last_index = index
        d: defer.Deferred = defer.Deferred()
        self._open_batch.records.append(WALRecord(index, term, payload))
        self._open_batch.deferreds.append(d)
        self._schedule()
        return d

    def read(self, start: int, stop: int) -> defer.Deferred:
        """Fire with the durable records whose index is in ``[start, stop)``, in order.

        Records not yet fsync'd, or below first_index, are left out. Fails with
        `CorruptLog` when a record no longer matches its checksum.
        """
        self._check_open()
        if self._closing:
            return defer.fail(StorageError("write-ahead log is closed"))
        # Reads do not change the files, so they do not end the open batch: appends
        # made after a read still share one fsync with those made before it.
        return self._enqueue(lambda: self._files.read(start, stop), mutates=False, barrier=False)

    def truncate_suffix(self, index: int) -> defer.Deferred:
        """Drop every record with index >= ``index``; fires with None once durable.

        Ordered after the appends already made; ``last_index`` drops at once, so the
        replacing records can be appended right away. Raises ValueError below the
        index of a drop_prefix still in progress (which records survive it is not
        known yet; Raft never truncates below a snapshot anyway).
        """
        self._check_open()
        if index < 1:
            raise ValueError(f"truncate index must be >= 1, not {index}")
        if (
            self.first_index is not None
            and self.first_index < index <= self.last_index
            and index < self._drop_floor
        ):
            raise ValueError(
                f"cannot truncate at {index}: drop_prefix({self._drop_floor}) is in progress"
            )
        refused = self._refusal()
        if refused is not None:
            return defer.fail(refused)
        if self.first_index is not None and index <= self.first_index:
            self._become_empty()
        elif index <= self.last_index:
            self.last_index = index - 1
        return self._enqueue(lambda: self._files.truncate_suffix(index))

    def drop_prefix(self, index: int, seal: bool = False) -> defer.Deferred:
        """Delete the segments holding only records below ``index``; fires with None.

        The segment holding ``last_index`` stays unless every record is below
        ``index``, in which case the log becomes empty at once. ``first_index`` moves
        to the first record left when this fires. With ``seal`` (compaction), a
        segment that stays but holds records below ``index`` is closed to appends: the
        next append starts a new segment, so the cut is not held back by the segment
        size.
        """
        self._check_open()
        refused = self._refusal()
        if refused is not None:
            return defer.fail(refused)
        generation = self._generation
        if index > self.last_index:
            self._become_empty()
        elif self.first_index is not None and index > self.first_index:
            self._drop_floor = max(self._drop_floor, index)
        self._drops_pending += 1

        def dropped(first_index: int | None) -> None:
            self._drops_pending -= 1
            if not self._drops_pending:
                self._drop_floor = 0
            if generation == self._generation and first_index is not None:
                self.first_index = first_index

        return self._enqueue(lambda: self._files.drop_prefix(index, seal), on_success=dropped)

    def close(self) -> defer.Deferred:
        """Write the pending appends, close the files, stop the writer thread."""
        if not self._opened or self._closed:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        if self._closing:
            self._close_waiters.append(d)
            return d
        self._closing = True
        self._close_waiters.append(d)

        def closed(result: Failure | None) -> None:
            self._release_io()
            self._closed = True
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                if result is None:
                    waiter.callback(None)
                else:
                    waiter.errback(result)

        # Not a mutation: the files are closed even after a write failure.
        self._enqueue(self._files.close, mutates=False).addBoth(closed)
        return d

    # -- the writer queue -------------------------------------------------------------

    def _enqueue(
        self,
        work: Callable[[], Any],
        mutates: bool = True,
        barrier: bool = True,
        on_success: Callable[[Any], None] | None = None,
    ) -> defer.Deferred:
        operation = _Operation(work, mutates, on_success)
        d: defer.Deferred = defer.Deferred()
        operation.deferreds.append(d)
        self._queue.append(operation)
        if barrier:
            self._open_batch = None
        self._schedule()
        return d

    def _schedule(self) -> None:
        # callLater(0) rather than starting now: the batch then takes every append of
        # this reactor turn, not only the first.
        if self._kick_call is None and not self._running and self._queue:
            self._kick_call = self._reactor.callLater(0, self._kick)

    def _kick(self) -> None:
        self._kick_call = None
        while self._queue and not self._running:
            operation = self._queue.popleft()
            if operation is self._open_batch:
                self._open_batch = None
            if operation.mutates and self._failure is not None:
                self._fail(operation, self._failure)
                continue
            self._running = True
            d = self._io.call(operation.work)
            d.addBoth(self._finished, operation)

    def _finished(self, result: Any, operation: _Operation) -> None:
        self._running = False
        if isinstance(result, Failure):
            error = result.value
            if not isinstance(error, StorageError):
                error = StorageError(f"write-ahead log {self.directory}: {error}")
                error.__cause__ = result.value
            if operation.mutates and self._failure is None:
                self._failure = error
                _log.failure("write-ahead log write failed; refusing further writes", result)
            self._fail(operation, error)
        else:
            # Nothing of this log runs in the writer thread now: its state is stable.
            self.bytes_on_disk = self._files.disk_bytes()
            if operation.on_success is not None:
                operation.on_success(result)
            for d in operation.deferreds:
                d.callback(result if operation.on_success is None else None)
        self._schedule()

    def _batch_written(self, fsync_seconds: float) -> None:
        if self._on_fsync is not None:
            try:
                self._on_fsync(fsync_seconds)
            except Exception:
                # A broken metrics hook must not keep acknowledged writes from firing.
                _log.failure("on_fsync hook failed")

    def _fail(self, operation: _Operation, error: StorageError) -> None:
        for d in operation.deferreds:
            copy = type(error)(str(error))
            copy.__cause__ = error.__cause__
            d.errback(copy)

    # -- helpers ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._ready:
            raise RuntimeError("write-ahead log not opened (or open() has not fired yet)")

    def _refusal(self) -> StorageError | None:
        if self._closing:
            return StorageError("write-ahead log is closed")
        if self._failure is not None:
            return StorageError(f"write-ahead log failed earlier: {self._failure}")
        return None

    def _become_empty(self) -> None:
        self.first_index = None
        self.last_index = 0
        self._generation += 1
        self._drop_floor = 0

    def _release_io(self) -> None:
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        if self._owns_io and self._io is not None:
            # The worker is idle here (its last job has reported back), so joining
            # it returns at once.
            self._io.stop()
