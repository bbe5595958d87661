"""What an agent's content store holds, read from outside: its files (``cas/objects``) and the small contents
kept as rows of its database (``cas/small.db``)."""

import sqlite3
from pathlib import Path


def stored(state_dir: Path) -> set[str]:
    """The hashes of every content the store holds, in either place."""
    return {p.name for p in (state_dir / "cas" / "objects").glob("*/*")} | set(_rows(state_dir))


def stored_bytes(state_dir: Path, digest: str) -> bytes:
    """A stored content, from whichever place holds it (KeyError: neither)."""
    path = state_dir / "cas" / "objects" / digest[:2] / digest
    if path.exists():
        return path.read_bytes()
    return _rows(state_dir, digest)[digest]


def inline(state_dir: Path) -> set[str]:
    """The hashes of the contents kept as rows of the store's database."""
    return set(_rows(state_dir))


def _rows(state_dir: Path, digest: str | None = None) -> dict[str, bytes]:
    path = state_dir / "cas" / "small.db"
    if not path.exists():
        return {}
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        if digest is None:
            return dict(db.execute("SELECT hash, data FROM contents"))
        return dict(db.execute("SELECT hash, data FROM contents WHERE hash = ?", (digest,)))
    finally:
        db.close()
