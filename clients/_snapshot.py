"""Packing ``source_directory`` into the tar archive a submit carries.

Ignore rules, as Azure ML: ``.labrunignore`` if present, else ``.amlignore``, else
``.gitignore``; only the file at the root, gitignore syntax; ``.git`` never. Limits:
300 MB and 2000 files, checked before anything is sent.
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
GIT_DIR = ".git"
# Past the limit, files are still counted up to this many more, so the message can say how far over it is.
MAX_COUNTED_FILES = 100_000


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

    ``.git`` is never taken, whatever the ignore files say (as Azure ML).

    Raises:
        SnapshotException: the directory is missing, or over 2000 files or 300 MB; the message gives the
            count, the directories holding the most, and the ways out.
    """
    root = Path(root)
    if not root.is_dir():
        raise SnapshotException(f"source_directory {str(root)!r} is not a directory")
    spec = ignore_spec(root)
    files, total = [], 0
    # Per top-level entry: [files, bytes], to say where an over-limit tree's weight is.
    weight: dict[str, list[int]] = {}
    for directory, dirs, names in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirs[:] = [d for d in dirs if d != GIT_DIR and (spec is None or not spec.match_file(rel_dir + d + "/"))]
        dirs.sort()
        for name in sorted(names):
            rel = rel_dir + name
            path = Path(directory, name)
            if name == GIT_DIR or (spec is not None and spec.match_file(rel)):
                continue
            if not path.is_file() or not os.access(path, os.R_OK):
                continue   # sockets, broken links, unreadable files: skipped, as Azure ML does
            size = path.stat().st_size
            top = weight.setdefault(rel.split("/")[0] + ("/" if "/" in rel else ""), [0, 0])
            top[0] += 1
            top[1] += size
            if len(files) < MAX_SNAPSHOT_FILES + MAX_COUNTED_FILES:
                files.append((rel, path))
            total += size
        if len(files) >= MAX_SNAPSHOT_FILES + MAX_COUNTED_FILES:
            break   # enough to say how far over the limit it is
    if len(files) > MAX_SNAPSHOT_FILES:
        count = f"{len(files):,}" + ("+" if len(files) >= MAX_SNAPSHOT_FILES + MAX_COUNTED_FILES else "")
        raise SnapshotException(
            f"While attempting to take snapshot of {root}\nYour project has {count} files, more than "
            f"{MAX_SNAPSHOT_FILES} files; the most are in {_heaviest(weight, 0, lambda n: f'{n:,} files')}. "
            + _WAY_OUT)
    if total > MAX_SNAPSHOT_BYTES:
        raise SnapshotException(
            f"While attempting to take snapshot of {root}\nYour total snapshot size is {total / 1e6:.1f} MB and "
            f"exceeds the limit of 300.0 MB; the largest are {_heaviest(weight, 1, lambda n: f'{n / 1e6:.1f} MB')}. "
            + _WAY_OUT)
    return files


def _heaviest(weight: dict[str, list[int]], key: int, unit) -> str:
    top = sorted(weight.items(), key=lambda item: item[1][key], reverse=True)[:3]
    return ", ".join(f"{name} ({unit(counts[key])})" for name, counts in top)


_WAY_OUT = ("Exclude what the run does not need with a .labrunignore (or .amlignore/.gitignore) file at the top "
            "of the source directory, or run in the source directory itself without a snapshot: "
            "labrun run --in-place.")


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
