"""Reading a finished run's files for MLflow, in a directory tree the run's user controls.

The agent is root and a run directory belongs to its user, who may have left symlinks, FIFOs,
devices or hard links to other people's files in it. ``run_files`` is the one place that reads
it on the mirror's behalf, and it reads as the run's user (``_asuser.acting_as``: the kernel
checks every open against the user's rights, so nothing the user could not read is read):

- the areas (``RunDir``'s ``outputs`` and ``artifacts``) are opened beneath the run directory
  with ``open_beneath`` (no symlink, ``..`` or absolute path followed), and every directory
  below them relative to its parent with ``O_NOFOLLOW`` (``os.fwalk`` without following
  symlinks checks each one it enters), so nothing outside the run directory is reached;
- a file is opened with ``O_NOFOLLOW | O_NONBLOCK`` only after ``lstat`` said it is a regular file,
  and ``fstat`` must show the same file: a symlink, FIFO or device swapped in meanwhile is skipped.

The files are opened as the user; reading an open file needs no rights, so the caller reads the
descriptors on any thread.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ._asuser import Credentials, acting_as, open_beneath, open_directory
from ._rundir import RunDir

READ_CHUNK = 1 << 20


def _sources(run_dir: RunDir) -> tuple[tuple[str, str], ...]:
    """Where a run's files are (relative to its directory), and the names they get in MLflow (Azure ML's
    names; see _artifacts)."""
    return ((str(run_dir.outputs.relative_to(run_dir.root)), "outputs/"),
            (str(run_dir.artifacts.relative_to(run_dir.root)), ""))


@dataclass
class RunFile:
    name: str       # the artifact's name in MLflow
    size: int
    fd: int         # open, read-only; the caller closes it


def _open_area(run_dir: RunDir, relative: str) -> int | None:
    try:
        root = open_directory(run_dir.root)
    except OSError:   # removed (labrun rm), or not a directory
        return None
    try:
        return open_beneath(root, relative, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    finally:
        os.close(root)


def run_files(run_dir: RunDir, owner: Credentials, *, max_files: int = 10_000):
    """Yield the run's outputs and uploaded files as open ``RunFile``s, sorted within each directory.

    Every step that opens something runs with ``owner``'s rights on the calling thread, and ends before
    the ``yield`` (each ``next`` may come from another thread). Anything that is not a plain file the
    owner may read, or that would leave the run directory, is skipped.
    """
    count = 0
    for relative, prefix in _sources(run_dir):
        with acting_as(owner):
            top = _open_area(run_dir, relative)
        if top is None:
            continue
        walk = os.fwalk(".", dir_fd=top, follow_symlinks=False)
        try:
            while True:
                with acting_as(owner):
                    step = next(walk, None)
                if step is None:
                    break
                directory, dirs, files, dir_fd = step
                dirs.sort()
                for file in sorted(files):
                    if count >= max_files:
                        return
                    with acting_as(owner):
                        opened = _open_plain_file(file, dir_fd)
                    if opened is None:
                        continue
                    fd, size = opened
                    count += 1
                    name = os.path.normpath(os.path.join(directory, file))
                    yield RunFile(prefix + name, size, fd)
        finally:
            walk.close()
            os.close(top)


def _open_plain_file(file: str, dir_fd: int) -> tuple[int, int] | None:
    try:
        before = os.lstat(file, dir_fd=dir_fd)
        if not stat.S_ISREG(before.st_mode):
            return None
        fd = os.open(file, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    after = os.fstat(fd)
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or not stat.S_ISREG(after.st_mode):
        os.close(fd)
        return None
    return fd, after.st_size


def read_chunk(fd: int, remaining: int) -> bytes:
    return os.read(fd, min(READ_CHUNK, remaining))
