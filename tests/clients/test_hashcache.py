"""The client's hash cache: an unchanged file is never read twice, and a changed one is always noticed."""

import hashlib
import os

import msgpack
import pytest

from labrun import _hashcache
from labrun._snapshot import build_manifest
from labrun.protocol._content_hash import CHUNK, CHUNKED, content_hash

OLD = 1_600_000_000 * 10**9


@pytest.fixture
def reads(monkeypatch):
    """Every file the client reads to hash it."""
    seen = []
    original = _hashcache.hash_file

    def spy(path, *args):
        seen.append(os.path.basename(path))
        return original(path, *args)

    monkeypatch.setattr(_hashcache, "hash_file", spy)
    return seen


def write(path, data: bytes, mtime_ns: int = OLD):
    path.write_bytes(data)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def digests(manifest) -> dict:
    return {name: digest for name, size, mode, digest in manifest}


def test_unchanged_files_are_not_read_again(tmp_path, reads):
    for i in range(20):
        write(tmp_path / f"f{i}", f"content {i}".encode())
    first, _ = build_manifest(tmp_path)
    assert len(reads) == 20
    reads.clear()
    second, _ = build_manifest(tmp_path)
    assert reads == [] and second == first
    assert digests(first)["f3"] == hashlib.sha256(b"content 3").hexdigest()


def test_a_change_that_keeps_the_mtime_is_seen_through_the_size(tmp_path, reads):
    write(tmp_path / "model.py", b"x = 1\n")
    build_manifest(tmp_path)
    write(tmp_path / "model.py", b"x = 12\n")   # same mtime, one byte longer
    reads.clear()
    manifest, _ = build_manifest(tmp_path)
    assert reads == ["model.py"]
    assert digests(manifest)["model.py"] == hashlib.sha256(b"x = 12\n").hexdigest()


def test_a_replaced_file_is_seen_through_its_inode(tmp_path, reads):
    write(tmp_path / "a", b"one")
    build_manifest(tmp_path)
    write(tmp_path / "new", b"two")   # same size and mtime, another inode
    os.replace(tmp_path / "new", tmp_path / "a")
    reads.clear()
    manifest, _ = build_manifest(tmp_path)
    assert reads == ["a"] and digests(manifest)["a"] == hashlib.sha256(b"two").hexdigest()


def test_a_file_modified_just_now_is_not_trusted(tmp_path, reads):
    (tmp_path / "hot").write_bytes(b"being edited")   # mtime: now, within a clock tick of the hash
    build_manifest(tmp_path)
    build_manifest(tmp_path)
    assert reads == ["hot", "hot"]


def test_a_corrupt_or_unwritable_cache_costs_time_never_correctness(tmp_path, reads, hash_cache):
    src = tmp_path / "src"
    src.mkdir()
    write(src / "a", b"data")
    build_manifest(src)
    (cache_file,) = (hash_cache / "labrun" / "hashes").iterdir()
    cache_file.write_bytes(b"\xc1 not msgpack")
    reads.clear()
    manifest, _ = build_manifest(src)
    assert reads == ["a"] and digests(manifest)["a"] == hashlib.sha256(b"data").hexdigest()
    cache_file.write_bytes(b"\x93\x01\x02\x03")   # valid msgpack, wrong shape
    reads.clear()
    build_manifest(src)
    assert reads == ["a"]
    assert list(cache_file.parent.iterdir()) == [cache_file]   # written by rename: no temporary left behind
    os.environ["XDG_CACHE_HOME"] = "/proc/no-such-dir"
    try:
        assert digests(build_manifest(src)[0])["a"] == hashlib.sha256(b"data").hexdigest()
    finally:
        os.environ["XDG_CACHE_HOME"] = str(hash_cache)


