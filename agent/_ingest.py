"""Contents a client hands over as open files (``blob_fds``): checked, copied into the content store and hashed.

The client opened each file itself, with its own rights, and passed the descriptor over the
socket (SCM_RIGHTS); the agent never opens a user's path. A descriptor is taken only if it is
open for reading and is a regular file (not a directory, FIFO, device or socket) within the
snapshot limit, by ``fstat`` of the descriptor (a size the client declares is never trusted), and is on a
filesystem the agent reads for users (``check``).

Each content is copied first, into a temporary file of the agent's, and the hash is taken of that
copy (or, for a small file, of the agent's own buffer that is then written): a user rewriting
the file meanwhile can make the copy torn, which its size and mtime before and after reveal
(and which is then refused), but never make a stored content differ from its hash. Hashed by chunks
(``"chunked-v1"``, see ``protocol/_content_hash``), a large file's chunks are copied by whichever of the user's
worker threads is free, so both cores work on one file, each through its own small buffer, where each piece is
hashed between its read and its write. In plain SHA-256 (older clients), the kernel copies the next chunk
(``copy_file_range``) while another thread hashes the last chunk of the copy.

Small files are read whole into memory, hashed and written straight to their place in the
store: they are pinned first, so no collection can remove them meanwhile. The smallest (up to
``_small.INLINE_MAX``) are rows of the store's database, committed in one transaction per group; the
others are created in place with ``O_EXCL``, so what another writer put there is replaced whole (by
rename), never rewritten.

A file on FUSE is refused before any call on it (its filesystem is learnt from ``/proc``): its daemon, possibly
the user's own, can leave any call on it waiting for ever. The close of a passed file still asks its daemon
(a flush), and any other call could wait on a slow filesystem: nothing touches a passed file in the event loop.
Each call is made in one of its user's worker threads (``check_all``, ``look_again``, ``close_all`` and the
copies), so that a hung file holds that user's threads and no one else's; the calls that only read into the
agent's own buffers are abandoned when their request is cancelled.

Blocking functions, but for ``ingest`` and ``copy_large``, which run them in worker threads.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import stat as stats
from functools import partial

import trio

from labrun.protocol import BadRequest, TooLarge
from labrun.protocol._content_hash import CHUNK, SHA256, chunked, chunks, root

from ._small import INLINE_MAX

# Up to this size a content is read into memory, hashed and written: one pass and no mapping. (Within one chunk:
# its hash is its SHA-256 in either form.)
SMALL = 1 << 20
assert SMALL <= CHUNK
# Small contents are read into memory at most this much at a time, then written.
SMALL_GROUP = 32 << 20
# A copy by chunks goes through a buffer of this size per thread: small enough to stay in a core's cache.
PIECE = 256 << 10
# copy_file_range cannot copy between these two files: read and write instead.
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
_KINDS = ((stats.S_ISDIR, "a directory"), (stats.S_ISFIFO, "a FIFO"), (stats.S_ISSOCK, "a socket"),
          (stats.S_ISCHR, "a character device"), (stats.S_ISBLK, "a block device"), (stats.S_ISLNK, "a link"))


# Filesystems whose files the agent does not read for a user: FUSE's. Each stat, read or close of such a file is a
# request to its daemon, possibly the user's own, which can leave the agent's thread waiting for ever (past its
# exit: a request already sent is waited for uninterruptibly). A client sends their bytes instead (``blob_put``).
# A file on a mount the agent cannot see (in a user's own mount namespace, where FUSE is allowed) is refused too.
_REFUSED_FILESYSTEMS = frozenset({"fuse", "fuseblk"})
# What a descriptor on no mount at all links to (sockets, pipes, epoll and the like): never a user's filesystem.
_INTERNAL = ("socket:", "pipe:", "anon_inode:")


class Changed(Exception):
    """The file changed while it was being copied."""


def changed(index: int) -> BadRequest:
    return BadRequest(f"blob_fds: file {index} changed while it was being copied; submit again",
                      details={"index": index, "reason": "changed"})


def mounts() -> dict[str, str]:
    """The filesystem type of each mount, by mount id: those of the agent's mount namespace and of the machine's
    (init's: a service manager may give the agent a namespace of its own, whose copies of the mounts have other
    ids). Mount ids are unique on the machine, so an id names the same mount in any list that has it. Blocking."""
    types = {}
    for source in ("/proc/1/mountinfo", "/proc/self/mountinfo"):
        try:
            with open(source) as info:
                for line in info:
                    fields = line.split()
                    if "-" in fields:
                        types[fields[0]] = fields[fields.index("-") + 1]
        except OSError:
            pass   # not there: a file on a mount no list has is refused, and the client sends bytes
    return types


def filesystem(fd: int, types: dict[str, str], fdinfo: int | None = None) -> str | None:
    """The type of the filesystem ``fd`` is on, learnt without any call on the file itself; None if unknown.

    ``fdinfo``: the agent's ``/proc/self/fdinfo`` directory, open (``check_all``): an open relative to it costs
    about half of one by the whole path, most of this check's cost.
    """
    try:
        if fdinfo is None:
            info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        else:
            info = os.open(str(fd), os.O_RDONLY | os.O_CLOEXEC, dir_fd=fdinfo)
        try:
            data = os.read(info, 4096)
        finally:
            os.close(info)
    except OSError:
        return None
    at = data.find(b"\nmnt_id:")
    if at < 0:
        return None
    return types.get(data[at + 8:data.find(b"\n", at + 1)].strip().decode())


def check(fd: int, index: int, max_bytes: int, types: dict[str, str] | None = None,
          fdinfo: int | None = None) -> os.stat_result:
    """The ``fstat`` of a passed descriptor, if the agent may take a content from it; ``types``: ``mounts()``,
    ``fdinfo``: as for ``filesystem``.

    Raises:
        BadRequest: not open for reading, not a regular file, or on a filesystem the agent does not read for
            users (``details.index`` says which; ``details.reason`` is ``"filesystem"`` for the last).
        TooLarge: bigger than ``max_bytes``.
    """
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if flags & getattr(os, "O_PATH", 0) or flags & os.O_ACCMODE == os.O_WRONLY:
        raise BadRequest(f"blob_fds: file {index} is not open for reading", details={"index": index})
    kind = filesystem(fd, mounts() if types is None else types, fdinfo)
    if kind is None and not os.readlink(f"/proc/self/fd/{fd}").startswith(_INTERNAL) \
            or kind in _REFUSED_FILESYSTEMS or (kind or "").startswith("fuse."):
        raise BadRequest(f"blob_fds: file {index} is on a filesystem the agent does not read for users "
                         f"({kind or 'a mount it cannot see'}); send its bytes instead (blob_put)",
                         details={"index": index, "reason": "filesystem"})
    st = os.fstat(fd)
    if not stats.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise BadRequest(f"blob_fds: file {index} is {kind}; only regular files are taken", details={"index": index})
    if st.st_size > max_bytes:
        raise TooLarge(f"blob_fds: file {index} has {st.st_size} bytes, over this agent's snapshot limit of "
                       f"{max_bytes} bytes", details={"index": index})
    return st


def check_all(fds: list[int], max_bytes: int) -> list[tuple[int, int, os.stat_result]]:
    """``(index, fd, stat)`` of each passed descriptor, by ``check``. Blocking."""
    types = mounts()
    fdinfo = os.open("/proc/self/fdinfo", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return [(index, fd, check(fd, index, max_bytes, types, fdinfo)) for index, fd in enumerate(fds)]
    finally:
        os.close(fdinfo)


def close_all(fds: list[int]) -> None:
    """Close passed descriptors. Blocking: a close flushes the file to its filesystem, which may never answer."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass   # closed all the same (the error is its filesystem's, e.g. a FUSE daemon gone)


