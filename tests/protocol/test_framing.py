"""Frames: the exact bytes, partial and back-to-back input, oversize headers, garbage."""

import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from labrun.protocol import FrameCorrupt, FrameDecoder, FrameTooLarge, pack_frame, request


class TestGolden:
    def test_hello_request_bytes(self):
        """A hello request is a 4-byte big-endian length and a msgpack map, byte for byte."""
        frame = pack_frame(request(0, "hello", {"protocol": 1}))
        assert frame == bytes.fromhex("0000001e" "83a2696400a26f70a568656c6c6fa461726773" "81a870726f746f636f6c01")

    def test_binary_is_bin_type(self):
        """Bytes travel as msgpack bin, strings as str: the two never mix up."""
        frame = pack_frame({"data": b"\x00\xff", "text": "é"})
        assert frame == bytes.fromhex("00000012" "82a464617461c40200ff" "a474657874a2c3a9")

    def test_error_reply_bytes(self):
        frame = pack_frame({"id": 7, "ok": False, "error": {"code": "not_found", "message": "no run"}})
        assert frame[:4] == struct.pack(">I", len(frame) - 4)
        assert msgpack.unpackb(frame[4:]) == {"id": 7, "ok": False, "error": {"code": "not_found", "message": "no run"}}


class TestDecoder:
    def test_byte_by_byte(self):
        frames = pack_frame({"a": 1}) + pack_frame({"b": [1, 2]})
        decoder = FrameDecoder()
        out = []
        for i in range(len(frames)):
            out += decoder.feed(frames[i:i + 1])
        assert out == [{"a": 1}, {"b": [1, 2]}]
        assert decoder.pending == 0

    def test_back_to_back_in_one_feed(self):
        assert FrameDecoder().feed(pack_frame({"x": 1}) * 3) == [{"x": 1}] * 3

    def test_oversize_header_rejected_before_body(self):
        """A header announcing more than the maximum fails on the header alone."""
        decoder = FrameDecoder(max_frame=100)
        with pytest.raises(FrameTooLarge, match="101 bytes exceeds the maximum of 100"):
            decoder.feed(struct.pack(">I", 101))

    def test_huge_header(self):
        with pytest.raises(FrameTooLarge):
            FrameDecoder().feed(b"\xff\xff\xff\xff")

    def test_frame_at_the_limit_is_accepted(self):
        body = msgpack.packb({"d": b"x" * 90})
        decoder = FrameDecoder(max_frame=len(body))
        assert decoder.feed(struct.pack(">I", len(body)) + body) == [{"d": b"x" * 90}]

    @pytest.mark.parametrize("body", [b"\xc1", msgpack.packb([1, 2]), msgpack.packb(3), b"\x81\xa1"])
    def test_corrupt_bodies(self, body):
        with pytest.raises(FrameCorrupt):
            FrameDecoder().feed(struct.pack(">I", len(body)) + body)

    def test_non_string_keys_are_corrupt(self):
        body = msgpack.packb({1: 2})
        with pytest.raises(FrameCorrupt):
            FrameDecoder().feed(struct.pack(">I", len(body)) + body)


@settings(max_examples=300)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=50))
def test_random_bytes_only_raise_protocol_errors(data, chunk):
    """Whatever arrives, the decoder yields maps or raises one of its two errors, nothing else."""
    decoder = FrameDecoder(max_frame=1000)
    try:
        for i in range(0, len(data), chunk):
            for message in decoder.feed(data[i:i + chunk]):
                assert isinstance(message, dict)
    except (FrameTooLarge, FrameCorrupt):
        pass


@given(st.dictionaries(st.text(max_size=10), st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10), max_size=5))
def test_roundtrip(message):
    assert FrameDecoder().feed(pack_frame(message)) == [message]