def test_manifest_modes_links_and_ignores(tmp_path):
    write(tmp_path / "run.sh", b"#!/bin/sh\n")
    (tmp_path / "run.sh").chmod(0o755)
    write(tmp_path / "skip.log", b"noise")
    write(tmp_path / ".labrunignore", b"*.log\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "data", b"d")
    (tmp_path / "link").symlink_to("sub/data")
    (tmp_path / "loop").symlink_to(".")   # a link to a directory is not followed
    (tmp_path / "broken").symlink_to("nowhere")
    manifest, paths = build_manifest(tmp_path)
    names = [entry[0] for entry in manifest]
    assert names == [".labrunignore", "link", "run.sh", "sub/data"]
    modes = {entry[0]: entry[2] for entry in manifest}
    assert modes["run.sh"] == 0o755
    assert digests(manifest)["link"] == digests(manifest)["sub/data"]


def test_a_tree_holding_the_hash_cache_never_snapshots_it(tmp_path, monkeypatch):
    # Submitting from a home directory: the cache under ~/.cache changes while the tree is read.
    from labrun._snapshot import build_manifest

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / ".cache"))
    (tmp_path / "train.py").write_text("print(1)\n")
    build_manifest(tmp_path)
    assert any((tmp_path / ".cache" / "labrun" / "hashes").iterdir())
    names = [entry[0] for entry in build_manifest(tmp_path)[0]]
    assert names == ["train.py"]


def test_each_form_of_a_large_files_hash_has_its_own_place(tmp_path, reads, hash_cache):
    big, small = os.urandom(CHUNK + 1), b"small"
    write(tmp_path / "big", big)
    write(tmp_path / "small", small)
    chunked = digests(build_manifest(tmp_path, form=CHUNKED)[0])
    assert chunked == {"big": content_hash(big, CHUNKED), "small": hashlib.sha256(small).hexdigest()}
    assert sorted(reads) == ["big", "small"]
    reads.clear()
    # Known by chunks only: read again for an agent that takes SHA-256 only. A small file has one hash for both.
    plain = digests(build_manifest(tmp_path)[0])
    assert plain == {"big": hashlib.sha256(big).hexdigest(), "small": hashlib.sha256(small).hexdigest()}
    assert reads == ["big"]
    reads.clear()
    assert digests(build_manifest(tmp_path, form=CHUNKED)[0]) == chunked   # both kept: nothing read
    assert digests(build_manifest(tmp_path)[0]) == plain
    assert reads == []
    # What an older client reads, the fifth place, is only ever a SHA-256.
    (cache_file,) = (hash_cache / "labrun" / "hashes").iterdir()
    files = msgpack.unpackb(cache_file.read_bytes())["files"]
    assert files["big"][4:] == [hashlib.sha256(big).hexdigest(), content_hash(big, CHUNKED)]
    assert files["small"][4:] == [hashlib.sha256(small).hexdigest()]


def test_a_large_file_known_by_chunks_only_is_no_sha256_to_an_older_client(tmp_path, hash_cache):
    big = os.urandom(CHUNK + 1)
    write(tmp_path / "big", big)
    build_manifest(tmp_path, form=CHUNKED)
    (cache_file,) = (hash_cache / "labrun" / "hashes").iterdir()
    entry = msgpack.unpackb(cache_file.read_bytes())["files"]["big"]
    assert entry[4] is None and entry[5] == content_hash(big, CHUNKED)
    # A cache an older client wrote (five places) serves SHA-256 and lacks the form by chunks.
    cache_file.write_bytes(msgpack.packb({"root": str(tmp_path.resolve()),
                                          "files": {"big": entry[:4] + [hashlib.sha256(big).hexdigest()]}}))
    cache = _hashcache.HashCache(str(tmp_path), CHUNKED)
    assert cache.cached("big", os.stat(tmp_path / "big")) is None
    plain = _hashcache.HashCache(str(tmp_path))
    assert plain.cached("big", os.stat(tmp_path / "big")) == hashlib.sha256(big).hexdigest()
