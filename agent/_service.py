"""One small handler per operation. Handlers check access, talk to the store and the supervisor,
and return plain maps; the server turns them into replies.

Access: everyone sees the queue (like ``squeue``); only a run's owner, root or the
admin group may cancel it or read its logs and environment.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import msgpack
import trio

from labrun.protocol import PROTOCOL_VERSION, TERMINAL, BadRequest, Conflict, Forbidden, NotFound, TooLarge, __version__
from labrun.protocol._content_hash import FORMS as CONTENT_HASHES
from labrun.protocol._framing import MAX_FDS_PER_MESSAGE
from labrun.protocol._statuses import ACTIVE, QUEUED

from . import _ingest, _warnings
from ._artifacts import LOGS, list_files, open_for_reading, write_file
from ._events import EventFilter, EventLog
from ._interactive import is_interactive
from ._limits import LimitsConfig, check_labels, check_text, labels_size
from ._peers import Peer
from ._retention import RunFiles
from ._rundir import RunDir
from ._small import INLINE_MAX
from ._snapshot import ContentStore, SnapshotFailed
from ._supervisor import Owner, Supervisor

LOG_CHUNK = 1024 * 1024
# Log files grow without waking anyone; a follower looks again this often.
LOG_POLL_SECONDS = 0.1
RECENT_FINISHED = 20
# Chunks of uploaded content larger than this are written and hashed in a worker thread.
THREAD_BYTES = 1024 * 1024
# The most content bytes one submit carries (``contents``), and never more than half a frame (``_carried_bytes``).
SUBMIT_CONTENTS_BYTES = 8 << 20
# Carried contents are checked in a worker thread past this many, or past THREAD_BYTES.
THREAD_ITEMS = 1000
# A list reply is one frame: pages keep it well under the frame limit. Clients follow ``before``.
LIST_PAGE = 1000
ENV_PAGE = 200   # environments or experiments in one page
# Worker threads that copy the files one user passed (blob_fds): one large file's copy and hash at once.
INGEST_THREADS = 2
# Snapshot manifests kept by run id for downloads of their files (a restore downloads each file in turn).
MANIFESTS_KEPT = 4

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
    bound_runs: set[str] = field(default_factory=set)   # interactive runs that fail if this connection closes

    def discard_uploads(self) -> None:
        if self.content is not None:
            self.content.end_session(self.uploads, self.uploaded)


class Service:
    mlflow = None   # the agent's MLflow side (_mlflow_setup.Mlflow)

    def __init__(self, config, store, supervisor: Supervisor, events: EventLog, hub=None, run_files: RunFiles = None,
                 *, limits=None):
        self.config = config
        self.run_files = run_files
        self.limits = limits
        self.bounds: LimitsConfig = config.limits
        self._submitting: dict[tuple[int, str], trio.Event] = {}
        self.store = store
        self.supervisor = supervisor
        self.events = events
        self.hub = hub
        self.started = time.time()
        self._manifests: dict[str, dict] = {}
        # Per user: the worker threads that copy the files it passes, and the right to hold some in memory.
        self._ingest_slots: dict[int, tuple[trio.CapacityLimiter, trio.Lock]] = {}
        self.handlers = {
            "hello": self.hello, "submit": self.submit, "blob_put": self.blob_put, "blob_fds": self.blob_fds,
            "get": self.get,
            "list": self.list, "cancel": self.cancel, "wait": self.wait, "logs": self.logs, "status": self.status,
            "watch": self.watch, "log_metrics": self.log_metrics, "get_metrics": self.get_metrics,
            "set_labels": self.set_labels, "files": self.files, "download": self.download, "put_file": self.put_file,
            "env_register": self.env_register, "env_get": self.env_get, "env_list": self.env_list,
            "start_run": self.start_run, "finish": self.finish, "experiments": self.experiments,
            "experiment_update": self.experiment_update,
            "drain": self.drain, "resume": self.resume,
            "remove": self.remove, "clean": self.clean, "ui": self.ui,
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

    def _show(self, session: Session, record, labels: dict | None = None, removed: dict | None = None,
              parent: str | None = ...) -> dict:
        """The run as this peer may see it, with the tags, properties and error set while it ran."""
        privileged = session.peer.may_manage(record.uid)
        shown = record.public(privileged=privileged)
        if labels is None:
            labels = self.store.labels_of([record.run_id]).get(record.run_id, {})
        if removed is None:
            removed = self.store.removed_of([record.run_id])
        shown["files_removed_at"] = removed.get(record.run_id)
        shown["tags"] = {**shown["tags"], **labels.get("tags", {})}
        shown["properties"] = {**shown["properties"], **labels.get("properties", {})}
        shown["reported_error"] = labels.get("error") or None
        self._show_hierarchy(shown, record, labels, parent, privileged)
        return shown

    def _show_hierarchy(self, shown: dict, record, labels: dict, parent, privileged: bool) -> None:
        """Azure ML's extras: parent, interactive flag, display name and description, runDefinition, run dir."""
        if parent is ...:
            parent = self.store.parents_of([record.run_id]).get(record.run_id)
        attributes = labels.get("attributes", {})
        shown["parent_run_id"] = parent
        shown["interactive"] = is_interactive(record)
        shown["display_name"] = attributes.get("display_name") or shown["display_name"]
        shown["description"] = attributes.get("description", record.spec.get("description"))
        shown["warnings"] = _warnings.shown(record.spec, labels) if privileged else []
        if privileged:
            shown["run_definition"] = record.spec.get("run_definition")
            # None once labrun rm, clean or retention removed the run's files.
            shown["run_dir"] = None if shown.get("files_removed_at") else \
                str(self.config.state_dir / "runs" / record.run_id)

    def _writable(self, session: Session, run_id: str, token: str | None):
        """The run, if the caller may change it: its own token while it is active, or its owner."""
        if token is None:
            return self._owned(session, run_id, "change it")
        if not self.supervisor.token_valid(run_id, token):
            raise Forbidden(f"the run token is not valid for run {run_id} (it is only valid while the run is active)")
        return self._record(run_id)

    def _run_dir(self, record) -> RunDir:
        self.run_files.check_present(record)
        run_dir = RunDir.of(self.config.state_dir, record.run_id)
        if run_dir.root.is_symlink():
            # A cluster's run directory (a Slurm target's run_root): the agent's own link to it, made at submit.
            run_dir = RunDir(run_dir.root.resolve())
        return run_dir

    # -- ops ---------------------------------------------------------------------------

    async def hello(self, session: Session, args: dict) -> dict:
        if args["protocol"] != PROTOCOL_VERSION:
            raise BadRequest(f"protocol version {args['protocol']} is not supported; this agent speaks "
                             f"version {PROTOCOL_VERSION} (labrun {__version__})", details={"field": "args.protocol"})
        session.greeted = True
        limits = self.config.snapshot
        return {"agent_version": __version__, "protocol": PROTOCOL_VERSION, "uid": session.peer.uid,
                "user": session.peer.user, "admin": session.peer.admin,
                "snapshot": {"max_files": limits.max_files, "max_bytes": limits.max_bytes},
                # How many open files one blob_fds may pass (older agents take contents only as bytes, blob_put).
                "blob_fds": self.limits.passed_fds_per_request() if self.limits is not None else MAX_FDS_PER_MESSAGE,
                # The forms of content hash blob_put and blob_fds take (older agents: SHA-256 only).
                "content_hashes": list(CONTENT_HASHES),
                # The small contents a submit may carry itself (older agents: none).
                "submit_contents": {"max_size": INLINE_MAX, "max_bytes": self._carried_bytes()}}

    def _carried_bytes(self) -> int:
        """The most content bytes a submit may carry: half a frame at most, the other half for the rest of it."""
        return min(SUBMIT_CONTENTS_BYTES, self.config.max_frame_bytes // 2)

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
                    upload = content.begin(session.uploads, blob, args["content_hash"])
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

    async def blob_fds(self, session: Session, args: dict) -> dict:
        """Contents as open files passed with the request (``args["fds"]``, which the server closes afterwards):
        each is copied into the store and hashed there; answers each one's hash and size, in order."""
        content = session.content = self.supervisor.snapshots
        fds = args["fds"]
        threads, memory = self.ingest_slots(session.peer.uid)
        async with session.upload_lock:
            files = await trio.to_thread.run_sync(_ingest.check_all, fds, content.max_bytes, limiter=threads,
                                                  abandon_on_cancel=True)
            total = sum(st.st_size for _, _, st in files)
            if session.unsubmitted_bytes + total > content.max_bytes:
                raise TooLarge(f"blob_fds: more than this agent's snapshot limit of {content.max_bytes} bytes sent "
                               "on this connection without a submit using them")
            session.unsubmitted_bytes += total
            placed: list[tuple[str, int]] = []
            try:
                # Pinned until the connection closes; recorded, even if a later file fails, so that it is collected.
                digests = await _ingest.ingest(content, files, session.uploaded, placed, threads, memory,
                                               args["content_hash"])
            finally:
                if placed:
                    content.record(session.peer.uid, placed)
        return {"files": [{"hash": digests[index], "size": st.st_size} for index, _, st in files]}

    async def _store_contents(self, session: Session, entries: list | None, contents: list[dict]) -> None:
        """Small contents a submit carries for the files of its manifest ``entries``: each checked against its
        hash, then stored as ``blob_fds`` stores small files (pinned, committed, recorded as this user's)."""
        if entries is None:
            raise BadRequest("args.contents: a submit in place has no snapshot to carry contents for",
                             details={"field": "args.contents"})
        content = session.content = self.supervisor.snapshots
        content.check_limits(entries)   # (before anything is kept: the submit would be refused after)
        sizes = {entry[3]: entry[1] for entry in entries}
        total = 0
        for i, item in enumerate(contents):
            size = len(item["data"])
            if size > INLINE_MAX:
                raise TooLarge(f"args.contents[{i}]: {size} bytes, over the {INLINE_MAX} a content sent with a "
                               "submit may have; upload it first (blob_put)", details={"field": "args.contents"})
            if sizes.get(item["hash"]) != size:
                raise BadRequest(f"args.contents[{i}]: not the content of a file of the snapshot (by hash and size)",
                                 details={"field": "args.contents"})
            total += size
        if total > self._carried_bytes():
            raise TooLarge(f"args.contents: {total} bytes, over the {self._carried_bytes()} a submit may carry; "
                           "upload the rest first (blob_put)", details={"field": "args.contents"})
        pairs = [(item["hash"], item["data"]) for item in contents]
        threads, _ = self.ingest_slots(session.peer.uid)
        if total > THREAD_BYTES or len(pairs) > THREAD_ITEMS:
            await trio.to_thread.run_sync(_ingest.verify, pairs, limiter=threads)
        else:
            _ingest.verify(pairs)
        async with session.upload_lock:
            # Kept (pinned) until the connection closes should the submit fail after all: counted as any upload.
            if session.unsubmitted_bytes + total > content.max_bytes:
                raise TooLarge(f"args.contents: more than this agent's snapshot limit of {content.max_bytes} bytes "
                               "sent on this connection without a submit using them")
            session.unsubmitted_bytes += total
            digests = list(dict.fromkeys(digest for digest, _ in pairs))
            # Pinned until the connection closes, like any upload; the run's own references keep them after that.
            content.pin(digests)
            session.uploaded.extend(digests)
            await content.small.write(pairs)
            content.record(session.peer.uid, [(digest, sizes[digest]) for digest in digests])

    def ingest_slots(self, uid: int) -> tuple[trio.CapacityLimiter, trio.Lock]:
        """The user's worker threads for what touches the files it passes, and its right to hold some in memory."""
        return self._ingest_slots.setdefault(uid, (trio.CapacityLimiter(INGEST_THREADS), trio.Lock()))

    async def submit(self, session: Session, args: dict) -> dict:
        key = args["idempotency_key"]
        if key is None:
            return await self._submit(session, args)
        # One submit per key at a time: a retry that arrives while the first is still being made waits for it.
        owner_key = (session.peer.uid, key)
        while owner_key in self._submitting:
            await self._submitting[owner_key].wait()
        existing = self.store.run_for_key(session.peer.uid, key)
        if existing is not None:
            session.unsubmitted_bytes = 0
            array = existing.spec.get("array")
            if array is None:
                return self._show(session, self.supervisor.live_record(existing.run_id) or existing)
            members = [self.store.get_run(run_id) for run_id in self.store.array_members(array["id"])]
            return {"array_id": array["id"],
                    "runs": [self._show(session, self.supervisor.live_record(r.run_id) or r) for r in members]}
        self._submitting[owner_key] = trio.Event()
        try:
            return await self._submit(session, args)
        finally:
            self._submitting.pop(owner_key).set()

    async def _submit(self, session: Session, args: dict) -> dict:
        spec = args["spec"]
        check_text(self.bounds, "spec.display_name", spec["display_name"], "display_name_chars")
        check_labels(self.bounds, "spec.tags", spec["tags"])
        check_labels(self.bounds, "spec.properties", spec["properties"], labels_size(spec["tags"]))
        peer = session.peer
        if args["contents"]:
            await self._store_contents(session, spec["snapshot"]["files"], args["contents"])
        owner = Owner(peer.uid, peer.gid, peer.user, list(peer.groups), peer.admin)
        parent = spec.get("parent_run_id")
        if args["array"] is None:
            record = await self.supervisor.submit(spec, owner, args["idempotency_key"])
        else:
            records = await self.supervisor.submit_array(spec, owner, args["array"], args["idempotency_key"])
        session.unsubmitted_bytes = 0
        # Just made (no await since): no labels yet, not removed, and a run's parent is its spec's (an array's
        # members are stored with none); nothing to read back.
        if args["array"] is None:
            return self._show(session, record, {}, {}, parent)
        return {"array_id": records[0].spec["array"]["id"],
                "runs": [self._show(session, r, {}, {}, None) for r in records]}

    async def get(self, session: Session, args: dict) -> dict:
        # event_seq: watch from here and no later change of this run can be missed.
        shown = self._show(session, self._record(args["run_id"]))
        shown["mlflow"] = self.mlflow.link(args["run_id"]) if self.mlflow is not None else None
        return {**shown, "event_seq": self.store.last_seq()}

    async def list(self, session: Session, args: dict) -> list:
        """One page of runs, newest first; the next page is ``before`` the last run's ``order``."""
        statuses, before = args["status"], args["before"]
        limit = min(args["limit"] or LIST_PAGE, LIST_PAGE)
        query = {"experiment": args["experiment"], "before": before}
        if args["parent"] is not None:
            records = self._children_page(args)
        elif args["array"] is not None:
            # An array is one page: its members, newest (highest index) first like every listing.
            records = [self.store.get_run(r) for r in reversed(self.store.array_members(args["array"]))]
            records = [r for r in records if r is not None and (before is None or r.order < before)
                       and (statuses is None or r.status in statuses)][:limit]
        elif args["all"] or statuses is not None:
            records = self.store.list_runs(statuses=statuses, limit=limit, **query)
        else:
            # Queued and active runs, and the few most recent finished ones.
            records = self.store.list_runs(statuses=[QUEUED, *ACTIVE], limit=limit, **query)
            if before is None:
                records += self.store.list_runs(statuses=TERMINAL, limit=RECENT_FINISHED, **query)
            records = sorted(records, key=lambda r: r.order, reverse=True)[:limit]
        ids = [r.run_id for r in records]
        labels, removed, parents = self.store.labels_of(ids), self.store.removed_of(ids), self.store.parents_of(ids)
        return self._page(self._show(session, self.supervisor.live_record(r.run_id) or r, labels.get(r.run_id, {}),
                                     removed, parents.get(r.run_id)) for r in records)

    def _page(self, shown) -> list:
        """A page ends at limits.list_page_bytes as well, so entries with many large labels or definitions never
        make a reply larger than a frame, nor the agent hold more than that for it; the client follows the next
        page as for any page."""
        page, size = [], 0
        for entry in shown:
            size += len(msgpack.packb(entry, use_bin_type=True))
            if page and size > self.bounds.list_page_bytes:
                break
            page.append(entry)
        return page

    def _children_page(self, args: dict) -> list:
        """A run's children, newest first, one page before ``args["before"]``."""
        records = [self.store.get_run(run_id) for run_id in reversed(self.store.children_of(args["parent"]))]
        before, limit = args["before"], min(args["limit"] or LIST_PAGE, LIST_PAGE)
        records = [r for r in records if r is not None and (before is None or r.order < before)
                   and (args["status"] is None or r.status in args["status"])]
        return records[:limit]

    async def cancel(self, session: Session, args: dict) -> dict:
        """Cancel a run and, as in Azure ML, every run below it that has not ended; or an array's runs
        (``{"array_id", "runs"}``: those it canceled, together, as ``scancel`` of a job array does)."""
        run_id = args["run_id"]
        members = self.store.array_members(run_id) if self.store.get_run(run_id) is None else []
        if members:
            records = [self._owned(session, member, "cancel it") for member in members]
            canceled = self.supervisor.cancel_array(records)
            for record in canceled:
                self._cancel_children(record)
            return {"array_id": run_id, "runs": [self._show(session, record) for record in canceled]}
        record = self._owned(session, run_id, "cancel it")
        canceled = self.supervisor.cancel(record)
        self._cancel_children(record)
        return self._show(session, canceled)

    def _cancel_children(self, record) -> None:
        for child_id in self.store.children_of(record.run_id, recursive=True):
            child = self.supervisor.live_record(child_id) or self.store.get_run(child_id)
            if child is not None and child.status not in TERMINAL:
                self.supervisor.cancel(child)

    # -- interactive runs and experiments ------------------------------------------------

    async def start_run(self, session: Session, args: dict) -> dict:
        parent = None
        if args["parent_run_id"] is not None:
            parent = self._owned(session, args["parent_run_id"], "add a child run to it")
        peer = session.peer
        record = self.supervisor.interactive.start(
            Owner(peer.uid, peer.gid, peer.user, list(peer.groups), peer.admin), args, parent)
        if args["snapshot"] is not None:
            session.unsubmitted_bytes = 0   # what this connection uploaded is used, as by a submit
        session.bound_runs.add(record.run_id)
        return self._show(session, record, parent=parent.run_id if parent else None)

    async def finish(self, session: Session, args: dict) -> dict:
        """complete(), fail() and cancel() of an interactive run; fail() of a submitted one from outside it."""
        record = self._writable(session, args["run_id"], args["token"])
        status, error = args["status"], args["error"]
        if is_interactive(record):
            self.supervisor.interactive.finish(record, status, error=error)
            session.bound_runs.discard(record.run_id)
        elif status == "Completed":
            raise BadRequest(f"run {record.run_id} completes when its program exits; use cancel() or fail() "
                             "to end it early", details={"field": "args.status"})
        else:
            record = self.supervisor.cancel(record, error=(error or "failed") if status == "Failed" else None)
        if status == "Failed":
            self.store.set_labels(record.run_id, "error", {"code": args["error_code"] or "UserError",
                                                           "message": error or ""})
        return self._show(session, record)

    def disconnected(self, session: Session) -> None:
        """A connection closed: the interactive runs it opened and did not end fail."""
        self.supervisor.interactive.disconnected(sorted(session.bound_runs))
        session.bound_runs.clear()

    async def experiments(self, session: Session, args: dict) -> list:
        """One page of experiments by name, after ``args["after"]`` (or the one named ``args["name"]``)."""
        found = self.store.experiments(after=args["after"], limit=min(args["limit"] or ENV_PAGE, ENV_PAGE),
                                       name=args["name"])
        return self._page(found)

    async def experiment_update(self, session: Session, args: dict) -> dict:
        name = args["name"]
        current = next(iter(self.store.experiments(name=name)), None)
        if current is not None and current.get("user") not in (None, session.peer.user) and not session.peer.admin:
            raise Forbidden(f"experiment {name!r}'s tags and archive state belong to {current['user']}")
        archived = ... if args["archived"] is None else (time.time() if args["archived"] else None)
        self.store.update_experiment(name, session.peer.user, tags=args["tags"], remove_tags=args["remove_tags"] or (),
                                     archived_at=archived)
        return self.store.experiments(name=name)[0]

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
        name = LOGS + args["name"]
        run_dir = self._run_dir(record)
        offset = args["offset"]
        fd = None
        try:
            while True:
                ended = self._record(record.run_id).status in TERMINAL
                if fd is None:
                    fd = await open_for_reading(record, run_dir, name)
                if fd is not None:
                    offset = await self._send_fd_from(fd, offset, send_item)
                if ended or not args["follow"]:
                    if fd is None and args["name"] != "std_log.txt":
                        raise NotFound(f"run {record.run_id} has no log {args['name']!r}")
                    return
                with trio.move_on_after(LOG_POLL_SECONDS):
                    await self.supervisor.changed.wait()
        finally:
            if fd is not None:
                os.close(fd)

    @staticmethod
    async def _send_fd_from(fd: int, offset: int, send_item: SendItem) -> int:
        while chunk := os.pread(fd, LOG_CHUNK, offset):
            await send_item({"offset": offset, "data": chunk})
            offset += len(chunk)
        return offset

    async def watch(self, session: Session, args: dict, send_item: SendItem) -> None:
        types = frozenset(args["types"]) if args["types"] is not None else None
        filter = EventFilter(run_id=args["run_id"], experiment=args["experiment"], user=args["user"], types=types)
        await self.events.watch(args["since"], filter, args["follow"], send_item)

    async def log_metrics(self, session: Session, args: dict) -> dict:
        record = self._writable(session, args["run_id"], args["token"])
        for i, metric in enumerate(args["metrics"]):
            check_text(self.bounds, f"args.metrics[{i}].description", metric["description"], "description_chars")
        if args["metrics"]:
            self.store.add_metrics(record, args["metrics"])
        return {"count": len(args["metrics"])}

    async def get_metrics(self, session: Session, args: dict) -> list:
        record = self._owned(session, args["run_id"], "read its metrics")
        return self.store.metrics(record.run_id, args["name"])

    async def set_labels(self, session: Session, args: dict) -> dict:
        record = self._writable(session, args["run_id"], args["token"])
        values = args["values"]
        if args["kind"] in ("tags", "properties"):
            # The run's labels after this change, less the keys it replaces, against limits.labels_bytes_per_run.
            current = self.store.labels_of([record.run_id]).get(record.run_id, {})
            others = 0
            for kind in ("tags", "properties"):
                labels = {**record.spec.get(kind, {}), **current.get(kind, {})}
                others += labels_size({k: v for k, v in labels.items() if kind != args["kind"] or k not in values})
            check_labels(self.bounds, "args.values", values, others)
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
        if args["area"] == "snapshot":
            return [{"name": path, "size": size, "mode": mode, "hash": digest}
                    for path, size, mode, digest in self._snapshot(record).values()]
        if args["area"] == "logs":
            return await list_files(record, self._run_dir(record), (LOGS,))
        return await list_files(record, self._run_dir(record))

    def _snapshot(self, record) -> dict[str, tuple]:
        """The manifest the run was submitted with, by path (the last few are kept: a restore reads each file)."""
        self.run_files.check_present(record)
        manifest = self._manifests.pop(record.run_id, None)
        if manifest is None:
            entries = self.supervisor.snapshots.entries(record.run_id)
            if entries is None:
                why = ("it is interactive and was started without a snapshot_directory"
                       if is_interactive(record) else "it ran in its source directory (in place)")
                raise NotFound(f"run {record.run_id} has no snapshot: {why}")
            manifest = {entry[0]: tuple(entry) for entry in entries}
        self._manifests[record.run_id] = manifest
        while len(self._manifests) > MANIFESTS_KEPT:
            del self._manifests[next(iter(self._manifests))]
        return manifest

    def _open_snapshot_file(self, record, name: str) -> int | None:
        """A file of the run's snapshot as submitted: its content in the agent's own store (never the run's
        working directory, which the run may have changed). None for an empty file."""
        entry = self._snapshot(record).get(name)
        if entry is None:
            raise NotFound(f"the snapshot of run {record.run_id} has no file {name!r}")
        if not entry[1]:
            return None
        try:
            return self.supervisor.snapshots.open_content(entry[3], entry[1])
        except SnapshotFailed as exc:
            raise NotFound(f"run {record.run_id}: {exc}") from None

    async def download(self, session: Session, args: dict, send_item: SendItem) -> None:
        record = self._owned(session, args["run_id"], "read its files")
        if args["area"] == "snapshot":
            fd = self._open_snapshot_file(record, args["name"])
            if fd is None:
                return
        else:
            fd = await open_for_reading(record, self._run_dir(record), args["name"])
        if fd is None:
            raise NotFound(f"run {record.run_id} has no file {args['name']!r}")
        try:
            await self._send_fd_from(fd, args["offset"], send_item)
        finally:
            os.close(fd)

    async def put_file(self, session: Session, args: dict) -> dict:
        record = self._writable(session, args["run_id"], args["token"])
        if args["name"].startswith(LOGS):
            raise BadRequest(f"{LOGS} is kept by the agent; upload under another name")
        size = await write_file(record, self._run_dir(record), args["name"], args["data"], append=args["append"])
        return {"name": args["name"], "size": size}

    async def remove(self, session: Session, args: dict) -> dict:
        """``labrun rm``: delete a finished run's directory (owner or admin)."""
        record = self._owned(session, args["run_id"], "remove it")
        freed = await self.run_files.remove(record, purge=args["purge"])
        return {"run_id": record.run_id, "freed_bytes": freed, "purged": args["purge"]}

    async def clean(self, session: Session, args: dict) -> dict:
        """``labrun clean``: remove the caller's finished runs (everyone's with ``all_users``, admins only)."""
        if args["all_users"] and not session.peer.admin:
            raise Forbidden("only an admin may clean every user's runs")
        removed = await self.run_files.clean(older_than=args["older_than"], statuses=args["status"],
                                             uid=None if args["all_users"] else session.peer.uid,
                                             purge=args["purge"])
        return {"removed": removed, "freed_bytes": sum(r["freed_bytes"] for r in removed)}

    async def env_register(self, session: Session, args: dict) -> dict:
        environment = args["environment"]
        peer = session.peer
        version = self.store.register_environment(environment["name"], environment, peer.user, peer.uid,
                                                  admin=peer.admin)
        return {**environment, "version": version}

    def _env_shown(self, session: Session, found: dict) -> dict:
        """An environment as this peer may see it: its variables (often secrets) only to its owner and admins."""
        shown = {**found["definition"], "version": found["version"], "owner": found["user"]}
        owner = self.store.environment_owner(found["name"])
        if not session.peer.may_manage(owner if owner is not None else 0) and shown.get("environment_variables"):
            shown["environment_variables"] = {}
            shown["environment_variables_hidden"] = True
        return shown

    async def env_get(self, session: Session, args: dict) -> dict:
        found = self.store.get_environment(args["name"], args["version"])
        if found is None:
            which = f" version {args['version']}" if args["version"] else ""
            raise NotFound(f"no environment {args['name']!r}{which} is registered")
        return self._env_shown(session, found)

    async def env_list(self, session: Session, args: dict) -> list:
        """One page of environments by name (their newest versions), after ``args["after"]``."""
        found = self.store.list_environments(after=args["after"], limit=min(args["limit"] or ENV_PAGE, ENV_PAGE))
        return self._page(self._env_shown(session, e) for e in found)

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
            "limits": self.limits.status() if self.limits is not None else None,
            "faults": self.supervisor.faults.status(),
            "mlflow": self.mlflow.status() if self.mlflow is not None else None,
            "disk": await self._disk(),
        }

    async def _disk(self) -> dict:
        fs = os.statvfs(self.config.state_dir)
        runs, snapshots = await self.run_files.disk_used()
        return {"runs_bytes": runs, "snapshot_store_bytes": snapshots, "free_bytes": fs.f_bavail * fs.f_frsize,
                "total_bytes": fs.f_blocks * fs.f_frsize, "retention_days": self.config.runs.retention_days,
                "retention_interval_seconds": self.config.runs.retention_interval, "purge": self.config.runs.purge}

    async def ui(self, session: Session, args: dict) -> dict:
        """``labrun ui``: the MLflow UI's address, starting the embedded server on a per-user agent."""
        if args["start"]:
            self.mlflow.enable_ui(session.peer.admin)
        ready = await self.mlflow.wait_ready(args["timeout"]) if args["start"] else self.mlflow.mirror is not None
        return {"url": self.mlflow.tracking_uri, "ready": ready, "mlflow": self.mlflow.status()}


def _slurm_shown(target) -> dict:
    """What ``status`` says about a Slurm target (its queue settings; never its sbatch arguments)."""
    if target.slurm is None:
        return {}
    return {"partition": target.slurm.partition, "account": target.slurm.account, "qos": target.slurm.qos,
            "run_root": str(target.slurm.run_root)}
