"""Extracting a tar archive with the ``data`` filter's rules on every Python the agent supports.

Extraction filters (``extractall(filter="data")``) arrived in Python 3.11.4; Debian 12's
system interpreter is 3.11.2. Where the filter exists it is used as is. Elsewhere the same
rules are applied here: only regular files and directories, leading slashes stripped, nothing that
leaves the destination, no set-id or sticky bits, no group or other write bits, and files are
created fresh (never opened through an existing link). Ownership is never taken from the archive.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile

__all__ = ["ArchiveRefused", "extract_data"]

HAS_DATA_FILTER = hasattr(tarfile, "data_filter")


class ArchiveRefused(Exception):
    """A member breaks the data filter's rules; the message names it."""


def extract_data(archive: tarfile.TarFile, dest: str | os.PathLike) -> None:
    """Extract every member of ``archive`` under ``dest`` under the ``data`` filter's rules.

    Raises:
        ArchiveRefused: a member is not a regular file or directory, or would land outside ``dest``.
    """
    if HAS_DATA_FILTER:
        try:
            archive.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            raise ArchiveRefused(str(exc)) from None
        return
    _extract_without_filter(archive, os.fspath(dest))


def _target(dest: str, name: str) -> str:
    # As the data filter does: leading slashes are stripped, so "/etc/x" lands at "<dest>/etc/x".
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or ".." in parts:
        raise ArchiveRefused(f"member {name!r} would be extracted outside the destination")
    return os.path.join(dest, *parts)


def _mode(member: tarfile.TarInfo) -> int:
    # The data filter's rule: drop set-id, sticky and group/other write bits; files keep owner rw.
    mode = stat.S_IMODE(member.mode) & 0o755
    return mode | (0o600 if member.isfile() else 0o700)


def _extract_without_filter(archive: tarfile.TarFile, dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    directories = []
    for member in archive.getmembers():
        if not (member.isfile() or member.isdir()):
            raise ArchiveRefused(f"member {member.name!r} is not a regular file or directory")
        path = _target(dest, member.name)
        parent = os.path.dirname(path)
        # Every directory on the way must be a real directory made here, never a link.
        if os.path.islink(parent) or (os.path.exists(parent) and not os.path.isdir(parent)):
            raise ArchiveRefused(f"member {member.name!r} would be extracted through a non-directory")
        os.makedirs(parent, exist_ok=True)
        if member.isdir():
            if os.path.islink(path):
                raise ArchiveRefused(f"member {member.name!r} would be extracted through a link")
            os.makedirs(path, exist_ok=True)
            directories.append((path, _mode(member)))
            continue
        if os.path.lexists(path):
            if os.path.isdir(path) and not os.path.islink(path):
                raise ArchiveRefused(f"member {member.name!r} is both a file and a directory")
            os.unlink(path)
        source = archive.extractfile(member)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with source, os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            os.fchmod(out.fileno(), _mode(member))
    # Directory modes last, so a read-only directory does not stop its own members.
    for path, mode in reversed(directories):
        os.chmod(path, mode)
