"""Acting on a user's behalf: the one place where the agent takes on a user's rights for file work.

A root agent must never open, create, copy, chown or execute anything in a user-controlled tree with
root's rights. Three tools, used by everything that works in a run's directory:

- ``acting_as(creds)`` switches the *calling thread's* filesystem credentials (fsuid, fsgid and the
  supplementary groups) with raw system calls: on Linux credentials belong to a thread, and only
  glibc's wrappers spread a change to every thread, so the raw calls leave the rest of the agent as
  it was. While switched, the kernel clears CAP_DAC_OVERRIDE, CAP_FOWNER and the other filesystem
  capabilities from the thread, so every open, mkdir and chmod is checked against the user's rights
  and whatever is created belongs to the user; nothing needs a chown afterwards. Use it only around
  synchronous code (no ``await`` inside): the thread is restored before anything else runs on it.
  ``run_as`` does the same on a worker thread for blocking work, and ``as_user(creds, work)``
  calls ``work()`` so (from whatever thread calls it), reporting an ``OSError`` as ``AsUserFailed``.
- ``Credentials.popen_options()``: processes started for a user (environment builds, copies) run with
  the user's uid, gid and groups from their first instruction.
- ``open_beneath(dirfd, path, flags)`` opens a relative path with ``openat2`` and
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`` (falling back to a walk that opens
  each component with ``O_NOFOLLOW`` where ``openat2`` is missing): no symlink, ``..`` or absolute
  path inside a user-controlled tree is ever followed, not even by root.

A per-user agent (not root) never switches: it already has its user's rights and no more.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import pwd
import stat
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import trio

T = TypeVar("T")

# setfsuid, setfsgid, setgroups, openat2 (openat2's number is shared by every architecture).
_SYSCALLS = {"x86_64": (122, 123, 116, 437), "aarch64": (151, 152, 159, 437), "arm64": (151, 152, 159, 437)}
_SYS_SETFSUID, _SYS_SETFSGID, _SYS_SETGROUPS, _SYS_OPENAT2 = _SYSCALLS.get(platform.machine(), (None,) * 4)

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_RESOLVE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _syscall(number: int | None, *args) -> int:
    if number is None:
        raise OSError(errno.ENOSYS, f"labrun cannot switch credentials on {platform.machine()}")
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


GROUPS_CACHE_SECONDS = 60.0
_GROUPS_CACHE: dict[tuple, tuple[float, "Credentials"]] = {}


@dataclass(frozen=True)
class Credentials:
    """Whose rights file work runs with: a uid, its primary gid and its supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @classmethod
    def of(cls, uid: int, gid: int, user: str | None = None) -> "Credentials":
        """A user's credentials, with the groups the system gives them (looked up at most once a minute:
        with a directory service each lookup is a round trip)."""
        key = (uid, gid, user)
        cached = _GROUPS_CACHE.get(key)
        now = time.monotonic()
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            name = user if user is not None else pwd.getpwuid(uid).pw_name
            groups = tuple(os.getgrouplist(name, gid))
        except (KeyError, OSError):
            groups = (gid,)
        creds = cls(uid, gid, groups)
        if len(_GROUPS_CACHE) > 1000:
            _GROUPS_CACHE.clear()
        _GROUPS_CACHE[key] = (now + GROUPS_CACHE_SECONDS, creds)
        return creds

    @property
    def switches(self) -> bool:
        """Whether acting as this user means changing credentials (a root agent, a user other than root)."""
        return needs_switch(self.uid)

    def popen_options(self) -> dict:
        """Arguments for ``subprocess.Popen`` / ``trio.run_process`` that start a process as this user."""
        if not self.switches:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups or (self.gid,))}


def _set_groups(groups: tuple[int, ...] | list[int]) -> None:
    array = (ctypes.c_uint * max(len(groups), 1))(*groups)
    _syscall(_SYS_SETGROUPS, ctypes.c_long(len(groups)), array)


def _set_fs_id(number: int | None, value: int) -> None:
    _syscall(number, ctypes.c_long(value))
    # set*fsid never fails loudly: it returns the previous id. An invalid id (-1) reads the current one.
    current = _syscall(number, ctypes.c_long(-1))
    if current != value:
        raise PermissionError(errno.EPERM, f"could not switch this thread's filesystem id to {value}")


@contextlib.contextmanager
def acting_as(creds: Credentials | None):
    """Run the body with ``creds``' filesystem rights on this thread (a no-op when no switch is needed).

    Cancellation: none inside; the body must be synchronous.
    """
    if creds is None or not creds.switches:
        yield
        return
    saved_groups = os.getgroups()
    _set_groups(creds.groups or (creds.gid,))
    try:
        _set_fs_id(_SYS_SETFSGID, creds.gid)
        _set_fs_id(_SYS_SETFSUID, creds.uid)
        yield
    finally:
        # Back to root's rights: fsuid first, which gives the thread its capabilities back.
        _set_fs_id(_SYS_SETFSUID, os.geteuid())
        _set_fs_id(_SYS_SETFSGID, os.getegid())
        _set_groups(saved_groups)


def needs_switch(uid: int) -> bool:
    """Whether acting as ``uid`` means changing credentials."""
    return os.geteuid() == 0 and uid != 0


class AsUserFailed(Exception):
    """Work done as a user failed with an OS error (the message names the error and the path)."""


def as_user(creds: Credentials, work: Callable[[], T]) -> T:
    """``work()`` with ``creds``' filesystem rights on the calling thread; blocking, so call it from a
    worker thread for long work.

    Raises:
        AsUserFailed: ``work`` raised an ``OSError``.
    """
    try:
        with acting_as(creds):
            return work()
    except OSError as exc:
        name = exc.filename if exc.filename is not None else ""
        raise AsUserFailed(f"{exc.strerror or exc}{f': {name}' if name else ''}") from None


