"""The client's cache of file content hashes, so that an unchanged file is never read twice.

One file per source directory under ``$XDG_CACHE_HOME/labrun/hashes/`` (else
``~/.cache/labrun/hashes/``): ``{"root": directory, "files": {name: [device, inode, size,
mtime_ns, sha256]}}`` in msgpack. ``hashlib`` is imported only when a file must be read.
An entry is used only while all four of the file's keys still match. A file modified in the
same clock tick as it was hashed could keep its mtime, so (as git does with "racily clean"
entries) a file whose mtime is too recent is hashed but not remembered. The cache is written
atomically (a temporary file, then a rename) and a missing, unreadable or corrupt cache is
simply an empty one: it can only cost time, never give a wrong hash.
"""

from __future__ import annotations

import os
import time
import zlib

import msgpack

# Newer than this (against the clock at hashing), an mtime might not change with the next write.
RACY_NS = 100_000_000
READ_CHUNK = 1 << 20


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "labrun", "hashes")


def hash_file(path: str) -> tuple[str, int]:
    """The SHA-256 of a file's content and how many bytes were read."""
    import hashlib

    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size


class HashCache:
    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        name = self.root.encode("utf-8", "surrogateescape")
        # Two cheap checksums name the file; the directory inside it settles any collision.
        self.path = os.path.join(cache_dir(), f"{zlib.crc32(name):08x}{zlib.adler32(name):08x}.msgpack")
        self.entries = self._load()
        self.seen: dict[str, list] = {}
        self.changed = False
        self.now_ns = time.time_ns()

    def _load(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                cached = msgpack.unpackb(f.read(), raw=False)
            if cached["root"] == self.root and isinstance(cached["files"], dict):
                return cached["files"]
        except Exception:   # noqa: BLE001 - missing, unreadable or corrupt: start empty
            pass
        return {}

    def cached(self, name: str, st: os.stat_result) -> str | None:
        """The remembered hash, if the file's device, inode, size and mtime are still those it had."""
        entry = self.entries.get(name)
        try:
            if (entry[3] == st.st_mtime_ns and entry[2] == st.st_size and entry[1] == st.st_ino
                    and entry[0] == st.st_dev and type(entry[4]) is str):
                self.seen[name] = entry
                return entry[4]
        except (TypeError, IndexError, KeyError):
            pass   # no entry, or a corrupt one
        return None

    def digest(self, name: str, path: str, st: os.stat_result) -> str:
        """Read and hash the file (``cached`` first), and remember the hash unless its mtime is too recent."""
        digest, size = hash_file(path)
        if size != st.st_size:
            raise OSError(f"{path} changed while it was being read; submit again")
        self.learn(name, st, digest)
        return digest

    def learn(self, name: str, st: os.stat_result, digest: str) -> None:
        """Remember ``digest`` for the file of ``st`` (hashed just now, here or by the agent), unless its mtime is
        too recent."""
        self.changed = True
        if st.st_mtime_ns >= self.now_ns - RACY_NS:
            self.seen[name] = None   # hashed, but not trusted next time
        else:
            self.seen[name] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, digest]

    def save(self) -> None:
        """Keep the entries of this walk (files gone since are dropped). Never raises."""
        entries = {k: v for k, v in self.seen.items() if v is not None}
        if not self.changed and len(entries) == len(self.entries):
            return
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(msgpack.packb({"root": self.root, "files": entries}, use_bin_type=True))
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError:
            pass   # a read-only or full cache directory costs time, never correctness
