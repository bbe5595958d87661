"""The snapshot a submit carries: a manifest of ``source_directory``'s files by content hash.

Ignore rules, as Azure ML: ``.labrunignore`` if present, else ``.amlignore``, else
``.gitignore``; only the file at the root, gitignore syntax; ``.git`` never. The limits are the agent's
(``[snapshot] max_files`` and ``max_bytes``, Azure ML's 2000 files and 300 MB by default),
checked while walking, before anything is read or sent.

Submitting sends the manifest; the agent answers with the contents it lacks, and only those
are uploaded (``blob_put``). Hashes come from a per-directory cache (``_hashcache``), so an
unchanged file is never read twice. A file whose hash the cache does not know is not read by
the client at all where the agent takes open files (``blob_fds``): it is passed to the agent
open, which copies and hashes it once, and the cache learns the agent's hash.

Hashes are in the form the agent takes (``hash_form``): by chunks for a large file where the agent hashes it so
(``protocol/_content_hash``), so that it can do it on all its cores; plain SHA-256 with an older agent. Each
request that carries hashes says which (``content_hash``); a request that says nothing means SHA-256.
"""

from __future__ import annotations

import os
import stat as stats

from labrun.protocol._content_hash import CHUNKED, SHA256
from labrun.protocol._framing import MAX_FDS_PER_MESSAGE
from labrun.protocol._errors import BadRequest, NotFound

from ._hashcache import HashCache, cache_dir
from .exceptions import AgentUnavailable, SnapshotException

DEFAULT_MAX_FILES = 2000
DEFAULT_MAX_BYTES = 300 * 1024 * 1024
IGNORE_FILES = (".labrunignore", ".amlignore", ".gitignore")
GIT_DIR = ".git"
# Past a limit, files are still counted up to this many more, so the message can say how far over it is.
MAX_COUNTED_FILES = 100_000
# One blob_put carries up to this much content (the frame limit is 16 MiB); bigger files go in chunks.
UPLOAD_CHUNK = 8 * 1024 * 1024
# Open files one blob_fds passes, at most: a blob_fds frame has a byte for each MAX_FDS_PER_MESSAGE of them.
PASS_BATCH = 16 * MAX_FDS_PER_MESSAGE
# A manifest entry's or a carried content's bytes in a frame, beyond its name or data: its hash, size, mode, keys.
ENTRY_BYTES = 96
_IN_PLACE_HINT = ("; exclude files with a .labrunignore (or .amlignore/.gitignore) file, or run in the source "
                  "directory itself: `labrun run --in-place`, or ScriptRunConfig(..., snapshot=False)")


def ignore_spec(root: str):
    """The root ignore file's rules as a ``pathspec.GitIgnoreSpec``, or None when there is no ignore file."""
    for name in IGNORE_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            import pathspec   # slow to import: only when there are rules to match

            with open(path, errors="replace") as f:
                return pathspec.GitIgnoreSpec.from_lines(f.read().splitlines())
    return None