async def run_as(creds: Credentials | None, fn: Callable[..., T], *args) -> T:
    """``fn(*args)`` on a worker thread with ``creds``' filesystem rights."""
    def work():
        with acting_as(creds):
            return fn(*args)
    return await trio.to_thread.run_sync(work)


# -- opening without following links -----------------------------------------------------

_openat2_missing = _SYS_OPENAT2 is None


def _components(path: str) -> list[str]:
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        # Callers validate names first (``_artifacts.parse_name``); this is the last line of defence.
        raise OSError(errno.EXDEV, f"{path!r} is not a plain relative path")
    return parts


def open_beneath(dirfd: int, path: str, flags: int, mode: int = 0o600) -> int:
    """Open ``path`` (relative, ``a/b/c``) under the directory ``dirfd``, following no symlink.

    Raises:
        OSError: ``ELOOP`` for a symlink anywhere on the path, ``ENOTDIR``, ``ENOENT``, ``EACCES``...
    """
    global _openat2_missing
    _components(path)
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    if not _openat2_missing:
        tmpfile = getattr(os, "O_TMPFILE", 0)
        creates = flags & os.O_CREAT or (tmpfile and flags & tmpfile == tmpfile)
        how = _OpenHow(flags, mode if creates else 0, _RESOLVE)
        result = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), path.encode(),
                               ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if result >= 0:
            return result
        err = ctypes.get_errno()
        if not (err == errno.ENOSYS or err == errno.EPERM and _seccomp_blocks_openat2(dirfd)):
            raise OSError(err, os.strerror(err), path)
        _openat2_missing = True
    return _open_walking(dirfd, path, flags, mode)


def _seccomp_blocks_openat2(dirfd: int) -> bool:
    """Container runtimes with older seccomp profiles answer EPERM for system calls they do not know."""
    probe = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE)
    fd = _libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), b".", ctypes.byref(probe),
                       ctypes.c_size_t(ctypes.sizeof(probe)))
    if fd >= 0:
        os.close(fd)
        return False
    return ctypes.get_errno() in (errno.EPERM, errno.ENOSYS)


def _open_subdirectory(dirfd: int, name: str) -> int:
    """One directory component, never a link: a link is ``ELOOP`` (the kernel says ``ENOTDIR``)."""
    try:
        return os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, "is a symbolic link", name) from None
        raise


def _open_walking(dirfd: int, path: str, flags: int, mode: int) -> int:
    """The fallback: each directory opened with ``O_NOFOLLOW | O_DIRECTORY``, relative to the last."""
    *dirs, last = _components(path)
    current = dirfd
    try:
        for name in dirs:
            following = _open_subdirectory(current, name)
            if current != dirfd:
                os.close(current)
            current = following
        return os.open(last, flags | os.O_NOFOLLOW, mode, dir_fd=current)
    finally:
        if current != dirfd:
            os.close(current)


def open_directory(path: str | os.PathLike) -> int:
    """A directory fd for a path the agent trusts up to its last component, which must not be a link."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def make_dirs_beneath(dirfd: int, path: str, mode: int = 0o755) -> int:
    """Create the directories of ``path`` under ``dirfd`` as needed (never through a link); returns the last's fd."""
    current = dirfd
    try:
        for name in _components(path):
            try:
                os.mkdir(name, mode, dir_fd=current)
            except FileExistsError:
                pass
            following = _open_subdirectory(current, name)
            if current != dirfd:
                os.close(current)
            current = following
        result, current = current, dirfd
        return result
    finally:
        if current != dirfd:
            os.close(current)


def make_private_dir(parent: str | os.PathLike, name: str, creds: Credentials | None, mode: int = 0o700) -> None:
    """Create ``parent/name`` (``parent`` is the agent's own directory) as ``creds``' private directory.

    The agent creates it, since only it may write ``parent``; the owner and mode are set through the
    new directory's fd, so nothing swapped in at that name could be chowned instead.
    """
    parent_fd = open_directory(parent)
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)
        fd = open_beneath(parent_fd, name, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if creds is not None and creds.switches:
                os.fchown(fd, creds.uid, creds.gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(parent_fd)


def agent_dir(path: str | os.PathLike, *, traversable: bool = False) -> None:
    """Create (or narrow) one of the agent's own directories: 0700, or 0711 where runs of a root agent
    must pass through it by path to reach their own directory (which is 0700 and theirs)."""
    mode = 0o711 if traversable and os.geteuid() == 0 else 0o700
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chmod(path, mode)


def open_file_as(creds: Credentials | None, path: str | os.PathLike, flags: int, mode: int = 0o640) -> int:
    """Open ``path`` with ``creds``' rights, following no link at its last two components.

    For a file in a directory of a user's run (``<run dir>/logs/std_log.txt``): the directories above
    the run directory are the agent's, so only the last two components can be swapped by the user.
    """
    path = os.fspath(path)
    directory, name = os.path.split(path)
    with acting_as(creds):
        dir_fd = open_directory(directory)
        try:
            return open_beneath(dir_fd, name, flags, mode)
        finally:
            os.close(dir_fd)


def narrow_children(path: str | os.PathLike, mode: int = 0o700) -> int:
    """Take group and other access away from every directory in ``path`` (run directories an older agent
    made readable to everyone); returns how many were narrowed. Works through fds, following no link."""
    narrowed = 0
    parent_fd = open_directory(path)
    try:
        for entry in os.scandir(parent_fd):
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = _open_subdirectory(parent_fd, entry.name)
            except OSError:
                continue   # removed meanwhile
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                    os.fchmod(fd, mode)
                    narrowed += 1
            finally:
                os.close(fd)
    finally:
        os.close(parent_fd)
    return narrowed
