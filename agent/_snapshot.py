"""Content-addressed snapshots: the store of file contents, uploads into it, and runs' copies out of it.

``<state>/cas/objects/<2 hex>/<hash>`` holds each distinct file content once (root's,
0400, in a 0700 directory), but for the smallest (up to ``_small.INLINE_MAX``) passed open (``blob_fds``) or
carried by a submit, which are rows of ``cas/small.db`` (``_small``: creating a file costs more than storing them
there); every reader looks in both places. ``cas/tmp/`` holds uploads in progress. A hash is a content's name in either form
of ``protocol/_content_hash`` (its SHA-256, or by chunks for a large one): one content may be stored under both
names, never two contents under one. The database
(tables ``cas_*`` in the store) knows each blob's size and reference count, which users
have proven they hold its content (by uploading it: a hash alone never grants a content),
each distinct manifest (a *tree*) and which run uses which tree.

A submit names its files by hash. What the submitting user does not hold is answered as
``not_found`` with ``details.missing``; the client uploads exactly those (``blob_put``), each
checked against its hash before it enters the store, and submits again. A client may instead
pass files open (``blob_fds``): the agent copies them in and answers their hashes (``_ingest``).
The run's
``snapshot/`` directory is made when it starts (``materialize``): by reflink where the
filesystem can, by copy otherwise, never by hard link, so a run writing into its snapshot
cannot change the store. References are released with the run (``release_snapshot``), and a
content no tree uses and no connection is uploading is deleted.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import shutil
import sqlite3
from collections import Counter
from pathlib import Path

from labrun.protocol import BadRequest, NotFound, TooLarge
from labrun.protocol._content_hash import SHA256, Hasher
from labrun.protocol._manifest import tree_hash

from ._asuser import AsUserFailed, Credentials, as_user, needs_switch
from ._small import INLINE_MAX, SmallContents

FICLONE = 0x40049409
# Errors that mean "this filesystem (pair) cannot reflink": copy instead.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
# Uploads in progress per connection: enough for any client that sends files in order.
MAX_OPEN_UPLOADS = 64
# Hashes named in one "missing" answer, so that the answer fits in a frame; the client asks again for the rest.
MAX_MISSING = 50_000
COPY_CHUNK = 1 << 30
# A snapshot this close to a limit gets a warning (``get_details()["warnings"]``).
NEAR_LIMIT = 0.8
# A run's snapshot is made in batches holding at most this much of the small contents in memory at once.
MATERIALIZE_BATCH = 8 << 20


class SnapshotFailed(Exception):
    """A run's snapshot could not be made (the message says why)."""


class _Upload:
    __slots__ = ("size", "form", "received", "hasher", "fd", "path")

    def __init__(self, size: int, form: str, fd: int | None, path: Path | None):
        self.size, self.form, self.received, self.fd, self.path = size, form, 0, fd, path
        self.hasher = Hasher(form, size)


