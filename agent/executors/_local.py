"""The local executor: a run is its processes on this machine, owned by a per-run shim (``_shim``).

- The agent makes the run's cgroups (``_cgroups``, where the machine allows) and has its
  forkserver (``_Forkserver``: ``_shim.py --forkserver``, started on first use and again
  should it die) fork the shim into them, in a session of its own. With cgroups, the next
  run's shim is forked ahead into a spare group, which the run takes as it is (``spare-*``):
  joining a cgroup, and renaming one, wait for the kernel (an RCU grace period, up to about 15 ms),
  and a run then waits for neither. An ended run's empty group is the next spare's, where it
  carries nothing that run would inherit (``RunCgroups.reusable``); so a group's path names the run in
  it only while that run lasts (see ``recovering``). Given its plan, the shim pins
  itself to the run's cores (the run inherits them), joins the cgroups it is not in yet, drops to
  the run's user, starts the
  ranks, reports their pids, and from then on owns the run: its logs, its ranks, the memory
  watchdog, killing all of it, and its exit status, written atomically to
  ``RunDir.exit_status``.
- ``wait`` holds a pidfd on the shim (a child of the forkserver, of this agent or an earlier
  one: pidfds work for any process) and reads the exit record once the shim is gone. ``stop``
  is SIGTERM to the shim, which stops the run (SIGTERM, grace, SIGKILL to every process of it).
- Stopping or killing the agent touches neither the shim nor the run; ``recover`` finds the
  shim again by pid and start time (``Live``), or reads the exit record it left (``Ended``);
  only when neither is there is the run ``Lost``, and what is left of it is killed.
- A memory request is enforced by the run's memory cgroup where there is one, else by the
  shim's watchdog.

Handle: ``LocalHandle``.
"""

from __future__ import annotations

import array
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from .._cgroups import SPARE_PREFIX, RunCgroups
from ._base import (
    Capabilities, Ended, Executor, ExitResult, Handle, LaunchSpec, Live, Lost, Preparation, Recovery, StartFailed,
    refuse,
)
from ._shim import REQUEST_HEADER, cgroup_processes, process_start_time, related_processes, signal_all

log = structlog.get_logger("labrun.local")

SHIM = Path(__file__).with_name("_shim.py")
# The shim reports its ranks' pids at once; longer means it is stuck, and the start fails.
SHIM_REPORT_SECONDS = 30.0
# Shims waiting for the next runs, with cgroups (see LocalExecutor): two runs can start back to back.
SPARE_SHIMS = 2
# While a spare is left, the next one is forked this long after a run has started (or at its end).
REFILL_AFTER_SECONDS = 0.005
# A spare is in its group within milliseconds; one that is not after this long is gone.
SPARE_JOIN_SECONDS = 5.0
# An exit record is a few hundred bytes; anything larger is not one.
EXIT_RECORD_MAX = 64 * 1024


@dataclass(frozen=True)
class LocalHandle(Handle):
    kind = "local"
    VERSION = 2

    pids: tuple[int, ...]                # the ranks
    daemons: tuple[bool, ...]
    start_time: int | None               # the shim's (the first rank's in version 1), in clock ticks since boot
    memory: int | None = None
    shim: int | None = None              # None: a version 1 handle, from before runs had shims
    cgroups: tuple[str, ...] = ()        # tracking group first
    exit_path: str | None = None

    @property
    def pid(self) -> int:
        return self.pids[0]

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        # Versions 0 and 1: processes started by the agent itself, with no shim to reattach to.
        pids = data.get("pids") or [data["pid"]]
        return {**data, "pids": pids, "daemons": data.get("daemons") or [False] * len(pids), "shim": None,
                "cgroups": [data["cgroup"]] if data.get("cgroup") else []}


def read_exit_record(path: str | None) -> ExitResult | None:
    """The exit record a shim left, or None. The file is in a directory the run's user owns: it is opened
    without following links and without blocking, must be a small regular file, and is parsed strictly."""
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > EXIT_RECORD_MAX:
            return None
        record = json.loads(os.read(fd, EXIT_RECORD_MAX))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(record, dict):
        return None
    code, signum = record.get("exit_code"), record.get("signal")
    if not (isinstance(code, int) or isinstance(signum, int)) or isinstance(code, bool):
        return None
    return ExitResult(exit_code=code if isinstance(code, int) else None,
                      signal=signum if isinstance(signum, int) else None,
                      memory_exceeded=record.get("memory_exceeded") is True,
                      left_behind=left if isinstance(left := record.get("left_behind"), int) and left > 0 else 0)


