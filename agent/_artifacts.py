"""A run's files, under the names Azure ML users know, and the one place those names are checked.

- ``outputs/<path>``: the run's ``./outputs`` (``<run dir>/snapshot/outputs``);
- ``user_logs/<name>``: its logs (``<run dir>/logs``: ``std_log.txt``, ``std_log_process_<rank>.txt``,
  ``environment_build.txt``);
- anything else: files the run uploaded (``<run dir>/artifacts/<name>``).

Every name a client sends (downloads, uploads, log names, ``resume_from``) goes through ``parse_name``:
a plain relative path of non-empty components, none of them ``.`` or ``..``, with no NUL or control
character. The files themselves are in a tree the run's user controls, so every open here runs with
the owner's rights (``_asuser.run_as``) and follows no symlink (``_asuser.open_beneath``): a link
the run planted, or swapped in after a check, is refused, never followed.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from labrun.protocol import AgentError, BadRequest, Conflict, Forbidden, NotFound, Unavailable

from ._asuser import Credentials, make_dirs_beneath, open_beneath, open_directory, open_file_as, run_as
from ._faults import DISK_ERRNOS

OUTPUTS = "outputs/"
LOGS = "user_logs/"
# name prefix -> directory under the run directory
AREAS = ((OUTPUTS, "snapshot/outputs"), (LOGS, "logs"), ("", "artifacts"))
MAX_NAME = 4096
MAX_COMPONENT = 255


def parse_name(name: str, field: str = "name") -> tuple[str, str]:
    """``(directory under the run dir, path under it)`` for a file name, or ``BadRequest`` naming the problem."""
    def refuse(problem: str):
        return BadRequest(f"{field}: file name {name!r} {problem}", details={"field": field})

    if not isinstance(name, str) or not name:
        raise refuse("is empty")
    if len(name) > MAX_NAME:
        raise refuse(f"is longer than {MAX_NAME} characters")
    if "\0" in name:
        raise refuse("contains a NUL character")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise refuse("contains a control character")
    if name.startswith("/"):
        raise refuse("is an absolute path; names are relative, like outputs/model.pt")
    for prefix, area in AREAS:
        if name.startswith(prefix):
            rest = name[len(prefix):]
            break
    parts = rest.split("/")
    if not rest or rest.endswith("/"):
        raise refuse("names a directory, not a file")
    if "" in parts:
        raise refuse("has an empty path component ('//'); names are relative paths")
    if ".." in parts or "." in parts:
        raise refuse("contains a '.' or '..' component; names must stay inside the run's files")
    if any(len(p) > MAX_COMPONENT for p in parts):
        raise refuse(f"has a component longer than {MAX_COMPONENT} characters")
    return area, rest


# What a request's file name or offset did wrong, as the kernel said it: the client's mistake, not the agent's.
_CLIENT_ERRNOS = {
    errno.ELOOP: "is, or passes through, a symbolic link; labrun does not follow links in a run's files",
    errno.ENOTDIR: "passes through something that is not a directory",
    errno.EXDEV: "passes through something that is not a directory",
    errno.EISDIR: "is a directory, not a file",
    errno.ENXIO: "is not a regular file (a FIFO, socket or device); labrun serves only files",
    errno.ENODEV: "is not a regular file (a FIFO, socket or device); labrun serves only files",
    errno.EOPNOTSUPP: "is not a regular file (a FIFO, socket or device); labrun serves only files",
    errno.ENAMETOOLONG: "has a name that is too long",
    errno.EINVAL: "has an invalid name, or the offset is invalid",
    errno.EFBIG: "would be too large",
}


def os_error_reply(exc: OSError, subject: str | None = None) -> AgentError:
    """The error reply for an ``OSError`` met while serving a request: the one translation of the kernel's
    errors on users' files. ``subject`` names the file as the client did (by default the last component of
    the error's file name: never the agent's own paths)."""
    if subject is None:
        subject = repr(Path(exc.filename or "").name[:80])
    if exc.errno in _CLIENT_ERRNOS:
        return BadRequest(f"{subject} {_CLIENT_ERRNOS[exc.errno]}")
    if exc.errno == errno.ENOENT:
        return NotFound(f"no such file: {subject}")
    if exc.errno == errno.EEXIST:   # a file where a name needs a directory, or one that may not be replaced
        return Conflict(f"{subject} already exists")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Forbidden(f"{subject} is not accessible to the run's owner")
    if exc.errno in DISK_ERRNOS:
        return Unavailable(f"the agent cannot write to its state directory ({exc.strerror}); try again "
                           "later. 'labrun status' shows the problem while it lasts")
    return AgentError(f"agent I/O error: {exc.strerror or exc}")


def refusal(exc: OSError, name: str, run_id: str) -> Exception:
    """The client's error for an ``OSError`` met on ``name`` of a run, or the ``OSError`` itself where it is
    the agent's (a fault of its disk, or a bug): the server reports and logs those."""
    reply = os_error_reply(exc, f"{name!r} of run {run_id}")
    return exc if reply.code in ("internal", "unavailable") else reply


