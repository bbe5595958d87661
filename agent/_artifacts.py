"""A run's files, under the names Azure ML users know.

- ``outputs/<path>``: the run's ``./outputs`` (``<run dir>/snapshot/outputs``);
- ``user_logs/<name>``: its logs (``<run dir>/logs``: ``std_log.txt``, ``std_log_process_<rank>.txt``,
  ``environment_build.txt``);
- ``snapshot/<path>``: the source snapshot the run started from (read-only; listed only when asked,
  for ``Run.restore_snapshot()``);
- anything else: files the run uploaded (``<run dir>/artifacts/<name>``).

Names are relative paths; a name that would leave its directory is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from labrun.protocol import BadRequest

OUTPUTS = "outputs/"
LOGS = "user_logs/"
SNAPSHOT = "snapshot/"


def artifact_path(run_dir: Path, name: str) -> Path:
    parts = Path(name).parts
    if not parts or name.startswith("/") or ".." in parts:
        raise BadRequest(f"file name {name!r} must be a relative path without '..'")
    if name.startswith(OUTPUTS):
        base, rest = run_dir / "snapshot" / "outputs", name[len(OUTPUTS):]
    elif name.startswith(LOGS):
        base, rest = run_dir / "logs", name[len(LOGS):]
    elif name.startswith(SNAPSHOT):
        base, rest = run_dir / "snapshot", name[len(SNAPSHOT):]
    else:
        base, rest = run_dir / "artifacts", name
    if not rest:
        raise BadRequest(f"file name {name!r} names a directory, not a file")
    return base / rest


def list_files(run_dir: Path, snapshot: bool = False) -> list[dict]:
    """Every file of the run, as ``{"name", "size"}``, sorted by name; with ``snapshot``, its source snapshot's."""
    found = []
    places = ((OUTPUTS, run_dir / "snapshot" / "outputs"), (LOGS, run_dir / "logs"), ("", run_dir / "artifacts"))
    if snapshot:
        places = ((SNAPSHOT, run_dir / "snapshot"),)
    for prefix, base in places:
        if not base.is_dir():
            continue
        for directory, dirs, files in os.walk(base):
            if prefix == SNAPSHOT and directory == str(base):
                dirs[:] = [d for d in dirs if d != "outputs"]   # the run's outputs, not its source
            for file in files:
                path = Path(directory, file)
                if path.is_file():
                    found.append({"name": prefix + str(path.relative_to(base)), "size": path.stat().st_size})
    return sorted(found, key=lambda f: f["name"])
