"""The data filter's rules hold with and without ``tarfile``'s own filter (Python 3.11.2 has none)."""

from __future__ import annotations

import io
import os
import stat
import tarfile

import pytest

from labrun.agent import _tarcompat
from labrun.agent._tarcompat import ArchiveRefused, extract_data


@pytest.fixture(params=["tarfile-filter", "own-rules"])
def filter_kind(request, monkeypatch):
    if request.param == "own-rules":
        monkeypatch.setattr(_tarcompat, "HAS_DATA_FILTER", False)
    elif not _tarcompat.HAS_DATA_FILTER:
        pytest.skip("this interpreter has no tarfile extraction filters")
    return request.param


def archive(*members: tuple[tarfile.TarInfo, bytes | None]) -> tarfile.TarFile:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    buffer.seek(0)
    return tarfile.open(fileobj=buffer, mode="r:")


def file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.uid = info.gid = 4242
    return info, data


def entry(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = 0o755
    return info, None


def test_files_and_directories_are_extracted_with_safe_modes(tmp_path, filter_kind):
    dest = tmp_path / "dest"
    extract_data(archive(entry("pkg", tarfile.DIRTYPE), file("pkg/train.py", b"print(1)\n", 0o6777),
                         file("data.txt", b"abc", 0o600)), dest)
    assert (dest / "pkg" / "train.py").read_bytes() == b"print(1)\n"
    mode = stat.S_IMODE(os.stat(dest / "pkg" / "train.py").st_mode)
    assert mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | 0o022) == 0
    assert mode & 0o700 == 0o700
    assert (dest / "data.txt").read_bytes() == b"abc"
    assert os.stat(dest / "data.txt").st_uid == os.getuid()   # never the archive's owner


@pytest.mark.parametrize("name", ["../escape", "a/../../escape"])
def test_names_outside_the_destination_are_refused(tmp_path, filter_kind, name):
    dest = tmp_path / "dest"
    with pytest.raises(ArchiveRefused):
        extract_data(archive(file(name)), dest)
    assert not (tmp_path / "escape").exists()


def test_absolute_names_land_inside_the_destination(tmp_path, filter_kind):
    dest = tmp_path / "dest"
    extract_data(archive(file("/labrun-tarcompat/abs.txt", b"inside")), dest)
    assert (dest / "labrun-tarcompat" / "abs.txt").read_bytes() == b"inside"


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_links_and_special_files_are_refused_by_the_fallback(tmp_path, monkeypatch, kind):
    # tarfile's own data filter allows links inside the destination; the agent's caller refuses them
    # before extracting. The fallback refuses them itself, so nothing depends on that order.
    monkeypatch.setattr(_tarcompat, "HAS_DATA_FILTER", False)
    with pytest.raises(ArchiveRefused, match="not a regular file"):
        extract_data(archive(entry("x", kind, "/etc/passwd")), tmp_path / "dest")


def test_fallback_never_writes_through_a_link_already_in_the_destination(tmp_path, monkeypatch):
    monkeypatch.setattr(_tarcompat, "HAS_DATA_FILTER", False)
    target = tmp_path / "victim"
    target.write_text("untouched")
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "f").symlink_to(target)
    (dest / "d").symlink_to(outside)
    extract_data(archive(file("f", b"new")), dest)
    assert target.read_text() == "untouched"
    assert (dest / "f").read_bytes() == b"new" and not (dest / "f").is_symlink()
    with pytest.raises(ArchiveRefused, match="non-directory|link"):
        extract_data(archive(file("d/g", b"new")), dest)
    assert not (outside / "g").exists()
