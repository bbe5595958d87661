"""A FUSE filesystem that stops answering on demand: what a hostile user's mount (fusermount, or a user
namespace) can do to any process holding one of its files. Spoken directly on ``/dev/fuse`` (no library),
served by a thread of the test process; needs root (it mounts) and the kernel's FUSE.

It holds one regular file, ``file``; ``hang`` names the requests (``"getattr"``, ``"flush"``, ``"read"``)
left unanswered from then on, as a daemon that never answers would.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import select
import stat
import struct
import threading
from pathlib import Path

LOOKUP, FORGET, GETATTR, OPEN, READ, RELEASE, FLUSH, INIT, INTERRUPT, BATCH_FORGET = 1, 2, 3, 14, 15, 18, 25, 26, 36, 42
CLOSING = {FLUSH, RELEASE, FORGET, BATCH_FORGET}   # what the close of a file asks, and nothing else
_NO_REPLY = {FORGET, INTERRUPT, BATCH_FORGET}
_NAMES = {"getattr": GETATTR, "flush": FLUSH, "read": READ}
_IN = struct.Struct("<IIQQIIIHH")
_OUT = struct.Struct("<IiQ")
FILE_NODE = 2


class HostileFuse:
    def __init__(self, mountpoint: Path, content: bytes):
        self.mountpoint = mountpoint
        self.content = content
        self.hang: set[int] = set()
        self.unanswered: list[int] = []   # opcodes left waiting
        self.requests: list[int] = []     # opcodes of every request, in order
        self._stop = False
        self._after_end: set[int] = set()
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        options = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if libc.mount(b"hostile", str(mountpoint).encode(), b"fuse", ctypes.c_ulong(6), options) != 0:   # nosuid nodev
            os.close(self._fd)
            raise OSError(ctypes.get_errno(), "mount fuse")
        self._libc = libc
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        # A process cannot exit while it holds a file of a mount whose daemon (its own thread) is gone: end first.
        atexit.register(self.close)

    @property
    def file(self) -> Path:
        return self.mountpoint / "file"

    def stop_answering(self, *names: str, after_end: bool = False) -> None:
        """Leave these requests unanswered from now on (``after_end``: once the file has been read to its end)."""
        if after_end:
            self._after_end = {_NAMES[name] for name in names}
        else:
            self.hang = {_NAMES[name] for name in names}

    def close(self) -> None:
        """Unmount and end the connection: every request still waiting fails (ENOTCONN)."""
        if self._stop:
            return
        self._libc.umount2(str(self.mountpoint).encode(), 2)   # MNT_DETACH
        self._stop = True
        self._thread.join(5)
        os.close(self._fd)

    def _attr(self, node: int) -> bytes:
        if node == FILE_NODE:
            mode, size, nlink = stat.S_IFREG | 0o644, len(self.content), 1
        else:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        return struct.pack("<QQQQQQIIIIIIIIII", node, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, nlink,
                           0, 0, 0, 4096, 0)

    def _serve(self) -> None:
        while not self._stop:
            if not select.select([self._fd], [], [], 0.1)[0]:
                continue
            try:
                request = os.read(self._fd, 1 << 20)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue
                return   # unmounted
            length, opcode, unique, node, *_ = _IN.unpack_from(request)
            body = request[_IN.size:length]
            self.requests.append(opcode)
            if opcode in _NO_REPLY:
                continue
            if opcode in self.hang:
                self.unanswered.append(opcode)
                continue
            error, out = 0, b""
            if opcode == INIT:
                major, minor = struct.unpack_from("<II", body)
                out = struct.pack("<IIIIHHIIHHI28x", 7, min(minor, 31), 0, 0, 16, 12, 4096, 1, 1, 0, 0)
            elif opcode == LOOKUP:
                if node == 1 and body.rstrip(b"\0") == b"file":
                    out = struct.pack("<QQQQII", FILE_NODE, 0, 0, 0, 0, 0) + self._attr(FILE_NODE)
                else:
                    error = -errno.ENOENT
            elif opcode == GETATTR:
                out = struct.pack("<QII", 0, 0, 0) + self._attr(node)   # valid for no time: each fstat asks
            elif opcode == OPEN:
                out = struct.pack("<QII", 0, 0, 0)
            elif opcode == READ:
                _, offset, size = struct.unpack_from("<QQI", body)
                out = self.content[offset:offset + size]
                if offset + size >= len(self.content):
                    self.hang |= self._after_end
            elif opcode in (FLUSH, RELEASE):
                pass
            else:
                error = -errno.ENOSYS
            try:
                os.write(self._fd, _OUT.pack(_OUT.size + len(out), error, unique) + out)
            except OSError:
                pass   # the request was interrupted meanwhile