class ContentStore:
    def __init__(self, root: Path, store, max_files: int, max_bytes: int):
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.store = store
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._pins: Counter[str] = Counter()   # contents live connections are uploading or have uploaded
        for path in (root, self.objects, self.tmp):
            path.mkdir(mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
        if not (self.objects / "ff").is_dir():   # made once: no mkdir per upload
            for i in range(256):
                (self.objects / f"{i:02x}").mkdir(mode=0o700, exist_ok=True)
        for stale in self.tmp.iterdir():
            stale.unlink(missing_ok=True)
        self.small = SmallContents(root / "small.db", keep=lambda digest: self._pins[digest] > 0)
        # No connection survives a restart: what no tree uses is garbage now, and so is what a killed agent
        # had stored but not recorded yet.
        self._delete(self.store.cas_unreferenced())
        self.small.sweep(self.store.path)

    def blob_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest

    # -- submit --------------------------------------------------------------------------

    def check_limits(self, entries: list[tuple]) -> None:
        """Raises ``TooLarge`` if a validated manifest is over the configured number of files or bytes."""
        if len(entries) > self.max_files:
            raise TooLarge(f"snapshot has {len(entries)} files; this agent's limit is {self.max_files} "
                           "([snapshot] max_files); run in place (labrun run --in-place, "
                           "ScriptRunConfig(snapshot=False)) for big trees")
        total = sum(e[1] for e in entries)
        if total > self.max_bytes:
            raise TooLarge(f"snapshot is {total / 1e6:.1f} MB; this agent's limit is {self.max_bytes / 1e6:.1f} MB "
                           "([snapshot] max_bytes); run in place (labrun run --in-place, "
                           "ScriptRunConfig(snapshot=False)) for big trees")

    def check(self, uid: int, entries: list[tuple]) -> str:
        """The tree of a validated manifest, if ``uid`` holds all of its contents.

        Raises:
            TooLarge: over the configured number of files or bytes.
            NotFound: with ``details.missing``, the hashes to upload first.
            BadRequest: a declared size differs from the stored content's.
        """
        self.check_limits(entries)
        tree = tree_hash(entries)
        if self.store.cas_tree_held(uid, tree):
            return tree
        declared = {e[3]: e for e in entries}
        held = self.store.cas_blobs_held(uid, list(declared))
        for digest, size in held.items():
            if declared[digest][1] != size:
                raise BadRequest(f"spec.snapshot.files: {declared[digest][0]!r} is declared as {declared[digest][1]} "
                                 f"bytes, but content {digest} has {size}", details={"field": "spec.snapshot.files"})
        missing = sorted(set(declared) - set(held))
        if missing:
            raise NotFound(f"spec.snapshot.files: {len(missing)} contents are not in the agent's store yet; "
                           "upload them with blob_put",
                           details={"field": "spec.snapshot.files", "missing": missing[:MAX_MISSING]})
        return tree

    def acquire(self, run_id: str, uid: int, tree: str, entries: list[tuple]) -> None:
        """Record that ``run_id`` uses ``tree`` (checked by ``check`` just before, with no await between)."""
        self.store.cas_acquire(run_id, uid, tree, entries)

    def release_snapshot(self, run_id: str) -> None:
        """Drop the run's reference to its snapshot's contents; contents nothing else uses are deleted.

        Idempotent: for retention, ``labrun rm`` and failed submits alike.
        """
        self._delete(self.store.cas_release(run_id))

    def entries(self, run_id: str) -> list[tuple] | None:
        return self.store.cas_tree_of(run_id)

    def near_limits(self, entries: list[tuple]) -> str | None:
        """A warning for a snapshot close to this agent's limits (the next, slightly bigger, will be refused)."""
        files, total = len(entries), sum(e[1] for e in entries)
        if files >= NEAR_LIMIT * self.max_files:
            return (f"Snapshot: {files} files, near this agent's limit of {self.max_files} ([snapshot] max_files); "
                    "add what the run does not need to .labrunignore (or .amlignore), or run in place.")
        if total >= NEAR_LIMIT * self.max_bytes:
            return (f"Snapshot: {total / 1e6:.1f} MB, near this agent's limit of {self.max_bytes / 1e6:.1f} MB "
                    "([snapshot] max_bytes); add what the run does not need to .labrunignore (or .amlignore), "
                    "or run in place.")
        return None

    def open_content(self, digest: str, size: int) -> int:
        """An fd on a stored content of ``size`` bytes (named by a hash from the database): the agent's own
        file, or a memory file holding a small content kept in ``small.db``.

        Raises:
            SnapshotFailed: the content is in neither place.
        """
        if 0 < size <= INLINE_MAX:
            data = _read_small(self, [digest]).get(digest)
            if data is not None:
                fd = os.memfd_create(f"content-{digest[:16]}", os.MFD_CLOEXEC)
                try:
                    _write_all(fd, data)
                except BaseException:
                    os.close(fd)
                    raise
                return fd
        return _open_blob(self.objects, digest)

    def _delete(self, digests) -> None:
        doomed = [d for d in digests if not self._pins[d]]
        for digest in doomed:
            self.blob_path(digest).unlink(missing_ok=True)
        self.store.cas_forget(doomed)
        self.small.forget(doomed)   # (then, in a worker thread: after the state database, under the write lock)

    # -- uploads -------------------------------------------------------------------------

    def begin(self, uploads: dict, blob: dict, form: str = SHA256) -> _Upload:
        """The upload a ``blob_put`` chunk continues (a new one at offset 0); its hash is in ``form``."""
        digest, size, offset = blob["hash"], blob["size"], blob["offset"]
        if size > self.max_bytes:
            raise TooLarge(f"blob_put: a content of {size} bytes is over this agent's snapshot limit "
                           f"of {self.max_bytes} bytes")
        upload = uploads.get(digest)
        if upload is None:
            if offset != 0:
                raise BadRequest(f"blob_put: no upload of {digest} in progress; start at offset 0",
                                 details={"field": "args.blobs.offset"})
            if len(uploads) >= MAX_OPEN_UPLOADS:
                raise TooLarge(f"blob_put: more than {MAX_OPEN_UPLOADS} unfinished uploads on this connection")
            if self.store.cas_blob_size(digest) is not None:
                upload = _Upload(size, form, None, None)   # stored already: only the proof of holding it is missing
            else:
                path = self.tmp / f"{digest}.{os.urandom(8).hex()}"
                upload = _Upload(size, form, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400),
                                 path)
            uploads[digest] = upload
            self.pin([digest])   # from now on, nobody's release deletes the stored copy it relies on
        elif size != upload.size:
            raise BadRequest(f"blob_put: {digest} was started with size {upload.size}, not {size}",
                             details={"field": "args.blobs.size"})
        elif form != upload.form:
            raise BadRequest(f"blob_put: {digest} was started with content_hash {upload.form!r}, not {form!r}",
                             details={"field": "args.content_hash"})
        return upload

    @staticmethod
    def receive(upload: _Upload, blob: dict) -> bool:
        """Write and hash one chunk (blocking: large chunks go through a worker thread).

        Returns whether the content is complete and matches its hash; raises ``BadRequest`` otherwise
        (the caller then aborts the upload).
        """
        digest, offset, data = blob["hash"], blob["offset"], blob["data"]
        if offset != upload.received:
            raise BadRequest(f"blob_put: {digest} continues at offset {upload.received}, not {offset}",
                             details={"field": "args.blobs.offset"})
        if upload.received + len(data) > upload.size:
            raise BadRequest(f"blob_put: {digest} has more than its declared {upload.size} bytes",
                             details={"field": "args.blobs.data"})
        upload.hasher.update(data)
        if upload.fd is not None:
            _write_all(upload.fd, data)
        upload.received += len(data)
        if upload.received < upload.size:
            return False
        if upload.hasher.hexdigest() != digest:
            raise BadRequest(f"blob_put: the content sent does not match its hash {digest}",
                             details={"field": "args.blobs.data"})
        return True

    def commit(self, uploads: dict, digest: str) -> int:
        """A verified upload enters the store (unless it was there already); returns its size.

        ``record`` it with the others of the same request afterwards: one transaction for them all.
        """
        upload = uploads.pop(digest)
        if upload.fd is not None:
            os.close(upload.fd)
            upload.fd = None
            os.replace(upload.path, self.blob_path(digest))
        return upload.size   # still pinned: until the connection closes (``end_session``)

    def record(self, uid: int, blobs: list[tuple[str, int]]) -> None:
        """``uid`` has proven it holds these contents (``(hash, size)``, committed just before)."""
        self.store.cas_add_blobs(blobs, uid)

    def abort(self, uploads: dict, digest: str) -> None:
        upload = uploads.pop(digest, None)
        if upload is None:
            return
        self._pins -= Counter([digest])
        if upload.fd is not None:
            os.close(upload.fd)
            upload.path.unlink(missing_ok=True)

    def end_session(self, uploads: dict, pinned: list[str]) -> None:
        """A connection closed: its unfinished uploads go, and what it uploaded but never used is collected."""
        unfinished = list(uploads)
        for digest in unfinished:
            self.abort(uploads, digest)
        self._pins -= Counter(pinned)
        self._delete(self.store.cas_unreferenced(pinned + unfinished))

    # -- contents from open files (blob_fds) ----------------------------------------------

    def temporary(self) -> tuple[int, Path]:
        """A new file of the agent's in ``tmp/``, open for reading and writing."""
        path = self.tmp / f"fd.{os.urandom(8).hex()}"
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400), path

    def write_files(self, contents: list[tuple[str, bytes]], placed: list[tuple[str, int]]) -> None:
        """Write hashed, pinned contents to their files in the store, adding ``(hash, size)`` of each to ``placed``.
        Blocking.

        Created there at once (no rename): nothing reads a content before the database has it, which is after
        this returns. A file already there (stored, being written by another connection, or half-written
        before a crash) is replaced whole by rename, never rewritten in place under a reader.
        """
        for digest, data in contents:
            try:
                fd = os.open(self.blob_path(digest), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o400)
            except FileExistsError:
                fd, path = self.temporary()
                try:
                    try:
                        _write_all(fd, data)
                    finally:
                        os.close(fd)
                    self.place([(digest, path)])
                except BaseException:
                    path.unlink(missing_ok=True)
                    raise
            else:
                try:
                    # On a failed write (a full disk) the part written stays: the database does not know it, and the
                    # next writer of this content replaces it. Removing it could remove that writer's whole copy.
                    _write_all(fd, data)
                finally:
                    os.close(fd)
            placed.append((digest, len(data)))

    def pin(self, digests: list[str]) -> None:
        """Keep these contents from collection until ``end_session`` releases them (before they are placed)."""
        self._pins.update(digests)
        self.small.pinned(digests)

    def place(self, copies: list[tuple[str, Path]]) -> None:
        """Move copies, hashed and pinned, to their place in the store. Blocking."""
        for digest, path in copies:
            os.replace(path, self.blob_path(digest))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# -- a run's copy ----------------------------------------------------------------------------

