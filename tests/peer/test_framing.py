"""The sans-I/O framer: frames survive any split of the stream; the limit is enforced
from the header alone."""

import struct

from twisted.trial import unittest

from timemachine.peer.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    NEED_DATA,
    FrameDecoder,
    FrameTooLarge,
    RemoteProtocolError,
    encode_frame,
)

PAYLOADS = [b"", b"a", b"hello world", bytes(range(256)) * 3, b"", b"\x00\x00\x00\x05"]


def drain(decoder):
    frames = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        frames.append(frame)
    return frames


class EncodeTests(unittest.TestCase):
    def test_u32_big_endian_length_then_payload(self):
        self.assertEqual(encode_frame(b"abc"), b"\x00\x00\x00\x03abc")
        self.assertEqual(encode_frame(b""), b"\x00\x00\x00\x00")
        self.assertEqual(encode_frame(b"x" * 258)[:4], b"\x00\x00\x01\x02")


class FrameDecoderTests(unittest.TestCase):
    def test_every_split_of_the_stream_gives_the_same_frames(self):
        stream = b"".join(encode_frame(p) for p in PAYLOADS)
        for cut in range(len(stream) + 1):
            decoder = FrameDecoder()
            decoder.receive_data(stream[:cut])
            frames = drain(decoder)
            decoder.receive_data(stream[cut:])
            frames += drain(decoder)
            self.assertEqual(frames, PAYLOADS, f"cut at {cut}")
            self.assertEqual(decoder.buffered, 0)

    def test_byte_by_byte(self):
        stream = b"".join(encode_frame(p) for p in PAYLOADS)
        decoder = FrameDecoder()
        frames = []
        for i in range(len(stream)):
            decoder.receive_data(stream[i : i + 1])
            frames += drain(decoder)
        self.assertEqual(frames, PAYLOADS)

    def test_many_frames_in_one_chunk(self):
        payloads = [str(i).encode() * (i % 7) for i in range(10_000)]
        decoder = FrameDecoder()
        decoder.receive_data(b"".join(encode_frame(p) for p in payloads) + b"\x00\x00")
        self.assertEqual(drain(decoder), payloads)
        # The consumed prefix was dropped; only the partial header is left.
        self.assertEqual(decoder.buffered, 2)
        self.assertLessEqual(len(decoder._buffer), 4)

    def test_a_frame_is_handed_out_whole_or_not_at_all(self):
        decoder = FrameDecoder()
        decoder.receive_data(encode_frame(b"abcdef")[:-1])
        self.assertIs(decoder.next_frame(), NEED_DATA)
        decoder.receive_data(b"f")
        self.assertEqual(decoder.next_frame(), b"abcdef")
        self.assertIs(decoder.next_frame(), NEED_DATA)

    def test_zero_length_frame(self):
        decoder = FrameDecoder()
        decoder.receive_data(encode_frame(b""))
        self.assertEqual(decoder.next_frame(), b"")
        self.assertIs(decoder.next_frame(), NEED_DATA)

    def test_frames_are_bytes(self):
        decoder = FrameDecoder()
        decoder.receive_data(encode_frame(b"abc"))
        self.assertIs(type(decoder.next_frame()), bytes)

    def test_a_frame_at_the_limit_passes(self):
        decoder = FrameDecoder(max_frame_bytes=10)
        decoder.receive_data(encode_frame(b"x" * 10))
        self.assertEqual(decoder.next_frame(), b"x" * 10)

    def test_oversize_is_refused_from_the_header_alone(self):
        decoder = FrameDecoder(max_frame_bytes=10)
        decoder.receive_data(encode_frame(b"ok"))
        decoder.receive_data(struct.pack(">I", 11))
        self.assertEqual(decoder.next_frame(), b"ok")
        error = self.assertRaises(FrameTooLarge, decoder.next_frame)
        self.assertIsInstance(error, RemoteProtocolError)
        self.assertEqual((error.length, error.limit), (11, 10))
        # The stream cannot be framed past a refused header: it stays refused.
        decoder.receive_data(encode_frame(b"later"))
        self.assertRaises(FrameTooLarge, decoder.next_frame)

    def test_default_limit_is_16_mib(self):
        self.assertEqual(DEFAULT_MAX_FRAME_BYTES, 16 * 1024 * 1024)
        decoder = FrameDecoder()
        decoder.receive_data(struct.pack(">I", DEFAULT_MAX_FRAME_BYTES + 1))
        self.assertRaises(FrameTooLarge, decoder.next_frame)
