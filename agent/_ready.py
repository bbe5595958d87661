"""Ready copies of snapshots: the next run's copy of a tree its user submits again, made ahead of its start.

A run's ``snapshot/`` is a copy of its tree, made as it starts (``_snapshot.materialize``): on a
filesystem without reflinks, one file creation per file, and for small trees the largest part of a
run's start. A sweep or a repeated job submits the same tree again and again. Once a user's tree has
been materialized twice, one more copy of it is made in the background, once that run has started
(``want``, then ``go``), and the next run of the same user and tree takes it (``take``): one rename
into its run directory instead of a copy on the way to its start. The copy is made exactly as a
run's is: by ``materialize``, with the user's rights, from the store's contents (never from an
earlier run's directory, which that run may have changed).

``<state>/ready/`` is root's and 0700: no user reaches a copy by path, not even its own; each copy
is ``ready/<n>/snapshot`` in a directory of its user's (0700), and the rename into the run
directory is done with the user's rights, through directory fds. Bounds: only trees of at most
``max_files`` files and ``max_bytes`` bytes, at most ``max_copies`` copies (one per user and tree)
and ``max_total_bytes`` in all (the oldest goes first), each kept at most ``max_age`` seconds, and
none while the state disk is failing. No copy outlives the agent: they are removed at shutdown, and
whatever a killed agent left (a copy half made, say) is removed at the next start.
"""

from __future__ import annotations

import errno
import functools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog
import trio

from ._asuser import Credentials, acting_as, agent_dir, make_private_dir
from ._retention import remove_tree
from ._snapshot import ContentStore, SnapshotFailed, materialize

log = structlog.get_logger("labrun.ready")

MAX_FILES = 1000
MAX_BYTES = 32 << 20
MAX_COPIES = 8
MAX_TOTAL_BYTES = 128 << 20
MAX_AGE = 600.0
# A run whose copy is being made waits this long at most for it: less than making its own would take, and no
# second copy of the same tree competing with the first for the disk.
MAKING_WAIT = 2.0
# Trees materialized lately (per user): a tree seen again is one a user repeats, and worth a copy.
SEEN = 256

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class _Copy:
    name: str
    size: int
    made: float = field(default=0.0)   # trio.current_time() once complete


