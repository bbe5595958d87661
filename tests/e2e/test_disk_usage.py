"""The disk runs use (``labrun status``) counts what is inside the run directories and nothing else, whatever
their owners plant or swap in while they are measured."""

import json
import os

import pytest

from labrun.agent import _retention
from labrun.agent._retention import disk_usage

BIG = 8 << 20


def outside(tmp_path):
    """A big directory outside the run directories, which no run's count may include."""
    big = tmp_path / "outside"
    big.mkdir()
    (big / "big.bin").write_bytes(os.urandom(BIG))
    return big


def test_status_does_not_count_a_planted_link(agent, source, tmp_path):
    big = outside(tmp_path)
    planted = json.loads(agent.cli("run", "--source-dir", str(source), "--json", "--", "sh", "-c",
                                   f"mkdir -p outputs && ln -s {big} outputs/big && echo 1 > outputs/small",
                                   check=True).stdout)
    assert os.path.islink(agent.state_dir / "runs" / planted["run_id"] / "snapshot" / "outputs" / "big")
    disk = json.loads(agent.cli("status", "--json", check=True).stdout)["disk"]
    assert 0 < disk["runs_bytes"] < BIG


@pytest.mark.parametrize("when", ["after its parent was listed", "as it is about to be listed"])
def test_a_directory_swapped_for_a_link_while_it_is_walked_is_not_entered(tmp_path, monkeypatch, when):
    big = outside(tmp_path)
    runs = tmp_path / "runs"
    run_dir = runs / "r1"
    outputs = run_dir / "outputs"
    outputs.mkdir(parents=True)
    (outputs / "model.bin").write_bytes(os.urandom(64 << 10))
    (run_dir / "twice.bin").write_bytes(os.urandom(64 << 10))
    os.link(run_dir / "twice.bin", run_dir / "again.bin")
    honest = disk_usage(runs)
    assert 128 << 10 <= honest < 1 << 20   # the hard link counted once

    # Its owner swaps outputs/ for a link to the big directory while the walk is under way.
    listed, real = os.scandir, outputs.stat()

    def swap():
        if not outputs.is_symlink():
            outputs.rename(tmp_path / "moved")
            outputs.symlink_to(big)

    def is_outputs(path) -> bool:
        if isinstance(path, int):
            return os.path.samestat(os.fstat(path), real)
        return os.path.basename(os.fspath(path)) == "outputs"

    def scandir(path):
        if when == "as it is about to be listed" and is_outputs(path):
            swap()
        with listed(path) as listing:
            entries = list(listing)
        if when == "after its parent was listed" and "outputs" in [e.name for e in entries]:
            swap()
        return Listing(entries)

    monkeypatch.setattr(os, "scandir", scandir)
    assert disk_usage(runs) <= honest
    assert outputs.is_symlink()


def test_a_tree_deeper_than_the_walk_enters_still_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(_retention, "MAX_DEPTH", 4)
    deep = tmp_path / "runs" / "a" / "b" / "c" / "d" / "e"
    deep.mkdir(parents=True)
    (deep / "hidden.bin").write_bytes(os.urandom(1 << 20))
    (tmp_path / "runs" / "a" / "shown.bin").write_bytes(os.urandom(64 << 10))
    assert 64 << 10 <= disk_usage(tmp_path / "runs") < 1 << 20
    assert disk_usage(tmp_path / "missing") == 0


class Listing:
    """What ``os.scandir`` returns: an iterator over entries that is also a context manager."""

    def __init__(self, entries):
        self._entries = iter(entries)

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._entries)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def close(self):
        pass
