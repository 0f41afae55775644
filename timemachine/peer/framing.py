"""Length-prefixed frames of the peer protocol, sans-I/O (in the manner of h11).

A frame is a u32 big-endian length followed by that many bytes of payload (one encoded
`Envelope`). `FrameDecoder` is fed whatever the socket delivered and hands back whole
payloads; it never touches a socket, so it is tested byte by byte without one.

The decoder keeps one ``bytearray`` and an offset into it: taking a frame copies that
frame only, never the rest of the buffer, and the consumed prefix is dropped only once
it is at least half of the buffer (amortised O(1) per byte however many frames arrive
in one chunk).
"""

from __future__ import annotations

import struct

DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
"""Snapshot chunks are 64 KiB and AppendEntries are capped at 1 MiB by the Raft core:
16 MiB leaves room for a batch of several groups' appends in one frame."""

_HEADER = struct.Struct(">I")
HEADER_BYTES = _HEADER.size


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""`FrameDecoder.next_frame` returns this when no whole frame is buffered yet."""


class RemoteProtocolError(Exception):
    """The peer broke the protocol: the connection cannot be trusted past this point."""


class FrameTooLarge(RemoteProtocolError):
    """A frame declared a length over the limit: refused before any of it is buffered."""

    def __init__(self, length: int, limit: int):
        super().__init__(f"frame of {length} bytes is over the limit of {limit} bytes")
        self.length = length
        self.limit = limit


def encode_frame(payload: bytes) -> bytes:
    """``payload`` framed: its length as a u32 big-endian, then the payload."""
    if len(payload) > 0xFFFFFFFF:
        raise ValueError(f"payload of {len(payload)} bytes does not fit a u32 length")
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Splits a byte stream into frame payloads of at most ``max_frame_bytes`` each.

    Feed it with `receive_data`, then call `next_frame` until it returns `NEED_DATA`.
    Once a frame is refused (`FrameTooLarge`) the stream is lost: every later call to
    `next_frame` raises the same error, as nothing after it can be framed.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES):
        if max_frame_bytes < 0:
            raise ValueError("max_frame_bytes must not be negative")
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._offset = 0
        self._error: RemoteProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as frames."""
        return len(self._buffer) - self._offset

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the connection (ignored once the stream is refused)."""
        if self._error is None:
            self._buffer += data

    def next_frame(self) -> bytes | _NeedData:
        """The next whole frame's payload, or `NEED_DATA`.

        Raises `FrameTooLarge` as soon as a header declares too long a frame.
        """
        if self._error is not None:
            raise self._error
        start = self._offset
        available = len(self._buffer) - start
        if available < HEADER_BYTES:
            return NEED_DATA
        (length,) = _HEADER.unpack_from(self._buffer, start)
        if length > self.max_frame_bytes:
            self._error = FrameTooLarge(length, self.max_frame_bytes)
            raise self._error
        if available < HEADER_BYTES + length:
            return NEED_DATA
        begin = start + HEADER_BYTES
        end = begin + length
        # A memoryview slice copies the frame once (a bytearray slice would copy it
        # twice); the view is released before the buffer may be resized.
        with memoryview(self._buffer) as view:
            payload = bytes(view[begin:end])
        self._offset = end
        self._compact()
        return payload

    def _compact(self) -> None:
        if self._offset == len(self._buffer):
            self._buffer.clear()
            self._offset = 0
        elif self._offset >= len(self._buffer) // 2:
            del self._buffer[: self._offset]
            self._offset = 0