def read_small(files: list[tuple[int, int, os.stat_result]]) -> list[tuple[str, bytes]]:
    """``(hash, content)`` of small files ``(index, fd, stat)``, read whole into the agent's memory. Blocking.

    Raises:
        BadRequest: a file changed while it was read.
    """
    read = []
    for index, fd, st in files:
        data = os.pread(fd, st.st_size + 1, 0)   # one more: a file that grew is noticed here
        try:
            if len(data) != st.st_size:
                raise Changed
            unchanged(fd, st)
        except Changed:
            raise changed(index) from None
        read.append((hashlib.sha256(data).hexdigest(), data))
    return read


def verify(contents: list[tuple[str, bytes]]) -> None:
    """Check contents sent as bytes ``(hash, data)`` against their SHA-256. Blocking.

    Raises:
        BadRequest: one does not match its hash.
    """
    for i, (digest, data) in enumerate(contents):
        if hashlib.sha256(data).hexdigest() != digest:
            raise BadRequest(f"args.contents[{i}]: the data does not match its hash {digest}",
                             details={"field": "args.contents"})


def groups(files: list[tuple[int, int, os.stat_result]]) -> list[list]:
    """Small files in groups of at most ``SMALL_GROUP`` bytes: what is read into memory before it is written."""
    grouped, size = [[]], 0
    for file in files:
        if size + file[2].st_size > SMALL_GROUP and grouped[-1]:
            grouped.append([])
            size = 0
        grouped[-1].append(file)
        size += file[2].st_size
    return grouped if grouped[0] else []


def copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes at ``offset`` from ``src`` to the same offset of ``dst``, in the kernel where it can."""
    end = offset + count
    while offset < end:
        try:
            copied = os.copy_file_range(src, dst, end - offset, offset, offset)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            copied = _read_write(src, dst, offset, min(end - offset, SMALL))
        if copied == 0:
            raise Changed   # shorter than it was
        offset += copied


def _read_write(src: int, dst: int, offset: int, count: int) -> int:
    data = os.pread(src, count, offset)
    view = memoryview(data)
    at = offset
    while view:
        written = os.pwrite(dst, view, at)
        view, at = view[written:], at + written
    return len(data)


def hash_range(hasher, mapped: mmap.mmap, offset: int, count: int) -> None:
    """Feed ``count`` bytes at ``offset`` of the mapped copy to ``hasher`` (which drops the GIL while it hashes)."""
    with memoryview(mapped) as view, view[offset:offset + count] as part:
        hasher.update(part)


def unchanged(src: int, before: os.stat_result) -> None:
    """Raises ``Changed`` if ``src`` has grown, shrunk or been written since ``before``."""
    after = os.fstat(src)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise Changed


def copy_chunk(src: int, dst: int, offset: int, count: int, buffer: memoryview) -> bytes:
    """Copy ``count`` bytes at ``offset`` from ``src`` to the same offset of ``dst`` through ``buffer``, the agent's
    own memory, and return the SHA-256 digest of what was written. Blocking.

    Each piece is hashed in the buffer it is written from, so the digest is of the copy whatever the file does
    meanwhile; and a piece the size of a core's cache is read, hashed and written while it is in that cache
    (a copy in the kernel and a hash of the copy's mapping read every byte from memory twice more).
    """
    hasher = hashlib.sha256()
    end = offset + count
    while offset < end:
        read = os.preadv(src, [buffer[:min(len(buffer), end - offset)]], offset)
        if read == 0:
            raise Changed   # shorter than it was
        piece = buffer[:read]
        hasher.update(piece)
        while piece:
            written = os.pwrite(dst, piece, offset)
            piece, offset = piece[written:], offset + written
    return hasher.digest()


def copy_chunks(src: int, dst: int, pending, digests: list[bytes]) -> None:
    """Copy chunks ``(index, (offset, count))`` taken from ``pending`` from ``src`` to ``dst``, putting the SHA-256
    digest of each in ``digests``, until none is left. In a worker thread of trio's: a cancelled request stops it
    before its next chunk."""
    buffer = memoryview(bytearray(PIECE))
    for index, (offset, count) in pending:
        trio.from_thread.check_cancelled()
        digests[index] = copy_chunk(src, dst, offset, count, buffer)


def allocate(fd: int, size: int) -> None:
    """Give the empty file ``fd`` its ``size``, with its blocks allocated where the filesystem can: writing into
    allocated blocks spares each page's allocation on the way (a tenth of a 200 MB copy here), and a full
    disk fails the copy before it starts."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


async def copy_large(src: int, st: os.stat_result, dst: int, limiter: trio.CapacityLimiter | None = None,
                     form: str = SHA256) -> str:
    """Copy ``src`` (of ``st``) to ``dst``, a file open for reading and writing; the hash of the copy in ``form``.

    In worker threads from ``limiter`` (two without one): where the hash is by chunks, each thread copies a chunk
    through its buffer, hashing it there, then the next (``copy_chunks``); else the kernel copies chunk n+1 while
    chunk n of the copy is hashed.
    """
    await trio.to_thread.run_sync(allocate, dst, st.st_size, limiter=limiter)
    try:
        if chunked(form, st.st_size):
            digest = await _copy_by_chunks(src, st.st_size, dst, limiter)
        else:
            with mmap.mmap(dst, st.st_size, prot=mmap.PROT_READ) as mapped:
                digest = await _copy_pipelined(src, st.st_size, dst, mapped, limiter)
    except BaseExceptionGroup as group:
        raise _first(group) from None   # (the other thread, if it failed too, failed for the same cause)
    await trio.to_thread.run_sync(look_again, src, st, limiter=limiter, abandon_on_cancel=True)
    return digest


async def _copy_by_chunks(src: int, size: int, dst: int, limiter) -> str:
    digests: list[bytes] = [b""] * len(range(0, size, CHUNK))
    # Shared: each thread takes the next chunk when it is free (next() of these built-in iterators runs whole
    # under the GIL, so no two threads get one chunk).
    pending = iter(enumerate(chunks(size)))
    async with trio.open_nursery() as nursery:
        for _ in range(min(len(digests), int(limiter.total_tokens) if limiter is not None else 2)):
            nursery.start_soon(partial(trio.to_thread.run_sync, copy_chunks, src, dst, pending, digests,
                                       limiter=limiter))
    return root(size, digests)


async def _copy_pipelined(src: int, size: int, dst: int, mapped: mmap.mmap, limiter) -> str:
    hasher = hashlib.sha256()
    last = None
    for offset, count in chunks(size):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.to_thread.run_sync, copy_range, src, dst, offset, count, limiter=limiter))
            if last is not None:
                nursery.start_soon(partial(trio.to_thread.run_sync, hash_range, hasher, mapped, *last,
                                           limiter=limiter))
        last = offset, count
    await trio.to_thread.run_sync(hash_range, hasher, mapped, *last, limiter=limiter)
    return hasher.hexdigest()


