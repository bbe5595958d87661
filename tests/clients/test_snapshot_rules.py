"""What a snapshot takes: never ``.git``; and an over-limit tree gets a message that says where its weight is."""

import pytest

from labrun._snapshot import collect_files
from labrun.exceptions import SnapshotException


def test_git_is_never_taken_whatever_the_ignore_file_says(tmp_path):
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "pack").write_text("x")
    (tmp_path / "sub" / ".git").mkdir(parents=True)   # a nested repository
    (tmp_path / "sub" / ".git" / "HEAD").write_text("x")
    (tmp_path / "vendored").mkdir()
    (tmp_path / "vendored" / ".git").write_text("gitdir: ../.git/modules/vendored")   # a submodule's .git file
    (tmp_path / "train.py").write_text("")
    (tmp_path / ".labrunignore").write_text("!.git\n!.git/**\n")
    assert [name for name, *_ in collect_files(tmp_path)] == [".labrunignore", "train.py"]


def test_over_the_file_limit_names_the_count_the_heaviest_directories_and_the_way_out(tmp_path):
    for directory, count in (("node_modules", 1500), ("data", 700), ("src", 3)):
        (tmp_path / directory).mkdir()
        for i in range(count):
            (tmp_path / directory / f"f{i}").write_text("")
    (tmp_path / ".git").mkdir()
    for i in range(3000):   # .git does not count
        (tmp_path / ".git" / f"o{i}").write_text("")
    with pytest.raises(SnapshotException) as info:
        collect_files(tmp_path)
    message = str(info.value)
    assert "Your project has 2,203 files, more than 2000 files" in message
    assert "the most are in node_modules/ (1,500 files), data/ (700 files), src/ (3 files)" in message
    assert ".labrunignore" in message and "labrun run --in-place" in message


def test_over_the_size_limit_names_the_largest(tmp_path):
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "huge.bin", "wb") as f:   # sparse: no real disk used
        f.truncate(320 * 1000 * 1000)
    (tmp_path / "train.py").write_text("print()\n")
    with pytest.raises(SnapshotException) as info:
        collect_files(tmp_path)
    message = str(info.value)
    assert "Your total snapshot size is 320.0 MB and exceeds the limit of 300.0 MB" in message
    assert "the largest are data/ (320.0 MB), train.py (0.0 MB)" in message and "--in-place" in message
