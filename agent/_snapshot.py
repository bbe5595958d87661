"""Unpacking a client's source snapshot (a tar archive) into a run's working directory.

The client filters and packs ``source_directory``; the agent checks the same limits
again (a client's mistake or malice must not fill the disk), refuses links and
special files, and unpacks with tarfile's ``data`` filter's rules (``_tarcompat``) (no absolute paths, no
``..``, no device files). Unpacking runs in a worker thread: tarfile is blocking and
a 300 MB snapshot must not stall the event loop. This module is that thread's only seam.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import trio

from labrun.protocol import TooLarge, BadRequest

from ._tarcompat import ArchiveRefused, extract_data

MAX_SNAPSHOT_BYTES = 300 * 1024 * 1024
# Smaller archives unpack in well under a millisecond: faster than the hop to a worker thread.
INLINE_EXTRACT_BYTES = 256 * 1024
MAX_SNAPSHOT_FILES = 2000
# A tar of the largest allowed snapshot: headers and padding of 2000 members on top.
MAX_ARCHIVE_BYTES = MAX_SNAPSHOT_BYTES + MAX_SNAPSHOT_FILES * 1536 + 20480


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(directory, name), uid, gid, follow_symlinks=False)


def _extract(source: bytes | Path, dest: Path, uid: int | None, gid: int | None) -> int:
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    with fileobj, tarfile.open(fileobj=fileobj, mode="r:") as archive:
        members = archive.getmembers()
        files = [m for m in members if m.isfile()]
        if len(files) > MAX_SNAPSHOT_FILES:
            raise TooLarge(f"snapshot has {len(files)} files; the limit is {MAX_SNAPSHOT_FILES}")
        total = sum(m.size for m in files)
        if total > MAX_SNAPSHOT_BYTES:
            raise TooLarge(f"snapshot is {total / 1e6:.1f} MB; the limit is 300 MB")
        for m in members:
            if not (m.isfile() or m.isdir()):
                raise BadRequest(f"snapshot member {m.name!r} is not a regular file or directory")
        dest.mkdir(parents=True, exist_ok=True)
        try:
            extract_data(archive, dest)
        except ArchiveRefused as exc:
            raise BadRequest(f"snapshot refused: {exc}") from None
    if uid is not None:
        _chown_tree(dest, uid, gid)
    return total


async def extract_snapshot(source: bytes | Path, dest: Path, *, uid: int | None = None,
                           gid: int | None = None) -> int:
    """Unpack ``source`` (archive bytes or a file) into ``dest``; returns the bytes of file content.

    Raises:
        TooLarge: over 2000 files or 300 MB.
        BadRequest: not a tar archive, or a member that is a link, device or escapes ``dest``.
    """
    try:
        if isinstance(source, (bytes, bytearray)) and len(source) <= INLINE_EXTRACT_BYTES:
            return _extract(source, dest, uid, gid)
        return await trio.to_thread.run_sync(_extract, source, dest, uid, gid)
    except tarfile.TarError as exc:
        raise BadRequest(f"snapshot is not a valid tar archive: {exc}") from None
