"""One small handler per operation. Handlers check access, talk to the store and the supervisor,
and return plain maps; the server turns them into replies.

Access: everyone sees the queue (like ``squeue``); only a run's owner, root or the
admin group may cancel it or read its logs and environment.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import trio

from labrun.protocol import PROTOCOL_VERSION, TERMINAL, BadRequest, Conflict, Forbidden, NotFound, TooLarge, __version__
from labrun.protocol._statuses import ACTIVE, QUEUED

from ._artifacts import LOGS, artifact_path, list_files
from ._events import EventFilter, EventLog
from ._peers import Peer
from ._rundir import RunDir
from ._snapshot import ContentStore
from ._supervisor import Owner, Supervisor

LOG_CHUNK = 1024 * 1024
# Log files grow without waking anyone; a follower looks again this often.
LOG_POLL_SECONDS = 0.1
RECENT_FINISHED = 20
# Chunks of uploaded content larger than this are written and hashed in a worker thread.
THREAD_BYTES = 1024 * 1024
# A list reply is one frame: pages keep it well under the frame limit. Clients follow ``before``.
LIST_PAGE = 1000

SendItem = Callable[[object], Awaitable[None]]


@dataclass
class Session:
    """Per-connection state: who the peer is, and the snapshot contents it is uploading or has uploaded."""

    peer: Peer
    greeted: bool = False
    uploads: dict = field(default_factory=dict)          # hash -> upload in progress
    uploaded: list[str] = field(default_factory=list)    # kept from collection until the connection closes
    unsubmitted_bytes: int = 0                           # uploaded since this connection's last submit
    upload_lock: trio.Lock = field(default_factory=trio.Lock)
    content: ContentStore | None = None

    def discard_uploads(self) -> None:
        if self.content is not None:
            self.content.end_session(self.uploads, self.uploaded)


class Service:
    def __init__(self, config, store, supervisor: Supervisor, events: EventLog, hub=None):
        self.config = config
        self.store = store
        self.supervisor = supervisor
        self.events = events
        self.hub = hub
        self.started = time.time()
        self.handlers = {
            "hello": self.hello, "submit": self.submit, "blob_put": self.blob_put, "get": self.get,
            "list": self.list, "cancel": self.cancel, "wait": self.wait, "logs": self.logs, "status": self.status,
            "watch": self.watch, "log_metrics": self.log_metrics, "get_metrics": self.get_metrics,
            "set_labels": self.set_labels, "files": self.files, "download": self.download, "put_file": self.put_file,
            "env_register": self.env_register, "env_get": self.env_get, "env_list": self.env_list,
            "drain": self.drain, "resume": self.resume,
        }

    # -- helpers -----------------------------------------------------------------------

    def _record(self, run_id: str):
        record = self.supervisor.live_record(run_id) or self.store.get_run(run_id)
        if record is None:
            raise NotFound(f"no run with id {run_id!r}")
        return record

    def _owned(self, session: Session, run_id: str, action: str):
        record = self._record(run_id)
        if not session.peer.may_manage(record.uid):
            raise Forbidden(f"run {run_id} belongs to {record.user}; only its owner or an admin may {action}")
        return record

    def _show(self, session: Session, record, labels: dict | None = None) -> dict:
        """The run as this peer may see it, with the tags, properties and error set while it ran."""
        shown = record.public(privileged=session.peer.may_manage(record.uid))
        if labels is None:
            labels = self.store.labels_of([record.run_id]).get(record.run_id, {})
        shown["tags"] = {**shown["tags"], **labels.get("tags", {})}
        shown["properties"] = {**shown["properties"], **labels.get("properties", {})}
        shown["reported_error"] = labels.get("error") or None
        return shown

    def _writable(self, session: Session, run_id: str, token: str | None):
        """The run, if the caller may change it: its own token while it is active, or its owner."""
        if token is None:
            return self._owned(session, run_id, "change it")
        if not self.supervisor.token_valid(run_id, token):
            raise Forbidden(f"the run token is not valid for run {run_id} (it is only valid while the run is active)")
        return self._record(run_id)

    def _run_dir(self, record) -> RunDir:
        return RunDir.of(self.config.state_dir, record.run_id)

    # -- ops ---------------------------------------------------------------------------

    async def hello(self, session: Session, args: dict) -> dict:
        if args["protocol"] != PROTOCOL_VERSION:
            raise BadRequest(f"protocol version {args['protocol']} is not supported; this agent speaks "
                             f"version {PROTOCOL_VERSION} (labrun {__version__})", details={"field": "args.protocol"})
        session.greeted = True
        limits = self.config.snapshot
        return {"agent_version": __version__, "protocol": PROTOCOL_VERSION, "uid": session.peer.uid,
                "user": session.peer.user, "admin": session.peer.admin,
                "snapshot": {"max_files": limits.max_files, "max_bytes": limits.max_bytes}}

    async def blob_put(self, session: Session, args: dict) -> dict:
        """Contents for the store, whole or in chunks; each is checked against its hash before it is kept."""
        content = session.content = self.supervisor.snapshots
        results, stored = [], []
        async with session.upload_lock:   # one writer per upload, even if a client sends chunks concurrently
            try:
                for blob in args["blobs"]:
                    if blob["offset"] == 0 and blob["size"] <= content.max_bytes:   # (larger: refused below)
                        # A client uploads one snapshot's worth, then submits: no more waits unused on the disk.
                        session.unsubmitted_bytes += blob["size"]
                        if session.unsubmitted_bytes > content.max_bytes:
                            raise TooLarge(f"blob_put: more than this agent's snapshot limit of {content.max_bytes} "
                                           "bytes uploaded on this connection without a submit using them")
                    upload = content.begin(session.uploads, blob)
                    try:
                        if len(blob["data"]) > THREAD_BYTES:
                            complete = await trio.to_thread.run_sync(content.receive, upload, blob)
                        else:
                            complete = content.receive(upload, blob)
                    except BaseException:
                        content.abort(session.uploads, blob["hash"])
                        raise
                    if complete:
                        stored.append((blob["hash"], content.commit(session.uploads, blob["hash"])))
                        session.uploaded.append(blob["hash"])
                    results.append({"hash": blob["hash"], "received": upload.received, "complete": complete})
            finally:
                if stored:
                    content.record(session.peer.uid, stored)
        return {"blobs": results}

    async def submit(self, session: Session, args: dict) -> dict:
        peer = session.peer
        record = await self.supervisor.submit(args["spec"], Owner(peer.uid, peer.gid, peer.user, list(peer.groups),
                                                                  peer.admin))
        session.unsubmitted_bytes = 0
        return self._show(session, record)

    async def get(self, session: Session, args: dict) -> dict:
        # event_seq: watch from here and no later change of this run can be missed.
        return {**self._show(session, self._record(args["run_id"])), "event_seq": self.store.last_seq()}

    async def list(self, session: Session, args: dict) -> list:
        """One page of runs, newest first; the next page is ``before`` the last run's ``order``."""
        statuses, before = args["status"], args["before"]
        limit = min(args["limit"] or LIST_PAGE, LIST_PAGE)
        query = {"experiment": args["experiment"], "before": before}
        if args["all"] or statuses is not None:
            records = self.store.list_runs(statuses=statuses, limit=limit, **query)
        else:
            # Queued and active runs, and the few most recent finished ones.
            records = self.store.list_runs(statuses=[QUEUED, *ACTIVE], limit=limit, **query)
            if before is None:
                records += self.store.list_runs(statuses=TERMINAL, limit=RECENT_FINISHED, **query)
            records = sorted(records, key=lambda r: r.order, reverse=True)[:limit]
        labels = self.store.labels_of([r.run_id for r in records])
        return [self._show(session, self.supervisor.live_record(r.run_id) or r, labels.get(r.run_id, {}))
                for r in records]

    async def cancel(self, session: Session, args: dict) -> dict:
        record = self._owned(session, args["run_id"], "cancel it")
        return self._show(session, self.supervisor.cancel(record))

    async def wait(self, session: Session, args: dict) -> dict:
        timeout = args["timeout"]
        with trio.move_on_after(float("inf") if timeout is None else timeout):
            while True:
                record = self._record(args["run_id"])
                if record.status in TERMINAL:
                    break
                await self.supervisor.changed.wait()
        return self._show(session, self._record(args["run_id"]))

    async def logs(self, session: Session, args: dict, send_item: SendItem) -> None:
        record = self._owned(session, args["run_id"], "read its logs")
        path = artifact_path(self._run_dir(record), LOGS + args["name"])
        offset = args["offset"]
        while True:
            ended = self._record(record.run_id).status in TERMINAL
            offset = await self._send_file_from(path, offset, send_item)
            if ended or not args["follow"]:
                if not path.exists() and args["name"] != "std_log.txt":
                    raise NotFound(f"run {record.run_id} has no log {args['name']!r}")
                return
            with trio.move_on_after(LOG_POLL_SECONDS):
                await self.supervisor.changed.wait()

    @staticmethod
    async def _send_file_from(path: Path, offset: int, send_item: SendItem) -> int:
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return offset
        with f:
            f.seek(offset)
            while chunk := f.read(LOG_CHUNK):
                await send_item({"offset": offset, "data": chunk})
                offset += len(chunk)
        return offset

    async def watch(self, session: Session, args: dict, send_item: SendItem) -> None:
        types = frozenset(args["types"]) if args["types"] is not None else None
        filter = EventFilter(run_id=args["run_id"], experiment=args["experiment"], user=args["user"], types=types)
        await self.events.watch(args["since"], filter, args["follow"], send_item)

    async def log_metrics(self, session: Session, args: dict) -> dict:
        record = self._writable(session, args["run_id"], args["token"])
        if args["metrics"]:
            self.store.add_metrics(record, args["metrics"])
        return {"count": len(args["metrics"])}

    async def get_metrics(self, session: Session, args: dict) -> list:
        record = self._owned(session, args["run_id"], "read its metrics")
        return self.store.metrics(record.run_id, args["name"])

    async def set_labels(self, session: Session, args: dict) -> dict:
        record = self._writable(session, args["run_id"], args["token"])
        values = args["values"]
        if args["kind"] == "properties":
            # Properties are add-only, as in Azure ML.
            existing = {**record.spec.get("properties", {}), **self.store.labels(record.run_id, "properties")}
            changed = sorted(k for k, v in values.items() if k in existing and existing[k] != v)
            if changed:
                raise Conflict(f"property {changed[0]!r} of run {record.run_id} is already set to "
                               f"{existing[changed[0]]!r}; properties cannot be changed")
        self.store.set_labels(record.run_id, args["kind"], values)
        return self._show(session, record)

    async def files(self, session: Session, args: dict) -> list:
        record = self._owned(session, args["run_id"], "list its files")
        return list_files(self._run_dir(record))

    async def download(self, session: Session, args: dict, send_item: SendItem) -> None:
        record = self._owned(session, args["run_id"], "read its files")
        path = artifact_path(self._run_dir(record), args["name"])
        if not path.is_file():
            raise NotFound(f"run {record.run_id} has no file {args['name']!r}")
        await self._send_file_from(path, args["offset"], send_item)

    async def put_file(self, session: Session, args: dict) -> dict:
        record = self._writable(session, args["run_id"], args["token"])
        if args["name"].startswith(LOGS):
            raise BadRequest(f"{LOGS} is kept by the agent; upload under another name")
        path = artifact_path(self._run_dir(record), args["name"])
        if not args["append"] and path.exists():
            raise Conflict(f"run {record.run_id} already has a file {args['name']!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(args["data"])
        if os.geteuid() == 0 and record.uid != 0:
            run_dir, node = self._run_dir(record).root, path
            while node != run_dir:
                os.chown(node, record.uid, record.gid)
                node = node.parent
        return {"name": args["name"], "size": path.stat().st_size}

    async def env_register(self, session: Session, args: dict) -> dict:
        environment = args["environment"]
        version = self.store.register_environment(environment["name"], environment, session.peer.user)
        return {**environment, "version": version}

    async def env_get(self, session: Session, args: dict) -> dict:
        found = self.store.get_environment(args["name"], args["version"])
        if found is None:
            which = f" version {args['version']}" if args["version"] else ""
            raise NotFound(f"no environment {args['name']!r}{which} is registered")
        return {**found["definition"], "version": found["version"]}

    async def env_list(self, session: Session, args: dict) -> list:
        return [{**e["definition"], "version": e["version"]} for e in self.store.list_environments()]

    # -- draining ----------------------------------------------------------------------

    def _admin(self, session: Session, action: str) -> None:
        if not session.peer.admin:
            raise Forbidden(f"only root or the admin group may {action} the agent")

    async def drain(self, session: Session, args: dict) -> dict:
        """Start no more runs; with ``wait``, return once no run is active (or at the timeout)."""
        self._admin(session, "drain")
        self.supervisor.set_draining(True)
        if args["wait"]:
            timeout = args["timeout"]
            with trio.move_on_after(float("inf") if timeout is None else timeout):
                while self.supervisor.active:
                    await self.supervisor.changed.wait()
        return {"draining": self.supervisor.draining, "active": len(self.supervisor.active)}

    async def resume(self, session: Session, args: dict) -> dict:
        self._admin(session, "resume")
        self.supervisor.set_draining(False)
        return {"draining": self.supervisor.draining, "active": len(self.supervisor.active)}

    async def status(self, session: Session, args: dict) -> dict:
        capacity = self.supervisor.capacity
        in_use = {"cpus": 0, "memory": 0, "gpus": []}
        by_user: dict[str, dict] = {}
        for active in self.supervisor.active.values():
            a, user = active.allocation, active.record.user
            in_use["cpus"] += a.cpus
            in_use["memory"] += a.memory or 0
            in_use["gpus"] += list(a.gpus)
            mine = by_user.setdefault(user, {"runs": 0, "cpus": 0, "memory": 0, "gpus": []})
            mine["runs"] += 1
            mine["cpus"] += a.cpus
            mine["memory"] += a.memory or 0
            mine["gpus"] += list(a.gpus)
        return {
            "agent_version": __version__,
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_seconds": time.time() - self.started,
            "socket": str(self.config.socket),
            "state_dir": str(self.config.state_dir),
            "system": self.config.system,
            "capacity": {"cpus": capacity.cpus, "memory": capacity.memory, "gpus": list(capacity.gpus),
                         "cores": list(capacity.cores), "max_concurrent_runs": capacity.max_runs},
            "in_use": in_use,
            "by_user": by_user,
            "runs": self.store.counts_by_status(),
            "queued": len(self.supervisor.queued),
            "active": len(self.supervisor.active),
            "targets": {"local": {"kind": "local"}, **{name: {"kind": t.kind, "cpus": t.cpus, "memory": t.memory,
                                                              "gpus": t.gpus, "image": t.image,
                                                              **_slurm_shown(t)}
                                                       for name, t in sorted(self.config.targets.items())}},
            "events": {"last_seq": self.store.last_seq(), "subscribers": len(self.events.subscriptions)},
            "draining": self.supervisor.draining,
            "drained": self.supervisor.draining and not self.supervisor.active,
            "containment": {kind: getattr(executor, "containment", None)
                            for kind, executor in self.supervisor.executors.items()},
            "hub": self.hub.status() if self.hub is not None else None,
        }


def _slurm_shown(target) -> dict:
    """What ``status`` says about a Slurm target (its queue settings; never its sbatch arguments)."""
    if target.slurm is None:
        return {}
    return {"partition": target.slurm.partition, "account": target.slurm.account, "qos": target.slurm.qos,
            "run_root": str(target.slurm.run_root)}
