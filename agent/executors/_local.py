"""The local executor: a run is its processes on this machine, owned by a per-run shim (``_shim``).

- The agent makes the run's cgroups (``_cgroups``, where the machine allows) and has its
  forkserver (``_Forkserver``: ``_shim.py --forkserver``, started on first use and again
  should it die) fork the shim, in a session of its own. The shim pins itself to the run's
  cores (the run inherits them), joins the cgroups, drops to the run's user, starts the ranks,
  reports their pids, and from then on owns the run: its logs, its ranks, the memory
  watchdog, killing all of it, and its exit status, written atomically to
  ``RunDir.exit_status``.
- ``wait`` holds a pidfd on the shim (a child of the forkserver, of this agent or an earlier
  one: pidfds work for any process) and reads the exit record once the shim is gone. ``stop`` is SIGTERM to the
  shim, which stops the run (SIGTERM, grace, SIGKILL to every process of it).
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
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from .._cgroups import RunCgroups
from ._base import (
    Capabilities, Ended, Executor, ExitResult, Handle, LaunchSpec, Live, Lost, Recovery, StartFailed, refuse,
)
from ._shim import REQUEST_HEADER, cgroup_processes, process_start_time, related_processes, signal_all

log = structlog.get_logger("labrun.local")

SHIM = Path(__file__).with_name("_shim.py")
# The shim reports its ranks' pids at once; longer means it is stuck, and the start fails.
SHIM_REPORT_SECONDS = 30.0
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
                      memory_exceeded=record.get("memory_exceeded") is True)


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

    async def fork(self, plan: bytes, status_fd: int) -> None:
        """Have a shim forked for ``plan``; it reports on ``status_fd`` (which stays ours to close)."""
        request = REQUEST_HEADER.pack(len(plan)) + plan
        async with self._sending:
            for attempt in (1, 2):
                if self._process is None or self._process.poll() is not None:
                    self._spawn()
                try:
                    sent = await self._socket.sendmsg(
                        [request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [status_fd]))])
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

    # -- start ------------------------------------------------------------------------------

    def _plan(self, launch: LaunchSpec, groups: list[str], exit_path: str) -> bytes:
        owned = os.geteuid() == 0 and launch.uid != 0
        plan = {
            "ranks": [{"argv": launch.argv, "env": {**launch.env, **rank.env}, "log": str(rank.log_path),
                       "daemon": rank.daemon} for rank in launch.ranks],
            "cwd": str(launch.cwd), "cgroups": groups, "grace": self.grace, "exit_path": exit_path,
            "uid": launch.uid if owned else None, "gid": launch.gid, "groups": launch.groups,
            "cores": list(launch.cores),
            # Without a memory cgroup, the shim's watchdog enforces the request.
            "watchdog_memory": launch.memory if launch.memory is not None and (
                self.cgroups is None or self.cgroups.memory is None) else None,
        }
        return json.dumps(plan).encode()

    async def start(self, launch: LaunchSpec) -> LocalHandle:
        try:
            groups = self.cgroups.create(launch.run_id, launch.memory) if self.cgroups is not None else []
        except OSError as exc:
            raise StartFailed(f"cannot make the run's cgroup: {exc}") from None
        exit_path = launch.run_dir.exit_status
        exit_path.unlink(missing_ok=True)
        read_end, write_end = os.pipe()
        report = b""
        try:
            # Shielded (and bounded): a cancel landing now must not leave a started run without a handle.
            with trio.CancelScope(shield=True), trio.move_on_after(SHIM_REPORT_SECONDS):
                try:
                    # The shim opens the run's files itself, once it is the run's user: the agent opens none.
                    await self._forkserver.fork(self._plan(launch, groups, str(exit_path)), write_end)
                finally:
                    os.close(write_end)
                async with trio.lowlevel.FdStream(read_end) as stream:
                    read_end = None
                    while chunk := await stream.receive_some(4096):
                        report += chunk
        except OSError as exc:
            report = json.dumps({"error": f"its shim did not start: {exc}"}).encode()
        finally:
            if read_end is not None:
                os.close(read_end)
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

    async def recover(self, handle: LocalHandle) -> Recovery:
        if _shim_alive(handle):
            return Live(handle)
        result = self._exit_record(handle)
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
            result = ExitResult(exit_code=result.exit_code, signal=result.signal, memory_exceeded=True)
        return result

    async def aclose(self) -> None:
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
    async def _kill_groups(groups: list[str]) -> None:
        """SIGKILL every process in the run's tracking group until none is left (bounded)."""
        if not groups:
            return
        for _ in range(200):
            left = cgroup_processes(groups[0])
            if not left:
                return
            signal_all(left, signal.SIGKILL)
            await trio.sleep(0.01)
        log.warning("cgroups.kill.incomplete", group=groups[0], left=len(cgroup_processes(groups[0])))

    async def _release(self, handle: LocalHandle) -> None:
        if handle.cgroups and self.cgroups is not None:
            await self._kill_groups(list(handle.cgroups))
            self.cgroups.remove(list(handle.cgroups))
