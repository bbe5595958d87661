"""``DataPath``: what a run resumes from: a local path, or a path inside an earlier run's files."""

from __future__ import annotations

import os


class DataPath:
    def __init__(self, datastore=None, path_on_datastore=None, name=None):
        # labrun has no datastores: a single string is a local path.
        path = path_on_datastore if path_on_datastore is not None else datastore
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError("DataPath needs a path: DataPath('/data/ckpt') or DataPath.from_run(run, 'outputs/ckpt')")
        self.path_on_datastore = os.fspath(path)
        self.name = name
        self._run_id = None

    @classmethod
    def from_run(cls, run, path: str) -> "DataPath":
        """``path`` among the run's files, e.g. ``outputs/ckpt``."""
        data_path = cls(path_on_datastore=path)
        data_path._run_id = run.id if hasattr(run, "id") else str(run)
        return data_path

    def _to_wire(self) -> dict:
        if self._run_id is not None:
            return {"path": self.path_on_datastore, "run_id": self._run_id}
        return {"path": os.path.abspath(self.path_on_datastore), "run_id": None}

    def __repr__(self) -> str:
        where = f"run {self._run_id}: " if self._run_id else ""
        return f"DataPath({where}{self.path_on_datastore})"