def _root(run_dir) -> Path:
    """A run directory given as a path, or as the run-directory layout object (its ``root``)."""
    return Path(run_dir if isinstance(run_dir, (str, os.PathLike)) else run_dir.root)


def owner_of(record) -> Credentials:
    return Credentials.of(record.uid, record.gid, record.user)


def _open_in_run(run_dir: Path, name: str, flags: int, mode: int = 0o644, *, create_dirs: bool = False) -> int:
    """Open a run's file by its name (the caller has switched to the owner's rights)."""
    area, rest = parse_name(name)
    run_fd = open_directory(_root(run_dir))
    try:
        path = f"{area}/{rest}"
        if create_dirs and "/" in path:
            parent, _, leaf = path.rpartition("/")
            parent_fd = make_dirs_beneath(run_fd, parent, 0o755)
            try:
                fd = open_beneath(parent_fd, leaf, flags, mode)
            finally:
                os.close(parent_fd)
        else:
            fd = open_beneath(run_fd, path, flags, mode)
    finally:
        os.close(run_fd)
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        os.close(fd)
        raise OSError(errno.EISDIR, "is a directory", name)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise OSError(errno.ENODEV, "not a regular file", name)
    return fd


async def open_for_reading(record, run_dir: Path, name: str) -> int:
    """An fd to read a run's file, opened with its owner's rights; ``None`` if it does not exist.

    Raises:
        BadRequest, Forbidden: a link, a directory, a special file, or a name refused by ``parse_name``.
    """
    parse_name(name)   # a bad name is the client's error even when the file is missing
    try:
        # O_NONBLOCK: a FIFO planted under the name must not hang the opener.
        return await run_as(owner_of(record), _open_in_run, run_dir, name, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise refusal(exc, name, record.run_id) from None


def _append(run_dir: Path, name: str, data: bytes, append: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | (0 if append else os.O_EXCL)
    fd = _open_in_run(run_dir, name, flags, 0o644, create_dirs=True)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


async def write_file(record, run_dir: Path, name: str, data: bytes, *, append: bool) -> int:
    """Write (or append to) a run's file as its owner; returns the file's size."""
    parse_name(name)
    try:
        return await run_as(owner_of(record), _append, run_dir, name, data, append)
    except OSError as exc:
        raise refusal(exc, name, record.run_id) from None


def _list(run_dir: Path, prefixes: tuple[str, ...]) -> list[dict]:
    found = []
    run_fd = open_directory(_root(run_dir))
    try:
        for prefix, area in AREAS:
            if prefix not in prefixes:
                continue
            try:
                area_fd = open_beneath(run_fd, area, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue   # missing, or replaced by a link: nothing to list there
            try:
                # fwalk works on directory fds and never follows links: a swap cannot lead it elsewhere.
                for directory, _dirs, files, dir_fd in os.fwalk(".", dir_fd=area_fd):
                    for file in files:
                        try:
                            info = os.stat(file, dir_fd=dir_fd, follow_symlinks=False)
                        except OSError:
                            continue
                        if stat.S_ISREG(info.st_mode):
                            found.append({"name": prefix + os.path.normpath(os.path.join(directory, file)),
                                          "size": info.st_size})
            finally:
                os.close(area_fd)
    finally:
        os.close(run_fd)
    return sorted(found, key=lambda f: f["name"])


async def list_files(record, run_dir: Path, prefixes: tuple[str, ...] = tuple(p for p, _ in AREAS)) -> list[dict]:
    """Every regular file of the run (of the areas ``prefixes`` name: ``(LOGS,)`` for its logs), as
    ``{"name", "size"}``, sorted by name (links are not listed). Listed with the owner's rights."""
    try:
        return await run_as(owner_of(record), _list, run_dir, prefixes)
    except FileNotFoundError:
        return []


def artifact_path(run_dir: Path, name: str, field: str = "name") -> Path:
    """The path of a run's file, for a process that runs as the owner (``cp`` for ``resume_from``)."""
    area, rest = parse_name(name, field)
    return _root(run_dir) / area / rest


def note_in_log(record, log_path: Path, text: str) -> None:
    """Append the agent's own line (why a run failed to start) to a run's log, as the run's owner.

    Best effort: a log the user replaced by a link or made unwritable just does not get the line;
    the run's error says the same.
    """
    try:
        fd = open_file_as(owner_of(record), log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.write(fd, text.encode(errors="replace"))
    except OSError:
        pass
    finally:
        os.close(fd)