def look_again(src: int, before: os.stat_result) -> None:
    """Raises ``Changed`` if ``src`` is longer than it was, or has changed since ``before``. Blocking."""
    if os.pread(src, 1, before.st_size):
        raise Changed   # longer than it was
    unchanged(src, before)


async def ingest(content, files: list[tuple[int, int, os.stat_result]], pinned: list[str],
                 placed: list[tuple[str, int]], limiter: trio.CapacityLimiter, memory: trio.Lock,
                 form: str = SHA256) -> dict[int, str]:
    """Store the contents of checked files ``(index, fd, stat)`` in ``content``; the hash of each in ``form``, by
    index.

    Each hash is pinned (and added to ``pinned``, for the connection to release) before its content is placed;
    ``placed`` gets ``(hash, size)`` of each content once it is in the store, to be recorded even if a later one
    fails. Worker threads are taken from ``limiter``: a file whose reads never return (a user's FUSE mount) holds
    its user's threads, no one else's. ``memory`` (the user's) is held while a group of small files is in memory,
    so that a user's requests on many connections hold one group's worth at a time.
    """
    digests = {}
    for group in groups([file for file in files if file[2].st_size <= SMALL]):
        async with memory:
            read = await trio.to_thread.run_sync(read_small, group, limiter=limiter, abandon_on_cancel=True)
            hashes = [digest for digest, _ in read]
            content.pin(hashes)
            pinned.extend(hashes)
            inline = [(digest, data) for digest, data in read if len(data) <= INLINE_MAX]
            larger = [(digest, data) for digest, data in read if len(data) > INLINE_MAX]
            del read
            # The smallest go into the store's database in one transaction; creating files is most of the cost of
            # the others: two threads create them at once (mostly in different directories).
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_write_inline, content, inline, placed)
                    for half in (larger[::2], larger[1::2]):
                        if half:
                            nursery.start_soon(partial(trio.to_thread.run_sync, content.write_files, half, placed,
                                                       limiter=limiter))
            except BaseExceptionGroup as group:
                raise _first(group) from None
            del inline, larger
        digests.update(zip((index for index, _, _ in group), hashes))
    for index, fd, st in files:
        if st.st_size <= SMALL:
            continue
        tmp_fd, path = content.temporary()
        try:
            try:
                digest = await copy_large(fd, st, tmp_fd, limiter, form)
            finally:
                os.close(tmp_fd)
            content.pin([digest])
            pinned.append(digest)
            await trio.to_thread.run_sync(content.place, [(digest, path)], limiter=limiter)
            placed.append((digest, st.st_size))
        except Changed:
            raise changed(index) from None
        finally:
            path.unlink(missing_ok=True)   # (gone already once placed)
        digests[index] = digest
    return digests


async def _write_inline(content, contents: list[tuple[str, bytes]], placed: list[tuple[str, int]]) -> None:
    await content.small.write(contents)
    placed.extend((digest, len(data)) for digest, data in contents)


def _first(group: BaseExceptionGroup) -> BaseException:
    leaf = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf
