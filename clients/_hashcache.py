"""The client's cache of file content hashes, so that an unchanged file is never read twice.

One file per source directory under ``$XDG_CACHE_HOME/labrun/hashes/`` (else
``~/.cache/labrun/hashes/``): ``{"root": directory, "files": {name: [device, inode, size,
mtime_ns, sha256, by chunks]}}`` in msgpack. A file's hash in each form of ``protocol/_content_hash`` has its own
place: the SHA-256 (nil if not known), and, only for a file larger than one chunk, its hash by chunks (absent or nil
if not known), which older clients, reading the fifth place only, never take for a SHA-256. Up to one chunk the
two forms are one hash, kept in the fifth place. ``hashlib`` is imported only when a file must be read.
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

from labrun.protocol._content_hash import SHA256, chunked

# Newer than this (against the clock at hashing), an mtime might not change with the next write.
RACY_NS = 100_000_000
READ_CHUNK = 1 << 20


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "labrun", "hashes")


def hash_file(path: str, size: int, form: str = SHA256) -> str | None:
    """The hash in ``form`` of a file's content of ``size`` bytes; None if it has another size now."""
    from labrun.protocol._content_hash import Hasher

    hasher = Hasher(form, size)
    with open(path, "rb", buffering=0) as f:
        while hasher.fed <= size and (chunk := f.read(READ_CHUNK)):
            hasher.update(chunk)
    return hasher.hexdigest() if hasher.fed == size else None


def _place(form: str, size: int) -> int:
    """Where an entry keeps a file's hash in ``form``."""
    return 5 if chunked(form, size) else 4


class HashCache:
    """The hashes of one source directory's files, in ``form`` (the one the agent takes)."""

    def __init__(self, root: str, form: str = SHA256):
        self.form = form
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

    def _entry(self, name: str, st: os.stat_result) -> list | None:
        """The file's entry, if its device, inode, size and mtime are still those it had."""
        entry = self.entries.get(name)
        try:
            if (entry[3] == st.st_mtime_ns and entry[2] == st.st_size and entry[1] == st.st_ino
                    and entry[0] == st.st_dev):
                return entry
        except (TypeError, IndexError, KeyError):
            pass   # no entry, or a corrupt one
        return None

    def cached(self, name: str, st: os.stat_result) -> str | None:
        """The remembered hash (in this cache's form), if the file is unchanged since."""
        entry = self._entry(name, st)
        place = _place(self.form, st.st_size)
        if entry is None or len(entry) <= place or type(entry[place]) is not str:
            return None
        self.seen[name] = entry
        return entry[place]

    def digest(self, name: str, path: str, st: os.stat_result) -> str:
        """Read and hash the file (``cached`` first), and remember the hash unless its mtime is too recent."""
        digest = hash_file(path, st.st_size, self.form)
        if digest is None:
            raise OSError(f"{path} changed while it was being read; submit again")
        self.learn(name, st, digest)
        return digest

    def learn(self, name: str, st: os.stat_result, digest: str) -> None:
        """Remember ``digest`` (in this cache's form) for the file of ``st`` (hashed just now, here or by the agent),
        unless its mtime is too recent; its hash in the other form, if known, is kept."""
        self.changed = True
        if st.st_mtime_ns >= self.now_ns - RACY_NS:
            self.seen[name] = None   # hashed, but not trusted next time
            return
        place = _place(self.form, st.st_size)
        known = self._entry(name, st)
        entry = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, None, None]
        if known is not None:
            entry[4:] = (list(known[4:6]) + [None, None])[:2]
        entry[place] = digest
        self.seen[name] = entry if entry[5] is not None else entry[:5]

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
