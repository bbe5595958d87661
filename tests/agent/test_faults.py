"""Fault handling without a real full disk: classification, retries with a capped backoff, the probe, the reserve."""

import errno
import sqlite3

import pytest
import trio

from labrun.agent._faults import RESERVE_BYTES, RETRY_MAX_SECONDS, Faults, is_disk_error


def disk_full() -> sqlite3.OperationalError:
    db = sqlite3.connect(":memory:")
    try:
        db.execute("PRAGMA max_page_count = 1")
        db.execute("CREATE TABLE t (x)")
        db.execute("INSERT INTO t VALUES (zeroblob(100000))")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        db.close()
    raise AssertionError("SQLite did not report a full database")


def test_what_counts_as_a_disk_fault():
    assert is_disk_error(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_error(OSError(errno.EIO, "Input/output error"))
    assert is_disk_error(disk_full())
    assert not is_disk_error(OSError(errno.ENOENT, "No such file"))
    assert not is_disk_error(sqlite3.OperationalError("no such table: runs"))
    assert not is_disk_error(ValueError("x"))


async def test_retry_backs_off_to_a_cap_and_clears(autojump_clock):
    faults = Faults()
    attempts, cleared = [], []
    faults.on_clear = lambda: cleared.append(True)

    def write():
        attempts.append(trio.current_time())
        if len(attempts) < 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return "written"

    assert await faults.retry("store", write) == "written"
    gaps = [b - a for a, b in zip(attempts, attempts[1:])]
    assert gaps == sorted(gaps) and gaps[-1] == RETRY_MAX_SECONDS and gaps[0] < 1
    assert faults.status() == [] and cleared == [True]


async def test_retry_lets_other_errors_through(autojump_clock):
    def write():
        raise sqlite3.OperationalError("no such table: runs")

    with pytest.raises(sqlite3.OperationalError):
        await Faults().retry("store", write)


async def test_the_probe_clears_faults_that_nothing_retries(autojump_clock, tmp_path):
    faults = Faults(tmp_path / "reserve")
    faults.keep_reserve()
    assert (tmp_path / "reserve").stat().st_size == RESERVE_BYTES
    disk = {"full": True}

    def probe():
        if disk["full"]:
            raise OSError(errno.ENOSPC, "No space left on device")

    async with trio.open_nursery() as nursery:
        await nursery.start(faults.watch, probe)
        faults.report("files", OSError(errno.ENOSPC, "No space left on device", "/state/uploads/x"))
        assert not (tmp_path / "reserve").exists()   # given up at the first fault
        status = faults.status()
        assert status[0]["where"] == "files" and "No space left" in status[0]["error"]
        await trio.sleep(60)
        assert faults.disk_failing
        disk["full"] = False
        await trio.sleep(RETRY_MAX_SECONDS + 1)
        assert not faults.disk_failing
        assert (tmp_path / "reserve").exists()   # made again
        nursery.cancel_scope.cancel()
