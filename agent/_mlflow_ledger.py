"""What the MLflow mirror has delivered, per tracking server: its event cursor and, per run, how far it got.

Two tables of the mirror's own in the agent's database, written through the store's connection so
that they join its group commits (a second connection would wait on the store's open batch). A
row is written only after MLflow accepted what it records, so a restart resumes where delivery
stood:

- ``mlflow_runs``: the MLflow run of each labrun run (``mlflow_run_id`` NULL while its creation
  is unconfirmed: the next attempt looks for it before creating another), the last metric row
  sent, the next step per metric name, what was sent of params, tags, status and artifacts;
- ``mlflow_cursor``: the last event seq whose runs are fully mirrored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

SCHEMA = ("""
CREATE TABLE IF NOT EXISTS mlflow_runs (
    tracking_uri TEXT NOT NULL,
    run_id TEXT NOT NULL,
    mlflow_run_id TEXT,
    experiment_id TEXT,
    artifact_uri TEXT,
    metric_id INTEGER NOT NULL DEFAULT 0,
    counters TEXT NOT NULL DEFAULT '{}',
    params_sent INTEGER NOT NULL DEFAULT 0,
    tags_hash TEXT,
    status_sent TEXT,
    artifacts_sent INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tracking_uri, run_id)
)""", "CREATE TABLE IF NOT EXISTS mlflow_cursor (tracking_uri TEXT PRIMARY KEY, seq INTEGER NOT NULL)")

_FIELDS = ("mlflow_run_id", "experiment_id", "artifact_uri", "metric_id", "counters", "params_sent", "tags_hash",
           "status_sent", "artifacts_sent", "done")
_FLAGS = ("artifacts_sent", "done")


@dataclass
class Entry:
    run_id: str
    mlflow_run_id: str | None = None
    experiment_id: str | None = None
    artifact_uri: str | None = None
    metric_id: int = 0
    counters: dict = field(default_factory=dict)
    params_sent: int = 0           # 1: the run configuration's; 2: the script's arguments too
    tags_hash: str | None = None
    status_sent: str | None = None
    artifacts_sent: bool = False
    done: bool = False


class Ledger:
    def __init__(self, store, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self._db = store._db   # the store's connection, on purpose: see above
        for statement in SCHEMA:   # one by one: executescript would commit the store's open batch
            self._db.execute(statement)

    def cursor(self) -> int:
        row = self._db.execute("SELECT seq FROM mlflow_cursor WHERE tracking_uri = ?", (self.tracking_uri,)).fetchone()
        return row[0] if row else 0

    def set_cursor(self, seq: int) -> None:
        self._db.execute("INSERT INTO mlflow_cursor (tracking_uri, seq) VALUES (?, ?) "
                         "ON CONFLICT(tracking_uri) DO UPDATE SET seq = excluded.seq", (self.tracking_uri, seq))

    def get(self, run_id: str) -> Entry | None:
        row = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM mlflow_runs WHERE tracking_uri = ? AND run_id = ?",
                               (self.tracking_uri, run_id)).fetchone()
        if row is None:
            return None
        values = dict(zip(_FIELDS, row))
        values["counters"] = json.loads(values["counters"])
        for flag in _FLAGS:
            values[flag] = bool(values[flag])
        return Entry(run_id, **values)

    def put(self, entry: Entry) -> None:
        values = [getattr(entry, f) for f in _FIELDS]
        values[_FIELDS.index("counters")] = json.dumps(entry.counters)
        self._db.execute(
            f"INSERT OR REPLACE INTO mlflow_runs (tracking_uri, run_id, {', '.join(_FIELDS)}) "
            f"VALUES ({', '.join('?' * (len(_FIELDS) + 2))})", (self.tracking_uri, entry.run_id, *values))

    def forget(self, run_id: str) -> None:
        self._db.execute("DELETE FROM mlflow_runs WHERE tracking_uri = ? AND run_id = ?", (self.tracking_uri, run_id))
