"""Snapshot manifests: the list of files a submit names by content hash, and their validation.

A manifest is a list of ``[path, size, mode, hash]`` entries: a relative POSIX path, the
file's size in bytes, its permission bits (``0o777`` at most) and the hash of its content
(``_content_hash``: its SHA-256, or for a large content a hash by chunks), as 64 lowercase hex
digits. Validation is pure and strict, since the agent (root) writes these paths:
no absolute paths, no ``.``/``..``/empty components, no NUL, no duplicates, and no path
that is both a file and a directory of another file.
"""

from __future__ import annotations

import hashlib
import re

import msgpack

from ._errors import BadRequest

HASH_RE = re.compile(r"^[0-9a-f]{64}\Z")
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
# The common case in one match: an ASCII path of valid components (anything else takes the slow path,
# which names the problem or accepts the path).
_COMPONENT = r"(?!\.{1,2}(?:/|\Z))[^/\x00]{1,255}"
_ASCII_PATH_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*\Z")


def _refuse(path: str, message: str, **details) -> BadRequest:
    return BadRequest(f"{path}: {message}", details={"field": path, **details})


def check_hash(value, path: str) -> str:
    if not isinstance(value, str) or not HASH_RE.match(value):
        raise _refuse(path, "expected a SHA-256 hash (or one by chunks) as 64 lowercase hex digits, "
                            f"got {str(value)[:80]!r}")
    return value


def check_file_path(value, path: str) -> str:
    """A relative path inside the snapshot, as a file name; raises ``BadRequest`` naming the problem."""
    if isinstance(value, str) and len(value) <= MAX_PATH_BYTES and value.isascii() and _ASCII_PATH_RE.match(value):
        return value
    if not isinstance(value, str) or not value:
        raise _refuse(path, "expected a non-empty string")
    if "\x00" in value:
        raise _refuse(path, "a path may not contain NUL")
    encoded = value.encode("utf-8", "surrogatepass")
    if len(encoded) > MAX_PATH_BYTES:
        raise _refuse(path, f"path longer than {MAX_PATH_BYTES} bytes")
    if value.startswith("/"):
        raise _refuse(path, f"must be a relative path, got {value[:80]!r}")
    for part in value.split("/"):
        if part in ("", ".", ".."):
            raise _refuse(path, f"'.', '..' and empty components are not allowed, got {value[:80]!r}")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise _refuse(path, f"a name longer than {MAX_NAME_BYTES} bytes in {value[:80]!r}")
    return value


def validate_manifest(value, path: str = "spec.snapshot.files", max_files: int | None = None) -> list[tuple]:
    """Check a manifest; returns its entries as ``(path, size, mode, hash)`` tuples, sorted by path."""
    if not isinstance(value, list):
        raise _refuse(path, "expected a list of [path, size, mode, hash]")
    if max_files is not None and len(value) > max_files:
        raise BadRequest(f"{path}: {len(value)} files; the limit is {max_files}", details={"field": path})
    entries = []
    path_ok, hash_ok = _ASCII_PATH_RE.match, HASH_RE.match
    for i, entry in enumerate(value):
        # One expression for the common case (tens of thousands of entries per second of agent time);
        # exact types, so True is not a size. Anything else is checked again below, naming the problem.
        if type(entry) is list and len(entry) == 4:
            name, size, mode, digest = entry
            if (type(name) is str and len(name) <= MAX_PATH_BYTES and name.isascii() and path_ok(name)
                    and type(size) is int and size >= 0 and type(mode) is int and 0 <= mode <= 0o777
                    and type(digest) is str and hash_ok(digest)):
                entries.append((name, size, mode, digest))
                continue
        where = f"{path}[{i}]"
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise _refuse(where, "expected [path, size, mode, hash]")
        name, size, mode, digest = entry
        check_file_path(name, where + "[0]")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _refuse(where + "[1]", f"expected a size in bytes, got {size!r}")
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise _refuse(where + "[2]", f"expected permission bits between 0 and 0o777, got {mode!r}")
        check_hash(digest, where + "[3]")
        entries.append((name, size, mode, digest))
    entries.sort()
    files, directories = set(), set()
    for name, *_ in entries:
        if name in files:
            raise _refuse(path, f"{name!r} is listed twice")
        files.add(name)
        parent = name.rpartition("/")[0]
        while parent and parent not in directories:   # each directory is walked up from once
            directories.add(parent)
            parent = parent.rpartition("/")[0]
    clashes = files & directories
    if clashes:
        clash = min(clashes)
        inside = next(name for name in sorted(files) if name.startswith(clash + "/"))
        raise _refuse(path, f"{clash!r} is a file and also a directory holding {inside!r}")
    if "outputs" in files:
        # The agent makes outputs/ the run's artifact directory: a file of that name cannot be one.
        raise _refuse(path, "'outputs' is a file; the run's outputs/ directory must be a directory (rename the "
                            "file, or add it to .labrunignore)")
    return entries


def tree_hash(entries: list[tuple]) -> str:
    """The identity of a validated (sorted) manifest: equal trees share one stored copy of their list."""
    return hashlib.sha256(msgpack.packb(entries, use_bin_type=True)).hexdigest()   # tuples pack as arrays
