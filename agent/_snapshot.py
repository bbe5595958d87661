"""Unpacking a client's source snapshot (a tar archive) into a run's working directory.

The client filters and packs ``source_directory``; the agent checks the same limits
again (a client's mistake or malice must not fill the disk), refuses links and
special files, and unpacks with tarfile's ``data`` filter (no absolute paths, no
``..``, no device files). Unpacking runs with the run owner's rights (``_asuser``): the
run directory is theirs, so nothing in it is ever created or chowned by root. It runs in a
worker thread: tarfile is blocking and a 300 MB snapshot must not stall the event loop.
This module is that thread's only seam.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import BinaryIO

import trio

from labrun.protocol import TooLarge, BadRequest

from ._asuser import Credentials, acting_as

MAX_SNAPSHOT_BYTES = 300 * 1024 * 1024
# Smaller archives unpack in well under a millisecond: faster than the hop to a worker thread.
INLINE_EXTRACT_BYTES = 256 * 1024
MAX_SNAPSHOT_FILES = 2000
# A tar of the largest allowed snapshot: headers and padding of 2000 members on top.
MAX_ARCHIVE_BYTES = MAX_SNAPSHOT_BYTES + MAX_SNAPSHOT_FILES * 1536 + 20480


def _extract(source: bytes | BinaryIO, dest: Path, creds: Credentials | None) -> int:
    fileobj = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    with acting_as(creds), tarfile.open(fileobj=fileobj, mode="r:") as archive:
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
        dest.mkdir(mode=0o755, exist_ok=True)
        try:
            archive.extractall(dest, filter="data")
        except tarfile.FilterError as exc:
            raise BadRequest(f"snapshot refused: {exc}") from None
    return total


async def extract_snapshot(source: bytes | Path, dest: Path, creds: Credentials | None = None) -> int:
    """Unpack ``source`` (archive bytes or a file the agent owns) into ``dest`` with ``creds``' rights;
    returns the bytes of file content. ``dest``'s parent must exist and be writable by ``creds``.

    Raises:
        TooLarge: over 2000 files or 300 MB.
        BadRequest: not a tar archive, or a member that is a link, device or escapes ``dest``.
    """
    try:
        if isinstance(source, (bytes, bytearray)):
            if len(source) <= INLINE_EXTRACT_BYTES:
                return _extract(source, dest, creds)
            return await trio.to_thread.run_sync(_extract, source, dest, creds)
        # The upload is the agent's own file, opened before switching to the owner's rights.
        with open(source, "rb") as fileobj:
            return await trio.to_thread.run_sync(_extract, fileobj, dest, creds)
    except tarfile.TarError as exc:
        raise BadRequest(f"snapshot is not a valid tar archive: {exc}") from None


def lay_out_run_dir(run_dir: Path, script: str | None) -> None:
    """After unpacking: ``snapshot/outputs``, the ``outputs`` link to it, ``logs/``; checks the script.

    Runs with the owner's rights (the caller's ``acting_as``), like the unpacking.
    """
    snapshot = run_dir / "snapshot"
    if script is not None and not (snapshot / script).is_file():
        raise BadRequest(f"spec.script: {script!r} is not a file in the snapshot of the source "
                         "directory; the script must be inside source_directory", details={"field": "spec.script"})
    outputs = snapshot / "outputs"
    if outputs.is_symlink() or (outputs.exists() and not outputs.is_dir()):
        raise BadRequest("the source directory has an 'outputs' that is not a directory; labrun keeps the run's "
                         "outputs there: rename it or add it to .labrunignore", details={"field": "spec.snapshot"})
    outputs.mkdir(exist_ok=True)
    (run_dir / "outputs").symlink_to("snapshot/outputs")
    (run_dir / "logs").mkdir()
