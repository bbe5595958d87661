"""Reading a finished run's files for MLflow, in a directory tree the run's user controls.

The agent is root and a run directory belongs to its user, who may have left symlinks, FIFOs,
devices or hard links to other people's files in it. ``run_files`` is the one place that reads
it on the mirror's behalf:

- every directory is opened relative to its parent with ``O_NOFOLLOW`` (``os.fwalk`` without
  following symlinks checks each one it enters), so nothing outside the run directory is reached;
- a file is opened with ``O_NOFOLLOW | O_NONBLOCK`` only after ``lstat`` said it is a regular file,
  and ``fstat`` must show the same file: a symlink, FIFO or device swapped in meanwhile is skipped;
- when the agent is root, a file must belong to the run's user: a hard link to a file someone
  else owns is skipped.

When reading as the run's user is available to the whole agent, this is the function to switch.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

# Where a run's files are, and the names they get in MLflow (Azure ML's names; see _artifacts).
SOURCES = (("snapshot/outputs", "outputs/"), ("artifacts", ""))
READ_CHUNK = 1 << 20


@dataclass
class RunFile:
    name: str       # the artifact's name in MLflow
    size: int
    fd: int         # open, read-only; the caller closes it


def _open_dir_beneath(run_dir: Path, relative: str) -> int | None:
    try:
        fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:   # removed (labrun rm), or not a directory
        return None
    try:
        for part in relative.split("/"):
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError:
        os.close(fd)
        return None
    return fd


def run_files(run_dir: Path, owner_uid: int, *, max_files: int = 10_000):
    """Yield the run's outputs and uploaded files as open ``RunFile``s, sorted within each directory.

    Anything that is not a plain file of the run's own, or that would leave the run directory,
    is skipped without being opened.
    """
    check_owner = os.geteuid() == 0 and owner_uid != 0
    count = 0
    for relative, prefix in SOURCES:
        top = _open_dir_beneath(run_dir, relative)
        if top is None:
            continue
        try:
            for directory, dirs, files, dir_fd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                dirs.sort()
                for file in sorted(files):
                    if count >= max_files:
                        return
                    opened = _open_plain_file(file, dir_fd, owner_uid if check_owner else None)
                    if opened is None:
                        continue
                    fd, size = opened
                    count += 1
                    name = os.path.normpath(os.path.join(directory, file))
                    yield RunFile(prefix + name, size, fd)
        finally:
            os.close(top)


def _open_plain_file(file: str, dir_fd: int, owner_uid: int | None) -> tuple[int, int] | None:
    try:
        before = os.lstat(file, dir_fd=dir_fd)
        if not stat.S_ISREG(before.st_mode) or (owner_uid is not None and before.st_uid != owner_uid):
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