class ReadyCopies:
    def __init__(self, root: Path, content: ContentStore, *, failing: Callable[[], bool] = lambda: False,
                 max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES, max_copies: int = MAX_COPIES,
                 max_total_bytes: int = MAX_TOTAL_BYTES, max_age: float = MAX_AGE):
        self.root = root
        self.content = content
        self.failing = failing
        self.max_files, self.max_bytes, self.max_copies = max_files, max_bytes, max_copies
        self.max_total_bytes, self.max_age = max_total_bytes, max_age
        self._copies: OrderedDict[tuple, _Copy] = OrderedDict()   # complete ones, oldest first
        self._making: dict[tuple, trio.Event] = {}                # the one being made, set once it is done
        self._wanted: OrderedDict[tuple, list[tuple]] = OrderedDict()
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self._names = 0
        self._emptied: list[str] = []   # taken copies' directories, removed in the background
        self._wake = trio.Event()
        agent_dir(root)
        self._clear()   # what a killed agent left

    def _clear(self) -> None:
        for entry in os.listdir(self.root):
            remove_tree(self.root, entry)

    def __contains__(self, key: tuple[Credentials, str]) -> bool:
        """Whether a copy of tree ``key[1]`` for ``key[0]`` is ready."""
        return key in self._copies

    @property
    def _total(self) -> int:
        return sum(copy.size for copy in self._copies.values())

    # -- the run's side ---------------------------------------------------------------------

    async def take(self, creds: Credentials, tree: str, run_dir: Path) -> bool:
        """Move a ready copy of ``tree`` made for ``creds`` into ``run_dir`` as its ``snapshot/``; should it be
        being made now (a run of the same tree came just before), once it is made (``MAKING_WAIT`` at most).

        False when there is none (or it could not be moved): the caller materializes the snapshot itself.
        A few system calls, in the event loop.
        """
        making = self._making.get((creds, tree))
        if making is not None:
            with trio.move_on_after(MAKING_WAIT):
                await making.wait()
        copy = self._copies.pop((creds, tree), None)
        if copy is None:
            return False
        moved = False
        try:
            root_fd = os.open(self.root, _DIR)
            try:
                copy_fd = os.open(copy.name, _DIR, dir_fd=root_fd)
                run_fd = os.open(run_dir, _DIR)
                try:
                    with acting_as(creds):
                        os.rename("snapshot", "snapshot", src_dir_fd=copy_fd, dst_dir_fd=run_fd)
                    moved = True
                finally:
                    os.close(run_fd)
                    os.close(copy_fd)
            finally:
                os.close(root_fd)
        except OSError as exc:
            # A snapshot/ an earlier agent left there, or run directories on another filesystem (``runs/``
            # mounted apart from the state directory): then no copy is made again.
            log.info("ready.take.failed", error=str(exc))
            if exc.errno == errno.EXDEV:
                self.max_copies = 0
            if not moved:
                remove_tree(self.root, copy.name)
                return False
        # Its emptied directory goes later (``go``): an rmdir waits for the filesystem's journal, and
        # is not worth a run's start.
        self._emptied.append(copy.name)
        return True

    def want(self, creds: Credentials, tree: str, entries: list[tuple]) -> None:
        """The run of ``tree`` for ``creds`` has its snapshot: prepare the next one if the tree is a repeated
        one (made once ``go`` is called, so that the copy does not compete with this run's start)."""
        key = (creds, tree)
        if not entries or len(entries) > self.max_files or not self.max_copies or key in self._copies \
                or key in self._wanted:
            return
        if sum(e[1] for e in entries) > self.max_bytes:
            return
        if key not in self._seen:
            self._seen[key] = None
            if len(self._seen) > SEEN:
                self._seen.popitem(last=False)
            return
        self._seen.move_to_end(key)
        self._wanted[key] = entries
        while len(self._wanted) > self.max_copies:
            self._wanted.popitem(last=False)

    def go(self) -> None:
        """A run has started: make the copies it wanted now (and remove the directories of those taken)."""
        if self._wanted or self._emptied:
            self._wake.set()

    # -- the background task ----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Make wanted copies one at a time and expire old ones, until cancelled; then remove them all."""
        task_status.started()
        try:
            while True:
                expires = min((c.made + self.max_age for c in self._copies.values()), default=math.inf)
                with trio.move_on_at(expires):
                    await self._wake.wait()
                self._wake = trio.Event()
                # The next run may come any moment: its copy first, the clearing up after.
                while self._wanted:
                    key, entries = self._wanted.popitem(last=False)
                    await self._make(key, entries)
                while self._emptied:
                    await trio.to_thread.run_sync(remove_tree, self.root, self._emptied.pop())
                await self._expire()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(30):
                self._copies.clear()
                self._wanted.clear()
                await trio.to_thread.run_sync(self._clear)

    async def _expire(self) -> None:
        now = trio.current_time()
        for key, copy in list(self._copies.items()):
            if copy.made + self.max_age <= now:
                del self._copies[key]
                await self._remove(copy)

    async def _remove(self, copy: _Copy) -> None:
        await trio.to_thread.run_sync(remove_tree, self.root, copy.name)

    async def _make(self, key: tuple, entries: list[tuple]) -> None:
        creds, _ = key
        size = sum(e[1] for e in entries)
        # Wanted again while it was being made (a run came meanwhile and made its own): it is there now.
        if key in self._copies or self.failing() or size > self.max_total_bytes:
            return
        # Room first: the oldest copies go.
        while self._copies and (len(self._copies) >= self.max_copies or self._total + size > self.max_total_bytes):
            await self._remove(self._copies.popitem(last=False)[1])
        self._names += 1
        copy = _Copy(str(self._names), size)
        self._making[key] = made = trio.Event()
        try:
            await trio.to_thread.run_sync(functools.partial(self._materialize, copy.name, creds, entries))
            copy.made = trio.current_time()
            self._copies[key] = copy   # (listed before a run waiting for it wakes)
        except BaseException as exc:
            self._making.pop(key, None)
            made.set()   # (the run waiting for it makes its own now, not after the removal)
            with trio.CancelScope(shield=True):
                await self._remove(copy)
            if isinstance(exc, (OSError, SnapshotFailed)):
                log.info("ready.make.failed", error=str(exc))
                return
            raise
        self._making.pop(key, None)
        made.set()

    def _materialize(self, name: str, creds: Credentials, entries: list[tuple]) -> None:
        make_private_dir(self.root, name, creds)
        materialize(self.content, entries, self.root / name, creds)
