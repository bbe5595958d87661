"""Content hashes: the name of a file's content in the snapshot store, in the two forms a request may use.

``"sha256"``: the SHA-256 of the content, whatever its size. Every client and agent speaks it; it is the
form of a request that names none.

``"chunked-v1"``: the same SHA-256 for a content of up to ``CHUNK`` (8 MiB) bytes, so that the hashes of
nearly all source files, the store's keys and the clients' caches are those of ``"sha256"``. A larger content
is cut into chunks of ``CHUNK`` bytes (the last one shorter), each hashed with SHA-256, and its hash is the
BLAKE2b-256, personalized ``b"labrun-chunks-v1"``, of its size and its chunk size (8 bytes each, big-endian)
followed by the chunks' 32-byte digests in order. The chunks can be hashed on all cores at once; SHA-256 over
one stream cannot.

Why the last step is not SHA-256: the hash of a small content is the SHA-256 of its bytes, so a root that were
``sha256(prefix + size + digests)`` would also be the hash of the small content ``prefix + size + digests``, which
anyone who knows a large file's chunk digests can write: two contents with one name in the store. A different
function (BLAKE2b, personalized for this one use) keeps the two kinds of hashes apart, and every hash of either
form names one content only (in a store with both: a large content's plain SHA-256, sent by older clients, is
another name of the same content, never of another).

Pure: hashlib is imported when something is hashed, not with this module (the client's hot path imports it).
"""

from __future__ import annotations

SHA256 = "sha256"
CHUNKED = "chunked-v1"
FORMS = (SHA256, CHUNKED)
# The chunk size of "chunked-v1", and the size up to which it is plain SHA-256: a content of one chunk has
# nothing to hash in parallel (8 MiB: about 4 ms of SHA-256 here), so it keeps the name older clients give it.
CHUNK = 8 << 20
PERSON = b"labrun-chunks-v1"


def chunked(form: str, size: int) -> bool:
    """Whether a content of ``size`` bytes is hashed by chunks in ``form``."""
    return form == CHUNKED and size > CHUNK


def chunks(size: int) -> list[tuple[int, int]]:
    """``(offset, count)`` of each chunk of a content of ``size`` bytes, in order."""
    return [(offset, min(CHUNK, size - offset)) for offset in range(0, size, CHUNK)]


def root(size: int, digests: list[bytes]) -> str:
    """The hash, in ``"chunked-v1"``, of a content of ``size`` bytes whose chunks have these SHA-256 digests."""
    import hashlib

    if len(digests) != len(range(0, size, CHUNK)) or size <= CHUNK:
        raise ValueError(f"a content of {size} bytes has {len(range(0, size, CHUNK))} chunks, not {len(digests)}")
    hasher = hashlib.blake2b(digest_size=32, person=PERSON)
    hasher.update(size.to_bytes(8, "big") + CHUNK.to_bytes(8, "big"))
    for digest in digests:
        hasher.update(digest)
    return hasher.hexdigest()


def content_hash(data, form: str = SHA256) -> str:
    """The hash of ``data`` (bytes-like) in ``form``."""
    hasher = Hasher(form, len(data))
    hasher.update(data)
    return hasher.hexdigest()


class Hasher:
    """The hash of a content of a known ``size``, fed in order in pieces of any length (``update``)."""

    __slots__ = ("size", "fed", "_current", "_left", "_digests")

    def __init__(self, form: str, size: int):
        import hashlib

        if form not in FORMS:
            raise ValueError(f"unknown content hash {form!r}")
        self.size, self.fed = size, 0
        self._current = hashlib.sha256()
        # Bytes left in the current chunk; None: one SHA-256 over the whole content.
        self._left = CHUNK if chunked(form, size) else None
        self._digests: list[bytes] = []

    def update(self, data) -> None:
        """Feed the next bytes of the content (hashlib drops the GIL while it hashes a large piece)."""
        view = memoryview(data).cast("B")
        self.fed += len(view)
        if self._left is None:
            self._current.update(view)
            return
        while len(view) >= self._left:
            self._current.update(view[:self._left])
            view = view[self._left:]
            self._next_chunk()
        self._current.update(view)
        self._left -= len(view)

    def _next_chunk(self) -> None:
        import hashlib

        self._digests.append(self._current.digest())
        self._current, self._left = hashlib.sha256(), CHUNK

    def hexdigest(self) -> str:
        """The hash of the content, once all ``size`` bytes were fed."""
        if self.fed != self.size:
            raise ValueError(f"{self.fed} bytes fed of a content of {self.size}")
        if self._left is None:
            return self._current.hexdigest()
        digests = self._digests + ([self._current.digest()] if self._left < CHUNK else [])
        return root(self.size, digests)