def materialize(content: ContentStore, entries: list[tuple], run_dir: Path, credentials: Credentials) -> str:
    """Create ``run_dir/snapshot`` with ``entries`` (and an empty ``outputs/``), as the run's user.

    The one function that writes a run's snapshot. The run directory and the store's contents are
    opened (and small contents read) here with the agent's rights; everything under ``snapshot/`` is
    created by ``as_user`` with the user's, so it is theirs and no link they plant is followed as root.
    Done in batches (``batches``), so that at most ``MATERIALIZE_BATCH`` bytes of small contents are in
    memory at once. Returns ``"reflink"`` or ``"copy"`` (how the contents kept as files were placed; a small
    content kept in the database is written). Blocking.

    Raises:
        SnapshotFailed: naming the file or content that could not be placed.
    """
    switch = needs_switch(credentials.uid)
    method = ["reflink"]
    dirs: dict[str, int] = {}
    run_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    parts = batches(entries, MATERIALIZE_BATCH)
    try:
        if switch:
            # Once it is the user, the thread cannot open root's store: it is given each content's fd.
            most = max(len({e[3] for e in batch if e[1]}) for batch in parts)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft < most + 64:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, most + 64)), hard))
        for number, batch in enumerate(parts):
            inline = _read_small(content, sorted({e[3] for e in batch if 0 < e[1] <= INLINE_MAX}))
            opened: dict[str, int] = {}
            try:
                if switch:
                    for digest in sorted({e[3] for e in batch if e[1]} - inline.keys()):
                        opened[digest] = _open_blob(content.objects, digest)

                def source(digest: str) -> int | bytes:
                    found = inline.get(digest)
                    if found is not None:
                        return found
                    return opened[digest] if switch else _open_blob(content.objects, digest)

                def work() -> None:
                    if number == 0:
                        _start(run_fd, dirs)
                    _fill(dirs, batch, source, method, close=not switch)

                try:
                    as_user(credentials, work)
                except AsUserFailed as exc:
                    raise SnapshotFailed(f"cannot make the run's snapshot: {exc}") from None
            finally:
                for fd in opened.values():
                    os.close(fd)
                del inline
        try:
            as_user(credentials, lambda: _finish(dirs))
        except AsUserFailed as exc:
            raise SnapshotFailed(f"cannot make the run's snapshot: {exc}") from None
    finally:
        for fd in dirs.values():
            os.close(fd)
        os.close(run_fd)
    return method[0] if any(e[1] for e in entries) else "empty"


