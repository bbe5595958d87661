"""Names are checked in one place, and opens never follow a link: the pure checks and the primitives."""

from __future__ import annotations

import os
import pwd
import threading

import pytest

from labrun.agent import _asuser
from labrun.agent._artifacts import parse_name
from labrun.agent._asuser import Credentials, acting_as, make_dirs_beneath, open_beneath, open_directory
from labrun.protocol import BadRequest


@pytest.mark.parametrize("name, problem", [
    ("user_logs//etc/shadow", "empty path component"),
    ("outputs//etc/cron.d/x", "empty path component"),
    ("outputs//", "names a directory"),
    ("/etc/shadow", "absolute path"),
    ("outputs/../../../../etc/shadow", "'..'"),
    ("user_logs/../x", "'..'"),
    ("artifacts/../../runs", "'..'"),
    ("..", "'..'"),
    ("outputs/./model", "'.'"),
    ("outputs/a\0b", "NUL"),
    ("outputs/a\x1b[2Jb", "control character"),
    ("outputs/", "names a directory"),
    ("user_logs/", "names a directory"),
    ("x/", "names a directory"),
    ("", "is empty"),
    ("a/" * 3000, "longer than"),
    ("outputs/" + "x" * 300, "component longer"),
])
def test_bad_names_are_refused_naming_the_problem(name, problem):
    with pytest.raises(BadRequest, match=problem.replace(".", r"\.").replace("(", r"\(")):
        parse_name(name)


@pytest.mark.parametrize("name, where", [
    ("outputs/model.pt", ("snapshot/outputs", "model.pt")),
    ("outputs/a/b/c.txt", ("snapshot/outputs", "a/b/c.txt")),
    ("user_logs/std_log.txt", ("logs", "std_log.txt")),
    ("plots/loss.png", ("artifacts", "plots/loss.png")),
    ("outputs..x/y", ("artifacts", "outputs..x/y")),
])
def test_good_names_map_to_their_area(name, where):
    assert parse_name(name) == where


@pytest.fixture(params=["openat2", "walk"])
def opener(request, monkeypatch):
    """Both ways of opening beneath a directory: openat2, and the O_NOFOLLOW walk kept for old kernels."""
    if request.param == "walk":
        monkeypatch.setattr(_asuser, "_openat2_missing", True)
    return request.param


def test_no_link_is_followed_anywhere_on_the_path(tmp_path, opener):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "file").write_text("x")
    (tmp_path / "dirlink").symlink_to(tmp_path / "real")
    (tmp_path / "filelink").symlink_to(tmp_path / "real" / "file")
    (tmp_path / "real" / "up").symlink_to("..")
    fd = open_directory(tmp_path)
    try:
        os.close(open_beneath(fd, "real/file", os.O_RDONLY))
        for path in ("dirlink/file", "filelink", "real/up/real/file"):
            with pytest.raises(OSError) as caught:
                open_beneath(fd, path, os.O_RDONLY)
            assert caught.value.errno in (40, 20), path   # ELOOP (or ENOTDIR from the walk)
        for path in ("../x", "/etc/passwd", "a//b", "./x"):
            with pytest.raises(OSError):
                open_beneath(fd, path, os.O_RDONLY)
        with pytest.raises(OSError):
            make_dirs_beneath(fd, "dirlink/new")
        assert not (tmp_path / "real" / "new").exists()
    finally:
        os.close(fd)


def test_the_root_of_a_beneath_open_must_not_be_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError):
        open_directory(tmp_path / "link")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching credentials needs root")
def test_as_user_takes_the_users_rights_on_this_thread_only(shared_tmp, opener):
    nobody = pwd.getpwnam("nobody")
    creds = Credentials.of(nobody.pw_uid, nobody.pw_gid)
    tmp_path = shared_tmp("threads")
    (tmp_path / "theirs").mkdir()
    os.chown(tmp_path / "theirs", nobody.pw_uid, nobody.pw_gid)
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    seen = {}
    switched, release = threading.Event(), threading.Event()

    def other_thread():
        with acting_as(creds):
            switched.set()
            release.wait(10)

    worker = threading.Thread(target=other_thread)
    worker.start()
    switched.wait(10)
    # Another thread switched: this one still has root's rights.
    seen["main reads"] = secret.read_text()
    release.set()
    worker.join()
    with acting_as(creds):
        with pytest.raises(PermissionError):
            secret.read_text()
        fd = open_directory(tmp_path / "theirs")
        os.close(open_beneath(fd, "made", os.O_WRONLY | os.O_CREAT))
        os.close(fd)
    assert seen["main reads"] == "root only"
    assert (tmp_path / "theirs" / "made").stat().st_uid == nobody.pw_uid
    assert secret.read_text() == "root only"   # restored


def test_run_directories_an_older_agent_left_open_are_narrowed(tmp_path):
    from labrun.agent._asuser import narrow_children

    (tmp_path / "open").mkdir(mode=0o755)
    (tmp_path / "open").chmod(0o755)
    (tmp_path / "private").mkdir(mode=0o700)
    (tmp_path / "elsewhere").mkdir(mode=0o755)
    (tmp_path / "elsewhere").chmod(0o755)
    runs = tmp_path / "runs"
    runs.mkdir()
    for name in ("open", "private"):
        (tmp_path / name).rename(runs / name)
    (runs / "link").symlink_to(tmp_path / "elsewhere")
    assert narrow_children(runs) == 1
    assert {p.name: p.stat().st_mode & 0o777 for p in runs.iterdir() if not p.is_symlink()} == \
        {"open": 0o700, "private": 0o700}
    assert (tmp_path / "elsewhere").stat().st_mode & 0o777 == 0o755   # a link is not followed
