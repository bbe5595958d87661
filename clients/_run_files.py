"""A run's logs and source snapshot as files on this machine: ``get_details()["logFiles"]``,
``restore_snapshot()`` and ``get_snapshot_id()``.

Everything is found and read through the agent (its ``files`` and ``download`` operations), so it works
whatever part of the agent's state directory this process may open: for the owner of a run on a system
agent, for an admin reading another user's run, and from inside a container.

- A log's value in ``logFiles`` is its path in the run directory when this process can open it. Otherwise
  it is a copy in this user's cache (``$XDG_CACHE_HOME/labrun/logs/<run id>/``), brought up to date on
  each call by downloading only what was appended since the last one (Azure ML gives a URL to the log's
  current contents instead).
- ``restore_snapshot()`` writes a zip of the source the run was submitted with, as the agent stored it at
  submit: later changes the run made in its working directory are not in it, as in Azure ML.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
import zipfile

from labrun.protocol._manifest import tree_hash

from .exceptions import NotFound, SnapshotException, UserErrorException

LOGS = "user_logs/"
LOG_NAME = LOGS + "std_log.txt"


# -- logFiles -------------------------------------------------------------------------------

def log_files(run, details: dict) -> dict:
    """``{"user_logs/<name>": path}`` for every log of the run (see the module docstring)."""
    if details.get("files_removed_at"):
        return {}
    run_dir = details.get("run_dir")
    listed = run._workspace._call("files", run_id=run.id, area="logs")
    found = {}
    for log in listed:
        here = os.path.join(run_dir, "logs", log["name"][len(LOGS):]) if run_dir else None
        found[log["name"]] = here if here and os.access(here, os.R_OK) else _local_copy(run, log["name"], log["size"])
    if not listed and not details.get("interactive") and run_dir:
        # Not written yet (a queued run): where it will be, if this process can look there.
        logs = os.path.join(run_dir, "logs")
        if os.access(logs, os.X_OK):
            found[LOG_NAME] = os.path.join(logs, "std_log.txt")
    return found


def _cache_root() -> str:
    """This user's private directory for copies of logs: under ``$XDG_CACHE_HOME`` (``~/.cache``), else
    ``<tmp>/labrun-<uid>`` where there is no usable home (a system user, a container)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(base, "labrun", "logs")
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        if os.access(root, os.W_OK | os.X_OK):
            return root
    except OSError:
        pass
    private = os.path.join(tempfile.gettempdir(), f"labrun-{os.getuid()}")
    try:
        os.mkdir(private, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(private)
    # A shared temporary directory: someone else could have made this name first.
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise UserErrorException(f"{private} is not this user's private directory; set XDG_CACHE_HOME to a "
                                 "directory of yours to keep copies of run logs in")
    return os.path.join(private, "logs")


def _local_copy(run, name: str, size: int) -> str:
    """A copy of the run's log ``name`` in this user's cache, with the agent's first ``size`` bytes at least."""
    target = os.path.join(_cache_root(), run.id, *name[len(LOGS):].split("/"))
    os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
    try:
        have = os.path.getsize(target)
    except FileNotFoundError:
        have = 0
    if have > size:   # not the same log (a run id used again on another agent): start over
        have = 0
    if have == size and os.path.exists(target):
        return target
    with open(target, "r+b" if have else "wb") as copy:
        copy.seek(have)
        copy.truncate()
        for item in run._workspace._stream("download", run_id=run.id, name=name, offset=have):
            copy.write(item["data"])
    return target


# -- the snapshot -----------------------------------------------------------------------------

def _snapshot_listing(run) -> list[dict]:
    try:
        return run._workspace._call("files", run_id=run.id, area="snapshot")
    except NotFound as exc:
        raise SnapshotException(str(exc)) from None


def snapshot_id(run) -> str:
    """The snapshot's id: the hash of its manifest (runs of the same source share it)."""
    return _snapshot_id(_snapshot_listing(run))


def _snapshot_id(listing: list[dict]) -> str:
    return tree_hash([(f["name"], f["size"], f["mode"], f["hash"]) for f in listing])


def restore_snapshot(run, snapshot_id=None, path=None) -> str:
    """A zip of the run's source snapshot: ``<path or the temporary directory>/<snapshot id>.zip``, as in
    Azure ML (a ``path`` ending in ``.zip`` names the file itself). Returns its absolute path."""
    listing = _snapshot_listing(run)
    current = _snapshot_id(listing)
    if snapshot_id is not None and snapshot_id != current:
        raise SnapshotException(f"run {run.id}'s snapshot is {current}, not {snapshot_id}")
    if path is not None and str(path).endswith(".zip") and not os.path.isdir(path):
        target = os.path.abspath(path)
    else:
        directory = os.path.abspath(path or tempfile.gettempdir())
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, current + ".zip")
    fd, partial = tempfile.mkstemp(prefix=".snapshot-", suffix=".zip.part", dir=os.path.dirname(target))
    os.close(fd)
    try:
        moment = time.localtime()[:6]
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
            for entry in listing:
                info = zipfile.ZipInfo(entry["name"], date_time=moment)
                info.external_attr = (stat.S_IFREG | (entry["mode"] & 0o7777)) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(info, "w", force_zip64=entry["size"] >= 1 << 31) as out:
                    for item in run._workspace._stream("download", run_id=run.id, name=entry["name"],
                                                       area="snapshot"):
                        out.write(item["data"])
        os.replace(partial, target)
    except BaseException:
        os.unlink(partial)
        raise
    return target