def collect_files(root: str | os.PathLike, max_files: int = DEFAULT_MAX_FILES,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> list[tuple[str, str, os.stat_result]]:
    """``(name in the snapshot, path, stat)`` of every file to snapshot after the ignore rules, sorted by name.

    Symbolic links to files count as the file they point to; sockets, broken links,
    unreadable files and unreadable directories are skipped, as Azure ML does. ``.git`` is never taken, whatever the ignore
    files say (as Azure ML).

    Raises:
        SnapshotException: the directory is missing, a name is not UTF-8, or the tree is over the limits;
            then the message gives the count, the directories holding the most, and the ways out.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise SnapshotException(f"source_directory {root!r} is not a directory")
    spec = ignore_spec(root)
    files, total = [], 0
    # Per top-level entry: [files, bytes], to say where an over-limit tree's weight is.
    weight: dict[str, list[int]] = {}
    pending = [("", root)]
    while pending and len(files) <= max_files + MAX_COUNTED_FILES:
        rel_dir, directory = pending.pop()
        try:
            listing = os.scandir(directory)
        except OSError as exc:
            if not rel_dir:
                raise SnapshotException(f"cannot read source_directory {root!r}: {exc.strerror}") from None
            continue   # an unreadable directory is skipped, as unreadable files are
        with listing as entries:
            for entry in entries:
                rel = rel_dir + entry.name
                if entry.name == GIT_DIR:
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):   # links to directories are not followed, as os.walk
                        if spec is None or not spec.match_file(rel + "/"):
                            pending.append((rel + "/", entry.path))
                        continue
                    if spec is not None and spec.match_file(rel):
                        continue
                    st = entry.stat()
                except OSError:
                    continue
                if not stats.S_ISREG(st.st_mode):
                    continue
                try:
                    rel.isascii() or rel.encode("utf-8")
                except UnicodeEncodeError:
                    raise SnapshotException(f"file name {rel.encode('utf-8', 'surrogateescape')!r} in {root} is not "
                                            "UTF-8; rename it or exclude it with a .labrunignore file") from None
                files.append((rel, entry.path, st))
                total += st.st_size
                top = weight.setdefault(rel.split("/")[0] + ("/" if "/" in rel else ""), [0, 0])
                top[0] += 1
                top[1] += st.st_size
    if len(files) > max_files:
        count = f"{len(files):,}" + ("+" if len(files) > max_files + MAX_COUNTED_FILES else "")
        raise SnapshotException(f"While attempting to take snapshot of {root}\nYour project has {count} files, more "
                                f"than {max_files} files; the most are in "
                                f"{_heaviest(weight, 0, lambda n: f'{n:,} files')}" + _IN_PLACE_HINT)
    if total > max_bytes:
        raise SnapshotException(f"While attempting to take snapshot of {root}\nYour total snapshot size is "
                                f"{total / 1e6:.1f} MB and exceeds the limit of {max_bytes / 1024 / 1024:.1f} MB; "
                                f"the largest are {_heaviest(weight, 1, lambda n: f'{n / 1e6:.1f} MB')}"
                                + _IN_PLACE_HINT)
    files.sort()
    return files


def _heaviest(weight: dict[str, list[int]], key: int, unit) -> str:
    top = sorted(weight.items(), key=lambda item: item[1][key], reverse=True)[:3]
    return ", ".join(f"{name} ({unit(counts[key])})" for name, counts in top)


def hash_form(connection) -> str:
    """The form of content hash to use with the agent of ``connection``: by chunks where it takes them."""
    return CHUNKED if CHUNKED in (connection.agent.get("content_hashes") or ()) else SHA256


def _declared(form: str) -> dict:
    """The argument that says a request's hashes are in ``form`` (none for SHA-256: older agents know no other)."""
    return {} if form == SHA256 else {"content_hash": form}


def build_manifest(root: str | os.PathLike, max_files: int = DEFAULT_MAX_FILES,
                   max_bytes: int = DEFAULT_MAX_BYTES, connection=None,
                   form: str = SHA256) -> tuple[list[list], dict[str, str]]:
    """The manifest ``[[name, size, mode, hash], ...]``, with hashes in ``form``, and, for uploads, the path of
    each hash's file.

    With ``connection`` (to an agent that takes open files), a file whose hash is not cached is not read here:
    it is passed to the agent open, which stores and hashes its content, and the cache learns that hash.
    """
    manifest, paths, cache, _ = _build_manifest(root, max_files, max_bytes, connection, form)
    cache.save()
    return manifest, paths


def _build_manifest(root, max_files: int, max_bytes: int, connection, form: str,
                    carried: dict | None = None) -> tuple[list[list], dict[str, str], HashCache, list[dict]]:
    """``build_manifest``, with the hash cache still to be saved, and the contents a submit carries itself.

    ``carried``: the agent's ``submit_contents`` limits (``max_size``, ``max_bytes``), where the manifest is for a
    submit to an agent that takes them: the files whose hash is not cached and that are small enough are read and
    hashed here, to go with the submit (``contents``), rather than passed open, a request of their own before it.
    """
    files = collect_files(root, max_files, max_bytes)
    cache = HashCache(os.fspath(root), form)
    # The hash cache itself changes while a tree that holds it (a home directory) is submitted: never part of it.
    own = os.path.relpath(os.path.realpath(cache_dir()), os.path.realpath(root)) + os.sep
    manifest, paths, unknown = [], {}, []
    for rel, path, st in files:
        if rel.startswith(own):
            continue
        entry = [rel, st.st_size, st.st_mode & 0o777, cache.cached(rel, st)]
        manifest.append(entry)
        if entry[3] is None:
            unknown.append((entry, path, st))
        else:
            paths.setdefault(entry[3], path)
    contents = []
    if carried and unknown:
        # They share the submit's frame with the manifest: what it takes is not theirs.
        room = carried["max_bytes"] - sum(len(entry[0].encode("utf-8", "surrogateescape")) + ENTRY_BYTES
                                          for entry in manifest)
        contents, unknown = _read_small(unknown, cache, paths, carried["max_size"], room)
    if unknown and connection is not None:
        try:
            for i, stored, st in pass_files(connection, [path for _, path, _ in unknown], form):
                entry, path, _ = unknown[i]
                entry[1], entry[3] = stored["size"], stored["hash"]
                paths.setdefault(entry[3], path)
                if st is not None:
                    cache.learn(entry[0], st, entry[3])
            unknown = []
        except FilesNotPassed:
            pass   # hashed here, and uploaded as bytes
    for entry, path, st in unknown:
        if entry[3] is None and os.access(path, os.R_OK):   # unreadable: skipped, as Azure ML does
            try:
                entry[3] = cache.digest(entry[0], path, st)
            except OSError as exc:
                raise SnapshotException(f"cannot read {path}: {exc.strerror or exc}") from None
            paths.setdefault(entry[3], path)
    return [entry for entry in manifest if entry[3] is not None], paths, cache, contents   # less what was unreadable


def _read_small(unknown: list, cache: HashCache, paths: dict[str, str], max_size: int,
                max_bytes: int) -> tuple[list[dict], list]:
    """Read and hash the files of ``unknown`` (``(entry, path, stat)``) up to ``max_size`` bytes each and
    ``max_bytes`` in all (with ``ENTRY_BYTES`` each for the rest of an item), filling in their entries; their contents,
    and the files left (larger, or past the total).

    Raises:
        SnapshotException: a file changed while it was read.
    """
    import hashlib

    contents, left, total, carried = [], [], 0, set()
    for entry, path, st in unknown:
        if st.st_size > max_size or total + st.st_size + ENTRY_BYTES > max_bytes:
            left.append((entry, path, st))
            continue
        found = _open_regular(path)
        if found is None:
            continue
        fd, opened = found
        try:
            data = os.read(fd, opened.st_size + 1) if opened.st_size <= max_size else b""
        except OSError as exc:
            raise SnapshotException(f"cannot read {path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
        if len(data) != opened.st_size or opened.st_size > max_size:
            raise SnapshotException(f"{path} changed while it was being submitted; submit again")
        digest = hashlib.sha256(data).hexdigest()
        entry[1], entry[3] = len(data), digest
        paths.setdefault(digest, path)
        cache.learn(entry[0], opened, digest)
        if digest not in carried:   # (two files, one content: carried once)
            carried.add(digest)
            contents.append({"hash": digest, "data": data})
            total += len(data) + ENTRY_BYTES
    return contents, left


def _open_regular(path: str) -> tuple[int, os.stat_result] | None:
    """An fd on the file at ``path`` and its ``fstat``; None if this user cannot read it or it is no longer a
    regular file (skipped, as by the walk and as Azure ML does).

    Raises:
        SnapshotException: it cannot be opened for another reason (gone, say).
    """
    try:
        # Non-blocking: should the file have become a FIFO since the walk, opening it does not hang.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except PermissionError:
        return None
    except OSError as exc:
        raise SnapshotException(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise SnapshotException(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stats.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


class FilesNotPassed(Exception):
    """The agent got none of the open files passed to it (something between, a proxy, forwards bytes only), or
    refused one for its filesystem: the client sends bytes instead."""


def pass_files(connection, paths: list[str], form: str):
    """Pass files to the agent open (``blob_fds``), which copies them into its store and hashes them (in ``form``).

    Yields ``(index in paths, {"hash", "size"}, stat)`` for each file passed; ``stat`` is the file's when it was
    opened, or None when the agent found another size (then not to be cached). The agent refuses a file that
    changes while it copies it; one that changed between the opening and the copy has a new mtime, so its cache
    entry, keyed by the old one, is never used. Files this user cannot read, or no longer regular files, are
    skipped, as by the walk.

    Raises:
        SnapshotException: a file vanished or changed while it was being passed.
    """
    # One request for them all where the agent allows it: each request waits for the agent's commit.
    batch = max(1, min(connection.agent["blob_fds"], PASS_BATCH))
    for start in range(0, len(paths), batch):
        opened: list[tuple[int, int, os.stat_result]] = []
        try:
            for i in range(start, min(start + batch, len(paths))):
                found = _open_regular(paths[i])
                if found is not None:
                    opened.append((i, *found))
            if not opened:
                continue
            try:
                stored = connection.call_passing("blob_fds", [fd for _, fd, _ in opened], count=len(opened),
                                                 **_declared(form))["files"]
            except BadRequest as exc:
                # Not on this connection (a proxy forwards bytes only), or a file on a filesystem the agent does not
                # read for users (FUSE): bytes from now on.
                if exc.details.get("field") == "args.count" or exc.details.get("reason") == "filesystem":
                    connection.agent["blob_fds"] = 0
                    raise FilesNotPassed from None
                index = exc.details.get("index")
                if exc.details.get("reason") != "changed" or index is None or index >= len(opened):
                    raise
                raise SnapshotException(f"{paths[opened[index][0]]} changed while it was being submitted; "
                                        "submit again") from None
            for (i, _, st), got in zip(opened, stored):
                yield i, got, st if got["size"] == st.st_size else None
        finally:
            for _, fd, _ in opened:
                os.close(fd)
def submit_spec(workspace, spec: dict, source_directory, *, in_place: bool = False, array: dict | None = None) -> dict:
    """Submit ``spec`` with the snapshot of ``source_directory`` (or, ``in_place``, to run in it); returns the run.

    The CLI's path as well as ``Experiment.submit``'s: it imports neither ``Run`` nor the config classes.
    With ``array`` (``indices``, ``throttle``): one run per index; returns ``{"array_id", "runs"}``.

    The submit carries a fresh idempotency key. If the connection is lost before the reply (the agent
    restarted, say), it is sent once more on a new connection with the same key: the agent returns the
    run it already made, or makes it if it had not.
    """
    extra = {"idempotency_key": os.urandom(16).hex()}
    if array is not None:
        extra["array"] = array
    try:
        return _submit_once(workspace.connection, spec, source_directory, in_place, extra)
    except AgentUnavailable:
        if workspace._socket is None:
            raise
        workspace._reconnect()
        return _submit_once(workspace.connection, spec, source_directory, in_place, extra)


def _submit_once(connection, spec: dict, source_directory, in_place: bool, extra: dict) -> dict:
    if in_place:
        spec["snapshot"] = {"in_place": os.path.abspath(source_directory)}
        return connection.call("submit", spec=spec, **extra)
    return _submit_manifest(connection, spec, source_directory, extra)


def _submit_manifest(connection, spec: dict, root: str | os.PathLike, extra: dict) -> dict:
    manifest, paths, cache, contents = _agent_manifest(connection, root, connection.agent.get("submit_contents"))
    spec["snapshot"] = {"files": manifest}
    args = {**extra, "contents": contents} if contents else dict(extra)

    def submit():
        try:
            return connection.call("submit", spec=spec, **args)
        finally:
            args.pop("contents", None)   # kept on this connection by the first try: a retry need not carry them

    try:
        return call_uploading(connection, manifest, paths, submit)
    finally:
        cache.save()   # after the submit: not on the way to its reply (a 2,000-file cache takes 1-4 ms to write)


def agent_manifest(connection, root: str | os.PathLike) -> tuple[list[list], dict[str, str]]:
    """``build_manifest`` within the limits of the agent at the other end of ``connection``."""
    manifest, paths, cache, _ = _agent_manifest(connection, root)
    cache.save()
    return manifest, paths


def _agent_manifest(connection, root: str | os.PathLike,
                    carried: dict | None = None) -> tuple[list[list], dict[str, str], HashCache, list[dict]]:
    limits = connection.agent.get("snapshot") or {}
    return _build_manifest(root, limits.get("max_files", DEFAULT_MAX_FILES),
                           limits.get("max_bytes", DEFAULT_MAX_BYTES),
                           connection if connection.agent.get("blob_fds") else None, hash_form(connection), carried)


def call_uploading(connection, manifest: list[list], paths: dict[str, str], call):
    """``call()`` (a request carrying ``manifest``), after uploading on ``connection`` the contents the agent lacks.

    The uploads and the request go over the same connection: the agent keeps what a connection uploaded until
    it closes, so a request on another could find the contents gone again.
    """
    sizes = {entry[3]: entry[1] for entry in manifest}
    uploaded: set[str] = set()
    while True:
        try:
            return call()
        except NotFound as exc:
            # A long list comes in parts; asked for the same content twice, something else is wrong.
            missing = exc.details.get("missing")
            if not missing or uploaded.intersection(missing) or not set(missing) <= sizes.keys():
                raise
            upload(connection, [(digest, paths[digest], sizes[digest]) for digest in missing])
            uploaded.update(missing)


def upload(connection, blobs: list[tuple[str, str, int]]) -> None:
    """Send contents (named in ``hash_form``) to the agent: as open files where it takes them; else small ones
    several to a request, large ones in chunks."""
    form = hash_form(connection)
    if connection.agent.get("blob_fds"):
        try:
            for i, stored, _ in pass_files(connection, [path for _, path, _ in blobs], form):
                if stored["hash"] != blobs[i][0]:
                    raise SnapshotException(f"{blobs[i][1]} changed while it was being submitted; submit again")
            return
        except FilesNotPassed:
            pass
    batch, batch_bytes = [], 0

    def flush():
        nonlocal batch, batch_bytes
        if batch:
            connection.call("blob_put", blobs=batch, **_declared(form))
            batch, batch_bytes = [], 0

    for digest, path, size in blobs:
        try:
            with open(path, "rb") as f:
                offset = 0
                while True:
                    data = f.read(UPLOAD_CHUNK)
                    if offset + len(data) > size or (not data and offset < size):
                        raise SnapshotException(f"{path} changed while it was being submitted; submit again")
                    if batch_bytes + len(data) > UPLOAD_CHUNK:
                        flush()
                    batch.append({"hash": digest, "size": size, "offset": offset, "data": data})
                    batch_bytes += len(data)
                    offset += len(data)
                    if offset == size:
                        break
        except OSError as exc:
            raise SnapshotException(f"cannot read {path}: {exc.strerror or exc}") from None
    flush()
