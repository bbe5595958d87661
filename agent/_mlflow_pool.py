"""MLflow runs made ahead of need, so that a run which starts at once gets ``MLFLOW_RUN_ID`` without waiting.

MLflow makes its run ids itself: a run's ``MLFLOW_RUN_ID`` exists only once ``runs/create`` has
answered, a round trip that would otherwise sit between submit and start. So, per MLflow
experiment where runs have lately started before their own MLflow run existed, the mirror keeps a
few MLflow runs ready, and such a run takes one at once (``take``); the mirror then gives it the
run's name, tags, parent, params, metrics and status (``MlflowMirror._adopt``).

How many: ``pool_size`` to begin with. A run that finds its experiment's pool short of its
target (runs start faster than the pool is refilled) doubles that target, up to ``pool_max_size``;
a ready run that ages out unclaimed (runs start more slowly than that) takes one off again, down
to ``pool_size``; an experiment where no run has started for ``pool_max_age_seconds`` has no pool.
Refilling starts once the run that took one has started (``wake``: not beside its start), up to
``FILL_CONCURRENCY`` runs at once; an outage's half-made ones are trashed when MLflow is back.

What users see in MLflow:

- a waiting run is *deleted* (MLflow's trash, hidden from its UI and searches), named
  ``labrun-reserved-<slot>``; once the run that claimed it has started, it is restored (the run's
  own ``mlflow`` refuses a deleted run: one round trip, done long before a script has even
  imported ``mlflow``), and delivery gives it the run's name;
- MLflow never changes a run's start time, so a claimed run shows the time it was made ready:
  that is why a waiting run is used only while younger than ``pool_max_age_seconds`` (10), and
  pools are kept only where runs keep starting (demand within that age). Older ones stay in
  MLflow's trash, where ``mlflow gc`` removes them; at most ``pool_max_size`` per experiment and
  burst of runs.

Persistence: each waiting run is a row of ``mlflow_pool`` (through the store's connection, see
``_mlflow_ledger``), committed *before* it is created, under a slot id that is also in its
name. So a restart finds every run it made, even one whose creation's answer was lost, and
trashes what was not ready (``recover``); a claimed one not yet adopted is adopted.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import structlog
import trio

from ._mlflow_rest import MlflowError, Refused, Unavailable

log = structlog.get_logger("labrun.mlflow")

SCHEMA = """
CREATE TABLE IF NOT EXISTS mlflow_pool (
    tracking_uri TEXT NOT NULL,
    slot TEXT NOT NULL,
    experiment TEXT NOT NULL,
    experiment_id TEXT NOT NULL,
    mlflow_run_id TEXT,
    artifact_uri TEXT,
    created_at REAL NOT NULL,
    ready INTEGER NOT NULL DEFAULT 0,
    run_id TEXT,
    PRIMARY KEY (tracking_uri, slot)
)"""

POOL_NAME = "labrun-reserved"
LEGACY_TAG = "labrun.pool"   # what agents before the name had the slot in (one request more per claim)
FILL_CONCURRENCY = 4   # ready runs made at once when a pool is behind (MLflow's SQLite serializes more anyway)


def pool_name(slot: str) -> str:
    """A waiting run's name, until its run's own replaces it: how a restart finds it without its id."""
    return f"{POOL_NAME}-{slot}"


@dataclass(frozen=True)
class Pooled:
    slot: str
    experiment: str
    experiment_id: str
    mlflow_run_id: str
    artifact_uri: str | None


class Pool:
    def __init__(self, store, tracking_uri: str, size: int, max_age: float, max_size: int | None = None):
        self.tracking_uri = tracking_uri
        self.size = size
        self.max_size = max(size, max_size if max_size is not None else size)
        self.max_age = max_age
        self._store = store
        self._db = store._db   # the store's connection, as the ledger's
        self._db.execute(SCHEMA)
        self._busy = False
        self._failure: tuple[str | None, MlflowError] | None = None   # the last making that failed: (experiment, why)
        self._wanted: dict[str, float] = {}   # experiment name -> when a run last wanted a pooled run there
        self._targets: dict[str, int] = {}    # experiment name -> ready runs to keep there now
        self._making: dict[str, str] = {}     # slot -> MLflow experiment id, of the runs being made now
        self._changed = trio.Event()

    # -- claiming (synchronous: on a run's way to start) -------------------------------

    def experiment_id(self, experiment: str) -> str | None:
        row = self._db.execute("SELECT experiment_id FROM mlflow_pool WHERE tracking_uri = ? AND experiment = ? "
                               "LIMIT 1", (self.tracking_uri, experiment)).fetchone()
        return row[0] if row else None

    def take(self, experiment: str, experiment_id: str | None, run_id: str) -> Pooled | None:
        """A ready, fresh run of ``experiment_id`` for ``run_id`` (marked claimed), or None.

        Either way a run of ``experiment`` is starting before its own MLflow run exists: a pool is
        kept there, twice as deep if it was kept already and this run found it short (refilling has
        not caught up with the runs before it). Refilling waits for ``wake``.
        """
        if not self.size:
            return None
        now = time.time()
        target = self._targets.get(experiment, self.size)
        rows = [] if experiment_id is None else self._db.execute(
            "SELECT slot, experiment, experiment_id, mlflow_run_id, artifact_uri FROM mlflow_pool WHERE tracking_uri "
            "= ? AND experiment_id = ? AND ready AND run_id IS NULL AND created_at >= ? ORDER BY created_at LIMIT ?",
            (self.tracking_uri, experiment_id, now - self.max_age, target)).fetchall()
        if self._wanted.get(experiment, 0) < now - self.max_age:   # runs start there again: a pool from scratch
            self._targets[experiment] = self.size
        elif len(rows) < target:
            self._targets[experiment] = min(self.max_size, 2 * target)
        self._wanted[experiment] = now
        if not rows:
            return None
        self._db.execute("UPDATE mlflow_pool SET run_id = ? WHERE tracking_uri = ? AND slot = ?",
                         (run_id, self.tracking_uri, rows[0][0]))
        return Pooled(*rows[0])

    def wake(self) -> None:
        """The run that wanted is under way: refill now."""
        self._changed.set()

    def target(self, experiment: str) -> int:
        """The ready runs kept for ``experiment`` now (0: no pool there)."""
        return self._targets.get(experiment, 0) if experiment in self._wanted else 0

    def claimed(self, run_id: str) -> Pooled | None:
        row = self._db.execute(
            "SELECT slot, experiment, experiment_id, mlflow_run_id, artifact_uri FROM mlflow_pool WHERE tracking_uri "
            "= ? AND run_id = ?", (self.tracking_uri, run_id)).fetchone()
        return Pooled(*row) if row else None

    def release(self, slot: str) -> None:
        """The claimed run is adopted (or gone): the pool has nothing more to do with it."""
        self._db.execute("DELETE FROM mlflow_pool WHERE tracking_uri = ? AND slot = ?", (self.tracking_uri, slot))

    def ready_count(self) -> int:
        return self._db.execute("SELECT count(*) FROM mlflow_pool WHERE tracking_uri = ? AND ready AND run_id IS NULL "
                                "AND created_at >= ?", (self.tracking_uri, time.time() - self.max_age)).fetchone()[0]

    # -- filling (the mirror's task) ---------------------------------------------------

    async def run(self, rest, experiment_id, adopt, retry_seconds: float) -> None:
        """Keep the wanted pools full until cancelled.

        ``experiment_id(name)``: the mirror's (cached) MLflow experiment id; ``adopt(run_id)``: the
        mirror's adoption of a claimed run, for those a restart left claimed and not adopted.
        """
        await self._recover(rest, adopt)
        async with trio.open_nursery() as makers:
            while True:
                self._changed = trio.Event()
                now = time.time()
                self._expire(now)
                if self._failure is not None:
                    experiment, exc = self._failure
                    self._failure = None
                    if isinstance(exc, Refused):   # an experiment MLflow will not take runs in: until wanted again
                        log.warning("mlflow.pool.refused", error=str(exc))
                        self._wanted.pop(experiment, None)
                    else:
                        log.debug("mlflow.pool.unavailable", error=str(exc))
                        await trio.sleep(retry_seconds)
                    continue
                self._busy, experiment = True, None
                try:
                    await self._trash_unfinished(rest)
                    for experiment, wanted_at in list(self._wanted.items()):
                        if wanted_at < now - self.max_age:
                            del self._wanted[experiment]
                            self._targets.pop(experiment, None)
                            continue
                        self._fill(makers, rest, experiment, await experiment_id(experiment))
                except MlflowError as exc:
                    self._failure = (experiment, exc)
                    continue
                finally:
                    self._busy = False
                with trio.move_on_after(self._next_expiry(now)):
                    await self._changed.wait()

    @property
    def filling(self) -> bool:
        """Making runs now (what "caught up" waits for, besides the event backlog)."""
        return self._busy or bool(self._making)

    def _expire(self, now: float) -> None:
        """Forget ready runs too old to be claimed (left in MLflow's trash, for mlflow gc); each one that aged out
        unclaimed says its experiment's pool is deeper than the runs starting there need."""
        cutoff = now - self.max_age
        expired = self._db.execute(
            "SELECT experiment, count(*) FROM mlflow_pool WHERE tracking_uri = ? AND ready AND run_id IS NULL "
            "AND created_at < ? GROUP BY experiment", (self.tracking_uri, cutoff)).fetchall()
        if not expired:   # (most wakes: no write, no commit)
            return
        for experiment, count in expired:
            if experiment in self._targets:
                self._targets[experiment] = max(self.size, self._targets[experiment] - count)
        self._db.execute("DELETE FROM mlflow_pool WHERE tracking_uri = ? AND ready AND run_id IS NULL AND "
                         "created_at < ?", (self.tracking_uri, cutoff))

    def _fill(self, makers: trio.Nursery, rest, experiment: str, experiment_id: str) -> None:
        """Start making what ``experiment`` lacks, at most ``FILL_CONCURRENCY`` runs in flight: each one that
        ends wakes the loop, which starts the next (none waits for the slowest of a batch)."""
        missing = self.target(experiment) - self._free(experiment_id)
        for _ in range(min(missing, FILL_CONCURRENCY - len(self._making))):
            slot, created_at = uuid.uuid4().hex, time.time()
            self._making[slot] = experiment_id
            self._db.execute("INSERT INTO mlflow_pool (tracking_uri, slot, experiment, experiment_id, created_at) "
                             "VALUES (?, ?, ?, ?, ?)", (self.tracking_uri, slot, experiment, experiment_id, created_at))
            makers.start_soon(self._make, rest, slot, experiment, experiment_id, created_at)

    def _free(self, experiment_id: str) -> int:
        """Ready runs of ``experiment_id`` not claimed and not too old, and those being made."""
        ready = self._db.execute("SELECT count(*) FROM mlflow_pool WHERE tracking_uri = ? AND experiment_id = ? AND "
                                 "ready AND run_id IS NULL AND created_at >= ?",
                                 (self.tracking_uri, experiment_id, time.time() - self.max_age)).fetchone()[0]
        return ready + sum(1 for made_in in self._making.values() if made_in == experiment_id)

    def _next_expiry(self, now: float) -> float:
        oldest = self._db.execute("SELECT min(created_at) FROM mlflow_pool WHERE tracking_uri = ? AND run_id IS NULL",
                                  (self.tracking_uri,)).fetchone()[0]
        times = [*(t + self.max_age for t in self._wanted.values()), *([oldest + self.max_age] if oldest else [])]
        return max(0.05, min(times) - now + 0.01) if times else float("inf")

    async def _make(self, rest, slot: str, experiment: str, experiment_id: str, created_at: float) -> None:
        """Create the run of a slot ``_fill`` recorded, and put it in MLflow's trash, ready."""
        try:
            await self._store.durable()   # recorded before it exists: a restart finds it by its name
            info = await rest.create_run(experiment_id, user="labrun", start_ms=int(created_at * 1000),
                                         run_name=pool_name(slot), tags={})
            self._db.execute("UPDATE mlflow_pool SET mlflow_run_id = ?, artifact_uri = ? WHERE tracking_uri = ? AND "
                             "slot = ?", (info["run_id"], info.get("artifact_uri"), self.tracking_uri, slot))
            await rest.call("POST", "runs/delete", {"run_id": info["run_id"]})
            self._db.execute("UPDATE mlflow_pool SET ready = 1 WHERE tracking_uri = ? AND slot = ?",
                             (self.tracking_uri, slot))
            log.debug("mlflow.pool.made", experiment_id=experiment_id, mlflow_run_id=info["run_id"])
        except MlflowError as exc:   # the loop waits, then trashes what was made of it and tries again
            self._failure = (experiment, exc)
        finally:
            del self._making[slot]
            self._changed.set()

    async def _recover(self, rest, adopt) -> None:
        """After a restart: trash what an earlier agent was making, adopt what it had handed out."""
        rows = self._db.execute("SELECT slot, experiment_id, mlflow_run_id, run_id FROM mlflow_pool WHERE "
                                "tracking_uri = ? AND (NOT ready OR run_id IS NOT NULL)", (self.tracking_uri,)).fetchall()
        for slot, experiment_id, mlflow_run_id, run_id in rows:
            while True:
                try:
                    if run_id is not None:
                        await adopt(run_id)   # releases it once done; delivery tries again at the run's next event
                    else:
                        await self._trash(rest, slot, experiment_id, mlflow_run_id)
                    break
                except Unavailable:
                    await trio.sleep(1.0)
                except MlflowError as exc:
                    log.warning("mlflow.pool.recover_refused", slot=slot, run_id=run_id, error=str(exc))
                    break

    async def _trash_unfinished(self, rest) -> None:
        """Ready runs whose making stopped part-way (MLflow went away meanwhile): into MLflow's trash, forgotten."""
        for slot, experiment_id, mlflow_run_id in self._db.execute(
                "SELECT slot, experiment_id, mlflow_run_id FROM mlflow_pool WHERE tracking_uri = ? AND NOT ready",
                (self.tracking_uri,)).fetchall():
            if slot not in self._making:
                await self._trash(rest, slot, experiment_id, mlflow_run_id)

    async def _trash(self, rest, slot: str, experiment_id: str, mlflow_run_id: str | None) -> None:
        """Put a run made for the pool, and not handed out, in MLflow's trash (``Unavailable``: to be tried again)."""
        try:
            # Its creation's answer was lost: find it by its name (or, made by an older agent, by its tag).
            for where in (f"attributes.run_name = '{pool_name(slot)}'", f"tags.`{LEGACY_TAG}` = '{slot}'"):
                if mlflow_run_id is not None:
                    break
                found = await rest.call("POST", "runs/search", {
                    "experiment_ids": [experiment_id], "filter": where, "max_results": 1, "run_view_type": "ALL"})
                mlflow_run_id = (found.get("runs") or [{}])[0].get("info", {}).get("run_id")
            if mlflow_run_id is not None:
                await rest.call("POST", "runs/delete", {"run_id": mlflow_run_id})
        except Refused as exc:   # gone (a wiped server): nothing left to trash
            log.warning("mlflow.pool.trash_refused", slot=slot, error=str(exc))
        self.release(slot)
