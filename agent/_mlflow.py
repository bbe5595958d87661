"""Mirroring every labrun run into an MLflow tracking server, over its REST API.

Like the hub's delivery (``_hub``), the mirror reads the event log from a persisted cursor. The
events only say which runs changed: each such run is then brought up to date from the store,
idempotently, and the per-run progress (``_mlflow_ledger``) is saved after every piece MLflow
accepted. So an MLflow outage of any length, or an agent restart, loses nothing and sends nothing
twice; the cursor moves past an event once its runs are mirrored.

For each run:

- the MLflow experiment of the labrun experiment (created, or restored from MLflow's trash), and
  one MLflow run, created when the run is queued (``SCHEDULED``, started at its submit time, as
  MLflow's own job launchers do), nested under its parent's run for a child run;
- tags and params (``_mlflow_map``), metrics with their steps and times as they are logged;
- when the run has ended, its outputs and uploaded files as artifacts (``_mlflow_files``), then
  its final status and end time.

``run_env`` gives a starting run ``MLFLOW_TRACKING_URI``, ``MLFLOW_RUN_ID`` and
``MLFLOW_EXPERIMENT_ID``: its own MLflow run if it exists (a run that waited in the queue), else
one made ahead (``_mlflow_pool``) without any round trip, else (the first run of an experiment, a
pool used up) it waits at most ``prepare_timeout_seconds`` for its MLflow run to be created: a
slow or dead MLflow never holds a run back. Answers: 408, 429, 5xx and network errors retry
with backoff and jitter; MLflow refusing something (a run deleted in its UI) is logged, and
delivery goes on with the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from labrun.protocol._statuses import PREPARING, STARTING, TERMINAL

from . import _mlflow_map as mapping
from ._artifacts import owner_of
from ._events import EventLog
from ._mlflow_files import read_chunk, run_files
from ._mlflow_ledger import Entry, Ledger
from ._mlflow_pool import Pool
from ._mlflow_rest import MlflowError, MlflowRest, Refused, Unavailable
from ._rundir import RunDir
from ._store import Store

log = structlog.get_logger("labrun.mlflow")

ENV_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
METRIC_PAGE = 1000
EXPERIMENT_CACHE = 1024   # experiment ids kept in memory (the rest are asked of MLflow again)
# Woken by new events, the mirror first lets this much time pass: the scheduler starts the run just
# submitted without the mirror's HTTP work beside it, and what follows comes as one batch.
SETTLE_SECONDS = 0.25
# A run taken from the pool is restored in MLflow once its process has started (not beside its start),
# and before its own mlflow is imported (seconds), and the pool is refilled then; this long at most if
# its start is slow.
ADOPT_WAIT_SECONDS = 5.0
# ... and this long after that: a process exists once the run is Running, but its first command is still
# being executed, and the requests (and the MLflow server's work on them) would compete with it.
AFTER_START_SECONDS = 0.03


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None    # an existing server; None with embedded: the agent's own
    embedded: bool = False
    port: int = 0                       # embedded: 0 picks a free port once, kept across restarts
    host: str = "127.0.0.1"
    user: str | None = None             # embedded: the account the server runs as (default: the agent's)
    username: str | None = None         # basic auth towards the server (its auth app), for the agent only
    password_file: Path | None = None
    run_env: bool = True                # give runs MLFLOW_* (their MLflow run is then created before they start)
    artifacts: bool = True
    max_artifact_bytes: int = 1 << 30   # per run
    prepare_timeout_seconds: float = 2.0
    pool_size: int = 2                  # MLflow runs kept ready per busy experiment (0: none, runs wait)
    pool_max_size: int = 16             # ... at most, where runs start faster than that many are refilled
    pool_max_age_seconds: float = 10.0  # a ready run older than this is not used: MLflow would show it started then
    timeout_seconds: float = 10.0
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 60.0
    batch_max: int = 500


class MlflowMirror:
    def __init__(self, config: MlflowConfig, tracking_uri: str, store: Store, events: EventLog, runs_dir: Path,
                 live_record=lambda run_id: None):
        self.config = config
        self.tracking_uri = tracking_uri.rstrip("/")
        self.store = store
        self.events = events
        self.runs_dir = runs_dir
        self.live_record = live_record
        self.ledger = Ledger(store, self.tracking_uri)
        self.pool = Pool(store, self.tracking_uri, config.pool_size if config.run_env else 0,
                         config.pool_max_age_seconds, config.pool_max_size)
        self.delivered = self.ledger.cursor()
        self.state = "starting"
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self._rest: MlflowRest | None = None
        self._nursery: trio.Nursery | None = None
        self._experiments: dict[str, str] = {}
        self._locks: dict[str, trio.Lock] = {}
        self.pool_claimed = 0   # runs that started on a ready MLflow run, since the agent started

    # -- what clients see --------------------------------------------------------------

    def status(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "state": self.state, "delivered_seq": self.delivered,
                "backlog": max(0, self.store.last_seq() - self.delivered), "last_error": self.last_error,
                "last_error_at": self.last_error_at, "pool_ready": self.pool.ready_count(),
                "pool_claimed": self.pool_claimed, "pool_filling": self.pool.filling}

    def link(self, run_id: str) -> dict:
        """The run's page in MLflow's UI (the experiment's page until the run exists there)."""
        entry = self.ledger.get(run_id)
        if entry is not None and entry.mlflow_run_id is not None:
            return {"url": mapping.run_url(self.tracking_uri, entry.experiment_id, entry.mlflow_run_id),
                    "run_id": entry.mlflow_run_id, "experiment_id": entry.experiment_id,
                    "tracking_uri": self.tracking_uri}
        record = self.store.get_run(run_id)
        experiment_id = self._experiments.get(record.experiment) if record else None
        return {"url": mapping.experiment_url(self.tracking_uri, experiment_id) if experiment_id else self.tracking_uri,
                "run_id": None, "experiment_id": experiment_id, "tracking_uri": self.tracking_uri}

    # -- delivery ----------------------------------------------------------------------

    def _failed(self, message: str, state: str) -> None:
        if message != self.last_error:
            log.warning("mlflow.delivery.failed", error=message, tracking_uri=self.tracking_uri, state=state)
        self.last_error, self.last_error_at, self.state = message, time.time(), state

    def _auth(self):
        if self.config.username is None:
            return None
        password = ""
        if self.config.password_file is not None:
            try:
                password = self.config.password_file.read_text().strip()
            except OSError as exc:   # the server will refuse us, and status says why; the agent goes on
                self._failed(f"cannot read mlflow.password_file: {exc}", "refused")
        return (self.config.username, password)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        import httpx

        timeout = httpx.Timeout(self.config.timeout_seconds)
        try:
            async with httpx.AsyncClient(timeout=timeout, auth=self._auth()) as client, \
                    trio.open_nursery() as nursery:
                self._rest = MlflowRest(client, self.tracking_uri)
                self._nursery = nursery
                if self.pool.size:
                    nursery.start_soon(self.pool.run, self._rest, self._experiment_id, self._adopt,
                                       self.config.retry_initial_seconds)
                task_status.started()
                await self._deliver()
        finally:
            self._nursery = None

    async def _deliver(self) -> None:
        delay = self.config.retry_initial_seconds
        while True:
            wakeup = self.events.appended.current()
            batch = self.store.events_since(self.delivered, self.config.batch_max)
            if not batch:
                if self.last_error is None:
                    self.state = "idle"
                await wakeup.wait()
                await trio.sleep(SETTLE_SECONDS)
                continue
            await self.store.durable()   # only what is committed goes out
            recovering = self.state == "retrying"
            self.state = "sending"
            try:
                for run_id in dict.fromkeys(e["run_id"] for e in batch if e["run_id"] is not None):
                    await self._sync(run_id)
            except Unavailable as exc:
                self._failed(str(exc), "retrying")
                await trio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self.config.retry_max_seconds)
                continue
            self.delivered = batch[-1]["seq"]
            self.ledger.set_cursor(self.delivered)
            if recovering:
                log.info("mlflow.delivery.resumed", delivered_seq=self.delivered)
                self.last_error = self.last_error_at = None
            delay = self.config.retry_initial_seconds

    def _record(self, run_id: str):
        return self.live_record(run_id) or self.store.get_run(run_id)

    async def _sync(self, run_id: str, *, again: bool = True) -> None:
        """Bring one run's MLflow twin up to date. Raises ``Unavailable`` to be tried again later."""
        entry = self.ledger.get(run_id)
        if entry is not None and entry.done:
            return
        record = self._record(run_id)
        if record is None:
            return
        try:
            # The live record changes while this awaits MLflow: one status for the whole sync (a run
            # that ends meanwhile has a later event, and so a later sync).
            status = record.status
            entry = await self._ensure(record)
            await self._adopt(record.run_id)
            await self._send_data(record, entry, status)
            await self._send_status(record, entry, status)
        except Refused as exc:
            if exc.code == "RESOURCE_DOES_NOT_EXIST" and again:
                # Gone for good (a wiped server, a purged run or experiment): mirror the run afresh.
                log.warning("mlflow.run.recreated", run_id=run_id, error=str(exc))
                self._experiments.clear()
                self.ledger.forget(run_id)
                if (pooled := self.pool.claimed(run_id)) is not None:
                    self.pool.release(pooled.slot)
                await self._sync(run_id, again=False)
                return
            # MLflow will not take it (a run deleted in its UI, a param the script set first): say so, go on.
            self._failed(f"run {run_id}: {exc}", "refused")
            log.warning("mlflow.run.refused", run_id=run_id, error=str(exc))
        except (Unavailable, trio.Cancelled):
            raise
        except Exception as exc:
            # A bug or an I/O error here must not stop the agent, nor every later run's mirroring.
            log.exception("mlflow.run.failed", run_id=run_id)
            self._failed(f"run {run_id}: {type(exc).__name__}: {exc}", "refused")

    # -- one run -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _run_lock(self, run_id: str):
        """One task at a time creates or adopts a run's MLflow run."""
        lock = self._locks.setdefault(run_id, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(run_id, None)

    async def _experiment_id(self, name: str) -> str:
        if name not in self._experiments:
            experiment_id = await self._rest.experiment_id(name)
            # Experiment names are the users': the cache keeps the most recently added, not every one ever seen.
            if len(self._experiments) >= EXPERIMENT_CACHE:
                del self._experiments[next(iter(self._experiments))]
            self._experiments[name] = experiment_id
        return self._experiments[name]

    async def _ensure(self, record) -> Entry:
        """The run's ledger entry, creating its MLflow run (and its parent's, first) if need be."""
        async with self._run_lock(record.run_id):
            entry = self.ledger.get(record.run_id)
            if entry is not None and entry.mlflow_run_id is not None:
                return entry
            parent_id = self.store.parents_of([record.run_id]).get(record.run_id)
            parent = None
            if parent_id is not None and parent_id != record.run_id:
                parent_record = self._record(parent_id)
                if parent_record is not None:
                    parent = await self._ensure(parent_record)
            experiment_id = parent.experiment_id if parent is not None else \
                await self._experiment_id(record.experiment)
            tags, digest = self._tags(record, parent.mlflow_run_id if parent else None)
            info = None
            if entry is not None:   # an earlier attempt's answer was lost: the run may exist
                info = await self._find(experiment_id, record.run_id)
            else:
                entry = Entry(record.run_id, experiment_id=experiment_id)
                self.ledger.put(entry)
            if info is None:
                info = await self._rest.create_run(
                    experiment_id, user=record.user, start_ms=int(record.submitted_at * 1000),
                    run_name=tags["mlflow.runName"], tags=tags)
                entry.tags_hash, entry.status_sent = digest, "RUNNING"   # what a new MLflow run has
            entry.mlflow_run_id, entry.experiment_id = info["run_id"], experiment_id
            entry.artifact_uri = info.get("artifact_uri")
            self.ledger.put(entry)
            log.debug("mlflow.run.created", run_id=record.run_id, mlflow_run_id=entry.mlflow_run_id)
            return entry   # all the rest is _sync's: a starting run waits for this much only

    async def _adopt(self, run_id: str) -> None:
        """Make a run taken from the pool this run's: out of MLflow's trash first (its ``mlflow`` refuses
        a deleted run), then its parent link; its name (the pool's until then), tags and the rest follow as
        for any run."""
        async with self._run_lock(run_id):
            pooled = self.pool.claimed(run_id)
            if pooled is None:
                return
            await self._rest.restore_run(pooled.mlflow_run_id)
            parent_id = self.store.parents_of([run_id]).get(run_id)
            parent_record = self._record(parent_id) if parent_id is not None else None
            if parent_record is not None:
                parent = await self._ensure(parent_record)
                await self._rest.log_batch(pooled.mlflow_run_id,
                                           tags=[{"key": "mlflow.parentRunId", "value": parent.mlflow_run_id}])
            self.pool.release(pooled.slot)
            log.debug("mlflow.run.adopted", run_id=run_id, mlflow_run_id=pooled.mlflow_run_id)

    async def _after_start(self, run_id: str) -> None:
        """Once a run that wanted a ready MLflow run has started: the pool is refilled, and the run it took (if
        any) adopted, so that the run's own ``mlflow`` finds it restored (else delivery adopts it). Not before:
        that work would sit beside the run's start in the agent's one thread."""
        with trio.move_on_after(ADOPT_WAIT_SECONDS):
            while True:
                wakeup = self.events.appended.current()
                record = self._record(run_id)
                if record is None or record.status not in (PREPARING, STARTING):
                    break
                await wakeup.wait()
        await trio.sleep(AFTER_START_SECONDS)
        self.pool.wake()
        try:
            await self._adopt(run_id)
        except MlflowError as exc:
            self._failed(f"run {run_id}: {exc}", "retrying" if isinstance(exc, Unavailable) else "refused")

    async def _send_params(self, record, entry: Entry, params: list[dict]) -> None:
        """One at a time: MLflow refuses a whole batch for one param already set (by the script, as 1.0 for 1)."""
        for param in params:
            try:
                await self._rest.log_batch(entry.mlflow_run_id, params=[param])
            except Refused as exc:
                log.debug("mlflow.param.refused", run_id=record.run_id, error=str(exc))

    async def _find(self, experiment_id: str, run_id: str) -> dict | None:
        found = await self._rest.call("POST", "runs/search", {
            "experiment_ids": [experiment_id], "filter": f"tags.`labrun.run_id` = '{run_id}'", "max_results": 1,
            "run_view_type": "ALL"})
        runs = found.get("runs") or []
        return runs[0]["info"] if runs else None

    def _tags(self, record, parent_mlflow_id: str | None = None) -> tuple[dict[str, str], str]:
        """The run's tags and their digest (without the parent link, which is set once, at creation)."""
        # A display name set after submit (``run.display_name = ...``) is an attribute label.
        renamed = self.store.labels(record.run_id, "attributes").get("display_name")
        tags = mapping.tags(record, self.store.labels(record.run_id, "tags"), parent_mlflow_id, renamed)
        plain = {k: v for k, v in tags.items() if k != "mlflow.parentRunId"}
        return tags, hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()

    async def _send_data(self, record, entry: Entry, status: str) -> None:
        """New metrics, and params and tags not yet sent: for most syncs, one request."""
        # The script's own arguments wait for its end when it may log into this run itself:
        # MLflow params never change, and autolog's C=1.0 must not collide with our C=1.
        stage = 2 if status in TERMINAL or not self.config.run_env else 1
        params = []
        if entry.params_sent < stage:
            found = mapping.params(record.spec) if stage == 2 else mapping.config_params(record.spec)
            params = [{"key": k, "value": v} for k, v in found.items()]
        tags, digest = self._tags(record)
        tags = [] if digest == entry.tags_hash else [{"key": k, "value": v} for k, v in tags.items()]
        if len(params) > mapping.BATCH_PARAMS:   # rare: more than a batch goes on its own
            await self._send_params(record, entry, params)
            params = []
        if len(tags) > mapping.BATCH_TAGS:
            for start in range(0, len(tags), mapping.BATCH_TAGS):
                await self._rest.log_batch(entry.mlflow_run_id, tags=tags[start:start + mapping.BATCH_TAGS])
            tags = []
        while True:
            rows = self.store.metrics_after(record.run_id, entry.metric_id, METRIC_PAGE)
            if not rows and not params and not tags:
                break
            counters = dict(entry.counters)
            converted = mapping.metrics(rows, counters)
            for start in range(0, max(len(converted), 1), mapping.BATCH_METRICS):
                await self._log_batch(record, entry, converted[start:start + mapping.BATCH_METRICS], params, tags)
                params = tags = []
            # Recorded once all of it is accepted: a retry may send a part again, and MLflow keeps
            # identical (key, step, timestamp, value) points once.
            if rows:
                entry.metric_id, entry.counters = rows[-1]["id"], counters
            entry.params_sent, entry.tags_hash = max(entry.params_sent, stage), digest
            self.ledger.put(entry)
            if not rows:
                break

    async def _log_batch(self, record, entry: Entry, metrics: list, params: list, tags: list) -> None:
        if not (metrics or params or tags):   # a page of strings and tables only
            return
        try:
            await self._rest.log_batch(entry.mlflow_run_id, metrics=metrics, params=params, tags=tags)
        except Refused:
            if not params:
                raise
            await self._send_params(record, entry, params)
            if metrics or tags:
                await self._rest.log_batch(entry.mlflow_run_id, metrics=metrics, tags=tags)

    async def _send_status(self, record, entry: Entry, labrun_status: str) -> None:
        status = mapping.mlflow_status(labrun_status)
        if labrun_status not in TERMINAL:
            if status != entry.status_sent:
                await self._rest.update_run(entry.mlflow_run_id, status)
                entry.status_sent = status
                self.ledger.put(entry)
            return
        if self.config.artifacts and not entry.artifacts_sent:
            await self._send_artifacts(record, entry)
            entry.artifacts_sent = True
            self.ledger.put(entry)
        end = record.ended_at or time.time()
        await self._rest.update_run(entry.mlflow_run_id, status, int(end * 1000))
        entry.status_sent, entry.done = status, True
        self.ledger.put(entry)

    async def _send_artifacts(self, record, entry: Entry) -> None:
        url = self._rest.artifact_url(entry.artifact_uri or "")
        if url is None:
            log.warning("mlflow.artifacts.not_proxied", run_id=record.run_id, artifact_uri=entry.artifact_uri,
                        hint="start the MLflow server with --serve-artifacts (its default) to receive files")
            return
        files = run_files(RunDir(self.runs_dir / record.run_id), owner_of(record))   # read as the run's user
        budget, skipped = self.config.max_artifact_bytes, 0
        try:
            while (found := await trio.to_thread.run_sync(next, files, None)) is not None:
                try:
                    if found.size > budget:
                        skipped += 1
                        continue
                    budget -= found.size
                    await self._rest.upload(url, found.name, found.size, _chunks(found.fd, found.size))
                finally:
                    _close(found.fd)
        finally:
            files.close()
        if skipped:
            log.warning("mlflow.artifacts.skipped", run_id=record.run_id, files=skipped,
                        limit=self.config.max_artifact_bytes)
            await self._rest.log_batch(entry.mlflow_run_id, tags=[
                {"key": "labrun.artifacts_skipped", "value": f"{skipped} files over the agent's artifact limit"}])

    # -- before a run starts -----------------------------------------------------------

    async def run_env(self, record) -> dict[str, str] | None:
        """``MLFLOW_*`` for a run about to start, once its MLflow run exists; None if MLflow is not there in time."""
        entry = self.ledger.get(record.run_id)
        if entry is None or entry.mlflow_run_id is None:
            if self._nursery is None or self.state == "retrying":
                return None   # down or not started yet: the run starts now, and is mirrored later
            if entry is None and record.run_id not in self._locks:   # nothing under way for it: take a ready one
                entry = self._claim(record)
                self._nursery.start_soon(self._after_start, record.run_id)
                if entry is not None:
                    return self._env(entry)
            done = trio.Event()

            async def attempt():
                try:
                    await self._ensure(record)
                except MlflowError as exc:
                    self._failed(str(exc), "retrying" if isinstance(exc, Unavailable) else "refused")
                finally:
                    done.set()

            # Not cancelled when the wait ends: a run created on the server is always recorded.
            self._nursery.start_soon(attempt)
            with trio.move_on_after(self.config.prepare_timeout_seconds):
                await done.wait()
            entry = self.ledger.get(record.run_id)
            if entry is None or entry.mlflow_run_id is None:
                return None
        return self._env(entry)

    def _env(self, entry: Entry) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_RUN_ID": entry.mlflow_run_id,
                "MLFLOW_EXPERIMENT_ID": entry.experiment_id}

    def _claim(self, record) -> Entry | None:
        """The run's ledger entry on a pooled MLflow run of its experiment (its parent's, for a child), if one is ready."""
        parent_id = self.store.parents_of([record.run_id]).get(record.run_id)
        parent = self.ledger.get(parent_id) if parent_id is not None else None
        experiment_id = parent.experiment_id if parent is not None and parent.experiment_id else \
            self._experiments.get(record.experiment) or self.pool.experiment_id(record.experiment)
        # The claim and the run's entry in one write, in the batch the run's start waits for anyway (not two
        # commits of their own on its way): a crash never leaves a run claimed that no entry names.
        with self.store._transaction():
            pooled = self.pool.take(record.experiment, experiment_id, record.run_id)
            if pooled is None:
                return None
            # A new MLflow run is RUNNING, its tags and params all to send: as for one created for it.
            entry = Entry(record.run_id, mlflow_run_id=pooled.mlflow_run_id, experiment_id=pooled.experiment_id,
                          artifact_uri=pooled.artifact_uri, status_sent="RUNNING")
            self.ledger.put(entry)
        self.pool_claimed += 1
        return entry


async def _chunks(fd: int, size: int):
    remaining = size
    while remaining > 0:
        chunk = await trio.to_thread.run_sync(read_chunk, fd, remaining)
        if not chunk:   # the file shrank: MLflow gets what is there and a short body errors out
            return
        remaining -= len(chunk)
        yield chunk


def _close(fd: int) -> None:
    import os

    os.close(fd)
