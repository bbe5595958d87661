"""Packing ``source_directory`` into the tar archive a submit carries.

Ignore rules, as Azure ML: ``.labrunignore`` if present, else ``.amlignore``, else
``.gitignore``; only the file at the root, gitignore syntax. Limits: 300 MB and
2000 files, checked before anything is sent.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

from .exceptions import SnapshotException

MAX_SNAPSHOT_BYTES = 300 * 1024 * 1024
MAX_SNAPSHOT_FILES = 2000
IGNORE_FILES = (".labrunignore", ".amlignore", ".gitignore")


def ignore_spec(root: Path):
    """The root ignore file's rules as a ``pathspec.GitIgnoreSpec``, or None when there is no ignore file."""
    for name in IGNORE_FILES:
        path = root / name
        if path.is_file():
            import pathspec   # slow to import: only when there are rules to match

            return pathspec.GitIgnoreSpec.from_lines(path.read_text(errors="replace").splitlines())
    return None


def collect_files(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """The (archive name, path) of every file to snapshot, after the ignore rules.

    Raises:
        SnapshotException: the directory is missing, or over 2000 files or 300 MB.
    """
    root = Path(root)
    if not root.is_dir():
        raise SnapshotException(f"source_directory {str(root)!r} is not a directory")
    spec = ignore_spec(root)
    files, total = [], 0
    for directory, dirs, names in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        if spec is not None:
            dirs[:] = [d for d in dirs if not spec.match_file(rel_dir + d + "/")]
        dirs.sort()
        for name in sorted(names):
            rel = rel_dir + name
            path = Path(directory, name)
            if spec is not None and spec.match_file(rel):
                continue
            if not path.is_file() or not os.access(path, os.R_OK):
                continue   # sockets, broken links, unreadable files: skipped, as Azure ML does
            files.append((rel, path))
            total += path.stat().st_size
            if len(files) > MAX_SNAPSHOT_FILES:
                raise SnapshotException(
                    f"While attempting to take snapshot of {root}\nYour project has more than "
                    f"{MAX_SNAPSHOT_FILES} files; exclude some with a .labrunignore (or .amlignore/.gitignore) file")
            if total > MAX_SNAPSHOT_BYTES:
                raise SnapshotException(
                    f"While attempting to take snapshot of {root}\nYour total snapshot size exceeds the limit of "
                    "300.0 MB; exclude files with a .labrunignore (or .amlignore/.gitignore) file")
    return files


def pack_snapshot(root: str | os.PathLike) -> bytes:
    """A tar archive (uncompressed: runs are local) of the filtered source directory."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, path in collect_files(root):
            info = archive.gettarinfo(str(path), arcname=name)
            if not info.isfile():   # a symlink to a file: store its content
                info = tarfile.TarInfo(name)
                info.size = path.stat().st_size
                info.mode = path.stat().st_mode & 0o777
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                archive.addfile(info, f)
    return buffer.getvalue()
