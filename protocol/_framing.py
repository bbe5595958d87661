"""Frames: a 4-byte big-endian length, then one msgpack map.

Sans-I/O: ``pack_frame`` turns a map into bytes, ``FrameDecoder.feed`` turns bytes
into maps. The sync client, the trio server and the tests share both.

The size check happens on the header, before the body is buffered, so a peer
announcing 4 GiB costs us 4 bytes, not 4 GiB.
"""

from __future__ import annotations

import struct

import msgpack

from ._errors import FrameCorrupt, FrameTooLarge

HEADER = struct.Struct(">I")
DEFAULT_MAX_FRAME = 16 * 1024 * 1024
# Open files one message on the socket may pass (SCM_RIGHTS): the kernel's limit (SCM_MAX_FD).
MAX_FDS_PER_MESSAGE = 253


def pack_frame(message: dict) -> bytes:
    """Encode one message map as a frame."""
    body = msgpack.packb(message, use_bin_type=True)
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes | memoryview) -> dict:
    """Decode one frame body; anything but a single map is ``FrameCorrupt``."""
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise FrameCorrupt(f"frame body is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise FrameCorrupt(f"frame body must be a map, got {type(message).__name__}")
    return message


class FrameDecoder:
    """Accumulates bytes and yields complete message maps.

    Raises ``FrameTooLarge`` as soon as a header announces more than
    ``max_frame`` bytes, and ``FrameCorrupt`` for a body that is not one map.
    After either, the stream is out of sync and the connection must be closed.
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > self.max_frame:
                raise FrameTooLarge(
                    f"frame of {length} bytes exceeds the maximum of {self.max_frame} bytes"
                )
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            # Decoded in place: a large frame (an upload) is not copied twice more before msgpack copies it.
            with memoryview(self._buffer) as view:
                message = unpack_body(view[HEADER.size:end])
            del self._buffer[:end]
            messages.append(message)
        return messages

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)