def batches(entries: list[tuple], limit: int) -> list[list[tuple]]:
    """``entries`` in order, cut so that the small contents (kept in the database) of each part add up to at most
    ``limit`` bytes (or one content); an empty tree is one empty part (its snapshot directory is still made)."""
    parts: list[list[tuple]] = [[]]
    held = 0
    for entry in entries:
        size = entry[1] if 0 < entry[1] <= INLINE_MAX else 0
        if held + size > limit and parts[-1]:
            parts.append([])
            held = 0
        parts[-1].append(entry)
        held += size
    return parts


def _read_small(content: ContentStore, digests: list[str]) -> dict[str, bytes]:
    try:
        return content.small.read(digests)
    except sqlite3.Error as exc:
        raise SnapshotFailed(f"cannot read the agent's store of small contents: {exc}") from None


def _open_blob(objects: Path, digest: str) -> int:
    try:
        return os.open(objects / digest[:2] / digest, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SnapshotFailed(f"content {digest} is missing from the agent's store") from None


def _start(run_fd: int, dirs: dict[str, int]) -> None:
    try:
        os.mkdir("snapshot", 0o755, dir_fd=run_fd)
    except FileExistsError:   # an earlier agent stopped while making it: start again
        shutil.rmtree("snapshot", dir_fd=run_fd)
        os.mkdir("snapshot", 0o755, dir_fd=run_fd)
    dirs[""] = os.open("snapshot", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=run_fd)


def _finish(dirs: dict[str, int]) -> None:
    try:
        os.mkdir("outputs", 0o755, dir_fd=dirs[""])
    except FileExistsError:
        pass


def _fill(dirs: dict[str, int], entries: list[tuple], source, method: list, *, close: bool) -> None:
    """Create ``entries`` under the snapshot directory ``dirs[""]`` (``dirs``: the directories open so far, by path).

    ``source(hash)``: a small content's bytes, or an fd on its file (closed here if ``close``).
    """
    for path, size, mode, digest in entries:
        parent, _, name = path.rpartition("/")
        parent_fd = dirs.get(parent)
        if parent_fd is None:
            parent_fd = _make_dirs(dirs, parent)
        # Made with its mode at once (the snapshot is in the owner's 0700 run directory, so no one else
        # sees it meanwhile); a chmod, a second metadata write, only where the umask took bits away.
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                     dir_fd=parent_fd)
        try:
            if size:
                found = source(digest)
                if isinstance(found, bytes):
                    if len(found) != size:
                        raise OSError(errno.EIO, f"the stored content of {path!r} is not its {size} bytes")
                    _write_all(fd, found)
                else:
                    try:
                        _place(found, fd, size, method, path)
                    finally:
                        if close:
                            os.close(found)
            if os.fstat(fd).st_mode & 0o7777 != mode:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _make_dirs(dirs: dict, parent: str) -> int:
    above, _, name = parent.rpartition("/")
    above_fd = dirs.get(above)
    if above_fd is None:
        above_fd = _make_dirs(dirs, above)
    try:
        os.mkdir(name, 0o755, dir_fd=above_fd)
    except FileExistsError:
        pass
    fd = dirs[parent] = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=above_fd)
    return fd


def _place(source: int, target: int, size: int, method: list, path: str) -> None:
    """Reflink ``source`` into ``target``, or copy it in the kernel once the filesystem has said it cannot."""
    if method[0] == "reflink":
        try:
            fcntl.ioctl(target, FICLONE, source)
            return
        except OSError as exc:
            if exc.errno not in _NO_REFLINK:
                raise
            method[0] = "copy"
    offset = 0
    while offset < size:
        try:
            copied = os.copy_file_range(source, target, min(size - offset, COPY_CHUNK), offset, offset)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = os.sendfile(target, source, offset, min(size - offset, COPY_CHUNK))
        if copied == 0:
            raise OSError(errno.EIO, f"the stored content of {path!r} is shorter than its {size} bytes")
        offset += copied
