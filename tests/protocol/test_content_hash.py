"""The content hash forms (``protocol/_content_hash``): fixed vectors, the threshold's edges, chunk boundaries,
and that no small content can share a name with a large one."""

import hashlib

import pytest

from labrun.protocol._content_hash import CHUNK, CHUNKED, FORMS, PERSON, SHA256, Hasher, chunked, chunks, \
    content_hash, root

EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def by_the_spec(data: bytes) -> str:
    """The chunked form as PROTOCOL.md states it, from hashlib alone."""
    hasher = hashlib.blake2b(digest_size=32, person=b"labrun-chunks-v1")
    hasher.update(len(data).to_bytes(8, "big") + (8 << 20).to_bytes(8, "big"))
    for offset in range(0, len(data), 8 << 20):
        hasher.update(hashlib.sha256(data[offset:offset + (8 << 20)]).digest())
    return hasher.hexdigest()


def test_the_forms_and_their_constants_are_those_the_protocol_names():
    assert FORMS == ("sha256", "chunked-v1") and (SHA256, CHUNKED) == FORMS
    assert CHUNK == 8 * 1024 * 1024 and PERSON == b"labrun-chunks-v1"


@pytest.mark.parametrize("data, expected", [
    (b"a" * (CHUNK + 1), "1052f4c5edc651f8cfec57b3b0c48f4d060fd45c5050578582bf474ba7a5e068"),
    (b"labrun\n" * (3 * CHUNK // 7 + 1), "f13a29f7700ceb63678ea57a22ba83879c748eb5edc4686196cbdf59eec570a1"),
    (bytes(2 * CHUNK), "94359a8ff7578cfb161f14784dc2a794755d5c540005132a83302cbb271ae9f6"),
])
def test_known_vectors_of_large_contents(data, expected):
    assert content_hash(data, CHUNKED) == expected == by_the_spec(data)
    assert content_hash(data, SHA256) == hashlib.sha256(data).hexdigest() != expected


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK])
def test_up_to_one_chunk_both_forms_are_plain_sha256(size):
    data = bytes([size % 251]) * size
    assert not chunked(CHUNKED, size)
    assert content_hash(data, CHUNKED) == content_hash(data, SHA256) == hashlib.sha256(data).hexdigest()
    assert content_hash(b"", CHUNKED) == EMPTY


@pytest.mark.parametrize("size", [CHUNK + 1, 2 * CHUNK - 1, 2 * CHUNK, 2 * CHUNK + 1])
def test_past_one_chunk_the_chunked_form_is_the_root_over_each_chunk(size):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert chunked(CHUNKED, size) and not chunked(SHA256, size)
    assert chunks(size)[-1][0] + chunks(size)[-1][1] == size and len(chunks(size)) == -(-size // CHUNK)
    assert content_hash(data, CHUNKED) == by_the_spec(data)


@pytest.mark.parametrize("piece", [1 << 20, CHUNK, CHUNK - 1, CHUNK + 1, 3 * CHUNK])
def test_any_split_of_the_content_gives_the_same_hash(piece):
    data = bytes(range(251)) * ((2 * CHUNK + 12345) // 251)
    hasher = Hasher(CHUNKED, len(data))
    for offset in range(0, len(data), piece):
        hasher.update(data[offset:offset + piece])
    hasher.update(b"")
    assert hasher.hexdigest() == by_the_spec(data)


def test_the_size_is_part_of_the_hash():
    # Same chunk digests, other sizes: a content is never named by its chunks alone.
    digests = [hashlib.sha256(b"x").digest()] * 2
    assert root(CHUNK + 1, digests) != root(2 * CHUNK, digests)


def test_no_small_content_is_named_as_a_large_one():
    large = b"q" * (CHUNK + 5)
    digests = [hashlib.sha256(large[offset:offset + count]).digest() for offset, count in chunks(len(large))]
    preimage = len(large).to_bytes(8, "big") + CHUNK.to_bytes(8, "big") + b"".join(digests)
    # Were the root SHA-256 of this string, this small content would have the large one's name.
    assert content_hash(preimage, CHUNKED) != content_hash(large, CHUNKED)
    assert content_hash(PERSON + preimage, CHUNKED) != content_hash(large, CHUNKED)


def test_a_hash_is_only_given_for_the_whole_declared_content():
    hasher = Hasher(CHUNKED, CHUNK + 10)
    hasher.update(bytes(CHUNK))
    with pytest.raises(ValueError, match="bytes fed"):
        hasher.hexdigest()
    hasher.update(bytes(11))
    with pytest.raises(ValueError, match="bytes fed"):
        hasher.hexdigest()
    with pytest.raises(ValueError, match="chunks, not"):
        root(CHUNK + 1, [b"\0" * 32])
    with pytest.raises(ValueError, match="unknown content hash"):
        Hasher("md5", 1)
