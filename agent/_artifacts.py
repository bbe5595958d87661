"""A run's files, under the names Azure ML users know.

- ``outputs/<path>``: the run's ``./outputs`` (``RunDir.outputs``);
- ``user_logs/<name>``: its logs (``RunDir.logs``: ``std_log.txt``, ``std_log_process_<rank>.txt``,
  ``environment_build.txt``);
- anything else: files the run uploaded (``RunDir.artifacts``).

Names are relative paths; a name that would leave its directory is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

from labrun.protocol import BadRequest

from ._rundir import RunDir

OUTPUTS = "outputs/"
LOGS = "user_logs/"


def artifact_path(run_dir: RunDir, name: str) -> Path:
    parts = Path(name).parts
    if not parts or name.startswith("/") or ".." in parts:
        raise BadRequest(f"file name {name!r} must be a relative path without '..'")
    if name.startswith(OUTPUTS):
        base, rest = run_dir.outputs, name[len(OUTPUTS):]
    elif name.startswith(LOGS):
        base, rest = run_dir.logs, name[len(LOGS):]
    else:
        base, rest = run_dir.artifacts, name
    if not rest:
        raise BadRequest(f"file name {name!r} names a directory, not a file")
    return base / rest


def list_files(run_dir: RunDir) -> list[dict]:
    """Every file of the run, as ``{"name", "size"}``, sorted by name."""
    found = []
    for prefix, base in ((OUTPUTS, run_dir.outputs), (LOGS, run_dir.logs), ("", run_dir.artifacts)):
        if not base.is_dir():
            continue
        for directory, _dirs, files in os.walk(base):
            for file in files:
                path = Path(directory, file)
                if path.is_file():
                    found.append({"name": prefix + str(path.relative_to(base)), "size": path.stat().st_size})
    return sorted(found, key=lambda f: f["name"])