class _Forkserver:
    """The process that forks the runs' shims (see ``_shim``), started on first use and again if it dies.

    It exits when this end of its socket closes: when the agent exits or is killed, or at ``close``.
    """

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._socket: trio.socket.SocketType | None = None
        self._sending = trio.Lock()

    def _spawn(self) -> None:
        self.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SHIM), "--forkserver", str(theirs.fileno())], cwd="/", env={},
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._socket = trio.socket.from_stdlib_socket(ours)

    async def fork(self, groups: list[str]) -> "_Waiting":
        """A shim forked into ``groups``, waiting for its plan."""
        status_read, status_write = os.pipe()
        plan_read, plan_write = os.pipe()
        try:
            await self._send(json.dumps({"cgroups": groups}).encode(), [status_write, plan_read])
        except BaseException:
            os.close(status_read)
            os.close(plan_write)
            raise
        finally:
            os.close(status_write)
            os.close(plan_read)
        return _Waiting(groups, plan_write, status_read, trio.current_time())

    async def _send(self, body: bytes, fds: list[int]) -> None:
        request = REQUEST_HEADER.pack(len(body)) + body
        async with self._sending:
            for attempt in (1, 2):
                if self._process is None or self._process.poll() is not None:
                    self._spawn()
                try:
                    sent = await self._socket.sendmsg(
                        [request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                    view = memoryview(request)[sent:]
                    while view:
                        view = view[await self._socket.send(view):]
                    return
                except (BrokenPipeError, ConnectionResetError):
                    self.close()   # it died since: start another and send again
                    if attempt == 2:
                        raise
                except BaseException:
                    self.close()   # cancelled part-way, say: what it has read is no longer a request
                    raise

    def close(self) -> None:
        """Close our end and end it (it exits on its own when our end closes; a stuck one is killed)."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            self._process.kill()   # the forkserver alone: the shims it forked are in sessions of their own
            self._process.wait()
            self._process = None


@dataclass
class _Waiting:
    """A forked shim that has joined ``groups`` and waits for its plan: ``plan`` and ``status`` are our ends
    of its pipes (ours to close: a closed plan pipe without a plan ends it)."""

    groups: list[str]
    plan: int | None
    status: int | None
    forked: float = 0.0   # trio.current_time() when it was asked for

    def close(self) -> None:
        for fd in (self.plan, self.status):
            if fd is not None:
                os.close(fd)
        self.plan = self.status = None


def _reports_ranks(report: bytes) -> bool:
    """Whether the status pipe's complete lines include the shim's report of its started ranks."""
    for line in report.split(b"\n")[:-1]:
        try:
            if "pids" in json.loads(line):
                return True
        except (ValueError, TypeError):
            pass
    return False


def _kill_process(pid: int, start_time: int | None) -> None:
    """SIGKILL ``pid`` if it is still the process that started at ``start_time``."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        if start_time is not None and process_start_time(pid) == start_time:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    finally:
        os.close(pidfd)


def _shim_alive(handle: LocalHandle) -> bool:
    return handle.shim is not None and process_start_time(handle.shim) == handle.start_time


class LocalExecutor(Executor):
    kind = "local"
    capabilities = Capabilities(gpus=True, distributed=True, outlives_agent=True)
    handle_type = LocalHandle

    def __init__(self, cgroups: RunCgroups | None = None, grace: float = 10.0):
        self.cgroups = cgroups
        self.grace = grace
        self._forkserver = _Forkserver()
        # With cgroups, shims already in groups of their own wait for the next runs: joining a cgroup
        # waits for the kernel (an RCU grace period, ~10 ms), so it is done before the run is there.
        self._spares: list[_Waiting] = []
        self._spare_names = 0
        # Spare groups' names are this agent's own, never an earlier one's (a pid can come again after a restart):
        # runs live on in them. (A name that is taken all the same is skipped: ``_new_spare_group``.)
        self._spare_prefix = f"{SPARE_PREFIX}{os.getpid()}-{os.urandom(6).hex()}-"
        self._refilling = False
        # Ended runs' empty tracking groups, for the next spares (see RunCgroups.recycle).
        self._free_groups: list[str] = []
        # At start, how many of the runs being recovered name each group (``recovering``).
        self._recovered_groups: Counter[str] = Counter()

    @property
    def containment(self) -> str:
        return self.cgroups.describe() if self.cgroups is not None else "process groups (no cgroup available)"

    def admit(self, spec: dict, target) -> None:
        super().admit(spec, target)
        distributed = spec.get("distributed")
        if distributed is not None:
            if distributed["node_count"] > 1:
                refuse("distributed", f"node_count={distributed['node_count']}: this agent runs on one machine; "
                                      "multi-node runs need a cluster compute target")
            if distributed["kind"] == "mpi" and shutil.which("mpirun") is None:
                refuse("distributed", "MPI runs need 'mpirun' on the agent's machine (e.g. Debian's openmpi-bin)")

    async def prepare(self, preparation: Preparation) -> LaunchSpec:
        # An empty snapshot (an empty tree, an in-place run's outputs) is two directories: the shim makes them
        # as the run's user, beside the agent rather than in its event loop.
        return await preparation.planner.plan(preparation, empty_snapshot_by_run=True)

    # -- start ------------------------------------------------------------------------------

    def _plan(self, launch: LaunchSpec, groups: list[str], join: list[str], exit_path: str) -> bytes:
        owned = os.geteuid() == 0 and launch.uid != 0
        plan = {
            "ranks": [{"argv": launch.argv, "env": {**launch.env, **rank.env}, "log": str(rank.log_path),
                       "daemon": rank.daemon} for rank in launch.ranks],
            "cwd": str(launch.cwd), "cgroups": groups, "join": join, "grace": self.grace, "exit_path": exit_path,
            "empty_snapshot": str(launch.empty_snapshot) if launch.empty_snapshot is not None else None,
            "uid": launch.uid if owned else None, "gid": launch.gid, "groups": launch.groups,
            "cores": list(launch.cores),
            # Without a memory cgroup, the shim's watchdog enforces the request.
            "watchdog_memory": launch.memory if launch.memory is not None and (
                self.cgroups is None or self.cgroups.memory is None) else None,
        }
        return json.dumps(plan).encode() + b"\n"   # one line: the shim reads up to its end (see _shim)

    async def _claim_spare(self, launch: LaunchSpec) -> tuple[_Waiting | None, list[str]]:
        """A spare shim that is in its group, and the run's groups (that group as it is, first);
        or (None, []). A spare not in its group long after it was forked is gone: it is replaced."""
        for spare in list(self._spares):
            if cgroup_processes(spare.groups[0]):
                self._spares.remove(spare)
                try:
                    return spare, self.cgroups.claim(spare.groups[0], launch.run_id, launch.memory)
                except OSError as exc:
                    log.warning("shim.spare.unusable", error=str(exc))
                    await self._discard(spare)
                    return None, []
            if trio.current_time() - spare.forked > SPARE_JOIN_SECONDS:
                self._spares.remove(spare)
                await self._discard(spare)
        return None, []

    async def _refill(self) -> None:
        """Fork shims into spare groups until ``SPARE_SHIMS`` wait (one refill at a time)."""
        if self.cgroups is None or self._refilling:
            return
        self._refilling = True
        try:
            while len(self._spares) < SPARE_SHIMS:
                group = self._free_groups.pop() if self._free_groups else self._new_spare_group()
                try:
                    self._spares.append(await self._forkserver.fork([group]))
                except BaseException:
                    self.cgroups.remove([group])
                    raise
        except OSError as exc:
            log.warning("shim.spare.failed", error=str(exc))
        finally:
            self._refilling = False

    def _new_spare_group(self) -> str:
        while True:
            try:
                return self.cgroups.create_spare(self._spare_name())
            except FileExistsError:
                continue   # (an earlier agent's, against all odds: never shared)

    def _spare_name(self) -> str:
        self._spare_names += 1
        return f"{self._spare_prefix}{self._spare_names}"

    async def _discard(self, spare: _Waiting) -> None:
        spare.close()   # it ends at once; killed should it not
        await self._kill_groups(spare.groups)
        self.cgroups.remove(spare.groups)

    async def start(self, launch: LaunchSpec) -> LocalHandle:
        exit_path = launch.run_dir.exit_status
        exit_path.unlink(missing_ok=True)
        shim, groups = await self._claim_spare(launch)
        if shim is None:
            try:
                groups = self.cgroups.create(launch.run_id, launch.memory) if self.cgroups is not None else []
            except OSError as exc:
                raise StartFailed(f"cannot make the run's cgroup: {exc}") from None
        report = b""
        try:
            # Shielded (and bounded): a cancel landing now must not leave a started run without a handle.
            with trio.CancelScope(shield=True), trio.move_on_after(SHIM_REPORT_SECONDS):
                # The shim opens the run's files itself, once it is the run's user: the agent opens none.
                if shim is not None and not await self._hand_plan(shim, self._plan(
                        launch, groups, groups[1:], str(exit_path))):
                    shim.close()   # the spare died meanwhile: fork one now
                    shim = None
                if shim is None:
                    shim = await self._forkserver.fork(groups)
                    if not await self._hand_plan(shim, self._plan(launch, groups, [], str(exit_path))):
                        raise OSError(errno.EPIPE, "it ended before it had its plan")
                async with trio.lowlevel.FdStream(shim.status) as stream:
                    shim.status = None
                    # Until the shim's report of its ranks (it closes the pipe just after), or the pipe's end.
                    while not _reports_ranks(report) and (chunk := await stream.receive_some(4096)):
                        report += chunk
        except OSError as exc:
            report = json.dumps({"error": f"its shim did not start: {exc}"}).encode()
        finally:
            if shim is not None:
                shim.close()
        answer = {}
        try:
            for line in report.splitlines():   # the forkserver's line and the shim's, in either order
                answer.update(json.loads(line))
        except (ValueError, TypeError):
            answer = {}
        if "pids" not in answer:
            answer.setdefault("error", "its shim did not start (see the run's log)")
            with trio.CancelScope(shield=True):
                if isinstance(answer.get("shim"), int):   # it is stuck, or has failed and gone
                    _kill_process(answer["shim"], answer.get("start_time"))
                await self._kill_groups(groups)
                if self.cgroups is not None:
                    self.cgroups.remove(groups)
            message = str(answer.get("error"))
            if not message.startswith("cannot start"):
                message = f"cannot start {launch.argv[0]!r}: {message}"
            raise StartFailed(message, "command_not_found" if answer.get("errno") == errno.ENOENT else "start_failed")
        return LocalHandle(pids=tuple(answer["pids"]), daemons=tuple(r.daemon for r in launch.ranks),
                           start_time=answer["start_time"], memory=launch.memory, shim=answer["shim"],
                           cgroups=tuple(groups), exit_path=str(exit_path))

    @staticmethod
    async def _hand_plan(shim: _Waiting, plan: bytes) -> bool:
        """Write the plan and close the pipe; False if the shim is gone."""
        os.set_blocking(shim.plan, False)
        try:
            # A plan fits in the empty pipe's buffer: written at once, with no stream to set up.
            plan = plan[os.write(shim.plan, plan):]
        except BlockingIOError:
            pass
        except BrokenPipeError:
            return False
        if not plan:
            os.close(shim.plan)
            shim.plan = None
            return True
        async with trio.lowlevel.FdStream(shim.plan) as stream:
            shim.plan = None
            try:
                await stream.send_all(plan)
            except trio.BrokenResourceError:
                return False
        return True

    # -- wait, stop, recover ----------------------------------------------------------------

    async def _shim_exited(self, handle: LocalHandle) -> None:
        try:
            pidfd = os.pidfd_open(handle.shim)
        except ProcessLookupError:
            return
        try:
            # The pid could have been reused between the handle and the pidfd: check it is still the shim.
            if process_start_time(handle.shim) == handle.start_time:
                await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)

    async def wait(self, handle: LocalHandle) -> ExitResult:
        """Until the shim has ended the run and gone; its exit record says how the run ended."""
        if handle.shim is None:
            raise RuntimeError("a run started before runs had shims cannot be awaited")
        # The next runs' spares are forked here, once this run is started and recorded: not on its way there,
        # and while a spare is left, not in its first moments either (a fork beside a process that is
        # starting takes CPU from it on a small machine).
        if self._spares:
            with trio.move_on_after(REFILL_AFTER_SECONDS):
                await self._shim_exited(handle)
        with trio.CancelScope(shield=True):
            await self._refill()
        await self._shim_exited(handle)
        result = self._exit_record(handle)
        with trio.CancelScope(shield=True):
            await self._release(handle)
        if result is None:
            raise RuntimeError("the run's shim ended without recording how the run ended")
        return result

    async def stop(self, handle: LocalHandle, grace: float) -> None:
        """Ask the shim to stop the run (SIGTERM, its grace period, SIGKILL); if it is gone, kill what is left."""
        if handle.shim is not None:
            try:
                pidfd = os.pidfd_open(handle.shim)
            except ProcessLookupError:
                pidfd = None
            if pidfd is not None:
                try:
                    if process_start_time(handle.shim) == handle.start_time:
                        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
                        return
                except ProcessLookupError:
                    pass
                finally:
                    os.close(pidfd)
        await self._kill_left(handle)

    def recovering(self, handles: list[LocalHandle]) -> None:
        self._recovered_groups = Counter(group for handle in handles for group in handle.cgroups)

    async def recover(self, handle: LocalHandle) -> Recovery:
        if _shim_alive(handle):
            return Live(handle)
        result = self._exit_record(handle)
        if any(self._recovered_groups[group] > 1 for group in handle.cgroups):
            # Its ended run's group went to a spare, and another run being recovered took it (the agent stopped
            # before it recorded how this one ended): it is that run's now, and nothing of this one is in it.
            log.info("run.recover.group_reused", group=handle.cgroups[0])
        else:
            # Nothing watches what is left of the run any more (a version 1 run, or a killed shim): end it.
            await self._kill_left(handle)
            await self._release(handle)
        if result is not None:
            return Ended(result)
        return Lost("its shim is gone and left no exit status (the machine restarted, or it was killed)")

    def _exit_record(self, handle: LocalHandle) -> ExitResult | None:
        """The shim's record, and whether the kernel killed the run for its memory (read before its cgroup goes)."""
        result = read_exit_record(handle.exit_path)
        if result is not None and not result.memory_exceeded and not result.ok and self.cgroups is not None \
                and self.cgroups.oom_killed(list(handle.cgroups)):
            result = dataclasses.replace(result, memory_exceeded=True)
        return result

    async def aclose(self) -> None:
        while self._spares:
            await self._discard(self._spares.pop())
        if self._free_groups:
            self.cgroups.remove(self._free_groups)
            self._free_groups = []
        self._forkserver.close()
        if self.cgroups is not None:
            self.cgroups.remove_roots()

    async def reconcile(self, owned: list[Handle]) -> None:
        """Kill and remove the cgroups of runs no active run owns: a run whose agent died between starting
        it and recording its handle (it is queued again, and must not run twice)."""
        if self.cgroups is None:
            return
        keep = {Path(group).name for handle in owned for group in handle.cgroups}
        for groups in self.cgroups.orphans(keep):
            if Path(groups[0]).name.startswith(self._spare_prefix):
                continue   # this agent's own: a spare's, or an ended run's recycled meanwhile (see _release)
            log.warning("run.orphan.killed", group=groups[0])
            await self._kill_groups(groups)
            self.cgroups.remove(groups)

    # -- what is left of a run --------------------------------------------------------------

    async def _kill_left(self, handle: LocalHandle) -> None:
        if handle.cgroups:
            await self._kill_groups(list(handle.cgroups))
        elif handle.shim is None and handle.start_time == process_start_time(handle.pid):
            signal_all(related_processes(set(handle.pids), set()), signal.SIGKILL)

    @staticmethod
    async def _kill_groups(groups: list[str]) -> bool:
        """SIGKILL every process in the run's tracking group until none is left (bounded); whether none is."""
        if not groups:
            return True
        for _ in range(200):
            left = cgroup_processes(groups[0])
            if not left:
                return True
            signal_all(left, signal.SIGKILL)
            await trio.sleep(0.01)
        log.warning("cgroups.kill.incomplete", group=groups[0], left=len(cgroup_processes(groups[0])))
        return False

    async def _release(self, handle: LocalHandle) -> None:
        if handle.cgroups and self.cgroups is not None:
            groups = list(handle.cgroups)
            if await self._kill_groups(groups) and len(self._free_groups) < SPARE_SHIMS \
                    and self.cgroups.reusable(groups[0]):
                try:
                    self._free_groups.append(self.cgroups.recycle(groups[0], self._spare_name()))
                    groups = groups[1:]
                except OSError as exc:
                    log.warning("cgroups.recycle.failed", group=groups[0], error=str(exc))
            self.cgroups.remove(groups)
