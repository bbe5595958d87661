"""The local executor: a run is one process on this machine (or one per rank), each leader of its own session.

- stdout and stderr are the rank's log file itself (no pipe through the agent); stdin is /dev/null.
- When the agent is root and the run's owner is not, the child drops to the owner's uid, gid and
  supplementary groups before exec.
- Cores are pinned by setting the agent's own thread affinity around the spawn: the child inherits
  it at fork, so it is never briefly unpinned.
- ``stop`` sends SIGTERM to every process of the run's sessions and process groups (grandchildren
  included), waits ``grace`` seconds, then SIGKILLs what is left.
- Exits are awaited through pidfds: no thread, no polling. When one rank fails, the others are
  stopped and the run fails with that rank's result; parameter servers (``daemon`` ranks) are
  stopped once the other ranks are done.
- A memory request is enforced by a per-run memory cgroup (``_cgroups``) where the machine allows
  one, else by a watchdog that sums the resident memory of the run's processes twice a second and
  SIGKILLs them all past the limit, as the kernel would.

Handle: ``{"pid", "pids", "daemons", "start_time", "memory", "cgroup"}`` (start time in clock ticks
since boot, from /proc, so a recycled pid is never mistaken for the run).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
from pathlib import Path

import trio

from ._asuser import Credentials, open_file_as
from ._cgroups import MemoryCgroups
from ._executor import ExitResult, LaunchSpec, StartFailed

WATCHDOG_INTERVAL = 0.5
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _read_proc(pid: int, name: str) -> str | None:
    # A raw read: a text-mode read of a /proc file costs about ten times as much (measured).
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _proc_stat(pid: int) -> list[str] | None:
    raw = _read_proc(pid, "stat")
    if raw is None:
        return None
    # The command name is in parentheses and may hold spaces; fields follow the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def session_processes(sids: list[int] | int) -> list[int]:
    """Every live process whose session or process group is one of ``sids``, plus their descendants."""
    sids = {sids} if isinstance(sids, int) else set(sids)
    members, parents = set(), {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _proc_stat(int(entry))
        if fields is None or fields[0] == "Z":
            continue
        pid, ppid, pgrp, session = int(entry), int(fields[1]), int(fields[2]), int(fields[3])
        parents[pid] = ppid
        if session in sids or pgrp in sids:
            members.add(pid)
    # Descendants that moved to a session of their own are still children of a member.
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in members and pid not in members:
                members.add(pid)
                grew = True
    return sorted(members)


def resident_memory(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(_read_proc(pid, "statm").split()[1]) * _PAGE_SIZE
        except (AttributeError, IndexError, ValueError):   # gone meanwhile (None), or an empty read
            pass
    return total


def _signal_all(sids: list[int], signum: int) -> int:
    pids = session_processes(sids)
    for pid in pids:
        try:
            os.kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
    return len(pids)


async def _exited(process: subprocess.Popen) -> int:
    if process.returncode is None:
        pidfd = os.pidfd_open(process.pid)
        try:
            await trio.lowlevel.wait_readable(pidfd)
        finally:
            os.close(pidfd)
    return process.wait()


def _result(returncode: int, memory_exceeded: bool) -> ExitResult:
    if returncode < 0:
        return ExitResult(signal=-returncode, memory_exceeded=memory_exceeded)
    return ExitResult(exit_code=returncode, memory_exceeded=memory_exceeded)


class LocalExecutor:
    name = "local"

    def __init__(self, cgroups: MemoryCgroups | None = None, grace: float = 10.0):
        self.cgroups = cgroups
        self.grace = grace
        self._children: dict[int, subprocess.Popen] = {}

    def _spawn(self, launch: LaunchSpec, argv: list[str], rank) -> subprocess.Popen:
        # The log is opened with the owner's rights and no link followed: the run directory is the user's.
        creds = Credentials(launch.uid, launch.gid, tuple(launch.groups))
        try:
            log = open_file_as(creds, rank.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        except OSError as exc:
            raise StartFailed(f"cannot open the run's log {rank.log_path.name}: {exc.strerror or exc}") from None
        options = creds.popen_options()
        previous = os.sched_getaffinity(0)
        try:
            if launch.cores:
                os.sched_setaffinity(0, launch.cores)
            return subprocess.Popen(
                argv, cwd=launch.cwd, env={**launch.env, **rank.env}, stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, start_new_session=True, close_fds=True, **options,
            )
        except OSError as exc:
            failure = StartFailed(f"cannot start {launch.argv[0]!r}: {exc.strerror or exc}")
            if exc.errno == errno.ENOENT:
                failure.reason = "command_not_found"
            raise failure from None
        finally:
            if launch.cores:
                os.sched_setaffinity(0, previous)
            os.close(log)

    async def start(self, launch: LaunchSpec) -> dict:
        argv, group = launch.argv, None
        if launch.memory is not None and self.cgroups is not None:
            group = self.cgroups.create(launch.run_id, launch.memory, launch.uid, launch.gid)
            argv = self.cgroups.join_argv(group, argv)
        processes = []
        try:
            for rank in launch.ranks:
                processes.append(self._spawn(launch, argv, rank))
        except StartFailed:
            _signal_all([p.pid for p in processes], signal.SIGKILL)
            for process in processes:
                process.wait()
            if group is not None:
                self.cgroups.remove(group)
            raise
        for process in processes:
            self._children[process.pid] = process
        pids = [p.pid for p in processes]
        return {"pid": pids[0], "pids": pids, "daemons": [r.daemon for r in launch.ranks],
                "start_time": process_start_time(pids[0]), "memory": launch.memory,
                "cgroup": str(group) if group else None}

    async def wait(self, handle: dict) -> ExitResult:
        """Until every rank has exited; a failing rank stops the others."""
        pids = handle.get("pids") or [handle["pid"]]
        daemons = handle.get("daemons") or [False] * len(pids)
        processes = [self._children[pid] for pid in pids]
        exceeded = False
        failure: subprocess.Popen | None = None

        async def watchdog():
            nonlocal exceeded
            while resident_memory(session_processes(pids)) <= handle["memory"]:
                await trio.sleep(WATCHDOG_INTERVAL)
            exceeded = True
            _signal_all(pids, signal.SIGKILL)

        async with trio.open_nursery() as guard:
            if handle.get("memory") is not None and handle.get("cgroup") is None:
                guard.start_soon(watchdog)
            done = trio.Event()

            async def rank_exited(process, daemon):
                nonlocal failure
                code = await _exited(process)
                if code != 0 and failure is None and not (daemon and done.is_set()):
                    failure = process
                    done.set()
                if all(p.returncode is not None for p, d in zip(processes, daemons) if not d):
                    done.set()

            async with trio.open_nursery() as ranks:
                for process, daemon in zip(processes, daemons):
                    ranks.start_soon(rank_exited, process, daemon)
                await done.wait()
                if any(p.returncode is None for p in processes):
                    await self.stop({"pids": [p.pid for p in processes if p.returncode is None]}, self.grace)
            guard.cancel_scope.cancel()
        for pid in pids:
            self._children.pop(pid, None)
        if handle.get("cgroup"):
            group = Path(handle["cgroup"])
            code = (failure or processes[0]).returncode
            exceeded = exceeded or (code != 0 and self.cgroups.oom_killed(group))
            self.cgroups.remove(group)
        return _result((failure or processes[0]).returncode, exceeded)

    async def stop(self, handle: dict, grace: float) -> None:
        """SIGTERM the run's processes, give them ``grace`` seconds, then SIGKILL the rest."""
        sids = handle.get("pids") or [handle["pid"]]
        if not _signal_all(sids, signal.SIGTERM):
            return
        # Zombies are not listed, so an exited leader awaiting its reaper counts as gone.
        with trio.move_on_after(grace):
            while session_processes(sids):
                await trio.sleep(0.05)
            return
        _signal_all(sids, signal.SIGKILL)

    async def abandon(self, handle: dict, grace: float) -> None:
        """Terminate what is left of a run an earlier agent started, if it is still that run."""
        pid = handle.get("pid")
        if pid and handle.get("start_time") == process_start_time(pid):
            await self.stop(handle, grace)
        if handle.get("cgroup") and self.cgroups is not None:
            self.cgroups.remove(Path(handle["cgroup"]))
